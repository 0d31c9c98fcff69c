"""GPU check and benchmark of the Pallas paged decode kernel (run by gpu_suite.sh).

On Llama-3-8B attention shapes (32 query heads, 8 kv heads, head_dim 128, page 16, bf16):
  1. checks the kernel against the float32 reference (random lengths, NaN-poisoned
     unused slots and null page, a few rows per shape so the reference stays small);
  2. times it (warm-up, then the median of several timed loops) and reports the KV bytes
     read per second as a fraction of a measured device-to-device copy bandwidth;
  3. times JAX's own ``jax.experimental.pallas.ops.gpu.paged_attention`` and jpaged's XLA
     path on the same inputs, where they run;
  4. sweeps pages_per_block x num_warps (then num_stages, and num_splits at batch 1) on a
     couple of shapes and reports the best.
Every configuration runs in its own try/except and results are rewritten after each one,
so a failure or the suite's timeout loses nothing already measured. Results go to $OUT
(else benchmarks/results/) as gpu_check.json and gpu_check.md.

CPU smoke test of the same code paths: ``python benchmarks/gpu_check.py --interpret --tiny``.
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

from pallas_kernels import paged_decode as pd
from pallas_kernels.reference import paged_decode_reference

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
DTYPE = jnp.bfloat16
TOLERANCE = 3e-2
CHECK_ROWS = 4  # rows compared with the reference (it gathers everything in float32)
# (batch, context): small batches with long contexts (split-K matters), big batches.
SHAPES = [(1, 1024), (1, 8192), (1, 32768), (4, 16384), (16, 4096), (16, 32768),
          (32, 32768), (64, 2048), (64, 8192), (128, 4096), (256, 1024), (256, 8192)]
TUNE_SHAPES = [(1, 32768), (64, 4096)]
TINY_SHAPES = [(1, 64), (3, 128)]


@dataclasses.dataclass
class Settings:
    interpret: bool
    tiny: bool
    deadline: float  # time.monotonic() after which optional work is skipped

    @property
    def shapes(self):
        return TINY_SHAPES if self.tiny else SHAPES

    @property
    def tune_shapes(self):
        return TINY_SHAPES[:1] if self.tiny else TUNE_SHAPES

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


def log(message: str) -> None:
    print(message, flush=True)


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


def copy_bandwidth(settings: Settings) -> dict:
    """Bytes/s of a device-to-device copy (read + write) and of a read-only reduction."""
    size = (64 if settings.tiny else 2048) * 2**20 // 2  # bf16 elements
    x = jnp.ones((size,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))  # one read and one write per element
    read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    nbytes = x.size * x.dtype.itemsize
    return dict(copy_bytes_per_s=2 * nbytes / median_seconds(copy, x),
                read_bytes_per_s=nbytes / median_seconds(read, x))


@dataclasses.dataclass
class Inputs:
    q: jax.Array
    k: jax.Array  # [Hkv, P, S, D]
    v: jax.Array
    tables: jax.Array  # int32[B, W]
    full_lengths: jax.Array  # every sequence at the full context
    kv_bytes: int  # K and V bytes read at full lengths


def make_inputs(batch: int, context: int, seed: int = 0) -> Inputs:
    """Random bf16 pool; each sequence owns ``context / page_size`` permuted pages."""
    width = context // PAGE_SIZE
    num_pages = batch * width + 1
    rng = np.random.default_rng(seed)
    tables = (rng.permutation(num_pages - 1)[:batch * width] + 1).reshape(batch, width)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = (NUM_KV_HEADS, num_pages, PAGE_SIZE, HEAD_DIM)
    # The null page holds NaN: only a masking bug can read it.
    poison = jax.jit(lambda a: a.at[:, 0].set(jnp.nan))
    k = poison(jax.random.normal(kk, shape, DTYPE))
    v = poison(jax.random.normal(kv, shape, DTYPE))
    q = jax.random.normal(kq, (batch, NUM_Q_HEADS, HEAD_DIM), DTYPE)
    full = jnp.full((batch,), context, jnp.int32)
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * jnp.dtype(DTYPE).itemsize
    return Inputs(q, k, v, jnp.asarray(tables, jnp.int32), full, kv_bytes)


def poison_past_lengths(inputs: Inputs, lengths: np.ndarray):
    """K, V with NaN in every slot past each length (tail of the last page, later pages
    replaced by the null page in the returned table)."""
    tables = np.asarray(inputs.tables).copy()
    width = tables.shape[1]
    used = -(-lengths // PAGE_SIZE)
    tail_rows, tail_pos = np.nonzero(
        (np.arange(width * PAGE_SIZE)[None, :] >= lengths[:, None])
        & (np.arange(width * PAGE_SIZE)[None, :] < used[:, None] * PAGE_SIZE))
    pages = jnp.asarray(tables[tail_rows, tail_pos // PAGE_SIZE])
    offsets = jnp.asarray(tail_pos % PAGE_SIZE)
    tables[np.arange(width)[None, :] >= used[:, None]] = 0
    poison = jax.jit(lambda a: a.at[:, pages, offsets].set(jnp.nan))
    return poison(inputs.k), poison(inputs.v), jnp.asarray(tables)


def check(inputs: Inputs, settings: Settings, seed: int = 1) -> dict:
    """Max |kernel - reference| over the first CHECK_ROWS rows, at random lengths."""
    batch, width = inputs.tables.shape
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width * PAGE_SIZE + 1, size=batch).astype(np.int32)
    lengths[0] = width * PAGE_SIZE  # full capacity
    if batch > 1:
        lengths[1] = PAGE_SIZE + 1  # one past a page
    k, v, tables = poison_past_lengths(inputs, lengths)
    lengths = jnp.asarray(lengths)
    out = pd.paged_decode(inputs.q, k, v, tables, lengths, interpret=settings.interpret)
    rows = min(CHECK_ROWS, batch)
    # The reference sees only the checked rows' pages, renumbered, in float32.
    used = tables[:rows].reshape(-1)
    sub_tables = jnp.arange(rows * width, dtype=jnp.int32).reshape(rows, width)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    expected = jax.jit(paged_decode_reference)(f32(inputs.q[:rows]), f32(k[:, used]),
                                               f32(v[:, used]), sub_tables, lengths[:rows])
    got = f32(out[:rows])
    error = float(jnp.max(jnp.abs(got - expected)))
    has_nan = bool(jnp.isnan(f32(out)).any())
    del k, v
    return dict(max_abs_error=error, nan=has_nan,
                check_ok=bool(error <= TOLERANCE and not has_nan))


def time_ours(inputs: Inputs, settings: Settings, **tuning) -> float:
    fn = jax.jit(lambda q, k, v, t, l: pd.paged_decode(q, k, v, t, l,
                                                       interpret=settings.interpret,
                                                       **tuning))
    return median_seconds(fn, inputs.q, inputs.k, inputs.v, inputs.tables, inputs.full_lengths)


def jax_peer_options(width: int) -> dict:
    """Options JAX's paged_attention accepts: k_splits divides the table width and
    pages_per_compute_block divides the pages per split."""
    k_splits = math.gcd(16, width)
    return dict(k_splits=k_splits, pages_per_compute_block=math.gcd(8, width // k_splits))


def time_jax_peer(inputs: Inputs, settings: Settings) -> float:
    from jax.experimental.pallas.ops.gpu import paged_attention as peer
    options = jax_peer_options(inputs.tables.shape[1])
    fn = jax.jit(lambda q, k, v, t, l: peer.paged_attention(q, k, v, t, l,
                                                            interpret=settings.interpret,
                                                            **options))
    return median_seconds(fn, inputs.q, inputs.k, inputs.v, inputs.tables, inputs.full_lengths)


def time_xla(inputs: Inputs, settings: Settings) -> float:
    import jpaged
    fn = jax.jit(lambda q, k, v, t, l: jpaged.paged_attention(q, k, v, jpaged.PageTable(t, l),
                                                              impl="xla"))
    return median_seconds(fn, inputs.q, inputs.k, inputs.v, inputs.tables, inputs.full_lengths)


def attempt(row: dict, key: str, fn, *args, **kwargs):
    """Run one measurement; record its error instead of raising."""
    try:
        row[key] = fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - one failure must not lose the rest
        row[key] = None
        row.setdefault("errors", {})[key] = f"{type(error).__name__}: {error}"[:400]
        log(f"  {key} failed: {row['errors'][key]}")
        traceback.print_exc(limit=3)


def benchmark_shape(batch: int, context: int, report: dict, settings: Settings) -> dict:
    row = dict(batch=batch, context=context)
    inputs = make_inputs(batch, context)
    width = context // PAGE_SIZE
    ppb = pd.default_pages_per_block(PAGE_SIZE, HEAD_DIM, DTYPE)
    row.update(kv_bytes=inputs.kv_bytes, pages_per_block=ppb,
               num_splits=pd.choose_num_splits(batch, NUM_KV_HEADS, -(-width // ppb)))
    attempt(row, "ours_s", time_ours, inputs, settings)
    attempt(row, "jax_pallas_s", time_jax_peer, inputs, settings)
    attempt(row, "xla_s", time_xla, inputs, settings)
    try:
        row.update(check(inputs, settings))
    except Exception as error:  # noqa: BLE001
        row.update(check_ok=False, check_error=f"{type(error).__name__}: {error}"[:400])
        traceback.print_exc(limit=3)
    copy_bw = report["bandwidth"].get("copy_bytes_per_s")
    for impl in ("ours", "jax_pallas", "xla"):
        seconds = row.get(f"{impl}_s")
        if seconds:
            row[f"{impl}_bytes_per_s"] = inputs.kv_bytes / seconds
            if copy_bw:
                row[f"{impl}_copy_fraction"] = inputs.kv_bytes / seconds / copy_bw
    return row


def autotune(batch: int, context: int, settings: Settings) -> dict:
    """Sweep pages_per_block x num_warps, then num_stages and (batch 1) num_splits around
    the best; every point is timed on the same inputs."""
    inputs = make_inputs(batch, context)
    width = context // PAGE_SIZE
    points = []

    def measure(**tuning):
        if settings.time_left() < 0:
            return
        point = dict(tuning)
        attempt(point, "seconds", time_ours, inputs, settings, **tuning)
        if point["seconds"]:
            point["bytes_per_s"] = inputs.kv_bytes / point["seconds"]
        log(f"  tune {batch}x{context} {tuning}: {fmt_us(point['seconds'])}")
        points.append(point)

    warps = [4] if settings.interpret else [2, 4, 8]
    for ppb in (1, 2, 4, 8):
        for num_warps in warps:
            measure(pages_per_block=ppb, num_warps=num_warps)
    best = dict(min((p for p in points if p.get("seconds")), key=lambda p: p["seconds"],
                    default={}))
    if best:
        base = dict(pages_per_block=best["pages_per_block"], num_warps=best["num_warps"])
        for stages in (1, 3):
            measure(num_stages=stages, **base)
        if batch == 1:
            for splits in (8, 16, 64, 128):
                if splits <= width // base["pages_per_block"]:
                    measure(num_splits=splits, **base)
        best = dict(min((p for p in points if p.get("seconds")), key=lambda p: p["seconds"]))
    return dict(batch=batch, context=context, points=points, best=best)


def fmt_us(seconds) -> str:
    return "-" if not seconds else f"{seconds * 1e6:.1f}us"


def fmt_fraction(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(report: dict) -> str:
    bw = report["bandwidth"]
    lines = [f"# jpaged GPU check ({report['device']}, jax {report['jax']})", "",
             f"Llama-3-8B decode attention: {NUM_Q_HEADS} q heads, {NUM_KV_HEADS} kv heads, "
             f"head_dim {HEAD_DIM}, page {PAGE_SIZE}, {jnp.dtype(DTYPE).name}.", "",
             f"Copy bandwidth (read+write): {bw.get('copy_bytes_per_s', 0) / 1e9:.0f} GB/s; "
             f"read-only: {bw.get('read_bytes_per_s', 0) / 1e9:.0f} GB/s.", "",
             "| batch | context | splits | check (max err) | ours | GB/s | of copy | "
             "jax pallas | of copy | xla | of copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        check_cell = ("ok" if r.get("check_ok") else "FAIL") + (
            f" ({r['max_abs_error']:.1e})" if "max_abs_error" in r else "")
        lines.append(
            f"| {r['batch']} | {r['context']} | {r.get('num_splits')} | {check_cell} | "
            f"{fmt_us(r.get('ours_s'))} | {(r.get('ours_bytes_per_s') or 0) / 1e9:.0f} | "
            f"{fmt_fraction(r.get('ours_copy_fraction'))} | {fmt_us(r.get('jax_pallas_s'))} | "
            f"{fmt_fraction(r.get('jax_pallas_copy_fraction'))} | {fmt_us(r.get('xla_s'))} | "
            f"{fmt_fraction(r.get('xla_copy_fraction'))} |")
    for tune in report["autotune"]:
        lines += ["", f"Autotune {tune['batch']} x {tune['context']}: best {tune['best']}"]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="run kernels in interpret mode")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="skip the autotune sweep once this many seconds have passed")
    parser.add_argument("--no-tune", action="store_true", help="skip the autotune sweep")
    args = parser.parse_args(argv)
    settings = Settings(args.interpret, args.tiny, time.monotonic() + args.budget_s)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else (
        Path(__file__).parent / "results")
    device = jax.devices()[0]
    report = dict(device=getattr(device, "device_kind", str(device)), jax=jax.__version__,
                  interpret=args.interpret, tiny=args.tiny, bandwidth={}, results=[],
                  autotune=[])
    log(f"device {report['device']}, jax {jax.__version__}, writing to {out_dir}")
    attempt(report, "bandwidth", copy_bandwidth, settings)
    report["bandwidth"] = report["bandwidth"] or {}
    log(f"bandwidth {({k: f'{v / 1e9:.0f} GB/s' for k, v in report['bandwidth'].items()})}")
    for batch, context in settings.shapes:
        row = benchmark_shape(batch, context, report, settings)
        report["results"].append(row)
        write(report, out_dir)
        log(f"batch {batch:4d} ctx {context:6d} splits {row['num_splits']:3d} "
            f"check {'ok' if row.get('check_ok') else 'FAIL'} "
            f"err {row.get('max_abs_error', float('nan')):.1e} | ours {fmt_us(row.get('ours_s'))} "
            f"({fmt_fraction(row.get('ours_copy_fraction'))} of copy) | jax "
            f"{fmt_us(row.get('jax_pallas_s'))} | xla {fmt_us(row.get('xla_s'))}")
    if not args.no_tune:
        for batch, context in settings.tune_shapes:
            if settings.time_left() < 0:
                log("autotune skipped: over budget")
                break
            try:
                report["autotune"].append(autotune(batch, context, settings))
            except Exception:  # noqa: BLE001
                traceback.print_exc(limit=3)
            write(report, out_dir)
    write(report, out_dir)
    log(markdown(report))
    return 0 if all(r.get("check_ok") for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
