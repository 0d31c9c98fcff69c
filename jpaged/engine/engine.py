"""LLMEngine and LLM: the step loop that joins the scheduler, the model and the cache.

Each ``LLMEngine.step()`` is the map's four steps: the scheduler plans the rows and
reserves their slots (host), the batch builder lays the plan out as a ``StepBatch``, the
runner moves pages and runs one jitted step that samples on the device, and the engine
applies the sampled ids: appends them, forks parallel samples and beams, applies the stop
rules and reports outputs (host). Records live in ``jpaged.host.request``, beam search in
``jpaged.host.beam_search``, stop rules in ``jpaged.host.stop``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence as Seq

import jax
import numpy as np

from jpaged.engine import model_loading
from jpaged.engine import offline
from jpaged.engine.stats import StatsLogger
from jpaged.host.chat import ChatTemplate, chat_messages
from jpaged.parallel import mesh as parallel
from jpaged.engine import snapshot
from jpaged.engine import overlap
from jpaged.engine.batch import BatchBuilder, SamplingRow, StepBatch
from jpaged.engine.host_state import check_state, make_scheduler
from jpaged.host import beam_search
from jpaged.host.journal import deferred_interrupts
from jpaged.core.cache import KVCache, kv_cache_dtype as resolve_kv_cache_dtype
from jpaged.core.interfaces import Engine, Model
from jpaged.engine.config import (FALLBACK_KV_BYTES, EngineConfig,
                                 kv_bytes_from_utilization)
from jpaged.host.request import (CompletionOutput, Logprob, Request, RequestOutput, Stream,
                                 finished_copy, prompt_token_ids, restore_streams)
from jpaged.engine.runner import ModelRunner
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.scheduler import PageMoves, Scheduler, StepPlan
from jpaged.host.sequence import PLACEHOLDER, Sequence, SequenceStatus
from jpaged.core.shapes import bucket
from jpaged.host.stop import StopRules
from jpaged.host.grammar import GrammarCompiler
from jpaged.host.token_rules import TokenRules

RUNNING, FINISHED = SequenceStatus.RUNNING, SequenceStatus.FINISHED

__all__ = ["LLM", "CompletionOutput", "LLMEngine", "RequestOutput"]


class LLMEngine:
    """Continuous batching over a paged KV cache: ``add_request``, ``abort``, ``step``.

    model: see ``jpaged.core.interfaces.Model``. An ``jpaged.core.interfaces.Engine``.
    """

    def __init__(self, model: Model, cache: KVCache, scheduler: Scheduler, *, seed: int = 0,
                 num_host_pages: int = 0, attention_impl: str = "auto",
                 async_scheduling: bool = False):
        self.model = model
        self.scheduler = scheduler
        self.batcher = BatchBuilder.for_scheduler(scheduler)
        self.runner = ModelRunner(model, cache, num_host_pages, attention_impl)
        self.tokenizer = model.tokenizer
        self.stop = StopRules(model.eos_token_ids, self.tokenizer)
        self.rng = np.random.default_rng(seed)
        self.requests: dict[str, Request] = {}
        self._grammars: GrammarCompiler | None = None
        self.next_id = 0   # of requests without an id, and of beams' sequences
        self.num_steps = 0
        self.host_time = 0.0
        self.step_time = 0.0
        # Fault isolation (see `step`); `can_step`: False while steps fail for every request.
        self.isolate_faults = True
        self.can_step = True
        self._suspects = None   # the request ids of the step being run, for `_isolate`
        self._final_only: set[str] = set()      # live requests added with stream=False
        # Async scheduling (see `_step_async`): the step on the device, outputs resolved
        # outside `step` not yet returned, live requests that `needs_each_token`.
        self.async_scheduling = async_scheduling
        self._inflight: overlap.InFlight | None = None
        self._ready: list[RequestOutput] = []
        self._sync_ids: set[str] = set()
        # Live requests that ask for logprobs or prompt logprobs or use penalties: while
        # there are none and none ``needs_each_token``, a step builds its batch without a
        # per-row record (``_build``).
        self._record_ids: set[str] = set()

    # -- state -----------------------------------------------------------------------

    # Attributes ``state_dict`` leaves out: the model and what is built from it, and the
    # ``runner``, whose pool a snapshot saves as arrays (``jpaged.engine.snapshot``).
    # ``_final_only``: requests added with ``stream=False`` (a restored one reports every
    # step). Async scheduling: the option; the step in flight and the outputs not yet
    # returned (``state_dict`` synchronizes first: neither is left); the requests that
    # ``needs_each_token``, rebuilt from the requests.
    DERIVED = ("model", "batcher", "runner", "tokenizer", "stop", "isolate_faults", "can_step",
               "_suspects", "_final_only", "_grammars", "async_scheduling", "_inflight",
               "_ready", "_sync_ids", "_record_ids")

    def state_dict(self) -> dict:
        """The host state between two steps: the id counter, the RNG, the step counters,
        every request (``Request.state_dict``, times as ages) and the scheduler's state.
        Sequences appear as the objects themselves, shared between the requests and the
        scheduler (a writer such as ``jpaged.engine.snapshot`` writes each once). A step
        in flight is applied first (``synchronize``)."""
        self.synchronize()
        clock = time.perf_counter()
        return {"next_id": self.next_id, "rng": self.rng.bit_generator.state,
                "num_steps": self.num_steps, "host_time": self.host_time,
                "step_time": self.step_time,
                "requests": [r.state_dict(clock) for r in self.requests.values()],
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Take the host state of ``state_dict`` (of an engine with the same options and
        model), checked whole (``check_state``): a ValueError names the first problem.
        The pool is not part of it."""
        requests, rng = check_state(state, self.scheduler, self.model.config.vocab_size)
        self.requests, self.rng = requests, rng
        self._final_only, self._inflight, self._ready = set(), None, []
        self._sync_ids = {rid for rid, r in requests.items()
                          if overlap.needs_each_token(r.params)}
        self._record_ids = {rid for rid, r in requests.items() if _needs_row_record(r.params)}
        self.next_id = state["next_id"]
        self.num_steps = state["num_steps"]
        self.host_time, self.step_time = float(state["host_time"]), float(state["step_time"])

    # -- requests --------------------------------------------------------------------

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    stream: bool = True) -> str:
        """Queue a prompt (text, or a list of token ids); returns its request id.
        ``stream=False``: ``step`` reports the request only when it finishes (building an
        output every step costs time proportional to its length)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        request_id = self._next_id() if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = prompt_token_ids(prompt, self.tokenizer)
        if params.truncate_prompt_tokens is not None:
            token_ids = token_ids[-params.truncate_prompt_tokens:]
        vocab = self.model.config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {request_id!r}: token id {bad[0]} is outside the "
                             f"vocabulary [0, {vocab})")
        self._check_bounds(params)
        # max_tokens None: up to the context, where the scheduler stops every sequence.
        max_tokens = params.max_tokens or self.scheduler.max_model_len
        rules = self._make_rules(params)   # checks ids, compiles the grammar, or raises
        scheduler = self.scheduler
        with scheduler.transaction():   # all or nothing, like a step
            seq = scheduler.add_request(request_id, token_ids, max_tokens, priority,
                                        extra_keys=_prompt_logprobs_key(params))
            scheduler.journal.attr(self.rng.bit_generator, "state")
            request = Request(request_id, text, token_ids, params,
                              params.sequence_seeds(self.rng), time.perf_counter())
            request.rules = rules
            request.seqs[seq.seq_id] = seq
            request.streams[seq.seq_id] = Stream(0, request.seeds[0])
            scheduler.journal.item(self.requests, request_id)
            self.requests[request_id] = request
        if not stream:   # once the add has succeeded
            self._final_only.add(request_id)
        if overlap.needs_each_token(params):
            self._sync_ids.add(request_id)
        if _needs_row_record(params):
            self._record_ids.add(request_id)
        return request_id

    def _check_bounds(self, params: SamplingParams) -> None:
        """``params`` against the model and the configuration: values the sampler's int32
        columns and top-k calls can hold, and no more sequences than one step runs."""
        vocab = self.model.config.vocab_size
        if params.top_k > vocab:
            raise ValueError(f"top_k={params.top_k} exceeds the vocabulary size {vocab} "
                             f"(-1 or 0 turn top-k off)")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ValueError(f"logprobs={params.logprobs} exceeds the vocabulary size {vocab}")
        width, limit = params.num_sequences, self.scheduler.max_num_seqs
        name = "best_of" if params.best_of is not None else "n"
        if width > limit:
            raise ValueError(f"{name}={width} exceeds max_num_seqs={limit}, the sequences "
                             f"one step runs")
        if params.use_beam_search and 2 * width > vocab:
            raise ValueError(f"{name}={width} beams need 2 * {width} candidates per step, "
                             f"more than the vocabulary size {vocab}")

    def _make_rules(self, params: SamplingParams) -> TokenRules | None:
        """``params``' token rules (None without any); the grammar compiler is built with
        the first structured-output request."""
        if not params.uses_token_rules:
            return None
        if params.guided is not None and self._grammars is None:
            if self.tokenizer is None:
                raise ValueError(f"guided_{params.guided[0]} needs a tokenizer (structured "
                                 f"outputs constrain text); this model has none")
            self._grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size,
                                             self.stop.eos_token_ids)
        return TokenRules(params, self.model.config.vocab_size, self.stop.eos_token_ids,
                          self.tokenizer, self._grammars)

    def _rules(self, request: Request) -> TokenRules | None:
        """The request's token rules, rebuilt when missing (after a snapshot restore);
        a request without any keeps False, so its steps never ask its params again."""
        if request.rules is None:
            request.rules = self._make_rules(request.params) or False
        return request.rules or None

    def _rule_row(self, row: int, request: Request, seq: Sequence, seed: int) -> SamplingRow:
        """A sampling row with the token rules of ``seq``'s next token, if any."""
        rules = self._rules(request)
        if rules is None:
            return SamplingRow(row, request.params, seed, seq)
        if seq.seq_id not in request.grammar_states:
            request.grammar_states[seq.seq_id] = rules.new_state()
        outputs = seq.output_token_ids
        return SamplingRow(row, request.params, seed, seq, rules.bias_entries(outputs),
                           rules.mask(request.grammar_states[seq.seq_id], outputs))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages. With a step in flight, the token it computes
        for the request is dropped when it comes back; an output resolved but not yet
        returned is dropped too."""
        request_id = str(request_id)
        self._ready = [o for o in self._ready if o.request_id != request_id]
        if request_id not in self.requests:
            raise ValueError(f"unknown request id {request_id!r}")
        with self.scheduler.transaction():
            self.scheduler.journal.item(self.requests, request_id)
            self.requests.pop(request_id)
            if request_id in self.scheduler.requests:
                self.scheduler.abort(request_id)
        self._final_only.discard(request_id)
        self._sync_ids.discard(request_id)
        self._record_ids.discard(request_id)
        if not self.requests:   # the step in flight, if any, holds only dropped rows
            self._inflight = None

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, a step in flight, or outputs not yet returned."""
        return bool(self.requests or self._inflight or self._ready)

    def metrics(self) -> dict:
        """Queue lengths, pool use, prefix-cache and preemption counters (see
        ``Scheduler.metrics``); ``num_pages``: the pool's pages, the null page included;
        ``step_seconds``: wall time spent in ``step`` so far, ``host_seconds`` the part of
        it outside the device call."""
        return {**self.scheduler.metrics(), "num_pages": self.scheduler.block_manager.num_pages,
                "step_seconds": self.step_time, "host_seconds": self.host_time}

    def warm_up(self) -> int:
        """Compile every step shape this configuration can produce
        (``BatchBuilder.step_shapes``), running each once on the null page; returns how
        many. What requests add later compiles at first use: top logprobs, the extra
        sampling rows of parallel samples' first tokens, penalties' token histories."""
        none = np.zeros((0, 2), np.int32)
        self.synchronize()   # the pool is threaded through every call: nothing in flight
        shapes = self.batcher.step_shapes()
        for shape in shapes:
            self.runner.execute(PageMoves(none, none, none), self.batcher.warmup_batch(*shape))
        return len(shapes)

    @property
    def eos_token_ids(self) -> set[int]:
        return self.stop.eos_token_ids

    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations

    # -- one step --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that made progress (finished ones last time).

        The map's four steps: plan (host), build the batch, run it (device), apply it.
        All or nothing: it is one transaction of the scheduler's journal, which records
        every change of the host state (block manager, scheduler, sequences, requests)
        before it is made; if anything raises, ``_roll_back`` replays it backwards.

        Fault isolation (``isolate_faults``): if the step raised an ``Exception``, the
        requests that make it fail are searched for (``_isolate``) and finished with
        reason "error"; the others go on as if nothing had happened. A failure that is
        no request's (every one fails, even alone) is re-raised and ``can_step`` is False
        until a step succeeds. A ``KeyboardInterrupt`` is re-raised at once.

        With ``async_scheduling`` the outputs are those of the step before, which the
        device ran while this one was planned (see ``_step_async``)."""
        try:
            outputs = self._step_async() if self.async_scheduling else self._step()
        except Exception as error:
            if not self.isolate_faults:
                self.can_step = False
                raise
            outputs = self._isolate(error)
        self.can_step = True
        ready, self._ready = self._ready, []
        return ready + outputs

    def _step(self) -> list[RequestOutput]:
        """One synchronous step: plan, build, run, apply (the step after which nothing is
        in flight)."""
        start = time.perf_counter()
        scheduler = self.scheduler
        scheduler.begin()
        self._suspects = None
        try:
            plan = scheduler.schedule()
            self._suspects = list(dict.fromkeys(seq.request_id for seq in plan.seqs))
            if plan.seqs:
                forks = self._pending_forks(plan)
                batch = self._build(plan, forks)
                scheduler.device_may_write()
                sampled = self._run(plan, batch)
                outputs = self._apply(plan, batch, forks, sampled)
                scheduler.commit()   # in here: a fault up to its last instruction undoes
        except BaseException:
            self._roll_back()
            raise
        if not plan.seqs:
            self._roll_back()   # its preemptions' swap-outs will not run
            return self._idle()
        self._count_step(start)
        return outputs

    def _roll_back(self) -> None:
        """The step failed: the scheduler undoes it (and repairs what the device may have
        overwritten); if the failure consumed the donated pool, a zeroed one replaces it
        and every running sequence recomputes. A Ctrl-C waits until this is done."""
        with deferred_interrupts():
            self.scheduler.roll_back()
            self.batcher.forget()
            if self.runner.replace_lost_cache():
                self.scheduler.drop_device_pages()

    # -- async scheduling --------------------------------------------------------------

    def _step_async(self) -> list[RequestOutput]:
        """Plan, build and dispatch this step (N+1), then wait for the step before it (N)
        and apply its tokens while N+1 runs on the device: one transaction.

        Rows continuing from N hold a ``PLACEHOLDER`` on the host; their token reaches
        N+1 on the device (``overlap.feed``). A stop found in N's tokens takes effect
        now: the token N+1 computes for that row is dropped, its placeholder removed and
        its pages freed (as for a request aborted while its step is in flight). While a
        request ``needs_each_token`` the engine steps synchronously.

        Failures: anything raised rolls the transaction back through the journal (N+1's
        plan, its device writes repaired as in a synchronous step, and N's host update):
        the state before this call, N still in flight. A device error of N itself, seen
        only when its ids are fetched, also fails N+1 (which read N's tokens and pool):
        the pool is replaced and N is cancelled (``_lose``)."""
        if self._sync_ids:
            self._sync_ids = {r for r in self._sync_ids if r in self.requests}
        if self._sync_ids:
            self._settle()
            return self._step()
        start = time.perf_counter()
        scheduler, prev = self.scheduler, self._inflight
        lost = False
        scheduler.begin()
        self._suspects = None
        try:
            plan = scheduler.schedule()
            self._suspects = list(dict.fromkeys(
                [seq.request_id for seq in plan.seqs]
                + ([seq.request_id for seq in prev.plan.seqs] if prev else [])))
            step = None
            if not plan.seqs:
                scheduler.roll_back()   # its preemptions' swap-outs will not run
                if prev is None:
                    return self._idle()
                scheduler.begin()
            else:
                batch = self._build(plan, [])
                fed = overlap.feed(plan, batch, prev)
                placeholders = overlap.placeholders_of(plan)
                scheduler.device_may_write()
                result = self.runner.dispatch(plan.moves, batch, fed)
                step = overlap.InFlight(plan, batch, result, placeholders,
                                        self._scored(plan)[0])
                # Placeholders now, so the next plan continues these rows; the length limit
                # is known without the token. The prefix cache takes the pages this step
                # computes now too (a step reading them runs after it on the device; a
                # device error forgets the whole cache), except one holding a placeholder.
                scheduler.update(plan, [PLACEHOLDER] * plan.num_seqs)
            outputs = []
            if prev is not None:
                scheduler.device_may_write()   # as in ``synchronize``: even with no plan
                lost = True
                self._fetch(prev)
                lost = False
                outputs = self._apply_inflight(prev)
            self._inflight = step
            scheduler.commit()   # in here: a fault up to its last instruction undoes
        except BaseException:
            self._inflight = prev
            self._roll_back()
            if lost:
                self._lose()
            raise
        if not self.requests:   # what is in flight belongs to finished requests only
            self._inflight = None
        self._count_step(start)
        return outputs

    def _fetch(self, step: overlap.InFlight) -> None:
        """Wait for ``step``'s sampled ids (kept on it: fetched once)."""
        if step.sampled is None:
            wait = time.perf_counter()
            step.sampled = self.runner.fetch(step.result)
            self.host_time -= time.perf_counter() - wait   # _count_step adds it back

    def _apply_inflight(self, step: overlap.InFlight) -> list[RequestOutput]:
        """Apply a dispatched step's fetched ids: fill its placeholders, record logprobs,
        apply the stop rules. Rows whose request was aborted or whose placeholder a stop
        already dropped are skipped. Its rows never fork: each changes its stream only
        (``Stream.record``) and, on its first and last token, its request's metrics."""
        plan, sampled = step.plan, step.sampled
        journal, requests = self.scheduler.journal, self.requests
        self._record_prompt(plan, step.batch, sampled, step.scored)
        tokens = np.asarray(sampled.tokens).tolist()
        logprobs = np.asarray(sampled.logprobs).tolist()
        now = time.perf_counter()
        placeholders = step.placeholders
        # Write-ahead: the undo records are in the journal before the loop fills them.
        streams, filled = [], []
        journal.call(restore_streams, streams)
        journal.call(_put_placeholders, filled)
        rows, ends, touched = [], [], []
        for row, seq in enumerate(plan.seqs):
            request = requests.get(seq.request_id)
            if request is None or request.seqs.get(seq.seq_id) is not seq:
                continue
            if not request.metrics.scheduled:
                self._scheduled(request, plan.start_positions[row])
            held = placeholders.get(seq.seq_id)
            if held is None:
                continue
            index, token_ids = held[1], seq.token_ids
            if index >= len(token_ids) or token_ids[index] != PLACEHOLDER:
                continue   # a stop in an earlier step dropped it
            stream = request.streams[seq.seq_id]
            streams.append(stream.record())
            filled.append((token_ids, index))
            token = token_ids[index] = tokens[row]
            stream.cumulative_logprob += logprobs[row]
            if request.params.logprobs is not None:
                self._top_logprobs(stream, request.params, token, sampled, row)
            rows.append((request.params, seq, stream))
            ends.append(index + 1)
            touched.append(request)
        self._check_stops(rows, ends)
        for request in touched:
            self._progressed(request, now)
        return self._outputs(touched)

    def synchronize(self) -> None:
        """Wait for the step in flight, if any, and apply it in a transaction of its own;
        ``step`` returns its outputs next (snapshots, warm-up and synchronous steps need
        the host state of a finished step). A failure rolls the update back (the step
        stays in flight) and is re-raised; a device error cancels the step (``_lose``)."""
        step = self._inflight
        if step is None:
            return
        scheduler, lost = self.scheduler, False
        scheduler.begin()
        try:
            # The step ran on the device: a failure to fetch it is a device error
            # (``_lose``), which changes the pool, not an undo of host state alone.
            scheduler.device_may_write()
            lost = True
            self._fetch(step)
            lost = False
            outputs = self._apply_inflight(step)
            self._inflight = None
            scheduler.commit()
        except BaseException:
            self._inflight = step
            self._roll_back()
            if lost:
                self._lose()
            raise
        self._ready += outputs

    def _settle(self) -> None:
        """Nothing in flight after this: ``synchronize``, or if applying the step fails
        with an ``Exception`` (a request's fault: ``_isolate`` finds it in synchronous
        steps), cancel it: its rows recompute."""
        try:
            self.synchronize()
        except Exception:   # noqa: BLE001 - the synchronous steps meet it again
            if self._inflight is not None:
                with deferred_interrupts():
                    self._cancel(self._inflight)

    def _lose(self) -> None:
        """The step in flight failed on the device (its ids never came back): the pool it
        and any later step produced carries the error, so a zeroed one replaces it and
        every running sequence recomputes (``Scheduler.drop_device_pages``); the step is
        cancelled (``_cancel``)."""
        with deferred_interrupts():
            step = self._inflight
            self.runner.replace_lost_cache(force=True)
            self.scheduler.drop_device_pages()
            if step is not None:
                self._cancel(step)

    def _cancel(self, step: overlap.InFlight) -> None:
        """Forget a dispatched step whose ids will never be applied: each of its sampling
        rows drops its placeholder and recomputes from its tokens (``Scheduler.restart``;
        a sequence the placeholder finished on length comes back). Outside a
        transaction, like an undo's repairs."""
        self._inflight = None
        for row, seq in enumerate(step.plan.seqs):
            request = self.requests.get(seq.request_id)
            held = step.placeholders.get(seq.seq_id)
            if request is None or request.seqs.get(seq.seq_id) is not seq or held is None:
                continue
            index = held[1]
            if index < len(seq.token_ids) and seq.token_ids[index] == PLACEHOLDER:
                del seq.token_ids[index:]
                self.scheduler.restart(seq)

    def _isolate(self, error: Exception) -> list[RequestOutput]:
        """The step failed with ``error`` and was rolled back: bisect its requests (those
        of its plan, or every request if planning failed). A group that fails is split
        and each half retried as a step of its own (``Scheduler.only``); a half that
        succeeds has made its step. A request failing alone is a culprit, finished with
        reason "error". If every request fails, nobody is to blame: ``error`` is
        re-raised and ``can_step`` is False."""
        self._settle()   # the bisection steps synchronously
        suspects = self._suspects or list(self.requests)
        outputs, culprits = [], []

        def search(group: list[str]) -> None:   # ``group``'s step just failed
            if len(group) == 1:
                culprits.append(group[0])
                return
            for part in (group[:len(group) // 2], group[len(group) // 2:]):
                try:
                    with self.scheduler.only(part):
                        outputs.extend(self._step())
                except Exception:   # noqa: BLE001 - a culprit is in this part
                    search(part)

        if len(suspects) == 1:   # the step had one request: once more, alone
            try:
                with self.scheduler.only(suspects):
                    return self._step()
            except Exception:   # noqa: BLE001
                pass
        search(suspects)
        if len(culprits) == len(suspects) and len(suspects) > 1 or not suspects:
            self.can_step = False
            raise error
        for request_id in culprits:
            outputs.append(self._fail(request_id, error))
        return outputs

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        """Finish every sequence of a request whose steps fail with reason "error"."""
        request, scheduler = self.requests[request_id], self.scheduler
        with scheduler.transaction():
            scheduler.journal.call(request.restore, request.state())
            scheduler.journal.item(self.requests, request_id)
            for seq in list(scheduler.requests.get(request_id, ())):
                scheduler.finish(seq, "error")
            for seq in request.seqs.values():
                if seq.finish_reason is None:   # finished outputs keep their reason
                    scheduler.journal.attr(seq, "finish_reason")
                    seq.finish_reason = "error"
            request.error = f"{type(error).__name__}: {error}"
            self._maybe_finish(request, time.perf_counter())
        return self._output(request)

    def _idle(self) -> list[RequestOutput]:
        if self.scheduler.waiting or self.scheduler.swapped:
            raise RuntimeError("the scheduler could not run anything: the pool is too "
                               "small for the waiting requests")
        return []

    def _plain(self) -> bool:
        """Whether every live request's rows are plain: no token rules, penalties, forks,
        beams, logprobs or prompt logprobs (then a step needs no per-row record)."""
        for ids in (self._sync_ids, self._record_ids):
            if ids and not ids.isdisjoint(self.requests):
                return False
            ids.clear()   # only finished requests: forget them
        return True

    def _row_params(self, seq: Sequence) -> tuple[SamplingParams, int]:
        """``(params, seed)`` of ``seq``'s samples (``BatchBuilder.build``'s lookup)."""
        request = self.requests[seq.request_id]
        return request.params, request.streams[seq.seq_id].seed

    def _build(self, plan: StepPlan, forks: list[tuple[int, int]]) -> StepBatch:
        """The step's batch: the plan's rows, each sampling with its sequence's params and
        seed, then one extra row per pending fork (see ``_pending_forks``). When every row
        is plain (``_plain``) the persistent sampling columns are read directly."""
        if not forks and self._plain():
            return self.batcher.build(plan, lookup=self._row_params)
        rows = []
        for row, seq in enumerate(plan.seqs):
            request = self.requests[seq.request_id]
            seed = request.streams[seq.seq_id].seed
            rows.append(self._rule_row(row, request, seq, seed) if plan.sample[row]
                        else SamplingRow(row, request.params, seed, seq))
        for row, index in forks:   # a fork's first token has its parent's rules
            request = self.requests[plan.seqs[row].request_id]
            rows.append(rows[row]._replace(seed=request.seeds[index]))
        # Top logprobs: 2 * width candidates per beam, or what the requests ask for.
        wanted = max([2 * r.beam_width or (r.params.logprobs or 0)
                      for r in map(self.requests.get, {s.request_id for s in plan.seqs})],
                     default=0)
        scored, prompt_top = self._scored(plan)
        # Capped at the vocabulary (admission bounds ``wanted`` by it): a power of two past
        # a vocabulary of 32,000 would be more top-k candidates than logits.
        vocab = self.model.config.vocab_size
        return self.batcher.build(plan, rows, bucket(wanted, 0, vocab) if wanted else 0,
                                  scored, bucket(prompt_top, 0, vocab) if prompt_top else 0)

    def _scored(self, plan: StepPlan) -> tuple[list[tuple[int, int]], int]:
        """Prompt logprobs: ``(row, k)`` for each prefill chunk of a request that asks for
        them (its first k tokens predict prompt tokens), and the most top ids asked."""
        scored, top = [], 0
        if not self._record_ids:   # nobody asks (``_plain`` forgets finished ones)
            return scored, top
        for row, seq in enumerate(plan.seqs):
            params = self.requests[seq.request_id].params
            if params.prompt_logprobs is None:
                continue
            start = plan.start_positions[row]
            k = min(start + plan.num_new_tokens[row], seq.num_prompt_tokens - 1) - start
            if k > 0:
                scored.append((row, k))
                top = max(top, params.prompt_logprobs)
        return scored, top

    def _run(self, plan: StepPlan, batch: StepBatch):
        device_start = time.perf_counter()
        sampled = self.runner.execute(plan.moves, batch)
        self.host_time -= time.perf_counter() - device_start   # _count_step adds it back
        return sampled

    def _count_step(self, start: float) -> None:
        elapsed = time.perf_counter() - start
        self.num_steps += 1
        self.step_time += elapsed
        self.host_time += elapsed

    def _pending_forks(self, plan: StepPlan) -> list[tuple[int, int]]:
        """(row, completion index) for every parallel sample beyond the first whose first
        token comes from a prompt finishing in this step: they share its logits row."""
        forks = []
        for row, seq in enumerate(plan.seqs):
            request = self.requests[seq.request_id]
            if (plan.sample[row] and not request.beam_width and request.params.n > 1
                    and len(request.streams) == 1 and seq.num_output_tokens == 0):
                forks += [(row, index) for index in range(1, request.params.n)]
        return forks

    def _apply(self, plan: StepPlan, batch: StepBatch, forks, sampled) -> list[RequestOutput]:
        """Append sampled tokens, fork samples and beams, stop sequences; host side."""
        self._journal_requests(plan)
        requests = self.requests
        for row, seq in enumerate(plan.seqs):
            request = requests[seq.request_id]
            if not request.metrics.scheduled:
                # A prefix-cache hit starts the first chunk past the cached pages.
                self._scheduled(request, plan.start_positions[row])
        self._record_prompt(plan, batch, sampled)
        rows = len(batch.context_lens)   # the forks' samples follow the padded rows
        tokens = np.array(sampled.tokens[:rows])
        beams = beam_search.choose(plan, requests, sampled, tokens, self.stop)
        now = time.perf_counter()
        appended = [(row, seq) for row, seq in enumerate(plan.seqs)
                    if plan.sample[row] and seq.status is RUNNING]
        for row, seq in appended:
            self._record(seq, int(tokens[row]), sampled, row)
        self.scheduler.update(plan, tokens)
        touched = list({id(r): r for r in (requests[s.request_id] for _, s in appended)
                        }.values())
        children = []
        for i, (row, index) in enumerate(forks, rows):
            children.append(self._fork(plan.seqs[row], index, int(sampled.tokens[i]), sampled,
                                       i))
        for step in beams:
            children += beam_search.advance(step, self.scheduler, self._new_seq_id(step))
        stops = []
        for seq in [seq for _, seq in appended] + children:
            request = requests[seq.request_id]
            if not request.beam_width:   # beams stop through their candidates
                stops.append((request.params, seq, request.streams[seq.seq_id]))
        self._check_stops(stops)
        for request in touched:
            self._progressed(request, now)
        return self._outputs(touched)

    def _journal_requests(self, plan: StepPlan) -> None:
        """Record the requests of the plan's rows, about to change: a request of one
        sampled sequence by its stream (``Stream.record``: O(1); its own fields are
        recorded as they change, see ``_scheduled`` and ``_progressed``), any other
        whole (``Request.state``: O(its streams), forks and beams add sequences)."""
        journal = self.scheduler.journal
        if not journal.active:
            return
        streams, whole = [], {}
        journal.call(restore_streams, streams)   # write-ahead: filled before any change
        for seq in plan.seqs:
            request = self.requests[seq.request_id]
            params = request.params
            if params.num_sequences == 1 and not params.use_beam_search:
                streams.append(request.streams[seq.seq_id].record())
            elif seq.request_id not in whole:
                whole[seq.request_id] = request
                journal.call(request.restore, request.state())

    def _scheduled(self, request: Request, start: int) -> None:
        """The request's first step: ``start`` of its tokens came from the prefix cache."""
        metrics = request.metrics
        self.scheduler.journal.vars(metrics)
        metrics.scheduled, metrics.num_cached_tokens = True, start

    def _progressed(self, request: Request, now: float) -> None:
        """A step gave ``request`` tokens at ``now``: its first token's time, and whether
        it is finished."""
        if request.metrics.first_token_time is None:
            self.scheduler.journal.vars(request.metrics)
            request.metrics.first_token_time = now
        self._maybe_finish(request, now)

    def _new_seq_id(self, step):
        request_id = step.request.request_id
        return lambda: f"{request_id}#{self._next_id()}"

    def _next_id(self) -> str:
        self.scheduler.journal.attr(self, "next_id")   # a beam's sequence: inside a step
        self.next_id += 1
        return str(self.next_id - 1)

    def _record(self, seq: Sequence, token: int, sampled, row: int) -> None:
        """Logprob bookkeeping of a token about to be appended to ``seq``."""
        request = self.requests[seq.request_id]
        if request.beam_width:   # a beam's score comes from its chosen candidate
            return
        stream = request.streams[seq.seq_id]
        stream.cumulative_logprob += float(sampled.logprobs[row])
        if request.params.logprobs is not None:
            self._top_logprobs(stream, request.params, token, sampled, row)

    def _top_logprobs(self, stream: Stream, params: SamplingParams, token: int, sampled,
                      row: int) -> None:
        """Append the sampled ``token``'s and the top ``params.logprobs`` entries of
        ``row`` to ``stream.logprobs``."""
        text = self._token_text if params.detokenize else lambda t: None
        top = {int(t): Logprob(float(lp), rank, text(int(t))) for rank, (t, lp) in
               enumerate(zip(sampled.top_ids[row, :params.logprobs],
                             sampled.top_logprobs[row, :params.logprobs]), 1)}
        top[token] = Logprob(float(sampled.logprobs[row]), int(sampled.ranks[row]),
                             text(token))
        stream.logprobs.append(top)

    def _token_text(self, token: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(
            [token], skip_special_tokens=False)

    def _record_prompt(self, plan: StepPlan, batch: StepBatch, sampled,
                       scored: list[tuple[int, int]] | None = None) -> None:
        """Store the step's prompt logprobs by position (``scored``: the batch's, see
        ``_scored``; a request aborted since is skipped). Not journaled: if the step is
        rolled back, its chunks run again and write the same scores."""
        at = 0
        for row, k in self._scored(plan)[0] if scored is None else scored:
            seq, start = plan.seqs[row], plan.start_positions[row]
            request = self.requests.get(seq.request_id)
            if request is None or request.seqs.get(seq.seq_id) is not seq:
                at += k
                continue
            top = request.params.prompt_logprobs
            text = self._token_text if request.params.detokenize else lambda t: None
            for i in range(at, at + k):
                entry = {int(t): Logprob(float(lp), rank, text(int(t))) for rank, (t, lp) in
                         enumerate(zip(sampled.prompt_top_ids[i, :top],
                                       sampled.prompt_top_logprobs[i, :top]), 1)}
                target = int(batch.prompt_targets[i])
                entry[target] = Logprob(float(sampled.prompt_logprobs[i]),
                                        int(sampled.prompt_ranks[i]), text(target))
                request.prompt_logprobs[start + 1 + i - at] = entry
            at += k

    def _fork(self, parent: Sequence, index: int, token: int, sampled, row: int):
        """Completion ``index`` of a parallel-sampling request starts as a fork of ``parent``
        (sharing its pages), with its own first token."""
        request = self.requests[parent.request_id]
        child_id = f"{parent.request_id}#{index}"
        request.streams[child_id] = Stream(index, request.seeds[index])
        if parent.status is RUNNING:
            child = self.scheduler.fork(parent, child_id, token)
        else:   # the parent stopped at once (max_tokens=1): the child is done too
            child = finished_copy(parent, child_id, token, parent.finish_reason)
        request.seqs[child_id] = child
        self._record(child, token, sampled, row)
        return child

    def _check_stops(self, rows: list[tuple[SamplingParams, Sequence, Stream]],
                     ends: list[int] | None = None) -> None:
        """A sequence meeting a stop rule finishes with reason "stop", also when the length
        limit stopped it in the same step. ``rows``: ``(params, sequence, stream)`` of
        each sequence that got a token (not beams: they stop through their candidates
        and are detokenized when they finish), all detokenized in one batch. ``ends``:
        each sequence's tokens to look at (async scheduling: a placeholder may follow,
        which a stop drops)."""
        if not rows:
            return
        journal = self.scheduler.journal
        stops = self.stop.check_all(rows) if ends is None else self.stop.check_all(rows, ends)
        for i, stop in enumerate(stops):
            if not stop:
                continue
            seq = rows[i][1]
            end = len(seq.token_ids) if ends is None else ends[i]
            if end < len(seq.token_ids):   # the placeholder of the step in flight
                journal.call(_restore_tail, seq.token_ids, end, seq.token_ids[end:])
                del seq.token_ids[end:]
            if seq.status is FINISHED:
                journal.attr(seq, "finish_reason")
                seq.finish_reason = "stop"
            else:
                self.scheduler.finish(seq, "stop")

    # -- outputs ---------------------------------------------------------------------

    def _maybe_finish(self, request: Request, now: float) -> None:
        # A sequence finished on length while its last token is on the device is not done.
        for s in request.seqs.values():
            if s.status is not FINISHED or s.token_ids[-1] == PLACEHOLDER:
                return
        journal = self.scheduler.journal
        journal.attr(request, "finished")
        journal.vars(request.metrics)
        request.finished = True
        request.metrics.finished_time = now
        request.metrics.num_output_tokens = max(
            (s.num_output_tokens for s in request.seqs.values()), default=0)
        journal.item(self.requests, request.request_id)
        self.requests.pop(request.request_id, None)
        self._final_only.discard(request.request_id)

    def _outputs(self, requests) -> list[RequestOutput]:
        """Outputs of the requests that made progress: streamed or finished ones."""
        return [self._output(r) for r in requests
                if r.finished or r.request_id not in self._final_only]

    def _output(self, request: Request) -> RequestOutput:
        outputs = (beam_search.completions(request, lambda ids: self.stop.decode(
                       ids, request.params)) if request.beam_width
                   else request.sampled_completions())
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             outputs, request.finished, request.metrics,
                             request.prompt_logprobs)


def freeze_heap() -> None:
    """Collect garbage, then freeze what is alive (``gc.freeze``): later collections skip
    it. Process-wide; what is frozen is freed by reference counting only (a cycle among
    frozen objects stays: ``gc.unfreeze()`` undoes it)."""
    gc.collect()
    gc.freeze()


def _needs_row_record(params: SamplingParams) -> bool:
    """Whether a request's rows need more than the persistent sampling columns' plain
    values: logprobs, prompt logprobs, or penalties' token histories."""
    return (params.logprobs is not None or params.prompt_logprobs is not None
            or params.uses_penalties)


def _put_placeholders(filled: list[tuple[list, int]]) -> None:
    """Undo record: ``values[index]`` back to ``PLACEHOLDER`` for each ``(values, index)``."""
    for values, index in filled:
        values[index] = PLACEHOLDER


def _restore_tail(values: list, end: int, tail: list) -> None:
    """Undo record: ``values[end:]`` back to ``tail``."""
    values[end:] = tail


def _prompt_logprobs_key(params: SamplingParams):
    """The prefix-cache key part of a request: a request scoring its prompt reads no other
    request's cached pages (their prompt logprobs were never kept), so its pages are
    keyed apart; they still serve its own recompute (after a preemption), whose scores
    it keeps."""
    return None if params.prompt_logprobs is None else ("prompt_logprobs", uuid.uuid4().hex)


class LLM:
    """Offline generation: ``LLM("tiny").generate(prompts, SamplingParams(...))``.

    model: ``"tiny"``, a checkpoint directory, or a model bundle (a
    ``jpaged.core.interfaces.Model``, e.g. ``ModelBundle(config, params, forward)``). The KV
    pool holds
    ``num_pages`` pages of ``page_size`` tokens, or as many as fit in ``kv_cache_bytes``.
    ``watermark``: the fraction of the pool that admitting new prompts leaves free for the
    running sequences to grow into; higher means fewer preemptions and a smaller batch.
    ``static_batching`` admits new prompts only while the batch is still filling, then runs
    it to completion (the dense-cache baseline sets it, with one page of ``max_model_len``
    tokens per sequence).

    Several devices (``jpaged.parallel.mesh``): ``tensor_parallel=N`` splits heads, the MLP and
    the KV pool over N devices; ``data_parallel=R`` runs R such replicas, each with its own
    pool and scheduler, requests going to the least loaded (to the one holding their
    prefix with ``prefix_routing``); or ``mesh=`` a ``jax.sharding.Mesh`` with axes
    ``"data"`` and/or ``"model"``. ``kv_cache_bytes`` is then per device.

    ``attention_impl``: the paged attention every layer runs (``jpaged.core.attention``'s
    ``impl``: "auto", "pallas", "mosaic", "xla", "reference").

    ``kv_cache_dtype``: "auto" stores K/V in the model's dtype; "int8" or "fp8"
    (float8_e4m3fn) store 8-bit codes with a bfloat16 scale per token and kv head, about
    twice the tokens in the same ``kv_cache_bytes`` (``kv_cache_info()`` tells the pool).

    ``memory_utilization``: size the pool instead from that fraction of each device's
    memory, less what the weights use (``jpaged.engine.config.kv_bytes_from_utilization``;
    64 MiB per device where the device reports no memory, as a CPU). ``host_cache_bytes``:
    the swap pool in bytes per device, instead of ``num_host_pages``.

    vLLM's names work too, with vLLM's meaning (``jpaged.engine.config.VLLM_NAMES``):
    ``tensor_parallel_size``, ``data_parallel_size``, ``block_size``,
    ``gpu_memory_utilization``, ``swap_space`` (GiB).
    """

    def __init__(self, model: str | Model = "tiny", *, mesh=None,
                 config: EngineConfig | None = None, **options):
        if config is None:
            config = EngineConfig.from_options(**options)
        elif options:
            config = EngineConfig.from_options(**{**config.to_dict(), **options})
        spec = model if isinstance(model, str) else None
        layout = parallel.Layout.create(model, mesh, config.tensor_parallel,
                                        config.data_parallel)
        if layout is None:   # a bundle is checked and kept; a name is loaded
            model = model_loading.load_model(model, config.dtype)
        replicas = [(model, None)] if layout is None else layout.load(model, config.dtype)
        if config.tokenizer is not None:
            tokenizer = model_loading.load_tokenizer(config.tokenizer)
            replicas = [(dataclasses.replace(m, tokenizer=tokenizer), sharding)
                        for m, sharding in replicas]
        model = replicas[0][0]
        model_config = model.config
        max_model_len = config.max_model_len or model_config.max_position_embeddings
        if max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={model_config.max_position_embeddings}")
        pool_dtype = resolve_kv_cache_dtype(
            config.kv_cache_dtype, config.dtype or jax.tree.leaves(model.params)[0].dtype)
        geometry = (model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                    config.page_size)
        model_size = layout.model_size if layout else 1
        kv_cache_bytes, num_pages = config.kv_cache_bytes, config.num_pages
        if config.memory_utilization is not None:
            devices = {d for replica, _ in replicas
                       for leaf in jax.tree.leaves(replica.params) for d in leaf.devices()}
            kv_cache_bytes = kv_bytes_from_utilization(
                config.memory_utilization, sorted(devices, key=lambda d: d.id))
        if num_pages is None:
            budget = (kv_cache_bytes or FALLBACK_KV_BYTES) * model_size
            num_pages = KVCache.pages_for_memory(budget, *geometry, pool_dtype)
        num_host_pages = config.num_host_pages or 0
        if config.host_cache_bytes:
            num_host_pages = KVCache.pages_for_memory(config.host_cache_bytes * model_size,
                                                      *geometry, pool_dtype)
        self.max_model_len = max_model_len
        self.model_config = layout.config if layout else model_config  # before tensor parallel
        # What a snapshot needs to build this LLM again (see jpaged.engine.snapshot): the
        # options with every size resolved.
        self._spec = spec
        self.config = config.replace(
            num_pages=num_pages, kv_cache_bytes=None, memory_utilization=None,
            num_host_pages=num_host_pages, host_cache_bytes=None, max_model_len=max_model_len,
            tensor_parallel=layout.model_size if layout else None,
            data_parallel=layout.num_replicas if layout else None)
        self._kv_cache_info = dict(num_pages=num_pages, page_size=config.page_size,
                                   kv_cache_dtype=pool_dtype.name,
                                   bytes_per_page=KVCache.bytes_per_page(*geometry, pool_dtype))
        engines = []
        for replica, sharding in replicas:
            cache = KVCache.create(*geometry, num_pages, pool_dtype, sharding)
            scheduler = make_scheduler(self.config)
            engines.append(LLMEngine(replica, cache, scheduler, seed=config.seed + len(engines),
                                     num_host_pages=num_host_pages,
                                     attention_impl=config.attention_impl,
                                     async_scheduling=config.async_scheduling))
        self.engine: Engine = (engines[0] if layout is None
                               else layout.engine(engines, config.prefix_routing))
        # The chat template and the sampling defaults (generation_config.json's
        # SamplingParams fields) of a checkpoint directory.
        template_dir = config.tokenizer or spec
        self.chat_template = (ChatTemplate.from_directory(template_dir)
                              if template_dir and os.path.isdir(template_dir) else None)
        self.generation_defaults = offline.generation_defaults(spec, config.generation_config)
        self._stats = StatsLogger(self.engine) if config.log_stats else None
        # Several processes: process 0 warms up, its Leader runner broadcasting each
        # batch to the others' `distributed.serve` loop.
        if config.warmup and jax.process_index() == 0:
            self.warm_up()

    def warm_up(self) -> float:
        """Compile every step program the configuration can produce before the first
        request (``LLMEngine.warm_up``), printing the count and the time; returns the
        seconds it took. Then, as vLLM does after start-up, the objects alive now (the
        model's, JAX's, the compiled programs') are moved out of the garbage collector's
        reach (``freeze_heap``): a full collection no longer walks them. At batch 256 and
        4096-token outputs the longest pause fell from 255 to 28 ms
        (``benchmarks/host_overhead.py``); a GPU idles through such a pause."""
        start = time.perf_counter()
        count = self.engine.warm_up()
        freeze_heap()
        elapsed = time.perf_counter() - start
        print(f"jpaged: warm-up compiled {count} step shapes in {elapsed:.1f} s",
              file=sys.stderr, flush=True)
        return elapsed

    def save_snapshot(self, path, overwrite: bool = False) -> None:
        """Write the whole engine between two steps to the directory ``path``: the pages in
        use (device and swap pool), block tables, block manager, scheduler queues and every
        request with its RNG streams (``jpaged.engine.snapshot``). An existing ``path`` is
        refused unless ``overwrite``; the replacement is atomic: ``path`` holds the old
        snapshot or the new one, whole, wherever the save fails or the process dies."""
        snapshot.save(self, path, overwrite)

    @classmethod
    def from_snapshot(cls, path, *, max_pool_bytes: int | None = None,
                      **overrides) -> "LLM":
        """An ``LLM`` resuming the snapshot at ``path``: stepping on gives the tokens the
        saved one would have. The model is the snapshot's ("tiny" or its checkpoint
        directory, whose files must match the fingerprint saved with it) unless
        ``model=``; ``tensor_parallel=`` / ``mesh=`` and ``attention_impl=`` may differ,
        other options must equal the snapshot's. The snapshot is verified whole before
        any pool is allocated (checksums, options, model, host state; see
        ``jpaged.engine.snapshot``), and its pools must fit in ``max_pool_bytes`` (default:
        this machine's memory). A damaged, truncated or foreign snapshot raises a
        ValueError naming the problem."""
        return snapshot.restore(cls, path, max_pool_bytes, **overrides)

    def kv_cache_info(self) -> dict:
        """The KV pool of each replica: num_pages (null page included), page_size,
        kv_cache_dtype (the pages' dtype name: "bfloat16", "int8", "float8_e4m3fn", ...)
        and bytes_per_page (one page of every layer, K and V and their scales, summed over
        the tensor-parallel devices)."""
        return dict(self._kv_cache_info)

    def get_tokenizer(self):
        """The model's ``tokenizers.Tokenizer`` (None for a model without one)."""
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams`` with the defaults of the checkpoint's
        ``generation_config.json`` (temperature, top_p, top_k, min_p, repetition_penalty,
        max_new_tokens), as vLLM; ``generation_config="vllm"`` ignores the file."""
        return SamplingParams(**self.generation_defaults)

    def stream(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
               priority: Seq[int] | None = None) -> Iterator[RequestOutput]:
        """Add the prompts, then yield a ``RequestOutput`` each time one makes progress.

        If the caller stops early (``close()``, a ``break`` that drops the generator, an
        exception such as ``KeyboardInterrupt``), the requests not yet finished are
        aborted, so the engine is left as it was before the call."""
        return self._run(prompts, sampling_params, priority, stream=True)

    def _run(self, prompts, sampling_params, priority, stream: bool
             ) -> Iterator[RequestOutput]:
        """``stream``'s loop; ``stream=False`` yields finished outputs only (the engine
        builds no others unless the stats logger counts them)."""
        pending = set(self._add(offline.as_prompt_list(prompts), sampling_params, priority,
                                stream or self._stats is not None))
        try:
            while pending:
                outputs = self.engine.step()
                if self._stats is not None:
                    self._stats.observe(outputs)
                outputs = [o for o in outputs if o.request_id in pending]
                pending -= {o.request_id for o in outputs if o.finished}   # before yielding:
                yield from outputs                     # finished ones are no longer abortable
        finally:
            with deferred_interrupts():   # a second Ctrl-C waits until every one is aborted
                for request_id in pending:
                    # A request may have finished in a step whose outputs the interrupt
                    # never let through.
                    with contextlib.suppress(ValueError):
                        self.engine.abort(request_id)

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] |
                 None = None, use_tqdm=True, *, priority: Seq[int] | None = None,
                 **unsupported) -> list[RequestOutput]:
        """Finished outputs in the order of ``prompts`` (vLLM's ``LLM.generate``).

        prompts: a string, token ids, a prompt dict (``{"prompt": text}`` or
        ``{"prompt_token_ids": ids}``), or a list of them. sampling_params: one for all,
        or one per prompt; default ``get_default_sampling_params()``. use_tqdm: a
        progress bar over finished prompts (True: tqdm; or a tqdm-like factory).
        priority: per prompt, lower first (the scheduler's order)."""
        offline.refuse_options("generate", unsupported)
        prompts = offline.as_prompt_list(prompts)
        finished = {}
        progress = offline.Progress(use_tqdm, len(prompts))
        try:
            for output in self._run(prompts, sampling_params, priority, stream=False):
                if output.finished:
                    finished[output.request_id] = output
                    progress.finished(output)
        finally:
            progress.close()
        return sorted(finished.values(), key=lambda o: self._order[o.request_id])

    def chat(self, messages, sampling_params: SamplingParams | Seq[SamplingParams] |
             None = None, use_tqdm=True, *, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list | None = None,
             **unsupported) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation (a list of ``{"role",
        "content"}`` messages) or to each of a list of them (vLLM's ``LLM.chat``).

        The conversation is rendered with ``chat_template`` (Jinja source) or the
        checkpoint's, and tokenized as it stands (the template writes the special
        tokens); ``RequestOutput.prompt`` is the rendered text."""
        offline.refuse_options("chat", unsupported)
        if continue_final_message:
            raise ValueError("continue_final_message=True is not supported: jpaged always "
                             "starts a new message (add_generation_prompt)")
        template = self.chat_template
        if chat_template is not None:
            template = ChatTemplate(chat_template, template.special_tokens if template else {})
        if template is None:
            raise ValueError("this model has no chat template (no chat_template in its "
                             "tokenizer_config.json): pass chat_template=")
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; this model has none")
        conversations = (messages if isinstance(messages, (list, tuple)) and messages
                         and isinstance(messages[0], (list, tuple)) else [messages])
        prompts = []
        for conversation in conversations:
            text = template.render(chat_messages(list(conversation)), add_generation_prompt,
                                   tools=tools, **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids":
                            tokenizer.encode(text, add_special_tokens=False).ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts, params: offline.BeamSearchParams, *, use_tqdm=False,
                    **unsupported) -> list[offline.BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: the ``params.beam_width`` best beams of each prompt,
        best first, each with its prompt's tokens and text in front (jpaged's beam search,
        ``SamplingParams(use_beam_search=True)``, underneath)."""
        offline.refuse_options("beam_search", unsupported)
        outputs = self.generate(prompts, params.sampling_params(), use_tqdm)
        tokenizer = self.get_tokenizer()
        decode = (lambda ids: None) if tokenizer is None else tokenizer.decode
        return [offline.beam_search_output(output, decode) for output in outputs]

    def _add(self, prompts: list, params, priority, stream: bool = True) -> list[str]:
        """Add every prompt, or none: a bad one aborts those this call already added."""
        if params is None:
            params = self.get_default_sampling_params()
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        if priority is None:
            priority = [0] * len(prompts)
        elif len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p, rank in zip(prompts, params, priority):
                ids.append(self.engine.add_request(prompt, p, priority=rank, stream=stream))
        except ValueError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        self._order = {request_id: i for i, request_id in enumerate(ids)}
        return ids
