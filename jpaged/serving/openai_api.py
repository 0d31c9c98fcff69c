"""OpenAI's HTTP protocol on top of jpaged's requests: no server, no JAX, no engine.

Request bodies (already parsed JSON) become prompts and ``SamplingParams``; a bad value
becomes a ``RequestError`` that renders as OpenAI's error body. Engine outputs become
OpenAI's completion / chat-completion objects and streaming chunks. Chat templates live
in ``jpaged.host.chat``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import time

from jpaged.host import chat
from jpaged.host.sampling_params import MAX_PROMPT_LOGPROBS, SamplingParams

# Sampling fields both endpoints take, under the same names in OpenAI / vLLM and jpaged.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos",
                   "use_beam_search", "length_penalty", "min_tokens", "logit_bias",
                   "allowed_token_ids", "bad_words", "guided_json", "guided_regex",
                   "guided_choice", "guided_grammar", "structured_outputs")
# Fields of OpenAI's or vLLM's requests that jpaged does not implement: refused by name
# (a 400), never silently ignored. Other unknown fields are ignored, as vLLM does.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call",
                      "parallel_tool_calls", "suffix", "prompt_embeds", "audio", "modalities",
                      "prediction", "web_search_options", "guided_decoding_backend",
                      "guided_whitespace_pattern", "structural_tag", "lora_request")


class RequestError(Exception):
    """A request the server refuses: rendered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = (
            message, param, code, status, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}",
                           code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got "
                           f"{type(body).__name__}", code="invalid_json")
    return body


def model_not_found(model, served_name: str) -> RequestError:
    """OpenAI's (and vLLM's) answer to an unknown model: a 404."""
    return RequestError(f"the model {model!r} does not exist; this server serves "
                        f"{served_name!r}", param="model", code="model_not_found", status=404)


def check_model(body: dict, served_name: str) -> None:
    model = body.get("model", served_name)
    if model != served_name:
        raise model_not_found(model, served_name)


def flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean, got {value!r}", param=name)
    return value


def check_supported(body: dict) -> None:
    """A 400 naming the first field jpaged does not implement (``tool_choice: "none"``
    asks for nothing and passes)."""
    for name in UNSUPPORTED_FIELDS:
        value = body.get(name)
        if value is None or value == [] or (name == "tool_choice" and value == "none"):
            continue
        raise RequestError(f"{name} is not supported by this server", param=name)


def check_context(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """A prompt plus ``max_tokens`` beyond the context is a 400 (as vLLM), not a silently
    shortened completion."""
    if num_prompt_tokens + max_tokens > max_model_len:
        raise RequestError(
            f"this model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{num_prompt_tokens} and max_tokens={max_tokens} asks for "
            f"{num_prompt_tokens + max_tokens}", param="max_tokens",
            code="context_length_exceeded")


def _response_format(body: dict) -> dict:
    """``response_format`` as guided fields: json_object, json_schema (its ``schema``) or
    text (no constraint)."""
    value = body.get("response_format")
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"guided_json_object": True}
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema") if isinstance(
            value.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise RequestError(f"response_format json_schema needs json_schema.schema, an "
                               f"object; got {value!r}"[:300], param="response_format")
        return {"guided_json": schema}
    raise RequestError(f"response_format type {kind!r} is not supported (text, json_object, "
                       f"json_schema)", param="response_format")


def _param_of(message: str, body) -> str | None:
    """The first field of ``body`` (a dict or names) that a ValueError's message names."""
    named = [(match.start(), name) for name in body
             if (match := re.search(rf"\b{re.escape(name)}\b", message))]
    return min(named)[1] if named else None


def add_error(error: ValueError) -> RequestError:
    """The 400 for a request the engine refused when adding it: the field its message
    names (a token id outside the vocabulary, a rejected schema), else the prompt."""
    return RequestError(str(error), param=_param_of(str(error), SAMPLING_FIELDS) or "prompt")


def sampling_params(body: dict, *, max_tokens: int | None, logprobs: int | None
                    ) -> SamplingParams:
    """The body's sampling fields as ``SamplingParams``; ``max_tokens`` and ``logprobs``
    come from the endpoint, which names them differently."""
    check_supported(body)
    fields = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    constraint = _response_format(body)
    guided = [name for name in fields if name.startswith("guided_") or name == "structured_outputs"]
    if constraint and guided:
        raise RequestError(f"response_format and {guided[0]} are both set",
                           param="response_format")
    fields.update(constraint)
    if body.get("stop") is not None:
        fields["stop"] = body["stop"]
    n = 1 if body.get("n") is None else body["n"]
    best_of = body.get("best_of")
    if best_of is not None and best_of != n and not fields.get("use_beam_search"):
        raise RequestError(f"best_of={best_of!r} differs from n={n!r}: best_of is supported "
                           f"with use_beam_search only", param="best_of")
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, n=n, best_of=best_of,
                              **fields)
    except (ValueError, TypeError) as error:
        raise RequestError(str(error), param=_param_of(str(error), body)) from None


def _count(body: dict, name: str, default=None, maximum: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (
            maximum is not None and value > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise RequestError(f"{name} must be an integer >= 0{bound}, got {value!r}", param=name)
    return value


def completion_request(body: dict) -> tuple[list, SamplingParams]:
    """``/v1/completions``: (prompts, each text or token ids; params). ``echo`` with
    ``logprobs`` asks for prompt logprobs; ``max_tokens: 0`` (with ``echo`` only) scores the
    prompt: one token is generated and dropped (``Renderer(echo=...)``)."""
    check_supported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) for t in p))
            for p in prompt):
        prompts = prompt
    else:
        raise RequestError(f"prompt must be a string, a list of token ids, or a non-empty list "
                           f"of either; got {prompt!r}"[:300], param="prompt")
    if any(isinstance(t, bool) for p in prompts if isinstance(p, list) for t in p):
        raise RequestError("prompt token ids must be integers, not booleans", param="prompt")
    echo = flag(body, "echo")
    max_tokens = _count(body, "max_tokens", 16)
    logprobs = _count(body, "logprobs", None)
    if max_tokens == 0 and not echo:
        raise RequestError("max_tokens=0 needs echo: true (scoring the prompt)",
                           param="max_tokens")
    if echo and flag(body, "stream"):
        raise RequestError("echo is not supported with stream", param="echo")
    if echo and flag(body, "use_beam_search"):
        raise RequestError("echo is not supported with use_beam_search", param="echo")
    if echo and logprobs is not None and logprobs > MAX_PROMPT_LOGPROBS:
        raise RequestError(f"logprobs={logprobs} with echo asks for prompt logprobs, at most "
                           f"{MAX_PROMPT_LOGPROBS}", param="logprobs")
    params = sampling_params(body, max_tokens=max(max_tokens, 1), logprobs=logprobs)
    if echo and logprobs is not None:
        params.prompt_logprobs = logprobs
    return prompts, params


def chat_params(body: dict, default_max_tokens: int) -> SamplingParams:
    """``/v1/chat/completions``: its sampling fields; ``default_max_tokens`` fills the
    context when the body sets no limit."""
    limit = _count(body, "max_completion_tokens", None)
    limit = _count(body, "max_tokens", limit)
    top = _count(body, "top_logprobs", None)
    if top is not None and not flag(body, "logprobs"):
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (top or 0) if flag(body, "logprobs") else None
    return sampling_params(body, max_tokens=default_max_tokens if limit is None else limit,
                           logprobs=logprobs)


def chat_messages(body: dict) -> list[dict]:
    """The body's messages (``jpaged.host.chat.chat_messages``)."""
    try:
        return chat.chat_messages(body.get("messages"))
    except ValueError as error:
        raise RequestError(str(error), param="messages") from None


# -- responses ---------------------------------------------------------------------------


def _prompt_only(output):
    """``output`` with its generated token dropped (``max_tokens: 0``: the engine generated
    one token to score the prompt)."""
    completions = [dataclasses.replace(c, token_ids=[], text="", cumulative_logprob=0.0,
                                       logprobs=None if c.logprobs is None else [],
                                       finish_reason="length") for c in output.outputs]
    return dataclasses.replace(output, outputs=completions)


FINISH_REASONS = {"stop": "stop", "length": "length"}


class ChoiceStream:
    """What one choice has sent so far. Text is held back while it may still change: a
    trailing partial UTF-8 character (U+FFFD) or the start of a stop string (the engine
    cuts the text there once the whole stop string appears)."""

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.text = ""
        self.num_tokens = 0
        self.finished = False

    def advance(self, completion) -> tuple[str, int, str | None]:
        """(new text, index of the first new token, finish reason when it just finished)."""
        text = completion.text or ""
        finish = completion.finish_reason
        if finish is None:
            text = text.rstrip("\ufffd")
            for s in self.stop:
                held = next((k for k in range(min(len(s) - 1, len(text)), 0, -1)
                             if text.endswith(s[:k])), 0)
                text = text[:len(text) - held]
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text += delta
        first, self.num_tokens = self.num_tokens, len(completion.token_ids)
        just_finished = finish is not None and not self.finished
        self.finished = finish is not None
        return delta, first, FINISH_REASONS.get(finish, "stop") if just_finished else None


class Renderer:
    """Builds OpenAI's response objects for one request (one ``id``, one ``created``)."""

    def __init__(self, kind: str, model: str, tokenizer, n: int, logprobs: int | None,
                 return_token_ids: bool, echo: bool = False, drop_output: bool = False):
        self.kind = kind   # "text_completion" or "chat.completion"
        self.id = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{os.urandom(12).hex()}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer
        self.n = n
        self.logprobs = logprobs
        self.return_token_ids = return_token_ids or tokenizer is None
        # Completions' echo: each choice starts with its prompt (and the prompt's logprobs);
        # drop_output (max_tokens 0) keeps only the prompt.
        self.echo = echo
        self.drop_output = drop_output

    def _token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _logprobs(self, completion, first: int, offset: int = 0, prompt=None):
        """The logprobs of tokens ``first:`` of ``completion`` in the endpoint's format;
        ``offset``: the characters of text before them (``text_offset`` counts on from
        there by each token's text, as vLLM's); ``prompt``: the ``RequestOutput`` whose
        prompt tokens and logprobs come first (echo; the first prompt token's are null)."""
        if self.logprobs is None or completion.logprobs is None:
            return None
        ids = completion.token_ids[first:]
        entries = completion.logprobs[first:len(completion.token_ids)]
        if self.kind == "text_completion":
            if prompt is not None:
                ids, entries = prompt.prompt_token_ids + ids, prompt.prompt_logprobs + entries
            tokens = [self._token(t) for t in ids]
            return {"tokens": tokens,
                    "token_logprobs": [e and e[t].logprob for t, e in zip(ids, entries)],
                    "top_logprobs": [e and {self._token(k): v for k, v in self._top(e)}
                                     for e in entries],
                    "text_offset": list(itertools.accumulate(
                        [len(t) for t in tokens[:-1]], initial=offset))[:len(tokens)]}
        return {"content": [{**self._chat_entry(t, e[t].logprob),
                             "top_logprobs": [self._chat_entry(k, v) for k, v in self._top(e)]}
                            for t, e in zip(ids, entries)]}

    def _top(self, entry: dict) -> list[tuple[int, float]]:
        """The ``logprobs`` most likely tokens (the engine adds the sampled one)."""
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)
        return [(token, lp.logprob) for token, lp in ranked[:self.logprobs]]

    def _chat_entry(self, token_id: int, logprob: float) -> dict:
        token = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    def _index(self, prompt_index: int, completion) -> int:
        return prompt_index * self.n + completion.index

    def usage(self, outputs) -> dict:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def response(self, outputs) -> dict:
        """The whole answer: ``outputs`` are the finished ``RequestOutput`` of each prompt."""
        choices = []
        if self.drop_output:
            outputs = [_prompt_only(o) for o in outputs]
        for p, output in enumerate(outputs):
            for completion in output.outputs:
                choice = {"index": self._index(p, completion),
                          "logprobs": self._logprobs(completion, 0,
                                                     prompt=output if self.echo else None),
                          "finish_reason": FINISH_REASONS.get(completion.finish_reason, "stop")}
                text = completion.text or ""
                if self.kind == "text_completion":
                    choice["text"] = (self._prompt_text(output) + text) if self.echo else text
                else:
                    choice["message"] = {"role": "assistant", "content": text}
                if self.return_token_ids:
                    choice["token_ids"] = completion.token_ids
                choices.append(choice)
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage(outputs)}

    def _prompt_text(self, output) -> str:
        if output.prompt is not None:
            return output.prompt
        return "" if self.tokenizer is None else self.tokenizer.decode(output.prompt_token_ids)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        kind = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                 "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def first_chat_choices(self, num_prompts: int) -> list[dict]:
        """Chat streams open every choice with the assistant role."""
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(num_prompts * self.n)]

    def stream_choices(self, prompt_index: int, output, streams: dict) -> list[dict]:
        """The chunk choices for what ``output`` added since the last one; ``streams``
        holds each choice's ``ChoiceStream``."""
        choices = []
        for completion in output.outputs:
            index = self._index(prompt_index, completion)
            stream = streams[index]
            if stream.finished:
                continue
            sent = len(stream.text)
            text, first, finish = stream.advance(completion)
            if not text and finish is None and stream.num_tokens == first:
                continue
            choice = {"index": index, "logprobs": self._logprobs(completion, first, sent),
                      "finish_reason": finish}
            if self.kind == "text_completion":
                choice["text"] = text
            else:
                choice["delta"] = {"content": text} if text or finish is None else {}
            if self.return_token_ids:
                choice["token_ids"] = completion.token_ids[first:]
            choices.append(choice)
        return choices
