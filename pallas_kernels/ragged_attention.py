"""Mosaic GPU ragged paged attention: one kernel for decode and prefill chunks.

Hardware: written for Hopper (sm_90: H100, H200). It uses TMA copies, mbarriers and
wgmma, which exist only on sm_90 and newer; Mosaic GPU compiles it for sm_90a. Blackwell
(sm_100) runs wgmma code only where Mosaic GPU still emits it for that target, which
nobody here has checked. Off a GPU it runs in Mosaic GPU's interpret mode (CPU), which
simulates the TMA copies and barriers.

Input: a flat batch of query tokens ``q [T, Hq, D]``; token t belongs to table row
``q_seq[t]`` and sits at absolute position ``q_pos[t]``. Row r has block table
``block_tables[r]`` and context length ``kv_lens[r]`` (this step's K/V already written).
A token sees key j when ``j < kv_lens[r]``, ``j <= q_pos[t]`` and, with a window w,
``j > q_pos[t] - w``: causal within a chunk that may start mid-page after cached pages;
a decode is a chunk of one token. ``ragged_paged_attention`` takes the TPU-style ragged
form (``cu_q_lens``: each row's tokens end at its context length) and builds this one.

Work split. The wrapper (plain jnp) cuts the tokens into *blocks*: up to
``64 // group`` consecutive tokens of one row, times the ``group = Hq // Hkv`` query heads
of one kv head, is one 64-row tile (row ``i * group + g`` = token i, head g). One
program per (kv head, block) walks the pages of its row that any of its tokens can see,
``pages_per_block`` pages (``block_kv`` keys) per step.

Split-K (flash-decoding). Decode at a small batch has few blocks: 8 kv heads x 1 row is
8 programs for 132 SMs. A third grid axis cuts each block's key steps into ``num_splits``
runs of ``ceil(steps / splits)`` consecutive steps; each program writes a float32 output
normalized over its run and the run's log-sum-exp (``-inf`` for an empty run), and
``splits.merge_splits`` combines them (plain jnp, ``splits x 64 x (D + 1)`` floats per
block and kv head). ``plan_num_splits`` picks the count: enough programs for
``TARGET_PROGRAMS`` resident slots, at least ``MIN_STEPS_PER_SPLIT`` steps a split, from
the concrete lengths when the call is eager and from the table width inside jit. With
one split the program writes the final output in q's dtype, as before.

Memory path. The program's query tile arrives by TMA. Each K and V page arrives by its own
TMA copy (a ``[page_size, head_dim]`` box at the page id read from the block table) into a
ring of ``num_stages`` shared-memory slots, a step's copies arriving on one K and one V
mbarrier of their slot (``page_ring``); the ring is
refilled with step ``i + num_stages`` as soon as step i's matmuls have finished reading
slot ``i % num_stages``, so the copies of later pages overlap the math of earlier ones;
a refill's table entries were loaded a step before it, so its copies start at once.
Slots past a row's length (the tail of its last page, padded table entries pointing at the
null page) may hold NaN from a recycled page: their logits are masked to -inf and, in the
one step that crosses the length, their V rows are zeroed in shared memory before the
P @ V matmul (0 * NaN would otherwise leak).

Matmul arrangement: wgmma with the query tile as the M side (64 rows = tokens x heads of
the group), ``S = Q K^T`` (N = block_kv keys, K = head_dim) and ``O += P V`` (N =
head_dim, K = block_kv), float32 accumulators in registers, online softmax statistics in
float32. Why not keys as M: ``S^T = K Q^T`` would hold P^T in registers with keys along
the rows, but ``P V`` needs P with queries along the rows as its A operand (or V^T as a
transposed A), so P would make a transposed round trip through shared memory every step.
The price of queries as M is paid by decode: a decode block has ``group`` useful rows of
64, the other ``64 - group`` are padding. Decode is bandwidth-bound (below), so padded
MMA rows cost issue slots, not bytes; prefill chunks fill the rows.

8-bit pages (int8 or float8_e4m3fn codes with a scale per token and kv head, see
``quantization``): the codes travel through the ring as they are (half the bytes of
bf16), each step widens them to q's dtype in a 16-bit shared-memory tile (exact: every
int8 and e4m3 value is a bf16 and an f16 value; e4m3 -> bf16 goes through float32, which
sm_90's ptxas needs), and the scales are applied where they cost one multiply per logit
instead of one per element: ``S = Q (c_K s_K)^T`` scales column j of S by ``s_K[j]``, and
``P (c_V s_V) = (P s_V) c_V`` scales column j of P by ``s_V[j]`` (0 past the length,
where a stale scale may be NaN). The scales reach shared memory by one TMA copy of
``block_kv`` values a step from ``row_scales``, a gather of each row's scales in key
order done in the wrapper: a TMA copy moves multiples of 128 bytes, one page's scales
are ``2 S`` bytes.

What it takes on a GPU (``check_config``): bf16 or f16 queries over pages of the same
dtype or 8-bit pages (float32 runs in interpret mode only), head_dim 32, 64, 128 or 256,
pages of 8+ tokens (a power of two), a GQA group dividing 64, 64-256 keys per step, at
most 32 ring slots (a K and a V barrier each; Mosaic GPU's limit per barrier array), and
the buffers within 227 KiB of shared memory (one ring slot instead of two where two
do not fit). Compiled for sm_90a (``benchmarks/mosaic_resources.py``) it holds 246-255
registers per thread at head_dim 128 (2 CTAs per SM) and spills at head_dim 256 and at
256 keys a step: ``check_config`` refuses those on a GPU (``spills``); decode at head_dim
256 runs the decode tile (``mosaic_decode``, 211-224 registers, no spills).

Cost, for n visible keys, head_dim d, element size e bytes and group g. A decode token
(one block per kv head): K/V bytes ``2 n d e`` per kv head, useful FLOPs ``4 n d g``
(QK and PV, 2 per multiply-add), so ``2 g / e`` FLOP/byte (g in bf16: 4 for Llama-3-8B,
against an H200's ~200 FLOP/byte balance point): bandwidth-bound, and the ``64 - g``
padded rows the MMA also issues (``4 n d 64``) cost issue slots, not bytes. Llama-3-8B
(8 kv heads, d = 128, bf16): 4 KiB of K/V and 16 KFLOP useful per context token and
decode token. A prefill block of ``64 / g`` tokens reads each visible page once for all
its rows: ``2 n d e`` bytes per block, ``4 n d 64`` FLOPs, ``128 / e`` = 64 FLOP/byte in
bf16, so a chunk of C tokens re-reads its context ``C g / 64`` times and is still
bandwidth-heavy on Hopper (a second warpgroup or a 128-row tile would halve that).
Interpret mode: jax 0.10.2's interpreter has no wgmma with a register or transposed
operand, so there the two products are float32 ``dot_general``s of the same
shared-memory tiles; everything else (TMA, barriers, ring, masks) runs as compiled.

Shapes: q ``[T, Hq, D]``; pages ``[Hkv, P, S, D]`` or stacked ``[L, Hkv, P, S, D]`` with
``layer``; block_tables ``int32[B, W]``; kv_lens ``int32[B]``; q_seq, q_pos ``int32[T]``.
Output ``[T, Hq, D]`` in q's dtype, zeros for a token that sees no key. Matches
``jpaged.pallas_kernels.reference.paged_prefill_reference``.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpaged.pallas_kernels import online_softmax, page_ring
from jpaged.pallas_kernels.lowering import TARGET_NUM_SMS
from jpaged.pallas_kernels.quantization import FORMATS, is_quantized
from jpaged.pallas_kernels.splits import merge_splits

try:  # Mosaic GPU is optional: jpaged must import on a jax without it.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed jax
    pl = plgpu = None

BLOCK_ROWS = 64            # wgmma's M: one warpgroup's tile
TARGET_BLOCK_KV = 64       # keys per step when the page size allows
MAX_BLOCK_KV = 256         # wgmma's N limit for S = Q K^T
HEAD_DIMS = (32, 64, 128, 256)
# Compiled: 16-bit only. Mosaic GPU's float32 (tf32) wgmma takes no transposed operand
# (jax 0.10.2) and no A from registers, and S = Q K^T needs K transposed. Interpret mode
# also runs float32, so the kernel's logic is tested at float32 precision too.
DTYPES = (jnp.bfloat16, jnp.float16)
INTERPRET_DTYPES = DTYPES + (jnp.float32,)
DEFAULT_NUM_STAGES = 2
# Split-K aims at every resident program slot of an H100/H200: the default configuration
# compiles to ~255 registers x 128 threads, so two programs fit one SM's 64 K registers.
PROGRAMS_PER_SM = 2
TARGET_PROGRAMS = PROGRAMS_PER_SM * TARGET_NUM_SMS
MIN_STEPS_PER_SPLIT = 2
MAX_SPLITS = 64
# Hopper's per-block dynamic shared memory limit (227 KiB), less what Mosaic GPU adds
# beside the buffers (barriers and its own scratch: 2096 bytes seen when lowering a
# configuration with 7 buffers; 3 KiB kept).
SMEM_BUDGET = 227 * 1024 - 3 * 1024
# Mosaic GPU's limit on one barrier array ("Only up to 32 barriers per group"): the ring
# has one K and one V barrier per slot (its page copies all arrive on them), so this
# bounds num_stages, not the page copies in flight.
MAX_BARRIERS = 32
# Compiled for sm_90a from the CPU (benchmarks/mosaic_resources.py, jax 0.10.2), these
# configurations spill registers (255 per thread and local memory): every head_dim 256
# (572-624 bytes of spill stores at the default step) and 256 keys a step (head_dim 64:
# 136 bytes; 128: 1272-1336, compiled before the table entries were prefetched); the
# resource table compiles both sides of each edge. With a barrier per page copy, head_dim 128 at page 8
# spilled too (44 bytes); one barrier per ring slot brought it to 251 registers.
# check_config refuses them on a GPU; REFUSE_SPILLING = False lets the resource report
# compile them anyway.
REFUSE_SPILLING = True
SMEM_ALIGN = 1024          # Mosaic GPU aligns each swizzled buffer to 1 KiB


def spills(head_dim: int, block_kv: int) -> bool:
    """Whether the ragged kernel spills registers at ``block_kv`` keys a step, by its
    sm_90a compile (the S tile ``[64, block_kv]`` and O ``[64, head_dim]`` in float32
    registers)."""
    return head_dim >= 256 or block_kv >= 256


def default_pages_per_block(page_size: int) -> int:
    return max(1, TARGET_BLOCK_KV // page_size)


def compute_dtype(dtype, q_dtype=None):
    """The dtype wgmma multiplies in: the pages' own, or q's (bfloat16 by default) over
    8-bit pages, whose codes are widened to it in shared memory."""
    if is_quantized(dtype):
        return jnp.dtype(jnp.bfloat16 if q_dtype is None else q_dtype)
    return jnp.dtype(dtype)


def smem_bytes(head_dim, page_size, dtype, pages_per_block, num_stages, num_splits=1,
               q_dtype=None) -> int:
    """Shared memory of one program, each buffer rounded up to Mosaic GPU's 1 KiB: the
    query/output tile, K and V rings, row positions; over 8-bit pages the scale rings and
    the two 16-bit tiles the codes are widened into; with several splits the float32
    partial output tile and its log-sum-exp."""
    e = jnp.dtype(dtype).itemsize
    e_q = compute_dtype(dtype, q_dtype).itemsize
    block_kv = pages_per_block * page_size
    ring = num_stages * block_kv * head_dim * e
    buffers = [BLOCK_ROWS * head_dim * e_q, ring, ring, BLOCK_ROWS * 4]
    if is_quantized(dtype):
        scale_ring = num_stages * block_kv * 4    # float32 scales at most
        buffers += [scale_ring, scale_ring, block_kv * head_dim * e_q,
                    block_kv * head_dim * e_q]
    if num_splits > 1:
        buffers += [BLOCK_ROWS * head_dim * 4, BLOCK_ROWS * 4]
    return sum(-(-size // SMEM_ALIGN) * SMEM_ALIGN for size in buffers)


def default_num_stages(head_dim, page_size, dtype, pages_per_block, num_splits=1,
                       q_dtype=None) -> int:
    """Two ring slots (copies overlap the math) where they fit shared memory, else one."""
    fits = smem_bytes(head_dim, page_size, dtype, pages_per_block, DEFAULT_NUM_STAGES,
                      num_splits, q_dtype)
    return DEFAULT_NUM_STAGES if fits <= SMEM_BUDGET else 1


def check_config(num_q_heads, num_kv_heads, head_dim, page_size, dtype,
                 pages_per_block=None, num_stages=None, *, num_splits=1, q_dtype=None,
                 interpret=False, refuse_spilling=True) -> None:
    """Raise ValueError naming the constraint if the kernel cannot take this configuration.

    wgmma needs 64 rows (so the GQA group must divide 64), N a multiple of 8 up to 256 and
    the V tile past a row's length is zeroed in the 64-row wgmma register layout, so a step
    takes 64 to 256 keys; the query tile and the ring must fit Hopper's 227 KiB of shared
    memory.
    """
    if plgpu is None:
        raise ValueError("impl='mosaic' needs jax.experimental.pallas.mosaic_gpu, which this "
                         "jax does not provide")
    allowed = INTERPRET_DTYPES if interpret else DTYPES
    where = "in interpret mode" if interpret else "on a GPU"
    if not is_quantized(dtype) and jnp.dtype(dtype) not in [jnp.dtype(d) for d in allowed]:
        raise ValueError(f"dtype={jnp.dtype(dtype)} must be one of "
                         f"{[jnp.dtype(d).name for d in allowed]} or 8-bit "
                         f"{sorted(FORMATS)} for the Mosaic kernel {where} (float32 needs "
                         f"a transposed tf32 wgmma operand, which Mosaic GPU lacks)")
    if is_quantized(dtype) and compute_dtype(dtype, q_dtype) not in [
            jnp.dtype(d) for d in allowed]:
        raise ValueError(f"q dtype {jnp.dtype(q_dtype)} over {jnp.dtype(dtype)} pages must "
                         f"be one of {[jnp.dtype(d).name for d in allowed]} for the Mosaic "
                         f"kernel {where} (the codes are widened to q's dtype)")
    if not (isinstance(num_kv_heads, numbers.Integral) and num_kv_heads > 0
            and num_q_heads % num_kv_heads == 0):
        raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    group = num_q_heads // num_kv_heads
    if BLOCK_ROWS % group:
        raise ValueError(f"GQA group {group} (= {num_q_heads} / {num_kv_heads} heads) must "
                         f"divide the {BLOCK_ROWS}-row wgmma tile of the Mosaic kernel")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} must be one of {HEAD_DIMS} for the Mosaic "
                         f"kernel (the TMA swizzles and wgmma tilings it lowers for)")
    if not (isinstance(page_size, numbers.Integral) and page_size >= 8
            and page_size & (page_size - 1) == 0):
        raise ValueError(f"page_size={page_size} must be a power of two >= 8 for the Mosaic "
                         f"kernel (TMA boxes and wgmma tiles of 8 rows)")
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size)
    if not (isinstance(pages_per_block, numbers.Integral) and pages_per_block > 0):
        raise ValueError(f"pages_per_block={pages_per_block!r} must be a positive integer")
    block_kv = pages_per_block * page_size
    if not BLOCK_ROWS <= block_kv <= MAX_BLOCK_KV or block_kv & (block_kv - 1):
        raise ValueError(f"pages_per_block={pages_per_block} * page_size={page_size} = "
                         f"{block_kv} keys per step must be a power of two in "
                         f"[{BLOCK_ROWS}, {MAX_BLOCK_KV}] (wgmma N; the V tile is masked in "
                         f"the {BLOCK_ROWS}-row wgmma register layout)")
    if not (isinstance(num_splits, numbers.Integral) and num_splits >= 1):
        raise ValueError(f"num_splits={num_splits!r} must be a positive integer")
    if num_stages is None:
        num_stages = default_num_stages(head_dim, page_size, dtype, pages_per_block,
                                        num_splits, q_dtype)
    if not (isinstance(num_stages, numbers.Integral) and num_stages >= 1):
        raise ValueError(f"num_stages={num_stages!r} must be a positive integer")
    if (not interpret and refuse_spilling and REFUSE_SPILLING
            and spills(head_dim, block_kv)):
        raise ValueError(f"head_dim={head_dim} with {block_kv} keys per step: the "
                         f"Mosaic ragged kernel compiled for sm_90a spills registers (255 "
                         f"per thread; benchmarks/results/mosaic_resources.md): take fewer "
                         f"pages_per_block; at head_dim 256 decode runs the decode tile "
                         f"(mosaic_decode), prefill needs impl='xla'")
    check_barriers(num_stages)
    need = smem_bytes(head_dim, page_size, dtype, pages_per_block, num_stages, num_splits,
                      q_dtype)
    if need > SMEM_BUDGET:
        raise ValueError(f"head_dim={head_dim}, block_kv={block_kv}, num_stages={num_stages} "
                         f"in {jnp.dtype(dtype)} need {need} bytes of shared memory, over "
                         f"the {SMEM_BUDGET}-byte Hopper budget")


def check_barriers(num_stages: int) -> None:
    """Raise ValueError if the ring's barrier arrays (one barrier per slot) are over
    Mosaic GPU's limit per array."""
    if num_stages > MAX_BARRIERS:
        raise ValueError(f"num_stages={num_stages} ring slots, one K and one V barrier each: "
                         f"Mosaic GPU allows only up to {MAX_BARRIERS} barriers per group")


def _interpret_params(interpret=True):
    """Mosaic GPU's interpret mode (private in jax 0.10.2), or a clear error. ``interpret``
    may be an ``InterpretGPUParams`` already (e.g. with ``detect_races=True``)."""
    if not isinstance(interpret, bool):
        return interpret
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        raise ValueError(f"interpret=True needs Mosaic GPU's interpret mode "
                         f"(jax._src.pallas.mosaic_gpu.interpret.params), which failed to "
                         f"import on jax {jax.__version__}: {err}") from err
    return InterpretGPUParams()


def _wgmma_matmul(a, b_ref, transpose_b=False):
    """``a @ b`` (``a @ b.T`` with transpose_b) on the tensor cores, float32 result.

    a: a shared-memory ref or a register array ``[64, K]``; b_ref: shared memory ``[K, N]``
    (``[N, K]`` with transpose_b). Returns when the wgmma has finished reading both, so
    the caller may refill b's slot.
    """
    if transpose_b:
        b_ref = b_ref.transpose((1, 0))
    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
        return acc_ref[...]   # reading the accumulator waits for the wgmma
    return pl.run_scoped(scope, plgpu.ACC((a.shape[0], b_ref.shape[1]), jnp.float32))


def _interpreted_matmul(a, b_ref, transpose_b=False):
    """The same product for Mosaic GPU's interpret mode, whose wgmma (jax 0.10.2) takes
    neither a register operand nor a transposed ref: operands are read from shared memory
    and multiplied as float32-accumulated arrays."""
    a = a if isinstance(a, jax.Array) else a[...]
    b = b_ref[...]
    dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _attention_kernel(layer_ref, blk_seq_ref, blk_lo_ref, blk_hi_ref, row_pos_ref,
                      tables_ref, kv_lens_ref, q_ref, k_ref, v_ref, *refs,
                      num_kv_heads, page_size, pages_per_block, num_stages, num_splits,
                      quantized, sm_scale, soft_cap, sliding_window, dtype, interpret):
    # layer_ref: int32[1]; blk_*: int32[NB]; row_pos_ref: int32[NB, 64]
    # tables_ref: int32[B, W]; kv_lens_ref: int32[B]
    # q_ref: [Hkv, NB, 64, D] in dtype; k_ref, v_ref: [L * Hkv, P, S, D] (dtype, or 8-bit
    # codes when quantized, then refs start with the rows' scales in key order,
    # k_scale, v_scale [Hkv, B, W' * S] bfloat16, W' the width rounded up to whole steps). The output refs follow: o_ref [Hkv, NB, 64, D] in dtype
    # (one split), or float32 partials [Hkv, NB, splits, 64, D] and their log-sum-exp
    # [Hkv, NB, splits, 64].
    scale_refs, out_refs = (refs[:2], refs[2:]) if quantized else ((), refs)
    cast = functools.partial(page_ring.layout_cast, interpret=interpret)
    matmul = _interpreted_matmul if interpret else _wgmma_matmul
    head_dim = q_ref.shape[-1]
    block_kv = pages_per_block * page_size
    h = lax.axis_index("kv_head")
    b = lax.axis_index("block")
    split = lax.axis_index("split")
    pool_head = layer_ref[0] * num_kv_heads + h
    seq = blk_seq_ref[b]
    kv_len = kv_lens_ref[seq]
    kv_end = jnp.minimum(kv_len, blk_hi_ref[b] + 1)
    kv_start = (jnp.int32(0) if sliding_window is None
                else jnp.maximum(blk_lo_ref[b] - (sliding_window - 1), 0))
    block_first = kv_start // block_kv
    block_steps = jnp.maximum((kv_end + block_kv - 1) // block_kv - block_first, 0)
    first, num_steps = page_ring.split_run(block_first, block_steps, split, num_splits)

    def scoped(q_smem, pos_smem, q_barrier, *rest):
        ring_refs, partial_smem = (rest[:page_ring.num_scratch(quantized)],
                                   rest[page_ring.num_scratch(quantized):])
        ring = page_ring.PageRing(
            ring_refs, k_ref=k_ref, v_ref=v_ref, scale_refs=scale_refs, tables_ref=tables_ref,
            table_row=seq, kv_head=h, pool_head=pool_head, first_step=first,
            page_size=page_size, pages_per_block=pages_per_block, num_stages=num_stages,
            dtype=dtype, interpret=interpret)
        ahead = ring.prime(num_steps)
        plgpu.copy_gmem_to_smem(q_ref.at[h, b], q_smem, q_barrier.at[0])
        plgpu.copy_gmem_to_smem(row_pos_ref.at[b], pos_smem, q_barrier.at[1])
        plgpu.barrier_wait(q_barrier.at[0])
        plgpu.barrier_wait(q_barrier.at[1])
        layout = plgpu.Layout.WGMMA
        row_pos = cast(pos_smem[...], layout.reduce(1))
        row_pos = lax.broadcast_in_dim(row_pos, (BLOCK_ROWS, block_kv), [0])
        m_i = cast(jnp.full((BLOCK_ROWS,), -jnp.inf, jnp.float32), layout.reduce(1))
        l_i = cast(jnp.zeros((BLOCK_ROWS,), jnp.float32), layout.reduce(1))
        acc = cast(jnp.zeros((BLOCK_ROWS, head_dim), jnp.float32), layout)

        def body(step, carry):
            acc, m_i, l_i, ahead = carry
            _, probs, v_tile, m_new, l_i, acc = ring.attend(   # S = Q K^T [64, block_kv]
                step, lambda k_tile: matmul(q_smem, k_tile, transpose_b=True), m_i, l_i, acc,
                kv_len=kv_len, query_pos=row_pos, causal=True, sliding_window=sliding_window,
                sm_scale=sm_scale, soft_cap=soft_cap, key_axis=1)
            acc = acc + matmul(probs.astype(dtype), v_tile)
            ahead = ring.refill(step, num_steps, ahead)
            return acc, m_new, l_i, ahead

        acc, m_i, l_i, _ = lax.fori_loop(0, num_steps, body, (acc, m_i, l_i, ahead))
        out, lse = online_softmax.finish(acc, m_i, l_i, query_axis=0)
        if num_splits == 1:
            (o_ref,) = out_refs
            q_smem[...] = out.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[h, b])
        else:  # float32 partial output and its log-sum-exp (-inf: the split saw no key)
            o_ref, lse_ref = out_refs
            o_smem, lse_smem = partial_smem
            o_smem[...] = out
            lse_smem[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[h, b, split])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[h, b, split])
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((BLOCK_ROWS, head_dim), dtype,
                   transforms=page_ring.smem_transforms(head_dim, dtype)),
        plgpu.SMEM((BLOCK_ROWS,), jnp.int32),
        plgpu.Barrier(num_barriers=2),
        *page_ring.scratch(num_stages=num_stages, pages_per_block=pages_per_block,
                           page_size=page_size, head_dim=head_dim, page_dtype=k_ref.dtype,
                           dtype=dtype, scale_dtype=scale_refs[0].dtype if quantized else None),
    ]
    if num_splits > 1:
        scratch += [plgpu.SMEM((BLOCK_ROWS, head_dim), jnp.float32,
                               transforms=page_ring.smem_transforms(head_dim, jnp.float32)),
                    plgpu.SMEM((BLOCK_ROWS,), jnp.float32)]
    pl.run_scoped(scoped, *scratch)


def row_scales(scales, block_tables, layer, pages_per_block: int):
    """Each row's per-token scales in key order, for the kernel's one-box-a-step copies.

    scales: ``[L, Hkv, P, S]`` bfloat16; block_tables ``int32[B, W]``; layer: int32
    scalar. Returns ``[Hkv, B, W' * S]`` with W' = W rounded up to ``pages_per_block``
    (padding entries read the null page, masked in the kernel). Why a gather here: a TMA
    copy moves a multiple of 128 bytes, and one page's scales are ``2 S`` bytes (32 at
    page 16); this gather reads ``4 W S`` bytes per kv head and row, against the
    ``2 n D`` of codes the kernel reads for n visible keys (a few percent at D = 128 when
    the table is not much wider than the rows).
    """
    batch, width = block_tables.shape
    padded = -(-width // pages_per_block) * pages_per_block
    tables = jnp.pad(block_tables, ((0, 0), (0, padded - width)))
    rows = lax.dynamic_index_in_dim(scales, layer, 0, keepdims=False)[:, tables]
    return rows.reshape(scales.shape[1], batch, padded * scales.shape[-1])


def build_blocks(q_seq, q_pos, num_rows: int, tokens_per_block: int):
    """Cut a flat token batch into blocks of consecutive tokens of one row.

    q_seq, q_pos: ``int32[T]``. A block starts where the row changes or after
    ``tokens_per_block`` tokens. Returns (block of each token ``int32[T]``, its slot in the
    block ``int32[T]``, blocks' row / lowest / highest position ``int32[NB]``, per-slot
    positions ``int32[NB, tokens_per_block]`` (-1 for an empty slot), overflow ``bool[T]``).
    NB = ceil(T / tokens_per_block) + num_rows + 1 covers a batch whose rows each form one
    run of tokens (the engine's layout; padding tokens are one more run); a token beyond
    it is flagged in ``overflow``.
    """
    num_tokens = q_seq.shape[0]
    num_blocks = -(-num_tokens // tokens_per_block) + num_rows + 1
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    new_run = jnp.concatenate([jnp.ones((1,), bool), q_seq[1:] != q_seq[:-1]])
    run_start = lax.cummax(jnp.where(new_run, t, 0))
    offset = t - run_start
    new_block = new_run | (offset % tokens_per_block == 0)
    block = jnp.cumsum(new_block.astype(jnp.int32)) - 1
    slot = offset % tokens_per_block
    overflow = block >= num_blocks
    blk_seq = jnp.zeros(num_blocks, jnp.int32).at[block].set(q_seq, mode="drop")
    big = jnp.iinfo(jnp.int32).max
    blk_lo = jnp.full(num_blocks, big, jnp.int32).at[block].min(q_pos, mode="drop")
    blk_hi = jnp.full(num_blocks, -1, jnp.int32).at[block].max(q_pos, mode="drop")
    row_pos = jnp.full((num_blocks, tokens_per_block), -1, jnp.int32).at[block, slot].set(
        q_pos, mode="drop")
    blk_lo = jnp.minimum(blk_lo, blk_hi)   # an empty block: lo = hi = -1, sees nothing
    return block, slot, blk_seq, blk_lo, blk_hi, row_pos, overflow


def check_token_layout(q_seq, num_rows: int, group: int) -> None:
    """Raise ValueError if concrete ``q_seq`` (``int[T]``) needs more blocks than the
    kernel launches (its rows split into too many runs), naming the counts."""
    q_seq = np.asarray(q_seq)
    tokens_per_block = BLOCK_ROWS // group
    starts = np.flatnonzero(np.diff(q_seq, prepend=-1) != 0)
    run_lengths = np.diff(np.append(starts, len(q_seq)))
    needed = int(np.sum(-(-run_lengths // tokens_per_block)))
    available = -(-len(q_seq) // tokens_per_block) + num_rows + 1
    if needed > available:
        raise ValueError(f"q_seq splits into {len(starts)} runs of consecutive same-row tokens "
                         f"needing {needed} blocks of {tokens_per_block} tokens, more than the "
                         f"{available} the Mosaic kernel launches for {len(q_seq)} tokens and "
                         f"{num_rows} rows: put each row's tokens together")


def choose_num_splits(num_kv_heads: int, busy_blocks: int, max_steps: int) -> int:
    """Split-K factor: enough programs (kv heads x busy blocks x splits) to fill
    TARGET_PROGRAMS resident slots, each split keeping MIN_STEPS_PER_SPLIT key steps or
    more so the merge stays small beside the reads; at most MAX_SPLITS."""
    wanted = -(-TARGET_PROGRAMS // max(1, num_kv_heads * busy_blocks))
    return int(max(1, min(wanted, max_steps // MIN_STEPS_PER_SPLIT, MAX_SPLITS)))


def _concrete(x):
    """x as a numpy array when it is known on the host (not a tracer), else None."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def plan_num_splits(q_seq, kv_lens, *, num_kv_heads, group, width, page_size,
                    pages_per_block, head_dim=128, dtype=jnp.bfloat16, q_dtype=None,
                    check_partial_smem=True) -> int:
    """``choose_num_splits`` from what is known: the busy blocks (concrete q_seq: its
    runs cut in blocks; traced: ``min(T, ceil(T / tokens per block) + B)``) and the key
    steps of the longest row (concrete lengths: the longest length rounded up to a power
    of two of steps, so the compiled variants stay few; traced: the table width). One
    split where the float32 partial tile does not fit shared memory beside one ring slot
    (head_dim 256 with 128+ keys a step; ``check_partial_smem=False`` for a kernel that
    always writes partials)."""
    if check_partial_smem and smem_bytes(head_dim, page_size, dtype, pages_per_block, 1, 2,
                                         q_dtype) > SMEM_BUDGET:
        return 1
    tokens_per_block = BLOCK_ROWS // group
    block_kv = pages_per_block * page_size
    rows, num_tokens = kv_lens.shape[0], q_seq.shape[0]
    seqs, lens = _concrete(q_seq), _concrete(kv_lens)
    if seqs is not None and num_tokens:
        starts = np.flatnonzero(np.diff(seqs, prepend=-1) != 0)
        runs = np.diff(np.append(starts, num_tokens))
        busy = int(np.sum(-(-runs // tokens_per_block)))
    else:
        busy = min(num_tokens, -(-num_tokens // tokens_per_block) + rows)
    table_steps = -(-width * page_size // block_kv)
    if lens is not None:
        longest = int(np.max(lens, initial=0))
        steps = min(table_steps, int(pl.next_power_of_2(max(1, -(-longest // block_kv)))))
    else:
        steps = table_steps
    return choose_num_splits(num_kv_heads, busy, steps)


def check_scales(k_pages, k_scale, v_scale) -> None:
    """Raise ValueError unless 8-bit pages come with both scales (16- or 32-bit floats of
    the pages' shape minus D) and float pages with none."""
    quantized = is_quantized(k_pages.dtype)
    if quantized != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError(f"{k_pages.dtype} pages need k_scale and v_scale exactly when they "
                         f"are 8-bit; got k_scale {'set' if k_scale is not None else 'None'}, "
                         f"v_scale {'set' if v_scale is not None else 'None'}")
    if quantized:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if (scale.shape != k_pages.shape[:-1]
                    or not jnp.issubdtype(scale.dtype, jnp.floating)
                    or jnp.dtype(scale.dtype).itemsize not in (2, 4)):
                raise ValueError(f"{name} must be a 16- or 32-bit float array of shape "
                                 f"{tuple(k_pages.shape[:-1])} (the pages' shape minus D), "
                                 f"got {scale.dtype}{list(scale.shape)}")


def paged_attention_tokens(q, k_pages, v_pages, block_tables, kv_lens, q_seq, q_pos, *,
                           layer=None, k_scale=None, v_scale=None, sm_scale=None,
                           soft_cap=None, sliding_window=None, pages_per_block=None,
                           num_stages=None, num_splits=None, interpret=False):
    """Attention of ragged query tokens over their rows' pages (shapes in the module doc).

    Tokens of one row should be consecutive in the batch (each run costs a block); a batch
    with more runs than ``ceil(T / (64 // group)) + B + 1`` blocks gives NaN for the
    tokens that do not fit rather than a silently wrong value. ``num_splits`` cuts each
    block's keys into that many runs merged afterwards (default ``plan_num_splits``).
    8-bit pages (int8, float8_e4m3fn) need ``k_scale``, ``v_scale``: bfloat16, the pages'
    shape minus D (``KVCache.k_scale``); q (bf16/f16) sets the dtype they are widened to.
    """
    num_kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
    check_scales(k_pages, k_scale, v_scale)
    if pages_per_block is None:
        pages_per_block = default_pages_per_block(page_size)
    if num_splits is None:
        num_splits = plan_num_splits(
            q_seq, kv_lens, num_kv_heads=num_kv_heads,
            group=max(1, q.shape[1] // num_kv_heads), width=block_tables.shape[1],
            page_size=page_size, pages_per_block=pages_per_block, head_dim=head_dim,
            dtype=k_pages.dtype, q_dtype=q.dtype)
    elif not (isinstance(num_splits, numbers.Integral) and num_splits > 0):
        raise ValueError(f"num_splits={num_splits!r} must be a positive integer")
    return _paged_attention_tokens(
        q, k_pages, v_pages, block_tables, kv_lens, q_seq, q_pos, k_scale, v_scale,
        layer=layer,
        sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        pages_per_block=pages_per_block, num_stages=num_stages, num_splits=int(num_splits),
        interpret=interpret)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "pages_per_block", "num_stages", "num_splits",
    "interpret"))
def _paged_attention_tokens(q, k_pages, v_pages, block_tables, kv_lens, q_seq, q_pos,
                            k_scale, v_scale, *, layer, sm_scale, soft_cap, sliding_window,
                            pages_per_block, num_stages, num_splits, interpret):
    num_tokens, num_q_heads, head_dim = q.shape
    quantized = k_scale is not None
    if k_pages.ndim == 4:
        k_pages, v_pages = k_pages[None], v_pages[None]
        if quantized:
            k_scale, v_scale = k_scale[None], v_scale[None]
    num_layers, num_kv_heads, num_pages, page_size, _ = k_pages.shape
    check_config(num_q_heads, num_kv_heads, head_dim, page_size, k_pages.dtype,
                 pages_per_block, num_stages, num_splits=num_splits, q_dtype=q.dtype,
                 interpret=interpret)
    if num_stages is None:
        num_stages = default_num_stages(head_dim, page_size, k_pages.dtype, pages_per_block,
                                        num_splits, q.dtype)
    if not quantized and q.dtype != k_pages.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the pages' dtype {k_pages.dtype} "
                         f"(wgmma takes one operand type)")
    group = num_q_heads // num_kv_heads
    tokens_per_block = BLOCK_ROWS // group
    scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)
    block, slot, blk_seq, blk_lo, blk_hi, row_pos, overflow = build_blocks(
        q_seq, q_pos, block_tables.shape[0], tokens_per_block)
    num_blocks = blk_seq.shape[0]
    # Row i * group + g of a block is its token i, query head g of the kv head.
    tok = jnp.full((num_blocks, tokens_per_block), num_tokens, jnp.int32).at[
        block, slot].set(jnp.arange(num_tokens, dtype=jnp.int32), mode="drop")
    q_padded = jnp.concatenate([q, jnp.zeros((1, num_q_heads, head_dim), q.dtype)])
    q_blocks = q_padded[tok].reshape(num_blocks, tokens_per_block, num_kv_heads, group,
                                     head_dim)
    q_blocks = q_blocks.transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, num_blocks,
                                                         BLOCK_ROWS, head_dim)
    row_pos = jnp.repeat(row_pos, group, axis=1)
    layer = jnp.zeros((1,), jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(
        jnp.int32)
    flat = (num_layers * num_kv_heads, num_pages, page_size, head_dim)
    kernel = functools.partial(
        _attention_kernel, num_kv_heads=num_kv_heads, page_size=page_size,
        pages_per_block=pages_per_block, num_stages=num_stages, num_splits=num_splits,
        quantized=quantized, sm_scale=scale, soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=sliding_window, dtype=q.dtype, interpret=interpret)
    if num_splits == 1:
        out_type = jax.ShapeDtypeStruct(q_blocks.shape, q.dtype)
    else:  # float32 partials and their log-sum-exp, merged below
        parts = (num_kv_heads, num_blocks, num_splits, BLOCK_ROWS)
        out_type = (jax.ShapeDtypeStruct((*parts, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct(parts, jnp.float32))
    call = plgpu.kernel(
        kernel, out_type=out_type, grid=(num_kv_heads, num_blocks, num_splits),
        grid_names=("kv_head", "block", "split"),
        **({"interpret": _interpret_params(interpret)} if interpret else {}))
    scales = () if not quantized else tuple(
        row_scales(x, block_tables, layer[0], pages_per_block) for x in (k_scale, v_scale))
    result = call(layer, blk_seq, blk_lo, blk_hi, row_pos, block_tables.astype(jnp.int32),
                  kv_lens.astype(jnp.int32), q_blocks, k_pages.reshape(flat),
                  v_pages.reshape(flat), *scales)
    out_blocks = result if num_splits == 1 else merge_splits(*result)
    out = out_blocks.reshape(num_kv_heads, num_blocks, tokens_per_block, group, head_dim)
    out = out[:, jnp.minimum(block, num_blocks - 1), slot]        # [Hkv, T, group, D]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
    return jnp.where(overflow[:, None, None], jnp.nan, out).astype(q.dtype)


def ragged_paged_attention(q, k_pages, v_pages, block_tables, kv_lens, cu_q_lens, **options):
    """The ragged form: row r's query tokens are ``q[cu_q_lens[r]:cu_q_lens[r + 1]]`` and
    end at its context length (token i of the chunk sits at ``kv_lens[r] - len + i``).

    cu_q_lens: ``int32[B + 1]``, non-decreasing from 0; tokens past ``cu_q_lens[B]`` are
    padding (they see no key and give zeros). Other arguments as ``paged_attention_tokens``.
    """
    num_tokens = q.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    row = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0,
                   block_tables.shape[0] - 1).astype(jnp.int32)
    chunk_len = cu_q_lens[row + 1] - cu_q_lens[row]
    pos = kv_lens[row] - chunk_len + (t - cu_q_lens[row])
    pos = jnp.where(t < cu_q_lens[-1], pos, -1).astype(jnp.int32)
    return paged_attention_tokens(q, k_pages, v_pages, block_tables, kv_lens, row, pos,
                                  **options)


__all__ = ["check_config", "check_token_layout", "paged_attention_tokens",
           "ragged_paged_attention", "build_blocks", "smem_bytes", "default_pages_per_block",
           "choose_num_splits", "plan_num_splits"]
