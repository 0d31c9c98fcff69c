"""Scaling: tokens/s and KV capacity with 1, 2, 4, 8 devices at a fixed KV budget per device.

Tensor parallel over n devices splits the KV pool over its kv heads, so at the same bytes
per device the pool holds n times the pages, and n times the requests fit in flight.
The model has 8 kv heads, so no head is replicated up to 8 devices. Every request has
the same prompt and output lengths: the capacity is exact, and the peak of requests in
flight measured while the trace runs shows it. Throughput is measured on a second run of
the trace (the first compiles; prefix caching is off so both runs do the same work).

On a CPU the devices are fake (``--xla_force_host_platform_device_count``, set here when
XLA_FLAGS does not set it) and share the host's cores: tokens/s there is not a scaling
figure, capacity is. On a machine with several accelerators the same command measures both.

    python benchmarks/scaling.py [--devices 1 2 4 8] [--requests 48] [--out DIR]

Results: benchmarks/results/scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

PAGE_SIZE = 16


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--fit", type=int, default=4,
                        help="requests the budget of one device holds (sets the budget)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args()


def run_trace(llm, prompts, params) -> tuple[float, int, int]:
    """(seconds, generated tokens, peak requests in flight) of one pass over the trace."""
    engine = llm.engine
    for prompt in prompts:
        engine.add_request(prompt, params)
    start, generated, peak = time.perf_counter(), 0, 0
    while engine.has_unfinished_requests():
        generated += sum(len(o.token_ids) for o in engine.step() if o.finished)
        peak = max(peak, len(engine.scheduler.running))
    return time.perf_counter() - start, generated, peak


def measure(n: int, model, args, kv_bytes_per_device: int) -> dict:
    import numpy as np

    from jpaged.engine.engine import LLM
    from jpaged.host.sampling_params import SamplingParams

    llm = LLM(model, tensor_parallel=n, page_size=PAGE_SIZE, kv_cache_bytes=kv_bytes_per_device,
              max_num_seqs=64, max_num_batched_tokens=512, enable_prefix_caching=False,
              max_model_len=args.prompt_len + args.output_len)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, args.prompt_len).tolist()
               for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    run_trace(llm, prompts, params)   # compiles every bucket the trace uses
    warmup = time.perf_counter() - start
    seconds, generated, peak = run_trace(llm, prompts, params)
    engine = llm.engine
    block_manager = engine.scheduler.block_manager
    pool = engine.runner.cache
    pages_per_request = math.ceil((args.prompt_len + args.output_len - 1) / PAGE_SIZE)
    return dict(devices=n, num_pages=block_manager.num_pages,
                kv_bytes_per_device=int(sum(x.addressable_shards[0].data.nbytes
                                            for x in (pool.k, pool.v))),
                capacity=block_manager.num_usable_pages // pages_per_request,
                peak_in_flight=peak, tokens_per_s=generated / seconds, seconds=seconds,
                steps=engine.num_steps, warmup_seconds=warmup)


def write_results(rows: list[dict], header: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(dict(header, rows=rows), indent=2))
    base = rows[0]
    lines = ["# Scaling over devices (tensor parallel)", "",
             f"{header['date']}, {header['backend']} ({header['device_kind']}), jax "
             f"{header['jax']}, {header['model']}; {header['trace']}; KV budget "
             f"{header['kv_bytes_per_device'] / 2**10:.0f} KiB per device. "
             f"`{header['command']}`", "", header["note"], "",
             "Capacity: requests whose pages fit in the pool at once. The peak in flight "
             "can exceed it: admission reserves a prompt's pages only, and the scheduler "
             "preempts when decodes outgrow the pool.", "",
             "| devices | pages | KV KiB/device | capacity (requests) | peak in flight | "
             "capacity vs 1 | tokens/s | steps |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['num_pages']} | {r['kv_bytes_per_device'] / 2**10:.0f}"
                     f" | {r['capacity']} | {r['peak_in_flight']} | "
                     f"{r['capacity'] / base['capacity']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['steps']} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = [r["devices"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(devices, [r["capacity"] for r in rows], "o-", label="capacity")
    left.plot(devices, [r["peak_in_flight"] for r in rows], "x:", label="peak in flight")
    left.plot(devices, [base["capacity"] * d / base["devices"] for d in devices], "--",
              color="gray", label="linear")
    left.set(xlabel="devices", ylabel="requests", ylim=(0, None),
             title=f"KV capacity at {header['kv_bytes_per_device'] / 2**10:.0f} KiB/device")
    right.plot(devices, [r["tokens_per_s"] for r in rows], "o-")
    right.set(xlabel="devices", ylabel="tokens/s", ylim=(0, None),
              title="throughput" + (" (fake CPU devices: shared cores)"
                                    if header["backend"] == "cpu" else ""))
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(devices, [str(d) for d in devices])
        axis.minorticks_off()
    left.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)


def main() -> None:
    args = parse_args()
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:   # only affects CPU devices
        os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                                   f"{max(args.devices)}").strip()
    import jax

    from jpaged.models import Model, init_params, tiny_config

    config = tiny_config(num_heads=8, num_kv_heads=8, head_dim=16, num_layers=2,
                         max_position_embeddings=256)
    model = Model(config, init_params(config, jax.random.key(0)))
    backend = jax.default_backend()
    if max(args.devices) > jax.device_count():
        sys.exit(f"--devices asks for {max(args.devices)}, only {jax.device_count()} present")
    tokens = args.prompt_len + args.output_len - 1
    pages = args.fit * math.ceil(tokens / PAGE_SIZE) + 1   # + the null page
    dtype_bytes = jax.numpy.dtype(jax.tree.leaves(model.params)[0].dtype).itemsize
    page_bytes = (2 * config.num_layers * config.num_kv_heads * PAGE_SIZE * config.head_dim
                  * dtype_bytes)
    kv_bytes_per_device = pages * page_bytes
    note = ("CPU: the devices are fake and share the host's cores, so tokens/s is NOT a "
            "scaling figure here (it grows only because more requests in flight make "
            "bigger batches and fewer steps); KV capacity is." if backend == "cpu" else
            "Real devices: both columns are scaling figures.")
    print(note, flush=True)
    rows = []
    for n in args.devices:
        rows.append(measure(n, model, args, kv_bytes_per_device))
        r = rows[-1]
        print(f"{n} devices: {r['num_pages']} pages, capacity {r['capacity']} requests "
              f"(peak {r['peak_in_flight']}), {r['tokens_per_s']:.0f} tokens/s, "
              f"{r['steps']} steps, warm-up {r['warmup_seconds']:.0f} s", flush=True)
    header = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), backend=backend,
                  device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                  model=f"{config.num_layers} layers, {config.num_heads} q / "
                        f"{config.num_kv_heads} kv heads, head_dim {config.head_dim}",
                  trace=f"{args.requests} requests x ({args.prompt_len} prompt + "
                        f"{args.output_len} output) tokens, page {PAGE_SIZE}",
                  kv_bytes_per_device=kv_bytes_per_device, note=note,
                  command=" ".join(["python benchmarks/scaling.py", *sys.argv[1:]]))
    write_results(rows, header, args.out)
    base = rows[0]
    print(f"capacity {rows[-1]['devices']} vs {base['devices']} devices: "
          f"{rows[-1]['capacity'] / base['capacity']:.2f}x "
          f"(pages {rows[-1]['num_pages'] / base['num_pages']:.2f}x); results in {args.out}")


if __name__ == "__main__":
    main()
