"""Lower the Pallas decode kernel for CUDA from the CPU, so a configuration Triton cannot
take fails here and not on a user's GPU.

``jax.export`` with ``platforms=["cuda"]`` runs the Pallas Triton lowering without a GPU
(on jax >= 0.11 under an abstract H200, see ``jpaged.pallas_kernels.lowering``). The kernel
travels as Triton IR inside the custom call; that IR is parsed back and run through the
Triton dialect's verifier as well. Registers, spills and shared memory of the compiled
kernels are checked by ``benchmarks/kernel_resources.py``. What only the GPU's
Triton compiler can see (tl.dot's 16-element minimum, shared-memory size) is covered by
``check_config``'s limits.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.lib.mlir import ir

from jpaged.pallas_kernels import lowering
from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels.quantization import FORMATS, SCALE_DTYPE, is_quantized

try:  # private helper: an MLIR context with the Triton dialect, to verify the kernel IR
    from jax._src.pallas.triton.lowering import _new_ir_context as triton_ir_context
except ImportError:  # pragma: no cover - depends on the installed jax
    triton_ir_context = None

# What the dispatcher may pick for the shapes users run.
HEAD_DIMS = (64, 128)
PAGE_SIZES = (8, 16, 32, 64, 128)
GROUPS = (1, 2, 4, 8)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# 8-bit pages (int8, and float8_e4m3fn where jax has it) with the queries models use.
FORMATS_8BIT = tuple(FORMATS.values())
QUERY_DTYPES_8BIT = (jnp.bfloat16, jnp.float32)
NUM_KV_HEADS = 2


def valid_pages_per_block(head_dim, page_size, dtype):
    """Every power of two check_config accepts for this shape."""
    choices = []
    for pages in (1, 2, 4, 8, 16, 32):
        try:
            pd.check_config(NUM_KV_HEADS, NUM_KV_HEADS, head_dim, page_size, dtype, pages)
        except ValueError:
            continue
        choices.append(pages)
    return choices


def decode_args(head_dim, page_size, group, dtype, num_layers=None, q_dtype=None):
    """Shape/dtype structs: q (in q_dtype, default the pool's dtype; bfloat16 over 8-bit
    pages), k, v, block_tables, lengths, then k_scale, v_scale for 8-bit pages and a
    traced layer for a stacked pool."""
    batch, num_pages, width = 3, 64, 8
    pool = (NUM_KV_HEADS, num_pages, page_size, head_dim)
    pool = pool if num_layers is None else (num_layers, *pool)
    if q_dtype is None:
        q_dtype = jnp.bfloat16 if is_quantized(dtype) else dtype
    args = [jax.ShapeDtypeStruct((batch, NUM_KV_HEADS * group, head_dim), q_dtype),
            jax.ShapeDtypeStruct(pool, dtype), jax.ShapeDtypeStruct(pool, dtype),
            jax.ShapeDtypeStruct((batch, width), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32)]
    if is_quantized(dtype):
        args += [jax.ShapeDtypeStruct(pool[:-1], SCALE_DTYPE)] * 2
    if num_layers is not None:
        args.append(jax.ShapeDtypeStruct((), jnp.int32))
    return args


@functools.cache
def export_decode(head_dim, page_size, group, dtype, num_layers=None, q_dtype=None,
                  **options):
    """jax.export of paged_decode for CUDA; options go to the launcher."""
    quantized = is_quantized(dtype)

    def decode(q, k, v, tables, lengths, *rest):
        scales = dict(k_scale=rest[0], v_scale=rest[1]) if quantized else {}
        layer = rest[-1] if num_layers is not None else None
        return pd.paged_decode(q, k, v, tables, lengths, layer=layer, **scales, **options)

    return lowering.export_for_cuda(decode, *decode_args(head_dim, page_size, group, dtype,
                                                         num_layers, q_dtype))


def triton_ir_text(kernel):
    """The kernel's Triton IR as text, verified by the Triton dialect."""
    with triton_ir_context():
        module = ir.Module.parse(kernel.ir)
        assert module.operation.verify()
        return str(module)


def assert_lowers(exported):
    calls = lowering.custom_calls(exported)
    assert lowering.triton_kernels(exported), "no Triton kernel in the export"
    for call in calls:
        assert call.target in lowering.TRITON_CALLS, f"unexpected custom call {call.target}"
        if call.ir is not None and triton_ir_context is not None:
            triton_ir_text(call)


def dot_lines(dtype):
    [kernel] = lowering.triton_kernels(export_decode(128, 16, 4, dtype))
    dots = [line for line in triton_ir_text(kernel).splitlines() if "tt.dot" in line]
    assert len(dots) == 2, dots
    return dots


@pytest.mark.skipif(triton_ir_context is None, reason="this jax has no Triton IR context")
def test_float32_dots_lower_to_tf32x3(monkeypatch):
    """Triton's float32 default is TF32 (about 1e-3 relative error): float32 caches must
    ask for three TF32 passes (float32-level error). (16-bit operands ignore the field.)"""
    assert all("inputPrecision = tf32x3" in line for line in dot_lines(jnp.float32))
    # Without the explicit precision the same kernel does lower to plain TF32.
    monkeypatch.setattr(pd, "dot_precision", lambda dtype, interpret: None)
    export_decode.cache_clear()
    jax.clear_caches()
    try:
        assert all(re.search(r"inputPrecision = tf32\b(?!x3)", line)
                   for line in dot_lines(jnp.float32))
    finally:
        export_decode.cache_clear()
        jax.clear_caches()


def full_matrix():
    """Default pages_per_block for every shape, every valid pages_per_block at group 4."""
    configs = [dict(head_dim=d, page_size=s, group=g, dtype=t)
               for d, s, g, t in itertools.product(HEAD_DIMS, PAGE_SIZES, GROUPS, DTYPES)]
    configs += [dict(head_dim=d, page_size=s, group=4, dtype=t, pages_per_block=p)
                for d, s, t in itertools.product(HEAD_DIMS, PAGE_SIZES, DTYPES)
                for p in valid_pages_per_block(d, s, t)]
    configs += [dict(head_dim=d, page_size=s, group=4, dtype=t, q_dtype=qt)
                for d, s, t, qt in itertools.product(HEAD_DIMS, PAGE_SIZES, FORMATS_8BIT,
                                                     QUERY_DTYPES_8BIT)]
    return configs


def representative_matrix():
    """Every (head_dim, page_size) pair once, cycling through groups and dtypes, plus the
    extremes of pages_per_block, the options and a stacked pool with a traced layer."""
    configs = [dict(head_dim=d, page_size=s, group=GROUPS[i % len(GROUPS)],
                    dtype=DTYPES[i % len(DTYPES)])
               for i, (d, s) in enumerate(itertools.product(HEAD_DIMS, PAGE_SIZES))]
    configs += [
        dict(head_dim=128, page_size=16, group=4, dtype=jnp.bfloat16, pages_per_block=1),
        dict(head_dim=64, page_size=8, group=1, dtype=jnp.float16, pages_per_block=32),
        dict(head_dim=128, page_size=16, group=8, dtype=jnp.bfloat16, soft_cap=30.0,
             sliding_window=100, num_splits=3),
        dict(head_dim=128, page_size=16, group=4, dtype=jnp.bfloat16, num_layers=4),
        dict(head_dim=64, page_size=32, group=2, dtype=jnp.float32, num_layers=2,
             sliding_window=7),
    ]
    # 8-bit pages: each format at both head dims and a small and a large page, bfloat16
    # queries (models) and float32 ones (TF32x3 dots), one stacked with a traced layer.
    configs += [dict(head_dim=d, page_size=s, group=g, dtype=t, q_dtype=qt)
                for (d, s, g, qt), t in itertools.product(
                    [(128, 16, 4, jnp.bfloat16), (64, 128, 8, jnp.float32)], FORMATS_8BIT)]
    configs.append(dict(head_dim=128, page_size=16, group=8, dtype=FORMATS_8BIT[0],
                        num_layers=4, num_splits=3))
    return configs


def config_id(config):
    return "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in config.items())


@pytest.mark.parametrize("config", representative_matrix(), ids=config_id)
def test_exports_for_cuda(config):
    assert_lowers(export_decode(**config))


@pytest.mark.slow
@pytest.mark.parametrize("config", full_matrix(), ids=config_id)
def test_exports_for_cuda_full_matrix(config):
    assert_lowers(export_decode(**config))


def test_check_config_accepts_every_user_shape():
    for d, s, g, t in itertools.product(HEAD_DIMS, PAGE_SIZES, GROUPS, DTYPES):
        pd.check_config(NUM_KV_HEADS * g, NUM_KV_HEADS, d, s, t)
        assert valid_pages_per_block(d, s, t)


# Refused because the Triton lowering itself fails (non-power-of-two tensors).
UNLOWERABLE = [  # head_dim, page_size, pages_per_block, message
    (96, 16, None, "head_dim=96"),
    (64, 12, None, "page_size=12"),
    (64, 16, 3, "pages_per_block=3"),
]


@pytest.mark.parametrize("head_dim,page_size,pages_per_block,message", UNLOWERABLE)
def test_check_config_refuses_what_does_not_lower(head_dim, page_size, pages_per_block,
                                                  message):
    with pytest.raises(ValueError, match=message):
        pd.check_config(8, 2, head_dim, page_size, jnp.bfloat16, pages_per_block)
    # The same configuration, past the check, really does fail to lower.
    q, k, v, tables, lengths, layer = decode_args(head_dim, page_size, 4, jnp.bfloat16,
                                                  num_layers=1)
    with lowering.cuda_device_context(), lowering.triton_deprecation_silenced():
        traced = pd._paged_decode.trace(
            q, k, v, tables, lengths, layer, None, None, sm_scale=1.0, soft_cap=None, sliding_window=None,
            pages_per_block=pages_per_block or 1, num_splits=2, split_tokens=4 * page_size,
            interpret=False, num_warps=4, num_stages=2)
        with pytest.raises(Exception, match="power of 2"):
            traced.lower(lowering_platforms=("cuda",))


# Refused for what only Triton's GPU compiler checks: tl.dot wants 16+ rows/columns and
# the tiles must fit shared memory.
@pytest.mark.parametrize("args,message", [
    ((8, 2, 8, 16, jnp.bfloat16), "head_dim=8"),
    ((8, 2, 512, 16, jnp.bfloat16), "head_dim=512"),
    ((8, 2, 64, 512, jnp.bfloat16), "page_size=512"),
    ((8, 2, 64, 8, jnp.bfloat16, 1), "pages_per_block=1"),
    ((8, 2, 64, 128, jnp.bfloat16, 4), "pages_per_block=4"),
    ((8, 2, 256, 128, jnp.float32), "pages_per_block=1"),
    ((8, 2, 64, 16, jnp.int32), "dtype=int32"),
    ((8, 2, 64, 16, jnp.int8, None, jnp.int8), "q dtype int8 over int8 pages"),
    ((6, 4, 64, 16, jnp.bfloat16), "num_q_heads=6"),
])
def test_check_config_refuses_what_triton_cannot_compile(args, message):
    with pytest.raises(ValueError, match=message):
        pd.check_config(*args)
