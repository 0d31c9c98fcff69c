"""GPU verdict for the Pallas paged attention kernels: correctness first, then speed.

Run by ``benchmarks/gpu_suite.sh`` on a GPU machine with ``python3``, jax, numpy and this
repository only (``PYTHONPATH=.``; nothing here imports Flax or the ``jpaged`` package).

The run is a plan of items in stages, each item with an estimated cost (``--plan`` prints
them for an H200 without touching a device):

  setup   the device's measured read bandwidth (the one denominator of every kernel's
          bandwidth fraction) and bf16 matmul rate;
  checks  every check the verdict needs, each a fresh random draw against a float64
          numpy reference (relative error ``|out - ref| / |ref|`` per checked row, a
          bound per dtype): NaN in every free slot, partial last pages, peaky logits,
          odd and automatic split counts, float32 (TF32 would miss its bound), a bf16
          pool over 4 GiB (jax's own 64-bit offsets) and an int8 pool of 3 GiB (offsets
          past 2**31 elements in 32-bit range: ``lowering.install_wide_offsets``), 8-bit
          pages (int8, float8_e4m3fn) with NaN scales in free slots; the Mosaic GPU ragged
          kernel over GQA groups 1/4/8, pages 16/64, head_dims 64/128, a sliding window, a
          soft cap, a stacked pool, 8-bit pages and forced split-K decode
          (``gpu_mosaic.variants()``, each bound 3x the error the
          same inputs give in interpret mode, computed on the CPU and committed in
          ``gpu_mosaic_bounds.json``), and Mosaic decode and prefill chunks of 512 and
          2048 tokens;
  short   a short sweep right after the checks: decode (bf16 and 8-bit pages) and
          prefill chunks for every implementation, kernel-only times beside end-to-end;
  long    the remaining shapes, 8-bit shapes, prefill contexts, then autotuning.

The verdict (PASS / FAIL / INCOMPLETE) is written (JSON and Markdown) as soon as the
checks end and rewritten after every later item; checks run inside the timing stages
(each timed decode shape once, at random lengths) can turn it to FAIL. Before each item
the remaining budget must cover its estimate, else the item is listed as skipped; a
SIGTERM (``gpu_suite.sh``'s timeout) ends the run with everything measured so far and the
verdict intact (files are replaced atomically, so even a kill leaves the last complete
report).

Timing: every timed item runs ``steps`` steps inside one jit, step i on input set
``i % sets`` (query and block table; sets sized to overflow the 50 MB L2 four times), the
loop reading about 20 GB of K/V (5 ms at an H200's rate: the budget goes to compiles,
not loops); the median of 3 such loops after a warm-up. Every row's
bandwidth is its K/V bytes per second over the measured read bandwidth. Kernel-only time:
for one row per kernel the loop runs once more under jax's profiler and the kernel's own
device time is summed (none where the profiler sees no device events, as on a CPU). Rows:
``ours`` (the Triton kernel), ``mosaic`` (what ``impl="mosaic"`` runs: the Mosaic decode
tile for decode, the ragged Mosaic kernel for prefill chunks), ``mosaic-ragged`` (the
ragged kernel on decode rows); peers on the same inputs: jpaged's XLA path, JAX's
``pallas.ops.gpu.paged_attention`` and cuDNN dense attention over contiguous K/V
(decode); the XLA path (prefill).

CPU dry run of the same code (kernels in interpret mode, tiny shapes, seconds):
``python benchmarks/gpu_check.py --interpret --tiny``. Writes ``$OUT/gpu_check.{json,md}``
(``benchmarks/results/`` when OUT is unset); exits 0 only on PASS.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import gpu_mosaic
from jpaged.pallas_kernels import lowering
from jpaged.pallas_kernels import mosaic_decode as md
from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels import ragged_attention as ra
from jpaged.pallas_kernels import xla_attention
from jpaged.pallas_kernels.quantization import FORMATS, quantize

# Bounds on |out - ref| / |ref| per cache dtype (reference: float64 on the same rounded
# inputs). float32: IEEE dots land near 1e-7, TF32 near 3e-4. 16-bit: the probabilities
# meet V in the cache dtype and the output is rounded to it.
ERROR_BOUNDS = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3,
                # 8-bit pages: the reference attends over the dequantized values; the
                # bfloat16 query meets them in bfloat16, as for a bfloat16 pool.
                "int8": 1e-2, "fp8": 1e-2}
# Mosaic on the tiny dry run (no interpret-mode bound is committed for tiny shapes).
MOSAIC_TINY_BOUND = 2e-2
L2_BYTES = 50 * 2**20  # H100/H200; input sets rotate through four times this
# K/V bytes one timed loop reads: about 5 ms at the H200's 4.3 TB/s, so the host's
# dispatch and sync around it (tens of microseconds) stay near 1%; a loop costs the
# budget nothing next to a compile. Small steps are capped at MAX_STEPS launches.
LOOP_BYTES = 20e9
MAX_STEPS = 2000
REPEATS = 3            # timed loops after the warm-up; the median is reported
MAX_INPUT_SETS = 32
CHECK_ROWS = 4  # rows of a batch compared with the float64 reference
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Model:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int


LLAMA3_8B = Model(32, 8, 128, 16)
TINY = Model(8, 2, 64, 16)


# ---------------------------------------------------------------- the plan's cost model


@dataclasses.dataclass(frozen=True)
class Rates:
    """What the plan's estimates assume. ``read_bytes_per_s``: the H200's device-to-device
    copy rate measured here (4.3 TB/s counting bytes read and written, KINDS.md
    2026-10-28 and 2026-11-04), taken as its read rate. The rest are assumptions, not
    readings: each item records its actual seconds beside its estimate, to correct
    them after the first GPU run."""

    read_bytes_per_s: float = 4.3e12
    matmul_flop_per_s: float = 7.9e11 * 1e3  # 788-798 TFLOP/s bf16 measured here
    compile_s: float = 4.0          # one jit with its Triton / Mosaic kernel (assumed)
    random_per_s: float = 2e10      # normal samples generated per second (assumed)
    host_bytes_per_s: float = 1e9   # float64 numpy reference on the host (assumed)
    transfer_bytes_per_s: float = 5e9  # device to host (assumed)
    profile_s: float = 3.0          # start, stop and parse one profiler trace (assumed)


H200 = Rates()
# Fraction of the read rate each implementation's loop is assumed to reach (estimates
# only: low, so the budget errs toward not starting what would not finish). The XLA path
# gathers pages into a copy first; prefill is assumed at 30% of the matmul rate.
EFFICIENCY = {"ours": 0.5, "mosaic": 0.5, "mosaic-ws": 0.5, "mosaic-ragged": 0.5,
              "jax_pallas": 0.4, "xla": 0.25, "cudnn": 0.5}
PREFILL_MATMUL_FRACTION = 0.3


@dataclasses.dataclass(frozen=True)
class Case:
    """One checked configuration: batch x context (the table's capacity) in ``dtype``
    (a float dtype, or "int8" / "fp8": 8-bit pages, bfloat16 queries); ``num_splits``
    None is the kernel's own choice; ``q_scale`` > 1 makes logits peaky. ``kernel``
    "triton" (decode), "mosaic_decode" (the Mosaic decode tile) or "mosaic" (the ragged
    Mosaic kernel: each row's last ``chunk`` positions are queries).
    ``group``, ``page_size``, ``head_dim``, ``num_kv_heads`` replace the suite model's;
    ``num_layers``
    stacks the pool (the last layer is read); ``bound`` replaces the dtype's bound."""

    name: str
    batch: int
    context: int
    dtype: str = "bfloat16"
    num_splits: int | None = None
    q_scale: float = 1.0
    kernel: str = "triton"
    chunk: int = 1
    group: int | None = None
    page_size: int | None = None
    head_dim: int | None = None
    num_kv_heads: int | None = None
    sliding_window: int | None = None
    soft_cap: float | None = None
    num_layers: int | None = None
    bound: float | None = None
    warp_specialized: bool = False   # the decode tile's producer/consumer pipeline

    def model(self, base: Model) -> Model:
        group = self.group or base.num_q_heads // base.num_kv_heads
        kv_heads = self.num_kv_heads or base.num_kv_heads
        return Model(kv_heads * group, kv_heads, self.head_dim or base.head_dim,
                     self.page_size or base.page_size)

    def error_bound(self) -> float:
        return self.bound if self.bound is not None else ERROR_BOUNDS[self.dtype]

    def estimate(self, base: Model, rates: Rates) -> float:
        """Compile, draw the pool (K and V), gather each checked row's pages to the host
        and attend over them in float64 (a prefill chunk: 8 tokens per row)."""
        model = self.model(base)
        samples = (2 * (self.batch * self.context + model.page_size) * model.num_kv_heads
                   * model.head_dim * (self.num_layers or 1))
        host_values = (2 * min(CHECK_ROWS, self.batch) * self.context * model.num_kv_heads
                       * model.head_dim)
        host_passes = 8 if self.chunk > 1 else 1
        return (rates.compile_s + samples / rates.random_per_s
                + host_values * 8 * host_passes / rates.host_bytes_per_s
                + host_values * 2 * host_passes / rates.transfer_bytes_per_s)


def case_seed(case: Case) -> int:
    """The case's random draw: fixed by its name, so a GPU run and the interpret-mode
    bounds (gpu_mosaic.py) see the same inputs."""
    return zlib.crc32(case.name.encode())


# GPU: the pools past the 32-bit limits first, before anything the time limit can cut:
# 72 x 32k bf16 Llama-3-8B is 4.5 GiB each for K and V (jax's 64-bit offsets); 96 x 32k
# int8 is 3 GiB of codes, 3.2e9 elements (64-bit offsets only by install_wide_offsets).
CHECKS = [
    Case("pool>4GiB", 72, 32768, q_scale=2.0),
    Case("int8-pool-3GiB", 96, 32768, dtype="int8", q_scale=2.0),
    Case("odd-splits-3", 4, 8192, num_splits=3, q_scale=4.0),
    Case("odd-splits-7", 1, 16384, num_splits=7, q_scale=4.0),
    Case("float32", 2, 4096, dtype="float32", q_scale=2.0),
    Case("float32-splits-5", 3, 2048, dtype="float32", num_splits=5),
    Case("float16-peaky", 8, 2048, dtype="float16", q_scale=4.0),
    Case("int8", 16, 8192, dtype="int8", q_scale=2.0),
    Case("fp8-splits-3", 2, 16384, dtype="fp8", num_splits=3, q_scale=4.0),
    Case("window-softcap-stacked", 4, 4096, q_scale=2.0, sliding_window=1000, soft_cap=30.0,
         num_layers=3),
    *[Case(**fields) for fields in gpu_mosaic.variant_cases()],
    *[Case(**fields) for fields in gpu_mosaic.large_cases()],
]
TINY_CHECKS = [
    Case("first", 2, 96, q_scale=2.0),
    Case("odd-splits", 3, 320, num_splits=3, q_scale=4.0),  # 5 blocks: 2 + 2 + 1
    Case("float32", 1, 80, dtype="float32", num_splits=5, q_scale=2.0),
    Case("auto-splits", 1, 256, q_scale=4.0),
    Case("int8", 2, 96, dtype="int8", num_splits=3, q_scale=2.0),
    Case("fp8", 2, 80, dtype="fp8", q_scale=4.0),
    Case("window-softcap-stacked", 2, 96, q_scale=2.0, sliding_window=40, soft_cap=5.0,
         num_layers=2),
    Case("mosaic-decode", 3, 96, kernel="mosaic", q_scale=2.0, bound=MOSAIC_TINY_BOUND),
    Case("mosaic-decode-tile", 3, 96, kernel="mosaic_decode", q_scale=2.0,
         bound=MOSAIC_TINY_BOUND),
    Case("mosaic-prefill", 2, 96, kernel="mosaic", chunk=24, bound=MOSAIC_TINY_BOUND),
]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One timed input: ``phase`` "decode" (``batch`` sequences at full ``context``, one
    query each) or "prefill" (one sequence's last ``chunk`` tokens of ``context``)."""

    phase: str
    batch: int
    context: int
    dtype: str = "bfloat16"
    chunk: int = 1

    @property
    def label(self) -> str:
        size = (f"{self.batch}x{self.context}" if self.phase == "decode"
                else f"chunk {self.chunk} @ {self.context}")
        return f"{self.phase} {size} {self.dtype}"

    def kv_elements(self, model: Model) -> int:
        """K and V values one step reads."""
        return 2 * self.batch * self.context * model.num_kv_heads * model.head_dim

    def kv_bytes(self, model: Model) -> int:
        """K/V bytes one step reads (codes and scales for 8-bit pages)."""
        per_token = (model.head_dim + 2 if self.dtype in FORMATS
                     else model.head_dim * jnp.dtype(self.dtype).itemsize)
        return 2 * self.batch * self.context * model.num_kv_heads * per_token

    def flops(self, model: Model) -> int:
        """Useful attention FLOPs of one step (causal keys only for a chunk)."""
        keys = (self.batch * self.context if self.phase == "decode"
                else sum(range(self.context - self.chunk + 1, self.context + 1)))
        return 4 * keys * model.num_q_heads * model.head_dim


# Timed implementations. "mosaic" is what impl="mosaic" runs: the decode tile
# (mosaic_decode.paged_decode) for decode, the ragged kernel
# (ragged_attention.paged_attention_tokens) for prefill chunks; "mosaic-ragged" is the
# ragged kernel on decode rows, its own row; "mosaic-ws" the decode tile's
# warp-specialized pipeline (GPU only: two simulated warpgroups are too slow
# interpreted). Decode peers: Triton ("ours"), the XLA path, jax's paged_attention,
# cuDNN dense; 8-bit pages: the kernels that read them.
DECODE_IMPLS = ("ours", "mosaic", "mosaic-ws", "mosaic-ragged", "xla", "jax_pallas", "cudnn")
DECODE_IMPLS_8BIT = ("ours", "mosaic", "mosaic-ragged", "xla")
PREFILL_IMPLS = ("mosaic", "xla")
# The short sweep, timed right after the checks, kernel-only time on its first row of
# each kernel; the long sweep after it.
SHORT = [Shape("decode", 16, 8192), Shape("decode", 16, 8192, "int8"),
         Shape("decode", 16, 8192, "fp8"), Shape("prefill", 1, 8192, chunk=512),
         Shape("prefill", 1, 8192, chunk=2048)]
LONG = ([Shape("decode", b, c) for b, c in [
            (1, 32768), (4, 16384), (16, 4096), (16, 32768), (32, 32768), (64, 2048),
            (64, 8192), (128, 4096), (256, 1024), (256, 8192), (1, 8192), (1, 1024)]]
        + [Shape("decode", b, c, f) for b, c in [(64, 8192), (1, 32768)]
           for f in ("int8", "fp8")]
        + [Shape("prefill", 1, c, chunk=k) for c in (4096, 16384, 32768) for k in (512, 2048)])
TINY_SHORT = [Shape("decode", 2, 64), Shape("decode", 2, 64, "int8"),
              Shape("prefill", 1, 64, chunk=16)]
TINY_LONG = [Shape("decode", 2, 128)]
TUNE_SHAPES = [(1, 32768), (64, 4096)]
FORMATS_8BIT = tuple(name for name in ("int8", "fp8") if name in FORMATS)


@dataclasses.dataclass
class Settings:
    interpret: bool
    tiny: bool
    deadline: float  # time.monotonic() after which no item whose estimate passes it starts
    timing: bool = True
    only: str | None = None  # run just this check case
    tune: bool = True
    rates: Rates = H200

    @property
    def model(self) -> Model:
        return TINY if self.tiny else LLAMA3_8B

    @property
    def checks(self) -> list[Case]:
        cases = TINY_CHECKS if self.tiny else CHECKS
        return [c for c in cases if self.only in (None, c.name)
                and (c.dtype not in ("int8", "fp8") or c.dtype in FORMATS_8BIT)]

    def shapes(self, stage: str) -> list[Shape]:
        if self.only or not self.timing:
            return []
        shapes = {"short": TINY_SHORT if self.tiny else SHORT,
                  "long": TINY_LONG if self.tiny else LONG}[stage]
        return [s for s in shapes if s.dtype not in ("int8", "fp8") or s.dtype in FORMATS_8BIT]

    def impls(self, shape: Shape, stage: str = "short") -> tuple[str, ...]:
        if shape.phase == "prefill":
            return PREFILL_IMPLS
        impls = DECODE_IMPLS_8BIT if shape.dtype in FORMATS else DECODE_IMPLS
        if self.interpret:  # far too slow interpreted, or GPU-only; the GPU run times them
            impls = tuple(i for i in impls if i not in ("jax_pallas", "cudnn", "mosaic-ws"))
        if self.tiny and stage == "long":  # the short stage already ran Mosaic's path
            impls = tuple(i for i in impls if not i.startswith("mosaic"))
        if self.tiny and shape.dtype in FORMATS:  # the dry run's 8-bit Mosaic: the tile's
            impls = tuple(i for i in impls if i != "mosaic-ragged")
        return impls

    @property
    def repeats(self) -> int:
        """Timed loops per item: one on the tiny dry run (its times mean nothing; it runs
        the code), REPEATS on a device."""
        return 1 if self.tiny else REPEATS

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- inputs


@dataclasses.dataclass
class Paged:
    """R input sets over one pool: q ``[R, T, Hq, D]`` (T = B, or the query tokens),
    k, v ``[(L,) Hkv, P, S, D]``, tables ``int32[R, B, W]`` (disjoint pages per set),
    lengths ``int32[B]``; 8-bit pages with k_scale, v_scale ``[(L,) Hkv, P, S]``; a
    stacked pool is read at its last layer."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    tables: jax.Array
    lengths: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def sets(self) -> int:
        return self.q.shape[0]

    @property
    def layer(self) -> int | None:
        return self.k.shape[0] - 1 if self.k.ndim == 5 else None

    @property
    def scales(self) -> dict:
        """The kernels' scale arguments (empty for float pages)."""
        if self.k_scale is None:
            return {}
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)

    @property
    def kv_bytes_per_token(self) -> int:
        """K + V bytes one token of one kv head occupies (codes and scales)."""
        scale = 0 if self.k_scale is None else self.k_scale.dtype.itemsize
        return 2 * (self.k.shape[-1] * self.k.dtype.itemsize + scale)

    def read_layer(self, array):
        return array if array is None or self.layer is None else array[self.layer]


def poison(x, pages, offsets=None, *, lead=1):
    """x ``[lead axes..., P, S(, D)]`` with the given pages (and offsets) overwritten: NaN
    where the dtype has it, the largest code for int8 (no NaN there; its scale carries
    the NaN)."""
    value = jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).max
    index = (slice(None),) * lead + ((pages,) if offsets is None else (pages, offsets))
    return x.at[index].set(jnp.asarray(value, x.dtype))


def make_paged(model: Model, batch: int, context: int, dtype, *, sets=1, q_scale=1.0,
               lengths=None, seed=0, q_tokens=None, num_layers=None) -> Paged:
    """A random pool holding ``sets`` disjoint copies of a batch's pages (page 0, the null
    page, is NaN). Set 0's first row takes the pool's last pages, so a check reaches the
    highest offsets. With ``lengths``, every slot past a length is NaN and table entries
    past the last used page point at the null page. ``dtype`` "int8" / "fp8": the pool
    quantized as the cache writes it, NaN scales where the float pool has NaN, bfloat16
    queries. ``q_tokens``: query tokens per set (default ``batch``). ``num_layers``: a
    stacked pool ``[L, Hkv, P, S, D]``."""
    fmt = FORMATS.get(dtype) if isinstance(dtype, str) else None
    dtype = jnp.dtype(jnp.bfloat16 if fmt is not None else dtype)
    page_size = model.page_size
    width = context // page_size
    used_pages = sets * batch * width
    num_pages = used_pages + 1
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.arange(1, num_pages))
    order = np.concatenate([order[order > num_pages - 1 - width][::-1],
                            order[order <= num_pages - 1 - width]])
    tables = order.reshape(sets, batch, width).astype(np.int32)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    lead = 1 if num_layers is None else 2
    shape = (model.num_kv_heads, num_pages, page_size, model.head_dim)
    shape = shape if num_layers is None else (num_layers, *shape)
    pool = functools.partial(_random_pool, shape=shape, dtype=dtype, fmt=fmt, lead=lead)
    (k, *k_scale), (v, *v_scale) = pool(kk), pool(kv)
    arrays = [k, v, *k_scale, *v_scale]
    if lengths is None:
        lengths = np.full((batch,), context, np.int32)
    else:
        lengths = np.asarray(lengths, np.int32)
        arrays, tables = _poison_tails(arrays, tables, lengths, page_size, lead)
    q_shape = (sets, batch if q_tokens is None else q_tokens, model.num_q_heads,
               model.head_dim)
    q = q_scale * jax.random.normal(kq, q_shape, jnp.float32)
    return Paged(q.astype(dtype), *arrays[:2], jnp.asarray(tables), jnp.asarray(lengths),
                 *arrays[2:])


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "fmt", "lead"))
def _random_pool(key, *, shape, dtype, fmt, lead):
    """A normal pool ``shape`` in ``dtype`` (or quantized to 8-bit ``fmt``: codes and
    scales), page 0 poisoned. Module-level, so a shape seen before is not compiled again."""
    x = jax.random.normal(key, shape, jnp.float32)
    if fmt is None:
        return (poison(x.astype(dtype), 0, lead=lead),)
    codes, scales = quantize(x, fmt)
    return poison(codes, 0, lead=lead), poison(scales, 0, lead=lead)


_poisoned = jax.jit(poison, static_argnames=("lead",), donate_argnums=0)


def _poison_tails(arrays, tables, lengths, page_size, lead):
    """Every slot past each length on its last page poisoned in each of ``arrays`` (K, V
    and any scales); later table entries -> null page."""
    sets, batch, width = tables.shape
    used = -(-lengths // page_size)
    positions = np.arange(width * page_size)[None, :]
    rows, pos = np.nonzero((positions >= lengths[:, None])
                           & (positions < used[:, None] * page_size))
    pages = np.concatenate([tables[s, rows, pos // page_size] for s in range(sets)])
    offsets = np.tile(pos % page_size, sets)
    tables = tables.copy()
    tables[:, np.arange(width)[None, :] >= used[:, None]] = 0
    if len(pages):
        arrays = [_poisoned(a, jnp.asarray(pages), jnp.asarray(offsets), lead=lead)
                  for a in arrays]
    return arrays, tables


def check_lengths(batch: int, context: int, page_size: int, rng) -> np.ndarray:
    """Random lengths, each ending inside a page (a partial last page at every batch
    size); row 0 one slot short of capacity, row 1 one past a page, row 2 a single token."""
    lengths = rng.integers(1, context, size=batch)
    lengths[lengths % page_size == 0] -= 1
    lengths = np.maximum(lengths, 1)
    specials = [context - 1, page_size + 1, 1][:batch]
    lengths[:len(specials)] = specials
    return lengths.astype(np.int32)


# ---------------------------------------------------------------- checks


def pool64(pool, scale, pages) -> np.ndarray:
    """float64 values of the given pages ``[Hkv, n, S, D]`` (dequantized with their
    scales for 8-bit pages)."""
    values = np.asarray(pool[:, pages].astype(jnp.float32), np.float64)
    if scale is None:
        return values
    with np.errstate(invalid="ignore"):  # NaN scales in a partial page's poisoned tail
        return values * np.asarray(scale[:, pages].astype(jnp.float32), np.float64)[..., None]


def reference_tokens(inputs: Paged, tokens, model: Model, *, soft_cap=None,
                     sliding_window=None) -> np.ndarray:
    """float64 attention on the host of set 0's query tokens ``(q index, row, position)``,
    each over its row's keys ``0..position`` (the last ``sliding_window`` of them), logits
    soft-capped: ``[len(tokens), Hq, D]``."""
    group = model.num_q_heads // model.num_kv_heads
    k_pool, v_pool = inputs.read_layer(inputs.k), inputs.read_layer(inputs.v)
    k_scale, v_scale = inputs.read_layer(inputs.k_scale), inputs.read_layer(inputs.v_scale)
    out = []
    for index, row, position in tokens:
        visible = position + 1
        first = 0 if sliding_window is None else max(0, visible - sliding_window)
        pages = inputs.tables[0, row, :-(-visible // model.page_size)]
        k = pool64(k_pool, k_scale, pages)
        v = pool64(v_pool, v_scale, pages)
        k = k.reshape(model.num_kv_heads, -1, model.head_dim)[:, first:visible]
        v = v.reshape(model.num_kv_heads, -1, model.head_dim)[:, first:visible]
        q = np.asarray(inputs.q[0, index].astype(jnp.float32), np.float64)
        q = q.reshape(model.num_kv_heads, group, model.head_dim)
        logits = np.einsum("hgd,hld->hgl", q, k) * model.head_dim ** -0.5
        if soft_cap is not None:
            logits = soft_cap * np.tanh(logits / soft_cap)
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        o = np.einsum("hgl,hld->hgd", p, v) / p.sum(axis=-1, keepdims=True)
        out.append(o.reshape(model.num_q_heads, model.head_dim))
    return np.stack(out)


def run_check(case: Case, settings: Settings, seed: int) -> dict:
    """One kernel on one case against the float64 reference."""
    model = case.model(settings.model)
    rng = np.random.default_rng(seed)
    lengths = check_lengths(case.batch, case.context, model.page_size, rng)
    if case.chunk > 1:  # every row holds a whole chunk, still ending mid-page
        lengths = np.where(lengths < case.chunk, lengths + case.chunk, lengths)
        lengths[lengths % model.page_size == 0] -= 1
    inputs = make_paged(model, case.batch, case.context, case.dtype, q_scale=case.q_scale,
                        lengths=lengths, seed=seed, q_tokens=case.batch * case.chunk,
                        num_layers=case.num_layers)
    rows = list(range(min(CHECK_ROWS, case.batch)))
    options = dict(soft_cap=case.soft_cap, sliding_window=case.sliding_window,
                   layer=inputs.layer, num_splits=case.num_splits, interpret=settings.interpret,
                   **inputs.scales)
    if case.kernel == "mosaic":
        q_seq = np.repeat(np.arange(case.batch, dtype=np.int32), case.chunk)
        q_pos = (np.repeat(lengths, case.chunk) - case.chunk
                 + np.tile(np.arange(case.chunk, dtype=np.int32), case.batch))
        out = ra.paged_attention_tokens(
            inputs.q[0], inputs.k, inputs.v, inputs.tables[0], inputs.lengths,
            jnp.asarray(q_seq), jnp.asarray(q_pos), **options)
        # The first and last tokens of each checked row's chunk (up to 4 each).
        ends = sorted(set(range(min(4, case.chunk))) | set(range(max(case.chunk - 4, 0),
                                                                   case.chunk)))
        groups = [[(r * case.chunk + i, r, int(q_pos[r * case.chunk + i])) for i in ends]
                  for r in rows]
    else:
        if case.kernel == "mosaic_decode":
            decode = functools.partial(md.paged_decode,
                                       warp_specialized=case.warp_specialized)
        else:
            decode = pd.paged_decode
        out = decode(inputs.q[0], inputs.k, inputs.v, inputs.tables[0], inputs.lengths,
                     **options)
        groups = [[(r, r, int(lengths[r]) - 1)] for r in rows]
    out = np.asarray(out.astype(jnp.float32), np.float64)
    errors = []
    for tokens in groups:
        expected = reference_tokens(inputs, tokens, model, soft_cap=case.soft_cap,
                                    sliding_window=case.sliding_window)
        got = out[[index for index, _, _ in tokens]]
        errors.append(float(np.linalg.norm(got - expected) / np.linalg.norm(expected)))
    pool_bytes = math.prod(inputs.k.shape[:-1]) * inputs.kv_bytes_per_token
    bound = case.error_bound()
    nan = bool(np.isnan(out).any())
    return dict(case=case.name, kernel=case.kernel, batch=case.batch, context=case.context,
                dtype=case.dtype, chunk=case.chunk, num_splits=case.num_splits,
                q_scale=case.q_scale, config=case_config(case, model),
                lengths=lengths[:len(rows)].tolist(), pool_bytes=pool_bytes,
                pool_elements=math.prod(inputs.k.shape), rel_errors=errors, bound=bound,
                nan=nan, ok=not nan and all(e <= bound for e in errors))


def case_config(case: Case, model: Model) -> str:
    """The attention configuration in a few words (group, page, head_dim, options)."""
    words = [f"g{model.num_q_heads // model.num_kv_heads}", f"p{model.page_size}",
             f"d{model.head_dim}"]
    if case.sliding_window:
        words.append(f"window {case.sliding_window}")
    if case.soft_cap:
        words.append(f"cap {case.soft_cap:g}")
    if case.num_layers:
        words.append(f"layer {case.num_layers - 1} of {case.num_layers}")
    if case.warp_specialized:
        words.append("warp-specialized")
    return " ".join(words)


# ---------------------------------------------------------------- timing


def timed_loop(step, shared, sets, iters: int):
    """A jitted ``loop(shared, sets)`` running ``iters`` steps: step i is
    ``step(*shared, *[x[i % R] for x in sets])`` (``sets``: arrays with a leading axis
    of R input sets); its output depends on every step. Arrays are arguments of the jit,
    never closed-over constants."""
    count = sets[0].shape[0]

    @jax.jit
    def loop(shared, sets):
        def body(i, total):
            current = [lax.dynamic_index_in_dim(x, i % count, keepdims=False) for x in sets]
            return total + jnp.sum(step(*shared, *current).astype(jnp.float32))
        return lax.fori_loop(0, iters, body, jnp.float32(0))

    return loop


def switched_loop(step, shared, sets, iters: int):
    """``timed_loop`` for inputs too large to slice per step (a slice of a stacked K/V
    would be copied): ``sets`` is a list of R argument tuples, each its own arrays, and
    step i runs branch ``i % R`` of a ``lax.switch``."""
    count = len(sets)

    @jax.jit
    def loop(shared, sets):
        def body(i, total):
            branches = [lambda s=s: jnp.sum(step(*shared, *s).astype(jnp.float32))
                        for s in sets]
            return total + lax.switch(i % count, branches)
        return lax.fori_loop(0, iters, body, jnp.float32(0))

    return loop


def seconds_per_step(step, shared, sets, *, iters: int, repeats: int = REPEATS,
                     loop=None) -> float:
    """Median seconds of one step (see ``timed_loop``; ``loop`` if already built) over
    ``repeats`` loops after a compile and warm-up loop."""
    loop = loop or timed_loop(step, shared, sets, iters)
    with lowering.triton_deprecation_silenced():
        jax.block_until_ready(loop(shared, sets))  # compile + warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(loop(shared, sets))
            times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def kernel_seconds(loop, shared, sets, *, iters: int, pattern: str) -> dict:
    """The kernel's own device time per step: the compiled ``loop`` (``timed_loop``) once
    more under jax's profiler, the durations of device events whose name matches
    ``pattern`` summed over the GPU streams. ``kernel_s`` is None where the trace holds no
    such event (a CPU, or a machine whose profiler sees no device)."""
    with lowering.triton_deprecation_silenced():
        with tempfile.TemporaryDirectory() as tmp:
            jax.profiler.start_trace(tmp)
            try:
                jax.block_until_ready(loop(shared, sets))
            finally:
                jax.profiler.stop_trace()
            paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
            if not paths:
                return dict(kernel_s=None, kernel_note="the profiler wrote no trace")
            data = jax.profiler.ProfileData.from_file(paths[0])
    total_ns, launches, names, seen = 0, 0, set(), {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():  # kernels, not the XLA op summaries
                continue
            for event in line.events:
                seen[event.name[:80]] = seen.get(event.name[:80], 0) + event.duration_ns
                if re.search(pattern, event.name):
                    total_ns += event.duration_ns
                    launches += 1
                    names.add(event.name[:80])
    if not launches:  # name the busiest device events, to fix the pattern from
        busiest = sorted(seen, key=seen.get, reverse=True)[:4]
        return dict(kernel_s=None, kernel_note=f"no device event matched {pattern!r}"
                    + (f" (busiest: {', '.join(busiest)})" if busiest else ""))
    return dict(kernel_s=total_ns * 1e-9 / iters, kernel_launches=launches,
                kernel_names=sorted(names))


def rotation(step_bytes: int, settings: Settings) -> tuple[int, int]:
    """(input sets, steps per loop): sets overflow the L2 4x; the loop reads about
    LOOP_BYTES; the tiny dry run does the least that still exercises the code."""
    if settings.tiny:
        return 2, 2
    sets = min(MAX_INPUT_SETS, max(1, math.ceil(4 * L2_BYTES / step_bytes)))
    steps = max(sets, min(MAX_STEPS, math.ceil(LOOP_BYTES / step_bytes)))
    return sets, -(-steps // sets) * sets


def measure_ceilings(settings: Settings) -> dict:
    """Read bandwidth (a jitted bf16 sum over 1 GiB, read once per step; 1 MiB on the
    dry run) and the bf16 matmul rate, both timed like the kernels."""
    def seconds(step, x, iters):
        loop = switched_loop(step, (), [(x,)], iters)  # one set: no slicing in the loop
        return seconds_per_step(step, (), [(x,)], iters=iters, repeats=settings.repeats,
                                loop=loop)

    size = (2**20 if settings.tiny else GiB) // 2
    x = jax.random.normal(jax.random.key(0), (size,), jnp.bfloat16)
    read = seconds(lambda a: jnp.sum(a, dtype=jnp.float32), x,
                   2 if settings.tiny else math.ceil(LOOP_BYTES / (size * 2)))
    n = 256 if settings.tiny else 8192
    m = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul = seconds(lambda a: a @ a, m, 2 if settings.tiny else 20)
    return dict(read_bytes_per_s=size * 2 / read, matmul_flop_per_s=2 * n ** 3 / matmul)


def decode_step(impl: str, interpret: bool):
    """``step(k, v, lengths, scales, q, tables)`` of one decode implementation."""
    if impl == "ours":
        return lambda k, v, lengths, scales, q, tables: pd.paged_decode(
            q, k, v, tables, lengths, interpret=interpret, **scales)
    if impl == "xla":
        return lambda k, v, lengths, scales, q, tables: xla_attention.paged_decode(
            q, k, v, tables, lengths, **scales)
    if impl == "mosaic":
        return lambda k, v, lengths, scales, q, tables: md.paged_decode(
            q, k, v, tables, lengths, interpret=interpret, **scales)
    if impl == "mosaic-ws":
        return lambda k, v, lengths, scales, q, tables: md.paged_decode(
            q, k, v, tables, lengths, interpret=interpret, warp_specialized=True, **scales)
    if impl == "mosaic-ragged":
        return lambda k, v, lengths, scales, q, tables: ra.paged_attention_tokens(
            q, k, v, tables, lengths, jnp.arange(q.shape[0], dtype=jnp.int32), lengths - 1,
            interpret=interpret, **scales)
    if impl == "jax_pallas":
        def jax_pallas(k, v, lengths, scales, q, tables):
            from jax.experimental.pallas.ops.gpu import paged_attention as peer
            return peer.paged_attention(q, k, v, tables, lengths, interpret=interpret,
                                        **jax_peer_options(tables.shape[1]))
        return jax_pallas
    raise ValueError(f"decode impl={impl!r} is not one of {DECODE_IMPLS}")


def prefill_step(impl: str, interpret: bool, chunk: int, context: int):
    """``step(k, v, lengths, scales, q, tables)`` of one prefill implementation: one
    row's last ``chunk`` tokens of ``context``."""
    q_seq = jnp.zeros(chunk, jnp.int32)
    q_pos = jnp.arange(context - chunk, context, dtype=jnp.int32)
    if impl == "mosaic":
        return lambda k, v, lengths, scales, q, tables: ra.paged_attention_tokens(
            q, k, v, tables, lengths, q_seq, q_pos, interpret=interpret)
    if impl == "xla":
        return lambda k, v, lengths, scales, q, tables: xla_attention.paged_prefill(
            q, k, v, tables, lengths, q_seq, q_pos)
    raise ValueError(f"prefill impl={impl!r} is not one of {PREFILL_IMPLS}")


# Device event names of each kernel, for its kernel-only time ("mosaic": the decode
# tile's _decode_kernel or, for prefill, the ragged kernel's _attention_kernel).
KERNEL_PATTERNS = {"ours": r"jpaged_paged_decode",
                   "mosaic": r"decode_kernel|attention_kernel|mosaic",
                   "mosaic-ws": r"decode_kernel|mosaic",
                   "mosaic-ragged": r"attention_kernel|mosaic",
                   "jax_pallas": r"paged_attention", "cudnn": r"cudnn|fmha|flash"}


def jax_peer_options(width: int) -> dict:
    """Options JAX's paged_attention accepts: k_splits divides the table width and
    pages_per_compute_block divides the pages per split."""
    k_splits = math.gcd(16, width)
    return dict(k_splits=k_splits, pages_per_compute_block=math.gcd(8, width // k_splits))


def time_cudnn(model, batch, context, dtype, count, iters) -> float:
    """cuDNN dense decode over contiguous K/V ``[B, T, Hkv, D]``, the dense baseline: one
    q, K, V per set, each step on one set."""
    keys = jax.random.split(jax.random.key(1), 3 * count)
    shape = (batch, context, model.num_kv_heads, model.head_dim)
    sets = [(jax.random.normal(keys[3 * r], (batch, 1, model.num_q_heads, model.head_dim),
                               dtype),
             jax.random.normal(keys[3 * r + 1], shape, dtype),
             jax.random.normal(keys[3 * r + 2], shape, dtype)) for r in range(count)]
    lengths = jnp.full((batch,), context, jnp.int32)

    def dense(lengths, q, k, v):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                            implementation="cudnn")

    loop = switched_loop(dense, (lengths,), sets, iters)
    return seconds_per_step(dense, (lengths,), sets, iters=iters, loop=loop)


class ShapeInputs:
    """The inputs of the shape being timed, made by its first item and dropped when the
    next shape starts (so one shape's pools are on the device at a time)."""

    def __init__(self):
        self.shape, self.inputs = None, None

    def get(self, shape: Shape, settings: Settings) -> tuple[Paged, int, int]:
        model = settings.model
        count, iters = rotation(shape.kv_bytes(model), settings)
        if self.shape != shape:
            self.shape, self.inputs = None, None  # free the last shape's pools first
            q_tokens = shape.chunk if shape.phase == "prefill" else None
            self.inputs = make_paged(model, shape.batch, shape.context, shape.dtype,
                                     sets=count, q_tokens=q_tokens)
            self.shape = shape
        return self.inputs, count, iters


def time_item(shape: Shape, impl: str, settings: Settings, cache: ShapeInputs,
              profile: bool) -> dict:
    """One implementation on one shape: seconds per step end to end, and kernel-only
    seconds where ``profile``."""
    model = settings.model
    row = dict(phase=shape.phase, impl=impl, batch=shape.batch, context=shape.context,
               dtype=shape.dtype, chunk=shape.chunk, kv_bytes=shape.kv_bytes(model),
               flops=shape.flops(model))
    inputs, count, iters = cache.get(shape, settings)
    row.update(input_sets=count, steps=iters)
    if impl == "cudnn":
        attempt(row, "seconds", time_cudnn, model, shape.batch, shape.context,
                jnp.dtype(shape.dtype), count, iters)
        return row
    step = (prefill_step(impl, settings.interpret, shape.chunk, shape.context)
            if shape.phase == "prefill" else decode_step(impl, settings.interpret))
    shared = (inputs.k, inputs.v, inputs.lengths, inputs.scales)
    sets = [inputs.q, inputs.tables]
    loop = timed_loop(step, shared, sets, iters)
    attempt(row, "seconds", seconds_per_step, step, shared, sets, iters=iters,
            repeats=settings.repeats, loop=loop)
    if profile and impl in KERNEL_PATTERNS and row["seconds"]:
        try:
            row.update(kernel_seconds(loop, shared, sets, iters=iters,
                                      pattern=KERNEL_PATTERNS[impl]))
        except Exception as error:  # noqa: BLE001 - the end-to-end time still stands
            row.update(kernel_s=None, kernel_note=f"{type(error).__name__}: {error}"[:300])
    return row


def attempt(row: dict, key: str, fn, *args, **kwargs):
    """Run one measurement; record its error instead of raising."""
    try:
        row[key] = fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - one failure must not lose the rest
        row[key] = None
        row.setdefault("errors", {})[key] = f"{type(error).__name__}: {error}"[:400]
        log(f"  {key} failed: {row['errors'][key]}")
        traceback.print_exc(limit=3)


def time_estimate(shape: Shape, impl: str, settings: Settings, first: bool,
                  profile: bool) -> float:
    """Seconds one timing item is expected to take: compile, the shape's inputs (its
    first item), warm-up plus REPEATS loops, and a profiled loop."""
    rates, model = settings.rates, settings.model
    step_bytes = shape.kv_bytes(model)
    count, iters = rotation(step_bytes, settings)
    loop_s = iters * max(step_bytes / (rates.read_bytes_per_s * EFFICIENCY[impl]),
                         shape.flops(model) / (rates.matmul_flop_per_s
                                               * PREFILL_MATMUL_FRACTION))
    if impl == "cudnn":  # its own contiguous copies, every time
        first = True
    seconds = rates.compile_s + (1 + settings.repeats) * loop_s
    if first:
        seconds += shape.kv_elements(model) * count / rates.random_per_s
    if profile:  # the compiled loop once more, under the profiler
        seconds += loop_s + rates.profile_s
    return seconds


# ---------------------------------------------------------------- autotune


def tune_points(batch: int):
    """pages_per_block x num_warps, then (batch 1) split counts at the defaults."""
    points = [dict(pages_per_block=p, num_warps=w) for p in (1, 2, 4, 8) for w in (2, 4, 8)]
    points += [dict(num_stages=s) for s in (1, 3)]
    if batch == 1:
        points += [dict(num_splits=s) for s in (33, 66, 132, 264)]
    return points


def time_tuning(batch, context, tuning, settings: Settings, cache: ShapeInputs) -> dict:
    shape = Shape("decode", batch, context)
    inputs, count, iters = cache.get(shape, settings)

    def step(k, v, lengths, scales, q, tables):
        return pd.paged_decode(q, k, v, tables, lengths, interpret=settings.interpret,
                               **tuning)

    point = dict(batch=batch, context=context, **tuning)
    attempt(point, "seconds", seconds_per_step, step,
            (inputs.k, inputs.v, inputs.lengths, {}), [inputs.q, inputs.tables],
            iters=iters)
    return point


# ---------------------------------------------------------------- the plan


@dataclasses.dataclass
class Item:
    stage: str
    label: str
    estimate_s: float
    run: object  # () -> None: does the work and records it in the report
    verdict: bool = False  # a check the verdict needs


STAGES = ("setup", "checks", "short", "long")
STAGE_TITLES = {"setup": "device ceilings (read bandwidth, matmul rate)",
                "checks": "correctness checks (the verdict)",
                "short": "short sweep: decode and prefill, every kernel, 8-bit pages",
                "long": "long sweep: remaining shapes, then autotuning"}


def build_plan(settings: Settings, report: dict) -> list[Item]:
    """Every item of the run in order, each with its estimate; running one records it in
    ``report``."""
    items = []
    model = settings.model
    cache = ShapeInputs()

    def setup():
        report.update(measure_ceilings(settings))
        log(f"read {report['read_bytes_per_s'] / 1e9:.0f} GB/s, matmul "
            f"{report['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s")

    if settings.timing:
        rates = settings.rates
        items.append(Item("setup", "ceilings", 2 * rates.compile_s + (1 + REPEATS) * 2
                          * LOOP_BYTES / rates.read_bytes_per_s + 1.0, setup))
    for case in settings.checks:
        items.append(Item("checks", f"check {case.name}", case.estimate(model, settings.rates),
                          functools.partial(check_case, case, report, settings),
                          verdict=True))
    profiled = set()
    for stage in ("short", "long"):
        for shape in settings.shapes(stage):
            first = True
            if shape.phase == "decode" and shape.dtype == "bfloat16" and not (
                    stage == "short" and settings.tiny):
                case = Case(f"{shape.batch}x{shape.context}", shape.batch, shape.context)
                items.append(Item(stage, f"check {case.name}",
                                  case.estimate(model, settings.rates),
                                  functools.partial(check_case, case, report, settings)))
            for impl in settings.impls(shape, stage):
                kernel = (impl, shape.phase, shape.dtype in FORMATS)
                profile = stage == "short" and kernel not in profiled and impl != "xla"
                profiled.add(kernel)
                items.append(Item(
                    stage, f"time {shape.label} {impl}",
                    time_estimate(shape, impl, settings, first, profile),
                    functools.partial(timing_item, shape, impl, settings, cache, profile,
                                      report)))
                first = False
    if settings.timing and settings.tune and not settings.interpret:
        for batch, context in TUNE_SHAPES:
            shape = Shape("decode", batch, context)
            for n, tuning in enumerate(tune_points(batch)):
                items.append(Item("long", f"tune {batch}x{context} {tuning}",
                                  time_estimate(shape, "ours", settings, n == 0, False),
                                  functools.partial(tuning_item, batch, context, tuning,
                                                    settings, cache, report)))
    return items


def check_case(case: Case, report: dict, settings: Settings):
    try:
        result = run_check(case, settings, case_seed(case))
    except Exception as error:  # noqa: BLE001 - a crash is a failed check, not a stop
        traceback.print_exc(limit=5)
        result = dict(case=case.name, kernel=case.kernel, batch=case.batch,
                      context=case.context, dtype=case.dtype, ok=False,
                      error=f"{type(error).__name__}: {error}"[:400])
    report["checks"].append(result)
    log(f"check {case.name}: {'ok' if result['ok'] else 'FAIL'} "
        f"{result.get('rel_errors', result.get('error'))}")


def timing_item(shape, impl, settings, cache, profile, report):
    row = time_item(shape, impl, settings, cache, profile)
    report["timings"].append(row)
    log(f"time {shape.label} {impl}: {fmt_us(row.get('seconds'))}"
        + (f" (kernel {fmt_us(row['kernel_s'])})" if row.get("kernel_s") else ""))


def tuning_item(batch, context, tuning, settings, cache, report):
    point = time_tuning(batch, context, tuning, settings, cache)
    report["autotune"].append(point)
    log(f"tune {batch}x{context} {tuning}: {fmt_us(point.get('seconds'))}")


def plan_table(items: list[Item]) -> list[dict]:
    """Per stage: items and estimated seconds, with the running total."""
    rows, total = [], 0.0
    for stage in STAGES:
        mine = [i for i in items if i.stage == stage]
        if not mine:
            continue
        seconds = sum(i.estimate_s for i in mine)
        total += seconds
        rows.append(dict(stage=stage, title=STAGE_TITLES[stage], items=len(mine),
                         estimate_s=seconds, cumulative_s=total))
    return rows


def plan_markdown(items: list[Item], rates: Rates) -> str:
    lines = [f"Plan: {len(items)} items; estimates from the H200's measured copy rate "
             f"({rates.read_bytes_per_s / 1e12:.1f} TB/s), {rates.compile_s:g} s per "
             f"compile (assumed) and the efficiencies in gpu_check.EFFICIENCY.", "",
             "| stage | what | items | estimated s | cumulative s |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['title']} | {r['items']} | {r['estimate_s']:.0f} | "
              f"{r['cumulative_s']:.0f} |" for r in plan_table(items)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- verdict and report


class Stopped(BaseException):
    """SIGTERM: not an Exception, so no per-item handler swallows it."""


def verdict(report: dict) -> str:
    """FAIL if any check failed; INCOMPLETE while a check the verdict needs has not run;
    else PASS."""
    checks = report["checks"]
    if any(not c["ok"] for c in checks):
        return "FAIL"
    done = {c["case"] for c in checks}
    if not report["verdict_checks"] or any(n not in done for n in report["verdict_checks"]):
        return "INCOMPLETE"
    return "PASS"


def fmt_us(seconds) -> str:
    return "-" if not seconds else f"{seconds * 1e6:.1f}us"


def markdown(report: dict) -> str:
    read_bw = report.get("read_bytes_per_s")
    matmul = report.get("matmul_flop_per_s")
    done = {c["case"] for c in report["checks"]}
    missing = [n for n in report["verdict_checks"] if n not in done]
    lines = [f"# jpaged GPU check ({report['device']}, jax {report['jax']})", "",
             f"Verdict: **{report['verdict']}**"
             + (f" ({len(missing)} of {len(report['verdict_checks'])} verdict checks not "
                f"run: {', '.join(missing[:6])})" if missing else "")
             + (" (interpret-mode dry run: no timing is meaningful)"
                if report["interpret"] else ""), ""]
    if report.get("stopped"):
        lines += [f"Stopped: {report['stopped']}.", ""]
    if report.get("warnings"):
        lines += [f"Warning: {w}" for w in report["warnings"]] + [""]
    lines += [f"Read bandwidth (jitted reduction, the denominator of every fraction below): "
              f"{(read_bw or 0) / 1e9:.0f} GB/s; bf16 matmul "
              f"{(matmul or 0) / 1e12:.0f} TFLOP/s.", "",
              "## Plan (estimated against actual seconds)", "",
              "| stage | items run | skipped | estimated s | actual s |", "|---|---|---|---|---|"]
    for stage in STAGES:
        ran = [i for i in report["items"] if i["stage"] == stage]
        skipped = [i for i in report["skipped"] if i["stage"] == stage]
        if ran or skipped:
            lines.append(f"| {stage} | {len(ran)} | {len(skipped)} | "
                         f"{sum(i['estimate_s'] for i in ran):.0f} | "
                         f"{sum(i['took_s'] for i in ran):.0f} |")
    lines += ["", "## Checks (relative error against float64)", "",
              "| case | kernel | config | batch | context | chunk | dtype | splits | q scale | "
              "pool GiB | max rel err | bound | NaN | ok |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["checks"]:
        err = max(c["rel_errors"]) if c.get("rel_errors") else None
        lines.append(
            f"| {c['case']} | {c.get('kernel', 'triton')} | {c.get('config', '')} | "
            f"{c['batch']} | {c['context']} | {c.get('chunk', 1)} | {c['dtype']} | "
            f"{c.get('num_splits') or 'auto'} | {c.get('q_scale')} | "
            f"{c.get('pool_bytes', 0) / GiB:.2f} | "
            f"{'-' if err is None else f'{err:.1e}'} | {c.get('bound')} | {c.get('nan')} | "
            f"{'ok' if c.get('ok') else 'FAIL ' + c.get('error', '')} |")
    lines += ["", "## Step time (full lengths; end to end and kernel only; fraction of the "
              "read bandwidth)", "",
              "| phase | impl | batch | context | chunk | dtype | KV MiB | sets x steps | "
              "end to end | kernel only | GB/s | of read | TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        seconds = r.get("seconds")
        rate = r["kv_bytes"] / seconds if seconds else None
        flop_rate = "-" if not seconds else f"{r['flops'] / seconds / 1e12:.1f}"
        kernel = fmt_us(r.get("kernel_s")) if r.get("kernel_s") else (
            "n/a" if "kernel_note" in r else "")
        lines.append(
            f"| {r['phase']} | {r['impl']} | {r['batch']} | {r['context']} | {r['chunk']} | "
            f"{r['dtype']} | {r['kv_bytes'] / 2**20:.0f} | {r['input_sets']} x {r['steps']} "
            f"| {fmt_us(seconds) if seconds else 'failed'} | {kernel} | "
            f"{'-' if not rate else f'{rate / 1e9:.0f}'} | "
            f"{'-' if not (rate and read_bw) else f'{rate / read_bw:.2f}'} | "
            f"{flop_rate} |")
    notes = sorted({r["kernel_note"] for r in report["timings"] if r.get("kernel_note")})
    if notes:
        lines += ["", "Kernel only n/a:"] + [f"- {note}" for note in notes]
    for point in report["autotune"]:
        tuning = {k: v for k, v in point.items() if k not in ("batch", "context", "seconds")}
        lines.append(f"\nTune {point['batch']} x {point['context']} {tuning}: "
                     f"{fmt_us(point.get('seconds'))}")
    if report["item_errors"]:
        lines += ["", "## Items that raised", ""]
        lines += [f"- {e['label']}: {e['error']}" for e in report["item_errors"]]
    if report["skipped"]:
        lines += ["", "## Skipped (over the budget or stopped)", ""]
        lines += [f"- {s['label']} ({s['stage']}, est. {s['estimate_s']:.0f} s): "
                  f"{s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path | None) -> None:
    """Both files, each replaced atomically (a kill mid-write leaves the previous one)."""
    if out_dir is None:
        return
    report["verdict"] = verdict(report)
    report["ok"] = report["verdict"] == "PASS"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_check.md", markdown(report))):
        temporary = out_dir / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, out_dir / name)


def new_report(settings: Settings) -> dict:
    device = jax.devices()[0]
    return dict(device=getattr(device, "device_kind", str(device)), jax=jax.__version__,
                  interpret=settings.interpret, tiny=settings.tiny, verdict="INCOMPLETE",
                  ok=False, verdict_checks=[], checks=[], timings=[], autotune=[], items=[],
                  skipped=[], item_errors=[], plan=[],
                  warnings=gpu_mosaic.bound_warnings())


def run(settings: Settings, out_dir: Path) -> dict:
    """Build the plan, run every item the budget allows, write the report after each."""
    report = new_report(settings)
    items = build_plan(settings, report)
    report["verdict_checks"] = [i.label.removeprefix("check ") for i in items if i.verdict]
    report["plan"] = plan_table(items)
    log(f"device {report['device']}, jax {jax.__version__}, writing to {out_dir}")
    log(plan_markdown(items, settings.rates))
    write(report, out_dir)
    previous = signal.signal(signal.SIGTERM, _stop)
    current = None
    try:
        for current in items:
            left = settings.time_left()
            if left < current.estimate_s:
                report["skipped"].append(dict(stage=current.stage, label=current.label,
                                              estimate_s=current.estimate_s,
                                              reason=f"budget: {left:.0f} s left"))
                continue
            start = time.monotonic()
            try:
                current.run()
            except Exception as error:  # noqa: BLE001 - one item must not end the run
                traceback.print_exc(limit=5)
                report["item_errors"].append(dict(
                    label=current.label, error=f"{type(error).__name__}: {error}"[:400]))
            report["items"].append(dict(stage=current.stage, label=current.label,
                                        estimate_s=current.estimate_s,
                                        took_s=time.monotonic() - start))
            write(report, out_dir)
        current = None
    except Stopped:
        report["stopped"] = f"SIGTERM during {current.label}" if current else "SIGTERM"
        done = {i["label"] for i in report["items"]}
        skipped = {s["label"] for s in report["skipped"]}
        report["skipped"] += [dict(stage=i.stage, label=i.label, estimate_s=i.estimate_s,
                                   reason="stopped") for i in items
                              if i.label not in done and i.label not in skipped]
    finally:
        signal.signal(signal.SIGTERM, previous)
        write(report, out_dir)
    return report


def _stop(signum, frame):
    raise Stopped()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="run kernels in interpret mode")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start no item whose estimate would end past this many seconds")
    parser.add_argument("--no-tune", action="store_true", help="skip the autotune sweep")
    parser.add_argument("--checks-only", action="store_true", help="no timing")
    parser.add_argument("--case", help="run only this check case")
    parser.add_argument("--plan", action="store_true",
                        help="print the stages' estimated seconds on an H200 and exit")
    args = parser.parse_args(argv)
    settings = Settings(args.interpret, args.tiny, time.monotonic() + args.budget_s,
                        timing=not (args.checks_only or args.case), only=args.case,
                        tune=not args.no_tune)
    if args.plan:
        items = build_plan(settings, {})
        print(plan_markdown(items, settings.rates))
        for item in items:
            print(f"{item.stage:6} {item.estimate_s:6.1f} s  {item.label}")
        return 0
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else (
        Path(__file__).parent / "results")
    report = run(settings, out_dir)
    log(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
