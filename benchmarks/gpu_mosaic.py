"""GPU timing of the Mosaic GPU ragged paged attention kernel beside its peers.

``run(...)`` returns one row per (phase, shape, implementation); ``gpu_check.py`` (or a
person) calls it on a Hopper GPU. Shapes are Llama-3-8B attention: 32 query heads over 8
kv heads, head_dim 128, pages of 16, bf16, NaN in the null page.

- decode: ``batch`` sequences at each context (4k-32k), one query token each; timed for
  "mosaic", "pallas" (the Triton kernel), "xla" and "jax" (jax's own Triton
  ``paged_attention``). Reported: seconds, K/V bytes read per second and that over the
  measured copy bandwidth (decode is bandwidth-bound).
- prefill: one sequence's chunk of 512 or 2048 query tokens ending at each context (the
  cached pages before it, causal inside it); "mosaic" and "xla". Reported: useful FLOP/s
  (causal work only) and that over the measured bf16 matmul rate.

Each Mosaic row also carries its error against the float32 reference
(``||out - ref|| / ||ref||``), so a fast wrong kernel shows. Every row runs in its own
try/except: a failure is recorded in the row, not raised.

CPU smoke test of the same code paths (interpret mode, tiny shapes):
``python benchmarks/gpu_mosaic.py --tiny``. Nobody has run the GPU rows yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jpaged
from pallas_kernels.reference import paged_prefill_reference

CONTEXTS = (4096, 8192, 16384, 32768)
CHUNKS = (512, 2048)


@dataclasses.dataclass(frozen=True)
class Shape:
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize


TINY = Shape(num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, dtype="float32")


def median_seconds(fn, *args, samples=7, min_sample_s=0.02) -> float:
    """Median seconds per call: warm-up, then timed loops long enough to hide dispatch."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - start, 1e-6)
    reps = int(min(100, max(1, math.ceil(min_sample_s / once))))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def ceilings(tiny: bool) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    n = (16 if tiny else 2048) * 2**20 // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    size = 256 if tiny else 8192
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    matmul = jax.jit(lambda m: m @ m)
    return dict(copy_bytes_per_s=2 * x.size * 2 / median_seconds(copy, x),
                matmul_flop_per_s=2 * size ** 3 / median_seconds(matmul, a))


def make_pool(shape: Shape, lengths, seed: int):
    """Random pool, each row's pages permuted; the null page (0) holds NaN.

    Returns k, v ``[Hkv, P, S, D]``, tables ``int32[B, W]``, lengths ``int32[B]``."""
    lengths = np.asarray(lengths, np.int32)
    width = -(-int(lengths.max()) // shape.page_size)
    num_pages = len(lengths) * width + 1
    rng = np.random.default_rng(seed)
    tables = (rng.permutation(num_pages - 1) + 1).reshape(len(lengths), width)
    pool = (shape.num_kv_heads, num_pages, shape.page_size, shape.head_dim)
    kk, kv = jax.random.split(jax.random.key(seed))
    poison = jax.jit(lambda a: a.at[:, 0].set(jnp.nan))
    k = poison(jax.random.normal(kk, pool, shape.dtype))
    v = poison(jax.random.normal(kv, pool, shape.dtype))
    return k, v, jnp.asarray(tables, jnp.int32), jnp.asarray(lengths)


def relative_error(out, expected) -> float:
    out, expected = (np.asarray(x, np.float64) for x in (out, expected))
    return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def decode_rows(shape: Shape, context: int, batch: int, impls, interpret: bool, limits):
    k, v, tables, lengths = make_pool(shape, [context] * batch, seed=context)
    q = jax.random.normal(jax.random.key(2), (batch, shape.num_q_heads, shape.head_dim),
                          shape.dtype)
    table = jpaged.PageTable(tables, lengths)
    kv_bytes = 2 * batch * context * shape.num_kv_heads * shape.head_dim * shape.itemsize
    flops = 4 * batch * context * shape.num_q_heads * shape.head_dim
    rows = []
    for impl in impls:
        row = dict(phase="decode", impl=impl, batch=batch, context=context, tokens=batch,
                   bytes=kv_bytes, flops=flops)
        try:
            fn = _decode_fn(impl, table, interpret)
            seconds = median_seconds(fn, q, k, v)
            row.update(seconds=seconds, bytes_per_s=kv_bytes / seconds,
                       bandwidth_fraction=kv_bytes / seconds / limits["copy_bytes_per_s"])
            if impl == "mosaic":
                rows_seq = jnp.arange(batch, dtype=jnp.int32)
                expected = paged_prefill_reference(
                    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                    tables, lengths, rows_seq, lengths - 1)
                row["relative_error"] = relative_error(fn(q, k, v), expected)
        except Exception as err:  # recorded, not raised: one failure loses one row
            row["error"] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
        rows.append(row)
    return rows


def _decode_fn(impl: str, table, interpret: bool):
    if impl == "jax":
        from jax.experimental.pallas.ops.gpu import paged_attention as peer
        width = table.block_tables.shape[1]
        k_splits = math.gcd(16, width)
        options = dict(k_splits=k_splits, pages_per_compute_block=math.gcd(8, width // k_splits))
        return jax.jit(lambda q, k, v: peer.paged_attention(
            q, k, v, table.block_tables, table.lengths, interpret=interpret, **options))
    extra = dict(interpret=interpret) if impl in ("mosaic", "pallas") else {}
    return jax.jit(lambda q, k, v: jpaged.paged_attention(q, k, v, table, impl=impl, **extra))


def prefill_rows(shape: Shape, context: int, chunk: int, impls, interpret: bool, limits):
    k, v, tables, lengths = make_pool(shape, [context], seed=context + chunk)
    q = jax.random.normal(jax.random.key(3), (chunk, shape.num_q_heads, shape.head_dim),
                          shape.dtype)
    q_seq = jnp.zeros(chunk, jnp.int32)
    q_pos = jnp.arange(context - chunk, context, dtype=jnp.int32)
    table = jpaged.PageTable(tables, lengths)
    visible = int(np.sum(np.arange(context - chunk, context) + 1))  # causal keys, summed
    flops = 4 * visible * shape.num_q_heads * shape.head_dim
    kv_bytes = 2 * context * shape.num_kv_heads * shape.head_dim * shape.itemsize
    rows = []
    for impl in impls:
        row = dict(phase="prefill", impl=impl, batch=1, context=context, tokens=chunk,
                   bytes=kv_bytes, flops=flops)
        try:
            extra = dict(interpret=interpret) if impl == "mosaic" else {}
            fn = jax.jit(lambda q, k, v, impl=impl, extra=extra: jpaged.paged_prefill_attention(
                q, k, v, table, q_seq, q_pos, impl=impl, **extra))
            seconds = median_seconds(fn, q, k, v)
            row.update(seconds=seconds, flop_per_s=flops / seconds,
                       flop_fraction=flops / seconds / limits["matmul_flop_per_s"])
            if impl == "mosaic":   # the reference gathers a context per token: check 8
                some = jnp.asarray([0, 1, 2, 3, chunk - 4, chunk - 3, chunk - 2, chunk - 1])
                expected = paged_prefill_reference(
                    q[some].astype(jnp.float32), k.astype(jnp.float32),
                    v.astype(jnp.float32), tables, lengths, q_seq[some], q_pos[some])
                row["relative_error"] = relative_error(fn(q, k, v)[some], expected)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
        rows.append(row)
    return rows


def run(*, contexts=CONTEXTS, chunks=CHUNKS, batch: int = 8, shape: Shape = Shape(),
        decode_impls=("mosaic", "pallas", "xla", "jax"), prefill_impls=("mosaic", "xla"),
        interpret: bool | None = None, tiny: bool = False) -> list[dict]:
    """Time every (phase, shape, impl); rows as dicts (``seconds``, ``bytes``, ``flops``,
    ``bandwidth_fraction`` or ``flop_fraction``, ``relative_error`` for Mosaic rows,
    ``error`` where a row failed). The first row holds the measured ceilings."""
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    limits = ceilings(tiny)
    rows = [dict(phase="ceilings", device=str(jax.devices()[0].device_kind),
                 jax=jax.__version__, **limits)]
    for context in contexts:
        rows += decode_rows(shape, context, batch, decode_impls, interpret, limits)
        for chunk in chunks:
            if chunk <= context:
                rows += prefill_rows(shape, context, chunk, prefill_impls, interpret, limits)
    return rows


def markdown(rows: list[dict]) -> str:
    head = rows[0]
    lines = [f"Device {head['device']}, jax {head['jax']}: copy "
             f"{head['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
             f"{head['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s (measured).", "",
             "| phase | impl | batch | context | tokens | time (us) | GB/s or TFLOP/s | "
             "fraction of ceiling | rel. error |", "|---" * 9 + "|"]
    for row in rows[1:]:
        if "error" in row:
            lines.append(f"| {row['phase']} | {row['impl']} | {row['batch']} | "
                         f"{row['context']} | {row['tokens']} | failed: "
                         f"{row['error'][:80]} | | | |")
            continue
        rate = (f"{row['bytes_per_s'] / 1e9:.0f} GB/s" if row["phase"] == "decode"
                else f"{row['flop_per_s'] / 1e12:.1f} TFLOP/s")
        fraction = row.get("bandwidth_fraction", row.get("flop_fraction"))
        error = f"{row['relative_error']:.1e}" if "relative_error" in row else ""
        lines.append(f"| {row['phase']} | {row['impl']} | {row['batch']} | {row['context']} | "
                     f"{row['tokens']} | {row['seconds'] * 1e6:.1f} | {rate} | "
                     f"{fraction:.2f} | {error} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes (with interpret mode off a GPU): a smoke test")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    if args.tiny:
        rows = run(contexts=(80,), chunks=(24,), batch=2, shape=TINY,
                   decode_impls=("mosaic", "xla"), tiny=True)
    else:
        rows = run(batch=args.batch)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_mosaic_tiny" if args.tiny else "gpu_mosaic"
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (out_dir / f"{name}.md").write_text(table)
    print(table)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
