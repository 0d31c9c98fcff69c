"""8-bit KV pages: the two formats, quantize (on write) and dequantize (on read).

A quantized pool stores each K or V vector (one token of one kv head, ``head_dim``
values) as ``head_dim`` 8-bit codes and one bfloat16 scale: ``x ~= code * scale``,
symmetric, ``scale = max|x| / QMAX``. Pages ``[..., S, D]`` in ``int8`` or
``float8_e4m3fn`` sit beside scales ``[..., S]`` in bfloat16, so a kernel that loads a
``[page_size, head_dim]`` page tile loads the ``[page_size]`` scale vector of the same
page beside it and calls ``dequantize`` on the pair.

Why a scale per token and kv head: it is fixed when the token is written, so appending
to a page never rescales (and re-rounds) the tokens already in it, and one outlier token
does not coarsen its page-mates. Why bfloat16: the stored scale is the one the codes were
computed with, so its rounding costs no accuracy; it keeps float32's range; and it is half
of float32's overhead, which matters at head_dim 64. Bytes per token per kv head, K or V:
``head_dim + 2`` (66 at head_dim 64, 130 at 128) against ``2 * head_dim`` for bfloat16,
so a pool holds 1.94x (64) or 1.97x (128) the tokens of a bfloat16 pool of the same
bytes; float32 scales would give 1.88x and 1.94x.

Nothing here saturates to inf: codes are clipped to ``[-QMAX, QMAX]`` before the cast
(float8_e4m3fn has no inf, and a value past 448 would become NaN).
"""

from __future__ import annotations

import jax.numpy as jnp

SCALE_DTYPE = jnp.dtype(jnp.bfloat16)
# The 8-bit page formats by the name users pass (``kv_cache_dtype``).
FORMATS = {"int8": jnp.dtype(jnp.int8)}
if hasattr(jnp, "float8_e4m3fn"):
    FORMATS["fp8"] = jnp.dtype(jnp.float8_e4m3fn)


def is_quantized(dtype) -> bool:
    """Whether pages of ``dtype`` hold 8-bit codes that need scales."""
    return jnp.dtype(dtype) in FORMATS.values()


def qmax(dtype) -> float:
    """The largest code: 127 for int8 (symmetric: -128 is never written), 448 for e4m3fn."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return float(jnp.iinfo(dtype).max)
    return float(jnp.finfo(dtype).max)


def quantize(x, dtype):
    """x ``[..., D]`` (any float) -> (codes ``[..., D]`` of ``dtype``, scales
    ``bfloat16[...]``), one scale per vector over its last axis. An all-zero vector gets
    scale 0 and codes 0."""
    limit = qmax(dtype)
    x = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(x), axis=-1) / limit).astype(SCALE_DTYPE)
    # Divide by the rounded (stored) scale so code * scale reproduces x; rounding the
    # scale down can push a code just past the limit, hence the clip.
    stored = scale.astype(jnp.float32)
    codes = jnp.clip(x / jnp.where(stored > 0, stored, 1.0)[..., None], -limit, limit)
    if jnp.issubdtype(jnp.dtype(dtype), jnp.integer):
        codes = jnp.round(codes)
    return codes.astype(dtype), scale


def dequantize(codes, scales, dtype=jnp.float32):
    """codes ``[..., S, D]`` (8-bit) and scales ``[..., S]`` -> ``[..., S, D]`` of ``dtype``
    (float32 for the statistics; float64 in a float64 reference)."""
    return codes.astype(dtype) * scales.astype(dtype)[..., None]
