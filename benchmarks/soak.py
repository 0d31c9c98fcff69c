"""Soak: random operations through the engine on the tiny model with faults injected into
its steps and snapshots restored on the way (see ``jpaged/tools/soak.py``). Prints operations,
faults injected and survived, snapshots and pages leaked (must be 0); writes
benchmarks/results/soak.{json,md}. Exits non-zero at the first broken rule.

    python benchmarks/soak.py                         # 10^5 operations (about 15 min on 2 cores)
    python benchmarks/soak.py --operations 5000       # a couple of minutes
    python benchmarks/soak.py --time-limit 600        # stop adding work after 10 minutes
    python benchmarks/soak.py --data-parallel 2       # two replicas on fake CPU devices
"""

import argparse
import os
import sys

if "--data-parallel" in sys.argv:   # fake CPU devices: JAX reads XLA_FLAGS when it starts
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import dataclasses
import json
import pathlib
import platform

import jax

from jpaged.tools.soak import Soak, SoakConfig
from jpaged.models import Model, init_params, tiny_config

ROWS = [("operations", "operations"), ("engine steps", "steps"), ("requests added", "adds"),
        ("requests aborted", "aborts"), ("requests finished", "finished"),
        ("faults injected", "faults_injected"), ("faults survived", "faults_survived"),
        ("page moves in failed steps", "fault_moves"),
        ("host-path points faulted (function, occurrence)", "host_points"), ("snapshots saved and restored", "snapshots"),
        ("greedy requests checked against a clean run", "greedy_checked"),
        ("greedy mismatches", "greedy_mismatches"), ("preemptions", "preemptions"),
        ("longest wait of a request (steps)", "max_request_wait_steps"),
        ("pages leaked", "pages_leaked"), ("seconds", "seconds")]


def table(result: dict) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {label} | {result[key]:.1f} |" if isinstance(result[key], float)
              else f"| {label} | {result[key]} |" for label, key in ROWS]
    lines.append("| faults by kind | " + ", ".join(
        f"{k}: {v}" for k, v in result["faults_by_kind"].items()) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.02)
    parser.add_argument("--snapshot-every", type=int, default=300,
                        help="steps between snapshots (0: none)")
    parser.add_argument("--preemption-mode", default="swap", choices=["swap", "recompute"])
    parser.add_argument("--data-parallel", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which no operation starts (the run then drains)")
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args()
    config = SoakConfig(operations=args.operations, seed=args.seed, fault_rate=args.fault_rate,
                        snapshot_every=args.snapshot_every,
                        preemption_mode=args.preemption_mode, time_limit_s=args.time_limit,
                        data_parallel=args.data_parallel)
    model_config = tiny_config(num_layers=2, max_position_embeddings=128)
    model = Model(model_config, init_params(model_config, jax.random.key(0)))
    result = dataclasses.asdict(Soak(model, config).run())
    md = table(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    record = dict(result=result, config=dataclasses.asdict(config),
                  machine=dict(platform=platform.platform(), jax=jax.__version__,
                               backend=jax.default_backend()))
    name = "soak" if args.data_parallel == 1 else f"soak_dp{args.data_parallel}"
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(
        "# Soak\n\n`python benchmarks/soak.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k != "out" and v is not None) + f"` on {jax.default_backend()}\n\n" + md + "\n")
    print(f"wrote {args.out}/{name}.{{json,md}}")


if __name__ == "__main__":
    main()
