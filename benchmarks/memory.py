"""KV memory: contiguous reservation vs paged, replayed through the real scheduler.

A host-only simulation, no model: each step every running request writes its prompt (the
first time) or one new token; a request leaves after its output length. Systems, all with
the same KV memory (``TraceSpec.slots`` token slots) and no limit on batch or step size:

- contiguous max-len: each request reserves ``max_model_len`` slots (a dense KV cache);
- contiguous oracle: each request reserves exactly prompt + output slots;
- paged: ``Scheduler`` + ``BlockManager`` with pages of 8 ... 256 slots.

Reported: KV utilization (slots holding a token / slots reserved, per step, averaged over
the steps where requests are waiting, i.e. at full load), requests in flight at equal
memory, pages saved by sharing for parallel sampling and beam search, prefill tokens saved
by prefix caching for a shared system prompt, the scheduler's own cost, and 8-bit pools:
pages (``KVCache.pages_for_memory``, scales counted) and requests in flight at the same
bytes as a bfloat16 pool, for a head_dim 128 and a head_dim 64 model.

Traces are synthetic (no dataset download): lognormal lengths with the means the vLLM paper
reports (ShareGPT: 161 prompt / 338 output tokens, Alpaca: 19 / 58); the spreads (sigma)
are assumptions, listed in TRACES. Arrivals are Poisson, faster than any system serves.

Each trace's pool is also drawn (``jpaged.plot_pool``) at its busiest step, page 16:
``memory_pool_<trace>.png``.

    python benchmarks/memory.py     # ~1.5 min on 2 busy cores; writes benchmarks/results/
"""

import argparse
import collections
import dataclasses
import itertools
import json
import pathlib
import statistics
import time

import numpy as np

from jpaged.engine.batch import BatchBuilder
from jpaged.host.block_manager import BlockManager
from jpaged.core.cache import KVCache
from jpaged.host.scheduler import Scheduler
from jpaged.core.shapes import cdiv

PAGE_SIZES = (8, 16, 32, 64, 128, 256)
MAX_MODEL_LEN = 2048
# (layers, kv heads, head_dim) of the models the 8-bit rows size pools for.
KV_GEOMETRIES = {"Llama-3-8B": (32, 8, 128), "TinyLlama-1.1B": (22, 4, 64)}
KV_DTYPES = {"bfloat16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn"}


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    """Lognormal lengths given by their mean and the sigma of the underlying normal."""
    prompt_mean: float
    prompt_sigma: float
    output_mean: float
    output_sigma: float
    num_requests: int
    arrival_rate: float   # requests per step (Poisson)
    slots: int            # KV memory of every system, in token slots


TRACES = {
    "sharegpt": TraceSpec(161.3, 1.0, 338.0, 0.8, num_requests=600, arrival_rate=2.0,
                          slots=65536),
    "alpaca": TraceSpec(19.3, 0.6, 58.5, 0.8, num_requests=2000, arrival_rate=8.0,
                        slots=16384),
}


@dataclasses.dataclass
class Request:
    arrival: int                     # step
    prompt: int                      # tokens
    output: int                      # tokens
    tokens: np.ndarray | None = None  # prompt token ids when they matter (prefix caching)


def lognormal(rng, mean, sigma, size=None):
    return rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, size)


def make_trace(spec: TraceSpec, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    n = spec.num_requests
    prompt = np.clip(lognormal(rng, spec.prompt_mean, spec.prompt_sigma, n), 1,
                     MAX_MODEL_LEN // 2).astype(int)
    output = np.clip(lognormal(rng, spec.output_mean, spec.output_sigma, n), 1,
                     MAX_MODEL_LEN - prompt).astype(int)
    arrival = np.floor(np.cumsum(rng.exponential(1 / spec.arrival_rate, n))).astype(int)
    return [Request(int(a), int(p), int(o)) for a, p, o in zip(arrival, prompt, output)]


# -- systems ----------------------------------------------------------------------------

def simulate_contiguous(trace, slots, reserve):
    """FCFS with a fixed reservation per request (external fragmentation ignored, which
    favours this system). Per step: (tokens held, slots reserved, running, any waiting)."""
    pending, running, free, stats, step = collections.deque(trace), [], slots, [], 0
    while pending or running:
        while pending and pending[0].arrival <= step and reserve(pending[0]) <= free:
            r = pending.popleft()
            free -= reserve(r)
            running.append([r, 0])
        waiting = bool(pending) and pending[0].arrival <= step
        stats.append((sum(r.prompt + done for r, done in running), slots - free,
                       len(running), waiting))
        for entry in running:
            entry[1] += 1
        free += sum(reserve(r) for r, done in running if done == r.output)
        running = [e for e in running if e[1] < e[0].output]
        step += 1
    return stats


def make_paged(page_size, slots, *, caching=False):
    bm = BlockManager(slots // page_size + 1, page_size, enable_prefix_caching=caching)
    return Scheduler(bm, max_num_seqs=2048, max_num_batched_tokens=1 << 20,
                     max_model_len=MAX_MODEL_LEN)


@dataclasses.dataclass
class Step:
    kv_utilization: float
    running: int
    waiting: bool
    prefill_tokens: int
    table_pages: int     # pages in all block tables: what the pool would hold without sharing
    used_pages: int      # distinct pages in use


def replay(sched, trace, on_update=None) -> list[Step]:
    """Feed ``trace`` to the scheduler, one engine step at a time (every sampled token is 1;
    a request stops at its output length)."""
    pending, stats, step, ids = collections.deque(trace), [], 0, itertools.count()
    bm = sched.block_manager
    ones = np.ones(sched.max_num_seqs, np.int32)
    while pending or sched.has_unfinished():
        while pending and pending[0].arrival <= step:
            r = pending.popleft()
            tokens = np.zeros(r.prompt, np.int32) if r.tokens is None else r.tokens
            sched.add_request(f"r{next(ids)}", tokens, r.output)
        out = sched.schedule()
        prefill = sum(n for s, a, n in zip(out.seqs, out.start_positions, out.num_new_tokens)
                      if a < s.num_prompt_tokens)
        stats.append(Step(bm.kv_utilization(sched.running), len(sched.running),
                          bool(sched.waiting), prefill,
                          sum(len(s.block_table) for s in sched.running),
                          bm.num_pages - 1 - bm.num_free_pages))
        sched.update(out, ones)
        if on_update is not None:
            on_update(sched)
        step += 1
    return stats


# -- experiments --------------------------------------------------------------------------

def utilization_and_in_flight(spec: TraceSpec) -> dict:
    """Averages over the steps at full load (some request waiting)."""
    trace, rows = make_trace(spec), {}
    for label, reserve in (("contiguous max-len", lambda r: MAX_MODEL_LEN),
                           ("contiguous oracle", lambda r: r.prompt + r.output)):
        stats = [x for x in simulate_contiguous(trace, spec.slots, reserve) if x[3]]
        rows[label] = {"kv_utilization": statistics.mean(t / s for t, s, _, _ in stats),
                       "in_flight": statistics.mean(n for _, _, n, _ in stats)}
    for ps in PAGE_SIZES:
        stats = [x for x in replay(make_paged(ps, spec.slots), trace) if x.waiting]
        rows[f"paged {ps}"] = {"kv_utilization": statistics.mean(x.kv_utilization for x in stats),
                               "in_flight": statistics.mean(x.running for x in stats)}
    return rows


def sharing(spec: TraceSpec, kind: str, width: int, page_size=16, seed=1) -> dict:
    """Parallel sampling: ``width`` samples, each stopping at its own length (drawn like the
    trace's outputs, at most the request's). Beam search: ``width`` beams, re-drawn every step
    from the survivors with Dirichlet(1) weights (a beam with 0 children stops, one with c
    forks c - 1 times). Pages summed over steps: block-table pages (no sharing) vs distinct."""
    rng = np.random.default_rng(seed)
    ids, started, targets = itertools.count(), set(), {}

    def draw_target(seq):
        targets[seq.seq_id] = int(lognormal(rng, spec.output_mean, spec.output_sigma))

    def fork(sched, seq):
        child = sched.fork(seq, f"{seq.request_id}.{next(ids)}", int(rng.integers(2, 99)))
        if kind == "parallel":
            draw_target(child)

    def on_update(sched):
        for rid, seqs in list(sched.requests.items()):
            ready = [s for s in seqs if s.num_tokens - s.num_computed_tokens == 1]
            if not ready:
                continue
            if rid not in started:   # the prompt is done: one first token per sample / beam
                started.add(rid)
                if kind == "parallel":
                    draw_target(ready[0])
                for _ in range(width - 1):
                    fork(sched, ready[0])
            elif kind == "parallel":
                for s in ready:
                    if s.num_output_tokens >= targets[s.seq_id]:
                        sched.finish(s, "stop")
            else:
                counts = rng.multinomial(len(ready), rng.dirichlet(np.ones(len(ready))))
                for s, c in zip(ready, counts):
                    for _ in range(c - 1):
                        fork(sched, s)
                    if c == 0:
                        sched.finish(s, "stop")

    stats = replay(make_paged(page_size, spec.slots), make_trace(spec, seed), on_update)
    table, used = sum(x.table_pages for x in stats), sum(x.used_pages for x in stats)
    return {"pages_without_sharing": table, "pages_with_sharing": used, "saved": 1 - used / table}


def shared_prefix(spec: TraceSpec, shots: int, page_size=16, seed=2) -> dict:
    """Every prompt starts with the same k-shot system prompt (80 tokens for 1-shot, 341 for
    5-shot, as in the paper's translation workload); prefill tokens with and without
    prefix caching."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(2, 32000, {1: 80, 5: 341}[shots])
    trace = [dataclasses.replace(r, prompt=len(prefix) + r.prompt, tokens=np.concatenate(
        [prefix, rng.integers(2, 32000, r.prompt)]).astype(np.int32))
        for r in make_trace(spec, seed)]
    result = {}
    for caching in (False, True):
        sched = make_paged(page_size, spec.slots, caching=caching)
        computed = sum(x.prefill_tokens for x in replay(sched, trace))
        result["prefill_with_cache" if caching else "prefill_without_cache"] = computed
    result["hit_rate"] = sched.block_manager.metrics([])["prefix_hit_rate"]
    result["saved"] = 1 - result["prefill_with_cache"] / result["prefill_without_cache"]
    return result


def schedule_cost(num_running: int, context=512, page_size=16, steps=100) -> dict:
    """Median time (ms) of schedule() (with the batch built from its plan, as the engine
    does) and update() with ``num_running`` sequences decoding at ``context`` tokens: wall
    time, and the process's CPU time, which a busy shared machine does not inflate when it
    schedules another process in between."""
    bm = BlockManager(num_running * cdiv(context + steps + 2, page_size) + 1, page_size,
                      watermark=0.0, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=num_running, max_num_batched_tokens=16384,
                      max_model_len=4096)
    for i in range(num_running):
        sched.add_request(f"r{i}", np.zeros(context, np.int32), 10 ** 6)
    builder = BatchBuilder.for_scheduler(sched)
    ones = np.ones(num_running, np.int32)
    out = sched.schedule()
    while not (out.is_decode and out.num_seqs == num_running):   # prefill everything first
        sched.update(out, ones)
        out = sched.schedule()
    sched.update(out, ones)
    times = collections.defaultdict(list)
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = sched.schedule()
        builder.build(out)
        t1, c1 = time.perf_counter(), time.process_time()
        sched.update(out, ones)
        times["schedule_ms"].append(t1 - t0)
        times["schedule_cpu_ms"].append(c1 - c0)
        times["update_ms"].append(time.perf_counter() - t1)
        times["update_cpu_ms"].append(time.process_time() - c1)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def kv_dtypes(spec: TraceSpec, page_size=16) -> dict:
    """Per model geometry: the bytes of a bfloat16 pool of ``spec.slots`` slots, the pages
    each pool dtype fits in those bytes, and requests in flight replaying the trace."""
    trace, rows = make_trace(spec), {}
    for model, geometry in KV_GEOMETRIES.items():
        budget = (spec.slots // page_size + 1) * KVCache.bytes_per_page(
            *geometry, page_size, "bfloat16")
        for label, dtype in KV_DTYPES.items():
            pages = KVCache.pages_for_memory(budget, *geometry, page_size, dtype)
            stats = replay(make_paged(page_size, (pages - 1) * page_size), trace)
            rows[f"{model} {label}"] = dict(
                kv_cache_bytes=budget, bytes_per_page=KVCache.bytes_per_page(
                    *geometry, page_size, dtype), num_pages=pages,
                in_flight=statistics.mean(x.running for x in stats if x.waiting),
                max_in_flight=max(x.running for x in stats))
        base = rows[f"{model} bfloat16"]
        for label in KV_DTYPES:
            row = rows[f"{model} {label}"]
            row["pages_vs_bf16"] = row["num_pages"] / base["num_pages"]
            row["in_flight_vs_bf16"] = row["in_flight"] / base["in_flight"]
    return rows


def pool_picture(name: str, spec: TraceSpec, path: pathlib.Path, page_size=16) -> dict:
    """``jpaged.plot_pool`` of the paged pool at the trace's busiest step (most pages
    held after the step's update): one replay finds the step, a second draws it."""
    from jpaged import plot_pool

    trace, held, best = make_trace(spec), [], {}

    def count(sched):
        held.append(sched.block_manager.num_pages - 1 - sched.block_manager.num_free_pages)

    replay(make_paged(page_size, spec.slots), trace, count)
    busiest = int(np.argmax(held))

    steps = itertools.count()

    def draw(sched):
        if next(steps) == busiest:
            bm = sched.block_manager
            plot_pool(bm, path, seqs=list(sched.seqs.values()),
                      title=f"{name}-like trace, page {page_size}: busiest step {busiest}")
            best.update(step=busiest, held_pages=held[busiest], num_pages=bm.num_pages,
                        running=len(sched.running), waiting=len(sched.waiting))

    replay(make_paged(page_size, spec.slots), trace, draw)
    return best


# -- report -------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    lines = ["# KV memory: contiguous vs paged", "",
             f"Synthetic traces, `max_model_len` {MAX_MODEL_LEN}; see `benchmarks/memory.py` "
             "for the parameters. Averages over the steps at full load.", ""]
    for name, rows in results["traces"].items():
        spec = results["config"]["traces"][name]
        lines += [f"## {name}-like trace ({spec['num_requests']} requests, "
                  f"{spec['slots']} KV slots)", "",
                  "| system | KV utilization | requests in flight |", "|---|---|---|"]
        lines += [f"| {label} | {r['kv_utilization']:.1%} | {r['in_flight']:.1f} |"
                  for label, r in rows.items()]
        lines.append("")
    lines += ["## Sharing (page 16): block-table pages vs distinct pages, summed over steps", "",
              "| trace | workload | without sharing | with sharing | saved |",
              "|---|---|---|---|---|"]
    for name, rows in results["sharing"].items():
        lines += [f"| {name} | {label} | {r['pages_without_sharing']} | "
                  f"{r['pages_with_sharing']} | {r['saved']:.1%} |" for label, r in rows.items()]
    lines += ["", "## Shared system prompt (alpaca-like requests, page 16): prefill tokens", "",
              "| prompt | without prefix cache | with prefix cache | saved | hit rate |",
              "|---|---|---|---|---|"]
    lines += [f"| {label} | {r['prefill_without_cache']} | {r['prefill_with_cache']} | "
              f"{r['saved']:.1%} | {r['hit_rate']:.1%} |"
              for label, r in results["prefix_caching"].items()]
    lines += ["", "## Scheduler cost (median per step, decoding sequences at 512 tokens)", "",
              "Wall time, and CPU time of the process (immune to other processes on a shared "
              "machine).", "",
              "| running | schedule() wall ms | schedule() CPU ms | update() wall ms | "
              "update() CPU ms |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['schedule_ms']:.3f} | {r['schedule_cpu_ms']:.3f} | "
              f"{r['update_ms']:.3f} | {r['update_cpu_ms']:.3f} |"
              for n, r in results["schedule_cost"].items()]
    lines += ["", "## 8-bit KV pools at the bytes of a bfloat16 pool of 65536 slots "
              "(sharegpt-like trace, 1200 requests at 4 per step, page 16)", "",
              "8-bit pages carry a bfloat16 scale per token and kv head (head_dim + 2 bytes "
              "per token per head, K or V). In flight: mean over the steps at full load.", "",
              "| model, pool | KV bytes | bytes/page | pages | vs bf16 | requests in flight "
              "| max in flight | vs bf16 |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {label} | {r['kv_cache_bytes'] / 2**30:.2f} GiB | {r['bytes_per_page']} | "
              f"{r['num_pages']} | {r['pages_vs_bf16']:.3f}x | {r['in_flight']:.1f} | "
              f"{r['max_in_flight']} | {r['in_flight_vs_bf16']:.2f}x |"
              for label, r in results["kv_dtypes"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, rows in results["traces"].items():
        paged = [rows[f"paged {ps}"] for ps in PAGE_SIZES]
        line, = axes[0].plot(PAGE_SIZES, [r["kv_utilization"] * 100 for r in paged], "o-",
                             label=f"{name}: paged")
        for label, style in (("contiguous max-len", ":"), ("contiguous oracle", "--")):
            axes[0].axhline(rows[label]["kv_utilization"] * 100, ls=style, color=line.get_color(),
                            label=f"{name}: {label}")
        axes[1].plot(PAGE_SIZES, [r["in_flight"] for r in paged], "o-", color=line.get_color(),
                     label=f"{name}: paged")
        axes[1].axhline(rows["contiguous max-len"]["in_flight"], ls=":", color=line.get_color(),
                        label=f"{name}: contiguous max-len")
    for ax, title in ((axes[0], "KV utilization (%)"), (axes[1], "requests in flight")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(PAGE_SIZES, [str(p) for p in PAGE_SIZES])
        ax.set_xlabel("page size (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    labels, values = [], []
    for name, rows in results["sharing"].items():
        for label, r in rows.items():
            labels.append(f"{name}\n{label}")
            values.append(r["saved"] * 100)
    axes[2].bar(range(len(values)), values)
    axes[2].set_xticks(range(len(values)), labels, fontsize=6, rotation=90)
    axes[2].set_title("pages saved by sharing (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    t0 = time.perf_counter()
    results = {"config": {"max_model_len": MAX_MODEL_LEN, "page_sizes": PAGE_SIZES,
                          "traces": {k: dataclasses.asdict(v) for k, v in TRACES.items()}}}
    results["traces"] = {name: utilization_and_in_flight(spec) for name, spec in TRACES.items()}
    results["sharing"] = {
        name: {f"{'parallel n' if kind == 'parallel' else 'beam width'}={w}":
               sharing(dataclasses.replace(spec, num_requests=spec.num_requests // 5), kind, w)
               for kind in ("parallel", "beam") for w in (2, 4, 6)}
        for name, spec in TRACES.items()}
    results["prefix_caching"] = {f"{k}-shot": shared_prefix(
        dataclasses.replace(TRACES["alpaca"], num_requests=400), k) for k in (1, 5)}
    results["schedule_cost"] = {str(n): schedule_cost(n) for n in (256, 1024)}
    # Twice the requests, arriving twice as fast: enough to fill the larger 8-bit pools too.
    results["kv_dtypes"] = kv_dtypes(dataclasses.replace(TRACES["sharegpt"], num_requests=1200,
                                                         arrival_rate=4.0))
    results["seconds"] = time.perf_counter() - t0

    text = markdown(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "memory.md").write_text(text)
    plot(results, args.out / "memory.png")
    for name, spec in TRACES.items():
        busiest = pool_picture(name, spec, args.out / f"memory_pool_{name}.png")
        print(f"wrote {args.out}/memory_pool_{name}.png: step {busiest['step']}, "
              f"{busiest['held_pages']} of {busiest['num_pages'] - 1} pages held, "
              f"{busiest['running']} running, {busiest['waiting']} waiting")
    print(f"wrote {args.out}/memory.{{json,md,png}} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
