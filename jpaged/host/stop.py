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

    def decode(self, token_ids: list[int], params: SamplingParams | None = None
               ) -> str | None:
        """The text of ``token_ids`` as ``params`` asks (``detokenize``,
        ``skip_special_tokens``); None without a tokenizer, "" without detokenizing."""
        if self.tokenizer is None:
            return None
        if params is None:
            return self.tokenizer.decode(token_ids)
        if not params.detokenize:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)

    def check(self, params: SamplingParams, seq: Sequence, stream: Stream) -> bool:
        """``check_all`` for one sequence."""
        return self.check_all([(params, seq, stream)])[0]

    def check_all(self, rows: list[tuple[SamplingParams, Sequence, Stream]],
                  ends: list[int] | None = None) -> list[bool]:
        """Detokenize each sequence's new tokens into its ``stream`` (the text cut before
        a stop string, or after it with ``include_stop_str_in_output``) and say whether
        its last token or its text stops it; ``stream.stop_reason`` names the stop token
        id or string. ``ends``: how many of each sequence's tokens to look at (async
        scheduling: a placeholder may follow); default all. A sequence whose end is
        final (it stops here, or it is finished and nothing follows) gets its held-back
        text too."""
        if ends is None:
            ends = [len(seq.token_ids) for _, seq, _ in rows]
        stops = []
        for (params, seq, stream), end in zip(rows, ends):
            token = seq.token_ids[end - 1]
            stops.append(self.is_stop_token(params, token))
            if stops[-1] and token in params.stop_token_ids:
                stream.stop_reason = token
        if self.detokenizer is None:
            return stops
        decoding = []
        for i, (params, seq, stream) in enumerate(rows):
            if params.detokenize:
                decoding.append(i)
            else:
                stream.text = ""
        if not decoding:
            return stops
        states = [rows[i][2].decoding(rows[i][0].skip_special_tokens) for i in decoding]
        news = self.detokenizer.step(states, [
            rows[i][1].token_ids[rows[i][1].num_prompt_tokens + state.fed:ends[i]]
            for i, state in zip(decoding, states)])
        for i, state, new in zip(decoding, states, news):
            params, seq, stream = rows[i]
            if stops[i] or (seq.status is FINISHED and ends[i] == len(seq.token_ids)):
                new += self.detokenizer.flush(state)
            found = _find_stop(params, state, new)
            if found is not None:
                stops[i], stream.stop_reason = True, found
        return stops


def _find_stop(params: SamplingParams, state: DecodeState, new: str) -> str | None:
    """Append ``new`` to ``state``'s text; if a stop string now appears, cut the text
    before its first occurrence (after it with ``include_stop_str_in_output``) and return
    it. Only ``new`` and the characters before it that a stop string could share with it
    are searched."""
    if not params.stop:
        state.emit(new, 0)
        return None
    keep = max(map(len, params.stop)) - 1
    region = state.tail + new
    found = min(((at, s) for s in params.stop if (at := region.find(s)) >= 0), default=None)
    before = len(state.text) - len(state.tail)   # where `region` starts in the text
    state.emit(new, keep)
    if found is None:
        return None
    at, stop = found
    end = at + len(stop) if params.include_stop_str_in_output else at
    state.cut(state.text[:before + end])
    return stop
