"""Token rules: what a request allows or biases before each token is sampled (host side,
no JAX).

``logit_bias``, ``min_tokens`` (EOS and stop ids banned until that many tokens) and
``bad_words`` become a short list of ``(token id, bias)`` per row and step, a banned token
getting -inf; ``allowed_token_ids`` and a structured-output grammar become a bitmask of
the vocabulary (bit ``t % 32`` of word ``t // 32`` set: token t allowed), xgrammar's
layout. The batch builder pads both into ``SamplingTensors`` and the jitted sampler
adds the bias and masks the logits on the device (``jpaged.engine.sampler``); the host
only advances the grammar between steps.
"""

from __future__ import annotations

import numpy as np

from jpaged.host.grammar import GrammarCompiler, GrammarState
from jpaged.host.sampling_params import SamplingParams

BITS = 32


def mask_width(vocab_size: int) -> int:
    """int32 words of a token bitmask over ``vocab_size`` tokens."""
    return -(-vocab_size // BITS)


def token_bitmask(token_ids, vocab_size: int) -> np.ndarray:
    """``int32[mask_width(vocab_size)]`` with the bits of ``token_ids`` set."""
    ids = np.asarray(sorted(set(token_ids)), np.int64)
    words = np.zeros(mask_width(vocab_size), np.uint32)
    np.bitwise_or.at(words, ids // BITS, (np.uint32(1) << (ids % BITS).astype(np.uint32)))
    return words.view(np.int32)


ALLOW_ALL = -1   # an int32 word with every bit set


class TokenRules:
    """The token rules of one request, checked against the vocabulary when built.

    vocab_size: the model's; eos_token_ids: the model's EOS ids (banned with the stop ids
    until ``min_tokens``); tokenizer: encodes ``bad_words``; grammars: a
    ``GrammarCompiler`` for structured outputs (None: refused). Raises ValueError naming
    a token id outside the vocabulary or a constraint the grammar engine rejects.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, eos_token_ids=(),
                 tokenizer=None, grammars: GrammarCompiler | None = None):
        self.vocab_size = vocab_size
        bias = params.logit_bias or {}
        self._check_ids("logit_bias", bias)
        self.bias = sorted(bias.items())
        self.min_tokens = params.min_tokens
        self.stop_ids = sorted(set(params.stop_token_ids) | (
            set() if params.ignore_eos else set(eos_token_ids)))
        self.bad_words = self._encode_bad_words(params.bad_words or [], tokenizer)
        self.allowed = None
        if params.allowed_token_ids is not None:
            self._check_ids("allowed_token_ids", params.allowed_token_ids)
            self.allowed = token_bitmask(params.allowed_token_ids, vocab_size)
        self.grammar = None
        if params.guided is not None:
            if grammars is None:
                raise ValueError(f"guided_{params.guided[0]} needs a tokenizer (structured "
                                 f"outputs constrain text); this model has none")
            self.grammar = grammars.compile(*params.guided)

    def _check_ids(self, name: str, ids) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")

    def _encode_bad_words(self, words: list[str], tokenizer) -> list[tuple[int, ...]]:
        """Each word's token ids, alone and after a space (vLLM bans both spellings)."""
        if words and tokenizer is None:
            raise ValueError(f"bad_words={words!r} needs a tokenizer; this model has none")
        encoded = {tuple(tokenizer.encode(text, add_special_tokens=False).ids)
                   for word in words for text in (word, " " + word)}
        return sorted(ids for ids in encoded if ids)

    @property
    def needs_mask(self) -> bool:
        return self.allowed is not None or self.grammar is not None

    def new_state(self) -> GrammarState | None:
        """A sequence's grammar position (None without a grammar)."""
        return None if self.grammar is None else GrammarState(self.grammar)

    def bias_entries(self, output_token_ids: list[int]) -> list[tuple[int, float]]:
        """``(token id, bias)`` for the next token of a sequence that generated
        ``output_token_ids``: the logit bias, then -inf for the banned tokens."""
        entries = list(self.bias)
        if len(output_token_ids) < self.min_tokens:
            entries += [(t, -np.inf) for t in self.stop_ids]
        for word in self.bad_words:
            prefix = list(word[:-1])
            if not prefix or output_token_ids[len(output_token_ids) - len(prefix):] == prefix:
                entries.append((word[-1], -np.inf))
        return entries

    def mask(self, state: GrammarState | None, output_token_ids: list[int]) -> np.ndarray | None:
        """The allowed tokens ``int32[W]`` for the next token (None: all), the grammar
        first caught up with ``output_token_ids``."""
        if not self.needs_mask:
            return None
        mask = np.full(mask_width(self.vocab_size), ALLOW_ALL, np.int32)
        if state is not None:
            state.advance(output_token_ids)
            state.fill(mask)
        if self.allowed is not None:
            mask &= self.allowed
        return mask
