"""The HTTP server's cost: streaming clients against ``jpaged serve`` vs the engine in-process.

One trace (Poisson arrivals, random token-id prompts, a fixed number of output tokens per
request with ``ignore_eos``) is played three ways on the same model and engine options:

- ``server``: a ``jpaged serve`` subprocess on loopback; one streaming client per request
  (httpx, asyncio), sent at its arrival time; TTFT and TPOT measured by the client;
- ``in-process``: the same arrivals replayed on an ``LLM``'s engine in this process (what
  ``LLM.generate`` drives, without HTTP): TTFT and TPOT from the engine's request metrics;
- ``LLM.generate``: every request of the trace at once (the offline ceiling).

Each is played untimed until two passes in a row compile no new step shape (at most 12
passes; the server starts with ``--no-warmup``: benchmarks/startup.py measures that), so
compilation stays out of the figures (``compilations_while_timed`` says if one slipped in); prefix caching is
off, so the repeat finds nothing cached (random prompts share no prefix anyway). Writes
benchmarks/results/serve.{json,md}.

    python benchmarks/serve.py                       # 48 requests at 4/s, ~10 min on 2 cores
    python benchmarks/serve.py --num-requests 200 --rate 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def make_trace(num_requests: int, rate: float, prompt_len: tuple[int, int], max_tokens: int,
               vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, num_requests))
    arrivals -= arrivals[0]
    return [{"arrival": float(t), "max_tokens": max_tokens,
             "prompt": rng.integers(1, vocab, int(rng.integers(*prompt_len))).tolist()}
            for t in arrivals]


def percentiles(values) -> dict:
    values = np.asarray(values, float)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean())}


def summarize(ttft, tpot, tokens: int, seconds: float) -> dict:
    return {"ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "output_tokens": tokens, "seconds": seconds,
            "output_tokens_per_s": tokens / seconds}


# -- server ----------------------------------------------------------------------------


def start_server(model: str, port: int, options: list[str]):
    process = subprocess.Popen(
        [sys.executable, "-m", "jpaged", "serve", "--model", model, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-warmup", *options],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("the server did not come up in 300 s")


async def one_client(client, url: str, model: str, request: dict, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + request["arrival"] - time.perf_counter()))
    sent = time.perf_counter()
    times, tokens = [], 0
    body = {"model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"],
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    if choice.get("token_ids"):
                        tokens += len(choice["token_ids"])
                        times.append(time.perf_counter())
    return {"sent": sent, "first": times[0], "last": times[-1], "tokens": tokens}


async def play(url: str, model: str, trace: list[dict]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(trace))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        return await asyncio.gather(*(one_client(client, url, model, r, start) for r in trace))


def server_compilations(url: str) -> int:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("jpaged_step_compilations_total "))))


def warm_up(play_once, compilations) -> int:
    """Play the trace until two passes in a row compile nothing new (the step shapes its
    timing produces are compiled), at most ``MAX_WARMUP_PASSES`` times; returns the passes
    played."""
    clean = 0
    for passes in range(1, MAX_WARMUP_PASSES + 1):
        before = compilations()
        play_once()
        clean = clean + 1 if compilations() == before else 0
        if clean == 2:
            break
    return passes


MAX_WARMUP_PASSES = 12


def run_server(model: str, trace: list[dict], options: list[str]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = start_server(model, port, options)
    url = f"http://127.0.0.1:{port}"
    try:
        passes = warm_up(lambda: asyncio.run(play(url, model, trace)),
                         lambda: server_compilations(url))
        before = server_compilations(url)
        start = time.perf_counter()
        results = asyncio.run(play(url, model, trace))
        seconds = time.perf_counter() - start
        compiled = server_compilations(url) - before
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {**summarize([r["first"] - r["sent"] for r in results],
                        [(r["last"] - r["first"]) / max(r["tokens"] - 1, 1) for r in results],
                        sum(r["tokens"] for r in results), seconds),
            "warmup_passes": passes, "compilations_while_timed": compiled}


# -- in-process ------------------------------------------------------------------------


def params(request: dict):
    from jpaged import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)


def replay(llm, trace: list[dict]) -> dict:
    """The trace's arrivals on ``llm.engine``, stepping as a server's engine thread does."""
    engine, pending, done = llm.engine, list(trace), []
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0]["arrival"] <= now:
            request = pending.pop(0)
            engine.add_request(request["prompt"], params(request))
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0]["arrival"] - now))
            continue
        done += [o for o in engine.step() if o.finished]
    seconds = time.perf_counter() - start
    return summarize([o.metrics.time_to_first_token for o in done],
                     [o.metrics.time_per_output_token for o in done],
                     sum(len(o.token_ids) for o in done), seconds)


def generate_all(llm, trace: list[dict]) -> dict:
    start = time.perf_counter()
    outputs = llm.generate([r["prompt"] for r in trace], [params(r) for r in trace])
    seconds = time.perf_counter() - start
    return summarize([o.metrics.time_to_first_token for o in outputs],
                     [o.metrics.time_per_output_token for o in outputs],
                     sum(len(o.token_ids) for o in outputs), seconds)


# -- report ----------------------------------------------------------------------------


def table(runs: dict) -> str:
    lines = ["| run | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) "
             "| wall (s) | warm-up passes | compiles while timed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['output_tokens_per_s']:.0f} | "
                     f"{1e3 * r['ttft_s']['p50']:.1f} | {1e3 * r['ttft_s']['p99']:.1f} | "
                     f"{1e3 * r['tpot_s']['p50']:.2f} | {1e3 * r['tpot_s']['p99']:.2f} | "
                     f"{r['seconds']:.2f} | {r['warmup_passes']} | "
                     f"{r['compilations_while_timed']} |")
    return "\n".join(lines)


def ratios(runs: dict) -> dict:
    server, local, offline = runs["server"], runs["in-process"], runs["LLM.generate"]
    return {
        "throughput_server_over_in_process": server["output_tokens_per_s"]
        / local["output_tokens_per_s"],
        "throughput_server_over_generate": server["output_tokens_per_s"]
        / offline["output_tokens_per_s"],
        "ttft_p50_server_over_in_process": server["ttft_s"]["p50"] / local["ttft_s"]["p50"],
        "tpot_p50_server_over_in_process": server["tpot_s"]["p50"] / local["tpot_s"]["p50"],
    }


NOTE = ("The server's TTFT and TPOT are what its clients see (first and last streamed "
        "chunk); the in-process ones come from the engine's request metrics. Chunks that "
        "reach a client together shrink its gaps, so the server's TPOT can read lower than "
        "the engine's. LLM.generate takes every request at once: its throughput is the "
        "offline ceiling, not a run under the same arrivals.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals, requests/s")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 96))
    parser.add_argument("--max-tokens", type=int, default=32)
    # A small batch and token budget keep the number of step shapes (buckets) small, so
    # the warm-up passes compile them all.
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    from jpaged import LLM

    llm = LLM(args.model, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    trace = make_trace(args.num_requests, args.rate, tuple(args.prompt_len), args.max_tokens,
                       llm.engine.model.config.vocab_size, args.seed)
    print(f"{args.num_requests} streaming requests, Poisson {args.rate}/s, prompts of "
          f"{args.prompt_len[0]}..{args.prompt_len[1]} tokens, {args.max_tokens} output tokens "
          f"each, model {args.model!r}", file=sys.stderr)
    runs = {"server": run_server(args.model, trace, [
        "--max-num-seqs", str(args.max_num_seqs), "--no-enable-prefix-caching",
        "--max-num-batched-tokens", str(args.max_num_batched_tokens)])}
    engine = llm.engine
    for name, play_once in (("in-process", lambda: replay(llm, trace)),
                            ("LLM.generate", lambda: generate_all(llm, trace))):
        passes = warm_up(play_once, lambda: engine.num_compilations)
        before = engine.num_compilations
        runs[name] = {**play_once(), "warmup_passes": passes,
                      "compilations_while_timed": engine.num_compilations - before}
    report = {"config": {**{k: v if not isinstance(v, pathlib.Path) else str(v)
                            for k, v in vars(args).items()}, "platform": platform.platform(),
                         "cpus": os.cpu_count(), "load_average": os.getloadavg()},
              "runs": runs, "ratios": ratios(runs)}
    text = table(runs)
    ratio_text = "\n".join(f"- {k}: {v:.2f}" for k, v in report["ratios"].items())
    print(text)
    print(ratio_text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2))
    (args.out / "serve.md").write_text(
        f"# jpaged serve vs in-process engine\n\n`python benchmarks/serve.py "
        f"--num-requests {args.num_requests} --rate {args.rate} --max-num-seqs "
        f"{args.max_num_seqs} --max-num-batched-tokens {args.max_num_batched_tokens}` on {platform.machine()}, "
        f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end), model "
        f"{args.model!r}: {args.num_requests} streaming requests, Poisson arrivals at "
        f"{args.rate}/s, prompts of {args.prompt_len[0]}..{args.prompt_len[1]} random token "
        f"ids, {args.max_tokens} output tokens each (greedy, ignore_eos).\n\n{text}\n\n"
        f"Ratios (one run):\n\n{ratio_text}\n\n{NOTE}\n")


if __name__ == "__main__":
    main()
