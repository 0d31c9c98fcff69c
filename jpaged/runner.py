"""The device side of the engine: the KV pool, the jitted step, and page moves.

One step is one jitted call ``(params, cache, batch) -> (sampled ids, cache)`` with the
cache donated, so the pool is updated in place; the sampled ids (and their logprobs) are
the only values brought back to the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.attention import AttentionMetadata, check_impl
from jpaged.cache import KVCache, PageTable, copy_pages
from jpaged.sampling import SamplerOutput, SamplingTensors, sample
from jpaged.scheduler import SchedulerOutput, bucket


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,),
                   static_argnames=("num_top",))
def _step(forward, config, params, cache, token_ids, meta, logits_indices, tensors, *,
          num_top):
    """One engine step. Jitted once at module level, keyed on (forward, config) and the
    shapes, so every engine running the same model shares the compiled programs."""
    logits, cache = forward(params, config, cache, token_ids, meta, logits_indices)
    return sample(logits, tensors, num_top), cache


def _put_pages(cache: KVCache, pages, k, v) -> KVCache:
    """Write whole pages (swap-in): pages ``int32[N]``; k, v ``[L, Hkv, N, S, D]``."""
    return KVCache(k=cache.k.at[:, :, pages].set(k), v=cache.v.at[:, :, pages].set(v))


def _take_pages(cache: KVCache, pages):
    return cache.k[:, :, pages], cache.v[:, :, pages]


def _padded_pairs(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Split (src, dst) pairs into two arrays padded to a power of two with page 0 -> 0."""
    size = bucket(len(pairs), 8, 1 << 30)
    src, dst = np.zeros(size, np.int32), np.zeros(size, np.int32)
    if pairs:
        src[:len(pairs)], dst[:len(pairs)] = zip(*pairs)
    return src, dst


class HostPool:
    """Pages swapped out of the device: numpy K and V ``[L, Hkv, num_pages, S, D]``."""

    def __init__(self, cache: KVCache, num_pages: int):
        shape = cache.k.shape[:2] + (num_pages,) + cache.k.shape[3:]
        self.k = np.zeros(shape, cache.dtype)
        self.v = np.zeros(shape, cache.dtype)


class ModelRunner:
    """Owns the KV pool on the device and runs the model's step on it.

    model: an object with ``config`` (hashable: it is a static jit argument), ``params`` and
    ``forward(params, config, cache, token_ids int32[T], meta, logits_indices int32[R]) ->
    (logits float32[R, V], cache)``; see ``models.llama.forward``.
    """

    def __init__(self, model, cache: KVCache, num_host_pages: int = 0,
                 attention_impl: str = "auto"):
        check_impl(attention_impl)
        self.model = model
        self.attention_impl = attention_impl
        self.cache = cache
        self.host = HostPool(cache, num_host_pages) if num_host_pages else None
        self._copy = jax.jit(copy_pages, donate_argnums=(0,))
        self._put = jax.jit(_put_pages, donate_argnums=(0,))
        self._take = jax.jit(_take_pages)

    @property
    def num_compilations(self) -> int:
        """Distinct step programs compiled so far in this process (one per model, bucket
        shape and mode; shared by engines running the same model): compare before/after."""
        return _step._cache_size()

    def execute(self, out: SchedulerOutput, logits_indices: np.ndarray,
                tensors: SamplingTensors, num_top: int) -> SamplerOutput:
        """Move pages as planned, run the step, and bring back the sampled ids (numpy).

        logits_indices: ``int32[R]``, the flat token whose logits each sampling row uses.
        """
        self.move_pages(out)
        meta = AttentionMetadata(
            slot_mapping=out.slot_mapping, q_seq=out.q_seq, positions=out.positions,
            page_table=PageTable(out.block_tables, out.context_lens), is_decode=out.is_decode,
            attention_impl=self.attention_impl)
        result, self.cache = _step(self.model.forward, self.model.config, self.model.params,
                                   self.cache, out.token_ids, meta, logits_indices, tensors,
                                   num_top=num_top)
        return SamplerOutput(*jax.device_get(tuple(result)))

    def move_pages(self, out: SchedulerOutput) -> None:
        """Swap-out, swap-in, then copy-on-write copies, in the order the plan needs."""
        if out.swap_out:
            device, host = _padded_pairs(out.swap_out)
            k, v = jax.device_get(self._take(self.cache, device))
            n = len(out.swap_out)
            self.host.k[:, :, host[:n]] = k[:, :, :n]
            self.host.v[:, :, host[:n]] = v[:, :, :n]
        if out.swap_in:
            host, device = _padded_pairs(out.swap_in)
            # Padding rewrites the null page with host page 0: the null page is never read.
            self.cache = self._put(self.cache, device, self.host.k[:, :, host],
                                   self.host.v[:, :, host])
        if out.copies:
            self.cache = self._copy(self.cache, *_padded_pairs(out.copies))

    def poison_free_pages(self, pages) -> None:
        """Fill ``pages`` with NaN (tests: a recycled page must never leak into outputs)."""
        pages = np.asarray(list(pages), np.int32)
        if pages.size:
            self.cache = KVCache(k=self.cache.k.at[:, :, pages].set(jnp.nan),
                                 v=self.cache.v.at[:, :, pages].set(jnp.nan))
