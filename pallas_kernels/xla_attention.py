"""Fast attention in plain jnp/lax: paged decode, paged prefill and dense decode.

Runs on any backend (it is the CPU path and the GPU fallback). All three share one loop:
walk the keys a block at a time, gather that block for every query, and fold it into an
online softmax whose statistics and partial output are float32. Working block by block
keeps the gathered K/V small (it stays in cache on a CPU) instead of materialising each
sequence's whole context, and the loop only visits blocks some query can see.

Shapes: q ``[N, Hq, D]`` (N sequences for decode, N flattened tokens for prefill); a page
pool is one layer ``[Hkv, P, S, D]`` or the stacked cache ``[L, Hkv, P, S, D]`` with
``layer=`` (int or traced scalar), gathered from directly so no layer slice is copied.
Query head h uses kv head ``h // (Hq // Hkv)``. 8-bit pages come with ``k_scale`` /
``v_scale`` (the pool's shape minus head_dim, see ``quantization``): each block's scales
are gathered beside its pages and dequantized to float32 inside the loop, so only the
8-bit codes and their scales are read from the pool.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jpaged.pallas_kernels.quantization import dequantize

# Keys per loop step of the paged path, measured on a 2-core CPU (benchmarks/attention.py,
# 8 kv heads, head_dim 128): about BLOCK_TOKENS, more (up to MAX_BLOCK_TOKENS) while a
# step would gather under MIN_GATHER_BYTES of K, since tiny steps are all overhead; fewer
# when it would gather over MAX_GATHER_BYTES (prefill gathers a block per query token).
# Gathering the whole table in one step is much slower: it no longer stays in cache.
BLOCK_TOKENS = 128
MAX_BLOCK_TOKENS = 512
MIN_GATHER_BYTES = 2 * 2**20
MAX_GATHER_BYTES = 16 * 2**20
# Decode on a CPU walks one sequence at a time, keys per step sized so the gathered K
# block (all kv heads, float32) is about this big, which stays in cache.
SEQUENCE_BLOCK_BYTES = 512 * 2**10
# ... when a key (all kv heads, float32) is at least this big; smaller heads batch.
SEQUENCE_MIN_KEY_BYTES = 2 * 2**10
# Dense K/V need no gather, so one big step is fastest there.
DENSE_BLOCK_TOKENS = 2048
OPTIONS = ("sm_scale", "soft_cap", "sliding_window")


def default_pages_per_block(page_size: int, num_queries: int, num_kv_heads: int,
                            head_dim: int) -> int:
    """Pages per loop step for ``num_queries`` queries (sequences or prefill tokens)."""
    bytes_per_key = max(num_queries, 1) * num_kv_heads * head_dim * 4  # float32 compute
    tokens = min(MAX_BLOCK_TOKENS, max(BLOCK_TOKENS, MIN_GATHER_BYTES // bytes_per_key))
    tokens = min(tokens, MAX_GATHER_BYTES // bytes_per_key)
    return max(1, tokens // page_size)


@functools.partial(jax.jit, static_argnames=OPTIONS + ("pages_per_block",))
def paged_decode(q, k_pages, v_pages, block_tables, lengths, *, layer=None, k_scale=None,
                 v_scale=None, sm_scale=None, soft_cap=None, sliding_window=None,
                 pages_per_block=None):
    """Decode attention: one query per sequence at position ``lengths - 1``.

    q: ``[B, Hq, D]``; k_pages, v_pages: ``[Hkv, P, S, D]`` or ``[L, Hkv, P, S, D]`` with
    ``layer`` (8-bit with k_scale, v_scale ``[(L,) Hkv, P, S]``); block_tables:
    ``int32[B, W]``; lengths: ``int32[B]``. Returns ``[B, Hq, D]`` in q's dtype (zeros for
    length 0).
    """
    options = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    pools = (k_pages, v_pages, k_scale, v_scale)
    num_kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
    # On a CPU with big heads, one sequence at a time: its gathered block stays in cache (a
    # block of every sequence at once does not), and each sequence visits only its own
    # blocks. Measured at batch 16, context 2048, Llama-3-8B heads: 0.94x dense, against
    # 1.2x for the batched loop. With small heads the batched block fits in cache anyway
    # and a loop per sequence is only overhead (1.5x slower on the embedded model); a GPU
    # wants the whole batch in flight. Both keep the batched loop.
    if (jax.default_backend() != "cpu"
            or num_kv_heads * head_dim * 4 < SEQUENCE_MIN_KEY_BYTES):
        return _paged_attend(q, pools, block_tables, lengths - 1, lengths, layer,
                             pages_per_block, **options)
    pages_per_block = pages_per_block or max(
        1, SEQUENCE_BLOCK_BYTES // (num_kv_heads * head_dim * 4) // page_size)

    def one_sequence(args):
        q_row, table_row, length = args
        return _paged_attend(q_row[None], pools, table_row[None], length[None] - 1,
                             length[None], layer, pages_per_block, **options)[0]

    return lax.map(one_sequence, (q, block_tables, lengths))


@functools.partial(jax.jit, static_argnames=OPTIONS + ("pages_per_block",))
def paged_prefill(q, k_pages, v_pages, block_tables, lengths, q_seq, q_pos, *, layer=None,
                  k_scale=None, v_scale=None, sm_scale=None, soft_cap=None,
                  sliding_window=None, pages_per_block=None):
    """Ragged prefill: each query token attends causally to its sequence's pages.

    q: ``[T, Hq, D]``; q_seq, q_pos: ``int32[T]`` (table row and absolute position of each
    token); lengths: ``int32[B]``, context lengths with this step's K/V already written;
    pages and scales as in ``paged_decode``. Each step gathers one block of pages per
    token, so memory is O(T * block), not O(T * context). Returns ``[T, Hq, D]`` in q's
    dtype.
    """
    return _paged_attend(q, (k_pages, v_pages, k_scale, v_scale),
                         jnp.take(block_tables, q_seq, axis=0), q_pos,
                         jnp.take(lengths, q_seq), layer, pages_per_block, sm_scale=sm_scale,
                         soft_cap=soft_cap, sliding_window=sliding_window)


def _paged_attend(q, pools, rows, q_pos, kv_len, layer, pages_per_block, **options):
    """Queries ``[N, Hq, D]`` over the pages of their own table rows ``int32[N, W]``;
    pools: (k_pages, v_pages, k_scale, v_scale), the scales None for float pages."""
    k_pages, v_pages, k_scale, v_scale = pools
    num_kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
    width = rows.shape[1]
    pages_per_block = min(width, pages_per_block or default_pages_per_block(
        page_size, q.shape[0], num_kv_heads, head_dim))
    num_blocks = -(-width // pages_per_block)
    if width % pages_per_block:
        # Pad with the null page so every block is whole; those keys are masked.
        rows = jnp.pad(rows, ((0, 0), (0, num_blocks * pages_per_block - width)))

    def load_block(i):
        pages = lax.dynamic_slice_in_dim(rows, i * pages_per_block, pages_per_block, axis=1)
        index = _page_index(pages, k_pages, layer)
        key_pos = i * pages_per_block * page_size + jnp.arange(pages_per_block * page_size)
        return _load_kv(k_pages, k_scale, index), _load_kv(v_pages, v_scale, index), key_pos

    return _attend_blocks(q, load_block, num_kv_heads, num_blocks, pages_per_block * page_size,
                          q_pos, kv_len, **options)


@functools.partial(jax.jit, static_argnames=OPTIONS + ("block_tokens",))
def dense_decode(q, k, v, lengths, *, sm_scale=None, soft_cap=None, sliding_window=None,
                 block_tokens=None):
    """Decode attention over contiguous K/V, the baseline paged decode is measured against.

    q: ``[B, Hq, D]``; k, v: ``[B, Hkv, L, D]``; lengths: ``int32[B]``. Returns
    ``[B, Hq, D]`` in q's dtype.
    """
    seq_len = k.shape[2]
    block = min(seq_len, block_tokens or DENSE_BLOCK_TOKENS)

    def load_block(i):
        # The last block is shifted back to stay in bounds (no padded copy of K/V); keys
        # it shares with the previous block are masked by their position.
        start = jnp.minimum(i * block, seq_len - block)
        return (lax.dynamic_slice_in_dim(k, start, block, axis=2),
                lax.dynamic_slice_in_dim(v, start, block, axis=2),
                start + jnp.arange(block))

    return _attend_blocks(q, load_block, k.shape[1], -(-seq_len // block), block, lengths - 1,
                          lengths, sm_scale=sm_scale, soft_cap=soft_cap,
                          sliding_window=sliding_window)


def _page_index(pages, pool, layer):
    """Pool coordinates of pages ``int32[N, n]`` for each kv head: ``int32[N, Hkv, n, 2]``
    (head, page) in one layer's pages, ``[N, Hkv, n, 3]`` (layer, head, page) in a stack."""
    shape = (pages.shape[0], pool.shape[-4], pages.shape[1])
    coords = [lax.broadcasted_iota(jnp.int32, shape, 1), jnp.broadcast_to(pages[:, None], shape)]
    if pool.ndim == 5:
        coords.insert(0, jnp.full(shape, 0 if layer is None else layer, jnp.int32))
    return jnp.stack(coords, axis=-1)


def _load_kv(pool, scale, index):
    """One block of K or V ``[N, H, n * S, D]``: as stored, or dequantized to float32."""
    pages = _gather_pages(pool, index)
    return pages if scale is None else dequantize(pages, _gather_pages(scale, index))


def _gather_pages(pool, index):
    """pool ``[(L,) Hkv, P, S, D]``, index ``int32[N, H, n, pool.ndim - 2]`` (see
    ``_page_index``) -> ``[N, H, n * S, D]``; a scale pool ``[(L,) Hkv, P, S]`` with the
    same index -> ``[N, H, n * S]``.

    Gathered from the pool as it is, not from a reshape: at one token per step the write
    into the pool (the scan carry) is a dynamic-update-slice, which XLA then also fuses
    into the reshape, and two in-place updates of one buffer cost copies of the whole
    pool. The index is in bounds by construction (validated page ids).
    """
    lead = tuple(range(index.shape[-1]))
    tail = pool.shape[len(lead):]  # (S, D) for pages, (S,) for scales
    dims = lax.GatherDimensionNumbers(offset_dims=tuple(range(3, 3 + len(tail))),
                                      collapsed_slice_dims=lead, start_index_map=lead)
    pages = lax.gather(pool, index, dims, (1,) * len(lead) + tail,
                       mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    n, h, count, _ = index.shape
    return pages.reshape((n, h, count * tail[0]) + tail[1:])


def _attend_blocks(q, load_block, num_kv_heads, num_blocks, block, q_pos, kv_len, *,
                   sm_scale, soft_cap, sliding_window):
    """Online-softmax attention over key blocks.

    load_block(i) -> (k, v ``[N, Hkv, block, D]``, key_pos ``int32[block]``): the keys of
    block i for every query. Query n sees keys at positions in
    ``[max(q_pos - window + 1, 0), min(q_pos + 1, kv_len))`` at or after ``i * block``
    (a shifted last block repeats keys of the one before).
    """
    n, num_q_heads, head_dim = q.shape
    if n == 0:
        return jnp.zeros(q.shape, q.dtype)
    compute = jnp.promote_types(q.dtype, jnp.float32)
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    end = jnp.minimum(q_pos + 1, kv_len)
    start = jnp.zeros_like(end) if sliding_window is None else q_pos - sliding_window + 1
    start = jnp.maximum(start, 0)
    # Only blocks some query can see are visited (bucketed tables are often wider).
    first = jnp.min(jnp.where(end > start, start, end.max())) // block
    last = jnp.minimum((end.max() + block - 1) // block, num_blocks)

    def step(i, carry):
        row_max, denom, acc = carry
        k, v, key_pos = load_block(i)
        lo = jnp.maximum(start, i * block)
        visible = ((key_pos[None, :] >= lo[:, None])
                   & (key_pos[None, :] < end[:, None]))[:, None, :, None]  # [N, 1, block, 1]
        logits = jnp.einsum("nhtd,nhgd->nhtg", k.astype(compute), qg)
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        new_max = jnp.maximum(row_max, jnp.where(visible, logits, -jnp.inf).max(axis=2))
        # A row that has seen nothing yet keeps max -inf; shift by 0 so exp gives 0, not NaN.
        shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        # Masked for the max and again after exp: two selects that fuse into their
        # consumers, instead of one masked copy of the logits.
        probs = jnp.where(visible, jnp.exp(logits - shift[:, :, None]), 0.0)
        correction = jnp.exp(row_max - shift)
        values = jnp.where(visible, v.astype(compute), 0.0)  # 0 * NaN would still be NaN
        acc = acc * correction[..., None] + jnp.einsum("nhtg,nhtd->nhgd", probs, values)
        return new_max, denom * correction + probs.sum(axis=2), acc

    group = num_q_heads // num_kv_heads
    qg = (q.astype(compute) * scale).reshape(n, num_kv_heads, group, head_dim)
    init = (jnp.full((n, num_kv_heads, group), -jnp.inf, compute),
            jnp.zeros((n, num_kv_heads, group), compute),
            jnp.zeros((n, num_kv_heads, group, head_dim), compute))
    if num_blocks == 1:
        # No loop: XLA would hoist the loop-invariant gather out of it, with an extra copy.
        _, denom, acc = step(0, init)
    else:
        _, denom, acc = lax.fori_loop(first, last, step, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(n, num_q_heads, head_dim).astype(q.dtype)
