"""Request and output records of the engine, and the one rule that turns a prompt into
token ids. Host only: no JAX."""

from __future__ import annotations

import dataclasses

import numpy as np

from jpaged.host.sampling_params import SamplingParams
from jpaged.host.sequence import Sequence, SequenceStatus


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (``n`` of them, or the best beams)."""

    index: int
    token_ids: list[int]
    text: str | None
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (``time.perf_counter``) and cache use of one request."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    scheduled: bool = False

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        if self.finished_time is None or self.first_token_time is None:
            return None
        return (self.finished_time - self.first_token_time) / max(self.num_output_tokens - 1, 1)


@dataclasses.dataclass
class RequestOutput:
    """Where a request stands: its completions so far, and whether it is finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then a dict
    # {token id: logprob} of each prompt token and the top alternatives.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclasses.dataclass
class Stream:
    """Host state of one generated sequence: its seed and what it has produced."""

    index: int
    seed: int
    cumulative_logprob: float = 0.0
    logprobs: list = dataclasses.field(default_factory=list)
    text: str | None = None


class Request:
    """A prompt, its sampling parameters, and the sequences generating for it."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, seeds: list[int], arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seeds = seeds
        self.metrics = RequestMetrics(arrival_time)
        self.streams: dict[str, Stream] = {}       # live and finished sequences by seq_id
        self.seqs: dict[str, Sequence] = {}
        self.hypotheses: list[tuple[float, Sequence]] = []   # finished beams, raw score
        # Token rules (``jpaged.host.token_rules.TokenRules``, set by the engine) and each
        # sequence's grammar position, by seq_id (rebuilt from its tokens when missing).
        self.rules = None
        self.grammar_states: dict = {}
        # Filled position by position by the prefill steps (entry 0 stays None).
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            None if params.prompt_logprobs is None else [None] * len(prompt_token_ids))
        self.finished = False

    @property
    def beam_width(self) -> int:
        return self.params.num_sequences if self.params.use_beam_search else 0

    def sampled_completions(self) -> list[CompletionOutput]:
        """The ``n`` samples so far, in index order (requests without beam search)."""
        outputs = []
        for seq_id, stream in sorted(self.streams.items(), key=lambda kv: kv[1].index):
            seq = self.seqs[seq_id]
            outputs.append(CompletionOutput(
                stream.index, seq.output_token_ids, stream.text, stream.cumulative_logprob,
                stream.logprobs if self.params.logprobs is not None else None,
                seq.finish_reason))
        return outputs


def finished_copy(seq: Sequence, seq_id: str, token: int, reason: str) -> Sequence:
    """A finished copy of ``seq`` (which has just appended a token) ending on ``token``
    instead: a completed sample or beam hypothesis that holds no pages."""
    done = Sequence(seq_id, seq.token_ids[:-1] + [token], seq.max_tokens,
                    request_id=seq.request_id)
    done.num_prompt_tokens = seq.num_prompt_tokens
    done.status, done.finish_reason = SequenceStatus.FINISHED, reason
    return done


def prompt_token_ids(prompt, tokenizer) -> tuple[str | None, list[int]]:
    """``(text or None, token ids)`` of a prompt: a string (encoded with ``tokenizer``) or
    a list / array of token ids. Raises ValueError for anything else."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; this model has none: pass "
                             "token ids")
        return prompt, tokenizer.encode(prompt).ids
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, (int, np.integer)) for t in prompt):
        raise ValueError(f"prompt must be a string or a list of token ids, got "
                         f"{type(prompt).__name__}")
    return None, [int(t) for t in prompt]
