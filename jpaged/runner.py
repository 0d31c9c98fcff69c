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

from jpaged.attention import AttentionMetadata
from jpaged.cache import KVCache, PageTable, copy_pages, put_pages, take_pages
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


def _padded_pairs(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Split (src, dst) pairs into two arrays padded to a power of two with page 0 -> 0."""
    size = bucket(len(pairs), 8, 1 << 30)
    src, dst = np.zeros(size, np.int32), np.zeros(size, np.int32)
    if pairs:
        src[:len(pairs)], dst[:len(pairs)] = zip(*pairs)
    return src, dst


class HostPool:
    """Pages swapped out of the device: ``pages``, a KVCache of numpy arrays laid out like
    the device pool with ``num_pages`` pages (K, V ``[L, Hkv, num_pages, S, D]``, and the
    scales of an 8-bit pool)."""

    def __init__(self, cache: KVCache, num_pages: int):
        self.pages = jax.tree.map(
            lambda pool: np.zeros(pool.shape[:2] + (num_pages,) + pool.shape[3:], pool.dtype),
            cache)

    def store(self, pages: np.ndarray, taken: KVCache) -> None:
        """Write ``taken`` (numpy, from ``take_pages``) into host ``pages`` ``int[N]``."""
        for pool, new in zip(jax.tree.leaves(self.pages), jax.tree.leaves(taken)):
            pool[:, :, pages] = new

    def load(self, pages: np.ndarray) -> KVCache:
        """Host ``pages`` ``int[N]`` as a KVCache of numpy arrays, for ``put_pages``."""
        return jax.tree.map(lambda pool: pool[:, :, pages], self.pages)


class ModelRunner:
    """Owns the KV pool on the device and runs the model's step on it.

    model: an object with ``config`` (hashable: it is a static jit argument), ``params`` and
    ``forward(params, config, cache, token_ids int32[T], meta, logits_indices int32[R]) ->
    (logits float32[R, V], cache)``; see ``models.llama.forward``.
    """

    def __init__(self, model, cache: KVCache, num_host_pages: int = 0):
        self.model = model
        self.cache = cache
        self.host = HostPool(cache, num_host_pages) if num_host_pages else None
        self._copy = jax.jit(copy_pages, donate_argnums=(0,))
        self._put = jax.jit(put_pages, donate_argnums=(0,))
        self._take = jax.jit(take_pages)

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
            page_table=PageTable(out.block_tables, out.context_lens), is_decode=out.is_decode)
        result, self.cache = _step(self.model.forward, self.model.config, self.model.params,
                                   self.cache, out.token_ids, meta, logits_indices, tensors,
                                   num_top=num_top)
        return SamplerOutput(*jax.device_get(tuple(result)))

    def move_pages(self, out: SchedulerOutput) -> None:
        """Swap-out, swap-in, then copy-on-write copies, in the order the plan needs."""
        if out.swap_out:
            device, host = _padded_pairs(out.swap_out)
            n = len(out.swap_out)
            taken = jax.device_get(self._take(self.cache, device))
            self.host.store(host[:n], jax.tree.map(lambda pool: pool[:, :, :n], taken))
        if out.swap_in:
            host, device = _padded_pairs(out.swap_in)
            # Padding rewrites the null page with host page 0: the null page is never read.
            self.cache = self._put(self.cache, device, self.host.load(host))
        if out.copies:
            self.cache = self._copy(self.cache, *_padded_pairs(out.copies))

    def poison_free_pages(self, pages) -> None:
        """Fill ``pages`` with NaN (tests: a recycled page must never leak into outputs);
        int8 codes, which have no NaN, get -128, a code quantization never writes."""
        pages = np.asarray(list(pages), np.int32)
        if pages.size:
            self.cache = jax.tree.map(lambda pool: pool.at[:, :, pages].set(_poison(pool.dtype)),
                                      self.cache)


def _poison(dtype):
    return jnp.nan if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min
