"""Stop rules: when a generated sequence ends with reason "stop". Host only.

Text is decoded incrementally (``jpaged.host.detokenizer``) and stop strings are searched
only in the new text plus the last ``len(longest stop) - 1`` characters before it, so a
step costs the same at any output length.
"""

from __future__ import annotations

from jpaged.host.detokenizer import DecodeState, Detokenizer
from jpaged.host.request import Stream
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.sequence import Sequence, SequenceStatus

FINISHED = SequenceStatus.FINISHED


class StopRules:
    """EOS ids (unless ``ignore_eos``), a request's stop token ids, and its stop strings
    (which need a tokenizer: the text is cut before the stop string)."""

    def __init__(self, eos_token_ids, tokenizer=None):
        self.eos_token_ids = set(eos_token_ids or ())
        self.tokenizer = tokenizer
        self.detokenizer = None if tokenizer is None else Detokenizer(tokenizer)

    def is_stop_token(self, params: SamplingParams, token: int) -> bool:
        return token in params.stop_token_ids or (not params.ignore_eos
                                                  and token in self.eos_token_ids)

    def decode(self, token_ids: list[int]) -> str | None:
        return None if self.detokenizer is None else self.detokenizer.decode(token_ids)

    def check(self, params: SamplingParams, seq: Sequence, stream: Stream) -> bool:
        """``check_all`` for one sequence."""
        return self.check_all([(params, seq, stream)])[0]

    def check_all(self, rows: list[tuple[SamplingParams, Sequence, Stream]],
                  ends: list[int] | None = None) -> list[bool]:
        """Detokenize each sequence's new tokens into its ``stream`` (the text cut before
        a stop string) and say whether its last token or its text stops it. ``ends``: how
        many of each sequence's tokens to look at (async scheduling: a placeholder may
        follow); default all. A sequence whose end is final (it stops here, or it is
        finished and nothing follows) gets its held-back text too."""
        if ends is None:
            ends = [len(seq.token_ids) for _, seq, _ in rows]
        stops = [self.is_stop_token(p, seq.token_ids[end - 1])
                 for (p, seq, _), end in zip(rows, ends)]
        if self.detokenizer is None or not rows:
            return stops
        states = [stream.decoding() for _, _, stream in rows]
        news = self.detokenizer.step(states, [
            seq.token_ids[seq.num_prompt_tokens + state.fed:end]
            for (_, seq, _), state, end in zip(rows, states, ends)])
        for i, ((params, seq, _), state, new) in enumerate(zip(rows, states, news)):
            if stops[i] or (seq.status is FINISHED and ends[i] == len(seq.token_ids)):
                new += self.detokenizer.flush(state)
            stops[i] = _find_stop(params.stop, state, new) or stops[i]
        return stops


def _find_stop(stop: list[str], state: DecodeState, new: str) -> bool:
    """Append ``new`` to ``state``'s text; if a stop string now appears, cut the text
    before its first occurrence and return True. Only ``new`` and the characters before it
    that a stop string could share with it are searched."""
    if not stop:
        state.emit(new, 0)
        return False
    keep = max(map(len, stop)) - 1
    region = state.tail + new
    found = [at for at in (region.find(s) for s in stop) if at >= 0]
    if not found:
        state.emit(new, keep)
        return False
    before = len(state.text) - len(state.tail)   # where `region` starts in the text
    state.emit(new, keep)
    state.cut(state.text[:before + min(found)])
    return True
