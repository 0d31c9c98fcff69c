"""8-bit KV pages (int8, float8_e4m3fn): quantization, attention against float64 numpy,
page moves that must carry scales, the engine on an 8-bit pool, and bad input.

Attention is checked twice: tightly against float64 attention over the dequantized values
(what the kernel should compute exactly, up to float32 rounding), and against float64
attention over the unquantized values within a bound derived from the quantization error
(see ``quantization_bound``). Free and stale slots hold NaN, as in test_attention.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import build_pool, numpy_attention
from test_engine import greedy_on_poisoned_pool

from jpaged.core import attention
from jpaged.core import cache as cache_module
from jpaged.core.attention import paged_attention, paged_prefill_attention
from jpaged.core.cache import KVCache, PageTable, copy_pages, kv_cache_dtype, write
from jpaged.engine.engine import LLM
from jpaged.engine.runner import ModelRunner
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.scheduler import PageMoves
from jpaged.models import Model, init_params, tiny_config
from jpaged.pallas_kernels.quantization import FORMATS, dequantize, qmax, quantize

FMTS = sorted(FORMATS)   # "fp8" (where jax has it), "int8"


def quantized_pool(pool, fmt):
    """A float pool [..., S, D] -> (codes, bfloat16 scales [..., S]), as ``write`` stores it."""
    return quantize(jnp.asarray(pool, jnp.float32), FORMATS[fmt])


def dequantized64(codes, scales):
    with np.errstate(invalid="ignore"):   # NaN scales of free slots times int8 codes
            return np.asarray(codes.astype(jnp.float32), np.float64) * np.asarray(
            scales.astype(jnp.float32), np.float64)[..., None]


# -- quantize / dequantize -----------------------------------------------------------------

@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_error_and_saturation(fmt):
    """Per-vector scales: int8 is off by at most half a step, e4m3fn by 2^-4 relative (3
    mantissa bits) plus half its smallest subnormal; magnitudes from 1e-30 to 3e38 give
    finite codes within [-QMAX, QMAX] (e4m3fn has no inf: nothing may overflow to NaN)."""
    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.uniform(-30, 38, (64, 1))
    x = np.concatenate([rng.standard_normal((64, 32)) * magnitudes,
                        np.zeros((1, 32)), np.full((1, 32), 3.0e38)]).astype(np.float32)
    codes, scales = quantize(jnp.asarray(x), FORMATS[fmt])
    assert codes.dtype == FORMATS[fmt] and scales.dtype == jnp.bfloat16
    as_float = np.asarray(codes.astype(jnp.float32))
    assert np.isfinite(as_float).all() and np.abs(as_float).max() <= qmax(FORMATS[fmt])
    got = np.asarray(dequantize(codes, scales))
    step = np.asarray(scales.astype(jnp.float32), np.float64)[:, None]
    if fmt == "int8":
        bound = 0.5 * step
    else:
        bound = 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * step
    assert (np.abs(got - x) <= bound * (1 + 1e-6)).all()
    assert not got[-2].any()   # an all-zero vector stays zero (scale 0, no division by 0)


# -- attention -----------------------------------------------------------------------------

def quantization_bound(q, k, v, k_hat, v_hat, tables, lengths, sm_scale):
    """A bound on |attention(q, k_hat, v_hat) - attention(q, k, v)| over the visible keys:
    with logits moved by at most d = sm_scale * max|q . (k_hat - k)|, every probability
    moves by a factor within e^(+-2d), so the output moves by at most
    max|v_hat - v| + (e^(2d) - 1) * max|v|."""
    group = q.shape[1] // k.shape[0]
    delta, dv, vmax = 0.0, 0.0, 0.0
    for row, length in enumerate(lengths):
        positions = np.arange(length)
        pages, offsets = tables[row, positions // k.shape[2]], positions % k.shape[2]
        for h in range(k.shape[0]):
            dk = k_hat[h, pages, offsets] - k[h, pages, offsets]          # [n, D]
            qh = q[row, h * group:(h + 1) * group]                          # [G, D]
            delta = max(delta, sm_scale * np.abs(qh @ dk.T).max(initial=0.0))
            dv = max(dv, np.abs(v_hat[h, pages, offsets] - v[h, pages, offsets]).max(initial=0))
            vmax = max(vmax, np.abs(v[h, pages, offsets]).max(initial=0.0))
    return dv + np.expm1(2 * delta) * vmax


# (kv heads, head_dim, stacked): the second has keys of 2 KiB, so the CPU decode walks one
# sequence at a time (lax.map), with the scales closed over.
SHAPES = [(2, 64, False), (4, 128, True)]
LENGTHS = [0, 1, 8, 9, 24]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("num_kv_heads, head_dim, stacked", SHAPES)
def test_attention_on_8bit_pages(fmt, num_kv_heads, head_dim, stacked):
    rng = np.random.default_rng(1)
    k, v, tables = build_pool(rng, LENGTHS, page_size=8, width=3, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, dtype=jnp.float32,
                              num_layers=2 if stacked else 1)
    (kc, ks), (vc, vs) = quantized_pool(k, fmt), quantized_pool(v, fmt)
    layer = 1 if stacked else 0
    k64, v64 = np.asarray(k[layer], np.float64), np.asarray(v[layer], np.float64)
    kh64, vh64 = dequantized64(kc[layer], ks[layer]), dequantized64(vc[layer], vs[layer])
    group, batch = 2, len(LENGTHS)
    q = rng.standard_normal((batch, num_kv_heads * group, head_dim)).astype(np.float32)
    table = PageTable(jnp.asarray(tables), jnp.asarray(LENGTHS, jnp.int32))
    pools = ((kc, vc), dict(layer=1, k_scale=ks, v_scale=vs)) if stacked else (
        (kc[0], vc[0]), dict(k_scale=ks[0], v_scale=vs[0]))
    rows, positions = np.arange(batch), np.array(LENGTHS) - 1
    tight = numpy_attention(q, kh64, vh64, tables, LENGTHS, rows, positions)
    exact = numpy_attention(q, k64, v64, tables, LENGTHS, rows, positions)
    bound = quantization_bound(q, k64, v64, kh64, vh64, tables, LENGTHS, head_dim ** -0.5)
    for impl in ("xla", "reference"):
        got = np.asarray(paged_attention(jnp.asarray(q), *pools[0], table, impl=impl,
                                         **pools[1]))
        assert np.isfinite(got).all(), f"{impl}: NaN from a free or stale page leaked"
        np.testing.assert_allclose(got, tight, rtol=2e-5, atol=2e-5, err_msg=impl)
        assert np.abs(got - exact).max() <= bound, impl
        # The bound is not vacuous: measured, the error is 1/8 to 1/13 of it (int8 about
        # 0.01-0.02, fp8 about 0.09-0.12 on outputs of magnitude ~1).
        assert np.abs(got - exact).max() >= bound / 30, impl

    q_seq = np.array([4, 4, 4, 3, 2, 1], np.int32)
    q_pos = np.array([0, 11, 23, 8, 5, 0], np.int32)
    qp = rng.standard_normal((6, num_kv_heads * group, head_dim)).astype(np.float32)
    tight = numpy_attention(qp, kh64, vh64, tables, LENGTHS, q_seq, q_pos)
    for impl in ("xla", "reference"):
        got = paged_prefill_attention(jnp.asarray(qp), *pools[0], table, jnp.asarray(q_seq),
                                      jnp.asarray(q_pos), impl=impl, **pools[1])
        np.testing.assert_allclose(np.asarray(got), tight, rtol=2e-5, atol=2e-5, err_msg=impl)


def small_8bit(fmt="int8", num_layers=None):
    """q [2, 4, 8] over an 8-bit pool of 6 pages of 4 tokens, 2 kv heads, and its scales."""
    shape = (2, 6, 4, 8) if num_layers is None else (num_layers, 2, 6, 4, 8)
    codes, scales = quantize(jnp.ones(shape), FORMATS[fmt])
    table = PageTable(jnp.array([[1, 2, 3], [4, 5, 0]], jnp.int32), jnp.array([3, 9], jnp.int32))
    return jnp.ones((2, 4, 8)), codes, scales, table


def test_dispatch_pallas_reads_8bit_and_auto_takes_it_on_gpu(monkeypatch):
    """impl="pallas" reads 8-bit pages (interpret mode here); "auto" on a GPU takes the
    Triton kernel for them, falls back to XLA (with a warning) where the kernel refuses the
    shape; "mosaic" reads them too (interpret mode)."""
    rng = np.random.default_rng(4)
    codes, scales = quantize(jnp.asarray(rng.standard_normal((2, 6, 16, 64)), jnp.float32),
                             FORMATS["int8"])
    table = PageTable(jnp.array([[1, 2], [4, 5]], jnp.int32), jnp.array([20, 9], jnp.int32))
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    pools = dict(k_scale=scales, v_scale=scales)
    expected = paged_attention(q, codes, codes, table, impl="xla", **pools)
    out = paged_attention(q, codes, codes, table, impl="pallas", **pools)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    assert attention._choose_decode_impl("auto", q, codes, None) == "pallas"
    mosaic = paged_attention(q, codes, codes, table, impl="mosaic", interpret=True, **pools)
    np.testing.assert_allclose(mosaic, expected, rtol=2e-5, atol=2e-5)
    q, codes, scales, table = small_8bit()   # head_dim 8: under tl.dot's 16
    with pytest.raises(ValueError, match="head_dim=8"):
        paged_attention(q, codes, codes, table, impl="pallas", k_scale=scales, v_scale=scales)
    with pytest.warns(UserWarning, match="head_dim=8"):
        assert attention._choose_decode_impl("auto", q, codes, None) == "xla"


BAD_SCALES = [
    (dict(k_scale=None), r"int8 pages need k_scale of shape \(2, 6, 4\), got None"),
    (dict(v_scale=None), r"int8 pages need v_scale of shape \(2, 6, 4\), got None"),
    (dict(k_scale=jnp.ones((2, 6, 4, 8))),
     r"k_scale must have the pages' shape minus head_dim \(2, 6, 4\), got \(2, 6, 4, 8\)"),
    (dict(v_scale=jnp.ones((2, 6, 3))),
     r"v_scale must have the pages' shape minus head_dim \(2, 6, 4\), got \(2, 6, 3\)"),
    (dict(k_scale=jnp.ones((2, 6, 4), jnp.int8)), "k_scale must be a 16- or 32-bit float"),
    (dict(pages=jnp.ones((2, 6, 4, 8))), "k_scale given for float32 pages"),
    (dict(pages=jnp.ones((2, 6, 4, 8), jnp.int32)), "pages must be float, int8 or float8_e4m3fn"),
]


@pytest.mark.parametrize("change, message", BAD_SCALES)
def test_bad_scales(change, message):
    q, codes, scales, table = small_8bit()
    change = dict(change)
    pages = change.pop("pages", codes)
    kwargs = {"k_scale": scales, "v_scale": scales, **change}
    for impl in ("xla", "reference"):
        with pytest.raises(ValueError, match=message):
            paged_attention(q, pages, pages, table, impl=impl, **kwargs)
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(q, pages, pages, table, jnp.array([0, 1], jnp.int32),
                                jnp.array([2, 8], jnp.int32), **kwargs)


def test_bad_kv_cache_dtype(monkeypatch):
    for bad in ("int4", "fp16", None, jnp.int8):
        with pytest.raises(ValueError, match=f"kv_cache_dtype={bad!r} is not one of"):
            kv_cache_dtype(bad, jnp.bfloat16)
    assert kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert kv_cache_dtype("int8", jnp.float32) == jnp.int8
    with pytest.raises(ValueError, match="cache dtype must be .* got int32"):
        kv_cache_dtype("auto", jnp.int32)
    # A device or jax without float8_e4m3fn: a clear error, not a crash inside jit.
    monkeypatch.setattr(cache_module, "_fp8_works", lambda backend: False)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' .* does not run on this"):
        kv_cache_dtype("fp8", jnp.bfloat16)
    monkeypatch.setattr(cache_module, "FORMATS", {"int8": jnp.dtype(jnp.int8)})
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' needs jnp.float8_e4m3fn"):
        kv_cache_dtype("fp8", jnp.bfloat16)


# -- the pool ------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [64, 128])
def test_pages_for_memory_counts_scales(head_dim):
    geometry = (32, 8, head_dim, 16)
    per_page = KVCache.bytes_per_page(*geometry, jnp.int8)
    assert per_page == 2 * 32 * 8 * 16 * (head_dim + 2)
    assert KVCache.bytes_per_page(*geometry, "float8_e4m3fn") == per_page
    budget = 2 ** 30
    bf16 = KVCache.pages_for_memory(budget, *geometry, jnp.bfloat16)
    int8 = KVCache.pages_for_memory(budget, *geometry, jnp.int8)
    assert int8 == budget // per_page and int8 >= 1.9 * bf16
    small = KVCache.create(2, 2, head_dim, 4, 5, jnp.int8)
    assert small.nbytes == 5 * KVCache.bytes_per_page(2, 2, head_dim, 4, jnp.int8)
    assert small.k_scale.shape == (2, 2, 5, 4) and small.k_scale.dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt", FMTS)
def test_write_quantizes_into_slots(fmt):
    rng = np.random.default_rng(2)
    cache = KVCache.create(2, 2, 8, 4, 6, FORMATS[fmt])
    k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)) * 10, jnp.float32) for _ in range(2))
    slots = jnp.array([4, 5, 13, 22, 0], jnp.int32)
    cache = jax.jit(write, donate_argnums=0)(cache, k, v, slots)
    one = write(KVCache.create(2, 2, 8, 4, 6, FORMATS[fmt]), k[1], v[1], slots, layer=1)
    for codes, scales, new in ((cache.k, cache.k_scale, k), (cache.v, cache.v_scale, v)):
        expected_codes, expected_scales = quantize(new, FORMATS[fmt])   # [L, T, H, (D)]
        pages, offsets = np.asarray(slots) // 4, np.asarray(slots) % 4
        got = codes[:, :, pages, offsets].swapaxes(1, 2)
        np.testing.assert_array_equal(got.astype(jnp.float32),
                                      expected_codes.astype(jnp.float32))
        np.testing.assert_array_equal(scales[:, :, pages, offsets].swapaxes(1, 2),
                                      expected_scales)
    np.testing.assert_array_equal(one.k_scale[1], cache.k_scale[1])


def random_8bit_cache(rng, fmt="int8", num_pages=8):
    cache = KVCache.create(2, 2, 8, 4, num_pages, FORMATS[fmt])
    k, v = (jnp.asarray(rng.standard_normal((2, num_pages * 4, 2, 8)), jnp.float32)
            for _ in range(2))
    return write(cache, k, v, jnp.arange(num_pages * 4, dtype=jnp.int32))


def page(cache, i):
    return [np.asarray(x[:, :, i].astype(jnp.float32)) for x in jax.tree.leaves(cache)]


def test_copy_on_write_and_swaps_carry_scales():
    rng = np.random.default_rng(3)
    cache = random_8bit_cache(rng)
    before = {i: page(cache, i) for i in range(8)}
    copied = copy_pages(cache, jnp.array([2, 0], jnp.int32), jnp.array([6, 0], jnp.int32))
    for got, want in zip(page(copied, 6), before[2]):
        np.testing.assert_array_equal(got, want)

    runner = ModelRunner(model=None, cache=cache, num_host_pages=4)
    none = np.zeros((0, 2), np.int32)
    runner.move_pages(PageMoves(swap_out=np.array([(3, 1), (5, 2)], np.int32), swap_in=none,
                                copies=none))
    runner.poison_free_pages([3, 5])
    assert np.isnan(page(runner.cache, 3)[2]).all()   # leaves: k, v, k_scale, v_scale
    runner.move_pages(PageMoves(swap_out=none, swap_in=np.array([(2, 7), (1, 4)], np.int32),
                                copies=np.array([(7, 1)], np.int32)))
    for device, original in ((7, 5), (4, 3), (1, 5)):
        for got, want in zip(page(runner.cache, device), before[original]):
            np.testing.assert_array_equal(got, want)


# -- the engine ----------------------------------------------------------------------------

CONFIG = tiny_config(num_layers=2, max_position_embeddings=128)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


def engine_prompts():
    rng = np.random.default_rng(2)
    shared = rng.integers(0, CONFIG.vocab_size, 20).tolist()
    return ([rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (3, 9, 17, 30)]
            + [shared + rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (5, 13, 2)])


def test_kv_cache_info_and_bad_kv_cache_dtype(model):
    budget = 2 ** 20
    for name, dtype in (("auto", jnp.float32), ("int8", jnp.int8)):
        llm = LLM(model, page_size=4, kv_cache_bytes=budget, max_model_len=128,
                  kv_cache_dtype=name)
        per_page = KVCache.bytes_per_page(2, CONFIG.num_kv_heads, CONFIG.head_dim, 4, dtype)
        assert llm.kv_cache_info() == dict(num_pages=budget // per_page, page_size=4,
                                           kv_cache_dtype=jnp.dtype(dtype).name,
                                           bytes_per_page=per_page)
        assert llm.engine.runner.cache.nbytes == budget // per_page * per_page
    with pytest.raises(ValueError, match="kv_cache_dtype='int4' is not one of"):
        LLM(model, kv_cache_dtype="int4")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FMTS)
def test_engine_pressure_keeps_scales(model, fmt):
    """The same int8 / fp8 outputs with a roomy pool and no prefix cache, and with prefix
    hits, swap preemption and NaN in every free page: pages moved, shared or recycled take
    their scales along."""
    batch = engine_prompts()
    roomy = LLM(model, page_size=4, num_pages=200, max_model_len=128, kv_cache_dtype=fmt,
                enable_prefix_caching=False)
    expected = [o.token_ids for o in roomy.generate(batch, GREEDY)]
    info = roomy.kv_cache_info()
    assert info == dict(num_pages=200, page_size=4, kv_cache_dtype=FORMATS[fmt].name,
                        bytes_per_page=KVCache.bytes_per_page(2, CONFIG.num_kv_heads,
                                                              CONFIG.head_dim, 4, FORMATS[fmt]))
    tight = LLM(model, page_size=4, num_pages=20, max_num_seqs=4, max_model_len=128,
                max_num_batched_tokens=32, preemption_mode="swap", num_host_pages=64,
                kv_cache_dtype=fmt)
    engine = tight.engine
    assert greedy_on_poisoned_pool(engine, batch) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.block_manager.metrics([])["prefix_hit_rate"] > 0


@pytest.mark.slow
def test_decode_loop_on_an_int8_pool_matches_the_engine(model):
    """decode_loop.prepare(kv_cache_dtype="int8"): the jitted loop quantizes the same way
    the engine does, so greedy tokens are identical."""
    from jpaged.decode_loop import decode_loop, prepare

    batch = engine_prompts()[:3]
    with pytest.raises(ValueError, match="kv_cache_dtype='int4' is not one of"):
        prepare(model, batch, num_steps=4, kv_cache_dtype="int4")
    cache, table, first = prepare(model, batch, num_steps=GREEDY.max_tokens - 1, page_size=4,
                                  kv_cache_dtype="int8")
    assert cache.dtype == jnp.int8 and cache.k_scale.shape == cache.k.shape[:-1]
    out = decode_loop(model, model.params, cache, table, first,
                      num_steps=GREEDY.max_tokens - 1)
    tokens = np.concatenate([np.asarray(first)[:, None], np.asarray(out.tokens)], axis=1)
    llm = LLM(model, page_size=4, num_pages=64, max_model_len=128, kv_cache_dtype="int8")
    assert tokens.tolist() == [o.token_ids for o in llm.generate(batch, GREEDY)]
