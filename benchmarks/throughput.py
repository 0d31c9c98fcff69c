"""Throughput: the paged engine vs a dense-cache engine at the same KV memory.

Both engines run the embedded model (or ``--model DIR``) on the same request trace, with
arrivals all at once and, with ``--rate``, Poisson arrivals; see ``jpaged/bench.py`` for the
trace and the baseline. Writes benchmarks/results/throughput.{json,md,png}.

    python benchmarks/throughput.py             # both arrival patterns, ~5 min on 2 cores
    python benchmarks/throughput.py --quick     # all-at-once only, fewer requests
"""

import argparse
import json
import pathlib
import platform

import jax

from jpaged.bench import Trace, compare, table
from jpaged.model_loading import load_model


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
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()

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
