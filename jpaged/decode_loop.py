"""A whole generation for a fixed batch in one jitted call, on the paged KV cache.

The engine (``jpaged.engine.engine``) serves requests step by step from the host. Here the host
reserves every page a run needs up front (prompt + ``num_steps`` tokens per sequence, from
a ``BlockManager``) and prefills; then one jitted ``lax.while_loop`` decodes: each
iteration feeds every row's last token through the model in decode mode (its K/V written
into the row's next slot), samples the next token on the device, and the loop exits as
soon as every row has produced an end-of-sequence id::

    cache, table, first = prepare(model, prompts, num_steps=32)
    out = decode_loop(model, model.params, cache, table, first, num_steps=32, eos_id=2)
    out.tokens   # int32[B, 32]: output tokens 1..32 (``first`` is token 0), -1 after EOS

``prepare(..., dense=True)`` lays the same pool out contiguously (one page of
``max(prompt) + num_steps`` tokens per sequence, row b owning page b + 1), so the same
model and the same loop run paged and dense on identical inputs.

A model is what the engine drives, a ``jpaged.core.interfaces.Model`` (``models.Model``, or
your own as a ``jpaged.core.interfaces.ModelBundle``: see examples/custom_model.py); the loop
uses its ``config`` and ``forward``. ``decode_loop`` also takes a bare step function (a
``jpaged.core.interfaces.DecodeStep``:
``step(params, cache, token_ids int32[B], meta) -> (logits [B, V], cache)``); a model is
told from a step function by ``isinstance`` against the two runtime-checkable protocols.

Transformations: ``decode_loop`` has no Python side effects once its inputs are checked,
so it can be called inside a user's ``jax.jit`` (checks on values are skipped there; only
shapes are checked) and ``jax.vmap``-ed over independent (cache, page table, first tokens)
triples, e.g. one pool per experiment. Vmapping over the rows of *one* pool does not make
sense: the rows already are the batch, and they share the pool, so split rows would each
carry (and write) a whole copy of it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence as Seq
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpaged.core.attention import AttentionMetadata, check_impl
from jpaged.host.block_manager import BlockManager
from jpaged.core.cache import KVCache, PageTable, kv_cache_dtype as resolve_kv_cache_dtype
from jpaged.core.interfaces import DecodeStep, Model, ModelConfig, check_model
from jpaged.engine.sampler import GREEDY_TEMPERATURE, SamplingTensors, sample
from jpaged.host.sampling_params import SamplingParams, derive_seed
from jpaged.host.sequence import Sequence
from jpaged.core.shapes import cdiv, check_positive, flat_layout

# Output token of a row after it stopped (its logprob is 0).
PAD_TOKEN = -1
# Token ids never below 0, so this EOS array matches nothing: "no EOS" compiles like one EOS.
NO_EOS = (-1,)
# Traces of the jitted loop and prefill chunk in this process, by name: Python runs their
# bodies only while tracing, so each count is the number of programs compiled.
_traces = collections.Counter()


class DecodeOutput(NamedTuple):
    """What ``decode_loop`` returns (a pytree; unpacks like a tuple)."""

    tokens: jax.Array    # int32[B, num_steps]: output tokens 1..num_steps, PAD_TOKEN after EOS
    logprobs: jax.Array  # float32[B, num_steps]: each token's logprob (0 for PAD_TOKEN)
    lengths: jax.Array   # int32[B]: tokens whose K/V are in the cache (the last one's is not)
    cache: KVCache       # the pool, updated in place
    steps: jax.Array     # int32[]: iterations run (fewer than num_steps after an early stop)


@dataclasses.dataclass(frozen=True)
class ModelStep:
    """A model's ``forward`` in decode mode as a step function; hashable (a static jit
    argument), so every call with the same model reuses one compiled loop."""

    forward: Callable
    config: Any

    def __call__(self, params, cache, token_ids, meta):
        rows = jnp.arange(token_ids.shape[0], dtype=jnp.int32)
        return self.forward(params, self.config, cache, token_ids, meta, rows)


def decode_loop(model, params, cache: KVCache, page_table: PageTable, first_tokens, *,
                num_steps: int, eos_id: int | Seq[int] | None = None,
                sampling: SamplingParams | Seq[SamplingParams] | None = None,
                seed: int = 0, attention_impl: str = "auto") -> DecodeOutput:
    """Decode up to ``num_steps`` tokens for every row in one jitted call; ``cache`` is
    donated (updated in place: use the returned one).

    model: a ``jpaged.core.interfaces.Model`` or a ``jpaged.core.interfaces.DecodeStep``, see the
    module docstring. page_table: ``int32[B, W]`` tables whose rows own pages for ``lengths +
    num_steps`` tokens, lengths = tokens whose K/V are already in ``cache``.
    first_tokens: ``int32[B]``, output token 0 of each row (sampled after the prompt; not
    yet in the cache). A row whose first token is an EOS id does nothing (use it to pad).
    eos_id: one id or several; a row stops after sampling one. sampling: None (greedy),
    one ``SamplingParams`` for every row or one per row; only temperature, top_k, top_p,
    min_p and seed are used (penalties are refused). Output token i of a row is drawn
    with the key of its seed (the params' seed, else one derived from ``seed`` and the
    row) and i, as the engine draws it. attention_impl: the paged attention each layer runs
    (``jpaged.core.attention``'s ``impl``).
    """
    check_impl(attention_impl)
    step, config = _model_step(model)
    first_tokens = jnp.asarray(first_tokens)
    eos_ids = _eos_ids(eos_id)
    _check_inputs(config, cache, page_table, first_tokens, num_steps, eos_ids)
    tensors = sampling_tensors(sampling, page_table.batch, seed)
    return _decode(step, num_steps, _all_greedy(tensors), params, cache, page_table,
                   first_tokens.astype(jnp.int32), jnp.asarray(eos_ids, jnp.int32), tensors,
                   attention_impl=attention_impl)


@functools.partial(jax.jit, static_argnames=("step", "num_steps", "greedy", "attention_impl"),
                   donate_argnames=("cache",))
def _decode(step, num_steps, greedy, params, cache, page_table, first_tokens, eos_ids,
            tensors, attention_impl="auto"):
    _traces["loop"] += 1
    batch = first_tokens.shape[0]
    rows = jnp.arange(batch, dtype=jnp.int32)
    tables, page_size = page_table.block_tables, cache.page_size

    def running(carry):
        i, done = carry[0], carry[4]
        return (i < num_steps) & ~jnp.all(done)

    def advance(carry):
        i, cache, last, lengths, done, tokens, logprobs = carry
        # A stopped row writes into the null page and keeps its length, so it changes
        # nothing another row reads; its attention output is ignored.
        page = tables[rows, lengths // page_size]
        slots = jnp.where(done, 0, page * page_size + lengths % page_size)
        grown = lengths + jnp.where(done, 0, 1)
        meta = AttentionMetadata(slot_mapping=slots, q_seq=rows, positions=lengths,
                                 page_table=PageTable(tables, grown), is_decode=True,
                                 attention_impl=attention_impl)
        logits, cache = step(params, cache, last, meta)
        # Output token i + 1: the step index the engine would give it.
        token, logprob = sample(logits, dataclasses.replace(
            tensors, step=jnp.full_like(rows, i + 1)), greedy_only=greedy)[:2]
        token = jnp.where(done, PAD_TOKEN, token)
        tokens = lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)
        logprobs = lax.dynamic_update_index_in_dim(logprobs, jnp.where(done, 0.0, logprob),
                                                   i, axis=1)
        done = done | jnp.isin(token, eos_ids)
        return i + 1, cache, jnp.maximum(token, 0), grown, done, tokens, logprobs

    init = (jnp.int32(0), cache, first_tokens, page_table.lengths,
            jnp.isin(first_tokens, eos_ids), jnp.full((batch, num_steps), PAD_TOKEN, jnp.int32),
            jnp.zeros((batch, num_steps), jnp.float32))
    steps, cache, _, lengths, _, tokens, logprobs = lax.while_loop(running, advance, init)
    return DecodeOutput(tokens, logprobs, lengths, cache, steps)


def prepare(model, prompts: Seq[Seq[int]], *, num_steps: int, params=None,
            page_size: int = 16, num_pages: int | None = None, memory: int | None = None,
            dense: bool = False, chunk_size: int = 256,
            sampling: SamplingParams | Seq[SamplingParams] | None = None, seed: int = 0,
            dtype=None, kv_cache_dtype: str = "auto", attention_impl: str = "auto"
            ) -> tuple[KVCache, PageTable, jax.Array]:
    """Prompts -> (cache, page_table, first_tokens) ready for ``decode_loop``.

    Reserves pages for prompt + ``num_steps`` tokens per sequence (see ``reserve``),
    prefills the prompts in chunks of ``chunk_size`` flattened tokens (one compiled shape
    per batch geometry, whatever the prompt lengths) and samples output token 0 of each
    row on the device (pass the same ``sampling`` and ``seed`` to ``decode_loop``).
    params: default ``model.params``; dtype: of the pool, default the params' dtype;
    kv_cache_dtype: "auto" (that dtype), or "int8" / "fp8" for 8-bit pages with scales.
    attention_impl: as in ``decode_loop``.
    """
    check_impl(attention_impl)
    model = check_model(model)
    config = model.config
    params = model.params if params is None else params
    prompts = _check_prompts(prompts, config.vocab_size)
    check_positive(chunk_size=chunk_size)
    dtype = resolve_kv_cache_dtype(kv_cache_dtype, jax.tree.leaves(params)[0].dtype
                                   if dtype is None else dtype)
    cache, page_table = reserve(config, [len(p) for p in prompts], num_steps=num_steps,
                                page_size=page_size, num_pages=num_pages, memory=memory,
                                dense=dense, dtype=dtype)
    cache, last_logits = _prefill(model.forward, config, params, cache, page_table, prompts,
                                  chunk_size, attention_impl)
    tensors = sampling_tensors(sampling, len(prompts), seed)
    first = _first_token(last_logits, tensors, greedy_only=_all_greedy(tensors)).tokens
    return cache, page_table, first


def reserve(config, lengths: Seq[int], *, num_steps: int, page_size: int = 16,
            num_pages: int | None = None, memory: int | None = None, dense: bool = False,
            dtype=jnp.float32) -> tuple[KVCache, PageTable]:
    """An empty pool and a page table reserving ``lengths[b] + num_steps`` tokens for row b,
    handed out by a ``BlockManager``; the table's lengths are ``lengths`` (fill those slots,
    e.g. by a prefill, before the loop).

    The pool holds ``num_pages`` pages, or as many as fit in ``memory`` bytes, or (neither
    given) exactly the pages needed. ``dense``: page_size becomes ``max(lengths) +
    num_steps``, so each row owns one contiguous page, row b page b + 1.
    """
    check_positive(num_steps=num_steps)
    if not lengths:
        raise ValueError("need at least one sequence, got an empty batch")
    if num_pages is not None and memory is not None:
        raise ValueError(f"pass num_pages or memory, not both (got num_pages={num_pages}, "
                         f"memory={memory})")
    if dense:
        page_size = max(lengths) + num_steps
    geometry = (config.num_layers, config.num_kv_heads, config.head_dim, page_size)
    if memory is not None:
        num_pages = KVCache.pages_for_memory(memory, *geometry, dtype)
    elif num_pages is None:
        num_pages = 1 + sum(cdiv(n + num_steps, page_size) for n in lengths)
    manager = BlockManager(num_pages, page_size, watermark=0.0, enable_prefix_caching=False)
    pages = []
    for row, length in enumerate(lengths):
        # Only the token count matters to the manager when prefix caching is off.
        seq = Sequence(str(row), [0] * (length + num_steps), num_steps)
        if not manager.can_allocate(seq):
            raise ValueError(f"the pool of {num_pages} pages of {page_size} tokens is full at "
                             f"sequence {row}: length {length} + num_steps {num_steps} needs "
                             f"{cdiv(length + num_steps, page_size)} pages, "
                             f"{manager.num_free_pages} are free")
        manager.allocate(seq)
        pages.append(seq.block_table)
    return KVCache.create(*geometry, num_pages, dtype), PageTable.from_lists(pages, lengths)


def _prefill(forward, config, params, cache, page_table, prompts, chunk_size, attention_impl):
    """Run the prompts through ``forward`` in prefill mode, ``chunk_size`` flattened tokens
    per call. Returns the cache and each row's last-token logits ``float32[B, V]``."""
    page_size = cache.page_size
    lengths = np.array([len(p) for p in prompts])
    tables = np.asarray(page_table.block_tables)
    total = int(lengths.sum())
    size = cdiv(total, chunk_size) * chunk_size
    # Padding tokens write into the null page as row 0, position 0; their logits are unused.
    tokens, rows, positions, slots = (np.zeros(size, np.int32) for _ in range(4))
    tokens[:total] = np.concatenate(prompts)
    rows[:total], positions[:total], slots[:total] = flat_layout(
        np.zeros_like(lengths), lengths, tables, page_size)
    starts = np.cumsum(lengths) - lengths   # flat index of each row's first token
    last = starts + lengths - 1
    last_logits = jnp.zeros((len(prompts), config.vocab_size), jnp.float32)
    for begin in range(0, size, chunk_size):
        chunk = slice(begin, begin + chunk_size)
        written = np.clip(begin + chunk_size - starts, 0, lengths).astype(np.int32)
        meta = AttentionMetadata(slot_mapping=slots[chunk], q_seq=rows[chunk],
                                 positions=positions[chunk],
                                 page_table=PageTable(page_table.block_tables, written),
                                 attention_impl=attention_impl)
        here = (last >= begin) & (last < begin + chunk_size)
        cache, last_logits = _prefill_chunk(
            forward, config, params, cache, tokens[chunk], meta,
            np.where(here, last - begin, 0).astype(np.int32), here, last_logits)
    return cache, last_logits


@functools.partial(jax.jit, static_argnames=("forward", "config"),
                   donate_argnames=("cache", "last_logits"))
def _prefill_chunk(forward, config, params, cache, token_ids, meta, logits_indices, here,
                   last_logits):
    _traces["prefill"] += 1
    logits, cache = forward(params, config, cache, token_ids, meta, logits_indices)
    return cache, jnp.where(here[:, None], logits, last_logits)


# Static greedy_only: a batch known to be all greedy compiles only the argmax (see sample).
_first_token = jax.jit(sample, static_argnames=("num_top_logprobs", "greedy_only"))


def _all_greedy(tensors: SamplingTensors) -> bool:
    """Whether every row of host-built sampling tensors is greedy."""
    return bool(np.all(np.asarray(tensors.temperature) < GREEDY_TEMPERATURE))


def num_compilations() -> int:
    """Decode loops and prefill chunks compiled so far in this process (one per model,
    shape and static option): compare before and after."""
    return sum(_traces.values())


def _model_step(model: Model | DecodeStep) -> tuple[DecodeStep, ModelConfig | None]:
    """The decode step of a ``Model`` and its config, or a ``DecodeStep`` itself and None
    (its config is unknown: the cache geometry and token ids are then not checked against
    one). A model is checked first: a bundle that also happens to be callable is a model."""
    if isinstance(model, Model):
        return ModelStep(model.forward, model.config), model.config
    if isinstance(model, DecodeStep):
        return model, None
    raise ValueError(f"model must be a jpaged.core.interfaces.Model (e.g. ModelBundle(config, "
                     f"params, forward)) or a step function (jpaged.core.interfaces.DecodeStep), "
                     f"got {type(model).__name__}")


def sampling_tensors(sampling, batch: int, seed: int = 0) -> SamplingTensors:
    """Per-row sampling tensors for a batch (step 0); see ``decode_loop`` for the seeds."""
    if sampling is None:
        sampling = SamplingParams(temperature=0.0)
    rows = [sampling] * batch if isinstance(sampling, SamplingParams) else list(sampling)
    if len(rows) != batch:
        raise ValueError(f"got {len(rows)} SamplingParams for a batch of {batch}")
    for row, params in enumerate(rows):
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling[{row}] must be SamplingParams, got {params!r}")
        if params.uses_penalties or params.use_beam_search:
            raise ValueError(f"sampling[{row}] asks for penalties or beam search, which "
                             f"decode_loop does not do (use the engine): {params}")
    if not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    # A seeded row draws like the first sample of a seeded engine request.
    seeds = [derive_seed(params.seed, 0) if params.seed is not None else derive_seed(seed, row)
             for row, params in enumerate(rows)]
    return SamplingTensors.from_params(rows, seeds, [0] * batch)


def _check_inputs(config: ModelConfig | None, cache: KVCache, page_table: PageTable,
                  first_tokens, num_steps: int, eos_ids=NO_EOS) -> None:
    """Host-side checks before tracing, each naming the bad value. Values (page ids,
    lengths, tokens) are checked when concrete, shapes always; the cache geometry and the
    token ids against ``config`` when the model has one."""
    check_positive(num_steps=num_steps)
    if config is not None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(cache, name) != getattr(config, name):
                raise ValueError(f"the cache has {name}={getattr(cache, name)} but the model "
                                 f"has {name}={getattr(config, name)}")
    page_table.validate(cache.num_pages, cache.page_size)
    if first_tokens.shape != (page_table.batch,):
        raise ValueError(f"first_tokens must be [B={page_table.batch}] (one per page-table "
                         f"row), got shape {tuple(first_tokens.shape)}")
    if not jnp.issubdtype(first_tokens.dtype, jnp.integer):
        raise ValueError(f"first_tokens must be integer token ids, got {first_tokens.dtype}")
    if any(isinstance(x, jax.core.Tracer) for x in (page_table.block_tables,
                                                    page_table.lengths, first_tokens)):
        return
    tokens = np.asarray(first_tokens)
    vocab = np.iinfo(np.int32).max if config is None else config.vocab_size
    bad = (tokens < 0) | (tokens >= vocab)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"first token {tokens[row]} of sequence {row} is outside the "
                         f"vocabulary [0, {vocab})")
    _check_room(np.asarray(page_table.block_tables), np.asarray(page_table.lengths),
                ~np.isin(tokens, eos_ids), num_steps, cache.page_size)


def _check_room(tables, lengths, active, num_steps, page_size) -> None:
    """Every active row must own (not share) the pages of its next ``num_steps`` slots."""
    width = tables.shape[1]
    ends = lengths + num_steps
    too_long = active & (ends > width * page_size)
    if too_long.any():
        row = int(np.argmax(too_long))
        raise ValueError(f"num_steps={num_steps} does not fit sequence {row}: length "
                         f"{lengths[row]} + {num_steps} steps needs {ends[row]} slots, its "
                         f"table holds {width} pages * page_size {page_size} = "
                         f"{width * page_size}")
    columns = np.arange(width)
    needed = np.where(active, cdiv(ends, page_size), cdiv(lengths, page_size))
    used = columns < needed[:, None]
    missing = used & (tables == 0)
    if missing.any():
        row, col = (int(i) for i in np.argwhere(missing)[0])
        reason = (f"its length {lengths[row]}" if col * page_size < lengths[row]
                  else f"num_steps={num_steps} (length {lengths[row]})")
        raise ValueError(f"sequence {row} needs page column {col} for {reason} but holds "
                         f"the null page there: reserve length + num_steps tokens per "
                         f"sequence (BlockManager, or reserve()) before the loop")
    counts = np.bincount(tables[used], minlength=tables.max() + 1)
    written = used & active[:, None] & (columns >= (lengths // page_size)[:, None])
    shared = written & (counts[tables] > 1)
    if shared.any():
        row, col = (int(i) for i in np.argwhere(shared)[0])
        raise ValueError(f"page {tables[row, col]} (column {col} of sequence {row}) is written "
                         f"by the loop but also used by another row: give each sequence its "
                         f"own pages from its length on (copy-on-write first)")


def _eos_ids(eos_id) -> tuple[int, ...]:
    if eos_id is None:
        return NO_EOS
    ids = (eos_id,) if isinstance(eos_id, numbers.Integral) else tuple(eos_id)
    if not ids or not all(isinstance(i, numbers.Integral) and i >= 0 for i in ids):
        raise ValueError(f"eos_id must be None, a token id >= 0 or a non-empty list of them, "
                         f"got {eos_id!r}")
    return tuple(int(i) for i in ids)


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {prompts!r}")
    checked = []
    for row, prompt in enumerate(prompts):
        tokens = np.asarray(prompt)
        if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"prompt {row} must be a non-empty list of token ids, got "
                             f"{prompt!r}")
        bad = (tokens < 0) | (tokens >= vocab_size)
        if bad.any():
            raise ValueError(f"prompt {row}: token id {tokens[np.argmax(bad)]} is outside the "
                             f"vocabulary [0, {vocab_size})")
        checked.append(tokens.astype(np.int32))
    return checked
