"""What one HTTP client may ask of ``jpaged serve``: request bounds and connection timeouts.

``ServerLimits`` is a frozen dataclass whose fields generate ``jpaged serve``'s flags (as
``EngineConfig``'s do), so every bound is configuration with its default in ``--help``.
A request past a bound is refused before any work is queued for it, with OpenAI's 400
(413 for the body, 408 for a body that does not arrive in time) naming the bound. The
engine adds its own bounds against the model (``LLMEngine._check_bounds``: ``n`` /
``best_of`` <= ``max_num_seqs``, ``top_k`` and ``logprobs`` <= the vocabulary).

Connections: ``guarded_protocol`` wraps uvicorn's HTTP protocol with the two timeouts
uvicorn lacks: a client must finish its request headers within ``header_timeout`` (slow
or silent sockets), and a client whose socket stops taking the response for
``send_timeout`` has its connection dropped (which aborts its request).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import struct
import typing

from jpaged.engine.config import _check_type, _option
from jpaged.serving import openai_api
from jpaged.serving.openai_api import RequestError

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds and per-connection limits of the HTTP server."""

    max_body_bytes: int = _option(8 * MIB, "largest request body in bytes (413 beyond)")
    max_json_depth: int = _option(64, "deepest nesting of the request's JSON")
    max_prompts: int = _option(256, "prompts in one /v1/completions request")
    max_logprobs: int = _option(20, "top logprobs per token (logprobs / top_logprobs)")
    max_stop: int = _option(64, "stop strings, and stop token ids, per request")
    max_stop_chars: int = _option(256, "characters of one stop string")
    header_timeout: float = _option(10.0, "seconds a client has to send its request "
                                    "headers once connected (or once its last response "
                                    "ended)")
    body_timeout: float = _option(30.0, "seconds a client has to send its request body "
                                  "(408 beyond)")
    keep_alive_timeout: float = _option(5.0, "seconds an idle keep-alive connection stays "
                                        "open")
    send_timeout: float = _option(30.0, "seconds a client may take no output before its "
                                  "request is aborted and its connection closed")
    send_buffer_bytes: int = _option(256 * 1024, "send buffer of each connection, in the "
                                     "kernel and again in the server: a client that stops "
                                     "reading is noticed once about twice this waits for it")
    max_connections: int = _option(1024, "concurrent connections and requests; beyond "
                                   "them the server answers 503")

    def __post_init__(self):
        hints = typing.get_type_hints(ServerLimits)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _check_type(field.name, value, hints[field.name])
            if value <= 0:
                raise ValueError(f"{field.name} must be > 0, got {value}")

    # -- requests --------------------------------------------------------------------

    async def read_body(self, request) -> bytes:
        """The body, refused once it passes ``max_body_bytes`` (without reading the rest)
        or takes longer than ``body_timeout`` to arrive."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large(f"{int(declared)} bytes")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise self._too_large(f"more than {self.max_body_bytes} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within body_timeout="
                               f"{self.body_timeout} s", status=408,
                               code="body_timeout") from None
        return b"".join(chunks)

    def _too_large(self, size: str) -> RequestError:
        return RequestError(f"the request body ({size}) exceeds max_body_bytes="
                            f"{self.max_body_bytes}", status=413, code="body_too_large")

    def parse_body(self, raw: bytes) -> dict:
        """The body as a JSON object (``openai_api.parse_body``) within ``max_json_depth``."""
        try:
            body = openai_api.parse_body(raw)
        except RecursionError:   # the parser's own depth limit (about 1,000)
            raise self.json_too_deep() from None
        self.check_depth(body)
        return body

    def check_depth(self, value) -> None:
        """Refuse JSON with more than ``max_json_depth`` nested objects / arrays (level by
        level, so any depth is measured without recursion)."""
        level, depth = [value], 0
        while level := [item for item in level if isinstance(item, (dict, list))]:
            depth += 1
            if depth > self.max_json_depth:
                raise self.json_too_deep()
            level = [child for item in level
                     for child in (item.values() if isinstance(item, dict) else item)]

    def json_too_deep(self) -> RequestError:
        return RequestError(f"the request's JSON is nested deeper than max_json_depth="
                            f"{self.max_json_depth}", code="json_too_deep")

    def check_prompts(self, prompts: list) -> None:
        if len(prompts) > self.max_prompts:
            raise RequestError(f"{len(prompts)} prompts exceed max_prompts="
                               f"{self.max_prompts}", param="prompt")

    def check_params(self, params) -> None:
        """The ``SamplingParams`` fields whose cost the engine's bounds leave open: stop
        rules are checked against every new piece of text of every sequence."""
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise RequestError(f"logprobs={params.logprobs} exceeds max_logprobs="
                               f"{self.max_logprobs}", param="logprobs")
        for name in ("stop", "stop_token_ids"):
            count = len(getattr(params, name))
            if count > self.max_stop:
                raise RequestError(f"{count} {name} exceed max_stop={self.max_stop}",
                                   param=name)
        longest = max(map(len, params.stop), default=0)
        if longest > self.max_stop_chars:
            raise RequestError(f"a stop string of {longest} characters exceeds "
                               f"max_stop_chars={self.max_stop_chars}", param="stop")

    # -- command line ----------------------------------------------------------------

    def uvicorn_options(self) -> dict:
        return dict(limit_concurrency=self.max_connections,
                    timeout_keep_alive=self.keep_alive_timeout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ServerLimits`` field (``--max-body-bytes``), default in ``--help``."""
    group = parser.add_argument_group("request and connection limits (ServerLimits)")
    hints = typing.get_type_hints(ServerLimits)
    for field in dataclasses.fields(ServerLimits):
        kind = int if "int" in str(hints[field.name]) else float
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=kind,
                           default=None,
                           help=f"{field.metadata['help']} (default: {field.default})")


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)
                           if getattr(args, f.name, None) is not None})


def guarded_protocol(base: type, limits: ServerLimits) -> type:
    """A subclass of uvicorn's HTTP protocol ``base`` (h11 or httptools) with a header
    timeout, a send timeout and a bounded kernel send buffer. It relies only on what both protocols have long had:
    ``transport``, ``cycle`` (the request being answered, None before the first),
    ``on_response_complete`` and the transport's ``pause_writing`` / ``resume_writing``."""

    class GuardedProtocol(base):
        _header_timer = None
        _send_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:   # a fixed size: the kernel would grow it to megabytes
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, limits.send_buffer_bytes)
            transport.set_write_buffer_limits(high=limits.send_buffer_bytes)
            self._arm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc):
            for timer in (self._header_timer, self._send_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = asyncio.get_running_loop().call_later(
                limits.header_timeout, self._header_timed_out, self.cycle)

        def _header_timed_out(self, cycle):
            # Still the cycle of the timer's arming: no new request's headers have arrived.
            if self.cycle is cycle:
                self._reset()

        def _reset(self):
            """Drop the connection now. A plain close would leave the kernel holding the
            unsent bytes and the FIN for as long as the client keeps its window shut; a
            zero linger time sends a reset instead."""
            if self.transport.is_closing():
                return
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

        def pause_writing(self):
            # The client stopped taking what the server writes: give it send_timeout.
            super().pause_writing()
            if self._send_timer is None:
                self._send_timer = asyncio.get_running_loop().call_later(
                    limits.send_timeout, self._reset)

        def resume_writing(self):
            super().resume_writing()
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol
