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

``benchmarks/gpu_check.py`` runs this beside its Triton checks, timing each call with its
own in-jit loop (``seconds=``); alone it times with ``median_seconds``. Needs only jax,
numpy and this repository's ``pallas_kernels`` (the GPU machine has no Flax).

CPU smoke test of the same code paths (interpret mode, tiny shapes):
``python benchmarks/gpu_mosaic.py --tiny``. Nobody has run the GPU rows yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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

from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels import ragged_attention as ra
from jpaged.pallas_kernels import xla_attention
from jpaged.pallas_kernels.reference import paged_prefill_reference

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
    """Median seconds per call of ``jax.jit(fn)``: warm-up, then timed loops long enough
    to hide dispatch."""
    fn = jax.jit(fn)
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


def ceilings(tiny: bool, seconds=median_seconds) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    n = (16 if tiny else 2048) * 2**20 // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    size = 256 if tiny else 8192
    a = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    return dict(copy_bytes_per_s=2 * x.size * 2 / seconds(lambda x: x + jnp.bfloat16(1), x),
                matmul_flop_per_s=2 * size ** 3 / seconds(lambda m: m @ m, a))


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


def decode_rows(shape: Shape, context: int, batch: int, impls, interpret: bool, limits,
                seconds=median_seconds):
    k, v, tables, lengths = make_pool(shape, [context] * batch, seed=context)
    q = jax.random.normal(jax.random.key(2), (batch, shape.num_q_heads, shape.head_dim),
                          shape.dtype)
    kv_bytes = 2 * batch * context * shape.num_kv_heads * shape.head_dim * shape.itemsize
    flops = 4 * batch * context * shape.num_q_heads * shape.head_dim
    rows = []
    for impl in impls:
        row = dict(phase="decode", impl=impl, batch=batch, context=context, tokens=batch,
                   bytes=kv_bytes, flops=flops)
        try:
            fn = _decode_fn(impl, interpret)
            args = (q, k, v, tables, lengths)
            took = seconds(fn, *args)
            row.update(seconds=took, bytes_per_s=kv_bytes / took,
                       bandwidth_fraction=kv_bytes / took / limits["copy_bytes_per_s"])
            if impl == "mosaic":
                rows_seq = jnp.arange(batch, dtype=jnp.int32)
                expected = paged_prefill_reference(
                    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                    tables, lengths, rows_seq, lengths - 1)
                row["relative_error"] = relative_error(jax.jit(fn)(*args), expected)
        except Exception as err:  # recorded, not raised: one failure loses one row
            row["error"] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
        rows.append(row)
    return rows


def _decode_fn(impl: str, interpret: bool):
    """``fn(q, k, v, tables, lengths)`` of one decode implementation."""
    if impl == "jax":
        from jax.experimental.pallas.ops.gpu import paged_attention as peer

        def jax_peer(q, k, v, tables, lengths):
            width = tables.shape[1]
            k_splits = math.gcd(16, width)
            return peer.paged_attention(
                q, k, v, tables, lengths, interpret=interpret, k_splits=k_splits,
                pages_per_compute_block=math.gcd(8, width // k_splits))
        return jax_peer
    if impl == "mosaic":
        return lambda q, k, v, tables, lengths: ra.paged_attention_tokens(
            q, k, v, tables, lengths, jnp.arange(q.shape[0], dtype=jnp.int32), lengths - 1,
            interpret=interpret)
    if impl == "pallas":
        return lambda q, k, v, tables, lengths: pd.paged_decode(
            q, k, v, tables, lengths, interpret=interpret)
    if impl == "xla":
        return xla_attention.paged_decode
    raise ValueError(f"decode impl={impl!r} is not one of mosaic, pallas, xla, jax")


def prefill_rows(shape: Shape, context: int, chunk: int, impls, interpret: bool, limits,
                 seconds=median_seconds):
    k, v, tables, lengths = make_pool(shape, [context], seed=context + chunk)
    q = jax.random.normal(jax.random.key(3), (chunk, shape.num_q_heads, shape.head_dim),
                          shape.dtype)
    q_seq = jnp.zeros(chunk, jnp.int32)
    q_pos = jnp.arange(context - chunk, context, dtype=jnp.int32)
    visible = int(np.sum(np.arange(context - chunk, context) + 1))  # causal keys, summed
    flops = 4 * visible * shape.num_q_heads * shape.head_dim
    kv_bytes = 2 * context * shape.num_kv_heads * shape.head_dim * shape.itemsize
    rows = []
    for impl in impls:
        row = dict(phase="prefill", impl=impl, batch=1, context=context, tokens=chunk,
                   bytes=kv_bytes, flops=flops)
        try:
            fn = _prefill_fn(impl, interpret)
            args = (q, k, v, tables, lengths, q_seq, q_pos)
            took = seconds(fn, *args)
            row.update(seconds=took, flop_per_s=flops / took,
                       flop_fraction=flops / took / limits["matmul_flop_per_s"])
            if impl == "mosaic":   # the reference gathers a context per token: check 8
                some = jnp.asarray([0, 1, 2, 3, chunk - 4, chunk - 3, chunk - 2, chunk - 1])
                expected = paged_prefill_reference(
                    q[some].astype(jnp.float32), k.astype(jnp.float32),
                    v.astype(jnp.float32), tables, lengths, q_seq[some], q_pos[some])
                row["relative_error"] = relative_error(jax.jit(fn)(*args)[some], expected)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
        rows.append(row)
    return rows


def _prefill_fn(impl: str, interpret: bool):
    """``fn(q, k, v, tables, lengths, q_seq, q_pos)`` of one prefill implementation."""
    if impl == "mosaic":
        return functools.partial(ra.paged_attention_tokens, interpret=interpret)
    if impl == "xla":
        return xla_attention.paged_prefill
    raise ValueError(f"prefill impl={impl!r} is not one of mosaic, xla")


def run(*, contexts=CONTEXTS, chunks=CHUNKS, batch: int = 8, shape: Shape = Shape(),
        decode_impls=("mosaic", "pallas", "xla", "jax"), prefill_impls=("mosaic", "xla"),
        interpret: bool | None = None, tiny: bool = False, seconds=median_seconds,
        time_left=lambda: math.inf) -> list[dict]:
    """Time every (phase, shape, impl); rows as dicts (``seconds``, ``bytes``, ``flops``,
    ``bandwidth_fraction`` or ``flop_fraction``, ``relative_error`` for Mosaic rows,
    ``error`` where a row failed). The first row holds the measured ceilings.
    ``seconds(fn, *args)`` times one call; no context starts once ``time_left() < 0``."""
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    limits = ceilings(tiny, seconds)
    rows = [dict(phase="ceilings", device=str(jax.devices()[0].device_kind),
                 jax=jax.__version__, **limits)]
    for context in contexts:
        if time_left() < 0:
            rows.append(dict(phase="skipped", context=context))
            continue
        rows += decode_rows(shape, context, batch, decode_impls, interpret, limits, seconds)
        for chunk in chunks:
            if chunk <= context:
                rows += prefill_rows(shape, context, chunk, prefill_impls, interpret, limits,
                                     seconds)
    return rows


def markdown(rows: list[dict]) -> str:
    head = rows[0]
    lines = [f"Device {head['device']}, jax {head['jax']}: copy "
             f"{head['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
             f"{head['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s (measured).", "",
             "| phase | impl | batch | context | tokens | time (us) | GB/s or TFLOP/s | "
             "fraction of ceiling | rel. error |", "|---" * 9 + "|"]
    for row in rows[1:]:
        if row["phase"] == "skipped":
            lines.append(f"| skipped: over the time budget | | | {row['context']} | | | | | |")
            continue
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
