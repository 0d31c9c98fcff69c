"""Pallas GPU (Triton) paged decode attention: one query token per sequence.

One program per (sequence, kv head, KV split). It loads the query heads that share the
kv head together, walks the split's pages ``pages_per_block`` at a time (page ids read
from the block table inside the kernel, K/V rows gathered by slot straight from the pool
in global memory) with an online softmax in float32. With several splits it writes a
float32 partial output plus its log-sum-exp, merged afterwards in plain jnp; with one
split it writes the final output. Splitting the sequence lets a small batch with long
contexts still occupy every SM.

The pool may be one layer ``[Hkv, P, S, D]`` or the whole stack ``[L, Hkv, P, S, D]``
with ``layer=`` (int or traced scalar): the layer is a kernel input used in the ref
index, so no layer slice is copied.

8-bit pages (``int8`` or ``float8_e4m3fn`` codes, see ``quantization``) come with their
scales ``[(L,) Hkv, P, S]``: the kernel loads each tile's ``[T]`` scale vector beside its
``[T, D]`` codes, dequantizes them in float32 with ``quantization.dequantize`` and feeds
the dots in the query's dtype (16-bit queries: the matrix unit's native input, as vLLM
and FlashInfer do; float32 queries: the float32 dots below). Only codes and scales cross
the memory bus: ``D + 2`` bytes per token and kv head for K or V, against ``2 D`` for a
bfloat16 pool.

Matches ``jpaged.pallas_kernels.reference.paged_decode_reference``; on CPU run with
``interpret=True``.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jpaged.pallas_kernels import lowering
from jpaged.pallas_kernels.quantization import dequantize, is_quantized
from jpaged.pallas_kernels.splits import merge_splits

try:  # The Triton lowering is optional: jpaged must still import on a jax without it.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
    pltriton = None
# 64-bit offsets for pools of more than 2**31 elements (jax's own rule wraps 8-bit pools of
# 2-4 GiB into negative addresses; see lowering.install_wide_offsets).
WIDE_OFFSETS = pltriton is not None and lowering.install_wide_offsets()

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Queries over 8-bit pages meet the dequantized K/V in their own dtype, one of these.
QUERY_DTYPES = DTYPES
# tl.dot needs at least 16 rows and a contraction of at least 16; a GQA group is padded to
# 16 query rows (groups of 1-2 included: the resource check shows the elementwise
# alternative spilling at 191-255 registers, the padded dot not).
MIN_DOT_SIZE = 16
# Default tokens per loop iteration. K and V tiles sit in shared memory (~227 KiB per SM):
# up to PIPELINED_TILE_BYTES each they are double-buffered, up to MAX_TILE_BYTES (a whole
# float32 page of 128 x 128) they are loaded without pipelining.
TARGET_BLOCK_TOKENS = 64
MAX_BLOCK_TOKENS = 256
PIPELINED_TILE_BYTES = 32 * 1024
MAX_TILE_BYTES = 64 * 1024
MAX_HEAD_DIM = 256
# Split counts aim at every resident program slot of an H100/H200: 132 SMs, and
# PROGRAMS_PER_SM programs of the default bf16/f16 configuration fit one SM by its compiled
# registers and shared memory (benchmarks/results/kernel_resources.md; a CI test keeps
# this number honest against that compile).
NUM_SMS = 132
PROGRAMS_PER_SM = 4
TARGET_PROGRAMS = PROGRAMS_PER_SM * NUM_SMS
DEFAULT_NUM_WARPS = 4
# Finite, so a fully masked block gives exp(0) corrections instead of inf - inf = NaN.
MASK_VALUE = -1e30


def _is_power_of_two(n) -> bool:
    return isinstance(n, numbers.Integral) and n > 0 and n & (n - 1) == 0


def _tile_bytes(tokens, head_dim, dtype) -> int:
    return tokens * head_dim * jnp.dtype(dtype).itemsize


def default_pages_per_block(page_size: int, head_dim: int, dtype) -> int:
    """Pages per loop iteration: about TARGET_BLOCK_TOKENS tokens, at least MIN_DOT_SIZE,
    small enough to pipeline where a page allows."""
    tokens = min(TARGET_BLOCK_TOKENS, PIPELINED_TILE_BYTES // _tile_bytes(1, head_dim, dtype))
    if jnp.dtype(dtype) == jnp.float32 and head_dim > 128:
        tokens = MIN_DOT_SIZE  # larger float32 tiles of these heads spill (check_config)
    return max(1, max(tokens, MIN_DOT_SIZE) // page_size)


def default_num_stages(tokens: int, head_dim: int, dtype) -> int:
    """Double-buffer the K/V loads when two stages of both tiles fit shared memory; not for
    float32, whose TF32x3 dots need the registers (one stage halves its shared memory and
    doubles the programs per SM, see the resource table)."""
    if jnp.dtype(dtype) == jnp.float32:
        return 1
    return 2 if _tile_bytes(tokens, head_dim, dtype) <= PIPELINED_TILE_BYTES else 1


def operand_dtype(cache_dtype, q_dtype=None):
    """The dtype K/V tiles and the query meet in the dots: the cache dtype for float
    pages; for 8-bit pages the query's dtype (bfloat16 when it is not known), the codes
    dequantized to it."""
    if not is_quantized(cache_dtype):
        return jnp.dtype(cache_dtype)
    return jnp.dtype(jnp.bfloat16 if q_dtype is None else q_dtype)


def check_config(num_q_heads, num_kv_heads, head_dim, page_size, dtype,
                 pages_per_block=None, q_dtype=None) -> None:
    """Raise ValueError naming the value if the Triton kernel cannot take this config.

    Triton tensors must have power-of-two sizes and tl.dot needs 16+ along each side, so
    head_dim and page_size must be powers of two and a block of pages must hold 16 to
    MAX_BLOCK_TOKENS tokens; one K tile must also fit the shared-memory budget. ``dtype``
    is the pages' dtype (float, or 8-bit with scales); the tile limits apply to the dots'
    operand dtype (``operand_dtype(dtype, q_dtype)``).
    """
    if not (isinstance(num_kv_heads, numbers.Integral) and num_kv_heads > 0
            and isinstance(num_q_heads, numbers.Integral) and num_q_heads > 0
            and num_q_heads % num_kv_heads == 0):
        raise ValueError(f"num_q_heads={num_q_heads} must be a positive multiple of "
                         f"num_kv_heads={num_kv_heads}")
    if not _is_power_of_two(head_dim) or not MIN_DOT_SIZE <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} must be a power of two in "
                         f"[{MIN_DOT_SIZE}, {MAX_HEAD_DIM}] for the Triton kernel")
    if not _is_power_of_two(page_size) or page_size > MAX_BLOCK_TOKENS:
        raise ValueError(f"page_size={page_size} must be a power of two <= {MAX_BLOCK_TOKENS} "
                         f"for the Triton kernel")
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES] and not is_quantized(dtype):
        raise ValueError(f"dtype={jnp.dtype(dtype)} must be float32, bfloat16, float16, "
                         f"int8 or float8_e4m3fn")
    if is_quantized(dtype) and q_dtype is not None and jnp.dtype(q_dtype) not in [
            jnp.dtype(d) for d in QUERY_DTYPES]:
        raise ValueError(f"q dtype {jnp.dtype(q_dtype)} over {jnp.dtype(dtype)} pages must be "
                         f"float32, bfloat16 or float16")
    dtype = operand_dtype(dtype, q_dtype)
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size, head_dim, dtype)
    if not _is_power_of_two(pages_per_block):
        raise ValueError(f"pages_per_block={pages_per_block} must be a power of two")
    tokens = pages_per_block * page_size
    if not MIN_DOT_SIZE <= tokens <= MAX_BLOCK_TOKENS:
        raise ValueError(f"pages_per_block={pages_per_block} * page_size={page_size} = {tokens} "
                         f"tokens per block must be in [{MIN_DOT_SIZE}, {MAX_BLOCK_TOKENS}]")
    if jnp.dtype(dtype) == jnp.float32 and head_dim > 128 and tokens > MIN_DOT_SIZE:
        raise ValueError(f"pages_per_block={pages_per_block} * page_size={page_size} = "
                         f"{tokens} tokens of float32 head_dim={head_dim}: over "
                         f"{MIN_DOT_SIZE} tokens this "
                         f"tile spills registers on sm_90 (benchmarks/results/"
                         f"kernel_resources.md); use a 16-bit cache or the XLA path")
    tile_bytes = _tile_bytes(tokens, head_dim, dtype)
    if tile_bytes > MAX_TILE_BYTES:
        raise ValueError(f"pages_per_block={pages_per_block} gives a {tokens} x {head_dim} "
                         f"{jnp.dtype(dtype)} K tile of {tile_bytes} bytes, over the "
                         f"{MAX_TILE_BYTES}-byte shared-memory budget")


def choose_num_splits(batch: int, num_kv_heads: int, num_blocks: int) -> int:
    """Split each sequence so batch * kv heads * splits reaches TARGET_PROGRAMS, without
    giving a split less than one block; ``num_blocks`` covers the longest sequence."""
    wanted = -(-TARGET_PROGRAMS // (batch * num_kv_heads))
    return max(1, min(wanted, num_blocks))


def blocks_to_cover(lengths, width: int, pages_per_block: int, page_size: int) -> int:
    """Blocks the splits must cover: the table's width, or, when the lengths are concrete
    (known on the host), the longest length rounded up to a power of two of blocks, so
    short sequences in a wide table are not split into empty work and the count of
    compiled variants stays small."""
    table_blocks = -(-width // pages_per_block)
    if isinstance(lengths, jax.core.Tracer):
        return table_blocks
    longest = int(np.max(np.asarray(lengths), initial=0))
    needed = -(-longest // (pages_per_block * page_size))
    return min(table_blocks, pl.next_power_of_2(max(needed, 1)))


def split_plan(num_blocks: int, num_splits: int) -> tuple[int, int]:
    """(blocks per split, splits that hold any block) for ``num_splits`` requested."""
    per_split = -(-num_blocks // num_splits)
    return per_split, -(-num_blocks // per_split)


def _visible_range(split, length, *, split_tokens, sliding_window):
    """Positions ``[lo, hi)`` that program ``split`` attends to (int32 scalars)."""
    lo = split * split_tokens
    hi = jnp.minimum(length, lo + split_tokens)
    if sliding_window is not None:
        lo = jnp.maximum(lo, length - sliding_window)
    return lo, hi


def _load_kv(k_ref, v_ref, scale_refs, layer, head, slots, dtype):
    """K and V rows ``[T, D]`` of the given slots in the dots' dtype: the one place the
    kernel reads the pool. 8-bit codes come with ``scale_refs`` (K's and V's): the ``[T]``
    scales of the same slots are loaded beside them and the pair dequantized in float32."""
    k, v = k_ref[layer, head, slots], v_ref[layer, head, slots]
    if scale_refs:
        k_scale_ref, v_scale_ref = scale_refs
        k = dequantize(k, k_scale_ref[layer, head, slots])
        v = dequantize(v, v_scale_ref[layer, head, slots])
    return k.astype(dtype), v.astype(dtype)


def _mask_values(v, visible):
    """V ``[T, D]`` with invisible rows zeroed. Select, not multiply: 0 * NaN from a
    recycled page would still be NaN."""
    return jnp.where(visible[:, None], v, jnp.zeros_like(v))


def _decode_kernel(layer_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, *refs,
                   quantized, sm_scale, soft_cap, sliding_window, page_size, pages_per_block,
                   split_tokens, precision):
    """One (sequence, kv head, split) program.

    layer_ref ``int32[1]``; lengths_ref ``int32[B]``; tables_ref ``int32[B, W]``; q_ref
    ``[G', D]`` (the dots' dtype); k_ref, v_ref ``[L, Hkv, P * S, D]`` (whole pool, global
    memory); with ``quantized``, k_scale_ref, v_scale_ref ``[L, Hkv, P * S]`` next. Then
    the outputs: with several splits o_ref float32 ``[G', D]`` and lse_ref float32
    ``[G']``, merged later; with one split, o_ref is the final output ``[G', D]`` in the
    output dtype.
    """
    scale_refs, (o_ref, *lse_ref) = (refs[:2], refs[2:]) if quantized else ((), refs)
    seq, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    length = lengths_ref[seq]
    last_page = tables_ref.shape[1] - 1
    block_tokens = pages_per_block * page_size
    lo, hi = _visible_range(split, length, split_tokens=split_tokens,
                            sliding_window=sliding_window)
    first_block = lax.div(lo, block_tokens)
    last_block = jnp.where(hi > lo, lax.div(hi + block_tokens - 1, block_tokens), first_block)

    q = q_ref[...]
    offsets = jnp.arange(block_tokens, dtype=jnp.int32)

    def body(block, carry):
        acc, m, l = carry
        positions = block * block_tokens + offsets
        # A block may run past the table's last page only beyond the length: those slots
        # are masked, so any in-range page id will do.
        pages = tables_ref[seq, jnp.minimum(lax.div(positions, page_size), last_page)]
        slots = pages * page_size + lax.rem(positions, page_size)
        k, v = _load_kv(k_ref, v_ref, scale_refs, layer, head, slots, q.dtype)  # [T, D]
        visible = (positions >= lo) & (positions < hi)
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * sm_scale  # [G', T]
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        logits = jnp.where(visible[None, :], logits, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.where(visible[None, :], jnp.exp(logits - m_new[:, None]), 0.0)
        # Probabilities go to the matrix unit in the dots' dtype, as in flash attention.
        values = lax.dot_general(p.astype(v.dtype), _mask_values(v, visible),
                                 (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)  # [G', D]
        acc = acc * correction[:, None] + values
        return acc, m_new, l * correction + jnp.sum(p, axis=1)

    rows, head_dim = q.shape
    carry = (jnp.zeros((rows, head_dim), jnp.float32),
             jnp.full((rows,), MASK_VALUE, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(first_block, last_block, body, carry)
    seen = l > 0
    out = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)
    if lse_ref:
        lse_ref[0][...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def default_num_warps(tokens: int, head_dim: int, dtype) -> int:
    """Warps per program: 4, or 8 where the resource table shows 4 spilling: tiles too
    big to double-buffer, and float32 heads over 128 (TF32x3 dots hold more registers)."""
    if (_tile_bytes(tokens, head_dim, dtype) > PIPELINED_TILE_BYTES
            or (jnp.dtype(dtype) == jnp.float32 and head_dim > 128)):
        return 2 * DEFAULT_NUM_WARPS
    return DEFAULT_NUM_WARPS


def dot_precision(dtype, interpret: bool):
    """The dots' precision for a cache dtype. 16-bit caches: the matrix unit's native
    input. float32 caches: never plain TF32 (Triton's float32 default, about 1e-3 relative
    error): on the GPU three TF32 passes (TF32x3, float32-level error, bounded at 1e-5 by
    the GPU suite) since IEEE float32 dots run on FMA units and spill at 64+ token tiles
    (benchmarks/results/kernel_resources.md); in interpret mode plain IEEE float32, as the
    CPU has no TF32."""
    if jnp.dtype(dtype) != jnp.float32:
        return None
    return lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _check_scales(k_pages, k_scale, v_scale) -> None:
    """8-bit pages need both scales, the pages' shape minus head_dim; float pages none."""
    if not is_quantized(k_pages.dtype):
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale / v_scale given for {k_pages.dtype} pages; scales go "
                             f"with 8-bit (int8, float8_e4m3fn) pages only")
        return
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None or tuple(scale.shape) != tuple(k_pages.shape[:-1]):
            raise ValueError(f"{k_pages.dtype} pages need {name} of shape "
                             f"{tuple(k_pages.shape[:-1])}, got "
                             f"{None if scale is None else tuple(scale.shape)}")
        if not jnp.issubdtype(scale.dtype, jnp.floating) or scale.dtype.itemsize < 2:
            raise ValueError(f"{name} must be a 16- or 32-bit float array, got {scale.dtype}")


def paged_decode(q, k_pages, v_pages, block_tables, lengths, *, layer=None, k_scale=None,
                 v_scale=None, sm_scale=None, soft_cap=None, sliding_window=None,
                 pages_per_block=None, num_splits=None, interpret=False, num_warps=None,
                 num_stages=None):
    """Paged decode attention with the Pallas Triton kernel.

    q: ``[B, Hq, D]``; k_pages, v_pages: ``[Hkv, P, S, D]``, or ``[L, Hkv, P, S, D]`` with
    ``layer`` (int or traced int32 scalar); 8-bit pages (int8, float8_e4m3fn) with
    k_scale, v_scale: the pages' shape minus D; block_tables: ``int32[B, W]``; lengths:
    ``int32[B]``. Returns ``[B, Hq, D]`` in q's dtype (q meets K in ``operand_dtype``: the
    cache dtype, or q's own over 8-bit pages).
    ``num_splits`` (default ``choose_num_splits`` over the blocks the lengths need when
    they are concrete, else over the table width), ``pages_per_block``, ``num_warps`` and
    ``num_stages`` are tuning knobs; ``interpret=True`` runs the kernel on CPU.
    Validation happens here, on the host; every array op is inside one jitted call, so
    even an eager call never copies the pool.
    """
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must match, got {k_pages.shape} {k_pages.dtype} "
                         f"and {v_pages.shape} {v_pages.dtype}")
    if k_pages.ndim == 4:
        if layer is not None:
            raise ValueError(f"layer={layer!r} needs the stacked pool [L, Hkv, P, S, D], got "
                             f"pages of shape {k_pages.shape}")
        layer = 0
    elif k_pages.ndim == 5:
        if layer is None:
            raise ValueError(f"stacked pages of shape {k_pages.shape} need layer=")
        if isinstance(layer, numbers.Integral) and not 0 <= layer < k_pages.shape[0]:
            raise ValueError(f"layer={layer} is outside [0, {k_pages.shape[0]})")
    else:
        raise ValueError(f"pages must be [Hkv, P, S, D] or [L, Hkv, P, S, D], got shape "
                         f"{k_pages.shape}")
    num_kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
    if q.ndim != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [B, Hq, D={head_dim}], got shape {q.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables must be [B={q.shape[0]}, W], got shape "
                         f"{block_tables.shape}")
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"lengths must be [B={q.shape[0]}], got shape {lengths.shape}")
    _check_scales(k_pages, k_scale, v_scale)
    check_config(q.shape[1], num_kv_heads, head_dim, page_size, k_pages.dtype,
                 pages_per_block, q_dtype=q.dtype)
    tile_dtype = operand_dtype(k_pages.dtype, q.dtype)
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size, head_dim, tile_dtype)
    if num_splits is not None and not (isinstance(num_splits, numbers.Integral)
                                       and num_splits > 0):
        raise ValueError(f"num_splits={num_splits!r} must be a positive integer")
    if sliding_window is not None and not (isinstance(sliding_window, numbers.Integral)
                                           and sliding_window > 0):
        raise ValueError(f"sliding_window={sliding_window!r} must be a positive integer")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap={soft_cap!r} must be positive")
    if pltriton is None and not interpret:
        raise ValueError("this jax has no Pallas Triton lowering; use interpret=True or the "
                         "XLA path")
    if not (WIDE_OFFSETS or interpret) and lowering.needs_wide_offsets(k_pages.shape,
                                                                       k_pages.dtype):
        raise ValueError(f"{k_pages.dtype} pages of shape {k_pages.shape} hold more than "
                         f"2**31 elements in at most 4 GiB, which this jax's Triton lowering "
                         f"addresses with wrapping 32-bit offsets; use the XLA path")
    width = block_tables.shape[1]
    num_blocks = blocks_to_cover(lengths, width, pages_per_block, page_size)
    if num_splits is None:
        blocks_per_split, num_splits = split_plan(
            num_blocks, choose_num_splits(q.shape[0], num_kv_heads, num_blocks))
    else:  # honoured as asked, even where some splits see nothing
        blocks_per_split = -(-num_blocks // num_splits)
    tokens = pages_per_block * page_size
    with lowering.triton_deprecation_silenced():
        return _paged_decode(
            q, k_pages, v_pages, block_tables, lengths, layer, k_scale, v_scale,
            sm_scale=head_dim ** -0.5 if sm_scale is None else float(sm_scale),
            soft_cap=None if soft_cap is None else float(soft_cap),
            sliding_window=None if sliding_window is None else int(sliding_window),
            pages_per_block=pages_per_block, num_splits=int(num_splits),
            split_tokens=blocks_per_split * tokens, interpret=interpret,
            num_warps=(default_num_warps(tokens, head_dim, tile_dtype)
                       if num_warps is None else num_warps),
            num_stages=(default_num_stages(tokens, head_dim, tile_dtype)
                        if num_stages is None else num_stages))


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "pages_per_block", "num_splits", "split_tokens",
    "interpret", "num_warps", "num_stages"))
def _paged_decode(q, k_pages, v_pages, block_tables, lengths, layer, k_scale, v_scale, *,
                  sm_scale, soft_cap, sliding_window, pages_per_block, num_splits,
                  split_tokens, interpret, num_warps, num_stages):
    """Arguments as ``paged_decode``, already checked; layer a scalar (0 for 4-D pages);
    scales None for float pages; split ``s`` covers positions
    ``[s * split_tokens, (s + 1) * split_tokens)``."""
    batch, num_q_heads, head_dim = q.shape
    quantized = k_scale is not None
    if k_pages.ndim == 4:
        k_pages, v_pages = k_pages[None], v_pages[None]
        k_scale, v_scale = (None, None) if not quantized else (k_scale[None], v_scale[None])
    num_layers, num_kv_heads, num_pages, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    rows = max(MIN_DOT_SIZE, pl.next_power_of_2(group))
    out_dtype = q.dtype
    # tl.dot takes one element type: the cache dtype keeps float K/V loads at their size;
    # 8-bit codes are dequantized in the kernel to q's dtype.
    dot_dtype = operand_dtype(k_pages.dtype, q.dtype)
    q = q.astype(dot_dtype).reshape(batch, num_kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    # Merging (page, offset) into one slot axis is a free reshape; the kernel gathers slots.
    pool_shape = (num_layers, num_kv_heads, num_pages * page_size, head_dim)
    pools = [k_pages.reshape(pool_shape), v_pages.reshape(pool_shape)]
    if quantized:
        pools += [k_scale.reshape(pool_shape[:-1]), v_scale.reshape(pool_shape[:-1])]

    kernel = functools.partial(
        _decode_kernel, quantized=quantized, sm_scale=sm_scale, soft_cap=soft_cap,
        sliding_window=sliding_window, page_size=page_size, pages_per_block=pages_per_block,
        split_tokens=split_tokens, precision=dot_precision(dot_dtype, interpret))
    whole = pl.BlockSpec()  # no blocking: the kernel indexes the array in global memory
    # One split writes the final output; several write float32 partials and their LSE.
    if num_splits == 1:
        out_specs = pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))
        out_shape = jax.ShapeDtypeStruct((batch, num_kv_heads, rows, head_dim), out_dtype)
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows, head_dim),
                                 jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows), jnp.float32),
        ]
    compiler_params = (None if pltriton is None
                       else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    result = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[whole, whole, whole,
                  pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0))]
        + [whole] * len(pools),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params,
        interpret=interpret,
        name="jpaged_paged_decode",
    )(jnp.asarray(layer, jnp.int32).reshape(1), lengths.astype(jnp.int32),
      block_tables.astype(jnp.int32), q, *pools)
    if num_splits == 1:
        out = result[:, :, :group]
    else:
        o, lse = result
        out = merge_splits(o[..., :group, :], lse[..., :group]).astype(out_dtype)
    return out.reshape(batch, num_q_heads, head_dim)
