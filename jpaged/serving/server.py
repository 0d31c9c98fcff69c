"""``jpaged serve``: an OpenAI-compatible HTTP server over the engine.

Stack: Starlette (the ASGI toolkit) served by uvicorn. Both are the established pair under
FastAPI and vLLM's server; Starlette alone is enough here because the request bodies are
validated where they are meant to be, by ``SamplingParams`` and the engine (``jpaged.
protocol`` turns their ``ValueError``\\ s into OpenAI's 400 bodies), so FastAPI's pydantic
layer would only restate those rules. Starlette gives routing, ``StreamingResponse`` for
server-sent events and client-disconnect detection; uvicorn the HTTP/1.1 server.

Threads: the event loop parses requests and writes responses; ``EngineThread`` owns the
engine and is the only thread that touches it. Requests enter through a thread-safe queue
(add, abort); the thread steps while any request is unfinished, sleeps on the queue
otherwise, and hands each ``RequestOutput`` back to its request's asyncio queue with
``call_soon_threadsafe``. A client that goes away (a stream closed early, a plain
request's connection dropped) has its request aborted, which frees its pages.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import functools
import contextlib
import hmac
import itertools
import json
import logging
import queue
import threading
import time
from typing import Any

from jpaged.serving import openai_api
from jpaged.core.interfaces import Engine
from jpaged.host.request import prompt_token_ids
from jpaged.serving.limits import ServerLimits, guarded_protocol, limits_from_args
from jpaged.serving.openai_api import RequestError

log = logging.getLogger("jpaged.serving.server")

# Bodies smaller than this are parsed on the event loop (a thread hop costs more).
PARSE_INLINE_BYTES = 64 * 1024
# TTFT / TPOT histogram buckets, seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Tokens per request histogram buckets.
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Submission:
    """The requests of one HTTP call (one per prompt) and the outputs that reached the
    event loop for them.

    Outputs are cumulative (each holds all of its request's tokens so far), so only the
    newest one per prompt is kept: a client that reads slowly gets fewer, larger chunks,
    and one that stops reading holds one output per prompt, not one per step. If an
    output waits untaken for ``send_timeout`` seconds the client is not reading:
    ``on_stall`` (the server aborts the requests) is called once."""

    ACCEPTED = "accepted"

    def __init__(self, request_ids: list[str], prompts: list, params, loop,
                 send_timeout: float = float("inf"), on_stall=None):
        self.request_ids = request_ids
        self.prompts = prompts
        self.params = params
        self.loop = loop
        self.send_timeout = send_timeout
        self.on_stall = on_stall
        self.latest: dict[int, Any] = {}     # prompt index -> newest untaken output
        self.error: BaseException | None = None
        self.is_accepted = False
        self.ready = asyncio.Event()
        self.waiting_since: float | None = None   # when the oldest untaken output came
        self.finished: set[int] = set()

    def put(self, item) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:   # the event loop has closed: the server is shutting down
            pass

    def _deliver(self, item) -> None:
        """On the event loop: keep ``item``, replacing an older output of its prompt."""
        if isinstance(item, BaseException):
            self.error = self.error or item
        elif item == Submission.ACCEPTED:
            self.is_accepted = True
        else:
            index, output = item
            self.latest[index] = output
            now = self.loop.time()
            if self.waiting_since is None:
                self.waiting_since = now
            elif now - self.waiting_since > self.send_timeout and self.on_stall is not None:
                stall, self.on_stall = self.on_stall, None
                self.error = self.error or RequestError(
                    f"the client took no output for send_timeout={self.send_timeout} s",
                    status=408, code="send_timeout")
                stall(self)
        self.ready.set()

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.request_ids)

    async def _wait(self, timeout: float | None) -> None:
        self.ready.clear()
        await asyncio.wait_for(self.ready.wait(), timeout)

    async def accepted(self) -> None:
        while not (self.is_accepted or self.error):
            await self._wait(None)
        if self.error is not None:
            raise self.error

    async def next(self, timeout: float | None = None):
        """The newest ``(prompt index, RequestOutput)`` of the prompt whose output waited
        longest; raises what the engine raised."""
        while not (self.latest or self.error):
            await self._wait(timeout)
        if self.error is not None:
            raise self.error
        index = next(iter(self.latest))
        output = self.latest.pop(index)
        self.waiting_since = self.loop.time() if self.latest else None
        if output.finished:
            self.finished.add(index)
        return index, output


class EngineThread:
    """Owns the engine: adds and aborts requests from its queue, steps while any is
    unfinished, and delivers each output to its submission."""

    def __init__(self, engine: Engine, metrics: "ServerMetrics", warm_up=None, stats=None):
        self.engine = engine
        self.metrics = metrics
        self.warm_up = warm_up   # run first, then `ready` is set
        self.stats = stats       # a StatsLogger, or None
        self.ready = threading.Event()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.owners: dict[str, tuple[Submission, int]] = {}
        self.seen_tokens: dict[str, int] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="jpaged-engine", daemon=True)
        self._stopping = False

    # -- called from the event loop ------------------------------------------------------

    def submit(self, prompts: list, params, loop,
               send_timeout: float = float("inf")) -> Submission:
        prefix = f"{next(self._ids)}-"
        submission = Submission([prefix + str(i) for i in range(len(prompts))], prompts,
                                params, loop, send_timeout, self.abort)
        self.inbox.put(("add", submission))
        return submission

    def abort(self, submission: Submission) -> None:
        self.inbox.put(("abort", submission))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self.inbox.put(("stop", None))
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        if self.warm_up is not None:
            try:
                self.warm_up()
            except Exception:   # noqa: BLE001 - the server then answers 503 to /health
                log.exception("warm-up failed; the engine thread stops")
                return
        self.ready.set()
        self._snapshot()
        while not self._stopping:
            try:
                self._iterate()
            except Exception as error:   # noqa: BLE001 - the thread must outlive any request
                self._fail_all("the engine failed", error)

    def _iterate(self) -> None:
        """Apply the queued commands (waiting for one when idle), then step once."""
        busy = self.engine.has_unfinished_requests()
        try:
            command = self.inbox.get_nowait() if busy else self.inbox.get()
        except queue.Empty:
            command = None
        while command is not None:
            self._apply(*command)
            try:
                command = self.inbox.get_nowait()
            except queue.Empty:
                command = None
        if self._stopping:
            return
        if self.engine.has_unfinished_requests():
            self._step()
        self._snapshot()

    def _snapshot(self) -> None:
        self.metrics.observe_engine({**self.engine.metrics(),
                                     "num_compilations": self.engine.num_compilations})

    def _apply(self, kind: str, submission: Submission | None) -> None:
        if kind == "add":
            self._add(submission)
        elif kind == "abort":
            for request_id in submission.request_ids:
                self._abort(request_id)

    def _add(self, submission: Submission) -> None:
        """Add every prompt of the submission, or none (the first refusal is the answer)."""
        added = []
        try:
            for request_id, prompt in zip(submission.request_ids, submission.prompts):
                self.engine.add_request(prompt, submission.params, request_id)
                added.append(request_id)
        except Exception as error:   # noqa: BLE001 - a ValueError is the request's fault
            for request_id in added:
                self.engine.abort(request_id)
            if isinstance(error, ValueError):
                submission.put(openai_api.add_error(error))
            else:
                log.exception("adding a request failed")
                submission.put(RequestError(f"adding the request failed: {error}", status=500,
                                            kind="internal_server_error"))
            return
        for index, request_id in enumerate(added):
            self.owners[request_id] = (submission, index)
            self.seen_tokens[request_id] = 0
        submission.put(Submission.ACCEPTED)

    def _abort(self, request_id: str) -> None:
        if self.owners.pop(request_id, None) is not None:
            self.seen_tokens.pop(request_id, None)
            if self.stats is not None:
                self.stats.forget(request_id)
            self.engine.abort(request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:   # noqa: BLE001 - every waiting client gets the error
            self._fail_all("the engine step failed", error)
            return
        if self.stats is not None:
            self.stats.observe(outputs)
        for output in outputs:
            owner = self.owners.get(output.request_id)
            if owner is None:
                continue
            submission, index = owner
            self._count(output)
            submission.put((index, output))
            if output.finished:
                del self.owners[output.request_id]
                self.seen_tokens.pop(output.request_id, None)

    def _fail_all(self, what: str, error: Exception) -> None:
        """Answer every unfinished request with a 500 and abort it."""
        log.exception("%s; failing its requests", what)
        failed = RequestError(f"{what}: {error}", status=500, kind="internal_server_error")
        for request_id, (submission, _) in list(self.owners.items()):
            submission.put(failed)
            try:
                self._abort(request_id)
            except ValueError:   # the engine had already dropped it
                pass

    def _count(self, output) -> None:
        """Token counters and latency histograms from one output."""
        tokens = sum(len(c.token_ids) for c in output.outputs)
        before = self.seen_tokens[output.request_id]
        self.seen_tokens[output.request_id] = tokens
        self.metrics.observe_output(output, new_tokens=max(tokens - before, 0),
                                    first=before == 0 and tokens > 0)


class ServerMetrics:
    """The Prometheus registry behind ``/metrics``: the engine's gauges and counters
    (a snapshot the engine thread takes after every step), token counters and latency
    histograms.

    jpaged's ``jpaged_*`` series are the primary ones; every concept vLLM also exports is
    there a second time under vLLM's name and labels (``vllm:num_requests_running``,
    ``vllm:gpu_cache_usage_perc``, ``vllm:time_to_first_token_seconds``, ... with
    ``model_name``), so dashboards built for vLLM work unchanged. Request latency and
    per-request token histograms exist only under vLLM's names."""

    def __init__(self, model_name: str = "jpaged"):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.snapshot: dict = {}

        def both(kind, name: str, vllm_name: str, doc: str, **options):
            """The jpaged series and vLLM's twin (labelled with the model)."""
            return (kind(name, doc, registry=self.registry, **options),
                    kind(vllm_name, doc, ["model_name"], registry=self.registry,
                         **options).labels(model_name))

        def vllm_only(kind, name: str, doc: str, **options):
            return kind(name, doc, ["model_name"], registry=self.registry,
                        **options).labels(model_name)

        self.prompt_tokens = both(Counter, "jpaged_prompt_tokens", "vllm:prompt_tokens",
                                  "Prompt tokens of admitted requests")
        self.generation_tokens = both(Counter, "jpaged_generation_tokens",
                                      "vllm:generation_tokens", "Generated tokens")
        self.requests = Counter("jpaged_request_success", "Finished requests",
                                ["finished_reason"], registry=self.registry)
        self.vllm_requests = Counter("vllm:request_success", "Finished requests",
                                     ["model_name", "finished_reason"], registry=self.registry)
        self.ttft = both(Histogram, "jpaged_time_to_first_token_seconds",
                         "vllm:time_to_first_token_seconds", "Time to first token",
                         buckets=TTFT_BUCKETS)
        self.tpot = both(Histogram, "jpaged_time_per_output_token_seconds",
                         "vllm:time_per_output_token_seconds",
                         "Time per output token after the first", buckets=TPOT_BUCKETS)
        self.e2e = vllm_only(Histogram, "vllm:e2e_request_latency_seconds",
                             "Arrival to last token", buckets=TTFT_BUCKETS)
        self.request_prompt_tokens = vllm_only(Histogram, "vllm:request_prompt_tokens",
                                               "Prompt tokens per request",
                                               buckets=TOKEN_BUCKETS)
        self.request_generation_tokens = vllm_only(Histogram, "vllm:request_generation_tokens",
                                                   "Generated tokens per request",
                                                   buckets=TOKEN_BUCKETS)
        self.registry.register(_EngineCollector(self))

    def observe_engine(self, snapshot: dict) -> None:
        self.snapshot = snapshot   # one reference swap: readers see a whole snapshot

    def observe_output(self, output, new_tokens: int, first: bool) -> None:
        for counter in self.generation_tokens:
            counter.inc(new_tokens)
        if first:
            for counter in self.prompt_tokens:
                counter.inc(len(output.prompt_token_ids))
            ttft = output.metrics.time_to_first_token
            if ttft is not None:
                for histogram in self.ttft:
                    histogram.observe(ttft)
        if output.finished:
            reason = output.finish_reason or "abort"
            self.requests.labels(reason).inc()
            self.vllm_requests.labels(self.model_name, reason).inc()
            metrics = output.metrics
            tpot = metrics.time_per_output_token
            if tpot is not None and metrics.num_output_tokens > 1:
                for histogram in self.tpot:
                    histogram.observe(tpot)
            if metrics.finished_time is not None:
                self.e2e.observe(metrics.finished_time - metrics.arrival_time)
            self.request_prompt_tokens.observe(len(output.prompt_token_ids))
            self.request_generation_tokens.observe(
                sum(len(c.token_ids) for c in output.outputs))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCollector:
    """Exposes the latest engine snapshot (``Engine.metrics()``), under jpaged's names and
    (``VLLM_*``) vLLM's."""

    GAUGES = {
        "num_running": ("jpaged_num_requests_running", "Sequences running"),
        "num_waiting": ("jpaged_num_requests_waiting", "Sequences waiting"),
        "num_swapped": ("jpaged_num_requests_swapped", "Sequences swapped out"),
        "used_pages": ("jpaged_kv_pages_used", "KV pages held by sequences"),
        "free_pages": ("jpaged_kv_pages_free", "KV pages free (cached ones included)"),
        "num_pages": ("jpaged_kv_pages_total", "KV pages in the pool, the null page included"),
        "cached_pages": ("jpaged_kv_pages_cached", "KV pages the prefix cache remembers"),
        "host_used_pages": ("jpaged_host_pages_used", "Host (swap) pages in use"),
        "prefix_hit_rate": ("jpaged_prefix_cache_hit_rate",
                            "Prompt tokens found in the prefix cache / prompt tokens looked up"),
        "kv_utilization": ("jpaged_kv_utilization", "Token slots used / slots of held pages"),
    }
    COUNTERS = {
        "num_preemptions": ("jpaged_num_preemptions", "Sequences preempted"),
        "prefix_hit_tokens": ("jpaged_prefix_cache_hits", "Prompt tokens served from the "
                              "prefix cache"),
        "prefix_query_tokens": ("jpaged_prefix_cache_queries", "Prompt tokens looked up in "
                                "the prefix cache"),
        "num_compilations": ("jpaged_step_compilations", "Step programs compiled (a new "
                             "shape bucket); each costs a pause"),
    }
    # vLLM's names for the same snapshot values (v0 and v1 spellings where they differ).
    VLLM_GAUGES = {
        "num_running": ("vllm:num_requests_running",),
        "num_waiting": ("vllm:num_requests_waiting",),
        "num_swapped": ("vllm:num_requests_swapped",),
        "kv_usage": ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"),
    }
    VLLM_COUNTERS = {
        "num_preemptions": ("vllm:num_preemptions",),
        "prefix_hit_tokens": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
        "prefix_query_tokens": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    }

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshot = self.metrics.snapshot
        for key, (name, doc) in self.GAUGES.items():
            if key in snapshot:
                yield GaugeMetricFamily(name, doc, value=snapshot[key])
        for key, (name, doc) in self.COUNTERS.items():
            if key in snapshot:
                yield CounterMetricFamily(name, doc, value=snapshot[key])
        if "used_pages" in snapshot and snapshot.get("num_pages", 0) > 1:
            # vLLM's KV cache usage: the fraction of the pool's usable pages held.
            snapshot = {**snapshot, "kv_usage": snapshot["used_pages"]
                        / (snapshot["num_pages"] - 1)}
        model = [self.metrics.model_name]
        for table, family in ((self.VLLM_GAUGES, GaugeMetricFamily),
                              (self.VLLM_COUNTERS, CounterMetricFamily)):
            for key, names in table.items():
                if key not in snapshot:
                    continue
                for name in names:
                    metric = family(name, f"jpaged's {key} under vLLM's name",
                                    labels=["model_name"])
                    metric.add_metric(model, snapshot[key])
                    yield metric


class Server:
    """The ASGI app over one engine thread.

    name: the model name clients send (``GET /v1/models`` lists it); chat_template: a
    ``jpaged.host.chat.ChatTemplate`` or None (then ``/v1/chat/completions`` answers 400);
    max_model_len: the context, which bounds a chat answer that sets no ``max_tokens``.
    api_key: every ``/v1`` route then needs ``Authorization: Bearer <api_key>``.
    warm_up: run on the engine thread before the first request (``LLM.warm_up``);
    ``/health`` answers 503 until it is done. log_requests: log each request (its prompt
    cut to ``max_log_len`` characters or ids). sampling_defaults: ``SamplingParams``
    fields a request that leaves them unset gets (``LLM.get_default_sampling_params``).
    log_stats: the periodic stats line (``jpaged.engine.stats``).
    """

    def __init__(self, engine: Engine, name: str, *, chat_template=None,
                 max_model_len: int = 2048, api_key: str | None = None, warm_up=None,
                 log_requests: bool = False, max_log_len: int | None = None,
                 sampling_defaults: dict | None = None, log_stats: bool = False,
                 limits: ServerLimits | None = None):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.routing import Route

        from jpaged.engine.stats import StatsLogger

        self.engine = engine
        self.name = name
        self.chat_template = chat_template
        self.max_model_len = max_model_len
        self.limits = ServerLimits() if limits is None else limits
        self.tokenizer = engine.tokenizer
        self.log_requests = log_requests
        self.max_log_len = max_log_len
        self.sampling_defaults = dict(sampling_defaults or {})
        self.metrics = ServerMetrics(name)
        self.engine_thread = EngineThread(engine, self.metrics, warm_up,
                                          StatsLogger(engine) if log_stats else None)
        self.app = Starlette(
            routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"]),
                    Route("/metrics", self.prometheus, methods=["GET"])],
            middleware=[Middleware(ApiKeyCheck, api_key=api_key)] if api_key else [],
            exception_handlers={HTTPException: self._http_error},
            lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.engine_thread.start()
        yield
        self.engine_thread.stop()

    # -- endpoints -----------------------------------------------------------------------

    async def completions(self, request):
        try:
            body = self._with_defaults(await self._body(request))
            openai_api.check_model(body, self.name)
            prompts, params = openai_api.completion_request(body)
            self.limits.check_prompts(prompts)
            self.limits.check_params(params)
            # Text is tokenized off the event loop and off the engine thread.
            prompts = await asyncio.to_thread(self._token_ids, prompts)
            self._fit_context(body, prompts, params)
            return await self._generate(request, body, prompts, params, "text_completion")
        except RequestError as error:
            return self._error(error)

    async def chat(self, request):
        try:
            body = self._with_defaults(await self._body(request))
            openai_api.check_model(body, self.name)
            if self.chat_template is None:
                raise RequestError(f"the model {self.name!r} has no chat template (no "
                                   f"chat_template in its tokenizer_config.json): use "
                                   f"/v1/completions", param="messages",
                                   code="no_chat_template")
            if self.tokenizer is None:
                raise RequestError(f"the model {self.name!r} has no tokenizer",
                                   param="messages")
            messages = openai_api.chat_messages(body)
            token_ids = await asyncio.to_thread(self._chat_token_ids, messages)
            room = max(self.max_model_len - len(token_ids), 1)
            params = openai_api.chat_params(body, room)
            self.limits.check_params(params)
            if params.max_tokens != room:   # set by the body
                openai_api.check_context(len(token_ids), params.max_tokens, self.max_model_len)
            return await self._generate(request, body, [token_ids], params, "chat.completion")
        except RequestError as error:
            return self._error(error)

    def _fit_context(self, body: dict, prompts: list, params) -> None:
        """A completion's prompt plus ``max_tokens`` must fit the context: a 400 when the
        body set ``max_tokens``; the default (16) shrinks to the room left. A prompt alone
        too long is the engine's 400."""
        lengths = [len(p) for p in prompts]   # token ids by now
        if body.get("max_tokens") is None:
            params.max_tokens = max(1, min(params.max_tokens,
                                           self.max_model_len - max(lengths)))
            params.min_tokens = min(params.min_tokens, params.max_tokens)
        elif body["max_tokens"] > 0:   # 0: scoring, one token generated and dropped
            for length in lengths:
                openai_api.check_context(length, params.max_tokens, self.max_model_len)

    async def _body(self, request) -> dict:
        """The request's JSON object, within the body and depth limits; a large one is
        parsed off the event loop."""
        raw = await self.limits.read_body(request)
        if len(raw) < PARSE_INLINE_BYTES:
            return self.limits.parse_body(raw)
        return await asyncio.to_thread(self.limits.parse_body, raw)

    def _token_ids(self, prompts: list) -> list[list[int]]:
        """The prompts, each checked to be at most ``max_model_len`` tokens (``jpaged.host.
        request.prompt_token_ids``'s rule): a longer one never reaches the engine thread."""
        result = []
        for prompt in prompts:
            if isinstance(prompt, str) and self.tokenizer:
                # No token spells more than `longest` characters, so a text this long is
                # too long whatever it says: refused before tokenizing (a 10 MB prompt's
                # encoding alone holds hundreds of MB the allocator never gives back).
                least = len(prompt) // self._longest_token
                if least > self.max_model_len:
                    raise RequestError(f"a prompt of {len(prompt)} characters is at least "
                                       f"{least} tokens, longer than max_model_len="
                                       f"{self.max_model_len}", param="prompt")
            try:
                tokens = (self._encode(prompt) if isinstance(prompt, str) and self.tokenizer
                          else prompt_token_ids(prompt, self.tokenizer)[1])
            except ValueError as error:
                raise RequestError(str(error), param="prompt") from None
            if len(tokens) > self.max_model_len:
                raise RequestError(f"a prompt of {len(tokens)} tokens is longer than "
                                   f"max_model_len={self.max_model_len}", param="prompt")
            # Text stays text (echo returns it as sent); the engine's encode of a prompt
            # within max_model_len is short.
            result.append(prompt if isinstance(prompt, str) else tokens)
        return result

    @functools.cached_property
    def _longest_token(self) -> int:
        return longest_token_chars(self.tokenizer)

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text``'s token ids. Hugging Face's ``encode_batch`` lets go of the GIL while it
        works and ``encode`` does not: a 10 MB prompt would stop the event loop."""
        encode_batch = getattr(self.tokenizer, "encode_batch", None)
        if encode_batch is None:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def _chat_token_ids(self, messages: list[dict]) -> list[int]:
        try:
            text = self.chat_template.render(messages)
        except ValueError as error:
            raise RequestError(str(error), param="messages") from None
        # The template writes the special tokens itself, as with Hugging Face.
        return self._encode(text, add_special_tokens=False)

    def _with_defaults(self, body: dict) -> dict:
        """``body`` with the server's sampling defaults for the fields it leaves unset."""
        return {**body, **{k: v for k, v in self.sampling_defaults.items()
                           if body.get(k) is None}}

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": 0, "owned_by": "jpaged",
                "root": self.name, "max_model_len": self.max_model_len}

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        name = request.path_params["model"]
        if name != self.name:
            return self._error(openai_api.model_not_found(name, self.name))
        return JSONResponse(self._model_card())

    async def health(self, request):
        from starlette.responses import Response

        ready = (self.engine_thread.alive and self.engine_thread.ready.is_set()
                 and getattr(self.engine, "can_step", True))   # False: steps fail for all
        return Response(status_code=200 if ready else 503)

    async def prometheus(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- generation ----------------------------------------------------------------------

    async def _generate(self, request, body: dict, prompts: list, params, kind: str):
        from starlette.responses import JSONResponse, Response, StreamingResponse

        stream = openai_api.flag(body, "stream")
        if stream and params.use_beam_search:
            raise RequestError("stream is not supported with use_beam_search", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError(f"stream_options must be an object, got {options!r}",
                               param="stream_options")
        echo = kind == "text_completion" and openai_api.flag(body, "echo")
        renderer = openai_api.Renderer(kind, self.name, self.tokenizer, params.n, params.logprobs,
                                     openai_api.flag(body, "return_token_ids"), echo=echo,
                                     drop_output=echo and body.get("max_tokens") == 0)
        submission = self.engine_thread.submit(prompts, params, asyncio.get_running_loop(),
                                               self.limits.send_timeout)
        if self.log_requests:
            log.info("Received request %s: prompt: %s, params: %s", renderer.id,
                     self._loggable(prompts), params)
        try:
            await submission.accepted()
        except BaseException:
            self.engine_thread.abort(submission)
            raise
        if stream:
            include_usage = options.get("include_usage") is True
            return StreamingResponse(self._events(submission, renderer, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        outputs = await self._collect(request, submission)
        if outputs is None:   # nobody is listening any more
            return Response(status_code=499)
        return JSONResponse(renderer.response(outputs))

    def _loggable(self, prompts: list) -> list:
        if self.max_log_len is None:
            return prompts
        return [p[:self.max_log_len] for p in prompts]

    async def _collect(self, request, submission: Submission) -> list | None:
        """The finished output of every prompt, or None (the requests aborted) if the
        client goes away first: the abort reaches the engine thread's queue as soon as
        the connection closes, so the requests stop within a step."""
        last: dict[int, Any] = {}
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not submission.done:
                arrived = asyncio.ensure_future(submission.next())
                await asyncio.wait({arrived, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not arrived.done():
                    arrived.cancel()
                    return None
                index, output = arrived.result()
                last[index] = output
        finally:
            gone.cancel()
            if not submission.done:
                self.engine_thread.abort(submission)
        return [last[i] for i in range(len(submission.request_ids))]

    async def _events(self, submission: Submission, renderer, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with ``[DONE]``. Closing the
        stream early (the client went away) aborts the requests."""
        streams = {i: openai_api.ChoiceStream(submission.params.stop)
                   for i in range(len(submission.request_ids) * submission.params.n)}
        last: dict[int, Any] = {}
        try:
            if renderer.kind == "chat.completion":
                yield _event(renderer.chunk(renderer.first_chat_choices(len(submission.request_ids))))
            while not submission.done:
                try:
                    index, output = await submission.next()
                except RequestError as error:
                    yield _event(error.body())
                    break
                last[index] = output
                choices = renderer.stream_choices(index, output, streams)
                if choices:
                    yield _event(renderer.chunk(choices))
            if include_usage and submission.done:
                yield _event(renderer.chunk([], renderer.usage(
                    [last[i] for i in range(len(submission.request_ids))])))
            yield "data: [DONE]\n\n"
        finally:
            if not submission.done:
                self.engine_thread.abort(submission)

    # -- errors --------------------------------------------------------------------------

    @staticmethod
    def _error(error: RequestError):
        from starlette.responses import JSONResponse

        # A body refused part way (too large, too slow) is left unread: end the connection.
        headers = {"connection": "close"} if error.status in (408, 413) else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    async def _http_error(self, request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return self._error(RequestError(f"{request.method} {request.url.path}: {exc.detail}",
                                        status=exc.status_code, kind=kind))


def longest_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token of ``tokenizer`` decodes to: its longest
    token as the vocabulary writes it (byte-level and Metaspace vocabularies write a
    character per byte or space, byte fallback writes ``<0x41>`` for one character)."""
    return max(len(token) for token in tokenizer.get_vocab(with_added_tokens=True))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _disconnected(request) -> None:
    """Returns when the client closes its connection (ASGI's ``http.disconnect``; the
    request body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ApiKeyCheck:
    """ASGI middleware: every ``/v1`` route needs ``Authorization: Bearer <api_key>``, or
    it is a 401 with OpenAI's error body; ``/health`` and ``/metrics`` stay open (as
    vLLM's ``--api-key``)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"].startswith("/v1")
                and scope["method"] != "OPTIONS"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                from starlette.responses import JSONResponse

                error = RequestError("missing or wrong API key: send the header "
                                     "'Authorization: Bearer <key>'", status=401,
                                     kind="authentication_error", code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, *, name: str = "jpaged",
          chat_template=None, log_level: str = "info", access_log: bool = True,
          warm_up: bool = True, limits: ServerLimits | None = None, **options) -> None:
    """Serve ``llm`` (a ``jpaged.LLM``) until interrupted. warm_up: compile every step
    shape on the engine thread before the first request (``/health`` answers 503 until
    then); limits: the request and connection limits (``ServerLimits``); options:
    ``Server``'s (api_key, log_requests, max_log_len)."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    started = time.perf_counter()
    limits = ServerLimits() if limits is None else limits

    def warm_up_then_say_so():
        llm.warm_up()
        log.info("ready: warm-up took %.1f s", time.perf_counter() - started)

    server = Server(llm.engine, name, chat_template=chat_template,
                    max_model_len=llm.max_model_len,
                    warm_up=warm_up_then_say_so if warm_up else None,
                    sampling_defaults=llm.generation_defaults,
                    log_stats=llm.config.log_stats, limits=limits, **options)
    uvicorn.run(server.app, host=host, port=port, log_level=log_level,
                access_log=access_log, timeout_graceful_shutdown=5,
                http=guarded_protocol(AutoHTTPProtocol, limits), **limits.uvicorn_options())


def main(args) -> None:
    """``jpaged serve``: build the ``LLM`` from the command line's options and serve it.
    Unlike ``LLM``, it warms up (``--no-warmup`` or ``--enforce-eager`` skip it) and logs
    stats (``--disable-log-stats``) unless told otherwise, as vLLM's server."""
    import os

    from jpaged.engine.config import options_from_args
    from jpaged.engine.engine import LLM
    from jpaged.host.chat import ChatTemplate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    options = options_from_args(args)
    limits = limits_from_args(args)
    warm_up = options.pop("warmup", True)   # on the engine thread, once the port is open
    options.setdefault("log_stats", True)
    api_key = (args.api_key or os.environ.get("JPAGED_API_KEY")
               or os.environ.get("VLLM_API_KEY"))
    started = time.perf_counter()
    llm = LLM(args.model, **options)
    template = llm.chat_template
    if args.chat_template:
        with open(args.chat_template) as f:
            template = ChatTemplate(f.read(), template.special_tokens if template else {})
    log.info("loaded %s in %.1f s; serving on http://%s:%d%s", args.model,
             time.perf_counter() - started, args.host, args.port,
             " (warming up: /health answers 503 until ready)" if warm_up else "")
    serve(llm, args.host, args.port, name=args.served_model_name or args.model,
          chat_template=template, log_level=args.log_level,
          access_log=not args.disable_uvicorn_access_log, warm_up=warm_up, api_key=api_key,
          log_requests=not args.disable_log_requests, max_log_len=args.max_log_len,
          limits=limits)
