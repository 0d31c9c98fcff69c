"""Chat conversations as prompts: the messages checked, and a checkpoint's chat template
rendered with Jinja2 the way Hugging Face's ``apply_chat_template`` does. Host only: used
by ``LLM.chat`` and the server's ``/v1/chat/completions``."""

from __future__ import annotations

import datetime
import json
import os


def chat_messages(messages) -> list[dict]:
    """The messages as ``{"role": str, "content": str, ...}``; text parts of a list are
    joined. A ValueError names the first bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list, got {messages!r}"[:300])
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string role")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text "
                             f"parts, got {content!r}"[:300])
        result.append({**message, "content": content or ""})
    return result


class ChatTemplate:
    """A checkpoint's chat template (``chat_template`` in ``tokenizer_config.json``, or
    ``chat_template.jinja``), rendered in a sandbox as Hugging Face's ``apply_chat_template``
    does: ``messages``, ``add_generation_prompt``, the special tokens by name,
    ``raise_exception`` and ``strftime_now``."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        from jinja2 import ext, sandbox

        env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    @classmethod
    def from_directory(cls, directory: str) -> "ChatTemplate | None":
        """The template of the checkpoint in ``directory``, or None when it has none."""
        config = {}
        path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
        source = config.get("chat_template")
        if isinstance(source, list):   # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if source is None and os.path.isfile(jinja_path):
            with open(jinja_path) as f:
                source = f.read()
        if source is None:
            return None
        return cls(source, special_tokens(config))

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               **variables) -> str:
        """The prompt text; a ValueError when the template refuses the messages."""
        from jinja2 import TemplateError

        try:
            return self.template.render(**{"tools": None, **self.special_tokens, **variables},
                                        messages=messages,
                                        add_generation_prompt=add_generation_prompt)
        except TemplateError as error:
            raise ValueError(f"the chat template rejected the messages: {error}") from None


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... of a ``tokenizer_config.json``, as text."""
    return {name: token["content"] if isinstance(token, dict) else token
            for name, token in tokenizer_config.items()
            if name.endswith("_token") and token is not None}


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    from jinja2 import TemplateError

    raise TemplateError(message)
