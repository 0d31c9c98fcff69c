"""Paged attention: every implementation against the reference, the reference against an
independent float64 numpy softmax, the dispatcher's choices and its bad-input errors.

Every slot a query may not see (past a sequence's length, free pages, the null page,
stale pages left in a table row) holds NaN, so any leak shows up as NaN in the output.
"""

import functools
import importlib.util
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jpaged.core import attention
from jpaged.core.attention import (AttentionMetadata, cached_attention, dense_attention,
                              paged_attention, paged_prefill_attention)
from jpaged.core.cache import KVCache, PageTable
from jpaged.pallas_kernels import reference, xla_attention

HAS_PALLAS_DECODE = importlib.util.find_spec("jpaged.pallas_kernels.paged_decode") is not None
OPTIONS = ("sm_scale", "soft_cap", "sliding_window")
# Jitted: one compile per configuration, reused by every example drawn for it.
decode_reference = jax.jit(reference.paged_decode_reference, static_argnames=OPTIONS)
prefill_reference = jax.jit(reference.paged_prefill_reference, static_argnames=OPTIONS)
# Output tolerance against a float32 reference fed the same (rounded) inputs: about one
# unit in the last place of outputs of magnitude up to ~4.
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2,
             jnp.dtype(jnp.float16): 4e-3}
BATCH = 3


def config(page_size, width, num_kv_heads, group, head_dim, dtype, stacked=False,
           pages_per_block=None, **options):
    """The static part of a case (shapes, dtype, options): one compile each. Hypothesis
    draws the values (lengths, tables, data) for it."""
    return dict(page_size=page_size, width=width, num_kv_heads=num_kv_heads, group=group,
                head_dim=head_dim, dtype=jnp.dtype(dtype), stacked=stacked,
                pages_per_block=pages_per_block, options=options)


def config_id(case):
    options = "".join(f"-{name}{value}" for name, value in case["options"].items())
    return (f"S{case['page_size']}-D{case['head_dim']}-G{case['group']}-{case['dtype'].name}"
            f"{'-stacked' if case['stacked'] else ''}{options}")


# Together: page sizes 8/16/32, head_dim 64/128, q/kv head ratios 1/4/8, the three dtypes,
# one layer or the stacked pool, soft cap, sliding window, sm_scale, pages per block.
DECODE_CONFIGS = [
    config(8, 3, num_kv_heads=2, group=1, head_dim=64, dtype=jnp.float32, stacked=True),
    config(16, 2, num_kv_heads=1, group=4, head_dim=128, dtype=jnp.bfloat16, soft_cap=5.0),
    config(32, 2, num_kv_heads=1, group=8, head_dim=64, dtype=jnp.float16, stacked=True,
           pages_per_block=1, sliding_window=7),
    config(16, 3, num_kv_heads=2, group=4, head_dim=64, dtype=jnp.float32, pages_per_block=2,
           soft_cap=5.0, sliding_window=40, sm_scale=0.3),
    config(8, 3, num_kv_heads=1, group=8, head_dim=128, dtype=jnp.bfloat16, stacked=True,
           pages_per_block=2),
    # Keys of >= 2 KiB: on a CPU the decode walks one sequence at a time (lax.map).
    config(8, 4, num_kv_heads=4, group=2, head_dim=128, dtype=jnp.float32, stacked=True,
           soft_cap=5.0, sliding_window=13),
    config(16, 3, num_kv_heads=8, group=1, head_dim=64, dtype=jnp.bfloat16, pages_per_block=1),
]
PREFILL_CONFIGS = [
    config(8, 3, num_kv_heads=2, group=1, head_dim=64, dtype=jnp.float32),
    config(16, 2, num_kv_heads=1, group=4, head_dim=128, dtype=jnp.bfloat16, soft_cap=5.0,
           sliding_window=20),
    config(8, 2, num_kv_heads=2, group=4, head_dim=64, dtype=jnp.float16, pages_per_block=1,
           sliding_window=3),
]


def build_pool(rng, lengths, *, page_size, width, num_kv_heads, head_dim, dtype,
               num_layers=1, spare_pages=2):
    """A NaN pool where only the slots of each sequence's first ``length`` tokens hold data.

    Table rows are random permuted pages; past a row's last needed page an entry is either
    the null page or a stale page (both NaN). Returns (k, v ``[L, Hkv, P, S, D]``,
    block_tables ``int32[B, W]``).
    """
    batch = len(lengths)
    num_pages = 1 + batch * width + spare_pages
    tables = rng.permutation(np.arange(1, num_pages))[:batch * width].reshape(batch, width)
    needed = -(-np.asarray(lengths) // page_size)
    unused = np.arange(width)[None, :] >= needed[:, None]
    tables = np.where(unused & (rng.random(tables.shape) < 0.5), 0, tables).astype(np.int32)
    shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    pools = []
    for _ in range(2):
        pool = np.full(shape, np.nan, np.float32)
        for row, length in enumerate(lengths):
            positions = np.arange(length)
            pool[:, :, tables[row, positions // page_size], positions % page_size] = (
                rng.standard_normal((num_layers, num_kv_heads, length, head_dim)))
        pools.append(jnp.asarray(pool, dtype))
    return pools[0], pools[1], tables


def lengths_strategy(page_size, width):
    """A sequence length: the edge cases (0, 1, a full page, one past a page, the table's
    capacity) or anything in between."""
    capacity = page_size * width
    return st.one_of(st.sampled_from([0, 1, page_size, page_size + 1, capacity]),
                     st.integers(0, capacity))


def make_decode(case, lengths, seed=0):
    """Inputs for paged_attention (args, layer kwargs) plus the float32 reference output."""
    rng = np.random.default_rng(seed)
    k, v, tables = build_pool(rng, lengths, page_size=case["page_size"], width=case["width"],
                              num_kv_heads=case["num_kv_heads"], head_dim=case["head_dim"],
                              dtype=case["dtype"], num_layers=2 if case["stacked"] else 1)
    num_q_heads = case["num_kv_heads"] * case["group"]
    q = jnp.asarray(rng.standard_normal((len(lengths), num_q_heads, case["head_dim"])),
                    case["dtype"])
    table = PageTable(jnp.asarray(tables), jnp.asarray(lengths, jnp.int32))
    layer = 1 if case["stacked"] else 0
    expected = decode_reference(
        q.astype(jnp.float32), k[layer].astype(jnp.float32), v[layer].astype(jnp.float32),
        table.block_tables, table.lengths, **case["options"])
    if case["stacked"]:
        return (q, k, v, table), dict(layer=1), expected
    return (q, k[0], v[0], table), {}, expected


def assert_close(got, expected, dtype, scale=1.0):
    assert got.dtype == dtype
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all(), "NaN or inf leaked into the output"
    tol = TOLERANCE[jnp.dtype(dtype)] * scale
    np.testing.assert_allclose(got, np.asarray(expected, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", DECODE_CONFIGS, ids=config_id)
@given(data=st.data())
def test_xla_decode_matches_reference(case, data):
    lengths = data.draw(st.lists(lengths_strategy(case["page_size"], case["width"]),
                                 min_size=BATCH, max_size=BATCH), label="lengths")
    args, layer, expected = make_decode(case, lengths, seed=data.draw(st.integers(0, 99)))
    out = paged_attention(*args, impl="xla", pages_per_block=case["pages_per_block"], **layer,
                          **case["options"])
    assert_close(out, expected, case["dtype"])
    assert not np.asarray(out, np.float32)[np.asarray(lengths) == 0].any()


@pytest.mark.skipif(not HAS_PALLAS_DECODE, reason="jpaged.pallas_kernels.paged_decode not written yet")
@pytest.mark.parametrize("case, lengths", [
    (config(16, 2, num_kv_heads=2, group=4, head_dim=64, dtype=jnp.float32, stacked=True),
     [0, 17]),
    (config(8, 3, num_kv_heads=1, group=1, head_dim=64, dtype=jnp.bfloat16, soft_cap=5.0,
            sliding_window=9), [24, 1]),
], ids=["gqa-f32-stacked", "mha-bf16-window-cap"])
def test_pallas_interpret_matches_reference(case, lengths):
    args, layer, expected = make_decode(case, lengths)
    out = paged_attention(*args, impl="pallas", **layer, **case["options"])
    # The kernel may round probabilities to the cache dtype before the PV dot.
    assert_close(out, expected, case["dtype"], scale=2.0)


def make_prefill(case, totals, prefixes, seed=0):
    """This step's chunk of every sequence (after its cached prefix), flattened in random
    order and padded to a fixed token count with tokens on an empty row; plus the float32
    reference output. Returns (args, expected, number of real tokens)."""
    rng = np.random.default_rng(seed)
    totals = list(totals) + [0]  # the last row is empty, for padding tokens
    k, v, tables = build_pool(rng, totals, page_size=case["page_size"], width=case["width"],
                              num_kv_heads=case["num_kv_heads"], head_dim=case["head_dim"],
                              dtype=case["dtype"], num_layers=2)
    q_seq = np.concatenate([np.full(total - prefix, row) for row, (total, prefix)
                            in enumerate(zip(totals, prefixes))]).astype(np.int32)
    q_pos = np.concatenate([np.arange(prefix, total)
                            for total, prefix in zip(totals, prefixes)]).astype(np.int32)
    num_tokens = BATCH * case["page_size"] * case["width"] + 1  # shapes fixed per config
    padding = num_tokens - len(q_seq)
    q_seq = np.concatenate([q_seq, np.full(padding, BATCH, np.int32)])
    q_pos = np.concatenate([q_pos, np.zeros(padding, np.int32)])
    order = rng.permutation(num_tokens)
    q_seq, q_pos = jnp.asarray(q_seq[order]), jnp.asarray(q_pos[order])
    num_q_heads = case["num_kv_heads"] * case["group"]
    q = jnp.asarray(rng.standard_normal((num_tokens, num_q_heads, case["head_dim"])),
                    case["dtype"])
    table = PageTable(jnp.asarray(tables), jnp.asarray(totals, jnp.int32))
    expected = prefill_reference(
        q.astype(jnp.float32), k[1].astype(jnp.float32), v[1].astype(jnp.float32),
        table.block_tables, table.lengths, q_seq, q_pos, **case["options"])
    return (q, k, v, table, q_seq, q_pos), expected


@pytest.mark.parametrize("case", PREFILL_CONFIGS, ids=config_id)
@given(data=st.data())
def test_xla_prefill_matches_reference(case, data):
    """Several sequences, each with a random cached prefix and this step's chunk."""
    totals = data.draw(st.lists(lengths_strategy(case["page_size"], case["width"]),
                                min_size=BATCH, max_size=BATCH), label="totals")
    prefixes = [data.draw(st.integers(0, total), label="prefix") for total in totals]
    args, expected = make_prefill(case, totals, prefixes, seed=data.draw(st.integers(0, 99)))
    out = paged_prefill_attention(*args, impl="xla", layer=1,
                                  pages_per_block=case["pages_per_block"], **case["options"])
    assert_close(out, expected, case["dtype"])


@pytest.mark.parametrize("block_tokens, options", [
    (None, dict()),
    (16, dict(soft_cap=5.0, sliding_window=9, sm_scale=0.2)),  # 40 keys: a shifted last block
])
def test_xla_dense_matches_reference(block_tokens, options):
    rng = np.random.default_rng(3)
    lengths = jnp.array([0, 1, 16, 17, 40], jnp.int32)
    k = rng.standard_normal((5, 2, 40, 64)).astype(np.float32)
    v = rng.standard_normal((5, 2, 40, 64)).astype(np.float32)
    past = np.arange(40)[None, None, :, None] >= np.asarray(lengths)[:, None, None, None]
    k, v = jnp.asarray(np.where(past, np.nan, k)), jnp.asarray(np.where(past, np.nan, v))
    q = jnp.asarray(rng.standard_normal((5, 8, 64)), jnp.float32)
    expected = jax.jit(functools.partial(dense_attention, impl="reference", **options))(
        q, k, v, lengths)
    if block_tokens is None:
        out = dense_attention(q, k, v, lengths, **options)
    else:
        out = xla_attention.dense_decode(q, k, v, lengths, block_tokens=block_tokens, **options)
    assert_close(out, expected, jnp.float32)


def numpy_attention(q, k_pages, v_pages, tables, lengths, q_seq, q_pos, *, sm_scale=None,
                    soft_cap=None, sliding_window=None):
    """Float64, one query and one head at a time, straight from the definition."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    num_q_heads, head_dim = q.shape[1:]
    page_size = k_pages.shape[2]
    group = num_q_heads // k_pages.shape[0]
    scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    out = np.zeros(q.shape)
    for n, (row, pos) in enumerate(zip(q_seq, q_pos)):
        keys = [t for t in range(min(lengths[row], pos + 1))
                if sliding_window is None or t > pos - sliding_window]
        if not keys:
            continue
        pages = [tables[row][t // page_size] for t in keys]
        offsets = [t % page_size for t in keys]
        for h in range(num_q_heads):
            k = k_pages[h // group, pages, offsets]
            v = v_pages[h // group, pages, offsets]
            logits = k @ q[n, h] * scale
            if soft_cap is not None:
                logits = soft_cap * np.tanh(logits / soft_cap)
            weights = np.exp(logits - logits.max())
            out[n, h] = weights @ v / weights.sum()
    return out


@pytest.mark.parametrize("options", [dict(), dict(soft_cap=3.0, sliding_window=6, sm_scale=0.4)])
def test_reference_matches_float64_numpy(options):
    rng = np.random.default_rng(4)
    lengths = [0, 1, 8, 9, 24]
    k, v, tables = build_pool(rng, lengths, page_size=8, width=3, num_kv_heads=2, head_dim=16,
                              dtype=jnp.float32)
    k, v = k[0], v[0]
    q = rng.standard_normal((5, 4, 16)).astype(np.float32)
    rows = np.arange(5)
    decode = decode_reference(q, k, v, tables, np.array(lengths), **options)
    np.testing.assert_allclose(decode, numpy_attention(q, k, v, tables, lengths, rows,
                                                       np.array(lengths) - 1, **options),
                               rtol=1e-5, atol=1e-5)
    q_seq = np.array([4, 4, 4, 3, 2, 1], np.int32)
    q_pos = np.array([0, 11, 23, 8, 5, 0], np.int32)
    qp = rng.standard_normal((6, 4, 16)).astype(np.float32)
    prefill = prefill_reference(qp, k, v, tables, np.array(lengths), q_seq, q_pos, **options)
    np.testing.assert_allclose(prefill, numpy_attention(qp, k, v, tables, lengths, q_seq,
                                                        q_pos, **options),
                               rtol=1e-5, atol=1e-5)


def test_cached_attention_traced_layer_under_jit():
    """A model's layer scan: the whole pool in the carry, layer traced, write then attend."""
    rng = np.random.default_rng(5)
    case = config(8, 3, num_kv_heads=2, group=4, head_dim=64, dtype=jnp.float32, stacked=True)
    lengths = np.array([5, 17, 0])
    (q, k_pool, v_pool, table), _, _ = make_decode(case, lengths)
    cache = KVCache(k=k_pool, v=v_pool)
    # Decode step: each sequence's next token goes to slot length, then attends.
    tables = np.asarray(table.block_tables)
    slots = np.array([tables[b, n // 8] * 8 + n % 8 for b, n in enumerate(lengths)], np.int32)
    slots[2] = 0  # the empty row is padding: its token goes into the null page
    new_lengths = jnp.asarray(np.where(lengths > 0, lengths + 1, 0), jnp.int32)
    meta = AttentionMetadata(slot_mapping=jnp.asarray(slots), q_seq=jnp.arange(3),
                             positions=new_lengths - 1,
                             page_table=PageTable(table.block_tables, new_lengths),
                             is_decode=True)
    k_new = jnp.asarray(rng.standard_normal((3, 2, 64)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((3, 2, 64)), jnp.float32)

    @functools.partial(jax.jit, static_argnames="decode")
    def step(cache, layer, decode):
        step_meta = meta if decode else as_prefill(meta)
        return cached_attention(q, k_new, v_new, cache, layer, step_meta, impl="xla")

    for decode in (True, False):
        out, new_cache = step(cache, jnp.int32(1), decode)
        expected = decode_reference(q, new_cache.k[1], new_cache.v[1], table.block_tables,
                                    new_lengths)
        assert_close(out, expected, jnp.float32)
        np.testing.assert_array_equal(new_cache.k[0], cache.k[0])


def as_prefill(meta):
    """The same step as prefill metadata (one token per row)."""
    return AttentionMetadata(meta.slot_mapping, meta.q_seq, meta.positions, meta.page_table,
                             is_decode=False)


def test_auto_is_xla_on_cpu_and_falls_back_with_a_warning_on_gpu(monkeypatch):
    case = config(8, 2, num_kv_heads=1, group=2, head_dim=48, dtype=jnp.float32)
    args, _, expected = make_decode(case, [3, 16])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(paged_attention(*args), expected, jnp.float32)
    if not HAS_PALLAS_DECODE:
        return
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    with pytest.warns(UserWarning, match="head_dim=48 .*using the XLA path"):
        out = paged_attention(*args)
    assert_close(out, expected, jnp.float32)
    with pytest.raises(ValueError, match="head_dim=48"):
        paged_attention(*args, impl="pallas")


def small_inputs(num_layers=None, lengths=(3, 9)):
    """q [2, 4, 8] over a pool of 6 pages of 4 tokens, 2 kv heads."""
    shape = (2, 6, 4, 8) if num_layers is None else (num_layers, 2, 6, 4, 8)
    pages = jnp.zeros(shape)
    table = PageTable(jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32),
                      jnp.array(lengths, jnp.int32))
    return jnp.ones((2, 4, 8)), pages, table


def table_of(tables, lengths):
    return PageTable(np.asarray(tables), np.asarray(lengths))


BAD_DECODE = [
    (dict(q=jnp.ones((2, 4))), r"q must be rank 3 \[tokens, Hq, D\], got shape \(2, 4\)"),
    (dict(q=jnp.ones((2, 4, 8), jnp.int32)), "q must be a float array, got dtype int32"),
    (dict(q=jnp.ones((2, 3, 8))), "2 K/V heads do not divide the 3 query heads"),
    (dict(q=jnp.ones((2, 4, 16))), "q has head_dim 16 but the K/V have head_dim 8"),
    (dict(q=jnp.ones((3, 4, 8))), "q has batch 3 but the page table has 2 rows"),
    (dict(v_pages=jnp.zeros((2, 6, 4, 4))), "k_pages and v_pages must match"),
    (dict(k_pages=jnp.zeros((6, 4, 8)), v_pages=jnp.zeros((6, 4, 8))),
     r"pages must be \[Hkv, P, S, D\] or \[L, Hkv, P, S, D\], got shape \(6, 4, 8\)"),
    (dict(table=table_of(np.array([[1, 2, 3], [4, 5, 0]], np.int64), [3, 9])),
     "block_tables must be int32, got int64"),
    (dict(table=table_of(np.array([1, 2], np.int32), [3, 9])), "block_tables must be rank 2"),
    (dict(table=table_of(np.array([[1, 2, 6], [4, 5, 0]], np.int32), np.array([3, 9], np.int32))),
     r"page id 6 at block_tables\[0, 2\] is outside \[0, 6\)"),
    (dict(table=table_of(np.array([[1, 2, 3], [4, 5, 0]], np.int32), np.array([13, 9], np.int32))),
     "length 13 of sequence 0 exceeds the table's capacity"),
    (dict(table=table_of(np.array([[1, 2, 3], [4, 5, 0]], np.int32), np.array([3, -1], np.int32))),
     "negative length -1 for sequence 1"),
    (dict(impl="fast"), "impl='fast' is not one of"),
    (dict(layer=0), r"layer=0 needs the stacked pool \[L, Hkv, P, S, D\]"),
    (dict(soft_cap=0.0), "soft_cap=0.0 must be positive"),
    (dict(sliding_window=0), "sliding_window must be a positive integer, got 0"),
    (dict(pages_per_block=0), "pages_per_block must be a positive integer, got 0"),
]


@pytest.mark.parametrize("change, message", BAD_DECODE)
def test_decode_bad_input(change, message):
    q, pages, table = small_inputs()
    inputs = dict(q=q, k_pages=pages, v_pages=pages, table=table) | change
    args = [inputs.pop(name) for name in ("q", "k_pages", "v_pages", "table")]
    with pytest.raises(ValueError, match=message):
        paged_attention(*args, **inputs)


@pytest.mark.parametrize("layer, message", [
    (None, r"stacked pages \[L=2, Hkv, P, S, D\] need layer="),
    (2, r"layer=2 is outside \[0, 2\)"),
    (jnp.int32(-1), r"layer=-1 is outside \[0, 2\)"),
    (1.0, "layer must be an integer scalar, got 1.0"),
])
def test_stacked_pool_bad_layer(layer, message):
    q, pages, table = small_inputs(num_layers=2)
    with pytest.raises(ValueError, match=message):
        paged_attention(q, pages, pages, table, layer=layer)


@pytest.mark.parametrize("q_seq, q_pos, message", [
    (np.array([0, 2], np.int32), np.array([0, 1], np.int32), r"q_seq value 2 is outside \[0, 2\)"),
    (np.array([0, 1], np.int64), np.array([0, 1], np.int32), r"q_seq must be int32\[T=2\]"),
    (np.array([0, 1], np.int32), np.array([0], np.int32), r"q_pos must be int32\[T=2\]"),
])
def test_prefill_bad_token_index(q_seq, q_pos, message):
    q, pages, table = small_inputs()
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(q, pages, pages, table, q_seq, q_pos)


@pytest.mark.parametrize("change, message", [
    (dict(impl="pallas"), "impl='pallas' for dense attention must be"),
    (dict(lengths=jnp.array([3, 11], jnp.int32)), r"length 11 is outside \[0, L=10\]"),
    (dict(k=jnp.zeros((2, 2, 9, 8))), r"k and v must both be \[B=2, Hkv, L, D\]"),
    (dict(q=jnp.ones((2, 4, 4))), "q has head_dim 4 but the K/V have head_dim 8"),
])
def test_dense_bad_input(change, message):
    inputs = dict(q=jnp.ones((2, 4, 8)), k=jnp.zeros((2, 2, 10, 8)), v=jnp.zeros((2, 2, 10, 8)),
                  lengths=jnp.array([3, 9], jnp.int32)) | change
    args = [inputs.pop(name) for name in ("q", "k", "v", "lengths")]
    with pytest.raises(ValueError, match=message):
        dense_attention(*args, **inputs)


def test_inputs_are_checked_once_per_call(monkeypatch):
    """One validation per call: the page table's values are read once, decode or prefill."""
    calls = []
    check = PageTable.check_values
    monkeypatch.setattr(PageTable, "check_values",
                        lambda self, *args: calls.append(args) or check(self, *args))
    q, pages, table = small_inputs()
    paged_attention(q, pages, pages, table)
    paged_prefill_attention(q, pages, pages, table, np.array([0, 1], np.int32),
                            np.array([2, 8], np.int32))
    assert calls == [(6, 4), (6, 4)]


def test_traced_values_are_checked_when_concrete_only():
    """Inside jit page ids and lengths are unknown: the shapes still are checked."""
    q, pages, table = small_inputs(num_layers=2)
    bad = PageTable(jnp.array([[1, 2, 9], [4, 5, 0]], jnp.int32), jnp.array([3, 9], jnp.int32))
    run = jax.jit(lambda table, layer: paged_attention(q, pages, pages, table, layer=layer))
    assert run(bad, jnp.int32(1)).shape == (2, 4, 8)
    with pytest.raises(ValueError, match="block_tables must be rank 2"):
        run(PageTable(jnp.ones((2,), jnp.int32), jnp.ones((2,), jnp.int32)), 0)


def test_stacked_pool_is_gathered_from_not_copied():
    """With the whole pool and a traced layer, no array of a layer's size or more appears in
    the compiled program but the inputs, free reshapes of them, and the pool handed into a
    loop (get-tuple-element, an alias): no layer is copied."""
    pool = jnp.zeros((3, 2, 101, 16, 64))
    layer_size = pool[0].size
    table = PageTable(jnp.ones((4, 6), jnp.int32), jnp.ones((4,), jnp.int32))
    run = jax.jit(lambda pool, table, layer: paged_attention(
        jnp.ones((4, 8, 64)), pool, pool, table, layer=layer, impl="xla"))
    hlo = run.lower(pool, table, jnp.int32(1)).compile().as_text()
    large = []
    for line in hlo.splitlines():
        shape = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]+)\]", line)
        if shape and np.prod([int(d) for d in shape.group(1).split(",")]) >= layer_size:
            large.append(line.strip())
    free = (" parameter(", " bitcast(", " get-tuple-element(")
    assert large and all(any(op in line for op in free) for line in large), large
