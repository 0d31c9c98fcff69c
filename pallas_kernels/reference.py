"""Readable pure-jnp references every attention implementation is tested against.

They favour clarity over speed: pages are gathered into contiguous K/V first and the
softmax is computed in float32 (or float64 inputs stay float64). Masked positions are
excluded from both the logits and the values, so NaN in unused slots cannot leak.
8-bit pages (with ``k_scale`` / ``v_scale``, see ``quantization``) are dequantized after
the gather, in the compute dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from jpaged.pallas_kernels.quantization import dequantize


def causal_mask(q_pos, key_pos, sliding_window=None):
    """Which keys each query sees: key positions ``int32[..., L]`` against query positions
    ``int32[..., N]`` -> bool ``[..., N, L]``: ``key <= query`` and, with a window w,
    ``key > query - w``. The one causal / sliding-window rule every reference uses."""
    q_pos, key_pos = q_pos[..., :, None], key_pos[..., None, :]
    visible = key_pos <= q_pos
    if sliding_window is not None:
        visible &= key_pos > q_pos - sliding_window
    return visible


def attend(q, k, v, q_pos, kv_len, *, sm_scale=None, soft_cap=None, sliding_window=None):
    """Masked attention of queries at absolute positions over contiguous keys.

    q: ``[N, Hq, D]``; k, v: ``[N, Hkv, L, D]`` (key j sits at position j); q_pos, kv_len:
    ``int32[N]``. Query n sees keys j with ``j < kv_len[n]``, ``j <= q_pos[n]`` and, with a
    window w, ``j > q_pos[n] - w``. Returns ``[N, Hq, D]`` in q's dtype; zeros where no key
    is visible.
    """
    n, num_q_heads, head_dim = q.shape
    num_kv_heads, seq_len = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    compute = jnp.promote_types(q.dtype, jnp.float32)
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(n, num_kv_heads, group, head_dim).astype(compute)
    logits = jnp.einsum("nhgd,nhld->nhgl", qg, k.astype(compute)) * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    key_pos = jnp.arange(seq_len)
    visible = (key_pos[None, :] < kv_len[:, None]) & causal_mask(q_pos, key_pos,
                                                                  sliding_window)
    visible = visible[:, None, None, :]
    logits = jnp.where(visible, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.where(visible, jnp.exp(logits - jnp.where(visible, row_max, 0.0)), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    values = jnp.where(visible[:, :, 0, :, None], v.astype(compute), 0.0)
    out = jnp.einsum("nhgl,nhld->nhgd", probs, values) / jnp.maximum(denom, 1e-30)
    return out.reshape(n, num_q_heads, head_dim).astype(q.dtype)


def gather_pages(pages, block_tables):
    """Contiguous K or V of each sequence: pages ``[Hkv, P, S, D]``, block_tables ``[B, W]``
    -> ``[B, Hkv, W * S, D]``; scales ``[Hkv, P, S]`` -> ``[B, Hkv, W * S]`` likewise."""
    num_kv_heads, _, page_size = pages.shape[:3]
    batch, width = block_tables.shape
    gathered = pages[:, block_tables]  # [Hkv, B, W, S(, D)]
    return gathered.reshape((num_kv_heads, batch, width * page_size)
                            + pages.shape[3:]).swapaxes(0, 1)


def gather_kv(q, pages, scale, block_tables):
    """``gather_pages``, then dequantized in q's compute dtype when ``scale`` is given."""
    gathered = gather_pages(pages, block_tables)
    if scale is None:
        return gathered
    return dequantize(gathered, gather_pages(scale, block_tables),
                      jnp.promote_types(q.dtype, jnp.float32))


def dense_decode_reference(q, k, v, lengths, **options):
    """One query token per sequence over contiguous K/V.

    q: ``[B, Hq, D]``; k, v: ``[B, Hkv, L, D]``; lengths: ``int32[B]``. The query sits at
    position ``lengths - 1``. Returns ``[B, Hq, D]``.
    """
    return attend(q, k, v, lengths - 1, lengths, **options)


def paged_decode_reference(q, k_pages, v_pages, block_tables, lengths, *, k_scale=None,
                           v_scale=None, **options):
    """Decode attention over paged K/V.

    q: ``[B, Hq, D]``; k_pages, v_pages: ``[Hkv, P, S, D]`` (8-bit with k_scale, v_scale
    ``[Hkv, P, S]``); block_tables: ``int32[B, W]``; lengths: ``int32[B]``. Returns
    ``[B, Hq, D]``.
    """
    return dense_decode_reference(q, gather_kv(q, k_pages, k_scale, block_tables),
                                  gather_kv(q, v_pages, v_scale, block_tables), lengths,
                                  **options)


def paged_prefill_reference(q, k_pages, v_pages, block_tables, lengths, q_seq, q_pos, *,
                            k_scale=None, v_scale=None, **options):
    """Many query tokens per sequence, causal over the sequence's pages.

    q: ``[T, Hq, D]``; q_seq, q_pos: ``int32[T]`` (table row and absolute position of each
    query); lengths: ``int32[B]``, context lengths with this step's K/V already written;
    pages and scales as in ``paged_decode_reference``. Returns ``[T, Hq, D]``.
    """
    k = gather_kv(q, k_pages, k_scale, block_tables)[q_seq]
    v = gather_kv(q, v_pages, v_scale, block_tables)[q_seq]
    return attend(q, k, v, q_pos, lengths[q_seq], **options)
