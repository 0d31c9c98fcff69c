"""The Pallas decode kernel (interpret mode) against the pure-jnp reference.

Every unused slot and every free page of the pool is NaN (on 8-bit pages: NaN scales,
and NaN codes where the format has them), so a masking bug shows up as NaN rather than
as a small numeric error. Shapes are tiny: each distinct static
configuration costs an interpret-mode compile of a couple of seconds on CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels.quantization import FORMATS, qmax, quantize
from jpaged.pallas_kernels.reference import paged_decode_reference

# Reference in float32 from the same rounded inputs; the kernel feeds bf16/f16
# probabilities to the matrix unit and rounds the output to the input dtype.
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2,
             jnp.dtype(jnp.float16): 4e-3}


def special_lengths(page_size, width):
    """0, 1, exactly one page, one past a page, the table's full capacity."""
    return [0, 1, page_size, page_size + 1, width * page_size]


def make_case(rng, *, lengths, width, page_size, head_dim, num_kv_heads, group, dtype,
              num_layers=1, null_padding=False, q_scale=1.0):
    """Random q and a NaN-poisoned pool holding each sequence's tokens on permuted pages.

    Returns q ``[B, Hq, D]``, k, v ``[L, Hkv, P, S, D]``, block_tables ``int32[B, W]``,
    lengths ``int32[B]``. Table entries past a sequence's last page point at recycled
    (NaN) pages, or at the null page with ``null_padding``.
    """
    lengths = np.asarray(lengths, np.int32)
    batch = len(lengths)
    num_pages = batch * width + 2  # the null page and one page no table uses stay NaN
    tables = rng.permutation(np.arange(1, num_pages))[:batch * width].reshape(batch, width)
    if null_padding:
        used = -(-lengths // page_size)
        tables[np.arange(width)[None, :] >= used[:, None]] = 0
    shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    k = np.full(shape, np.nan, np.float32)
    v = np.full(shape, np.nan, np.float32)
    rows, positions = np.nonzero(np.arange(width * page_size)[None, :] < lengths[:, None])
    pages, offsets = tables[rows, positions // page_size], positions % page_size
    filled = (num_layers, num_kv_heads, len(rows), head_dim)
    k[:, :, pages, offsets] = rng.standard_normal(filled)
    v[:, :, pages, offsets] = rng.standard_normal(filled)
    q = q_scale * rng.standard_normal((batch, num_kv_heads * group, head_dim))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(tables, jnp.int32), jnp.asarray(lengths))


@functools.partial(jax.jit, static_argnames=("layer", "sm_scale", "soft_cap", "sliding_window"))
def reference(q, k, v, tables, lengths, layer=0, **options):
    """The reference in float32 on layer ``layer`` of the stacked pool (jitted: one
    compile is much cheaper than running its ops eagerly)."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return paged_decode_reference(f32(q), f32(k[layer]), f32(v[layer]), tables, lengths,
                                  **options)


def assert_matches(out, expected, dtype):
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any(), "NaN from a masked slot reached the output"
    tol = TOLERANCE[jnp.dtype(dtype)]
    np.testing.assert_allclose(out, np.asarray(expected), atol=tol, rtol=tol)


# Each page size, head dim, GQA ratio and dtype appears at least twice.
SHAPES = [  # page_size, head_dim, num_kv_heads, group, dtype
    (8, 64, 2, 1, jnp.float32),
    (16, 128, 2, 4, jnp.bfloat16),
    (32, 64, 1, 8, jnp.float16),
    (16, 64, 2, 8, jnp.bfloat16),
    (8, 128, 1, 1, jnp.float16),
    (32, 128, 1, 4, jnp.float32),
]


@pytest.mark.parametrize("page_size,head_dim,num_kv_heads,group,dtype", SHAPES)
def test_special_lengths(page_size, head_dim, num_kv_heads, group, dtype):
    width = 3
    case = make_case(np.random.default_rng(page_size + head_dim + group),
                     lengths=special_lengths(page_size, width), width=width,
                     page_size=page_size, head_dim=head_dim, num_kv_heads=num_kv_heads,
                     group=group, dtype=dtype)
    q, k, v, tables, lengths = case
    out = pd.paged_decode(q, k[0], v[0], tables, lengths, interpret=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_matches(out, reference(*case), dtype)
    assert (np.asarray(out[0].astype(jnp.float32)) == 0).all(), "length 0 must give zeros"


OPTIONS = [  # page_size, pages_per_block, num_splits, soft_cap, sliding_window
    (16, 1, 3, None, None),   # one page per block, more splits than the pages need
    (8, 4, 1, 2.0, None),     # soft cap, a block wider than the table
    (16, 2, 2, None, 5),      # window inside one page
    (8, 2, None, 1.5, 13),    # window across pages, default split count
]


@pytest.mark.parametrize("page_size,pages_per_block,num_splits,soft_cap,sliding_window",
                         OPTIONS)
def test_options(page_size, pages_per_block, num_splits, soft_cap, sliding_window):
    width = 3
    case = make_case(np.random.default_rng(pages_per_block), lengths=[1, 20, width * page_size],
                     width=width, page_size=page_size, head_dim=64, num_kv_heads=2, group=4,
                     dtype=jnp.float32, null_padding=True, q_scale=3.0)
    q, k, v, tables, lengths = case
    options = dict(soft_cap=soft_cap, sliding_window=sliding_window, sm_scale=0.1)
    out = pd.paged_decode(q, k[0], v[0], tables, lengths, pages_per_block=pages_per_block,
                          num_splits=num_splits, interpret=True, **options)
    assert_matches(out, reference(*case, **options), jnp.float32)


def test_stacked_pool_with_traced_layer():
    case = make_case(np.random.default_rng(7), lengths=[5, 0, 16], width=2, page_size=8,
                     head_dim=64, num_kv_heads=2, group=2, dtype=jnp.bfloat16, num_layers=3)
    q, k, v, tables, lengths = case

    @jax.jit
    def step(layer):
        return pd.paged_decode(q, k, v, tables, lengths, layer=layer, interpret=True)

    for layer in (2, 1):
        assert_matches(step(jnp.int32(layer)), reference(*case, layer=layer), jnp.bfloat16)


def test_query_dtype_differs_from_cache():
    """A float32 query over a bfloat16 cache: q meets K in bfloat16, output is float32."""
    case = make_case(np.random.default_rng(3), lengths=[9, 32], width=2, page_size=16,
                     head_dim=64, num_kv_heads=1, group=4, dtype=jnp.bfloat16)
    q, k, v, tables, lengths = case
    q = q.astype(jnp.float32)
    out = pd.paged_decode(q, k[0], v[0], tables, lengths, interpret=True)
    assert out.dtype == jnp.float32
    assert_matches(out, reference(*case), jnp.bfloat16)


@st.composite
def decode_cases(draw):
    page_size = draw(st.sampled_from([8, 16, 32]))
    width = draw(st.integers(2, 4))
    specials = special_lengths(page_size, width)
    lengths = draw(st.lists(st.one_of(st.sampled_from(specials),
                                      st.integers(0, width * page_size)),
                            min_size=1, max_size=3))
    pages_per_block = draw(st.sampled_from(
        [p for p in (1, 2, 4) if 16 <= p * page_size <= 64]))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), lengths=lengths, width=width,
        page_size=page_size, head_dim=draw(st.sampled_from([64, 128])),
        num_kv_heads=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 4, 8])),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])),
        null_padding=draw(st.booleans()), pages_per_block=pages_per_block,
        num_splits=draw(st.sampled_from([None, 1, 2, 3])),
        soft_cap=draw(st.sampled_from([None, 2.0])),
        sliding_window=draw(st.sampled_from([None, 1, 7, 20])))


@given(decode_cases())
def test_matches_reference(params):
    params = dict(params)
    rng = np.random.default_rng(params.pop("seed"))
    options = {name: params.pop(name) for name in ("soft_cap", "sliding_window")}
    tuning = {name: params.pop(name) for name in ("pages_per_block", "num_splits")}
    case = make_case(rng, q_scale=2.0, **params)
    q, k, v, tables, lengths = case
    out = pd.paged_decode(q, k[0], v[0], tables, lengths, interpret=True, **options, **tuning)
    assert_matches(out, reference(*case, **options), params["dtype"])


@pytest.mark.slow
@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_sweep(page_size, head_dim, group, dtype):
    width = 4
    case = make_case(np.random.default_rng(0), lengths=special_lengths(page_size, width),
                     width=width, page_size=page_size, head_dim=head_dim, num_kv_heads=2,
                     group=group, dtype=dtype)
    q, k, v, tables, lengths = case
    assert_matches(pd.paged_decode(q, k[0], v[0], tables, lengths, num_splits=2,
                                   interpret=True), reference(*case), dtype)


def test_choose_num_splits():
    # Llama-3-8B (8 kv heads), 32k context at 64 tokens per block: 512 blocks.
    assert pd.choose_num_splits(batch=1, num_kv_heads=8, num_blocks=512) == \
        -(-pd.TARGET_PROGRAMS // 8)
    assert pd.choose_num_splits(batch=256, num_kv_heads=8, num_blocks=512) == 1
    assert pd.choose_num_splits(batch=1, num_kv_heads=8, num_blocks=4) == 4


def test_splits_follow_concrete_lengths():
    """Short sequences in a wide table: the splits cover the longest length (a power of
    two of blocks), not the table; inside jit the table width is all there is."""
    lengths = np.array([100, 3000], np.int32)
    assert pd.blocks_to_cover(lengths, width=4096, pages_per_block=4, page_size=16) == 64
    assert pd.blocks_to_cover(np.zeros(2, np.int32), 4096, 4, 16) == 1
    assert pd.blocks_to_cover(lengths, width=8, pages_per_block=4, page_size=16) == 2
    traced = jax.jit(lambda n: jnp.int32(pd.blocks_to_cover(n, 4096, 4, 16)))(lengths)
    assert int(traced) == 1024
    # No empty splits: 10 blocks asked in 4 splits -> 3 blocks each, 4 splits; in 6 -> 2, 5.
    assert pd.split_plan(10, 4) == (3, 4)
    assert pd.split_plan(10, 6) == (2, 5)


def test_float32_dots_are_never_plain_tf32():
    assert pd.dot_precision(jnp.float32, interpret=True) == jax.lax.Precision.HIGHEST
    assert pd.dot_precision(jnp.float32, interpret=False) == \
        jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    assert pd.dot_precision(jnp.bfloat16, interpret=False) is None


@pytest.mark.parametrize("num_splits", [1, 5])
def test_one_split_writes_the_output(num_splits):
    """One split skips the partials and the merge; an odd split count merges."""
    case = make_case(np.random.default_rng(11), lengths=[70, 1, 33], width=6, page_size=16,
                     head_dim=64, num_kv_heads=1, group=2, dtype=jnp.bfloat16)
    q, k, v, tables, lengths = case
    out = pd.paged_decode(q, k[0], v[0], tables, lengths, num_splits=num_splits,
                          pages_per_block=1, interpret=True)
    assert out.dtype == q.dtype
    assert_matches(out, reference(*case), jnp.bfloat16)


@pytest.mark.parametrize("change,message", [
    (dict(layer=1), "layer=1"),
    (dict(stack=True), "need layer="),
    (dict(stack=True, layer=3), "layer=3"),
    (dict(num_splits=0), "num_splits=0"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(soft_cap=-1.0), "soft_cap=-1.0"),
    (dict(pages_per_block=3), "pages_per_block=3"),
    (dict(head_dim=32), "D=64"),
])
def test_bad_input(change, message):
    q = jnp.zeros((2, 4, change.pop("head_dim", 64)), jnp.float32)
    pages = jnp.zeros((2, 2, 5, 16, 64), jnp.float32)
    if not change.pop("stack", False):
        pages = pages[0]
    tables = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match=message):
        pd.paged_decode(q, pages, pages, tables, jnp.zeros((2,), jnp.int32), interpret=True,
                        **change)


# -- 8-bit pages -------------------------------------------------------------------------

def quantized_case(rng, fmt, *, q_dtype, layer_count=1, **shape):
    """``make_case``'s pool quantized as ``KVCache.write`` stores it, every free or stale
    slot poisoned: scale NaN, fp8 codes NaN, int8 codes at the limit (int8 has no NaN).
    Returns q, (k codes, v codes), (k scales, v scales), tables, lengths and the float64
    dequantized K/V the reference attends over."""
    q, k, v, tables, lengths = make_case(rng, num_layers=layer_count, dtype=jnp.float32,
                                         **shape)
    free = jnp.isnan(k[..., 0])                               # [L, Hkv, P, S]
    codes, scales = [], []
    for pool in (k, v):
        c, s = quantize(jnp.where(jnp.isnan(pool), 0.0, pool), FORMATS[fmt])
        poison = jnp.nan if fmt == "fp8" else qmax(FORMATS[fmt])
        codes.append(jnp.where(free[..., None], jnp.asarray(poison, c.dtype), c))
        scales.append(jnp.where(free, jnp.nan, s).astype(s.dtype))
    assert jnp.isnan(scales[0]).any(), "the pool must hold poisoned free slots"
    return q.astype(q_dtype), codes, scales, tables, lengths


QUANTIZED = [  # fmt, q dtype, page_size, head_dim, group, num_splits
    ("int8", jnp.float32, 16, 64, 4, 2),
    ("fp8", jnp.float32, 8, 128, 1, None),
    ("int8", jnp.bfloat16, 8, 128, 8, 1),
    ("fp8", jnp.float16, 16, 64, 2, 3),
]
FORMAT_NAMES = sorted(FORMATS)


@pytest.mark.parametrize("fmt,q_dtype,page_size,head_dim,group,num_splits",
                         [c for c in QUANTIZED if c[0] in FORMAT_NAMES])
def test_8bit_pages(fmt, q_dtype, page_size, head_dim, group, num_splits):
    """The kernel on int8 / fp8 pages against the reference over the dequantized values
    (float32 queries: tight, the dots in float32; 16-bit queries: their own rounding)."""
    width = 3
    q, codes, scales, tables, lengths = quantized_case(
        np.random.default_rng(page_size + head_dim + group), fmt, q_dtype=q_dtype,
        lengths=special_lengths(page_size, width), width=width, page_size=page_size,
        head_dim=head_dim, num_kv_heads=2, group=group, q_scale=2.0)
    out = pd.paged_decode(q, codes[0][0], codes[1][0], tables, lengths, k_scale=scales[0][0],
                          v_scale=scales[1][0], num_splits=num_splits, interpret=True)
    assert out.dtype == q.dtype
    expected = paged_decode_reference(q.astype(jnp.float32), codes[0][0], codes[1][0], tables,
                                      lengths, k_scale=scales[0][0], v_scale=scales[1][0])
    assert_matches(out, expected, q_dtype)


def test_8bit_stacked_pool_with_traced_layer():
    fmt = FORMAT_NAMES[-1]
    q, codes, scales, tables, lengths = quantized_case(
        np.random.default_rng(5), fmt, q_dtype=jnp.float32, layer_count=2, lengths=[7, 0, 32],
        width=2, page_size=16, head_dim=64, num_kv_heads=2, group=4)
    step = jax.jit(lambda layer: pd.paged_decode(
        q, *codes, tables, lengths, layer=layer, k_scale=scales[0], v_scale=scales[1],
        interpret=True))
    expected = paged_decode_reference(q, codes[0][1], codes[1][1], tables, lengths,
                                      k_scale=scales[0][1], v_scale=scales[1][1])
    assert_matches(step(jnp.int32(1)), expected, jnp.float32)


@pytest.mark.parametrize("change,message", [
    (dict(k_scale=None), r"int8 pages need k_scale of shape \(2, 5, 16\), got None"),
    (dict(v_scale=jnp.ones((2, 5, 8), jnp.bfloat16)), r"need v_scale of shape \(2, 5, 16\)"),
    (dict(k_scale=jnp.ones((2, 5, 16), jnp.int8)), "k_scale must be a 16- or 32-bit float"),
    (dict(pages=jnp.zeros((2, 5, 16, 64), jnp.bfloat16)), "scales go with 8-bit"),
    (dict(q=jnp.zeros((2, 4, 64), jnp.int32)), "q dtype int32 over int8 pages"),
])
def test_8bit_bad_input(change, message):
    change = dict(change)
    q = change.pop("q", jnp.zeros((2, 4, 64), jnp.bfloat16))
    pages = change.pop("pages", jnp.zeros((2, 5, 16, 64), jnp.int8))
    scales = {"k_scale": jnp.ones((2, 5, 16), jnp.bfloat16),
              "v_scale": jnp.ones((2, 5, 16), jnp.bfloat16), **change}
    with pytest.raises(ValueError, match=message):
        pd.paged_decode(q, pages, pages, jnp.zeros((2, 2), jnp.int32),
                        jnp.zeros((2,), jnp.int32), interpret=True, **scales)
