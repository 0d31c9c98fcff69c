"""LLMEngine and LLM: the step loop that joins the scheduler, the model and the cache.

Each ``LLMEngine.step()``: the scheduler picks the rows and reserves their slots (host),
the runner moves pages and runs one jitted step that samples on the device (device),
and the engine appends the sampled ids, applies stop rules, forks parallel samples and
beams, and reports outputs (host).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jpaged import model_loading, parallel
from jpaged.block_manager import BlockManager
from jpaged.cache import KVCache
from jpaged.interfaces import Engine, Model
from jpaged.llm_options import (FALLBACK_KV_BYTES, accepts_vllm_names,
                                 kv_bytes_from_utilization)
from jpaged.runner import ModelRunner
from jpaged.sampling import SamplingParams, SamplingTensors, beam_candidates, beam_score
from jpaged.scheduler import Scheduler, SchedulerOutput, bucket
from jpaged.sequence import Sequence, SequenceStatus

RUNNING, FINISHED = SequenceStatus.RUNNING, SequenceStatus.FINISHED



@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (``n`` of them, or the best beams)."""

    index: int
    token_ids: list[int]
    text: str | None
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (``time.perf_counter``) and cache use of one request."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    scheduled: bool = False

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        if self.finished_time is None or self.first_token_time is None:
            return None
        return (self.finished_time - self.first_token_time) / max(self.num_output_tokens - 1, 1)


@dataclasses.dataclass
class RequestOutput:
    """Where a request stands: its completions so far, and whether it is finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclasses.dataclass
class Stream:
    """Host state of one generated sequence: its seed and what it has produced."""

    index: int
    seed: int
    cumulative_logprob: float = 0.0
    logprobs: list = dataclasses.field(default_factory=list)
    text: str | None = None


class Request:
    """A prompt, its sampling parameters, and the sequences generating for it."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, seeds: list[int], arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seeds = seeds
        self.metrics = RequestMetrics(arrival_time)
        self.streams: dict[str, Stream] = {}       # live and finished sequences by seq_id
        self.seqs: dict[str, Sequence] = {}
        self.hypotheses: list[tuple[float, Sequence]] = []   # finished beams, raw score
        self.finished = False

    @property
    def beam_width(self) -> int:
        return (self.params.best_of or self.params.n) if self.params.use_beam_search else 0

    def completions(self, decode) -> list[CompletionOutput]:
        if self.beam_width:
            return self._beam_completions(decode)
        outputs = []
        for seq_id, stream in sorted(self.streams.items(), key=lambda kv: kv[1].index):
            seq = self.seqs[seq_id]
            outputs.append(CompletionOutput(
                stream.index, seq.output_token_ids, stream.text, stream.cumulative_logprob,
                stream.logprobs if self.params.logprobs is not None else None,
                seq.finish_reason))
        return outputs

    def _beam_completions(self, decode) -> list[CompletionOutput]:
        penalty = self.params.length_penalty
        pool = list(self.hypotheses) or [(self.streams[s.seq_id].cumulative_logprob, s)
                                         for s in self.seqs.values()]
        ranked = sorted(pool, key=lambda h: -beam_score(h[0], h[1].num_tokens, penalty))
        return [CompletionOutput(i, seq.output_token_ids, decode(seq.output_token_ids), score,
                                 None, seq.finish_reason or "length")
                for i, (score, seq) in enumerate(ranked[:self.params.n])]


def _finished_variant(seq: Sequence, seq_id: str, token: int, reason: str) -> Sequence:
    """A finished copy of ``seq`` (which has just appended a token) ending on ``token``
    instead: a completed sample or beam hypothesis that holds no pages."""
    done = Sequence(seq_id, seq.token_ids[:-1] + [token], seq.max_tokens,
                    request_id=seq.request_id)
    done.num_prompt_tokens = seq.num_prompt_tokens
    done.status, done.finish_reason = FINISHED, reason
    return done


class LLMEngine:
    """Continuous batching over a paged KV cache: ``add_request``, ``abort``, ``step``.

    model: see ``jpaged.interfaces.Model``. An ``jpaged.interfaces.Engine``.
    """

    def __init__(self, model: Model, cache: KVCache, scheduler: Scheduler, *, seed: int = 0,
                 num_host_pages: int = 0):
        self.model = model
        self.scheduler = scheduler
        self.runner = ModelRunner(model, cache, num_host_pages)
        self.tokenizer = model.tokenizer
        self.eos_token_ids = set(model.eos_token_ids)
        self.rng = np.random.default_rng(seed)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.host_time = 0.0
        self.step_time = 0.0

    # -- requests --------------------------------------------------------------------

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        """Queue a prompt (text, or a list of token ids); returns its request id."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        vocab = self.model.config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: token id {bad[0]} is outside the "
                             f"vocabulary [0, {vocab})")
        seq = self.scheduler.add_request(request_id, token_ids, params.max_tokens, priority)
        request = Request(request_id, text, token_ids, params,
                          params.sequence_seeds(self.rng), time.perf_counter())
        request.seqs[seq.seq_id] = seq
        request.streams[seq.seq_id] = Stream(0, request.seeds[0])
        self.requests[request_id] = request
        return request_id

    def abort(self, request_id: str) -> None:
        request_id = str(request_id)
        if request_id not in self.requests:
            raise ValueError(f"unknown request id {request_id!r}")
        self.requests.pop(request_id)
        if request_id in self.scheduler.requests:
            self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def metrics(self) -> dict:
        """Queue lengths, pool use, prefix-cache and preemption counters (see
        ``Scheduler.metrics``); ``num_pages``: the pool's pages, the null page included."""
        return {**self.scheduler.metrics(), "num_pages": self.scheduler.block_manager.num_pages}

    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this model has none: pass "
                                 "token ids")
            return prompt, self.tokenizer.encode(prompt).ids
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) for t in prompt):
            raise ValueError(f"prompt must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        return None, [int(t) for t in prompt]

    def _decode(self, token_ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(token_ids)

    # -- one step --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that made progress (finished ones last time)."""
        start = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.seqs:
            if self.scheduler.waiting or self.scheduler.swapped:
                raise RuntimeError("the scheduler could not run anything: the pool is too "
                                   "small for the waiting requests")
            return []
        for row, seq in enumerate(out.seqs):
            metrics = self.requests[seq.request_id].metrics
            if not metrics.scheduled:
                # A prefix-cache hit starts the first chunk past the cached pages.
                metrics.scheduled, metrics.num_cached_tokens = True, out.start_positions[row]
        forks = self._pending_forks(out)
        indices, tensors, num_top = self._sampling_batch(out, forks)
        device_start = time.perf_counter()
        sampled = self.runner.execute(out, indices, tensors, num_top)
        device_end = time.perf_counter()
        touched = self._apply(out, forks, sampled)
        self.num_steps += 1
        end = time.perf_counter()
        self.step_time += end - start
        self.host_time += (end - start) - (device_end - device_start)
        return [self._output(r) for r in touched]

    def _pending_forks(self, out: SchedulerOutput) -> list[tuple[int, int]]:
        """(row, completion index) for every parallel sample beyond the first whose first
        token comes from a prompt finishing in this step: they share its logits row."""
        forks = []
        for row, seq in enumerate(out.seqs):
            request = self.requests[seq.request_id]
            if (out.sample[row] and not request.beam_width and request.params.n > 1
                    and len(request.streams) == 1 and seq.num_output_tokens == 0):
                forks += [(row, index) for index in range(1, request.params.n)]
        return forks

    def _sampling_batch(self, out: SchedulerOutput, forks):
        """Logits index and sampling parameters of every sampling row: the scheduler's rows
        (padded ones greedy and ignored), then one extra row per pending fork."""
        rows = len(out.sample)
        size = bucket(rows + len(forks), rows, 1 << 30)
        indices = np.zeros(size, np.int32)
        indices[:rows] = out.logits_indices
        indices[rows:rows + len(forks)] = out.logits_indices[[row for row, _ in forks]]
        entries = [(seq, self.requests[seq.request_id].streams[seq.seq_id].seed)
                   for seq in out.seqs] + [None] * (rows - len(out.seqs))
        entries += [(out.seqs[row], self.requests[out.seqs[row].request_id].seeds[index])
                    for row, index in forks]
        greedy = SamplingParams(temperature=0.0)
        tensors = SamplingTensors.from_params(
            [self.requests[e[0].request_id].params if e else greedy for e in entries],
            [e[1] if e else 0 for e in entries],
            [e[0].num_output_tokens if e else 0 for e in entries],
            [e[0].token_ids[:e[0].num_prompt_tokens] if e else [] for e in entries],
            [e[0].output_token_ids if e else [] for e in entries], batch=size)
        wanted = max([2 * r.beam_width or (r.params.logprobs or 0)
                      for r in map(self.requests.get, {s.request_id for s in out.seqs})],
                     default=0)
        return indices, tensors, bucket(wanted, 0, 1 << 30) if wanted else 0

    def _apply(self, out: SchedulerOutput, forks, sampled) -> list[Request]:
        """Append sampled tokens, fork samples and beams, stop sequences; host side."""
        tokens = np.array(sampled.tokens[:len(out.sample)])
        beam_plans = self._plan_beams(out, sampled, tokens)
        now = time.perf_counter()
        appended = [(row, seq) for row, seq in enumerate(out.seqs)
                    if out.sample[row] and seq.status is RUNNING]
        for row, seq in appended:
            self._record(seq, int(tokens[row]), sampled, row)
        self.scheduler.update(out, tokens)
        touched = {id(self.requests[s.request_id]): self.requests[s.request_id]
                   for _, s in appended}
        children = []
        for i, (row, index) in enumerate(forks):
            parent = out.seqs[row]
            children.append(self._fork(parent, index, int(sampled.tokens[len(out.sample) + i]),
                                       sampled, len(out.sample) + i))
        for request, plan in beam_plans:
            children += self._advance_beams(request, plan)
        for seq in [seq for _, seq in appended] + children:
            self._check_stop(seq)
        for request in touched.values():
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            self._maybe_finish(request, now)
        return list(touched.values())

    def _record(self, seq: Sequence, token: int, sampled, row: int) -> None:
        """Logprob bookkeeping of a token about to be appended to ``seq``."""
        request = self.requests[seq.request_id]
        if request.beam_width:   # a beam's score comes from its chosen candidate
            return
        stream = request.streams[seq.seq_id]
        stream.cumulative_logprob += float(sampled.logprobs[row])
        if request.params.logprobs is not None:
            top = {int(t): float(lp) for t, lp in zip(
                sampled.top_ids[row, :request.params.logprobs],
                sampled.top_logprobs[row, :request.params.logprobs])}
            top[token] = float(sampled.logprobs[row])
            stream.logprobs.append(top)

    def _fork(self, parent: Sequence, index: int, token: int, sampled, row: int):
        """Completion ``index`` of a parallel-sampling request starts as a fork of ``parent``
        (sharing its pages), with its own first token."""
        request = self.requests[parent.request_id]
        child_id = f"{parent.request_id}#{index}"
        request.streams[child_id] = Stream(index, request.seeds[index])
        if parent.status is RUNNING:
            child = self.scheduler.fork(parent, child_id, token)
        else:   # the parent stopped at once (max_tokens=1): the child is done too
            child = _finished_variant(parent, child_id, token, parent.finish_reason)
        request.seqs[child_id] = child
        self._record(child, token, sampled, row)
        return child

    def _check_stop(self, seq: Sequence) -> None:
        """Detokenize, then apply EOS, stop token ids and stop strings (the text is cut
        before the stop string): the sequence finishes with reason "stop", also when the
        length limit stopped it in the same step. Beams stop through their candidates and
        are detokenized when they finish."""
        request = self.requests[seq.request_id]
        if request.beam_width:
            return
        params = request.params
        stream = request.streams[seq.seq_id]
        stop = self._is_stop_token(params, seq.token_ids[-1])
        if self.tokenizer is not None:
            stream.text = self._decode(seq.output_token_ids)
            for s in params.stop:
                at = stream.text.find(s)
                if at >= 0:
                    stream.text, stop = stream.text[:at], True
                    break
        if not stop:
            return
        if seq.status is FINISHED:
            seq.finish_reason = "stop"
        else:
            self.scheduler.finish(seq, "stop")

    def _is_stop_token(self, params: SamplingParams, token: int) -> bool:
        return token in params.stop_token_ids or (not params.ignore_eos
                                                  and token in self.eos_token_ids)

    # -- beam search -----------------------------------------------------------------

    def _plan_beams(self, out: SchedulerOutput, sampled, tokens):
        """Choose each beam request's next beams; rewrites ``tokens`` for the parents that
        continue, so ``Scheduler.update`` appends the chosen token."""
        by_request: dict[str, list[int]] = {}
        for row, seq in enumerate(out.seqs):
            request = self.requests[seq.request_id]
            if out.sample[row] and request.beam_width:
                by_request.setdefault(request.request_id, []).append(row)
        plans = []
        for request_id, rows in by_request.items():
            request = self.requests[request_id]
            width = request.beam_width
            beams = [out.seqs[r] for r in rows]
            # Each live beam's top 2 * width tokens hold the global top 2 * width: rank
            # those, padding the group to `width` rows with beams that do not exist.
            top = np.full((width, 2 * width), -np.inf, np.float32)
            top[:len(rows)] = sampled.top_logprobs[rows, :2 * width]
            scores = np.full(width, -np.inf, np.float32)
            scores[:len(rows)] = [request.streams[s.seq_id].cumulative_logprob for s in beams]
            parents, columns, new_scores = (np.asarray(x)[0] for x in beam_candidates(
                jnp.asarray(top), jnp.asarray(scores), width))
            ids = sampled.top_ids[np.asarray(rows)[np.minimum(parents, len(rows) - 1)], columns]
            chosen, finished = [], []
            for parent, token, score in zip(np.asarray(parents), np.asarray(ids),
                                            np.asarray(new_scores)):
                if len(chosen) == width:
                    break
                candidate = (int(parent), int(token), float(score))
                stops = self._is_stop_token(request.params, int(token))
                (finished if stops else chosen).append(candidate)
            for parent, token, _ in reversed(chosen):   # the best one per parent wins
                tokens[rows[parent]] = token
            plans.append((request, (beams, chosen, finished)))
        return plans

    def _advance_beams(self, request: Request, plan) -> list[Sequence]:
        """Carry out a beam step: chosen candidates continue their parent beam (the first
        in place, the others as forks sharing its pages); a candidate ending on a stop
        token, or reaching the length limit, becomes a finished hypothesis; beams left
        without a candidate are dropped."""
        beams, chosen, finished = plan
        for parent, token, score in finished:
            self._hypothesis(request, beams[parent], token, score, "stop")
        children, continued = [], set()
        for parent, token, score in chosen:
            beam = beams[parent]
            if beam.status is FINISHED:   # update() stopped it on length
                self._hypothesis(request, beam, token, score, "length")
            elif parent not in continued:        # update() appended this token already
                continued.add(parent)
                request.streams[beam.seq_id].cumulative_logprob = score
            else:
                child_id = f"{request.request_id}#{next(self._ids)}"
                child = self.scheduler.fork(beam, child_id, token)
                request.seqs[child_id] = child
                request.streams[child_id] = Stream(0, request.seeds[0], score)
                children.append(child)
        done = len(request.hypotheses) >= request.beam_width
        for parent, beam in enumerate(beams):
            if beam.status is not FINISHED and parent not in continued:
                self.scheduler.finish(beam, "pruned")
        for seq_id, seq in list(request.seqs.items()):
            if done and seq.status is not FINISHED:
                self.scheduler.finish(seq, "pruned")
            if seq.status is FINISHED:   # what it produced lives on in the hypotheses
                del request.seqs[seq_id], request.streams[seq_id]
        return [child for child in children if child.status is not FINISHED]

    def _hypothesis(self, request: Request, beam: Sequence, token: int, score: float,
                    reason: str) -> None:
        """A finished beam: ``beam``'s tokens before this step's, then ``token``."""
        request.hypotheses.append((score, _finished_variant(
            beam, f"{beam.seq_id}/{len(request.hypotheses)}", token, reason)))

    # -- outputs ---------------------------------------------------------------------

    def _maybe_finish(self, request: Request, now: float) -> None:
        if any(s.status is not FINISHED for s in request.seqs.values()):
            return
        request.finished = True
        request.metrics.finished_time = now
        request.metrics.num_output_tokens = max(
            (s.num_output_tokens for s in request.seqs.values()), default=0)
        self.requests.pop(request.request_id, None)

    def _output(self, request: Request) -> RequestOutput:
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             request.completions(self._decode), request.finished,
                             request.metrics)


class LLM:
    """Offline generation: ``LLM("tiny").generate(prompts, SamplingParams(...))``.

    model: ``"tiny"``, a checkpoint directory, or a model bundle (a
    ``jpaged.interfaces.Model``). The KV pool holds
    ``num_pages`` pages of ``page_size`` tokens, or as many as fit in ``kv_cache_bytes``.
    ``watermark``: the fraction of the pool that admitting new prompts leaves free for the
    running sequences to grow into; higher means fewer preemptions and a smaller batch.
    ``static_batching`` admits new prompts only while the batch is still filling, then runs
    it to completion (the dense-cache baseline sets it, with one page of ``max_model_len``
    tokens per sequence).

    Several devices (``jpaged.parallel``): ``tensor_parallel=N`` splits heads, the MLP and
    the KV pool over N devices; ``data_parallel=R`` runs R such replicas, each with its own
    pool and scheduler, requests going to the least loaded (to the one holding their
    prefix with ``prefix_routing``); or ``mesh=`` a ``jax.sharding.Mesh`` with axes
    ``"data"`` and/or ``"model"``. ``kv_cache_bytes`` is then per device.

    ``memory_utilization``: size the pool instead from that fraction of each device's
    memory, less what the weights use (``jpaged.llm_options.kv_bytes_from_utilization``;
    64 MiB per device where the device reports no memory, as a CPU). ``host_cache_bytes``:
    the swap pool in bytes per device, instead of ``num_host_pages``.

    vLLM's names work too, with vLLM's meaning (``jpaged.llm_options.VLLM_NAMES``):
    ``tensor_parallel_size``, ``data_parallel_size``, ``block_size``,
    ``gpu_memory_utilization``, ``swap_space`` (GiB).
    """

    @accepts_vllm_names
    def __init__(self, model: str | Model = "tiny", *, page_size: int = 16,
                 num_pages: int | None = None, kv_cache_bytes: int | None = None,
                 memory_utilization: float | None = None, dtype=None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, preemption_mode: str = "recompute",
                 num_host_pages: int | None = None, host_cache_bytes: int | None = None,
                 watermark: float = 0.01,
                 static_batching: bool = False, seed: int = 0,
                 mesh=None, tensor_parallel: int | None = None,
                 data_parallel: int | None = None, prefix_routing: bool = False):
        layout = parallel.Layout.create(model, mesh, tensor_parallel, data_parallel)
        if isinstance(model, str) and layout is None:
            model = model_loading.load_model(model, dtype)
        replicas = [(model, None)] if layout is None else layout.load(model, dtype)
        model = replicas[0][0]
        config = model.config
        max_model_len = max_model_len or config.max_position_embeddings
        if max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
        dtype = jnp.dtype(dtype or jax.tree.leaves(model.params)[0].dtype)
        geometry = (config.num_layers, config.num_kv_heads, config.head_dim, page_size)
        model_size = layout.model_size if layout else 1
        if sum(x is not None for x in (num_pages, kv_cache_bytes, memory_utilization)) > 1:
            raise ValueError(f"pass one of num_pages={num_pages}, kv_cache_bytes="
                             f"{kv_cache_bytes}, memory_utilization={memory_utilization}")
        if memory_utilization is not None:
            devices = {d for replica, _ in replicas
                       for leaf in jax.tree.leaves(replica.params) for d in leaf.devices()}
            kv_cache_bytes = kv_bytes_from_utilization(
                memory_utilization, sorted(devices, key=lambda d: d.id))
        if num_pages is None:
            budget = (kv_cache_bytes or FALLBACK_KV_BYTES) * model_size
            num_pages = KVCache.pages_for_memory(budget, *geometry, dtype)
        if num_host_pages is not None and host_cache_bytes is not None:
            raise ValueError(f"pass one of num_host_pages={num_host_pages}, "
                             f"host_cache_bytes={host_cache_bytes}")
        num_host_pages = num_host_pages or 0
        if host_cache_bytes:
            num_host_pages = KVCache.pages_for_memory(host_cache_bytes * model_size,
                                                      *geometry, dtype)
        self.max_model_len = max_model_len
        engines = []
        for replica, sharding in replicas:
            cache = KVCache.create(*geometry, num_pages, dtype, sharding)
            block_manager = BlockManager(num_pages, page_size, num_host_pages=num_host_pages,
                                         watermark=watermark,
                                         enable_prefix_caching=enable_prefix_caching)
            scheduler = Scheduler(block_manager, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  max_model_len=max_model_len, preemption_mode=preemption_mode,
                                  static_batching=static_batching)
            engines.append(LLMEngine(replica, cache, scheduler, seed=seed + len(engines),
                                     num_host_pages=num_host_pages))
        self.engine: Engine = (engines[0] if layout is None
                               else layout.engine(engines, prefix_routing))

    def stream(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Add the prompts, then yield a ``RequestOutput`` each time one makes progress."""
        ids = self._add(prompts, params)
        pending = set(ids)
        while pending:
            for output in self.engine.step():
                if output.request_id in pending:
                    if output.finished:
                        pending.discard(output.request_id)
                    yield output

    def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress=None) -> list[RequestOutput]:
        """Finished outputs in the order of ``prompts``. ``progress`` (e.g. a tqdm bar) gets
        ``update(1)`` per finished request."""
        finished = {}
        for output in self.stream(prompts, params):
            if output.finished:
                finished[output.request_id] = output
                if progress is not None:
                    progress.update(1)
        return sorted(finished.values(), key=lambda o: self._order[o.request_id])

    def _add(self, prompts, params) -> list[str]:
        """Add every prompt, or none: a bad one aborts those this call already added."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except ValueError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        self._order = {request_id: i for i, request_id in enumerate(ids)}
        return ids
