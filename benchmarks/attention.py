"""Paged vs dense decode attention on the same sequences.

For each configuration (batch, context, page size; Llama-3-8B attention: 32 query heads,
8 kv heads, head_dim 128) the same K/V are laid out once contiguously ``[B, Hkv, L, D]``
for ``jpaged.dense_attention`` and once in a page pool behind a random permuted block
table for ``jpaged.paged_attention``. Paged and dense calls are interleaved in one run
(so load from other processes hits both alike) and the median of several timed runs
after warm-up is reported, with the KV bytes read per second and the paged/dense ratio.
On a GPU the Pallas kernel and JAX's own ``jax.experimental.pallas.ops.gpu
.paged_attention`` are timed too. The XLA path also runs on the same pages quantized to
int8 and fp8 (``paged_xla_int8``, ``paged_xla_fp8``); each row reports the K/V bytes read
per token (one layer, all kv heads, K and V, scales included), which is what bounds decode. A donated ``jpaged.write`` is checked to reuse the
pool's buffer (no copy).

    python benchmarks/attention.py            # default sweep, a few minutes on a CPU
    python benchmarks/attention.py --quick    # a few configurations, under a minute
    python benchmarks/attention.py --full     # the whole grid

Writes benchmarks/results/attention.json and attention.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jpaged
from jpaged.pallas_kernels.quantization import FORMATS, SCALE_DTYPE, quantize

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention
HEADLINE = (16, 2048, 16)  # batch, context, page size
BATCHES = (1, 4, 16, 64)
CONTEXTS = (256, 1024, 2048, 8192)
PAGE_SIZES = (8, 16, 32, 64, 128)
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def sweep(mode: str) -> list[tuple[int, int, int]]:
    """(batch, context, page size) to run: each axis varied around the headline, or the
    whole grid with --full, or a handful with --quick."""
    if mode == "quick":
        return [(1, 256, 16), (4, 1024, 16), HEADLINE]
    if mode == "full":
        return list(itertools.product(BATCHES, CONTEXTS, PAGE_SIZES))
    batch, context, page = HEADLINE
    configs = ([(b, context, page) for b in BATCHES] + [(batch, c, page) for c in CONTEXTS]
               + [(batch, context, p) for p in PAGE_SIZES])
    return sorted(set(configs), key=configs.index)


def make_inputs(batch, context, page_size, dtype, seed=0):
    """Dense K/V, the same tokens scattered into a page pool, a query and the page table."""
    rng = np.random.default_rng(seed)
    width = context // page_size
    kv_shape = (batch, NUM_KV_HEADS, context, HEAD_DIM)
    k = rng.standard_normal(kv_shape, np.float32).astype(dtype)
    v = rng.standard_normal(kv_shape, np.float32).astype(dtype)
    tables = rng.permutation(np.arange(1, batch * width + 1)).reshape(batch, width)

    def to_pool(x):
        pool = np.zeros((NUM_KV_HEADS, batch * width + 1, page_size, HEAD_DIM), dtype)
        pool[:, tables] = x.reshape(batch, NUM_KV_HEADS, width, page_size,
                                    HEAD_DIM).transpose(1, 0, 2, 3, 4)
        return jnp.asarray(pool)

    q = jnp.asarray(rng.standard_normal((batch, NUM_Q_HEADS, HEAD_DIM), np.float32), dtype)
    lengths = jnp.full((batch,), context, jnp.int32)
    table = jpaged.PageTable(jnp.asarray(tables, jnp.int32), lengths)
    return q, jnp.asarray(k), jnp.asarray(v), to_pool(k), to_pool(v), table


def peer_paged_attention():
    """JAX's own Pallas GPU paged attention, or None where it cannot run."""
    if jax.default_backend() != "gpu":
        return None
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention
    except ImportError:
        return None
    return paged_attention.paged_attention


def token_bytes(impl: str, dtype) -> int:
    """K/V bytes one token costs ``impl`` to read: all kv heads, K and V, scales included."""
    fmt = impl.rsplit("_", 1)[-1]
    if fmt in FORMATS:
        return 2 * NUM_KV_HEADS * (HEAD_DIM * FORMATS[fmt].itemsize + SCALE_DTYPE.itemsize)
    return 2 * NUM_KV_HEADS * HEAD_DIM * jnp.dtype(dtype).itemsize


def candidates(inputs, on_gpu):
    """name -> zero-argument jitted call; 'dense' first."""
    q, k, v, k_pages, v_pages, table = inputs
    xla = jax.jit(functools.partial(jpaged.paged_attention, impl="xla"))
    run = {"dense": functools.partial(jax.jit(jpaged.dense_attention), q, k, v, table.lengths),
           "paged_xla": functools.partial(xla, q, k_pages, v_pages, table)}
    for fmt, dtype in FORMATS.items():
        (kc, ks), (vc, vs) = quantize(k_pages, dtype), quantize(v_pages, dtype)
        run[f"paged_xla_{fmt}"] = functools.partial(xla, q, kc, vc, table, k_scale=ks,
                                                    v_scale=vs)
    if on_gpu:
        run["paged_pallas"] = functools.partial(
            jax.jit(functools.partial(jpaged.paged_attention, impl="pallas")),
            q, k_pages, v_pages, table)
        peer = peer_paged_attention()
        if peer is not None:
            call = functools.partial(jax.jit(peer), q, k_pages, v_pages, table.block_tables,
                                     table.lengths)
            try:  # a peer that cannot take this shape is left out, not fatal
                jax.block_until_ready(call())
                run["jax_peer"] = call
            except Exception as err:  # noqa: BLE001
                print(f"jax peer skipped for this shape: {type(err).__name__}: {err}"[:200])
    return run


def time_interleaved(run, reps, warmup=2):
    """Median seconds per call of each candidate, calls interleaved and the order rotated
    every round so drifting background load hits all of them alike."""
    names = list(run)
    for name in names:
        for _ in range(warmup):
            jax.block_until_ready(run[name]())
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(run[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def check_donated_write(page_size=16, num_pages=1025, dtype=jnp.float32):
    """Time a one-layer write of 16 tokens with and without donating the pool, and check
    the donated output reuses the input buffer (so nothing the size of the pool is copied)."""
    cache = jpaged.KVCache.create(2, NUM_KV_HEADS, HEAD_DIM, page_size, num_pages, dtype)
    new = jnp.ones((16, NUM_KV_HEADS, HEAD_DIM), dtype)
    slots = jnp.arange(page_size, page_size + 16, dtype=jnp.int32)
    donated = jax.jit(jpaged.write, donate_argnums=0, static_argnums=4)
    copied = jax.jit(jpaged.write, static_argnums=4)
    result = {"pool_bytes": cache.nbytes}
    for name, step in (("copied", copied), ("donated", donated)):
        cache = step(cache, new, new, slots, 0)  # compile
        jax.block_until_ready(cache)
        runs = []
        for _ in range(5):
            pointer = cache.k.unsafe_buffer_pointer()
            start = time.perf_counter()
            cache = jax.block_until_ready(step(cache, new, new, slots, 0))
            runs.append(time.perf_counter() - start)
        result[f"{name}_ms"] = 1e3 * statistics.median(runs)
        result[f"{name}_reuses_buffer"] = cache.k.unsafe_buffer_pointer() == pointer
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few configurations (< 1 min)")
    size.add_argument("--full", action="store_true", help="the whole grid")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per candidate")
    parser.add_argument("--dtype", default=None,
                        help="cache dtype (default float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    reps = args.reps or (5 if mode == "quick" else 7)
    device = jax.devices()[0].device_kind
    load = os.getloadavg()[0]
    print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}, {dtype}, "
          f"heads {NUM_Q_HEADS}/{NUM_KV_HEADS}, head_dim {HEAD_DIM}, median of {reps} runs, "
          f"load average {load:.1f}")
    if not on_gpu:
        print("jax.experimental.pallas.ops.gpu.paged_attention: n/a on CPU")

    header = (f"{'batch':>5} {'context':>7} {'page':>4} | {'impl':<14} {'median ms':>9} "
              f"{'B/token':>7} {'GB/s':>7} {'vs dense':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for batch, context, page_size in sweep(mode):
        inputs = make_inputs(batch, context, page_size, dtype)
        medians = time_interleaved(candidates(inputs, on_gpu), reps)
        for impl, seconds in medians.items():
            per_token = token_bytes(impl, dtype)
            row = dict(batch=batch, context=context, page_size=page_size, impl=impl,
                       median_ms=1e3 * seconds, bytes_per_token=per_token,
                       gb_per_s=batch * context * per_token / seconds / 1e9,
                       ratio_vs_dense=seconds / medians["dense"])
            rows.append(row)
            print(f"{batch:>5} {context:>7} {page_size:>4} | {impl:<14} "
                  f"{row['median_ms']:>9.2f} {per_token:>7d} {row['gb_per_s']:>7.2f} "
                  f"{row['ratio_vs_dense']:>8.2f}")
        del inputs

    headline = {row["impl"]: row["ratio_vs_dense"] for row in rows
                if (row["batch"], row["context"], row["page_size"]) == HEADLINE}
    write_check = check_donated_write()
    print(f"headline (batch {HEADLINE[0]}, context {HEADLINE[1]}, page {HEADLINE[2]}) "
          f"paged/dense: " + ", ".join(f"{k} {v:.2f}" for k, v in headline.items()
                                       if k != "dense"))
    print(f"donated write reuses the {write_check['pool_bytes'] / 2**20:.0f} MiB pool buffer: "
          f"{write_check['donated_reuses_buffer']} ({write_check['donated_ms']:.2f} ms; "
          f"without donation {write_check['copied_ms']:.2f} ms)")
    report = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device,
                  backend=jax.default_backend(), jax=jax.__version__, dtype=str(dtype),
                  num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                  mode=mode, reps=reps, command="python " + " ".join(sys.argv),
                  load_average=[load, os.getloadavg()[0]],
                  headline=dict(batch=HEADLINE[0], context=HEADLINE[1],
                                page_size=HEADLINE[2], ratio_vs_dense=headline),
                  peer="timed" if on_gpu and peer_paged_attention() else "n/a on CPU",
                  donated_write=write_check, results=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "attention.md").write_text(markdown(report))
    print(f"wrote {args.out / 'attention.json'} and {args.out / 'attention.md'}")


def markdown(report) -> str:
    lines = [
        "# Paged vs dense decode attention",
        "",
        f"{report['date']}, {report['device']} ({report['backend']}), jax {report['jax']}, "
        f"{report['dtype']}, {report['num_q_heads']} query / {report['num_kv_heads']} kv "
        f"heads, head_dim {report['head_dim']}; median of {report['reps']} interleaved runs "
        f"after warm-up; load average {report['load_average'][0]:.1f} at the start, "
        f"{report['load_average'][1]:.1f} at the end (other processes share the machine). "
        f"`{report['command']}`",
        "",
        f"Headline (batch {report['headline']['batch']}, context "
        f"{report['headline']['context']}, page {report['headline']['page_size']}) "
        "paged/dense latency: " + ", ".join(
            f"{impl} {ratio:.2f}" for impl, ratio in report["headline"]["ratio_vs_dense"].items()
            if impl != "dense") + ".",
        f"JAX's Pallas GPU paged_attention peer: {report['peer']}.",
        f"Donated write reuses the pool buffer: {report['donated_write']['donated_reuses_buffer']}"
        f" ({report['donated_write']['donated_ms']:.2f} ms vs "
        f"{report['donated_write']['copied_ms']:.2f} ms without donation, pool "
        f"{report['donated_write']['pool_bytes'] / 2**20:.0f} MiB).",
        "",
        "KV bytes per token: one layer, all kv heads, K and V (and the 8-bit pools' "
        "bfloat16 scales); GB/s = batch * context * bytes per token / time.",
        "",
        "| batch | context | page | impl | median ms | KV bytes/token | KV GB/s | vs dense |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['batch']} | {r['context']} | {r['page_size']} | {r['impl']} | "
              f"{r['median_ms']:.2f} | {r.get('bytes_per_token', '')} | {r['gb_per_s']:.2f} | "
              f"{r['ratio_vs_dense']:.2f} |" for r in report["results"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
