"""GPU verdict for the Pallas paged attention kernels: correctness first, then speed.

Run by ``benchmarks/gpu_suite.sh`` on a GPU machine with ``python3``, jax, numpy and this
repository only (``PYTHONPATH=.``; nothing here imports Flax or the ``jpaged`` package).

Checks (each a fresh random draw; the verdict is their conjunction):
  * relative error ``|out - ref| / |ref|`` (Frobenius, per checked row) against a float64
    numpy reference on the same rounded inputs, with a bound per cache dtype: float32 must
    be IEEE-accurate (TF32 would miss it), 16-bit within its rounding;
  * every sequence ends on a partial last page whose tail, and every later table entry's
    page, is NaN: at every batch size, so a masking bug shows as NaN, not as noise;
  * peaky logits (scaled queries) where a wrong split weighting cannot hide;
  * forced odd split counts and the automatic split count, a float32 cache;
  * the pool above 4 GiB (int64 offsets) first, before anything the time limit can cut;
  * 8-bit pages (int8, float8_e4m3fn with bfloat16 scales, bfloat16 queries) against
    float64 attention over the dequantized values, NaN in the free slots' scales;
  * the Mosaic GPU ragged kernel (``jpaged.pallas_kernels.ragged_attention``) on decode batches
    and prefill chunks of 512 and 2048 tokens that end on partial pages.
Timing: N steps inside one jit, each step on another of R input sets (R sized so the sets
overflow the L2), the median of several such calls; bandwidth is the K/V bytes read over
a measured read-only bandwidth (a jitted reduction, same method). Peers on the same
inputs: jpaged's XLA path, JAX's ``pallas.ops.gpu.paged_attention``, and cuDNN dense
attention (``jax.nn.dot_product_attention``) over contiguous K/V as the dense baseline.
Shapes run under a time budget in a fixed order; each result is written as it finishes.
8-bit pools are timed for the Triton kernel and the XLA path at a few shapes. Then
``gpu_mosaic.run`` times the Mosaic kernel beside the Triton kernel, the XLA path and
JAX's paged_attention for decode (4k-32k contexts, fraction of copy bandwidth) and beside
the XLA path for prefill chunks of 512 and 2048 tokens (fraction of the bf16 matmul rate),
with the same in-jit timer.

CPU dry run of the same code (kernels in interpret mode, tiny shapes, seconds):
``python benchmarks/gpu_check.py --interpret --tiny``. Writes ``$OUT/gpu_check.{json,md}``
(``benchmarks/results/`` when OUT is unset); exits 1 unless every check passed.
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
from jax import lax

import gpu_mosaic
from jpaged.pallas_kernels import lowering
from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels import ragged_attention as ra
from jpaged.pallas_kernels import xla_attention
from jpaged.pallas_kernels.quantization import FORMATS, qmax, quantize

# Bounds on |out - ref| / |ref| per cache dtype (reference: float64 on the same rounded
# inputs). float32: IEEE dots land near 1e-7, TF32 near 3e-4. 16-bit: the probabilities
# meet V in the cache dtype and the output is rounded to it.
ERROR_BOUNDS = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3,
                # 8-bit pages: the reference attends over the dequantized values; the
                # bfloat16 query meets them in bfloat16, as for a bfloat16 pool.
                "int8": 1e-2, "fp8": 1e-2}
# Mosaic: wgmma with bf16 operands and bf16 probabilities, a bf16 output.
MOSAIC_ERROR_BOUND = 2e-2
L2_BYTES = 50 * 2**20  # H100/H200; input sets rotate through several times this
CHECK_ROWS = 4  # rows of a batch compared with the float64 reference
# One lax.switch branch per input set: 32 sets of batch 1 x 1k context (4 MiB each) still
# overflow the L2 2.5x.
MAX_INPUT_SETS = 32


@dataclasses.dataclass(frozen=True)
class Model:
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int


LLAMA3_8B = Model(32, 8, 128, 16)
TINY = Model(8, 2, 64, 16)


@dataclasses.dataclass(frozen=True)
class Case:
    """One checked configuration: batch x context (the table's capacity) in ``dtype``
    (a float dtype, or "int8" / "fp8": 8-bit pages, bfloat16 queries); ``num_splits``
    None is the kernel's own choice; ``q_scale`` > 1 makes logits peaky. ``kernel``
    "triton" (decode) or "mosaic" (each row's last ``chunk`` positions are queries)."""

    name: str
    batch: int
    context: int
    dtype: str = "bfloat16"
    num_splits: int | None = None
    q_scale: float = 1.0
    kernel: str = "triton"
    chunk: int = 1

    @property
    def bound(self) -> float:
        return MOSAIC_ERROR_BOUND if self.kernel == "mosaic" else ERROR_BOUNDS[self.dtype]


# GPU: the >4 GiB pool first (72 x 32k bf16 Llama-3-8B: 4.5 GiB each for K and V).
CHECKS = [
    Case("pool>4GiB", 72, 32768, q_scale=2.0),
    Case("odd-splits-3", 4, 8192, num_splits=3, q_scale=4.0),
    Case("odd-splits-7", 1, 16384, num_splits=7, q_scale=4.0),
    Case("float32", 2, 4096, dtype="float32", q_scale=2.0),
    Case("float32-splits-5", 3, 2048, dtype="float32", num_splits=5),
    Case("float16-peaky", 8, 2048, dtype="float16", q_scale=4.0),
    Case("int8", 16, 8192, dtype="int8", q_scale=2.0),
    Case("fp8-splits-3", 2, 16384, dtype="fp8", num_splits=3, q_scale=4.0),
    Case("mosaic-decode", 16, 8192, kernel="mosaic", q_scale=2.0),
    Case("mosaic-prefill-512", 2, 4096, kernel="mosaic", chunk=512),
    Case("mosaic-prefill-2048", 1, 16384, kernel="mosaic", chunk=2048, q_scale=2.0),
]
# (batch, context) timed, each also checked: small batches with long contexts (split-K
# matters) to big batches. Every K/V read is at least 8x the L2 or rotated to be.
SHAPES = [(1, 32768), (4, 16384), (16, 4096), (16, 32768), (32, 32768), (64, 2048),
          (64, 8192), (128, 4096), (256, 1024), (256, 8192), (1, 8192), (1, 1024)]
TINY_CHECKS = [
    Case("first", 2, 96, q_scale=2.0),
    Case("odd-splits", 3, 320, num_splits=3, q_scale=4.0),  # 5 blocks: 2 + 2 + 1
    Case("float32", 1, 80, dtype="float32", num_splits=5, q_scale=2.0),
    Case("auto-splits", 1, 256, q_scale=4.0),
    Case("int8", 2, 96, dtype="int8", num_splits=3, q_scale=2.0),
    Case("fp8", 2, 80, dtype="fp8", q_scale=4.0),
    Case("mosaic-decode", 3, 96, kernel="mosaic", q_scale=2.0),
    Case("mosaic-prefill", 2, 96, kernel="mosaic", chunk=24),
]
TINY_SHAPES = [(2, 64)]
# 8-bit pools timed (Triton kernel and XLA path), in each format jax has.
SHAPES_8BIT = [(16, 32768), (64, 8192), (1, 32768)]
TINY_SHAPES_8BIT = [(2, 64)]
FORMATS_8BIT = tuple(name for name in ("int8", "fp8") if name in FORMATS)
TUNE_SHAPES = [(1, 32768), (64, 4096)]


@dataclasses.dataclass
class Settings:
    interpret: bool
    tiny: bool
    deadline: float  # time.monotonic() after which no new shape or tuning point starts
    timing: bool = True
    only: str | None = None  # run just this check case

    @property
    def model(self) -> Model:
        return TINY if self.tiny else LLAMA3_8B

    @property
    def checks(self) -> list[Case]:
        cases = TINY_CHECKS if self.tiny else CHECKS
        return [c for c in cases if self.only in (None, c.name)
                and (c.dtype not in ("int8", "fp8") or c.dtype in FORMATS_8BIT)]

    @property
    def shapes(self):
        """(batch, context) checked at random lengths, then timed at full lengths."""
        return [] if self.only else TINY_SHAPES if self.tiny else SHAPES

    @property
    def shapes_8bit(self):
        """(batch, context, format) timed on 8-bit pools."""
        if self.only:
            return []
        return [(b, c, f) for b, c in (TINY_SHAPES_8BIT if self.tiny else SHAPES_8BIT)
                for f in FORMATS_8BIT]

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- inputs


@dataclasses.dataclass
class Paged:
    """R input sets over one pool: q ``[R, B, Hq, D]``, k, v ``[Hkv, P, S, D]``, tables
    ``int32[R, B, W]`` (disjoint pages per set), lengths ``int32[B]``; 8-bit pages with
    k_scale, v_scale ``[Hkv, P, S]``."""

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


def poison(x, pages, offsets=None):
    """x ``[Hkv, P, S(, D)]`` with the given pages (and offsets) overwritten: NaN where
    the dtype has it, the largest code for int8 (no NaN there; its scale carries the NaN)."""
    value = jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).max
    index = (slice(None), pages) if offsets is None else (slice(None), pages, offsets)
    return x.at[index].set(jnp.asarray(value, x.dtype))


def make_paged(model: Model, batch: int, context: int, dtype, *, sets=1, q_scale=1.0,
               lengths=None, seed=0, q_tokens=None) -> Paged:
    """A random pool holding ``sets`` disjoint copies of a batch's pages (page 0, the null
    page, is NaN). Set 0's first row takes the pool's last pages, so a check reaches the
    highest offsets. With ``lengths``, every slot past a length is NaN and table entries
    past the last used page point at the null page. ``dtype`` "int8" / "fp8": the pool
    quantized as the cache writes it, NaN scales where the float pool has NaN, bfloat16
    queries. ``q_tokens``: query tokens per set (default ``batch``)."""
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
    shape = (model.num_kv_heads, num_pages, page_size, model.head_dim)

    @functools.partial(jax.jit, static_argnums=(1,))
    def pool(key, dtype):
        x = jax.random.normal(key, shape, jnp.float32)
        if fmt is None:
            return (poison(x.astype(dtype), 0),)
        codes, scales = quantize(x, fmt)
        return poison(codes, 0), poison(scales, 0)

    (k, *k_scale), (v, *v_scale) = pool(kk, dtype), pool(kv, dtype)
    arrays = [k, v, *k_scale, *v_scale]
    if lengths is None:
        lengths = np.full((batch,), context, np.int32)
    else:
        lengths = np.asarray(lengths, np.int32)
        arrays, tables = _poison_tails(arrays, tables, lengths, page_size)
    q_shape = (sets, batch if q_tokens is None else q_tokens, model.num_q_heads,
               model.head_dim)
    q = q_scale * jax.random.normal(kq, q_shape, jnp.float32)
    return Paged(q.astype(dtype), *arrays[:2], jnp.asarray(tables), jnp.asarray(lengths),
                 *arrays[2:])


def _poison_tails(arrays, tables, lengths, page_size):
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
        poisoned = jax.jit(poison, donate_argnums=0)
        arrays = [poisoned(a, jnp.asarray(pages), jnp.asarray(offsets)) for a in arrays]
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


def reference_tokens(inputs: Paged, tokens, model: Model) -> np.ndarray:
    """float64 attention on the host of set 0's query tokens ``(q index, row, position)``,
    each over its row's keys ``0..position``: ``[len(tokens), Hq, D]``."""
    group = model.num_q_heads // model.num_kv_heads
    out = []
    for index, row, position in tokens:
        visible = position + 1
        pages = inputs.tables[0, row, :-(-visible // model.page_size)]
        k = pool64(inputs.k, inputs.k_scale, pages)
        v = pool64(inputs.v, inputs.v_scale, pages)
        k = k.reshape(model.num_kv_heads, -1, model.head_dim)[:, :visible]
        v = v.reshape(model.num_kv_heads, -1, model.head_dim)[:, :visible]
        q = np.asarray(inputs.q[0, index].astype(jnp.float32), np.float64)
        q = q.reshape(model.num_kv_heads, group, model.head_dim)
        logits = np.einsum("hgd,hld->hgl", q, k) * model.head_dim ** -0.5
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        o = np.einsum("hgl,hld->hgd", p, v) / p.sum(axis=-1, keepdims=True)
        out.append(o.reshape(model.num_q_heads, model.head_dim))
    return np.stack(out)


def run_check(case: Case, settings: Settings, seed: int) -> dict:
    """One kernel on one case against the float64 reference."""
    model = settings.model
    rng = np.random.default_rng(seed)
    lengths = check_lengths(case.batch, case.context, model.page_size, rng)
    if case.chunk > 1:  # every row holds a whole chunk, still ending mid-page
        lengths = np.where(lengths < case.chunk, lengths + case.chunk, lengths)
        lengths[lengths % model.page_size == 0] -= 1
    inputs = make_paged(model, case.batch, case.context, case.dtype, q_scale=case.q_scale,
                        lengths=lengths, seed=seed, q_tokens=case.batch * case.chunk)
    rows = list(range(min(CHECK_ROWS, case.batch)))
    if case.kernel == "mosaic":
        q_seq = np.repeat(np.arange(case.batch, dtype=np.int32), case.chunk)
        q_pos = (np.repeat(lengths, case.chunk) - case.chunk
                 + np.tile(np.arange(case.chunk, dtype=np.int32), case.batch))
        out = ra.paged_attention_tokens(
            inputs.q[0], inputs.k, inputs.v, inputs.tables[0], inputs.lengths,
            jnp.asarray(q_seq), jnp.asarray(q_pos), interpret=settings.interpret)
        # The first and last tokens of each checked row's chunk (up to 4 each).
        ends = sorted(set(range(min(4, case.chunk))) | set(range(max(case.chunk - 4, 0),
                                                                   case.chunk)))
        groups = [[(r * case.chunk + i, r, int(q_pos[r * case.chunk + i])) for i in ends]
                  for r in rows]
    else:
        out = pd.paged_decode(inputs.q[0], inputs.k, inputs.v, inputs.tables[0],
                              inputs.lengths, num_splits=case.num_splits,
                              interpret=settings.interpret, **inputs.scales)
        groups = [[(r, r, int(lengths[r]) - 1)] for r in rows]
    out = np.asarray(out.astype(jnp.float32), np.float64)
    errors = []
    for tokens in groups:
        expected = reference_tokens(inputs, tokens, model)
        got = out[[index for index, _, _ in tokens]]
        errors.append(float(np.linalg.norm(got - expected) / np.linalg.norm(expected)))
    pool_bytes = inputs.k.shape[0] * inputs.k.shape[1] * inputs.k.shape[2] * \
        inputs.kv_bytes_per_token
    bound = case.bound
    nan = bool(np.isnan(out).any())
    return dict(case=case.name, kernel=case.kernel, batch=case.batch, context=case.context,
                dtype=case.dtype, chunk=case.chunk, num_splits=case.num_splits,
                q_scale=case.q_scale, lengths=lengths[:len(rows)].tolist(),
                pool_bytes=pool_bytes, rel_errors=errors, bound=bound, nan=nan,
                ok=not nan and all(e <= bound for e in errors))


# ---------------------------------------------------------------- timing


def seconds_per_step(step, shared, sets, *, iters: int, repeats: int) -> float:
    """Median seconds of one ``step(*shared, *inputs)``: ``iters`` steps run inside one
    jitted loop, step i on ``sets[i % len(sets)]``; the loop's output depends on every
    step. Arrays are arguments of the jit, never closed-over constants."""
    count = len(sets)

    @jax.jit
    def loop(shared, sets):
        def body(i, total):
            branches = [lambda s=s: jnp.sum(step(*shared, *s).astype(jnp.float32))
                        for s in sets]
            return total + lax.switch(i % count, branches)
        return lax.fori_loop(0, iters, body, jnp.float32(0))

    with lowering.triton_deprecation_silenced():
        jax.block_until_ready(loop(shared, sets))  # compile + warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(loop(shared, sets))
            times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def rotation(kv_bytes: int, settings: Settings) -> tuple[int, int, int]:
    """(input sets, steps per loop, repeats): sets overflow the L2 4x; the loop reads
    ~20 GB; the tiny dry run does the least that still exercises the code."""
    if settings.tiny:
        return 2, 2, 1
    sets = min(MAX_INPUT_SETS, max(1, math.ceil(4 * L2_BYTES / kv_bytes)))
    steps = max(sets, min(2000, math.ceil(20e9 / kv_bytes)))
    return sets, -(-steps // sets) * sets, 5


def read_bandwidth(settings: Settings) -> float:
    """Bytes/s of a read-only jitted reduction over 4 GiB (1 MiB on the dry run)."""
    size = (2**20 if settings.tiny else 4 * 2**30) // 2
    x = jax.random.normal(jax.random.key(0), (size,), jnp.bfloat16)
    iters = 2 if settings.tiny else 20
    seconds = seconds_per_step(lambda a: jnp.sum(a, dtype=jnp.float32), (), [(x,)],
                               iters=iters,
                               repeats=1 if settings.tiny else 5)
    return x.size * x.dtype.itemsize / seconds


def time_impls(batch: int, context: int, settings: Settings, dtype="bfloat16") -> dict:
    """Seconds per decode step of each implementation at full lengths, same inputs;
    ``dtype`` "int8" / "fp8" times 8-bit pools (Triton kernel and XLA path only)."""
    model = settings.model
    quantized = dtype in FORMATS
    kv_bytes = batch * context * model.num_kv_heads * 2 * (
        model.head_dim + 2 if quantized else model.head_dim * jnp.dtype(dtype).itemsize)
    count, iters, repeats = rotation(kv_bytes, settings)
    inputs = make_paged(model, batch, context, dtype, sets=count)
    paged_sets = [(inputs.q[r], inputs.tables[r]) for r in range(count)]
    row = dict(kv_bytes=kv_bytes, input_sets=count, steps=iters)
    interpret = settings.interpret
    shared = (inputs.k, inputs.v, inputs.lengths, inputs.scales)

    def ours(k, v, lengths, scales, q, tables):
        return pd.paged_decode(q, k, v, tables, lengths, interpret=interpret, **scales)

    def xla(k, v, lengths, scales, q, tables):
        return xla_attention.paged_decode(q, k, v, tables, lengths, **scales)

    def jax_pallas(k, v, lengths, scales, q, tables):
        from jax.experimental.pallas.ops.gpu import paged_attention as peer
        return peer.paged_attention(q, k, v, tables, lengths, interpret=interpret,
                                    **jax_peer_options(tables.shape[1]))

    impls = dict(ours=ours, xla=xla)
    if not interpret and not quantized:  # far too slow interpreted; the GPU run times it
        impls["jax_pallas"] = jax_pallas
    for name, fn in impls.items():
        attempt(row, f"{name}_s", seconds_per_step, fn, shared, paged_sets, iters=iters,
                repeats=repeats)
    del inputs, paged_sets, shared
    if not interpret and not quantized:
        attempt(row, "cudnn_s", time_cudnn, model, batch, context, dtype, count, iters,
                repeats)
    return row


def time_cudnn(model, batch, context, dtype, count, iters, repeats) -> float:
    """cuDNN dense decode over contiguous K/V ``[B, T, Hkv, D]``, the dense baseline."""
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

    return seconds_per_step(dense, (lengths,), sets, iters=iters, repeats=repeats)


def in_jit_seconds(settings: Settings):
    """``seconds(fn, *args)`` for ``gpu_mosaic``: the in-jit loop above on one input set
    (its shapes read at least 64 MiB of K/V, over the L2), short on the dry run."""
    iters, repeats = (2, 1) if settings.tiny else (20, 5)

    def seconds(fn, *args):
        return seconds_per_step(fn, args, [()], iters=iters, repeats=repeats)
    return seconds


def time_mosaic(settings: Settings) -> list[dict]:
    """``gpu_mosaic.run`` (Mosaic beside Triton, XLA and JAX's kernel; decode and prefill
    chunks) with this suite's timer, budget and model."""
    if settings.tiny:
        model = settings.model
        shape = gpu_mosaic.Shape(model.num_q_heads, model.num_kv_heads, model.head_dim,
                                 model.page_size)
        options = dict(contexts=(64,), chunks=(32,), batch=2, shape=shape, tiny=True,
                       decode_impls=("mosaic", "pallas", "xla"))
    else:
        options = {}
    return gpu_mosaic.run(interpret=settings.interpret, seconds=in_jit_seconds(settings),
                          time_left=settings.time_left, **options)


def jax_peer_options(width: int) -> dict:
    """Options JAX's paged_attention accepts: k_splits divides the table width and
    pages_per_compute_block divides the pages per split."""
    k_splits = math.gcd(16, width)
    return dict(k_splits=k_splits, pages_per_compute_block=math.gcd(8, width // k_splits))


def attempt(row: dict, key: str, fn, *args, **kwargs):
    """Run one measurement; record its error instead of raising."""
    try:
        row[key] = fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - one failure must not lose the rest
        row[key] = None
        row.setdefault("errors", {})[key] = f"{type(error).__name__}: {error}"[:400]
        log(f"  {key} failed: {row['errors'][key]}")
        traceback.print_exc(limit=3)


def autotune(batch: int, context: int, settings: Settings) -> dict:
    """pages_per_block x num_warps, then num_stages and (batch 1) num_splits around the
    best, timed the same way as the shapes."""
    model = settings.model
    kv_bytes = 2 * batch * context * model.num_kv_heads * model.head_dim * 2
    count, iters, repeats = rotation(kv_bytes, settings)
    inputs = make_paged(model, batch, context, jnp.bfloat16, sets=count)
    sets = [(inputs.q[r], inputs.tables[r]) for r in range(count)]
    points = []

    def measure(**tuning):
        if settings.time_left() < 0:
            return
        def step(k, v, lengths, q, tables):
            return pd.paged_decode(q, k, v, tables, lengths, interpret=settings.interpret,
                                   **tuning)
        point = dict(tuning)
        attempt(point, "seconds", seconds_per_step, step, (inputs.k, inputs.v, inputs.lengths),
                sets, iters=iters, repeats=repeats)
        log(f"  tune {batch}x{context} {tuning}: {fmt_us(point['seconds'])}")
        points.append(point)

    for ppb in (1, 2, 4, 8):
        for num_warps in (2, 4, 8):
            measure(pages_per_block=ppb, num_warps=num_warps)
    timed = [p for p in points if p.get("seconds")]
    best = dict(min(timed, key=lambda p: p["seconds"])) if timed else {}
    if best:
        base = dict(pages_per_block=best["pages_per_block"], num_warps=best["num_warps"])
        for stages in (1, 3):
            measure(num_stages=stages, **base)
        if batch == 1:
            for splits in (33, 66, 132, 264):
                measure(num_splits=splits, **base)
        best = dict(min((p for p in points if p.get("seconds")), key=lambda p: p["seconds"]))
    return dict(batch=batch, context=context, points=points, best=best)


# ---------------------------------------------------------------- report


def fmt_us(seconds) -> str:
    return "-" if not seconds else f"{seconds * 1e6:.1f}us"


def markdown(report: dict) -> str:
    read_bw = report.get("read_bytes_per_s")
    lines = [f"# jpaged GPU check ({report['device']}, jax {report['jax']})", "",
             f"Verdict: **{'PASS' if report['ok'] else 'FAIL'}**"
             + (" (interpret-mode dry run: no timing is meaningful)"
                if report["interpret"] else ""), "",
             f"Read bandwidth (jitted reduction): "
             f"{(read_bw or 0) / 1e9:.0f} GB/s.", "",
             "## Checks (relative error against float64)", "",
             "| case | kernel | batch | context | chunk | dtype | splits | q scale | pool GiB | "
             "max rel err | bound | NaN | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["checks"]:
        err = max(c["rel_errors"]) if c.get("rel_errors") else None
        lines.append(
            f"| {c['case']} | {c.get('kernel', 'triton')} | {c['batch']} | {c['context']} | "
            f"{c.get('chunk', 1)} | {c['dtype']} | "
            f"{c.get('num_splits') or 'auto'} | {c.get('q_scale')} | "
            f"{c.get('pool_bytes', 0) / 2**30:.2f} | "
            f"{'-' if err is None else f'{err:.1e}'} | {c.get('bound')} | {c.get('nan')} | "
            f"{'ok' if c.get('ok') else 'FAIL ' + c.get('error', '')} |")
    lines += ["", "## Decode step time (full lengths; fraction of read bandwidth)", "",
              "| batch | context | pages | KV MiB | sets x steps | ours | of read | xla | "
              "of read | jax pallas | of read | cudnn dense | of read |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        cells = []
        for impl in ("ours", "xla", "jax_pallas", "cudnn"):
            seconds = r.get(f"{impl}_s")
            fraction = (r["kv_bytes"] / seconds / read_bw) if seconds and read_bw else None
            cells += [fmt_us(seconds), "-" if fraction is None else f"{fraction:.2f}"]
        lines.append(f"| {r['batch']} | {r['context']} | {r.get('dtype', 'bfloat16')} | "
                     f"{r['kv_bytes'] / 2**20:.0f} | "
                     f"{r.get('input_sets')} x {r.get('steps')} | " + " | ".join(cells) + " |")
    for shape in report["skipped"]:
        lines.append(f"| {shape[0]} | {shape[1]} | {shape[2] if len(shape) > 2 else ''} | "
                     f"skipped: over the time budget |")
    if report.get("mosaic"):
        lines += ["", "## Mosaic GPU kernel beside its peers (decode: fraction of copy "
                  "bandwidth; prefill: of the bf16 matmul rate)", "",
                  f"Mosaic rows within {MOSAIC_ERROR_BOUND} of the reference: "
                  f"{'yes' if report.get('mosaic_ok') else 'NO'}.", "",
                  gpu_mosaic.markdown(report["mosaic"])]
    elif report.get("errors", {}).get("mosaic"):
        lines += ["", f"Mosaic timing failed: {report['errors']['mosaic']}"]
    for tune in report["autotune"]:
        lines += ["", f"Autotune {tune['batch']} x {tune['context']}: best {tune['best']}"]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))


def check_case(case: Case, seed: int, report: dict, settings: Settings, out_dir: Path):
    try:
        result = run_check(case, settings, seed)
    except Exception as error:  # noqa: BLE001 - a crash is a failed check, not a stop
        traceback.print_exc(limit=5)
        result = dict(case=case.name, batch=case.batch, context=case.context,
                      dtype=case.dtype, ok=False, error=f"{type(error).__name__}: {error}"[:400])
    report["checks"].append(result)
    log(f"check {case.name}: {'ok' if result['ok'] else 'FAIL'} "
        f"{result.get('rel_errors', result.get('error'))}")
    write(report, out_dir)


def run(settings: Settings, out_dir: Path, tune: bool) -> dict:
    device = jax.devices()[0]
    report = dict(device=getattr(device, "device_kind", str(device)), jax=jax.__version__,
                  interpret=settings.interpret, tiny=settings.tiny, ok=False, checks=[],
                  timings=[], skipped=[], autotune=[], mosaic=None)
    log(f"device {report['device']}, jax {jax.__version__}, writing to {out_dir}")
    for seed, case in enumerate(settings.checks):
        check_case(case, seed, report, settings, out_dir)
    if settings.timing:
        attempt(report, "read_bytes_per_s", read_bandwidth, settings)
    for seed, (batch, context) in enumerate(settings.shapes, start=len(settings.checks)):
        if settings.time_left() < 0:
            report["skipped"].append((batch, context))
            continue
        check_case(Case(f"{batch}x{context}", batch, context), seed, report, settings,
                   out_dir)
        if settings.timing:
            row = dict(batch=batch, context=context)
            row.update(time_impls(batch, context, settings))
            report["timings"].append(row)
            log(f"time {batch}x{context}: " + ", ".join(
                f"{impl} {fmt_us(row.get(f'{impl}_s'))}"
                for impl in ("ours", "xla", "jax_pallas", "cudnn")))
            write(report, out_dir)
    for batch, context, fmt in settings.shapes_8bit if settings.timing else []:
        if settings.time_left() < 0:
            report["skipped"].append((batch, context, fmt))
            continue
        row = dict(batch=batch, context=context, dtype=fmt)
        row.update(time_impls(batch, context, settings, fmt))
        report["timings"].append(row)
        log(f"time {fmt} {batch}x{context}: ours {fmt_us(row.get('ours_s'))}, "
            f"xla {fmt_us(row.get('xla_s'))}")
        write(report, out_dir)
    if settings.timing and not settings.only:
        attempt(report, "mosaic", time_mosaic, settings)
        write(report, out_dir)
    if settings.timing and tune and not settings.interpret:
        for batch, context in TUNE_SHAPES:
            if settings.time_left() < 0:
                break
            report["autotune"].append(autotune(batch, context, settings))
            write(report, out_dir)
    mosaic_rows = [r for r in report["mosaic"] or [] if r.get("impl") == "mosaic"]
    report["mosaic_ok"] = all(r.get("relative_error", math.inf) <= MOSAIC_ERROR_BOUND
                              for r in mosaic_rows)
    report["ok"] = (bool(report["checks"]) and all(c["ok"] for c in report["checks"])
                    and report["mosaic_ok"])
    write(report, out_dir)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="run kernels in interpret mode")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    parser.add_argument("--budget-s", type=float, default=400,
                        help="start no timed shape or tuning point after this many seconds")
    parser.add_argument("--no-tune", action="store_true", help="skip the autotune sweep")
    parser.add_argument("--checks-only", action="store_true", help="no timing")
    parser.add_argument("--case", help="run only this check case")
    args = parser.parse_args(argv)
    settings = Settings(args.interpret, args.tiny, time.monotonic() + args.budget_s,
                        timing=not (args.checks_only or args.case), only=args.case)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else (
        Path(__file__).parent / "results")
    report = run(settings, out_dir, tune=not args.no_tune)
    log(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
