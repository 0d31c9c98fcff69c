"""Structured outputs on the host: xgrammar compiles a JSON schema, regex, choice list or
EBNF grammar against the tokenizer's vocabulary, and a ``GrammarState`` per sequence says
which tokens may come next, as a bitmask the device applies to the logits.

Why xgrammar: it is maintained (vLLM's and SGLang's default backend), covers every
constraint vLLM accepts (JSON schema, regex, choice, EBNF grammars; outlines-core has no
context-free grammars), precomputes most of each mask when compiling, fills a mask in
microseconds into a plain int32 numpy array (DLPack), and reads the vocabulary of any
Hugging Face tokenizer (byte-level, byte-fallback or raw). It is an optional dependency
(``pip install jpaged[structured]``) imported only when a constrained request arrives;
it pulls in torch and transformers.
"""

from __future__ import annotations

import json

import numpy as np


def _xgrammar():
    try:
        import xgrammar
    except ImportError as error:
        raise ValueError("structured outputs need xgrammar: pip install "
                         "'jpaged[structured]'") from error
    return xgrammar


class GrammarCompiler:
    """Compiles constraints for one tokenizer and model vocabulary (compiled grammars are
    cached by xgrammar). eos_token_ids end a completed output: at least one is needed."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        if not eos_token_ids:
            raise ValueError("structured outputs need an EOS token to end the output; this "
                             "model has none")
        xgr = _xgrammar()
        if not hasattr(tokenizer, "backend_tokenizer"):   # a `tokenizers.Tokenizer`
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(eos_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, kind: str, value):
        """A compiled grammar for ``(kind, value)`` (see ``SamplingParams.guided``); a
        constraint the grammar engine rejects is a ValueError naming it."""
        compiler = self._compiler
        try:
            if kind == "json":
                schema = value if isinstance(value, str) else json.dumps(value)
                # Compact JSON: a weak model could otherwise emit whitespace forever.
                return compiler.compile_json_schema(schema, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(value)
            if kind == "choice":
                literals = " | ".join(json.dumps(c, ensure_ascii=False) for c in value)
                return compiler.compile_grammar(f"root ::= {literals}")
            if kind == "grammar":
                return compiler.compile_grammar(value)
        except Exception as error:   # noqa: BLE001 - xgrammar raises several types
            raise ValueError(f"guided_{kind}={str(value)[:200]!r} is rejected by the grammar "
                             f"engine: {str(error)[:300]}") from None
        raise ValueError(f"unknown structured output kind {kind!r}")


class GrammarState:
    """Where one sequence stands in its grammar: an xgrammar matcher that has accepted the
    sequence's first ``accepted`` generated tokens. It catches up lazily, so a preempted,
    restored or forked sequence needs no bookkeeping beyond its tokens."""

    def __init__(self, compiled):
        self._matcher = _xgrammar().GrammarMatcher(compiled)
        self.accepted = 0

    def advance(self, output_token_ids: list[int]) -> None:
        if len(output_token_ids) < self.accepted:   # never for a live sequence: rebuild
            self._matcher.reset()
            self.accepted = 0
        for token in output_token_ids[self.accepted:]:
            if not self._matcher.accept_token(int(token)):
                raise RuntimeError(f"token {token} breaks the grammar its mask allowed")
            self.accepted += 1

    def fill(self, mask: np.ndarray) -> None:
        """Clear in ``mask`` (``int32[W]``) the bits of the tokens the grammar forbids
        next."""
        allowed = np.zeros((1, mask.shape[0]), np.int32)
        self._matcher.fill_next_token_bitmask(allowed, 0)
        mask &= allowed[0]

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()
