"""Split-K (flash-decoding) merge, shared by the Triton decode and Mosaic ragged kernels.

A kernel that cuts one query's keys into ``splits`` runs writes, per run, a float32
output normalized over that run's keys and the run's log-sum-exp (``-inf`` where the run
saw no key); ``merge_splits`` weights each run by ``exp(lse - max lse)``.
"""

from __future__ import annotations

import jax.numpy as jnp


def merge_splits(o, lse):
    """Combine split partials: o float32 ``[..., splits, G, D]``, lse ``[..., splits, G]``
    -> float32 ``[..., G, D]``; rows no split saw become 0."""
    top = jnp.max(lse, axis=-2, keepdims=True)
    weights = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weights, axis=-2)
    merged = jnp.sum(weights[..., None] * o, axis=-3)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]
