"""Host path of a step without the device: schedule, build the batch, append the sampled
tokens, inside a transaction where the scheduler has them (``begin`` / ``commit``: the
journal of ``jpaged.host.journal``). Prints microseconds per step (median of repeats)
for decode-heavy batches; writes benchmarks/results/host_path.{json,md}.

    python benchmarks/host_path.py               # this checkout
    PYTHONPATH=/other/checkout python benchmarks/host_path.py --label before

Timings on a shared machine are noisy: compare runs made back to back.
"""

import argparse
import json
import pathlib
import statistics
import time

import numpy as np

from jpaged.engine.batch import BatchBuilder
from jpaged.host.block_manager import BlockManager
from jpaged.host.scheduler import Scheduler


def run(num_seqs: int, steps: int, prompt: int = 64, page_size: int = 16) -> float:
    """Microseconds per step, ``num_seqs`` sequences decoding."""
    bm = BlockManager(8192, page_size, watermark=0.0)
    s = Scheduler(bm, max_num_seqs=num_seqs, max_num_batched_tokens=max(4096, num_seqs),
                  max_model_len=4096)
    builder = BatchBuilder.for_scheduler(s)
    rng = np.random.default_rng(0)
    for i in range(num_seqs):
        s.add_request(str(i), rng.integers(0, 30000, prompt).tolist(), 100_000)
    begin, commit = getattr(s, "begin", lambda: None), getattr(s, "commit", lambda: None)
    times = []
    for step in range(steps + 5):
        t = time.perf_counter()
        begin()
        out = s.schedule()
        builder.build(out)
        s.update(out, np.full(len(out.seqs), 7, np.int32))
        commit()
        if step >= 5:   # the prefills first
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", default="benchmarks/results/host_path")
    args = parser.parse_args()
    rows = [(n, run(n, args.steps)) for n in (16, 64, 256)]
    lines = [f"| decoding sequences | us per step ({args.label}) |", "|---|---|"]
    lines += [f"| {n} | {us:.0f} |" for n, us in rows]
    print("\n".join(lines))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"label": args.label, "us_per_step": {str(n): us for n, us in rows}}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
