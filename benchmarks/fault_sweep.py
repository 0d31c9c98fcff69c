"""Fault sweep: a fault at every function (1st..k-th call) and a KeyboardInterrupt at every
line the host runs inside a step, on the tiny model, for each workload of
``tests/test_faults.py`` (see ``jpaged/tools/faults.py``). Prints injection points, faults,
faults checked for an exact state, runs, steps and seconds per sweep; writes
benchmarks/results/fault_sweep.{json,md}. Exits non-zero at the first broken rule.

    python benchmarks/fault_sweep.py                  # every point (call k <= 3, line k = 1)
    python benchmarks/fault_sweep.py --every 5        # one point in 5
    python benchmarks/fault_sweep.py --replicas 2     # data parallelism (two engines)
"""

import argparse
import json
import pathlib
import platform
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from test_faults import SETUPS, maker, workload  # noqa: E402

from jpaged.models import Model, init_params, tiny_config  # noqa: E402
from jpaged.tools import faults  # noqa: E402

COLUMNS = ["setup", "mode", "points", "faults", "exact", "unreached", "runs", "steps",
           "seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS))
    parser.add_argument("--modes", nargs="+", default=["call", "line"])
    parser.add_argument("--call-k", type=int, default=3)
    parser.add_argument("--line-k", type=int, default=1)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/fault_sweep")
    args = parser.parse_args()
    config = tiny_config(num_layers=2, max_position_embeddings=128)
    model = Model(config, init_params(config, jax.random.key(0)))
    rows = []
    for setup in args.setups:
        for mode in args.modes:
            result = faults.sweep(maker(model, setup, args.replicas), workload(setup), mode,
                                  max_k=args.call_k if mode == "call" else args.line_k,
                                  every=args.every)
            rows.append({"setup": setup, **result.row()})
            print(rows[-1], flush=True)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f"{r[c]:.0f}" if isinstance(r[c], float) else str(r[c])
                                for c in COLUMNS) + " |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "replicas": args.replicas,
            "every": args.every, "call_k": args.call_k, "line_k": args.line_k}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(
        f"Fault sweep ({meta}); seconds include compilation, shared 2-core CPU.\n\n"
        + table + "\n")


if __name__ == "__main__":
    main()
