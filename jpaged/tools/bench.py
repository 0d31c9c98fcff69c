"""Throughput: the paged engine against a dense-cache engine at the same KV memory.

The dense baseline is what a contiguous cache does: every sequence reserves
``max_model_len`` slots (one page of that size) and a batch runs to completion before
the next one starts (static batching). Both engines run the same model, the same jitted
step and the same sampler, so the difference is memory management alone.
Used by ``python -m jpaged bench`` and ``benchmarks/throughput.py``.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from jpaged.engine.engine import LLM
from jpaged.core.interfaces import Engine
from jpaged.engine.model_loading import load_model
from jpaged.host.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Trace:
    """Requests with lengths drawn from clipped log-normal laws (seeded).

    Defaults are ShareGPT-like in shape (long tails, outputs as long as prompts), scaled
    down so the embedded model runs them on a CPU in about a minute.
    """

    num_requests: int = 200
    prompt_median: int = 96
    output_median: int = 96
    sigma: float = 0.8
    max_len: int = 512
    rate: float | None = None   # requests/s, Poisson arrivals; None: all at time 0
    seed: int = 0

    def sample(self, vocab_size: int) -> list[dict]:
        rng = np.random.default_rng(self.seed)

        def lengths(median):
            return np.clip(rng.lognormal(np.log(median), self.sigma, self.num_requests),
                           4, self.max_len // 2).astype(int)

        prompts, outputs = lengths(self.prompt_median), lengths(self.output_median)
        gaps = (rng.exponential(1 / self.rate, self.num_requests) if self.rate
                else np.zeros(self.num_requests))
        return [dict(arrival=float(t), output_len=int(o),
                     prompt=rng.integers(0, vocab_size, p).tolist())
                for t, p, o in zip(np.cumsum(gaps), prompts, outputs)]


def run_trace(engine: Engine, requests: list[dict], progress: bool = False) -> dict:
    """Replay ``requests`` through ``engine`` (an ``LLM``'s ``.engine``) in real time;
    returns the figures."""
    compiled_before = engine.num_compilations
    pending = sorted(requests, key=lambda r: r["arrival"])
    outputs, max_in_flight, next_request = [], 0, 0
    start = time.perf_counter()
    before = engine.metrics()
    while next_request < len(pending) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while next_request < len(pending) and pending[next_request]["arrival"] <= now:
            r = pending[next_request]
            engine.add_request(r["prompt"], SamplingParams(
                max_tokens=r["output_len"], temperature=0.0, ignore_eos=True))
            next_request += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[next_request]["arrival"] - now))
            continue
        for output in engine.step():
            if output.finished:
                outputs.append(output)
                if progress:
                    _progress(len(outputs), len(pending))
        max_in_flight = max(max_in_flight, engine.metrics()["num_running"])
    elapsed = time.perf_counter() - start
    after = engine.metrics()
    ttft = np.array([o.metrics.time_to_first_token for o in outputs])
    tpot = np.array([o.metrics.time_per_output_token for o in outputs])
    tokens = sum(len(o.token_ids) for o in outputs)
    step_time = after["step_seconds"] - before["step_seconds"]
    return dict(
        requests=len(outputs), seconds=elapsed, requests_per_s=len(outputs) / elapsed,
        output_tokens_per_s=tokens / elapsed, max_in_flight=max_in_flight,
        ttft_mean=float(ttft.mean()), ttft_p50=float(np.median(ttft)),
        ttft_p99=float(np.percentile(ttft, 99)), tpot_mean=float(tpot.mean()),
        tpot_p50=float(np.median(tpot)), tpot_p99=float(np.percentile(tpot, 99)),
        compilations=engine.num_compilations - compiled_before,
        host_share=(after["host_seconds"] - before["host_seconds"]) / step_time
        if step_time else 0.0,
        preemptions=after["num_preemptions"])


def _progress(done: int, total: int) -> None:
    """A bar redrawn in place on a terminal; a line every tenth of the run elsewhere."""
    filled = 30 * done // total
    line = f"  [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} requests"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + ("\n" if done == total else ""))
    elif done == total or done % max(total // 10, 1) == 0:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def engines(model, *, kv_tokens: int, max_model_len: int, page_size: int = 16,
            max_num_seqs: int = 256, max_num_batched_tokens: int = 1024) -> dict[str, LLM]:
    """A paged and a dense engine whose KV pools hold the same ``kv_tokens`` slots."""
    dense_rows = kv_tokens // max_model_len
    if dense_rows < 1:
        raise ValueError(f"kv_tokens={kv_tokens} holds no sequence of max_model_len="
                         f"{max_model_len}")
    common = dict(max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                  enable_prefix_caching=False)
    return {
        # +1: page 0 is the null page in both pools. A 10% admission watermark keeps the
        # paged engine from admitting prompts it must soon preempt and recompute (at 1%,
        # about half the requests of the default trace were preempted once).
        "paged": LLM(model, page_size=page_size, num_pages=kv_tokens // page_size + 1,
                     max_num_seqs=max_num_seqs, watermark=0.1, **common),
        "dense": LLM(model, page_size=max_model_len, num_pages=dense_rows + 1,
                     max_num_seqs=dense_rows, static_batching=True, **common),
    }


def compare(model="tiny", trace: Trace = Trace(), *, kv_tokens: int = 8192,
            max_model_len: int = 512, page_size: int = 16, progress: bool = True,
            warmup: bool = True) -> dict:
    """Run ``trace`` through both engines; returns per-engine figures and the ratios."""
    if isinstance(model, str):
        model = load_model(model)
    requests = trace.sample(model.config.vocab_size)
    results = {}
    for name, llm in engines(model, kv_tokens=kv_tokens, max_model_len=max_model_len,
                             page_size=page_size).items():
        compiled = 0
        if warmup:
            # A first pass compiles every bucket the trace reaches (a few seconds each on a
            # CPU, which would swamp a short run); the timed pass then measures steady state.
            if progress:
                sys.stderr.write(f"{name}, warm-up pass (compiles):\n")
            compiled = run_trace(llm.engine, requests, progress)["compilations"]
        if progress:
            sys.stderr.write(f"{name}, timed pass:\n")
        results[name] = run_trace(llm.engine, requests, progress)
        results[name]["compilations"] += compiled
    paged, dense = results["paged"], results["dense"]
    results["ratio"] = dict(
        throughput=paged["output_tokens_per_s"] / dense["output_tokens_per_s"],
        requests_per_s=paged["requests_per_s"] / dense["requests_per_s"],
        max_in_flight=paged["max_in_flight"] / dense["max_in_flight"])
    results["setup"] = dict(kv_tokens=kv_tokens, max_model_len=max_model_len,
                            page_size=page_size, trace=dataclasses.asdict(trace))
    return results


ROWS = [("requests/s", "requests_per_s", "{:.2f}"),
        ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
        ("max requests in flight", "max_in_flight", "{:d}"),
        ("TTFT mean / p50 / p99 (s)", ("ttft_mean", "ttft_p50", "ttft_p99"), "{:.3f}"),
        ("TPOT mean / p50 / p99 (ms)", ("tpot_mean", "tpot_p50", "tpot_p99"), "{:.1f}"),
        ("compilations (whole run)", "compilations", "{:d}"),
        ("host share of step time", "host_share", "{:.1%}"),
        ("preemptions", "preemptions", "{:d}")]


def table(results: dict) -> str:
    """A Markdown table of both engines side by side, plus the ratios."""
    lines = ["| metric | paged | dense |", "|---|---|---|"]
    for label, keys, fmt in ROWS:
        cells = []
        for name in ("paged", "dense"):
            r = results[name]
            if isinstance(keys, tuple):
                scale = 1000 if "ms" in label else 1
                cells.append(" / ".join(fmt.format(r[k] * scale) for k in keys))
            else:
                cells.append(fmt.format(r[keys]))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    ratio = results["ratio"]
    lines.append(f"| **paged / dense throughput** | **{ratio['throughput']:.2f}x** | |")
    lines.append(f"| **paged / dense max in flight** | **{ratio['max_in_flight']:.2f}x** | |")
    return "\n".join(lines)
