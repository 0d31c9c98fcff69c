"""The K/V page ring both Mosaic GPU kernels read pages through (``ragged_attention``'s
ragged kernel, ``mosaic_decode``'s decode tile), and what a key step does to its tiles
before the two products.

One program reads the pages of one table row for one pool head. Step i's
``pages_per_block`` K and V pages (``block_kv`` keys) arrive by one TMA copy per page into
slot ``i % num_stages`` of a shared-memory ring. A slot has one K and one V mbarrier that
all of the step's K (V) copies arrive on (``num_arrivals`` = the copies, each adding its
bytes to the transaction count), so a step costs two waits whatever its page count, and a
ring needs ``num_stages`` barriers per array, not one per page copy (Mosaic GPU's limit is
32 per array). 8-bit pages add one copy a step of the step's ``block_kv`` K and V scales
(the row's scales in key order, ``ragged_attention.row_scales``), arriving on the same
K and V barriers, and their codes are widened in a 16-bit tile
before wgmma reads them (exact: every int8 and e4m3 value is a bf16 and an f16 value; the
scales multiply S and P instead, one multiply per logit instead of one per element).

Block-table entries are loaded a step ahead: a copy's page id is a dependent global load
(``tables[row, index]``), so a refill that read its entries right before its copies would
wait a memory latency first. ``prime`` and ``refill`` return the entries of the next
refill, loaded then and carried in registers through the loop (``pages_per_block`` int32
scalars), so a refill issues its copies at once. Why registers and not a TMA copy of the
row's table into shared memory: a row's table is up to the table width (thousands of
entries, more than one 256-element TMA box and a shared-memory buffer the size of the
widest row), and a per-step box of ``pages_per_block`` entries is not the multiple of
16 bytes a TMA box's inner dimension must be at 1-3 pages a step. Compiled, the carried
entries cost 0-21 registers (``benchmarks/results/mosaic_resources.md``), no spills.

Kept in one place so that the two kernels cannot drift apart on what keeps a NaN-poisoned
pool out of the output: slots past the row's length (the tail of its last page, table
padding pointing at the null page) may hold NaN from a recycled page, so in the one step
that crosses the length the V rows past it are zeroed in shared memory (0 * NaN = NaN in
P @ V) and the V scales past it are taken as 0 (a stale scale may be NaN too); the logits
past it are masked by the kernels' softmax (``online_softmax.step``).

The kernels differ in which axis of their logit tile holds the keys: ``key_axis`` 1 for
the ragged kernel's ``S [64, keys]``, 0 for the decode tile's ``S^T [keys, cols]``; a key
step up to P @ V is ``PageRing.attend`` for both.
Interpret mode has no register layouts: casts are identities there.
"""

from __future__ import annotations

import functools
import inspect

import jax.numpy as jnp
from jax import lax

from jpaged.pallas_kernels import online_softmax

try:  # Mosaic GPU is optional: jpaged must import on a jax without it.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed jax
    pl = plgpu = None


def load(ref, layout, **options):
    """``plgpu.load`` of a whole ref in ``layout``: jax 0.10 takes an index argument,
    0.12 does not."""
    if "idx" in inspect.signature(plgpu.load).parameters:
        return plgpu.load(ref, (), layout=layout, **options)
    return plgpu.load(ref, layout=layout, **options)


def layout_cast(x, layout, *, interpret: bool):
    """``plgpu.layout_cast``, or x itself in interpret mode (no layouts there)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def smem_transforms(minor: int, dtype):
    """Tiling + swizzle for a ``[rows, minor]`` shared-memory tile read by wgmma."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def split_run(first_step, steps, split, num_splits: int):
    """Split-K: split ``split`` of a program's ``steps`` key steps from ``first_step``
    takes the split-th run of ``ceil(steps / num_splits)`` consecutive steps (the last
    runs may be shorter or empty). int32 scalars in, (its first step, its step count)."""
    per_split = (steps + num_splits - 1) // num_splits
    return first_step + split * per_split, jnp.clip(steps - split * per_split, 0, per_split)


def scratch(*, num_stages: int, pages_per_block: int, page_size: int, head_dim: int,
            page_dtype, dtype, scale_dtype=None) -> list:
    """The ring's shared memory and barriers, in the order ``PageRing`` takes them: K and
    V slots ``[num_stages, block_kv, head_dim]`` in the pages' dtype and a K and a V
    barrier per slot (``copies_per_slot`` arrivals each); with ``scale_dtype`` (8-bit
    pages) the K and V scale slots ``[num_stages, block_kv]`` and the two 16-bit tiles
    ``[block_kv, head_dim]`` in ``dtype`` the codes are widened into."""
    block_kv = pages_per_block * page_size
    ring = (num_stages, block_kv, head_dim)
    ring_tf = smem_transforms(head_dim, page_dtype)
    slot_barrier = plgpu.Barrier(
        num_arrivals=copies_per_slot(pages_per_block, scale_dtype is not None),
        num_barriers=num_stages)
    refs = [plgpu.SMEM(ring, page_dtype, transforms=ring_tf),
            plgpu.SMEM(ring, page_dtype, transforms=ring_tf), slot_barrier, slot_barrier]
    if scale_dtype is not None:
        tile_tf = smem_transforms(head_dim, dtype)
        refs += [plgpu.SMEM((num_stages, block_kv), scale_dtype),
                 plgpu.SMEM((num_stages, block_kv), scale_dtype),
                 plgpu.SMEM((block_kv, head_dim), dtype, transforms=tile_tf),
                 plgpu.SMEM((block_kv, head_dim), dtype, transforms=tile_tf)]
    return refs


def copies_per_slot(pages_per_block: int, quantized: bool) -> int:
    """The TMA copies arriving on one slot's K (or V) barrier per step: one per page, and
    the step's scales over 8-bit pages."""
    return pages_per_block + int(quantized)


def num_scratch(quantized: bool) -> int:
    """How many of the kernel's scoped refs ``scratch`` allocates."""
    return 8 if quantized else 4


class PageRing:
    """One program's ring over the pages of table row ``table_row`` of ``pool_head``.

    refs: what ``scratch`` allocated; k_ref, v_ref: the pools ``[L * Hkv, P, S, D]``;
    scale_refs: () or the rows' K and V scales ``[Hkv, B, W' * S]``; tables_ref
    ``int32[B, W]``; first_step: the program's first key step (int32 scalar); dtype: what
    wgmma multiplies in (q's).
    """

    def __init__(self, refs, *, k_ref, v_ref, scale_refs, tables_ref, table_row, kv_head,
                 pool_head, first_step, page_size: int, pages_per_block: int,
                 num_stages: int, dtype, interpret: bool):
        self.k_smem, self.v_smem, self.k_barriers, self.v_barriers, *quant = refs
        self.quantized = bool(quant)
        if self.quantized:
            self.ks_smem, self.vs_smem, self.k16_smem, self.v16_smem = quant
        self.k_ref, self.v_ref, self.scale_refs = k_ref, v_ref, scale_refs
        self.tables_ref, self.table_row = tables_ref, table_row
        self.kv_head, self.pool_head, self.first_step = kv_head, pool_head, first_step
        self.page_size, self.pages_per_block = page_size, pages_per_block
        self.num_stages, self.dtype, self.interpret = num_stages, dtype, interpret
        self.block_kv = pages_per_block * page_size

    def entries(self, step) -> tuple:
        """Step ``step``'s block-table entries (relative to first_step): pages_per_block
        int32 scalars loaded from HBM, their indices clamped to the table's width (a
        step past the row's pages reads padding or its last entry; the kernels mask
        what it brings)."""
        width = self.tables_ref.shape[1]
        first = (self.first_step + step) * self.pages_per_block
        return tuple(self.tables_ref[self.table_row, jnp.minimum(first + p, width - 1)]
                     for p in range(self.pages_per_block))

    def issue(self, step, pages=None) -> None:
        """Start the copies of key step ``step`` (relative to first_step) into its slot:
        its pages ``pages`` (``entries(step)``, loaded ahead), or loaded here."""
        slot = step % self.num_stages
        pages = self.entries(step) if pages is None else pages
        for p, page in enumerate(pages):
            rows = pl.ds(p * self.page_size, self.page_size)
            plgpu.copy_gmem_to_smem(self.k_ref.at[self.pool_head, page],
                                    self.k_smem.at[slot, rows], self.k_barriers.at[slot])
            plgpu.copy_gmem_to_smem(self.v_ref.at[self.pool_head, page],
                                    self.v_smem.at[slot, rows], self.v_barriers.at[slot])
        if self.quantized:   # the step's scales: one [block_kv] box of the row's scales
            keys = pl.ds((self.first_step + step) * self.block_kv, self.block_kv)
            for ref, smem, barriers in zip(self.scale_refs, (self.ks_smem, self.vs_smem),
                                           (self.k_barriers, self.v_barriers)):
                plgpu.copy_gmem_to_smem(ref.at[self.kv_head, self.table_row, keys],
                                        smem.at[slot], barriers.at[slot])

    def prime(self, num_steps) -> tuple:
        """Issue the first ``num_stages`` steps (those below num_steps); returns the
        first refill's table entries, loaded now so that it need not wait for them."""
        for step in range(self.num_stages):
            pl.when(step < num_steps)(functools.partial(self.issue, step))
        return self.entries(self.num_stages)

    def refill(self, step, num_steps, pages) -> tuple:
        """Step ``step``'s slot has been read: issue step ``step + num_stages`` into it
        from its table entries ``pages`` (loaded a step ago: no table load in front of
        the copies); returns the next refill's entries, loaded now, a step ahead."""
        pl.when(step + self.num_stages < num_steps)(
            functools.partial(self.issue, step + self.num_stages, pages))
        return self.entries(step + self.num_stages + 1)

    def _widened(self, codes_smem, tile_smem):
        """8-bit codes -> the 16-bit tile wgmma reads."""
        codes = codes_smem[...]
        if jnp.issubdtype(codes.dtype, jnp.floating) and jnp.dtype(self.dtype) != jnp.float16:
            codes = codes.astype(jnp.float32)   # sm_90 ptxas: no e4m3 -> bf16 cast
        tile_smem[...] = codes.astype(self.dtype)
        plgpu.commit_smem()
        return tile_smem

    def k_tile(self, slot):
        """Wait for slot's K pages; the ``[block_kv, D]`` tile wgmma reads (widened from
        8-bit codes: then scale the logits with ``scale_k``)."""
        plgpu.barrier_wait(self.k_barriers.at[slot])
        if not self.quantized:
            return self.k_smem.at[slot]
        return self._widened(self.k_smem.at[slot], self.k16_smem)

    def v_tile(self, slot, key0, kv_len):
        """Wait for slot's V pages; the ``[block_kv, D]`` tile wgmma reads (keys from
        ``key0``), widened from 8-bit codes (then scale the probabilities with
        ``scale_v``), its rows at ``kv_len`` and past zeroed when the step crosses it."""
        plgpu.barrier_wait(self.v_barriers.at[slot])
        tile = self.v_smem.at[slot]
        if self.quantized:
            tile = self._widened(tile, self.v16_smem)

        @pl.when(key0 + self.block_kv > kv_len)
        def _zero_tail():  # slots past the length may hold NaN: 0 * NaN = NaN in P @ V
            v_old = tile[...]
            v_key = key0 + layout_cast(
                lax.broadcasted_iota(jnp.int32, v_old.shape, 0), plgpu.Layout.WGMMA,
                interpret=self.interpret)
            tile[...] = jnp.where(v_key < kv_len, v_old, jnp.zeros_like(v_old))
            plgpu.commit_smem()
        return tile

    def attend(self, step, qk, m_i, l_i, acc, *, kv_len, query_pos, causal: bool,
               sliding_window, sm_scale: float, soft_cap, key_axis: int):
        """Key step ``step`` up to P @ V, the part both kernels share: wait for its slot's
        K tile, ``qk(k_tile)`` (the raw products, float32 ``S [Q, block_kv]`` with
        key_axis 1 or ``S^T [block_kv, Q]`` with key_axis 0), K scales, logits, the mask
        (keys below ``kv_len``; with ``causal`` at or before ``query_pos``; inside the
        window before ``query_pos``), the online-softmax step, then V's tile (tail zeroed)
        and V scales. query_pos: int32, a scalar or s's shape (each query's position).
        Returns (slot, probabilities in s's layout, the V tile, new m, new l, acc
        rescaled)."""
        slot = step % self.num_stages
        key0 = (self.first_step + step) * self.block_kv
        s = qk(self.k_tile(slot))
        if self.quantized:
            s = self.scale_k(s, slot, key_axis=key_axis)
        s = online_softmax.logits(s, sm_scale=sm_scale, soft_cap=soft_cap)
        key = key0 + layout_cast(lax.broadcasted_iota(jnp.int32, s.shape, key_axis),
                                 plgpu.Layout.WGMMA, interpret=self.interpret)
        visible = key < kv_len
        if causal:
            visible &= key <= query_pos
        if sliding_window is not None:
            visible &= key > query_pos - sliding_window
        probs, m_new, l_new, acc = online_softmax.step(s, visible, m_i, l_i, acc,
                                                       key_axis=key_axis)
        v_tile = self.v_tile(slot, key0, kv_len)
        if self.quantized:
            probs = self.scale_v(probs, key, kv_len, slot, key_axis=key_axis)
        return slot, probs, v_tile, m_new, l_new, acc

    def _per_key(self, ref, shape, key_axis: int):
        """A ``[block_kv]`` vector in shared memory -> float32 ``shape``, along key_axis."""
        x = ref[...] if self.interpret else load(
            ref, plgpu.Layout.WGMMA.reduce(1 - key_axis))
        return lax.broadcast_in_dim(x.astype(jnp.float32), shape, [key_axis])

    def scale_k(self, s, slot, *, key_axis: int):
        """``S = Q (codes * scale)^T``: each key's scale times its logits."""
        return s * self._per_key(self.ks_smem.at[slot], s.shape, key_axis)

    def scale_v(self, probs, key, kv_len, slot, *, key_axis: int):
        """``P (codes * scale) = (P * scale) codes``: each key's V scale times its
        probabilities, 0 at ``key >= kv_len`` (key: int32, probs' shape)."""
        scales = self._per_key(self.vs_smem.at[slot], probs.shape, key_axis)
        return probs * jnp.where(key < kv_len, scales, 0.0)


__all__ = ["PageRing", "copies_per_slot", "layout_cast", "load", "num_scratch", "scratch", "smem_transforms",
           "split_run"]
