"""The online-softmax step the Mosaic GPU kernels share (plain jnp on register tiles).

Both kernels hold one step's logits as a 2-D float32 tile: the ragged kernel
(``ragged_attention``) as ``S [queries, keys]``, the decode tile (``mosaic_decode``) as
``S^T [keys, queries]``; ``key_axis`` says which. The running statistics are per query:
``m`` (the largest logit seen) and ``l`` (the sum of ``exp(logit - m)``), float32
``[queries]``; the accumulator keeps its queries on the same axis as the tile (``O [queries,
D]`` or ``O^T [D, queries]``). Everything here is elementwise, a reduction along one axis or
a broadcast, so it lowers in Mosaic GPU's WGMMA register layout and runs unchanged in
interpret mode.

A query that has seen no visible key keeps ``m = -inf``; ``exp`` is then taken against 0,
so its probabilities and ``alpha`` are 0, never NaN, and ``finish`` gives it output 0 and
log-sum-exp ``-inf`` (an empty split-K run, which ``splits.merge_splits`` weighs 0).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def logits(s, *, sm_scale: float, soft_cap: float | None):
    """Raw products -> logits: scaled, then soft-capped (``cap * tanh(s / cap)``)."""
    s = s * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    return s


def step(s, visible, m_i, l_i, acc, *, key_axis: int):
    """One step of keys into the running softmax.

    s: float32 logits ``[Q, K]`` (``key_axis`` 1) or ``[K, Q]`` (``key_axis`` 0);
    visible: bool, s's shape (False: masked to -inf); m_i, l_i: float32 ``[Q]``; acc:
    float32, its queries on the same axis as s's. Returns (probabilities, s's shape and
    axes, not normalized; new m; new l; acc rescaled to the new m).
    """
    query_axis = 1 - key_axis
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=key_axis))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)   # no key yet: exp(-inf - 0) = 0
    alpha = jnp.exp(m_i - m_safe)
    probs = jnp.exp(s - lax.broadcast_in_dim(m_safe, s.shape, [query_axis]))
    l_new = l_i * alpha + probs.sum(axis=key_axis)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [query_axis])
    return probs, m_new, l_new, acc


def finish(acc, m_i, l_i, *, query_axis: int):
    """(normalized output, acc's shape: 0 for a query that saw no key; log-sum-exp
    ``[Q]``: -inf there)."""
    denom = lax.broadcast_in_dim(l_i, acc.shape, [query_axis])
    out = jnp.where(denom > 0, acc / jnp.maximum(denom, 1e-30), 0.0)
    lse = jnp.where(l_i > 0, m_i + jnp.log(jnp.maximum(l_i, 1e-30)), -jnp.inf)
    return out, lse


__all__ = ["finish", "logits", "step"]
