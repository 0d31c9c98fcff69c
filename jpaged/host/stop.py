"""Stop rules: when a generated sequence ends with reason "stop". Host only."""

from __future__ import annotations

from jpaged.host.request import Stream
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.sequence import Sequence


class StopRules:
    """EOS ids (unless ``ignore_eos``), a request's stop token ids, and its stop strings
    (which need a tokenizer: the text is cut before the stop string)."""

    def __init__(self, eos_token_ids, tokenizer=None):
        self.eos_token_ids = set(eos_token_ids or ())
        self.tokenizer = tokenizer

    def is_stop_token(self, params: SamplingParams, token: int) -> bool:
        return token in params.stop_token_ids or (not params.ignore_eos
                                                  and token in self.eos_token_ids)

    def decode(self, token_ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def check(self, params: SamplingParams, seq: Sequence, stream: Stream) -> bool:
        """Detokenize ``seq``'s output into ``stream.text`` (cut before a stop string) and
        say whether its last token or its text stops it."""
        stop = self.is_stop_token(params, seq.token_ids[-1])
        if self.tokenizer is not None:
            stream.text = self.decode(seq.output_token_ids)
            for s in params.stop:
                at = stream.text.find(s)
                if at >= 0:
                    stream.text, stop = stream.text[:at], True
                    break
        return stop
