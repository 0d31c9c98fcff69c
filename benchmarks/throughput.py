"""Throughput: the paged engine vs a dense-cache engine at the same KV memory.

Both engines run the embedded model (or ``--model DIR``) on the same request trace, with
arrivals all at once and, with ``--rate``, Poisson arrivals; see ``jpaged/tools/bench.py`` for the
trace and the baseline. Writes benchmarks/results/throughput.{json,md,png}.

    python benchmarks/throughput.py             # both arrival patterns, ~5 min on 2 cores
    python benchmarks/throughput.py --quick     # all-at-once only, fewer requests
    python benchmarks/throughput.py --kv-dtypes # the paged engine with bfloat16, int8 and
                                                # fp8 pools of the same bytes
"""

import argparse
import json
import pathlib
import platform

import jax
import jax.numpy as jnp

from jpaged.tools.bench import Trace, compare, run_trace, table
from jpaged.core.cache import KVCache
from jpaged.engine.engine import LLM
from jpaged.engine.model_loading import load_model

KV_DTYPES = ("auto", "int8", "fp8")   # "auto": the bfloat16 model's dtype
KV_ROWS = [("pool pages", "num_pages", "{:d}"), ("bytes per page", "bytes_per_page", "{:d}"),
           ("max requests in flight", "max_in_flight", "{:d}"),
           ("requests/s", "requests_per_s", "{:.2f}"),
           ("output tokens/s", "output_tokens_per_s", "{:.1f}"),
           ("TPOT p50 (ms)", "tpot_p50", "{:.1f}"), ("preemptions", "preemptions", "{:d}")]
MS = ("tpot_p50",)   # kept in seconds by run_trace


def kv_dtype_runs(model_name: str, trace: Trace, *, kv_tokens: int, max_model_len: int,
                  page_size: int) -> dict:
    """The paged engine on a bfloat16 model with a bfloat16, an int8 and an fp8 pool, all
    in the bytes of a bfloat16 pool of ``kv_tokens`` slots; each timed after a warm-up."""
    model = load_model(model_name, dtype=jnp.bfloat16)
    config = model.config
    geometry = (config.num_layers, config.num_kv_heads, config.head_dim, page_size)
    budget = (kv_tokens // page_size + 1) * KVCache.bytes_per_page(*geometry, jnp.bfloat16)
    requests = trace.sample(config.vocab_size)
    runs = {}
    for kv_cache_dtype in KV_DTYPES:
        llm = LLM(model, page_size=page_size, kv_cache_bytes=budget, kv_cache_dtype=kv_cache_dtype,
                  max_model_len=max_model_len, max_num_seqs=256, max_num_batched_tokens=1024,
                  watermark=0.1, enable_prefix_caching=False)
        info = llm.kv_cache_info()
        print(f"{kv_cache_dtype}: {info}")
        run_trace(llm.engine, requests)   # warm-up: compiles every bucket the trace reaches
        runs[info["kv_cache_dtype"]] = {**run_trace(llm.engine, requests), **info}
    return dict(kv_cache_bytes=budget, runs=runs)


def kv_table(result: dict) -> str:
    names = list(result["runs"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key, fmt in KV_ROWS:
        lines.append(f"| {label} | " + " | ".join(
            fmt.format(result["runs"][n][key] * (1000 if key in MS else 1)) for n in names)
            + " |")
    base = result["runs"][names[0]]
    for label, key in (("pages vs bf16", "num_pages"), ("max in flight vs bf16", "max_in_flight"),
                       ("tokens/s vs bf16", "output_tokens_per_s")):
        lines.append(f"| **{label}** | " + " | ".join(
            f"{result['runs'][n][key] / base[key]:.2f}x" for n in names) + " |")
    return "\n".join(lines)


def plot(runs: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(runs)
    for ax, key, label in ((axes[0], "output_tokens_per_s", "output tokens/s"),
                           (axes[1], "max_in_flight", "max requests in flight")):
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [runs[n]["paged"][key] for n in names], 0.4,
               label="paged")
        ax.bar([x + 0.2 for x in xs], [runs[n]["dense"][key] for n in names], 0.4,
               label="dense")
        ax.set_xticks(list(xs), names)
        ax.set_title(label)
        ax.legend()
    fig.suptitle("paged vs dense engine at equal KV memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--rate", type=float, default=8.0,
                        help="Poisson arrival rate of the second run (requests/s)")
    parser.add_argument("--kv-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kv-dtypes", action="store_true",
                        help="only the bfloat16 / int8 / fp8 pool comparison")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    setup = (f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}), "
             f"jax {jax.__version__}, model {args.model!r}, max_model_len {args.max_model_len}, "
             f"page {args.page_size}. Timed after a warm-up pass of the same trace.")
    if args.kv_dtypes:
        trace = Trace(num_requests=args.num_requests, max_len=args.max_model_len)
        result = kv_dtype_runs(args.model, trace, kv_tokens=args.kv_tokens,
                               max_model_len=args.max_model_len, page_size=args.page_size)
        text = (f"# Paged engine: bfloat16 vs 8-bit KV pools of the same bytes\n\n{setup} "
                f"Model in bfloat16; every pool in {result['kv_cache_bytes']} bytes (a bfloat16 "
                f"pool of {args.kv_tokens} slots); {args.num_requests} requests at once.\n"
                f"`python benchmarks/throughput.py --kv-dtypes --num-requests "
                f"{args.num_requests}`\n\n{kv_table(result)}\n")
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput_kv8.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "throughput_kv8.md").write_text(text)
        return

    model = load_model(args.model)
    arrivals = {"all at once": None} if args.quick else {"all at once": None,
                                                         f"Poisson {args.rate}/s": args.rate}
    runs = {}
    for name, rate in arrivals.items():
        trace = Trace(num_requests=args.num_requests // (2 if args.quick else 1), rate=rate,
                      max_len=args.max_model_len)
        print(f"## {name}")
        runs[name] = compare(model, trace, kv_tokens=args.kv_tokens,
                             max_model_len=args.max_model_len, page_size=args.page_size)
        print(table(runs[name]) + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    setup = (f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}), "
             f"jax {jax.__version__}, model {args.model!r}, KV memory {args.kv_tokens} tokens "
             f"for both engines, max_model_len {args.max_model_len}, page {args.page_size}. "
             f"Timed after a warm-up pass of the same trace.")
    (args.out / "throughput.json").write_text(json.dumps(runs, indent=2) + "\n")
    with open(args.out / "throughput.md", "w") as f:
        f.write(f"# Paged vs dense engine throughput\n\n{setup}\n`python benchmarks/"
                f"throughput.py{' --quick' if args.quick else ''}`\n\n")
        for name, results in runs.items():
            f.write(f"## Arrivals: {name}\n\n{table(results)}\n\n")
    plot(runs, args.out / "throughput.png")
    print(f"wrote {args.out}/throughput.{{json,md,png}}")


if __name__ == "__main__":
    main()
