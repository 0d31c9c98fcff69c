"""The device side of the engine: the KV pool, the jitted step, and page moves.

One step is one jitted call ``(params, cache, batch) -> (sampled ids, cache)`` with the
cache donated, so the pool is updated in place; the sampled ids (and their logprobs) are
the only values brought back to the host.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.core.attention import check_impl
from jpaged.engine.batch import StepBatch
from jpaged.core.cache import KVCache, copy_pages, put_pages, take_pages
from jpaged.engine.sampler import SamplerOutput, sample, score_tokens
from jpaged.host.scheduler import PageMoves
from jpaged.core.shapes import bucket

# Page-copy lists are padded to powers of two, at least this, so they compile rarely.
MIN_COPY_BUCKET = 8
# Traces of `_step` in this process. A trace happens exactly when jit meets a new
# (model, shapes, static fields) key, i.e. once per compiled program.
_num_step_traces = 0


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _step(forward, config, attention_impl, params, cache, batch: StepBatch):
    """One engine step. Jitted once at module level, keyed on (forward, config) and the
    batch's shapes, so every engine running the same model shares the compiled programs."""
    global _num_step_traces
    _num_step_traces += 1   # Python runs only while tracing: counts compilations
    # Prompt logprobs ride on the same forward: their tokens' logits follow the sampling
    # rows' (none when L = 0, so a step without them is unchanged).
    rows = batch.logits_indices.shape[0]
    logits, cache = forward(params, config, cache, batch.token_ids,
                            batch.attention_metadata(attention_impl),
                            jnp.concatenate([batch.logits_indices, batch.prompt_indices]))
    sampled = sample(logits[:rows], batch.sampling, batch.num_top)
    if batch.prompt_indices.shape[0]:
        sampled = sampled._replace(**dict(zip(
            ("prompt_logprobs", "prompt_top_ids", "prompt_top_logprobs", "prompt_ranks"),
            score_tokens(logits[rows:], batch.prompt_targets, batch.num_prompt_top))))
    return sampled, cache


@jax.jit
def _feed(token_ids, index, rows, tokens):
    """``token_ids`` with ``token_ids[index[i]] = tokens[rows[i]]`` (index: an int32
    array, or a tuple of one per axis); out-of-range indices are padding and dropped."""
    return jnp.asarray(token_ids).at[index].set(tokens[rows], mode="drop")


def _padded_index(values: np.ndarray, fill: int) -> np.ndarray:
    """``values`` padded with ``fill`` to a bucket, so the feeds compile rarely."""
    padded = np.full(bucket(len(values), MIN_COPY_BUCKET), fill, np.int32)
    padded[:len(values)] = values
    return padded


def _padded_pairs(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split (src, dst) pairs ``int32[N, 2]`` into two arrays padded to a bucket with
    page 0 -> 0."""
    return _padded_index(pairs[:, 0], 0), _padded_index(pairs[:, 1], 0)


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

    model: a ``jpaged.core.interfaces.Model``; the runner uses its ``config`` (a static jit
    argument), ``params`` and ``forward`` (a ``jpaged.core.interfaces.Forward``).
    """

    def __init__(self, model, cache: KVCache, num_host_pages: int = 0,
                 attention_impl: str = "auto"):
        check_impl(attention_impl)
        self.model = model
        self.attention_impl = attention_impl
        self.cache = cache
        # Shapes, dtypes and shardings, to rebuild the pool if a failed step consumed it;
        # an uncommitted pool is rebuilt uncommitted (a committed one is another jit key:
        # every step program would compile again).
        self._layout = jax.tree.map(
            lambda pool: (jax.ShapeDtypeStruct(pool.shape, pool.dtype, sharding=pool.sharding),
                          pool.committed), cache)
        self.host = HostPool(cache, num_host_pages) if num_host_pages else None
        self._copy = jax.jit(copy_pages, donate_argnums=(0,))
        self._put = jax.jit(put_pages, donate_argnums=(0,))
        self._take = jax.jit(take_pages)

    @property
    def num_compilations(self) -> int:
        """Distinct step programs compiled so far in this process (one per model, bucket
        shape and mode; shared by engines running the same model): compare before/after."""
        return _num_step_traces

    def execute(self, moves: PageMoves, batch: StepBatch) -> SamplerOutput:
        """Move pages as planned, run the step, and bring back the sampled ids (numpy)."""
        return self.fetch(self.dispatch(moves, batch))

    def dispatch(self, moves: PageMoves, batch: StepBatch, feed=None) -> SamplerOutput:
        """Move pages as planned and start the step without waiting for it (JAX dispatch
        is asynchronous): its sampled ids stay on the device until ``fetch``.

        feed: an ``overlap.Feed``: ids an earlier step sampled that never came to the
        host (async scheduling), into the batch's tokens and penalty histories."""
        self.move_pages(moves)
        if feed is not None:
            batch = dataclasses.replace(batch, token_ids=_feed(
                batch.token_ids, _padded_index(feed.token_index, len(batch.token_ids)),
                _padded_index(feed.token_rows, 0), feed.tokens))
            if len(feed.history_rows):
                sampling = batch.sampling
                history = _feed(sampling.output_tokens,
                                (_padded_index(feed.history_rows,
                                               sampling.output_tokens.shape[0]),
                                 _padded_index(feed.history_cols, 0)),
                                _padded_index(feed.history_from, 0), feed.tokens)
                batch = dataclasses.replace(batch, sampling=dataclasses.replace(
                    sampling, output_tokens=history))
        result, self.cache = _step(self.model.forward, self.model.config, self.attention_impl,
                                   self.model.params, self.cache, batch)
        return result

    @staticmethod
    def fetch(result: SamplerOutput) -> SamplerOutput:
        """Wait for a dispatched step and bring its sampled ids back (numpy). A device
        error of the step (or of any step it depends on) surfaces here."""
        return jax.device_get(result)

    def move_pages(self, moves: PageMoves) -> None:
        """Swap-out, swap-in, then copy-on-write copies, in the order the plan needs."""
        if len(moves.swap_out):
            device, host = _padded_pairs(moves.swap_out)
            n = len(moves.swap_out)
            taken = jax.device_get(self._take(self.cache, device))
            self.host.store(host[:n], jax.tree.map(lambda pool: pool[:, :, :n], taken))
        if len(moves.swap_in):
            host, device = _padded_pairs(moves.swap_in)
            # Padding rewrites the null page with host page 0: the null page is never read.
            self.cache = self._put(self.cache, device, self.host.load(host))
        if len(moves.copies):
            self.cache = self._copy(self.cache, *_padded_pairs(moves.copies))

    def replace_lost_cache(self, force: bool = False) -> bool:
        """After a failed step: if the pool was consumed (donated to a call that raised),
        or ``force`` (a dispatched step failed on the device: the pool it produced, and
        every later one, carries the error), put a zeroed pool of the same layout in its
        place. Returns whether it did: then every page's K/V is gone and the caller
        recomputes what they held."""
        if not force and not any(pool.is_deleted() for pool in jax.tree.leaves(self.cache)):
            return False
        self.cache = jax.tree.map(
            lambda s: jnp.zeros(s[0].shape, s[0].dtype, device=s[0].sharding if s[1] else None),
            self._layout, is_leaf=lambda x: isinstance(x, tuple))
        return True

    def poison_free_pages(self, pages) -> None:
        """Fill ``pages`` with NaN (tests: a recycled page must never leak into outputs);
        int8 codes, which have no NaN, get -128, a code quantization never writes."""
        pages = np.asarray(list(pages), np.int32)
        if pages.size:
            self.cache = jax.tree.map(lambda pool: pool.at[:, :, pages].set(_poison(pool.dtype)),
                                      self.cache)


def _poison(dtype):
    return jnp.nan if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min
