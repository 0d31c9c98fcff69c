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
        """Detokenize ``seq``'s output into ``stream.text`` (cut before a stop string, or
        after it with ``include_stop_str_in_output``) and say whether its last token or
        its text stops it; ``stream.stop_reason`` names the stop token id or string."""
        token = seq.token_ids[-1]
        stop = self.is_stop_token(params, token)
        if stop and token in params.stop_token_ids:
            stream.stop_reason = token
        if self.tokenizer is not None:
            stream.text = self.decode(seq.output_token_ids, params)
            for s in params.stop:
                at = stream.text.find(s)
                if at >= 0:
                    end = at + len(s) if params.include_stop_str_in_output else at
                    stream.text, stop, stream.stop_reason = stream.text[:end], True, s
                    break
        return stop
