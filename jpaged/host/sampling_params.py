"""Sampling parameters: what a user passes with a request, validated when built (host side,
no JAX). The device sampler that reads them is `jpaged.engine.sampler`."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import numpy as np


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
    "min_tokens": "jpaged has no minimum length: a stop token ends a sequence at once",
    "bad_words": "jpaged cannot ban words while sampling",
    "allowed_token_ids": "jpaged cannot restrict sampling to a set of tokens",
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


def derive_seed(seed: int, index: int) -> int:
    """The 32-bit seed of stream ``index`` (a request's sample, a batch row) from ``seed``:
    the same pair always gives the same seed, different indices independent ones."""
    # SeedSequence takes non-negative entropy; the modulus keeps -1 and 1 apart.
    return int(np.random.SeedSequence(int(seed) % 2**64, spawn_key=(index,))
               .generate_state(1)[0])
