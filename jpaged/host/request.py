"""Request and output records of the engine, and the one rule that turns a prompt into
token ids. Host only: no JAX."""

from __future__ import annotations

import dataclasses
import operator

import numpy as np

from jpaged.host.detokenizer import DecodeState
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.sequence import PLACEHOLDER, Sequence, SequenceStatus


@dataclasses.dataclass
class Logprob:
    """One entry of ``CompletionOutput.logprobs`` (vLLM's record): the token's logprob,
    its rank in the distribution (1: the most likely) and its text (None without
    detokenization)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (``n`` of them, or the best beams).

    ``logprobs``: per generated token, ``{token id: Logprob}`` of the sampled token and the
    top ``SamplingParams.logprobs``. ``stop_reason``: the stop string or stop token id that
    ended it (None for EOS, the length limit, or not finished)."""

    index: int
    token_ids: list[int]
    text: str | None
    cumulative_logprob: float
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


TIMES = ("arrival_time", "first_token_time", "finished_time")   # of RequestMetrics


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
    # {token id: Logprob} of each prompt token and the top alternatives.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (vLLM's field)."""
        return self.metrics.num_cached_tokens

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
    """Host state of one generated sequence: its seed and what it has produced.

    ``text``: its text (None without a tokenizer) as of ``current_text``. The stop rules
    decode it incrementally (``jpaged.host.stop``) into ``decoder``, which is not state: a
    stream rebuilt from its state decodes its tokens again on its next step (an undo
    puts the decoder back where it was, see ``record``).
    """

    index: int
    seed: int
    cumulative_logprob: float = 0.0
    logprobs: list = dataclasses.field(default_factory=list)
    text: str | None = None
    stop_reason: int | str | None = None

    # The fields a step may reassign (``record``); ``index`` and ``seed`` never change and
    # ``logprobs`` only grows (tests/test_rollback.py checks this covers every field).
    STEP_FIELDS = ("cumulative_logprob", "text", "stop_reason")

    def __post_init__(self):
        # A stream rebuilt from its state (``Request.from_state``) has plain dicts.
        self.logprobs = [{token: lp if isinstance(lp, Logprob) else Logprob(**lp)
                          for token, lp in entry.items()} for entry in self.logprobs]
        self.decoder: DecodeState | None = None

    def decoding(self, skip_special_tokens: bool = True, keep: int = 0) -> DecodeState:
        """The decoder state, started (from the first output token) when missing;
        ``keep``: the characters of text a stop string may share with the next text."""
        if self.decoder is None:
            self.decoder = DecodeState(skip_special_tokens, keep)
        return self.decoder

    def current_text(self) -> str | None:
        """``text``, brought up to date with the decoder (joining its pieces once)."""
        if self.decoder is not None:
            self.text = self.decoder.text
        return self.text

    def record(self) -> tuple:
        """What a step may change of this stream, for ``restore_streams`` if the step
        fails (``jpaged.host.journal``): O(1), its decoder's position included, so a
        rolled-back stream's text is exactly what it was (no decoding again)."""
        decoder = self.decoder
        return (self, _step_fields(self), len(self.logprobs), decoder,
                None if decoder is None else decoder.snapshot())


_step_fields = operator.attrgetter(*Stream.STEP_FIELDS)


def restore_streams(records: list[tuple]) -> None:
    """Undo record of a step's streams (``Stream.record`` each)."""
    for stream, values, logprobs, decoder, position in records:
        for name, value in zip(Stream.STEP_FIELDS, values):
            setattr(stream, name, value)
        del stream.logprobs[logprobs:]
        stream.decoder = decoder
        if decoder is not None:
            decoder.restore(position)


class Request:
    """A prompt, its sampling parameters, and the sequences generating for it."""

    # Every attribute is state (tests/test_state.py checks that ``state_dict`` has them all).
    # Token rules come back from the params; a grammar state catches up with its tokens.
    DERIVED = ("rules", "grammar_states")

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
        # Token rules (``jpaged.host.token_rules.TokenRules``, set by the engine; False:
        # none) and each sequence's grammar position, by seq_id (rebuilt from its tokens
        # when missing).
        self.rules = None
        self.grammar_states: dict = {}
        # Filled position by position by the prefill steps (entry 0 stays None).
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            None if params.prompt_logprobs is None else [None] * len(prompt_token_ids))
        self.finished = False
        self.error: str | None = None   # why it finished with reason "error"

    def state(self) -> tuple:
        """What a step may change of this request, for ``restore`` if the step fails
        (``jpaged.host.journal``): O(its streams). Lists only grow in a step, so their
        lengths are kept; every other field of the request's streams and metrics is kept
        whatever it is, so a field added to them later is covered. The engine records a
        request of one sampled sequence more cheaply (``Stream.record``, and the request's
        own fields as they change): see ``LLMEngine._journal_requests``."""
        return (self.finished, self.error, len(self.hypotheses), vars(self.metrics).copy(),
                self.seqs.copy(), self.streams.copy(),
                [(stream, vars(stream).copy(), len(stream.logprobs),
                  stream.decoder and stream.decoder.snapshot())
                 for stream in self.streams.values()])

    def restore(self, state: tuple) -> None:
        self.finished, self.error, hypotheses, metrics, seqs, streams, stream_states = state
        del self.hypotheses[hypotheses:]
        vars(self.metrics).update(metrics)
        self.seqs.clear()
        self.seqs.update(seqs)
        self.streams.clear()
        self.streams.update(streams)
        for stream, fields, logprobs, position in stream_states:
            del stream.logprobs[logprobs:]
            vars(stream).update(fields)   # the decoder object too, back to its position
            if position is not None:
                stream.decoder.restore(position)

    def state_dict(self, clock: float) -> dict:
        """Every attribute as plain values; the sequences as the objects themselves (a
        sequence is shared with the scheduler: the caller writes each once). Times become
        ages at ``clock`` (``time.perf_counter`` is per process)."""
        metrics = dataclasses.asdict(self.metrics)
        for stream in self.streams.values():
            stream.current_text()   # the decoder's text into the state
        for name in TIMES:
            if metrics[name] is not None:
                metrics[name] -= clock
        return {"request_id": self.request_id, "prompt": self.prompt,
                "prompt_token_ids": list(self.prompt_token_ids),
                "params": dataclasses.asdict(self.params), "seeds": list(self.seeds),
                "metrics": metrics, "finished": self.finished,
                "streams": {seq_id: dataclasses.asdict(s) for seq_id, s in self.streams.items()},
                "seqs": dict(self.seqs), "hypotheses": list(self.hypotheses),
                "error": self.error,
                "prompt_logprobs": None if self.prompt_logprobs is None else [
                    e and {t: dataclasses.asdict(lp) for t, lp in e.items()}
                    for e in self.prompt_logprobs]}

    @classmethod
    def from_state(cls, state: dict, clock: float) -> "Request":
        """The request ``state_dict(...)`` describes, its ages turned back into times at
        ``clock``. ``SamplingParams`` validates the parameters; the sequences are those
        of ``state`` (the caller rebuilt them)."""
        request = cls(state["request_id"], state["prompt"], list(state["prompt_token_ids"]),
                      SamplingParams(**state["params"]), list(state["seeds"]), 0.0)
        if not isinstance(request.request_id, str) or not isinstance(
                request.prompt, (str, type(None))) or not all(
                isinstance(s, int) for s in request.seeds):
            raise ValueError(f"request {request.request_id!r}: malformed id or seeds")
        request.metrics = RequestMetrics(**state["metrics"])
        for name in TIMES:
            if getattr(request.metrics, name) is not None:
                setattr(request.metrics, name, getattr(request.metrics, name) + clock)
        request.finished = bool(state["finished"])
        request.error = state.get("error")
        request.streams = {seq_id: Stream(**s) for seq_id, s in state["streams"].items()}
        for seq_id, stream in request.streams.items():
            if not (isinstance(stream.index, int) and 0 <= stream.index < len(request.seeds)
                    and isinstance(stream.seed, int)
                    and isinstance(stream.cumulative_logprob, (int, float))
                    and isinstance(stream.logprobs, list)
                    and isinstance(stream.text, (str, type(None)))):
                raise ValueError(f"request {request.request_id!r}: stream {seq_id!r} is "
                                 f"malformed ({str(stream)[:100]})")
        request.seqs = dict(state["seqs"])
        request.hypotheses = [(float(score), seq) for score, seq in state["hypotheses"]]
        if state.get("prompt_logprobs") is not None:
            request.prompt_logprobs = [e and {int(t): Logprob(**lp) for t, lp in e.items()}
                                       for e in state["prompt_logprobs"]]
        if (set(request.streams) - set(request.seqs) or len(request.seeds) < max(
                (s.index + 1 for s in request.streams.values()), default=0)):
            raise ValueError(f"request {request.request_id!r}: its streams and sequences "
                             f"disagree")
        return request

    @property
    def beam_width(self) -> int:
        return self.params.num_sequences if self.params.use_beam_search else 0

    def sampled_completions(self) -> list[CompletionOutput]:
        """The ``n`` samples so far, in index order (requests without beam search)."""
        outputs = []
        for seq_id, stream in sorted(self.streams.items(), key=lambda kv: kv[1].index):
            seq = self.seqs[seq_id]
            tokens, reason = seq.output_token_ids, seq.finish_reason
            if tokens and tokens[-1] == PLACEHOLDER:   # still on the device: not done yet
                tokens.pop()
                reason = None
            outputs.append(CompletionOutput(
                stream.index, tokens, stream.current_text(), stream.cumulative_logprob,
                stream.logprobs if self.params.logprobs is not None else None,
                reason, stream.stop_reason))
        return outputs


def finished_copy(seq: Sequence, seq_id: str, token: int, reason: str) -> Sequence:
    """A finished copy of ``seq`` (which has just appended a token) ending on ``token``
    instead: a completed sample or beam hypothesis that holds no pages."""
    done = Sequence(seq_id, seq.token_ids[:-1] + [token], seq.max_tokens,
                    request_id=seq.request_id)
    done.num_prompt_tokens = seq.num_prompt_tokens
    done.status, done.finish_reason = SequenceStatus.FINISHED, reason
    return done


PROMPT_KEYS = ("prompt", "prompt_token_ids")


def prompt_token_ids(prompt, tokenizer) -> tuple[str | None, list[int]]:
    """``(text or None, token ids)`` of a prompt: a string (encoded with ``tokenizer``), a
    list / array of token ids, or vLLM's prompt dict: ``{"prompt": text}`` or
    ``{"prompt_token_ids": ids}`` (both: the ids, with the text they came from). Raises
    ValueError for anything else."""
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - set(PROMPT_KEYS))
        if unknown or not prompt:
            raise ValueError(f"a prompt dict holds {' and/or '.join(PROMPT_KEYS)}; "
                             f"{', '.join(unknown) or 'neither'} is not supported")
        if "prompt_token_ids" not in prompt:
            if not isinstance(prompt["prompt"], str):
                raise ValueError(f"prompt must be a string, got "
                                 f"{type(prompt['prompt']).__name__}")
            return prompt_token_ids(prompt["prompt"], tokenizer)
        ids = prompt["prompt_token_ids"]
        if isinstance(ids, str):
            raise ValueError("prompt_token_ids must be a list of token ids, got a string")
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        return text, prompt_token_ids(ids, None)[1]
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
