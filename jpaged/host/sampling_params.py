"""Sampling parameters: what a user passes with a request, validated when built (host side,
no JAX). The device sampler that reads them is `jpaged.engine.sampler`."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import numpy as np

# The most top alternatives ``prompt_logprobs`` may ask for per prompt token (vLLM's
# default ``max_logprobs``): each costs a column of every scored token's top-k.
MAX_PROMPT_LOGPROBS = 20


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(name: str, value) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# vLLM's SamplingParams options jpaged does not have, and why; any other unknown keyword
# is refused too (a ValueError, as every bad value).
UNSUPPORTED = {
    "logits_processors": "jpaged samples on the device and runs no Python logits processors",
    "output_kind": "jpaged reports cumulative outputs only",
    "extra_args": "jpaged has no sampling extensions to pass arguments to",
}


@dataclasses.dataclass
class SamplingParams:
    """How to generate the continuations of one request (host side), with vLLM's names and
    defaults.

    temperature 0 is greedy; top_k -1 or 0, top_p 1, min_p 0, repetition_penalty 1 and the
    other penalties 0 are off. ``max_tokens`` None runs to the context (``max_model_len``).
    ``stop`` is normalized to a list of strings; ``include_stop_str_in_output`` keeps the
    stop string at the end of the text. ``logprobs`` asks for that many top logprobs per
    generated token besides the sampled token's. ``best_of or n`` sequences are generated
    (the beam width under beam search) and the best ``n`` returned. ``seed`` fixes the
    output; without it the engine draws one. ``detokenize`` False leaves the text empty
    (token ids only); ``skip_special_tokens`` drops special tokens from the text;
    ``truncate_prompt_tokens`` keeps only the prompt's last that many tokens.
    ``prompt_logprobs`` asks for the logprob of every prompt token after the first and
    that many top alternatives (at most ``MAX_PROMPT_LOGPROBS``), computed in the prefill.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_json_object: bool = False
    structured_outputs: "StructuredOutputsParams | dict | None" = None

    def __post_init__(self):
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens)
            _check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        self.temperature = _number("temperature", self.temperature)
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        self.top_k = _integer("top_k", self.top_k)
        _check(self.top_k >= -1, f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        self.top_p = _number("top_p", self.top_p)
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        self.min_p = _number("min_p", self.min_p)
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty)
        _check(self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self.presence_penalty = _number("presence_penalty", self.presence_penalty)
        self.frequency_penalty = _number("frequency_penalty", self.frequency_penalty)
        self.stop = self._stop_strings(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got "
                             f"{self.stop_token_ids!r}")
        self.stop_token_ids = [_integer("stop_token_ids", t) for t in self.stop_token_ids]
        _check(all(t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        self.n = _integer("n", self.n)
        _check(self.n >= 1, f"n must be >= 1, got {self.n}")
        if self.best_of is not None:
            self.best_of = _integer("best_of", self.best_of)
            _check(self.best_of >= self.n,
                   f"best_of must be >= n={self.n}, got {self.best_of}")
        self.use_beam_search = _flag("use_beam_search", self.use_beam_search)
        self.ignore_eos = _flag("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            self.logprobs = _integer("logprobs", self.logprobs)
            _check(self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}")
        self.length_penalty = _number("length_penalty", self.length_penalty)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _integer("prompt_logprobs", self.prompt_logprobs)
            _check(0 <= self.prompt_logprobs <= MAX_PROMPT_LOGPROBS,
                   f"prompt_logprobs must be in [0, {MAX_PROMPT_LOGPROBS}], got "
                   f"{self.prompt_logprobs}")
        self._check_token_rules()
        self._check_guided()
        for name in ("skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output", "detokenize"):
            setattr(self, name, _flag(name, getattr(self, name)))
        # Fast tokenizers (the only kind jpaged loads) join special tokens as their decoder
        # says, as Hugging Face's do: there is no spacing to turn off.
        _check(self.spaces_between_special_tokens, "spaces_between_special_tokens=False is "
               "not supported: jpaged's fast tokenizers decode special tokens as their "
               "decoder joins them")
        _check(self.detokenize or not self.stop, f"stop strings {self.stop} need "
               f"detokenize=True")
        if self.truncate_prompt_tokens is not None:
            self.truncate_prompt_tokens = _integer("truncate_prompt_tokens",
                                                   self.truncate_prompt_tokens)
            _check(self.truncate_prompt_tokens >= 1, f"truncate_prompt_tokens must be >= 1, "
                   f"got {self.truncate_prompt_tokens}")
        if self.use_beam_search:
            self._check_beam_search()

    def _check_token_rules(self) -> None:
        # Token ids are checked against the vocabulary when the engine adds the request.
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must map token ids to biases, got "
                                 f"{self.logit_bias!r}")
            bias = {}
            for token, value in self.logit_bias.items():
                if isinstance(token, str) and token.lstrip("-").isdigit():
                    token = int(token)   # JSON object keys are strings
                token, value = _integer("logit_bias token id", token), _number(
                    "logit_bias", value)
                _check(-100 <= value <= 100,
                       f"logit_bias of token {token} must be in [-100, 100], got {value}")
                bias[token] = value
            self.logit_bias = bias
        self.min_tokens = _integer("min_tokens", self.min_tokens)
        _check(0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
               f"min_tokens must be in [0, max_tokens={self.max_tokens}], got "
               f"{self.min_tokens}")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, "
                                 f"got {self.allowed_token_ids!r}")
            self.allowed_token_ids = [_integer("allowed_token_ids", t)
                                      for t in self.allowed_token_ids]
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(
                    isinstance(w, str) and w for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-empty strings, got "
                                 f"{self.bad_words!r}")
            self.bad_words = list(self.bad_words)

    def _check_guided(self) -> None:
        """One constraint at most; ``structured_outputs`` (vLLM's newer spelling) is
        copied into the ``guided_*`` fields. The grammar engine checks the schema, regex
        or grammar itself when the request is added."""
        if self.structured_outputs is not None:
            outputs = self.structured_outputs
            if isinstance(outputs, dict):
                outputs = StructuredOutputsParams(**outputs)
            if not isinstance(outputs, StructuredOutputsParams):
                raise ValueError(f"structured_outputs must be a StructuredOutputsParams or a "
                                 f"dict, got {outputs!r}")
            for name in ("json", "regex", "choice", "grammar"):
                value = getattr(outputs, name)
                if value is not None:
                    _check(getattr(self, "guided_" + name) is None,
                           f"guided_{name} and structured_outputs.{name} are both set")
                    setattr(self, "guided_" + name, value)
            self.guided_json_object = self.guided_json_object or bool(outputs.json_object)
            self.structured_outputs = None
        self.guided_json_object = _flag("guided_json_object", self.guided_json_object)
        if self.guided_json is not None and not isinstance(self.guided_json, (dict, str)):
            raise ValueError(f"guided_json must be a JSON schema (a dict or its JSON text), "
                             f"got {self.guided_json!r}")
        for name in ("guided_regex", "guided_grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.guided_choice is not None and (
                not isinstance(self.guided_choice, (list, tuple)) or not self.guided_choice
                or not all(isinstance(c, str) and c for c in self.guided_choice)):
            raise ValueError(f"guided_choice must be a non-empty list of non-empty strings, "
                             f"got {self.guided_choice!r}")
        kinds = [name for name in ("guided_json", "guided_regex", "guided_choice",
                                   "guided_grammar") if getattr(self, name) is not None]
        kinds += ["guided_json_object"] if self.guided_json_object else []
        _check(len(kinds) <= 1, f"at most one structured output constraint, got {kinds}")
        if kinds:
            _check(not self.ignore_eos, f"{kinds[0]} needs EOS to end the output: "
                                        f"ignore_eos must be False")

    @property
    def guided(self) -> tuple[str, object] | None:
        """``(kind, value)`` of the structured output constraint (kind "json", "regex",
        "choice", "grammar" or "json_object"), or None."""
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, "guided_" + kind)
            if value is not None:
                return kind, value
        return ("json_object", True) if self.guided_json_object else None

    @property
    def uses_token_rules(self) -> bool:
        """Whether the logits need this request's bias or token mask before sampling."""
        return bool(self.logit_bias or self.min_tokens or self.allowed_token_ids is not None
                    or self.bad_words or self.guided is not None)

    @staticmethod
    def _stop_strings(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ValueError(f"unknown stop type: stop must be None, a string or a list of "
                             f"strings, got {stop!r}")
        _check(all(stop), f"stop strings must be non-empty, got {stop!r}")
        return list(stop)

    def _check_beam_search(self) -> None:
        # Beam search is deterministic: a sampling knob would be silently ignored (as vLLM).
        for name, value, neutral in (("temperature", self.temperature, 0.0),
                                     ("top_p", self.top_p, 1.0), ("min_p", self.min_p, 0.0)):
            _check(value == neutral,
                   f"{name} must be {neutral} with use_beam_search, got {value}")
        _check(self.top_k in (-1, 0), f"top_k must be off with use_beam_search, got {self.top_k}")
        _check(not self.uses_token_rules, "logit_bias, min_tokens, allowed_token_ids, "
               "bad_words and structured outputs are not supported with use_beam_search")

    @property
    def num_sequences(self) -> int:
        """Sequences generated for this request: ``best_of or n`` (the beam width)."""
        return self.best_of or self.n

    @property
    def uses_penalties(self) -> bool:
        """Whether the sampler needs this request's token history."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)

    def sequence_seeds(self, rng: np.random.Generator) -> list[int]:
        """One 32-bit seed per generated sequence, kept by the sequence for its lifetime.

        Derived from ``seed`` when set (so the request repeats, and its ``n`` samples
        differ), else drawn from the engine's ``rng``.
        """
        if self.seed is None:
            return [int(s) for s in rng.integers(0, 2**32, size=self.num_sequences)]
        return [derive_seed(self.seed, i) for i in range(self.num_sequences)]


def _refuse_unknown_options(init):
    """``SamplingParams(...)`` with an option it does not have is a ValueError naming it
    (vLLM's reason when jpaged knows the option), not a TypeError."""

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        known = {field.name for field in dataclasses.fields(SamplingParams)}
        for name in kwargs:
            if name not in known:
                why = UNSUPPORTED.get(name, f"the options are {', '.join(sorted(known))}")
                raise ValueError(f"SamplingParams option {name}= is not supported: {why}")
        init(self, *args, **kwargs)

    return checked


SamplingParams.__init__ = _refuse_unknown_options(SamplingParams.__init__)


@dataclasses.dataclass
class StructuredOutputsParams:
    """vLLM's ``structured_outputs=``: one of json (a schema), regex, choice, grammar
    (EBNF) or json_object (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def derive_seed(seed: int, index: int) -> int:
    """The 32-bit seed of stream ``index`` (a request's sample, a batch row) from ``seed``:
    the same pair always gives the same seed, different indices independent ones."""
    # SeedSequence takes non-negative entropy; the modulus keeps -1 and 1 apart.
    return int(np.random.SeedSequence(int(seed) % 2**64, spawn_key=(index,))
               .generate_state(1)[0])
