"""Incremental detokenization: each generated sequence's text grows by the text of its new
tokens only, decoded in a short window, for all of a step's sequences in one batched call.
Host only: no JAX.

Why a window and not the whole output: decoding a sequence's whole output every step
costs O(length) per step, O(length**2) per sequence. Why not
``tokenizers.decoders.DecodeStream``: it raises once a decoder rewrites text it already
returned (``ByteFallback`` turns a run of byte tokens ``<0xE4><0x41>`` into one U+FFFD
per token, so ``"A"`` from ``<0x41>`` alone becomes ``"\\ufffd"`` when a byte token
follows), and it decodes one sequence per Python call.

The scheme (vLLM's prefix offsets, with a check): a stream keeps a window of its last
tokens and the text ``window_text`` that decoding the window gave when text was last
emitted. After new tokens, the window is decoded again; when the result extends
``window_text`` and is complete (it does not end with U+FFFD, a partial UTF-8
character, and its last token is not a byte-fallback token that a next byte could
rewrite) the difference is emitted. Otherwise the text is held back until it is. A
window starts at a point where earlier text was emitted, so decoder rules that look at
the first token (``Metaspace``'s leading space, ``Strip``) act alike on ``window_text``
and on the new decode; the window moves forward only when decoding its new start alone
gives exactly the text it had there, and stays under ``max_window`` tokens otherwise.

So, at every step, a stream's text is a prefix of the full decode of its tokens
(special tokens skipped, as ``Tokenizer.decode`` does by default), shorter only by a
held-back incomplete end, and equal to it once ``flush`` has run at the end.
"""

from __future__ import annotations

import os
import re

# Window length that makes a stream try to move its window's start forward.
MAX_WINDOW = 8
# A stream's text pieces are joined into one string every this many: a long output is
# then a few objects, not one per token (what every object on the heap costs the steps
# and the garbage collector), for one copy of its text per this many tokens.
JOIN_PIECES = 64
REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class DecodeState:
    """One stream's decoding state and its text so far.

    window: its last token ids (special tokens left out if ``skip_special_tokens``, as
    ``Tokenizer.decode`` does by default); window_text: the decode of
    ``window[:read]``, whose end is the end of the emitted text; start_chars: where, in
    ``window_text``, the text of ``window[start:]`` begins, for the window's next start
    ``start``; fed: output tokens consumed so far (including special ones).
    """

    __slots__ = ("window", "window_text", "read", "start", "start_chars", "fed", "_pieces",
                 "tail", "skip_special_tokens", "keep")

    def __init__(self, skip_special_tokens: bool = True, keep: int = 0):
        self.skip_special_tokens = skip_special_tokens
        self.keep = keep   # characters of text kept in ``tail`` (stop strings' overlap)
        self.window: list[int] = []
        self.window_text = ""
        self.read = 0
        self.start = 0
        self.start_chars = 0
        self.fed = 0
        self._pieces: list[str] = []
        self.tail = ""   # the last characters of the text, for stop strings split across steps

    @property
    def text(self) -> str:
        """The text emitted so far (joined on demand: appending stays O(new text))."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def emit(self, new: str) -> None:
        """Append ``new`` to the text, keeping its last ``keep`` characters in ``tail``."""
        if new:
            self._pieces.append(new)
            if len(self._pieces) >= JOIN_PIECES:   # a new list: snapshots keep the old one
                self._pieces = ["".join(self._pieces)]
            if self.keep:
                self.tail = (self.tail + new)[-self.keep:]

    def cut(self, text: str) -> None:
        """Replace the text (a stop string cut it)."""
        self._pieces = [text]

    def snapshot(self) -> tuple:
        """Where this state stands, for ``restore`` (an undo record): O(1). Its lists
        only grow in place or are replaced, so their objects and lengths suffice."""
        return (self.window, len(self.window), self.window_text, self.read, self.start,
                self.start_chars, self.fed, self._pieces, len(self._pieces), self.tail)

    def restore(self, snapshot: tuple) -> None:
        (self.window, window, self.window_text, self.read, self.start, self.start_chars,
         self.fed, self._pieces, pieces, self.tail) = snapshot
        del self.window[window:]
        del self._pieces[pieces:]


class Detokenizer:
    """Decodes the new tokens of many streams per call, with a ``tokenizers.Tokenizer``
    (anything with ``decode_batch``, ``get_vocab`` and ``get_added_tokens_decoder`` of
    that class works)."""

    def __init__(self, tokenizer, max_window: int = MAX_WINDOW):
        # The windows are a few tokens each: splitting a batch of them over the
        # tokenizers library's thread pool gains nothing, and where the cores are busy
        # (the JAX runtime's threads, a shared machine) its threads waiting for a core made
        # a batch of 256 windows 4-7x slower (benchmarks/host_overhead.py). The library
        # reads this variable at each call; one the user set is kept.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.tokenizer = tokenizer
        self.max_window = max_window
        added = tokenizer.get_added_tokens_decoder()
        self.special = frozenset(i for i, token in added.items() if token.special)
        self.byte_tokens = frozenset(i for token, i in tokenizer.get_vocab().items()
                                     if _BYTE_TOKEN.fullmatch(token))

    def _decode_batch(self, windows: list[list[int]]) -> list[str]:
        # Special tokens never reach a window that skips them: one call decodes all.
        try:
            return self.tokenizer.decode_batch(windows, skip_special_tokens=False)
        except Exception as error:
            raise ValueError(f"the tokenizer failed to decode token ids "
                             f"{windows[:4]}...: {error!r}") from error

    def step(self, states: list[DecodeState], new_ids: list[list[int]]) -> list[str]:
        """Feed each stream its new token ids; returns each stream's new text ("" while
        held back)."""
        special, byte_tokens = self.special, self.byte_tokens
        for state, ids in zip(states, new_ids):
            state.fed += len(ids)
            state.window += ([t for t in ids if t not in special]
                             if special and state.skip_special_tokens else ids)
        texts = self._decode_batch([s.window for s in states])
        out, moving = [], []
        for state, text in zip(states, texts):
            window, done = state.window, state.window_text
            if (len(window) > state.read and len(text) > len(done)
                    and text[-1] != REPLACEMENT
                    and window[-1] not in byte_tokens and text.startswith(done)):
                out.append(text[len(done):])
                # The old end of the emitted text is a safe next start for the window.
                state.start, state.start_chars = state.read, len(done)
                state.window_text, state.read = text, len(window)
                if len(window) > self.max_window and state.start:
                    moving.append(state)
            else:
                out.append("")
        if moving:
            self._move(moving)
        return out

    def _move(self, states: list[DecodeState]) -> None:
        """Start each window at its ``start`` where decoding from there alone gives the
        same text as in context (else keep the longer window and try again later)."""
        texts = self._decode_batch([s.window[s.start:] for s in states])
        for state, text in zip(states, texts):
            if text == state.window_text[state.start_chars:]:
                state.window = state.window[state.start:]
                state.read -= state.start
                state.window_text, state.start, state.start_chars = text, 0, 0

    def flush(self, state: DecodeState) -> str:
        """The held-back end of a finished stream's text (a partial character stays as
        U+FFFD, as in a full decode)."""
        if state.read == len(state.window):
            return ""
        text = self._decode_batch([state.window])[0]
        if not text.startswith(state.window_text):
            # A decoder that rewrote emitted text: nothing to append consistently.
            return ""
        new = text[len(state.window_text):]
        state.window_text, state.read = text, len(state.window)
        return new
