"""The device sampler: one jittable `sample` over a batch's `SamplingTensors`.

`SamplingParams` is what a user passes with a request (validated when built). The engine
turns the params of the running sequences into `SamplingTensors`, one row per sequence,
padded to a batch bucket, and calls `sample` inside its jitted step, so only token ids and
logprobs come back to the host.

The sampler follows vLLM's order: penalties on the raw logits, then greedy rows take the
argmax; the others are scaled by their temperature, filtered by top-k, top-p and min-p and
sampled with a key derived from the sequence's seed and the index of the token being
generated, so a seeded request gives the same tokens whatever batch it lands in.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpaged.core.shapes import bucket
from jpaged.host.sampling_params import SamplingParams

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
# Top-k / top-p first look at this many largest logits per row (a cheap partial sort).
TOP_CANDIDATES = 256
# Token-history widths (penalties) are powers of two, at least this, so they compile rarely.
MIN_HISTORY_WIDTH = 16
# Bias-entry widths (logit_bias, banned tokens) are powers of two, at least this.
MIN_BIAS_WIDTH = 8


def _pad_histories(histories, rows: int, batch: int, width: int | None,
                   name: str) -> np.ndarray:
    if histories is None or len(histories) != rows:
        raise ValueError(f"{name} must hold one token list per sequence ({rows}), got "
                         f"{None if histories is None else len(histories)}")
    longest = max([len(h) for h in histories] + [0])
    width = bucket(longest, MIN_HISTORY_WIDTH) if width is None else width
    if longest > width:
        raise ValueError(f"{name} has a history of {longest} tokens, more than "
                         f"width={width}")
    padded = np.full((batch, width), -1, np.int32)
    for row, tokens in enumerate(histories):
        padded[row, :len(tokens)] = tokens
    return padded


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """The sampling parameters of a batch, one row per sequence (a pytree of arrays).

    temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty:
    ``f32[B]``; top_k: ``i32[B]`` (0 = off; values above the vocabulary mean off);
    seed: ``u32[B]`` and step: ``i32[B]`` (the index of the token being generated) make
    the row's PRNG key; prompt_tokens ``i32[B, Hp]`` and output_tokens ``i32[B, Ho]``: the
    token history for penalties, -1 padded (width 0 when no row uses penalties).
    bias_ids ``i32[B, K]`` (-1 padded) and bias_values ``f32[B, K]``: added to the logits
    (logit_bias; -inf bans a token); token_mask ``i32[B, W]``: the allowed tokens as a
    bitmask (``jpaged.host.token_rules``; all bits set for an unconstrained row); each
    of width 0 when no row needs it (see ``jpaged.host.token_rules``).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array
    step: jax.Array
    prompt_tokens: jax.Array
    output_tokens: jax.Array
    bias_ids: jax.Array = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int32))
    bias_values: jax.Array = dataclasses.field(
        default_factory=lambda: np.zeros((0, 0), np.float32))
    token_mask: jax.Array = dataclasses.field(
        default_factory=lambda: np.zeros((0, 0), np.int32))

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], seeds: Sequence[int],
                    steps: Sequence[int],
                    prompt_tokens: Sequence[Sequence[int]] | None = None,
                    output_tokens: Sequence[Sequence[int]] | None = None, *,
                    batch: int | None = None, prompt_width: int | None = None,
                    output_width: int | None = None,
                    bias: Sequence[Sequence[tuple[int, float]] | None] | None = None,
                    masks: Sequence[np.ndarray | None] | None = None) -> "SamplingTensors":
        """Numpy arrays for ``len(params)`` sequences, padded to ``batch`` rows.

        seeds: each sequence's seed (from `SamplingParams.sequence_seeds`; taken modulo
        2**32). steps: how many tokens each sequence has generated so far. The histories
        are needed only when some row uses penalties, and dropped (width 0) otherwise;
        their widths default to the next power of two >= the longest (at least 16).
        Padded rows are greedy with every filter and penalty off. bias: per row, its
        ``(token id, bias)`` entries or None; masks: per row, its ``int32[W]`` allowed
        bitmask or None (all allowed); see ``jpaged.host.token_rules``.
        """
        rows = len(params)
        batch = rows if batch is None else batch
        if batch < rows:
            raise ValueError(f"batch={batch} is smaller than the {rows} sequences given")
        if len(seeds) != rows or len(steps) != rows:
            raise ValueError(f"need one seed and one step per sequence ({rows}), got "
                             f"{len(seeds)} seeds and {len(steps)} steps")

        def column(values, fill, dtype):
            out = np.full((batch,), fill, dtype)
            out[:rows] = values
            return out

        if any(p.uses_penalties for p in params):
            prompt = _pad_histories(prompt_tokens, rows, batch, prompt_width, "prompt_tokens")
            output = _pad_histories(output_tokens, rows, batch, output_width, "output_tokens")
        else:
            prompt = output = np.zeros((batch, 0), np.int32)
        return cls(
            temperature=column([p.temperature for p in params], 0.0, np.float32),
            top_k=column([max(p.top_k, 0) for p in params], 0, np.int32),
            top_p=column([p.top_p for p in params], 1.0, np.float32),
            min_p=column([p.min_p for p in params], 0.0, np.float32),
            repetition_penalty=column([p.repetition_penalty for p in params], 1.0,
                                      np.float32),
            presence_penalty=column([p.presence_penalty for p in params], 0.0, np.float32),
            frequency_penalty=column([p.frequency_penalty for p in params], 0.0, np.float32),
            seed=column([s % 2**32 for s in seeds], 0, np.uint32),
            step=column(steps, 0, np.int32),
            prompt_tokens=prompt,
            output_tokens=output,
            **_token_rule_arrays(bias, masks, rows, batch),
        )

    @property
    def batch(self) -> int:
        return self.temperature.shape[0]


def _token_rule_arrays(bias, masks, rows: int, batch: int) -> dict:
    """``bias_ids``, ``bias_values`` and ``token_mask`` of `SamplingTensors.from_params`."""
    out = {}
    if bias is not None and any(bias):
        width = bucket(max(len(b or ()) for b in bias), MIN_BIAS_WIDTH)
        ids, values = np.full((batch, width), -1, np.int32), np.zeros((batch, width), np.float32)
        for row, entries in enumerate(bias[:rows]):
            if entries:
                ids[row, :len(entries)], values[row, :len(entries)] = zip(*entries)
        out.update(bias_ids=ids, bias_values=values)
    if masks is not None and any(m is not None for m in masks):
        width = next(len(m) for m in masks if m is not None)
        token_mask = np.full((batch, width), -1, np.int32)
        for row, mask in enumerate(masks[:rows]):
            if mask is not None:
                token_mask[row] = mask
        out["token_mask"] = token_mask
    return out


def apply_token_rules(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """``f32[B, V]`` plus each row's bias entries, -inf where its bitmask clears the bit.
    Both are skipped at trace time when no row of the batch has them (width 0)."""
    vocab = logits.shape[-1]
    if tensors.bias_ids.shape[1]:
        ids = jnp.where(tensors.bias_ids < 0, vocab, tensors.bias_ids)   # padding: dropped
        rows = jnp.arange(ids.shape[0])[:, None]
        logits = logits.at[rows, ids].add(tensors.bias_values, mode="drop")
    if tensors.token_mask.shape[1]:
        token = jnp.arange(vocab)
        words = lax.bitcast_convert_type(jnp.take(tensors.token_mask, token // 32, axis=1),
                                         jnp.uint32)
        allowed = (jnp.right_shift(words, (token % 32).astype(jnp.uint32)) & 1) == 1
        logits = jnp.where(allowed, logits, -jnp.inf)
    return logits


def _token_counts(tokens: jax.Array, vocab: int) -> jax.Array:
    """``i32[B, H]`` token ids, -1 padded -> ``f32[B, V]`` occurrences of each id."""
    # Out-of-range ids are dropped; -1 must be moved there first or it would wrap to V - 1.
    tokens = jnp.where(tokens < 0, vocab, tokens)
    rows = jnp.arange(tokens.shape[0])[:, None]
    counts = jnp.zeros((tokens.shape[0], vocab), jnp.float32)
    return counts.at[rows, tokens].add(1.0, mode="drop")


def apply_penalties(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """``f32[B, V]`` -> ``f32[B, V]`` with vLLM's penalties.

    Repetition: logits of tokens seen in the prompt or the output are divided by the
    penalty when positive, multiplied when negative. Then frequency (times the token's
    count in the output) and presence (once if in the output) are subtracted.
    """
    if tensors.prompt_tokens.shape[1] + tensors.output_tokens.shape[1] == 0:
        return logits
    vocab = logits.shape[-1]
    output_counts = _token_counts(tensors.output_tokens, vocab)
    seen = (_token_counts(tensors.prompt_tokens, vocab) > 0) | (output_counts > 0)
    penalty = tensors.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)
    logits = logits - tensors.frequency_penalty[:, None] * output_counts
    return logits - tensors.presence_penalty[:, None] * (output_counts > 0)


def _cutoff(top: jax.Array, log_total: jax.Array, top_k: jax.Array,
            top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The smallest logit each row keeps under top-k then top-p, from its largest logits.

    top: ``f32[B, C]``, each row's C largest logits, descending. log_total: ``f32[B]``,
    logsumexp of the whole row. top_k: ``i32[B]`` in [1, V]. Returns the cutoff ``f32[B]``
    (ties with it are kept) and the probability mass ``f32[B]`` that ``top`` holds, which
    tells the caller whether tokens beyond the C given could have been kept.
    """
    num = top.shape[-1]
    in_top_k = jnp.arange(num) < top_k[:, None]
    # `top` is sorted, so its first logit is the largest: no logsumexp, and the kept set
    # is a prefix whose smallest logit is the cutoff (a min, not a gather). Few ops: this
    # is traced twice per sampler and its compile time adds up on a CPU.
    largest = top[:, :1]
    weights = jnp.where(in_top_k, jnp.exp(top - largest), 0.0)
    # top-p renormalizes over the top k tokens: all of them are in `top` when k <= C.
    total = jnp.where(top_k[:, None] <= num, jnp.sum(weights, axis=-1, keepdims=True),
                      jnp.exp(log_total[:, None] - largest))
    probs = weights / total
    cumulative = jnp.cumsum(probs, axis=-1)
    # vLLM's rule: a token stays while the larger ones hold less than top_p, so the
    # largest always stays and top_p = 1 drops nothing (even with rounding).
    keep = in_top_k & ((cumulative - probs < top_p[:, None]) | (top_p[:, None] >= 1))
    return jnp.min(jnp.where(keep, top, jnp.inf), axis=-1), cumulative[:, -1]


def apply_filters(logits: jax.Array, tensors: SamplingTensors,
                  candidates: int = TOP_CANDIDATES) -> jax.Array:
    """``f32[B, V]`` -> the logits a sampled row draws from: divided by the temperature,
    -inf outside top-k, top-p and min-p. Greedy rows are left at temperature 1.

    Top-k and top-p look at the ``candidates`` (static) largest logits of each row and
    sort whole rows only when some row's kept set may reach beyond them.
    """
    vocab = logits.shape[-1]
    greedy = tensors.temperature < GREEDY_TEMPERATURE
    logits = logits / jnp.where(greedy, 1.0, tensors.temperature)[:, None]
    top_k = jnp.where((tensors.top_k <= 0) | (tensors.top_k > vocab), vocab, tensors.top_k)
    top_p = tensors.top_p
    filtering = ~greedy & ((top_k < vocab) | (top_p < 1))
    candidates = min(candidates, vocab)

    def top_k_top_p():
        log_total = jax.nn.logsumexp(logits, axis=-1)
        cutoff, mass = _cutoff(lax.top_k(logits, candidates)[0], log_total, top_k, top_p)
        if candidates == vocab:
            return cutoff
        # Exact when the top k fit in the candidates, or with top-k off the candidates
        # already hold top_p of the mass (then the next token is dropped, and all after).
        exact = ~filtering | (top_k <= candidates) | ((top_k == vocab) & (mass >= top_p))
        return lax.cond(jnp.all(exact), lambda: cutoff,
                        lambda: _cutoff(-jnp.sort(-logits, axis=-1), log_total, top_k,
                                        top_p)[0])

    # A batch where no sampled row filters (the common case) skips this at run time.
    cutoff = lax.cond(jnp.any(filtering), top_k_top_p,
                      lambda: jnp.full(logits.shape[:1], -jnp.inf, logits.dtype))
    cutoff = jnp.where(filtering, cutoff, -jnp.inf)
    # min-p keeps p >= min_p * p_max, i.e. logit >= max + log(min_p), whatever top-k/p
    # removed (they never remove the max); min_p 0 gives -inf and keeps everything.
    cutoff = jnp.maximum(cutoff, jnp.max(logits, axis=-1) + jnp.log(tensors.min_p))
    return jnp.where(logits < cutoff[:, None], -jnp.inf, logits)


def _draw(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """One token per row from ``f32[B, V]`` logits with the row's own key: ``i32[B]``."""
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(
        tensors.seed, tensors.step)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


class SamplerOutput(NamedTuple):
    """What `sample` returns (a pytree; unpacks like a tuple). The runner adds the prompt
    logprobs of the step's scored prompt tokens (`score_tokens`; L = 0 when none)."""

    tokens: jax.Array        # i32[B]
    logprobs: jax.Array      # f32[B], of the sampled token
    top_ids: jax.Array       # i32[B, N], most likely first
    top_logprobs: jax.Array  # f32[B, N]
    ranks: jax.Array         # i32[B], of the sampled token: 1 + tokens more likely
    prompt_logprobs: jax.Array | None = None      # f32[L], of each scored prompt token
    prompt_top_ids: jax.Array | None = None       # i32[L, K]
    prompt_top_logprobs: jax.Array | None = None  # f32[L, K]
    prompt_ranks: jax.Array | None = None         # i32[L]


def score_tokens(logits: jax.Array, targets: jax.Array, num_top: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Prompt logprobs, jittable (``num_top`` static): logits ``[L, V]`` at prompt
    positions, targets ``i32[L]`` the prompt token that follows each. Returns the target's
    logprob ``f32[L]``, the ``num_top`` most likely ids ``i32[L, K]`` and their logprobs
    ``f32[L, K]``, and the target's rank ``i32[L]`` (1 + tokens more likely), all of the
    model's raw distribution (no penalty, bias or temperature: a score of the prompt, as
    vLLM's prompt_logprobs)."""
    logits = logits.astype(jnp.float32)
    log_total = jax.nn.logsumexp(logits, axis=-1)
    top_logits, top_ids = lax.top_k(logits, num_top)
    target = jnp.take_along_axis(logits, targets[:, None], axis=-1)
    return (target[:, 0] - log_total, top_ids.astype(jnp.int32),
            top_logits - log_total[:, None],
            1 + jnp.sum(logits > target, axis=-1, dtype=jnp.int32))


def sample(logits: jax.Array, tensors: SamplingTensors, num_top_logprobs: int = 0, *,
           greedy_only: bool = False) -> SamplerOutput:
    """Next tokens for a batch: jittable, with ``num_top_logprobs`` and ``greedy_only``
    static.

    logits: ``[B, V]`` (any float dtype; computed in float32). Returns tokens ``i32[B]``,
    the sampled token's logprob ``f32[B]`` and rank ``i32[B]`` (1: the most likely), and
    the top ``num_top_logprobs`` ids and logprobs ``[B, N]``. Logprobs are those of the
    model's distribution after penalties, before temperature, top-k, top-p and min-p
    (vLLM v1 reports the raw distribution, v0 the fully processed one): they do not
    depend on how a token was picked, and greedy rows and beam search get the same
    scores as sampled rows.

    greedy_only: the caller knows every row is greedy (temperature below
    ``GREEDY_TEMPERATURE``; checked when the temperatures are concrete), so only the
    argmax is built. The filters and the draw cost seconds of compile on a CPU per
    program; without the flag they are compiled but skipped at run time when the batch
    is all greedy.
    """
    vocab = logits.shape[-1]
    if not 0 <= num_top_logprobs <= vocab:
        raise ValueError(f"num_top_logprobs must be in [0, vocab={vocab}], got "
                         f"{num_top_logprobs}")
    greedy = tensors.temperature < GREEDY_TEMPERATURE
    if greedy_only and not isinstance(greedy, jax.core.Tracer) and not np.all(greedy):
        row = int(np.argmin(np.asarray(greedy)))
        raise ValueError(f"greedy_only=True but row {row} has temperature "
                         f"{float(tensors.temperature[row]):g}")
    logits = apply_penalties(logits.astype(jnp.float32), tensors)
    # Token rules choose the token; the logprobs below stay those of the model (vLLM v1).
    ruled = apply_token_rules(logits, tensors)
    best = jnp.argmax(ruled, axis=-1).astype(jnp.int32)
    if greedy_only:
        tokens = best
    else:
        tokens = lax.cond(
            jnp.all(greedy), lambda: best,
            lambda: jnp.where(greedy, best, _draw(apply_filters(ruled, tensors), tensors)))
    # logprob = logit - logsumexp: no [B, V] log_softmax is materialized.
    log_total = jax.nn.logsumexp(logits, axis=-1)
    top_logits, top_ids = lax.top_k(logits, num_top_logprobs)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)
    return SamplerOutput(
        tokens=tokens,
        logprobs=chosen[:, 0] - log_total,
        top_ids=top_ids.astype(jnp.int32),
        top_logprobs=top_logits - log_total[:, None],
        ranks=1 + jnp.sum(logits > chosen, axis=-1, dtype=jnp.int32))
