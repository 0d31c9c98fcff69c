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
        eos, decode = self.eos_token_ids, self.detokenizer is not None
        stops, decoding, states, new_ids = [], [], [], []
        for i, (params, seq, stream) in enumerate(rows):
            token_ids = seq.token_ids
            end = len(token_ids) if ends is None else ends[i]
            token = token_ids[end - 1]
            if token in params.stop_token_ids:
                stops.append(True)
                stream.stop_reason = token
            else:
                stops.append(not params.ignore_eos and token in eos)
            if not decode:
                continue
            if not params.detokenize:
                stream.text = ""
                continue
            state = stream.decoder or stream.decoding(
                params.skip_special_tokens, max(map(len, params.stop), default=1) - 1)
            decoding.append(i)
            states.append(state)
            new_ids.append(token_ids[seq.num_prompt_tokens + state.fed:end])
        if not decoding:
            return stops
        detokenizer = self.detokenizer
        for i, state, new in zip(decoding, states, detokenizer.step(states, new_ids)):
            params, seq, stream = rows[i]
            if stops[i] or (seq.status is FINISHED
                            and (ends is None or ends[i] == len(seq.token_ids))):
                new += detokenizer.flush(state)
            if not params.stop:
                state.emit(new)
            elif new:
                found = _find_stop(params, state, new)
                if found is not None:
                    stops[i], stream.stop_reason = True, found
        return stops


def _find_stop(params: SamplingParams, state: DecodeState, new: str) -> str | None:
    """Append ``new`` to ``state``'s text; if a stop string now appears, cut the text
    before its first occurrence (after it with ``include_stop_str_in_output``) and return
    it. Only ``new`` and the characters before it that a stop string could share with it
    (``state.tail``, ``len(longest stop) - 1`` of them) are searched."""
    region = state.tail + new
    for s in params.stop:   # the common case: none appears
        if s in region:
            break
    else:
        state.emit(new)
        return None
    at, stop = min((at, s) for s in params.stop if (at := region.find(s)) >= 0)
    state.emit(new)
    # `region` ends where the text ends.
    text = state.text
    end = len(text) - len(region) + at + (len(stop) if params.include_stop_str_in_output
                                          else 0)
    state.cut(text[:end])
    return stop
