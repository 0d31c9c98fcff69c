"""The paged KV cache: a preallocated pool of pages and the block tables that index it.

Both are immutable pytrees, so they can be threaded through jitted steps and donated.
Layout of one pool (K or V): ``[num_layers, num_kv_heads, num_pages, page_size, head_dim]``,
head-major so one page of one head is contiguous and the kv-head axis is the one
tensor parallelism shards. Page 0 is the null page: never handed out, the target of
padded table entries and padded writes, so every gather and scatter index is in range.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.shapes import check_positive

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_float_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
        raise ValueError(f"cache dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The page pool for every layer.

    k, v: ``[num_layers, num_kv_heads, num_pages, page_size, head_dim]``, any float dtype.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def create(cls, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
               num_pages: int, dtype=jnp.float32, sharding=None) -> "KVCache":
        """A zero-filled pool; ``num_pages`` counts the null page."""
        check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        page_size=page_size)
        if not isinstance(num_pages, (int, np.integer)) or num_pages < 2:
            raise ValueError(f"num_pages must be an integer >= 2 (page 0 is the null page), "
                             f"got {num_pages!r}")
        dtype = _check_float_dtype(dtype)
        shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(k=zeros(), v=zeros())

    @staticmethod
    def pages_for_memory(memory_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
                         page_size: int, dtype=jnp.float32) -> int:
        """How many pages (null page included) fit in ``memory_bytes`` of K plus V."""
        check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        page_size=page_size)
        dtype = _check_float_dtype(dtype)
        page_bytes = 2 * num_layers * num_kv_heads * page_size * head_dim * dtype.itemsize
        num_pages = int(memory_bytes) // page_bytes
        if num_pages < 2:
            raise ValueError(f"memory budget {memory_bytes} bytes holds {num_pages} pages of "
                             f"{page_bytes} bytes; need at least 2 (page 0 is the null page)")
        return num_pages

    @classmethod
    def from_memory(cls, memory_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int,
                    page_size: int, dtype=jnp.float32, sharding=None) -> "KVCache":
        """The largest pool whose K and V together fit in ``memory_bytes``."""
        num_pages = cls.pages_for_memory(memory_bytes, num_layers, num_kv_heads, head_dim,
                                         page_size, dtype)
        return cls.create(num_layers, num_kv_heads, head_dim, page_size, num_pages, dtype,
                          sharding)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def dtype(self) -> jnp.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by K and V together."""
        return self.k.size * self.k.dtype.itemsize + self.v.size * self.v.dtype.itemsize

    def layer(self, i) -> tuple[jax.Array, jax.Array]:
        """K and V pages of layer ``i`` (int or traced scalar): each ``[Hkv, P, S, D]``."""
        return self.k[i], self.v[i]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageTable:
    """Block tables and lengths of a batch of sequences.

    block_tables: ``int32[batch, max_pages_per_seq]``, physical page of each logical page
    (0, the null page, where unused). lengths: ``int32[batch]``, tokens in each sequence.
    """

    block_tables: jax.Array
    lengths: jax.Array

    @classmethod
    def from_lists(cls, pages: Sequence[Sequence[int]], lengths: Sequence[int],
                   batch: int | None = None, width: int | None = None) -> "PageTable":
        """Pad ragged page lists to ``[batch, width]`` with the null page and length 0."""
        if len(pages) != len(lengths):
            raise ValueError(f"got {len(pages)} page lists but {len(lengths)} lengths")
        batch = len(pages) if batch is None else batch
        width = max([len(p) for p in pages] + [1]) if width is None else width
        if batch < len(pages):
            raise ValueError(f"batch={batch} is smaller than the {len(pages)} sequences given")
        tables = np.zeros((batch, width), np.int32)
        for row, seq_pages in enumerate(pages):
            if len(seq_pages) > width:
                raise ValueError(f"sequence {row} has {len(seq_pages)} pages, more than "
                                 f"width={width}")
            tables[row, :len(seq_pages)] = seq_pages
        padded_lengths = np.zeros((batch,), np.int32)
        padded_lengths[:len(lengths)] = lengths
        return cls(block_tables=jnp.asarray(tables), lengths=jnp.asarray(padded_lengths))

    @property
    def batch(self) -> int:
        return self.block_tables.shape[0]

    @property
    def max_pages_per_seq(self) -> int:
        return self.block_tables.shape[1]

    def validate(self, num_pages: int, page_size: int) -> None:
        """Host-side checks before launch: raise ValueError naming the bad value.

        Shapes and dtypes always; values are skipped when traced (inside jit).
        """
        check_table_arrays(self.block_tables, self.lengths)
        self.check_values(num_pages, page_size)

    def check_values(self, num_pages: int, page_size: int) -> None:
        """Page ids in ``[0, num_pages)``, lengths within the table's capacity; nothing
        when the table is traced."""
        if isinstance(self.block_tables, jax.core.Tracer) or isinstance(self.lengths,
                                                                         jax.core.Tracer):
            return
        tables = np.asarray(self.block_tables)
        lengths = np.asarray(self.lengths)
        bad = (tables < 0) | (tables >= num_pages)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(f"page id {tables[row, col]} at block_tables[{row}, {col}] is "
                             f"outside [0, {num_pages})")
        if (lengths < 0).any():
            row = int(np.argmax(lengths < 0))
            raise ValueError(f"negative length {lengths[row]} for sequence {row}")
        capacity = tables.shape[1] * page_size
        if (lengths > capacity).any():
            row = int(np.argmax(lengths > capacity))
            raise ValueError(f"length {lengths[row]} of sequence {row} exceeds the table's "
                             f"capacity max_pages_per_seq * page_size = {tables.shape[1]} * "
                             f"{page_size} = {capacity}")


def check_table_arrays(block_tables, lengths) -> None:
    """Rank and dtype checks that hold for concrete and traced tables alike."""
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be rank 2 [batch, max_pages_per_seq], got shape "
                         f"{tuple(block_tables.shape)}")
    if block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if lengths.ndim != 1 or lengths.shape[0] != block_tables.shape[0]:
        raise ValueError(f"lengths must be [batch={block_tables.shape[0]}], got shape "
                         f"{tuple(lengths.shape)}")
    if lengths.dtype != jnp.int32:
        raise ValueError(f"lengths must be int32, got {lengths.dtype}")


def slots_for(pages: Sequence[int], start: int, count: int, page_size: int) -> np.ndarray:
    """Slot ids of tokens ``start .. start + count - 1`` of a sequence owning ``pages``."""
    positions = np.arange(start, start + count)
    if count and positions[-1] // page_size >= len(pages):
        raise ValueError(f"token {positions[-1]} needs page {positions[-1] // page_size} but "
                         f"the sequence owns {len(pages)} pages")
    return (np.asarray(pages, np.int64)[positions // page_size] * page_size
            + positions % page_size).astype(np.int32)


def write(cache: KVCache, k: jax.Array, v: jax.Array, slots: jax.Array,
          layer=None) -> KVCache:
    """Scatter new K/V into their slots; jittable, in place when ``cache`` is donated.

    k, v: ``[T, Hkv, D]`` for one ``layer`` (int or traced scalar), or ``[L, T, Hkv, D]`` for
    all layers when ``layer`` is None. slots: ``int32[T]``, ``page * page_size + offset``;
    padding tokens point into the null page (slot 0 .. page_size - 1).
    """
    all_layers = layer is None
    expected_rank = 4 if all_layers else 3
    if k.ndim != expected_rank or k.shape != v.shape:
        raise ValueError(f"k and v must both be {'[L, T, Hkv, D]' if all_layers else '[T, Hkv, D]'}"
                         f", got {tuple(k.shape)} and {tuple(v.shape)}")
    kv_shape = (cache.num_kv_heads, cache.head_dim)
    if tuple(k.shape[-2:]) != kv_shape:
        raise ValueError(f"new K/V have (heads, head_dim) = {tuple(k.shape[-2:])}, the cache has "
                         f"{kv_shape}")
    if slots.ndim != 1 or slots.shape[0] != k.shape[-3]:
        raise ValueError(f"slots must be [T={k.shape[-3]}], got shape {tuple(slots.shape)}")
    pages = slots // cache.page_size
    offsets = slots % cache.page_size

    def scatter(pool, new):
        new = new.astype(pool.dtype)
        if all_layers:
            # Adjacent advanced indices keep their place: the target is [L, Hkv, T, D].
            return pool.at[:, :, pages, offsets].set(jnp.swapaxes(new, 1, 2))
        # Advanced indices split by a slice move to the front: the target is [T, Hkv, D].
        return pool.at[layer, :, pages, offsets].set(new)

    return KVCache(k=scatter(cache.k, k), v=scatter(cache.v, v))


def copy_pages(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Copy whole pages ``src[i] -> dst[i]`` in every layer (copy-on-write, swap-in).

    src, dst: ``int32[N]``; pad both with 0 (null page onto itself) to keep shapes bucketed.
    """
    return KVCache(k=cache.k.at[:, :, dst].set(cache.k[:, :, src]),
                   v=cache.v.at[:, :, dst].set(cache.v[:, :, src]))
