"""The paged KV cache: construction, writes against a numpy scatter, donation, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.core.cache import KVCache, PageTable, copy_pages, slots_for, write

LAYERS, HEADS, HEAD_DIM, PAGE, PAGES = 2, 2, 8, 4, 6


def make_cache(dtype=jnp.float32):
    return KVCache.create(LAYERS, HEADS, HEAD_DIM, PAGE, PAGES, dtype)


def random_cache(rng):
    shape = (LAYERS, HEADS, PAGES, PAGE, HEAD_DIM)
    return KVCache(k=jnp.asarray(rng.standard_normal(shape), jnp.float32),
                   v=jnp.asarray(rng.standard_normal(shape), jnp.float32))


def numpy_write(pool, new, slots):
    """pool [L, H, P, S, D], new [L, T, H, D]: the obvious loop over tokens."""
    pool = np.array(pool)
    for t, slot in enumerate(slots):
        pool[:, :, slot // PAGE, slot % PAGE] = new[:, t]
    return pool


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_create_shapes_dtype_and_nbytes(dtype):
    cache = make_cache(dtype)
    assert cache.k.shape == cache.v.shape == (LAYERS, HEADS, PAGES, PAGE, HEAD_DIM)
    assert cache.dtype == dtype and not jnp.any(cache.k) and not jnp.any(cache.v)
    assert (cache.num_layers, cache.num_kv_heads, cache.num_pages, cache.page_size,
            cache.head_dim) == (LAYERS, HEADS, PAGES, PAGE, HEAD_DIM)
    assert cache.nbytes == 2 * LAYERS * HEADS * PAGES * PAGE * HEAD_DIM * jnp.dtype(dtype).itemsize


def test_from_memory_fits_the_budget():
    page_bytes = 2 * LAYERS * HEADS * PAGE * HEAD_DIM * 2  # K and V, bfloat16
    cache = KVCache.from_memory(10 * page_bytes + page_bytes // 2, LAYERS, HEADS, HEAD_DIM,
                                PAGE, jnp.bfloat16)
    assert cache.num_pages == 10 and cache.nbytes == 10 * page_bytes


def test_write_one_layer_matches_numpy_scatter():
    rng = np.random.default_rng(0)
    cache = random_cache(rng)
    slots = np.array([5, 17, 0, 23, 9], np.int32)  # 0: a padding token into the null page
    k = rng.standard_normal((len(slots), HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((len(slots), HEADS, HEAD_DIM)).astype(np.float32)
    out = jax.jit(write)(cache, k, v, slots, 1)  # traced layer
    for pool, new, got in ((cache.k, k, out.k), (cache.v, v, out.v)):
        expected = np.array(pool)
        expected[1:2] = numpy_write(pool[1:2], new[None], slots)
        np.testing.assert_array_equal(got, expected)


def test_write_all_layers_matches_numpy_scatter_and_casts():
    rng = np.random.default_rng(1)
    cache = make_cache(jnp.bfloat16)
    slots = np.array([4, 5, 6, 20], np.int32)
    k = rng.standard_normal((LAYERS, len(slots), HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((LAYERS, len(slots), HEADS, HEAD_DIM)).astype(np.float32)
    out = write(cache, k, v, jnp.asarray(slots))
    assert out.dtype == jnp.bfloat16
    for pool, new, got in ((cache.k, k, out.k), (cache.v, v, out.v)):
        expected = numpy_write(np.asarray(pool, np.float32), new, slots)
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=1e-2, atol=1e-2)


def test_copy_pages_copies_every_layer_and_pads_with_the_null_page():
    cache = random_cache(np.random.default_rng(2))
    out = copy_pages(cache, jnp.array([3, 0], jnp.int32), jnp.array([5, 0], jnp.int32))
    for pool, got in ((cache.k, out.k), (cache.v, out.v)):
        expected = np.array(pool)
        expected[:, :, 5] = expected[:, :, 3]
        np.testing.assert_array_equal(got, expected)


def test_donated_write_updates_the_pool_in_place():
    cache = make_cache()
    pointers = (cache.k.unsafe_buffer_pointer(), cache.v.unsafe_buffer_pointer())
    step = jax.jit(write, donate_argnums=0)
    k = jnp.ones((3, HEADS, HEAD_DIM))
    out = step(cache, k, 2 * k, jnp.array([4, 5, 6], jnp.int32), 0)
    assert cache.k.is_deleted() and cache.v.is_deleted()
    assert (out.k.unsafe_buffer_pointer(), out.v.unsafe_buffer_pointer()) == pointers
    assert float(out.v[0, 0, 1, 0, 0]) == 2.0


def test_slots_for():
    np.testing.assert_array_equal(slots_for([3, 1], 2, 4, PAGE), [14, 15, 4, 5])
    with pytest.raises(ValueError, match="token 8 needs page 2 but the sequence owns 2 pages"):
        slots_for([3, 1], 6, 3, PAGE)


def test_from_lists_pads_with_the_null_page_and_length_zero():
    table = PageTable.from_lists([[3, 1], [2]], [6, 2], batch=3, width=4)
    np.testing.assert_array_equal(table.block_tables,
                                  [[3, 1, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(table.lengths, [6, 2, 0])
    assert table.block_tables.dtype == table.lengths.dtype == jnp.int32
    assert (table.batch, table.max_pages_per_seq) == (3, 4)
    assert PageTable.from_lists([[3, 1], [2]], [6, 2]).block_tables.shape == (2, 2)
    table.validate(PAGES, PAGE)


@pytest.mark.parametrize("pages, lengths, kwargs, message", [
    ([[1], [2]], [1], {}, "got 2 page lists but 1 lengths"),
    ([[1], [2]], [1, 1], dict(batch=1), "batch=1 is smaller than the 2 sequences"),
    ([[1, 2, 3]], [9], dict(width=2), "sequence 0 has 3 pages, more than width=2"),
])
def test_from_lists_bad_input(pages, lengths, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PageTable.from_lists(pages, lengths, **kwargs)


@pytest.mark.parametrize("tables, lengths, message", [
    ([[1, PAGES]], [4], rf"page id {PAGES} at block_tables\[0, 1\] is outside \[0, {PAGES}\)"),
    ([[1, -1]], [4], r"page id -1 at block_tables\[0, 1\] is outside"),
    ([[1, 2], [3, 4]], [4, 2 * PAGE + 1],
     rf"length {2 * PAGE + 1} of sequence 1 exceeds the table's capacity .* = {2 * PAGE}"),
    ([[1, 2]], [-3], "negative length -3 for sequence 0"),
])
def test_validate_bad_values(tables, lengths, message):
    table = PageTable(jnp.array(tables, jnp.int32), jnp.array(lengths, jnp.int32))
    with pytest.raises(ValueError, match=message):
        table.validate(PAGES, PAGE)


@pytest.mark.parametrize("tables, lengths, message", [
    (np.ones((1, 2), np.int64), np.ones(1, np.int32), "block_tables must be int32, got int64"),
    (np.ones((1, 2), np.float32), np.ones(1, np.int32), "block_tables must be int32, got float32"),
    (np.ones(2, np.int32), np.ones(1, np.int32), r"block_tables must be rank 2 .* shape \(2,\)"),
    (np.ones((1, 2), np.int32), np.ones(1, np.int64), "lengths must be int32, got int64"),
    (np.ones((1, 2), np.int32), np.ones(2, np.int32), r"lengths must be \[batch=1\], got shape"),
])
def test_validate_bad_table_arrays(tables, lengths, message):
    with pytest.raises(ValueError, match=message):
        PageTable(tables, lengths).validate(PAGES, PAGE)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype=jnp.int32), "cache dtype must be float32, bfloat16 or float16, got int32"),
    (dict(num_pages=1), "num_pages must be an integer >= 2 .* got 1"),
    (dict(page_size=0), "page_size must be a positive integer, got 0"),
    (dict(head_dim=2.5), "head_dim must be a positive integer, got 2.5"),
])
def test_create_bad_input(kwargs, message):
    config = dict(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE,
                  num_pages=PAGES) | kwargs
    with pytest.raises(ValueError, match=message):
        KVCache.create(**config)


def test_memory_budget_too_small():
    with pytest.raises(ValueError, match="memory budget 1500 bytes holds 1 pages of 1024 bytes"):
        KVCache.from_memory(1500, LAYERS, HEADS, HEAD_DIM, PAGE)


@pytest.mark.parametrize("k_shape, slots, message", [
    ((3, HEADS + 1, HEAD_DIM), 3, r"new K/V have \(heads, head_dim\) = \(3, 8\), the cache has"),
    ((HEADS, HEAD_DIM), 3, r"k and v must both be \[T, Hkv, D\]"),
    ((3, HEADS, HEAD_DIM), 4, r"slots must be \[T=3\], got shape \(4,\)"),
])
def test_write_bad_input(k_shape, slots, message):
    k = jnp.zeros(k_shape)
    with pytest.raises(ValueError, match=message):
        write(make_cache(), k, k, jnp.zeros(slots, jnp.int32), layer=0)
