"""The server's memory over a long run: ``jpaged serve``'s RSS while clients send 10,000
requests (issue 20: it must stay flat).

A ``jpaged serve`` subprocess (the tiny model, token-id prompts) gets ``--num-requests``
requests from ``--concurrency`` asyncio clients: a mix of plain and streamed completions
(random prompts of 4-64 tokens, 1-16 output tokens, some with ``n=2`` or ``logprobs``),
streams the client drops after the first chunk (aborts), requests the server refuses
(``n`` past ``max_num_seqs``, JSON nested too deep, too many stop strings) and streams that
stop reading for a while. After ``--warmup`` requests (compilation, allocator pools), the
server's RSS (``/proc/PID/status``) is sampled every ``--every`` requests. Writes
benchmarks/results/serve_memory.{json,md}.

    python benchmarks/serve_memory.py                      # 10,000 requests
    python benchmarks/serve_memory.py --num-requests 2000  # a shorter run
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
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve import start_server  # noqa: E402

MAX_NUM_SEQS = 16


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_kinds(count: int, seed: int) -> list[tuple[str, dict]]:
    """``count`` (kind, body) pairs in a fixed random order."""
    rng = np.random.default_rng(seed)
    kinds = []
    for _ in range(count):
        prompt = rng.integers(1, 500, int(rng.integers(4, 65))).tolist()
        body = {"prompt": prompt, "max_tokens": int(rng.integers(1, 17)), "ignore_eos": True}
        draw = rng.random()
        if draw < 0.40:
            kinds.append(("plain", {**body, **({"n": 2} if rng.random() < 0.3 else {})}))
        elif draw < 0.80:
            kinds.append(("stream", {**body, "stream": True,
                                     **({"logprobs": 5} if rng.random() < 0.3 else {})}))
        elif draw < 0.88:
            kinds.append(("dropped", {**body, "max_tokens": 64, "stream": True}))
        elif draw < 0.94:
            kinds.append(("slow reader", {**body, "max_tokens": 32, "stream": True,
                                          "logprobs": 5}))
        else:
            kinds.append(("refused", rng.choice([
                {**body, "n": 10**12}, {**body, "stop": [f"s{i}" for i in range(1000)]},
                "[" * 10_000])))
    return kinds


async def one(client, url: str, kind: str, body) -> str:
    """Send one request; returns how it ended."""
    if kind == "refused":
        content = body if isinstance(body, str) else json.dumps(body)
        response = await client.post(f"{url}/v1/completions", content=content,
                                     headers={"content-type": "application/json"})
        return f"refused {response.status_code}"
    if kind == "plain":
        response = await client.post(f"{url}/v1/completions", json=body)
        return f"plain {response.status_code}"
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if kind == "dropped" and line.startswith("data: {"):
                return "dropped"   # closing the stream aborts the request
            if kind == "slow reader":
                await asyncio.sleep(0.05)
        return f"{kind} {response.status_code}"


async def compilations(client, url: str) -> int:
    text = (await client.get(f"{url}/metrics")).text
    return int(float(re.search(r"^jpaged_step_compilations(?:_total)? (\S+)", text,
                               re.M).group(1)))


async def run(url: str, pid: int, kinds, concurrency: int, warmup: int, every: int):
    import httpx

    samples, outcomes = [], {}
    todo = iter(enumerate(kinds))
    done = 0
    start = time.perf_counter()

    async def worker(client):
        nonlocal done
        for index, (kind, body) in todo:
            outcome = await one(client, url, kind, body)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            done += 1
            if done >= warmup and (done - warmup) % every == 0:
                samples.append({"requests": done, "rss_mb": rss_mb(pid),
                                "seconds": time.perf_counter() - start,
                                "compilations": await compilations(client, url)})
                print(f"{done:6d} requests  RSS {samples[-1]['rss_mb']:7.1f} MB  "
                      f"{samples[-1]['seconds']:6.0f} s  "
                      f"{samples[-1]['compilations']} step programs", file=sys.stderr,
                      flush=True)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return samples, outcomes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=500,
                        help="requests before the first RSS sample")
    parser.add_argument("--every", type=int, default=500, help="requests between samples")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    port = free_port()
    # Step programs compiled while sampling count as growth: each sample says how many
    # there were (the warm-up requests compile most shapes first).
    process = start_server("tiny", port, ["--max-num-seqs", str(MAX_NUM_SEQS),
                                          "--max-num-batched-tokens", "128",
                                          "--max-model-len", "256",
                                          "--disable-log-requests", "--no-log-stats"])
    try:
        kinds = request_kinds(args.warmup + args.num_requests, args.seed)
        samples, outcomes, seconds = asyncio.run(run(
            f"http://127.0.0.1:{port}", process.pid, kinds, args.concurrency, args.warmup,
            args.every))
    finally:
        process.terminate()
        process.wait(timeout=60)
    write_report(args, samples, outcomes, seconds)


def write_report(args, samples: list[dict], outcomes: dict, seconds: float) -> None:
    """Table, summary and a least-squares fit RSS = a + b * step programs + c * requests,
    which separates compiled programs (each a few MB) from growth per request."""
    rss = np.array([s["rss_mb"] for s in samples])
    requests = np.array([s["requests"] for s in samples])
    half = len(samples) // 2
    slope = float(np.polyfit(requests[half:], rss[half:], 1)[0] * 1000) if len(samples) > 3 \
        else float("nan")
    design = np.array([[1, s["compilations"], s["requests"] / 1000] for s in samples], float)
    fit = np.linalg.lstsq(design, rss, rcond=None)[0]
    summary = {"rss_first_mb": float(rss[0]), "rss_last_mb": float(rss[-1]),
               "rss_max_mb": float(rss.max()), "growth_mb": float(rss[-1] - rss[0]),
               "slope_second_half_mb_per_1000": slope,
               "fit_mb_per_step_program": float(fit[1]),
               "fit_mb_per_1000_requests": float(fit[2]),
               "fit_max_residual_mb": float(np.abs(design @ fit - rss).max()),
               "requests_per_s": (args.warmup + args.num_requests) / seconds}
    report = {"config": {**{k: str(v) if isinstance(v, pathlib.Path) else v
                            for k, v in vars(args).items()},
                         "platform": platform.platform(), "cpus": os.cpu_count(),
                         "load_average_end": os.getloadavg()},
              "summary": summary, "outcomes": outcomes, "samples": samples,
              "seconds": seconds}
    lines = ["| requests | RSS (MB) | seconds | step programs compiled |", "|---|---|---|---|"]
    lines += [f"| {s['requests']} | {s['rss_mb']:.1f} | {s['seconds']:.0f} | "
              f"{s['compilations']} |" for s in samples]
    table = "\n".join(lines)
    text = (f"RSS {summary['rss_first_mb']:.1f} MB after {args.warmup} warm-up requests, "
            f"{summary['rss_last_mb']:.1f} MB after {args.warmup + args.num_requests} "
            f"(max {summary['rss_max_mb']:.1f}); second-half slope "
            f"{slope:.2f} MB per 1,000 requests; {summary['requests_per_s']:.1f} requests/s. "
            f"Fit over the samples: {fit[1]:.1f} MB per step program compiled, "
            f"{fit[2]:+.1f} MB per 1,000 requests (largest residual "
            f"{summary['fit_max_residual_mb']:.1f} MB)"
            + (": the growth follows compiled programs (new step shapes), not requests"
               if fit[2] < 5 else ": memory grows with requests"))
    print(table)
    print(text)
    print("outcomes:", outcomes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_memory.json").write_text(json.dumps(report, indent=2))
    (args.out / "serve_memory.md").write_text(
        f"# jpaged serve: RSS over a long run\n\n`python benchmarks/serve_memory.py "
        f"--num-requests {args.num_requests} --warmup {args.warmup} --every {args.every}` on "
        f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end; timings are noisy, memory is not), tiny "
        f"model, {args.concurrency} concurrent clients.\n\n{text}.\n\nOutcomes: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())) + f"\n\n{table}\n")


if __name__ == "__main__":
    main()
