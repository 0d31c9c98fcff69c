"""Start-up warm-up: time to ready and the first minute of traffic, cold vs warmed up.

One ``jpaged serve`` configuration, one Poisson trace of streaming requests (a minute of
arrivals), played three times:

- ``cold``: ``--no-warmup``: ready once the model is loaded; the first minute of traffic
  compiles each step shape when it first meets it;
- ``warm-up``: the default: ``/health`` is 503 until every step shape the configuration
  can produce is compiled; then the same first minute;
- ``warm``: the warm-up server again, the same trace a second time (the steady state).

Reported: seconds from launch to ``/health`` 200 and the warm-up's own seconds (from the
server's log), then for the minute: requests finished within it, output tokens/s over it
(tokens streamed within the minute / 60 s), TTFT p50 / p99 of the requests finished in it,
and step programs compiled during it. Writes benchmarks/results/startup.{json,md}.

    python benchmarks/startup.py                 # ~10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import re
import socket
import subprocess
import sys
import time

import numpy as np

from serve import ROOT, make_trace, play, server_compilations

WINDOW_S = 60.0
NOTE = ("`warm` is the warmed-up server playing the same minute a second time. Ready after: "
        "from launch to /health 200 (the cold server loads the model only; the warm-up one "
        "also compiles every step shape of its configuration, most of which this trace never "
        "meets). All finished after: from the first arrival to the last request's last "
        "token.")


def launch(model: str, options: list[str], log_path: pathlib.Path):
    """A server; returns (process, url, seconds from launch to /health 200)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "jpaged", "serve", model, "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "warning", "--disable-log-requests", *options],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < 3600:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not come up in an hour")


def first_minute(url: str, model: str, trace: list[dict]) -> dict:
    before = server_compilations(url)
    results = asyncio.run(play(url, model, trace))
    start = min(r["sent"] - request["arrival"] for r, request in zip(results, trace))
    done = [r for r in results if r["last"] - start <= WINDOW_S]
    ttft = np.array([r["first"] - r["sent"] for r in done]) if done else np.array([np.nan])
    return {"requests": len(trace), "finished_in_window": len(done),
            "output_tokens_per_s": sum(r["tokens"] for r in done) / WINDOW_S,
            "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "all_done_s": max(r["last"] for r in results) - start,
            "compilations": server_compilations(url) - before}


def table(runs: dict) -> str:
    lines = ["| run | ready after (s) | warm-up (s, shapes) | finished in the minute | "
             "output tokens/s | TTFT p50 (s) | TTFT p99 (s) | compiles in the minute | "
             "all finished after (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['ready_s']:.1f} | {r['warmup_s']:.1f} "
                     f"({r['warmup_shapes']}) | {r['finished_in_window']}/{r['requests']} | "
                     f"{r['output_tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} | "
                     f"{r['ttft_p99_s']:.2f} | {r['compilations']} | {r['all_done_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals, requests/s")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 96))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    from jpaged.engine.model_loading import model_config

    vocab = model_config(args.model).vocab_size
    # Arrivals over one minute: the requests a minute at this rate brings.
    trace = [r for r in make_trace(int(args.rate * WINDOW_S * 2), args.rate,
                                   tuple(args.prompt_len), args.max_tokens, vocab, args.seed)
             if r["arrival"] < WINDOW_S]
    options = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
               str(args.max_num_batched_tokens), "--max-model-len", str(args.max_model_len),
               "--no-enable-prefix-caching"]
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, extra in (("cold", ["--no-warmup"]), ("warm-up", [])):
        log_path = args.out / f"startup-{name}.log"
        process, url, ready = launch(args.model, options + extra, log_path)
        try:
            runs[name] = {"ready_s": ready, **first_minute(url, args.model, trace)}
            match = re.search(r"warm-up compiled (\d+) step shapes in ([\d.]+) s",
                              log_path.read_text())
            runs[name]["warmup_shapes"] = int(match[1]) if match else 0
            runs[name]["warmup_s"] = float(match[2]) if match else 0.0
            if name == "warm-up":
                runs["warm"] = {"ready_s": ready, **first_minute(url, args.model, trace),
                                "warmup_shapes": 0, "warmup_s": 0.0}
        finally:
            process.terminate()
            process.wait(timeout=60)
        log_path.unlink()
    text = table(runs)
    print(text)
    load = os.getloadavg()[0]
    report = {"config": {**{k: str(v) if isinstance(v, pathlib.Path) else v
                            for k, v in vars(args).items()}, "platform": platform.platform(),
                         "cpus": os.cpu_count(), "load_average": load}, "runs": runs}
    (args.out / "startup.json").write_text(json.dumps(report, indent=2))
    (args.out / "startup.md").write_text(
        f"# Start-up: cold vs warmed-up server\n\n`python benchmarks/startup.py --rate "
        f"{args.rate} --max-num-seqs {args.max_num_seqs} --max-num-batched-tokens "
        f"{args.max_num_batched_tokens} --max-model-len {args.max_model_len}` on "
        f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average "
        f"{load:.1f} at the end: timings are noisy), model {args.model!r}: {len(trace)} "
        f"streaming requests arriving over {WINDOW_S:.0f} s (Poisson {args.rate}/s), prompts of "
        f"{args.prompt_len[0]}..{args.prompt_len[1]} random token ids, {args.max_tokens} "
        f"output tokens each.\n\n{text}\n\n{NOTE}\n")


if __name__ == "__main__":
    main()
