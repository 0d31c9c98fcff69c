"""Mosaic GPU paged decode: a decode-shaped tile, keys on wgmma's 64-row side.

Hardware, interpret mode, pools, 8-bit pages and split-K as in ``ragged_attention``; this
kernel takes decode only (one query token per row, at position ``length - 1``), which is
what ``impl="mosaic"`` runs for ``paged_attention``; prefill chunks stay with the ragged
kernel.

Why another tile. wgmma's M side is 64 rows. The ragged kernel puts the query heads of a
GQA group there (``S = Q K^T``), so a decode token of group 4 fills 4 rows of 64: 94% of
its MMA and softmax work is padding. Here the keys are the M side and the group is N:
``S^T = K Q^T`` (M = ``block_kv`` keys, N = ``cols`` = the group rounded up to a power of
two >= 8, wgmma's smallest N; K = head_dim) and ``O^T = V^T P^T`` (M = head_dim, N =
``cols``, K = ``block_kv``), the softmax statistics running down the columns. P^T is the
B operand of the second product, so it goes through shared memory each step, stored
transposed: a ``[cols, block_kv]`` tile (1 KiB at 64 keys, 8 columns) whose minor
dimension is the keys, written from the WGMMA_TRANSPOSED register layout and read as a
transposed B. Why transposed: wgmma's B from shared memory needs a swizzle of 32+ bytes
on its minor dimension, and both operands of one wgmma the same swizzle; 8 columns of
bf16 are 16 bytes, ``block_kv`` keys are 128+. So every 16-bit tile here has its own
128-byte swizzle (head_dim or ``block_kv`` minor, both 64+ elements). Padded MMA work:
``1 - group / cols``: 88% at group 1, 50% at group 4, none from group 8 (the ragged
kernel: 98%, 94%, 88%). Under 50% at group 4 would take more than one query token per kv
head in the tile: every wgmma output column belongs to one B row, and a column holding
another kv head's (or another row's) query meets keys it does not attend to, so packing
heads or rows adds padding, it does not remove it; ``cols`` >= 8 is the hardware's.
head_dim must be 64, 128 or 256 (M of ``O^T``).

Memory path: nothing is padded in HBM. q is read as ``[B, Hkv, group, D]`` (a free
reshape) and the output written as float32 ``[group, D]`` per program with the log-sum-exp
of its ``cols`` columns (merged over the splits in the wrapper; with one split the merge
is a division). From group 8 on, q arrives by one TMA copy of its ``[cols, D]`` tile and O
leaves by one. Below group 8 a TMA box of ``group`` rows does not fit the 128-byte
swizzle's 8-row tiles the wgmma operand needs, and copied into an unswizzled staging
tile (or out of one for O) it lowers on jax 0.10 but not on 0.12 ("Layout inference
failed to find a solution": its inference tiles such a buffer itself), so the group's
rows come from HBM by plain loads into
``Q^T [D, cols]`` in registers (zeros past the group) and are stored like P^T; O's
``group`` rows are taken out of ``O^T`` column by column into a ``[group, D]`` tile and
leave by one TMA copy. Compiled for sm_90a at group 4 (head_dim 64 / 128 / 256, page 16)
it holds 96 / 137 / 219 registers (one barrier per ring slot, table entries loaded a step
ahead; 109 / 145 / 224 with a barrier per page copy; 96 / 117 / 168 with a barrier per
page copy and q padded to 8 rows in HBM), no spills
(``benchmarks/results/mosaic_resources.md``). K/V pages come through the page ring both
Mosaic kernels share (``page_ring``).

Warp specialization (``warp_specialized=True``, off by default until a GPU has timed it):
two warpgroups per program. Warpgroup 1 (``PRODUCER_REGISTERS`` after setmaxnreg) reads
the block table (each step's entries loaded while it waits for the step before) and
issues every page copy, waiting only for a slot's "consumed" barrier before refilling
it; warpgroup 0 (``CONSUMER_REGISTERS``) does the products and the softmax and arrives
on that barrier once a step's slot is read. So the table reads and copy issues leave the
compute path, which then waits on data only. Its ring has
``WS_MAX_STAGES`` = 4 slots where they fit (3 at head_dim 256), so the copies run up to 4
steps ahead; one program per SM leaves it the shared memory. Compiled (jax 0.10.2,
``benchmarks/mosaic_resources.py``) it holds 232 registers x 256 threads, no spills: one
program per SM, where the single-warpgroup tile holds 5 / 3 / 1 at head_dim 64 / 128 /
256, so it needs the GPU suite's timing (``gpu_check`` row ``mosaic-ws``) before it can
be the default. The
interpreter runs both warpgroups and fails on a barrier phase one of them never waits
for, so the consumer signals only the releases the producer waits on.

Shapes: q ``[B, Hq, D]``; pages ``[Hkv, P, S, D]`` or ``[L, Hkv, P, S, D]`` with
``layer``; block_tables ``int32[B, W]``; lengths ``int32[B]``. Output ``[B, Hq, D]`` in
q's dtype, zeros for length 0. Matches ``reference.paged_decode_reference``.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from jpaged.pallas_kernels import online_softmax, page_ring
from jpaged.pallas_kernels import ragged_attention as ra
from jpaged.pallas_kernels.quantization import is_quantized
from jpaged.pallas_kernels.splits import merge_splits

pl, plgpu = ra.pl, ra.plgpu

MIN_COLS = 8           # wgmma's smallest N
HEAD_DIMS = (64, 128, 256)
# warp_specialized: registers per thread after setmaxnreg for the copy-issuing warpgroup
# and the computing one (jax's attention_mgpu and tokamax use 40 and 232).
PRODUCER_REGISTERS = 40
CONSUMER_REGISTERS = 232
WS_MAX_STAGES = 4      # warp_specialized: ring slots by default (the issue's 3-4 ahead)


def spills(head_dim: int, block_kv: int) -> bool:
    """Whether the decode tile spills registers, by its sm_90a compile (one warpgroup;
    S^T ``[block_kv, cols]`` and O^T ``[head_dim, cols]`` in float32 registers, the
    V^T tile's products growing with both): at head_dim x keys a step of 32 K (128 x 256:
    528 bytes of spill stores, 256 x 128: 500); 16 K holds 200-224 registers
    (``benchmarks/results/mosaic_resources.md`` compiles both sides of the edge)."""
    return head_dim * block_kv >= 32 * 1024


def num_cols(group: int) -> int:
    """N of the decode tile: the GQA group rounded up to a power of two >= 8."""
    return max(MIN_COLS, int(pl.next_power_of_2(group)))


def padded_fraction(group: int) -> float:
    """Share of the tile's MMA columns that hold no query head."""
    return 1.0 - group / num_cols(group)


def smem_bytes(head_dim, page_size, dtype, pages_per_block, num_stages, group,
               q_dtype=None) -> int:
    """Shared memory of one program, each buffer rounded up to 1 KiB: q tile, K and V
    rings, P^T tile, output and log-sum-exp tiles (8-bit pages: scale rings and the two
    16-bit tiles)."""
    e, e_q = jnp.dtype(dtype).itemsize, ra.compute_dtype(dtype, q_dtype).itemsize
    cols, block_kv = num_cols(group), pages_per_block * page_size
    ring = num_stages * block_kv * head_dim * e
    buffers = [cols * head_dim * e_q, ring, ring, block_kv * cols * e_q,
               group * head_dim * 4, cols * 4]
    if is_quantized(dtype):
        buffers += [num_stages * block_kv * 4] * 2 + [block_kv * head_dim * e_q] * 2
    return sum(-(-size // ra.SMEM_ALIGN) * ra.SMEM_ALIGN for size in buffers)


def default_num_stages(head_dim, page_size, dtype, pages_per_block, group,
                       q_dtype=None, warp_specialized=False) -> int:
    """Two ring slots where they fit shared memory (always, at 227 KiB), else one.
    Warp-specialized: the most up to ``WS_MAX_STAGES`` that fit shared memory (the copy
    warpgroup runs that many steps ahead; one program per SM there, so the shared memory
    is its to take)."""
    if warp_specialized:
        for stages in range(WS_MAX_STAGES, 1, -1):
            if smem_bytes(head_dim, page_size, dtype, pages_per_block, stages, group,
                          q_dtype) <= ra.SMEM_BUDGET:
                return stages
    fits = smem_bytes(head_dim, page_size, dtype, pages_per_block, ra.DEFAULT_NUM_STAGES,
                      group, q_dtype) <= ra.SMEM_BUDGET
    return ra.DEFAULT_NUM_STAGES if fits else 1


def check_config(num_q_heads, num_kv_heads, head_dim, page_size, dtype,
                 pages_per_block=None, num_stages=None, *, q_dtype=None,
                 interpret=False) -> None:
    """Raise ValueError naming the constraint if this kernel cannot take the
    configuration: the ragged kernel's constraints, plus head_dim in (64, 128, 256)
    (M of O^T = V^T P^T), its own spills (on a GPU) and shared-memory budget."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} must be one of {HEAD_DIMS} for the Mosaic "
                         f"decode tile (head_dim is the 64-row M side of O^T = V^T P^T)")
    if pages_per_block is None:
        pages_per_block = ra.default_pages_per_block(page_size)
    group = num_q_heads // num_kv_heads if num_kv_heads else 0
    if num_stages is None and group:
        num_stages = default_num_stages(head_dim, page_size, dtype, pages_per_block, group,
                                        q_dtype)
    # The ring's checks are the ragged kernel's; its shared memory is counted below.
    ra.check_config(num_q_heads, num_kv_heads, head_dim, page_size, dtype, pages_per_block,
                    1, q_dtype=q_dtype, interpret=interpret, refuse_spilling=False)
    if not (isinstance(num_stages, numbers.Integral) and num_stages >= 1):
        raise ValueError(f"num_stages={num_stages!r} must be a positive integer")
    ra.check_barriers(num_stages)
    block_kv = pages_per_block * page_size
    if not interpret and ra.REFUSE_SPILLING and spills(head_dim, block_kv):
        raise ValueError(f"head_dim={head_dim} with {block_kv} keys per step: the Mosaic "
                         f"decode tile compiled for sm_90a spills registers (255 per "
                         f"thread; benchmarks/results/mosaic_resources.md); take fewer "
                         f"pages_per_block")
    need = smem_bytes(head_dim, page_size, dtype, pages_per_block, num_stages, group, q_dtype)
    if need > ra.SMEM_BUDGET:
        raise ValueError(f"head_dim={head_dim}, num_stages={num_stages} need {need} bytes "
                         f"of shared memory, over the {ra.SMEM_BUDGET}-byte budget")


def _matmul(a_ref, b_ref, *, transpose_a=False, transpose_b=False, interpret):
    """``op(a) @ op(b)`` of shared-memory tiles, float32: wgmma compiled, float32
    dot_general in interpret mode (jax 0.10.2's interpreter has no transposed wgmma)."""
    if interpret:
        dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
        return lax.dot_general(a_ref[...], b_ref[...], dims,
                               preferred_element_type=jnp.float32)
    a = a_ref.transpose((1, 0)) if transpose_a else a_ref
    b = b_ref.transpose((1, 0)) if transpose_b else b_ref

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]   # reading the accumulator waits for the wgmma
    return pl.run_scoped(scope, plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32))


def _store_transposed(ref, x, *, interpret):
    """``ref[...] = x.T`` for ``x`` ``[M, N]`` in the WGMMA register layout and ``ref`` a
    tiled ``[N, M]`` shared-memory tile: compiled, x moves to the WGMMA_TRANSPOSED layout
    (a shuffle within lane pairs) and is stored through a transposed view of ref."""
    if interpret:
        ref[...] = x.T
    else:
        ref.transpose((1, 0))[...] = plgpu.layout_cast(x, plgpu.Layout.WGMMA_TRANSPOSED)


def _decode_kernel(layer_ref, tables_ref, kv_lens_ref, q_ref, k_ref, v_ref, *refs,
                   num_kv_heads, group, page_size, pages_per_block, num_stages, num_splits,
                   quantized, sm_scale, soft_cap, sliding_window, dtype, warp_specialized,
                   interpret):
    # layer_ref int32[1]; tables_ref int32[B, W]; kv_lens_ref int32[B];
    # q_ref [B, Hkv, group, D] in dtype; k_ref, v_ref [L * Hkv, P, S, D];
    # quantized: then the rows' scales [Hkv, B, W' * S] (ragged_attention.row_scales);
    # outputs: o_ref float32 [Hkv, splits, B, group, D], lse_ref float32
    # [Hkv, splits, B, cols] (the first group columns used).
    scale_refs, (o_ref, lse_ref) = (refs[:2], refs[2:]) if quantized else ((), refs)
    cast = functools.partial(page_ring.layout_cast, interpret=interpret)
    matmul = functools.partial(_matmul, interpret=interpret)
    store_transposed = functools.partial(_store_transposed, interpret=interpret)
    head_dim, cols = q_ref.shape[-1], num_cols(group)
    block_kv = pages_per_block * page_size
    h, row, split = (lax.axis_index(name) for name in ("kv_head", "row", "split"))
    pool_head = layer_ref[0] * num_kv_heads + h
    kv_len = kv_lens_ref[row]
    pos = kv_len - 1
    kv_start = (jnp.int32(0) if sliding_window is None
                else jnp.maximum(pos - (sliding_window - 1), 0))
    row_first = kv_start // block_kv
    row_steps = jnp.maximum((kv_len + block_kv - 1) // block_kv - row_first, 0)
    first, num_steps = page_ring.split_run(row_first, row_steps, split, num_splits)
    layout = plgpu.Layout.WGMMA

    def col_of(rows):
        """Each element's column: int32 ``[rows, cols]``."""
        return cast(lax.broadcasted_iota(jnp.int32, (rows, cols), 1), layout)

    def scoped(q_smem, p_smem, o_smem, lse_smem, q_barrier, *rest):
        ring = page_ring.PageRing(
            rest[:page_ring.num_scratch(quantized)], k_ref=k_ref, v_ref=v_ref,
            scale_refs=scale_refs, tables_ref=tables_ref, table_row=row, kv_head=h,
            pool_head=pool_head, first_step=first, page_size=page_size,
            pages_per_block=pages_per_block, num_stages=num_stages, dtype=dtype,
            interpret=interpret)
        if warp_specialized:   # the ring slots' "consumed" barriers come last
            consumed = rest[-1]

        def load_q():
            """q's ``[group, D]`` rows -> the swizzled ``[cols, D]`` tile wgmma reads: one
            TMA copy from group 8 on; below, row by row from HBM through registers into
            ``Q^T [D, cols]`` (zero columns past the group), stored like P^T. Why not a
            TMA copy of the group's rows: a box of fewer than 8 rows does not fit the
            128-byte swizzle's 8-row tiles, and staged in an unswizzled tile, Mosaic GPU's
            layout inference on jax 0.12 swizzles that tile too."""
            if group == cols:
                plgpu.copy_gmem_to_smem(q_ref.at[row, h], q_smem, q_barrier.at[0])
                plgpu.barrier_wait(q_barrier.at[0])
                return
            q_t = cast(jnp.zeros((head_dim, cols), dtype), layout)
            for g in range(group):
                q_row = q_ref[row, h, g] if interpret else page_ring.load(
                    q_ref.at[row, h, g], layout.reduce(1), optimized=False)
                q_t = jnp.where(col_of(head_dim) == g,
                                lax.broadcast_in_dim(q_row, (head_dim, cols), [0]), q_t)
            store_transposed(q_smem, q_t)
            plgpu.commit_smem()

        def store_out(out):
            """O^T ``[D, cols]`` -> o_smem ``[group, D]``: transposed as a whole from group
            8 on; below, the group's columns one by one (a sum across the lanes holding
            the column), so only the group's rows leave for HBM."""
            if group == cols:
                store_transposed(o_smem, out)
                return
            for g in range(group):
                o_smem[g] = jnp.sum(jnp.where(col_of(head_dim) == g, out, 0.0), axis=1)

        def compute(release, ahead=()):
            """The consumer: q, every step's two products and softmax, the output;
            ``release(step, slot, ahead)`` once step's slot is read (refill or signal it),
            threading ``ahead`` (the table entries a refill loads a step ahead)."""
            load_q()
            m_i = cast(jnp.full((cols,), -jnp.inf, jnp.float32), layout.reduce(0))
            l_i = cast(jnp.zeros((cols,), jnp.float32), layout.reduce(0))
            acc = cast(jnp.zeros((head_dim, cols), jnp.float32), layout)

            def body(step, carry):
                acc, m_i, l_i, ahead = carry
                # S^T = K Q^T [block_kv, cols]; the query sits at pos = kv_len - 1, so the
                # length mask is its causal mask.
                slot, probs, v_tile, m_new, l_i, acc = ring.attend(
                    step, lambda k_tile: matmul(k_tile, q_smem, transpose_b=True), m_i, l_i,
                    acc, kv_len=kv_len, query_pos=pos, causal=False,
                    sliding_window=sliding_window, sm_scale=sm_scale, soft_cap=soft_cap,
                    key_axis=0)
                store_transposed(p_smem, probs.astype(dtype))            # P [cols, block_kv]
                plgpu.commit_smem()
                acc = acc + matmul(v_tile, p_smem, transpose_a=True, transpose_b=True)  # O^T
                ahead = release(step, slot, ahead)
                return acc, m_new, l_i, ahead

            acc, m_i, l_i, _ = lax.fori_loop(0, num_steps, body, (acc, m_i, l_i, ahead))
            out, lse = online_softmax.finish(acc, m_i, l_i, query_axis=1)   # O^T [D, cols]
            store_out(out)
            lse_smem[...] = lse
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[h, split, row])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[h, split, row])
            plgpu.wait_smem_to_gmem(0)

        if not warp_specialized:   # one warpgroup refills the ring behind its own math
            compute(lambda step, slot, ahead: ring.refill(step, num_steps, ahead),
                    ring.prime(num_steps))
        else:   # warpgroup 1 issues every copy, warpgroup 0 computes
            wg = lax.axis_index("wg")

            @pl.when(wg == 1)
            def _producer():
                plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

                def issue(step, pages):
                    slot = step % num_stages
                    # The slot's previous step must be consumed before its refill.
                    pl.when(step >= num_stages)(
                        lambda: plgpu.barrier_wait(consumed.at[slot]))
                    ring.issue(step, pages)
                    return ring.entries(step + 1)   # loaded while it waits for a slot

                lax.fori_loop(0, num_steps, issue, ring.entries(0))

            @pl.when(wg == 0)
            def _consumer():
                plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
                # Only the releases the producer waits for (each phase must be observed).
                def release(step, slot, ahead):
                    pl.when(step + num_stages < num_steps)(
                        lambda: plgpu.barrier_arrive(consumed.at[slot]))
                    return ahead
                compute(release)

    # Every 16-bit tile a wgmma reads: 128-byte swizzle on its 64+ element minor axis.
    scratch = [
        plgpu.SMEM((cols, head_dim), dtype, transforms=page_ring.smem_transforms(head_dim, dtype)),
        plgpu.SMEM((cols, block_kv), dtype,
                   transforms=page_ring.smem_transforms(block_kv, dtype)),
        plgpu.SMEM((group, head_dim), jnp.float32),
        plgpu.SMEM((cols,), jnp.float32),
        plgpu.Barrier(num_barriers=1),
        *page_ring.scratch(num_stages=num_stages, pages_per_block=pages_per_block,
                           page_size=page_size, head_dim=head_dim, page_dtype=k_ref.dtype,
                           dtype=dtype, scale_dtype=scale_refs[0].dtype if quantized else None),
    ]
    if not warp_specialized:
        pl.run_scoped(scoped, *scratch)
    else:   # one arrival per step: the computing warpgroup's
        pl.run_scoped(scoped, *scratch, plgpu.Barrier(num_arrivals=1, num_barriers=num_stages),
                      collective_axes="wg")


def paged_decode(q, k_pages, v_pages, block_tables, lengths, *, layer=None, k_scale=None,
                 v_scale=None, sm_scale=None, soft_cap=None, sliding_window=None,
                 pages_per_block=None, num_stages=None, num_splits=None,
                 warp_specialized=False, interpret=False):
    """Decode attention with the decode-shaped Mosaic tile (shapes in the module doc).

    ``num_splits`` (default: ``ragged_attention.plan_num_splits`` over one block per
    row) cuts each row's keys into runs merged afterwards. ``warp_specialized``: two
    warpgroups per program, one issuing every page copy (``PRODUCER_REGISTERS``) as soon
    as the computing one (``CONSUMER_REGISTERS``) has released the slot, instead of one
    warpgroup refilling the ring behind its own math (not yet timed on a GPU).
    """
    num_kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
    batch = q.shape[0]
    if pages_per_block is None:
        pages_per_block = ra.default_pages_per_block(page_size)
    ra.check_scales(k_pages, k_scale, v_scale)
    if num_splits is None:
        rows = jnp.arange(batch, dtype=jnp.int32)
        num_splits = ra.plan_num_splits(
            rows, lengths, num_kv_heads=num_kv_heads, group=ra.BLOCK_ROWS,
            width=block_tables.shape[1], page_size=page_size,
            pages_per_block=pages_per_block, head_dim=head_dim, dtype=k_pages.dtype,
            q_dtype=q.dtype, check_partial_smem=False)
    elif not (isinstance(num_splits, numbers.Integral) and num_splits > 0):
        raise ValueError(f"num_splits={num_splits!r} must be a positive integer")
    return _paged_decode(q, k_pages, v_pages, block_tables, lengths, k_scale, v_scale,
                         layer=layer, sm_scale=sm_scale, soft_cap=soft_cap,
                         sliding_window=sliding_window, pages_per_block=pages_per_block,
                         num_stages=num_stages, num_splits=int(num_splits),
                         warp_specialized=bool(warp_specialized), interpret=interpret)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "pages_per_block", "num_stages", "num_splits",
    "warp_specialized", "interpret"))
def _paged_decode(q, k_pages, v_pages, block_tables, lengths, k_scale, v_scale, *, layer,
                  sm_scale, soft_cap, sliding_window, pages_per_block, num_stages,
                  num_splits, warp_specialized, interpret):
    batch, num_q_heads, head_dim = q.shape
    quantized = k_scale is not None
    if k_pages.ndim == 4:
        k_pages, v_pages = k_pages[None], v_pages[None]
        if quantized:
            k_scale, v_scale = k_scale[None], v_scale[None]
    num_layers, num_kv_heads, num_pages, page_size, _ = k_pages.shape
    check_config(num_q_heads, num_kv_heads, head_dim, page_size, k_pages.dtype,
                 pages_per_block, num_stages, q_dtype=q.dtype, interpret=interpret)
    group = num_q_heads // num_kv_heads
    if num_stages is None:
        num_stages = default_num_stages(head_dim, page_size, k_pages.dtype, pages_per_block,
                                        group, q.dtype, warp_specialized)
    if not quantized and q.dtype != k_pages.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the pages' dtype {k_pages.dtype} "
                         f"(wgmma takes one operand type)")
    cols = num_cols(group)
    layer = jnp.zeros((1,), jnp.int32) if layer is None else jnp.reshape(layer, (1,)).astype(
        jnp.int32)
    flat = (num_layers * num_kv_heads, num_pages, page_size, head_dim)
    scales = () if not quantized else tuple(
        ra.row_scales(x, block_tables, layer[0], pages_per_block) for x in (k_scale, v_scale))
    kernel = functools.partial(
        _decode_kernel, num_kv_heads=num_kv_heads, group=group, page_size=page_size,
        pages_per_block=pages_per_block, num_stages=num_stages, num_splits=num_splits,
        quantized=quantized, sm_scale=head_dim ** -0.5 if sm_scale is None else float(sm_scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=sliding_window, dtype=q.dtype, warp_specialized=warp_specialized,
        interpret=interpret)
    parts = (num_kv_heads, num_splits, batch)
    call = plgpu.kernel(
        kernel, out_type=(jax.ShapeDtypeStruct((*parts, group, head_dim), jnp.float32),
                          jax.ShapeDtypeStruct((*parts, cols), jnp.float32)),
        grid=(num_kv_heads, batch, num_splits), grid_names=("kv_head", "row", "split"),
        **({"num_threads": 2, "thread_name": "wg"} if warp_specialized else {}),
        **({"interpret": ra._interpret_params(interpret)} if interpret else {}))
    o, lse = call(layer, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
                  q.reshape(batch, num_kv_heads, group, head_dim), k_pages.reshape(flat),
                  v_pages.reshape(flat), *scales)
    # [Hkv, splits, B, group, D] -> [B, Hkv, splits, group, D], merged over the splits.
    o = o.transpose(2, 0, 1, 3, 4)
    lse = lse[..., :group].transpose(2, 0, 1, 3)
    out = merge_splits(o, lse)                                       # [B, Hkv, group, D]
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


__all__ = ["check_config", "paged_decode", "num_cols", "padded_fraction", "smem_bytes",
           "spills"]
