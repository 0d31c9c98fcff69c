"""The paged KV cache: a preallocated pool of pages and the block tables that index it.

Both are immutable pytrees, so they can be threaded through jitted steps and donated.
Layout of one pool (K or V): ``[num_layers, num_kv_heads, num_pages, page_size, head_dim]``,
head-major so one page of one head is contiguous and the kv-head axis is the one
tensor parallelism shards. Page 0 is the null page: never handed out, the target of
padded table entries and padded writes, so every gather and scatter index is in range.

8-bit pools (``int8`` or ``float8_e4m3fn``) also hold one bfloat16 scale per token and kv
head, ``[num_layers, num_kv_heads, num_pages, page_size]``: the pages' layout minus
head_dim, so every page operation (copy, swap, tensor-parallel split over kv heads) moves
the scales with their pages. ``jpaged.pallas_kernels.quantization`` says why this granularity.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.core.shapes import check_positive
from jpaged.pallas_kernels.quantization import FORMATS, SCALE_DTYPE, is_quantized, quantize

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
KV_CACHE_DTYPES = ("auto", "int8", "fp8")


def _check_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in FLOAT_DTYPES] and not is_quantized(dtype):
        raise ValueError(f"cache dtype must be float32, bfloat16 or float16, got {dtype} "
                         f"(8-bit pools: int8 or float8_e4m3fn)")
    if dtype.name == "float8_e4m3fn":
        _check_fp8_backend()
    return dtype


def kv_cache_dtype(name, model_dtype) -> jnp.dtype:
    """The pool's dtype for ``kv_cache_dtype=name``: "auto" (the model's dtype), "int8"
    (symmetric int8 codes) or "fp8" (float8_e4m3fn codes), both with per-token scales."""
    if not isinstance(name, str) or name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={name!r} is not one of {KV_CACHE_DTYPES}")
    if name == "auto":
        return _check_dtype(model_dtype)
    if name not in FORMATS:
        raise ValueError(f"kv_cache_dtype={name!r} needs jnp.float8_e4m3fn, which jax "
                         f"{jax.__version__} does not have")
    return _check_dtype(FORMATS[name])


@functools.cache
def _fp8_works(backend: str) -> bool:
    try:
        x = jnp.arange(4, dtype=jnp.float32)
        return bool(jnp.array_equal(jax.jit(lambda a: a.astype(FORMATS["fp8"])
                                            .astype(jnp.float32))(x), x))
    except Exception:  # any lowering or runtime failure means: not on this device
        return False


def _check_fp8_backend() -> None:
    backend = jax.default_backend()
    if not _fp8_works(backend):
        raise ValueError(f"kv_cache_dtype='fp8' (float8_e4m3fn) does not run on this "
                         f"{backend!r} device with jax {jax.__version__}; use 'int8'")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The page pool for every layer.

    k, v: ``[num_layers, num_kv_heads, num_pages, page_size, head_dim]``, a float dtype, or
    int8 / float8_e4m3fn codes with k_scale, v_scale ``bfloat16[num_layers, num_kv_heads,
    num_pages, page_size]`` (None for float pages). Every leaf is indexed
    ``[layer, kv head, page, ...]``, so page operations map over the leaves.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def create(cls, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
               num_pages: int, dtype=jnp.float32, sharding=None) -> "KVCache":
        """A zero-filled pool; ``num_pages`` counts the null page."""
        check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        page_size=page_size)
        if not isinstance(num_pages, (int, np.integer)) or num_pages < 2:
            raise ValueError(f"num_pages must be an integer >= 2 (page 0 is the null page), "
                             f"got {num_pages!r}")
        dtype = _check_dtype(dtype)
        shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)

        def zeros():
            if not is_quantized(dtype):
                return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
            return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       k_scale=jnp.zeros(shape[:-1], SCALE_DTYPE),
                       v_scale=jnp.zeros(shape[:-1], SCALE_DTYPE))

        # One sharding for every leaf: scales split over kv heads like their pages.
        return jax.jit(zeros, out_shardings=sharding)()

    @staticmethod
    def bytes_per_page(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                       dtype=jnp.float32) -> int:
        """Bytes of one page in every layer: K and V, and their scales when 8-bit."""
        check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        page_size=page_size)
        dtype = _check_dtype(dtype)
        token_bytes = head_dim * dtype.itemsize
        if is_quantized(dtype):
            token_bytes += SCALE_DTYPE.itemsize
        return 2 * num_layers * num_kv_heads * page_size * token_bytes

    @classmethod
    def pages_for_memory(cls, memory_bytes: int, num_layers: int, num_kv_heads: int,
                         head_dim: int, page_size: int, dtype=jnp.float32) -> int:
        """How many pages (null page included) fit in ``memory_bytes`` of K plus V (plus
        their scales for an 8-bit pool)."""
        page_bytes = cls.bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype)
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
    def quantized(self) -> bool:
        """Whether the pages hold 8-bit codes with scales."""
        return is_quantized(self.k.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by K and V together, scales included."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    def layer(self, i) -> tuple[jax.Array, jax.Array]:
        """K and V pages of layer ``i`` (int or traced scalar): each ``[Hkv, P, S, D]``."""
        return self.k[i], self.v[i]


def check_pages(k, v, k_scale=None, v_scale=None) -> None:
    """K/V pages ``[..., S, D]`` and their scales: float pages without scales, or 8-bit
    pages with scales ``[..., S]`` (the pages' shape minus head_dim)."""
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k_pages and v_pages must match, got {tuple(k.shape)} {k.dtype} and "
                         f"{tuple(v.shape)} {v.dtype}")
    if not is_quantized(k.dtype):
        if not jnp.issubdtype(k.dtype, jnp.floating):
            raise ValueError(f"pages must be float, int8 or float8_e4m3fn, got {k.dtype}")
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is not None:
                raise ValueError(f"{name} given for {k.dtype} pages; scales go with 8-bit "
                                 f"(int8, float8_e4m3fn) pages only")
        return
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"{k.dtype} pages need {name} of shape {tuple(k.shape[:-1])}, "
                             f"got None")
        if tuple(scale.shape) != tuple(k.shape[:-1]):
            raise ValueError(f"{name} must have the pages' shape minus head_dim "
                             f"{tuple(k.shape[:-1])}, got {tuple(scale.shape)}")
        if not jnp.issubdtype(scale.dtype, jnp.floating) or scale.dtype.itemsize < 2:
            raise ValueError(f"{name} must be a 16- or 32-bit float array, got {scale.dtype}")


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
            # Adjacent advanced indices keep their place: the target is [L, Hkv, T(, D)].
            return pool.at[:, :, pages, offsets].set(jnp.swapaxes(new, 1, 2))
        # Advanced indices split by a slice move to the front: the target is [T, Hkv(, D)].
        return pool.at[layer, :, pages, offsets].set(new)

    if not cache.quantized:
        return KVCache(k=scatter(cache.k, k), v=scatter(cache.v, v))
    (k, k_scale), (v, v_scale) = quantize(k, cache.dtype), quantize(v, cache.dtype)
    return KVCache(k=scatter(cache.k, k), v=scatter(cache.v, v),
                   k_scale=scatter(cache.k_scale, k_scale),
                   v_scale=scatter(cache.v_scale, v_scale))


def copy_pages(cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Copy whole pages ``src[i] -> dst[i]`` in every layer (copy-on-write), scales with
    their pages.

    src, dst: ``int32[N]``; pad both with 0 (null page onto itself) to keep shapes bucketed.
    """
    return jax.tree.map(lambda pool: pool.at[:, :, dst].set(pool[:, :, src]), cache)


def take_pages(cache: KVCache, pages: jax.Array) -> KVCache:
    """Pages ``int32[N]`` of every layer (swap-out) as a KVCache of N pages, scales included."""
    return jax.tree.map(lambda pool: pool[:, :, pages], cache)


def put_pages(cache: KVCache, pages: jax.Array, taken: KVCache) -> KVCache:
    """Write ``taken`` (from ``take_pages``, any array type) into ``pages`` (swap-in)."""
    return jax.tree.map(lambda pool, new: pool.at[:, :, pages].set(new), cache, taken)
