"""Exhaustive fault injection into the host path of engine steps, as SQLite tests its
allocation failures: every function the host runs inside a step raises at its 1st, 2nd,
... k-th call in turn (``mode="call"``), or a ``KeyboardInterrupt`` arrives at every line
it executes (``mode="line"``), and after each fault the engine must step on to the
tokens and outputs of a run without faults.

``HostTracer`` finds the injection points by tracing (``sys.settrace``) every engine step
in the thread that runs it (data-parallel replicas step in threads): a point is a
function (call mode) or a line (line mode) of the ``jpaged`` package executed while the
step's transaction is open (``Journal.active``), so what runs after the commit or inside
an undo is not a point. ``sweep`` profiles a clean run of a workload, then injects at
every point and occurrence and checks, after each fault: the host state equals the one
before the step when the device had not started (``fingerprint``), ``Scheduler.check``
passes, and at the end every request finished exactly once with the clean run's tokens
and finish reasons and no page is held. Used by ``tests/test_faults.py`` and the soak.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time

import numpy as np

import jpaged

PACKAGE = os.path.dirname(os.path.abspath(jpaged.__file__)) + os.sep
TOOLS = os.path.join(PACKAGE, "tools") + os.sep


class InjectedFault(Exception):
    """A fault injected into the host path (stands for a MemoryError, a bug, ...)."""


def host_code(filename: str) -> bool:
    """Whether code of ``filename`` is host code of the library (not these tools)."""
    return filename.startswith(PACKAGE) and not filename.startswith(TOOLS)


@dataclasses.dataclass(frozen=True)
class Point:
    """Where a fault goes: the ``k``-th time ``where`` runs (a function's qualified name,
    or a ``file:line``) after the point is armed."""

    where: str
    k: int


class HostTracer:
    """Counts, and on demand faults, the host code that runs inside engine steps.

    engines: the ``LLMEngine``\\ s to trace (each replica of a data-parallel engine); their
    ``step`` is wrapped to trace the thread that runs it. ``counts``: injection points
    seen -> times. ``arm(point)`` makes the point's ``k``-th occurrence from now raise
    ``error`` (``fired`` then holds it); ``device``: whether the device step might have
    run when it fired."""

    def __init__(self, engines, mode: str = "call", error=InjectedFault):
        if mode not in ("call", "line"):
            raise ValueError(f"mode={mode!r}: expected 'call' or 'line'")
        self.mode, self.error = mode, error
        self.counts: dict[str, int] = {}
        self.step_counts: dict[str, int] = {}   # since the caller last emptied it
        self.armed: Point | None = None
        self.seen = 0
        self.fired: Point | None = None
        self.num_fired = 0
        self.device = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._files: dict[str, bool] = {}
        self._names: dict = {}
        for engine in engines:
            self._wrap(engine)

    def arm(self, point: Point | None, error=None) -> None:
        """Fault ``point`` (None: disarm), raising ``error`` (default: the tracer's)."""
        with self._lock:
            self.armed, self.seen, self.fired = point, 0, None
            self._error = error or self.error

    def _wrap(self, engine) -> None:
        step = type(engine).step.__get__(engine)
        journal = engine.scheduler.journal

        def traced_step():
            self._local.journal = journal
            sys.settrace(self._call)
            try:
                return step()
            finally:
                sys.settrace(None)

        engine.step = traced_step

    def _host(self, code) -> bool:
        host = self._files.get(code.co_filename)
        if host is None:
            host = self._files[code.co_filename] = host_code(code.co_filename)
        return host

    def _name(self, code, line: int | None = None) -> str:
        key = code if line is None else (code, line)
        name = self._names.get(key)
        if name is None:
            path = os.path.relpath(code.co_filename, os.path.dirname(PACKAGE))
            qualname = getattr(code, "co_qualname", code.co_name)
            name = self._names[key] = (f"{path}:{qualname}" if line is None
                                       else f"{path}:{line} ({qualname})")
        return name

    def _event(self, name: str, frame) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            self.step_counts[name] = self.step_counts.get(name, 0) + 1
            armed = self.armed
            if armed is None or armed.where != name:
                return
            self.seen += 1
            if self.seen != armed.k:
                return
            self.armed, self.fired = None, armed
            self.num_fired += 1
            self.device = self._local.journal.device
        raise self._error(f"fault injected at {armed.where} (occurrence {armed.k})")

    def _call(self, frame, event, arg):
        code = frame.f_code
        if not self._host(code):
            return None
        if self.mode == "line":
            return self._line
        if event == "call" and self._local.journal.active:
            self._event(self._name(code), frame)
        return None

    def _line(self, frame, event, arg):
        if event == "line" and self._local.journal.active:
            self._event(self._name(frame.f_code, frame.f_lineno), frame)
        return self._line


# -- checks -----------------------------------------------------------------------------

def fingerprint(engine) -> tuple:
    """The host state of an ``LLMEngine`` as comparable values: block manager, scheduler
    (queues in their order, every live sequence), requests and their streams."""
    s, bm = engine.scheduler, engine.scheduler.block_manager

    def seq(x):
        return (x.seq_id, tuple(x.token_ids), x.num_prompt_tokens, x.num_computed_tokens,
                x.status, x.finish_reason, tuple(x.block_table), tuple(x.host_table),
                tuple(x.cache_keys), x.order)

    def stream(x):
        return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                            for k, v in vars(x).items()))

    def request(r):
        return (r.request_id, r.finished, dataclasses.astuple(r.metrics),
                {k: seq(v) for k, v in r.seqs.items()},
                {k: stream(v) for k, v in r.streams.items()},
                tuple((score, seq(h)) for score, h in r.hypotheses))

    # Maps compare as maps: their insertion order means nothing.
    return (tuple(bm.ref_counts), tuple(bm.free_queue), dict(bm.cache), dict(bm.page_keys),
            tuple(bm.host_free), bm.hit_tokens, bm.query_tokens,
            tuple(map(seq, s.running)), tuple(map(seq, s.swapped)),
            tuple(sorted(map(seq, s.waiting), key=lambda t: t[-1])),
            {k: seq(v) for k, v in s.seqs.items()},
            {k: tuple(x.seq_id for x in v) for k, v in s.requests.items()},
            s.num_preemptions, {k: request(v) for k, v in engine.requests.items()})


def replicas_of(engine) -> list:
    return list(getattr(engine, "engines", [engine]))


def assert_empty(engine) -> None:
    """Every request ended and every page (device and host) is back in its pool."""
    assert not engine.has_unfinished_requests()
    for e in replicas_of(engine):
        bm = e.scheduler.block_manager
        e.scheduler.check()
        assert not e.scheduler.seqs, e.scheduler.seqs
        assert bm.num_free_pages == bm.num_pages - 1 and not any(bm.ref_counts)
        assert len(bm.host_free) == bm.num_host_pages


def result_of(output) -> list:
    """What a finished request produced: each completion's tokens and finish reason."""
    return [(c.index, tuple(c.token_ids), c.finish_reason) for c in output.outputs]


# -- the sweep --------------------------------------------------------------------------

@dataclasses.dataclass
class SweepResult:
    mode: str
    points: int = 0            # distinct injection points (functions or lines)
    faults: int = 0            # faults injected (points x occurrences)
    exact: int = 0             # of which the state was compared to the one before the step
    unreached: int = 0         # armed but never reached (none expected)
    runs: int = 0
    steps: int = 0
    seconds: float = 0.0

    def row(self) -> dict:
        return dataclasses.asdict(self)


def run_clean(make_llm, work, mode: str):
    """The workload without faults: ({request id: result}, injection point counts)."""
    drive(make_llm().engine, work, None, [])   # compiles: code run while tracing is no point
    llm = make_llm()
    tracer = HostTracer(replicas_of(llm.engine), mode)
    done = drive(llm.engine, work, tracer, [])
    return done, tracer.counts


def points_of(counts: dict, max_k: int, every: int = 1) -> list[Point]:
    """Each point's 1st..k-th occurrence (``max_k`` at most); ``every``: keep every n-th
    point only (a sample, for a quick sweep)."""
    names = sorted(counts)[::every]
    return [Point(name, k) for name in names for k in range(1, min(counts[name], max_k) + 1)]


def sweep(make_llm, work, mode: str = "call", max_k: int = 2, every: int = 1,
          error=None, gap: int = 1, max_points: int | None = None) -> SweepResult:
    """Inject at every point of a clean run of ``work`` (``[(prompt, SamplingParams)]``)
    on engines from ``make_llm()``, one fault at a time, ``gap`` clean steps between
    faults, as many runs of the workload as it takes; raise AssertionError at the first
    broken rule. ``error``: the exception raised (KeyboardInterrupt for line mode)."""
    start = time.perf_counter()
    error = error or (KeyboardInterrupt if mode == "line" else InjectedFault)
    clean, counts = run_clean(make_llm, work, mode)
    todo = points_of(counts, max_k, every)[:max_points]
    result = SweepResult(mode, points=len({p.where for p in todo}))
    todo.reverse()   # popped from the end
    retried = set()
    while todo:
        llm = make_llm()
        for engine in replicas_of(llm.engine):   # each fault must reach the caller
            engine.isolate_faults = False
        tracer = HostTracer(replicas_of(llm.engine), mode, error)
        faults = []
        done = drive(llm.engine, work, tracer, todo, gap, faults, result)
        assert done == clean, f"{_diff(done, clean)} after faults at {faults}"
        assert_empty(llm.engine)
        result.runs += 1
        result.faults += len(faults)
        if tracer.armed is not None:   # not reached in this run: first in a fresh one
            if tracer.armed in retried:
                result.unreached += 1
            else:
                retried.add(tracer.armed)
                todo.append(tracer.armed)
    result.seconds = time.perf_counter() - start
    return result


def drive(engine, work, tracer: HostTracer, todo: list, gap: int = 1, faults=None,
          result: SweepResult | None = None, max_steps: int = 2000) -> dict:
    """Add ``work``, step to the end arming ``todo``'s points one after another (each
    after ``gap`` clean steps); returns {request id: result of its finished output}."""
    for i, (prompt, params) in enumerate(work):
        engine.add_request(prompt, params, request_id=str(i))
    done, clean_steps, replicas = {}, gap, replicas_of(engine)
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        if tracer and tracer.armed is None and todo and clean_steps >= gap:
            tracer.arm(todo.pop())
        before = [fingerprint(e) for e in replicas] if tracer and tracer.armed else None
        try:
            outputs = engine.step()
        except (InjectedFault, KeyboardInterrupt) as exc:
            fired = tracer.fired if tracer else None
            if fired is None:
                raise AssertionError(f"a fault nobody injected: {exc!r}") from exc
            faults.append(fired)
            tracer.fired, clean_steps = None, 0
            for e in replicas:
                e.scheduler.check()
            if result is not None and not tracer.device and len(replicas) == 1:
                after = fingerprint(engine)
                assert after == before[0], f"state changed by a fault at {fired}: " + "; ".join(
                    f"part {i}: {a} != {b}" for i, (a, b) in enumerate(zip(after, before[0]))
                    if a != b)[:3000]
                result.exact += 1
            outputs = []   # a data-parallel engine keeps the other replicas' for next time
        else:
            clean_steps += 1
            for e in replicas:
                e.scheduler.check()
        if result is not None:
            result.steps += 1
        for output in outputs:
            if output.finished:
                assert output.request_id not in done, f"request {output.request_id} twice"
                done[output.request_id] = result_of(output)
    return done


def _diff(done: dict, clean: dict) -> str:
    bad = sorted(set(done) ^ set(clean)) + [k for k in done if k in clean
                                             and done[k] != clean[k]]
    return "; ".join(f"request {k}: {done.get(k)} != clean {clean.get(k)}" for k in bad[:4])


def random_point(counts: dict, rng: np.random.Generator) -> Point:
    """A point drawn from a profile, weighted by how often it runs, and an occurrence
    it reached there, at most the 3rd (the soak's random host faults: given the last
    step's profile, a point the next step is likely to reach)."""
    names = sorted(counts)
    weights = np.sqrt(np.array([counts[n] for n in names], float))
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    return Point(name, int(rng.integers(1, min(3, counts[name]) + 1)))
