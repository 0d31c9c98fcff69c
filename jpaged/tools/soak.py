"""A soak: random operations through one ``LLM``'s engine with faults injected into its
steps, checking after every step that nothing leaks, nothing is stuck and greedy requests
give the tokens of a clean run. Used by ``benchmarks/soak.py`` and ``tests/test_soak.py``.

Operations, drawn at random: add a request (random sampling parameters: greedy, seeded
or unseeded sampling, ``n`` parallel samples, beam search, logprobs), abort one, step, or
step with a fault injected (see ``FaultInjector``; kind "host": an ``InjectedFault`` or a
``KeyboardInterrupt`` at the k-th call of a random function of the host path, see
``jpaged.tools.faults``); and every ``snapshot_every`` steps a
snapshot saved and restored into a fresh ``LLM`` that carries on. After every step
``Scheduler.check`` runs (no page leaked, ref counts equal the block tables holding each
page, every running sequence has a token left to compute), and a request that has not
moved for ``stuck_steps`` steps fails the soak.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jpaged.engine.batch import BatchBuilder
from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams
from jpaged.tools.faults import HostTracer, InjectedFault, random_point

FAULT_KINDS = ("interrupt", "after", "consumed", "apply")
SOAK_FAULTS = FAULT_KINDS + ("host",)


class InjectedDeviceError(RuntimeError):
    """Stands for a device error (out of memory) in the middle of a step."""


class FaultInjector:
    """Makes an engine's steps fail on demand: ``arm(kind)`` makes the next step fail,
    ``calls`` fails the given calls (counted from 1) of the device step (its dispatch:
    ``ModelRunner.execute`` dispatches too), or of the stop-rule check for "apply".

    kinds: "interrupt": KeyboardInterrupt as the device step starts (nothing ran);
    "after": the device step ran (pages moved, K/V written), then KeyboardInterrupt;
    "consumed": the page moves ran, then the donated pool is consumed (deleted) and
    ``InjectedDeviceError`` raised; "apply": ``InjectedFault`` in the middle of the host
    update, after tokens were appended, samples forked and beams advanced (from the
    engine's stop rules, ``engine.stop.check_all``, once per step, which beams do not
    call).
    ``failed``: faults raised; ``moves``: page moves (swaps, copies) of the plans that
    failed in the device step.
    """

    def __init__(self, engine, kind: str | None = None, calls=()):
        self.engine, self.kind, self.calls = engine, kind, set(calls)
        self.armed = None
        self.count = self.failed = self.moves = 0
        self._dispatch = engine.runner.dispatch
        engine.runner.dispatch = self._failing_dispatch
        engine.stop = _FailingStop(engine.stop, self)

    def arm(self, kind: str | None) -> None:
        if kind is not None and kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}: expected one of {FAULT_KINDS}")
        self.armed = kind

    def due(self, apply: bool) -> str | None:
        if self.armed is not None:
            if (self.armed == "apply") != apply:
                return None
            kind, self.armed = self.armed, None
            return kind
        if self.kind is None or (self.kind == "apply") != apply:
            return None
        self.count += 1
        return self.kind if self.count in self.calls else None

    def _failing_dispatch(self, moves, batch, *args, **kwargs):
        kind = self.due(apply=False)
        if kind is None:
            return self._dispatch(moves, batch, *args, **kwargs)
        self.failed += 1
        self.moves += sum(map(len, moves))
        runner = self.engine.runner
        if kind == "interrupt":
            raise KeyboardInterrupt
        if kind == "after":
            jax.block_until_ready(self._dispatch(moves, batch, *args, **kwargs))
            raise KeyboardInterrupt
        runner.move_pages(moves)
        for pool in jax.tree.leaves(runner.cache):
            pool.delete()
        raise InjectedDeviceError("RESOURCE_EXHAUSTED: out of memory while running the step")


class _FailingStop:
    """An engine's ``StopRules`` whose ``check_all`` (once per step) raises when the
    injector says so."""

    def __init__(self, rules, injector: FaultInjector):
        self._rules, self._injector = rules, injector

    def __getattr__(self, name):
        return getattr(self._rules, name)

    def check_all(self, rows, *args) -> list[bool]:
        if self._injector.due(apply=True):
            self._injector.failed += 1
            raise InjectedFault("fault injected in the host update")
        return self._rules.check_all(rows, *args)


FAULTS = (KeyboardInterrupt, InjectedDeviceError, InjectedFault)


class Injectors:
    """One ``FaultInjector`` per data-parallel replica, armed together (a fault in every
    replica that reaches the armed point)."""

    def __init__(self, injectors: list[FaultInjector]):
        self.injectors = injectors

    def arm(self, kind: str | None) -> None:
        for injector in self.injectors:
            injector.arm(kind)

    @property
    def armed(self):
        return self.injectors[0].armed

    @armed.setter
    def armed(self, kind) -> None:
        for injector in self.injectors:
            injector.armed = kind

    @property
    def failed(self) -> int:
        return sum(i.failed for i in self.injectors)

    @property
    def moves(self) -> int:
        return sum(i.moves for i in self.injectors)

    @moves.setter
    def moves(self, value: int) -> None:   # carried over a snapshot restore
        self.injectors[0].moves = value
        for injector in self.injectors[1:]:
            injector.moves = 0


@dataclasses.dataclass
class SoakConfig:
    """Sizes of a soak. A small pool with swap preemption and prefix caching, so
    preemptions, swaps, copy-on-write and prefix hits all happen."""

    operations: int = 100_000
    seed: int = 0
    page_size: int = 4
    num_pages: int = 24
    num_host_pages: int = 48
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 48
    max_model_len: int = 64
    preemption_mode: str = "swap"
    max_live_requests: int = 16
    max_prompt: int = 24
    max_tokens: int = 12
    num_prompts: int = 32             # prompts come from this many, sharing prefixes
    fault_rate: float = 0.02          # of operations
    abort_rate: float = 0.03
    add_rate: float = 0.2
    # Request kinds and their weights; "logprobs" adds top logprobs to greedy requests.
    kinds: dict = dataclasses.field(default_factory=lambda: dict(
        greedy=.4, seeded=.2, sampled=.1, n=.2, beam=.1))
    logprobs: bool = True
    one_bucket: bool = True           # one token / page bucket: a handful of programs
    host_faults: bool = True          # also kind "host" (traces every step: slower)
    data_parallel: int = 1            # replicas (each on its own device)
    snapshot_every: int = 300         # steps; 0: never
    stuck_steps: int = 400
    time_limit_s: float | None = None


@dataclasses.dataclass
class SoakResult:
    operations: int = 0
    steps: int = 0
    adds: int = 0
    aborts: int = 0
    finished: int = 0
    faults_injected: int = 0
    faults_survived: int = 0
    faults_by_kind: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SOAK_FAULTS, 0))
    host_points: int = 0      # distinct host-path points (function, occurrence) faulted
    fault_moves: int = 0
    snapshots: int = 0
    greedy_checked: int = 0
    greedy_mismatches: int = 0
    max_request_wait_steps: int = 0
    preemptions: int = 0
    pages_leaked: int = 0
    seconds: float = 0.0


class Soak:
    """Runs ``config`` on ``model`` (a ``jpaged.core.interfaces.Model``); ``run()`` returns a
    ``SoakResult`` or raises at the first broken rule, naming it. ``snapshots``: whether
    to save and restore snapshots (needs ``LLM.save_snapshot``)."""

    def __init__(self, model, config: SoakConfig, snapshots: bool = True):
        self.model, self.config = model, config
        self.snapshots = snapshots and config.snapshot_every > 0
        self.rng = np.random.default_rng(config.seed)
        self.options = dict(page_size=config.page_size, num_pages=config.num_pages,
                            num_host_pages=config.num_host_pages,
                            max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=config.max_model_len,
                            preemption_mode=config.preemption_mode, seed=config.seed)
        reference = dict(self.options)
        if config.data_parallel > 1:
            self.options["data_parallel"] = config.data_parallel
        self.llm = LLM(model, **self.options)
        self._instrument()
        self.reference = LLM(model, **{**reference, "num_pages": 256})
        self._one_bucket(self.reference.engine)
        self.prompts = self._prompts()
        self.greedy: dict[str, int] = {}          # request id -> prompt index
        self.last_progress: dict[str, tuple] = {}  # request id -> (step, progress signature)
        self.expected: dict[int, list[int]] = {}
        self.host_points: set = set()
        self.result = SoakResult()

    def _prompts(self) -> list[list[int]]:
        """Prompts built from a few shared heads (prefix-cache hits) and random tails."""
        c, vocab = self.config, self.model.config.vocab_size
        heads = [self.rng.integers(0, vocab, c.max_prompt // 2).tolist() for _ in range(4)]
        prompts = []
        for i in range(c.num_prompts):
            tail = self.rng.integers(0, vocab, int(self.rng.integers(1, c.max_prompt // 2 + 1)))
            head = heads[i % 4][:int(self.rng.integers(0, c.max_prompt // 2 + 1))]
            prompts.append(head + tail.tolist())
        return prompts

    def _instrument(self) -> None:
        """Faults into the engine's steps; with ``one_bucket``, batches padded to the
        scheduler's limits, so the soak compiles a handful of programs, not dozens."""
        self.injector = Injectors([FaultInjector(e) for e in self.replicas])
        self.tracer = HostTracer(self.replicas) if self.config.host_faults else None
        if self.tracer and getattr(self, "_counts", None):
            self.tracer.counts = self._counts   # the profile so far carries on
        for engine in self.replicas:
            self._one_bucket(engine)

    def _one_bucket(self, engine) -> None:
        if self.config.one_bucket:
            s = engine.scheduler
            engine.batcher = BatchBuilder.for_scheduler(
                s, min_token_bucket=s.max_num_batched_tokens, min_seq_bucket=s.max_num_seqs,
                min_page_bucket=s.max_pages_per_seq)

    @property
    def engine(self):
        return self.llm.engine

    @property
    def replicas(self) -> list:
        """The ``LLMEngine``\\ s: one, or each data-parallel replica."""
        return list(getattr(self.engine, "engines", [self.engine]))

    def _requests(self) -> dict:
        return {rid: r for e in self.replicas for rid, r in e.requests.items()}

    def _check(self) -> None:
        for engine in self.replicas:
            engine.scheduler.check()   # raises on the first broken rule

    def run(self) -> SoakResult:
        c, r, start = self.config, self.result, time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:
            for r.operations in range(1, c.operations + 1):
                if c.time_limit_s and time.perf_counter() - start > c.time_limit_s:
                    break
                u = self.rng.random()
                live = len(self._requests())
                if u < c.add_rate and live < c.max_live_requests:
                    self._add()
                elif u < c.add_rate + c.abort_rate and live:
                    self._abort()
                else:
                    self._step(self.rng.random() < c.fault_rate / (1 - c.add_rate - c.abort_rate))
                    if self.snapshots and r.steps % c.snapshot_every == 0:
                        self._snapshot_and_restore(Path(scratch) / "snapshot")
            while self.engine.has_unfinished_requests():   # drain: every request ends
                self._step(False)
        r.preemptions = sum(e.scheduler.num_preemptions for e in self.replicas)
        pool = self.engine.metrics()
        r.pages_leaked = pool["used_pages"] + pool["host_used_pages"]
        r.faults_by_kind = dict(r.faults_by_kind)
        r.fault_moves = self.injector.moves
        r.host_points = len(self.host_points)
        r.seconds = time.perf_counter() - start
        if r.pages_leaked:
            raise RuntimeError(f"{r.pages_leaked} pages leaked at the end of the soak")
        return r

    # -- operations ------------------------------------------------------------------

    def _add(self) -> None:
        c, rng = self.config, self.rng
        index = int(rng.integers(len(self.prompts)))
        weights = np.array(list(c.kinds.values()), float)
        kind = rng.choice(list(c.kinds), p=weights / weights.sum())
        max_tokens = int(rng.integers(1, c.max_tokens + 1))
        common = dict(max_tokens=max_tokens, ignore_eos=True)
        if kind == "greedy":
            params = SamplingParams(temperature=0.0, **common, logprobs=(
                int(rng.integers(0, 3)) if c.logprobs else None))
        elif kind == "beam":
            width = int(rng.integers(2, 4))
            params = SamplingParams(temperature=0.0, n=width - int(rng.integers(0, 2)),
                                    best_of=width, use_beam_search=True, **common)
        else:
            params = SamplingParams(
                temperature=float(rng.choice([0.7, 1.0])), top_p=float(rng.choice([1.0, 0.9])),
                n=int(rng.integers(2, 4)) if kind == "n" else 1,
                seed=int(rng.integers(1000)) if kind != "sampled" else None, **common)
        request_id = self.engine.add_request(self.prompts[index], params)
        if kind == "greedy":
            self.greedy[request_id] = index
        self.result.adds += 1

    def _abort(self) -> None:
        request_id = self.rng.choice(sorted(self._requests()))
        self.engine.abort(request_id)
        self.greedy.pop(request_id, None)
        self.last_progress.pop(request_id, None)
        self.result.aborts += 1

    def _step(self, fault: bool) -> None:
        r = self.result
        # Host faults aim at what the last step ran: a point from the whole run's profile
        # that this step never reaches would arm nothing.
        recent = self.tracer.step_counts if self.tracer else {}
        if self.tracer:
            self.tracer.step_counts = {}
        kinds = SOAK_FAULTS if recent else FAULT_KINDS
        kind = str(self.rng.choice(kinds)) if fault else None
        if kind == "host":
            point = random_point(recent, self.rng)
            self.tracer.arm(point, KeyboardInterrupt if self.rng.random() < 0.5 else None)
        elif kind:
            self.injector.arm(kind)
        failed = self.injector.failed + (self.tracer.num_fired if self.tracer else 0)
        try:
            outputs = self.engine.step()
        except FAULTS:
            if kind is None:   # not ours: the user's Ctrl-C
                raise
            outputs = []
        if self.tracer:
            if self.tracer.fired:
                self.host_points.add(self.tracer.fired)
            self.tracer.arm(None)
        self.injector.armed = None   # a replica whose row never reached the armed point
        fired = self.injector.failed + (self.tracer.num_fired if self.tracer else 0) - failed
        if fired:   # raised, or isolated and retried by the engine; one per replica
            r.faults_injected += fired
            r.faults_by_kind[kind] += fired
            self._check()
            r.faults_survived += fired
        r.steps += 1
        self._check()
        for output in outputs:
            if output.finished:
                self._finished(output)
        self._check_progress()

    def _finished(self, output) -> None:
        r = self.result
        r.finished += 1
        self.last_progress.pop(output.request_id, None)
        index = self.greedy.pop(output.request_id, None)
        if index is None:
            return
        expected = self._reference(index)[:len(output.token_ids)]
        r.greedy_checked += 1
        if output.token_ids != expected or output.finish_reason != "length":
            r.greedy_mismatches += 1
            raise RuntimeError(f"greedy request {output.request_id} (prompt {index}): "
                               f"{output.token_ids}, a clean run gives {expected}")

    def _reference(self, index: int) -> list[int]:
        """The prompt alone, greedy, in a roomy engine without faults."""
        if index not in self.expected:
            params = SamplingParams(temperature=0.0, ignore_eos=True,
                                    max_tokens=self.config.max_tokens)
            self.expected[index] = self.reference.generate([self.prompts[index]], params,
                                                           use_tqdm=False)[0].token_ids
        return self.expected[index]

    def _check_progress(self) -> None:
        """A request whose sequences have not changed for ``stuck_steps`` steps is stuck."""
        r, step = self.result, self.result.steps
        for request_id, request in self._requests().items():
            signature = tuple((s.num_tokens, s.num_computed_tokens, s.status)
                              for s in request.seqs.values())
            last = self.last_progress.get(request_id)
            if last is None or last[1] != signature:
                self.last_progress[request_id] = (step, signature)
                continue
            waited = step - last[0]
            r.max_request_wait_steps = max(r.max_request_wait_steps, waited)
            if waited > self.config.stuck_steps:
                raise RuntimeError(f"request {request_id} has not moved for {waited} steps: "
                                   f"{list(request.seqs.values())}")

    def _snapshot_and_restore(self, path: Path) -> None:
        """Save, restore into a fresh LLM, carry on with it (the faults follow)."""
        self.llm.save_snapshot(path, overwrite=True)   # counters included
        moves = self.injector.moves
        self.llm = LLM.from_snapshot(path, model=self.model)
        self._counts = self.tracer.counts if self.tracer else None
        self._instrument()
        self.injector.moves = moves
        self._check()
        self.result.snapshots += 1
