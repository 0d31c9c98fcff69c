"""Lower the Mosaic GPU ragged attention kernel for CUDA from the CPU, so a configuration
Mosaic GPU cannot take fails here and not on a user's GPU.

``jax.export`` with ``platforms=["cuda"]`` runs the whole Mosaic GPU lowering (TMA
descriptors, wgmma operand checks, layouts) and embeds the kernel in a ``mosaic_gpu``
custom call; only ptxas and the driver are left for the GPU. The default run lowers every
(head_dim, page_size) pair once, cycling groups and dtypes, plus the options and a
stacked pool; the full product is ``-m slow``.
"""

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import pytest

from jpaged.pallas_kernels import mosaic_decode
from jpaged.pallas_kernels import ragged_attention as ra

HEAD_DIMS = ra.HEAD_DIMS
PAGE_SIZES = (8, 16, 32, 64, 128)
GROUPS = (1, 2, 4, 8)
DTYPES = (jnp.bfloat16, jnp.float16)
NUM_KV_HEADS = 2


def token_args(head_dim, page_size, group, dtype, num_layers=None, num_tokens=24,
               pages_dtype=None):
    """Shape/dtype structs: q, k, v, block_tables, kv_lens, q_seq, q_pos, the scales
    (None unless ``pages_dtype`` is 8-bit) and the layer (None for one layer)."""
    batch, num_pages, width = 3, 32, 8
    pool = (NUM_KV_HEADS, num_pages, page_size, head_dim)
    pool = pool if num_layers is None else (num_layers, *pool)
    pages_dtype = dtype if pages_dtype is None else pages_dtype
    scale = jax.ShapeDtypeStruct(pool[:-1], jnp.bfloat16) if pages_dtype != dtype else None
    args = [jax.ShapeDtypeStruct((num_tokens, NUM_KV_HEADS * group, head_dim), dtype),
            jax.ShapeDtypeStruct(pool, pages_dtype), jax.ShapeDtypeStruct(pool, pages_dtype),
            jax.ShapeDtypeStruct((batch, width), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
            jax.ShapeDtypeStruct((num_tokens,), jnp.int32), scale, scale]
    args.append(None if num_layers is None else jax.ShapeDtypeStruct((), jnp.int32))
    return args


@functools.cache
def export(head_dim, page_size, group, dtype, num_layers=None, pages_dtype=None, **options):
    def attention(q, k, v, tables, kv_lens, q_seq, q_pos, k_scale, v_scale, layer):
        return ra.paged_attention_tokens(q, k, v, tables, kv_lens, q_seq, q_pos, layer=layer,
                                         k_scale=k_scale, v_scale=v_scale, **options)

    args = token_args(head_dim, page_size, group, dtype, num_layers, pages_dtype=pages_dtype)
    return jax.export.export(jax.jit(attention), platforms=["cuda"])(*args)


def assert_lowers(exported):
    calls = re.findall(r"stablehlo\.custom_call @(\w+)", exported.mlir_module())
    assert any(call.startswith("mosaic_gpu") for call in calls), calls


def representative_matrix():
    configs = [dict(head_dim=d, page_size=s, group=GROUPS[i % len(GROUPS)],
                    dtype=DTYPES[i % len(DTYPES)])
               for i, (d, s) in enumerate(itertools.product(HEAD_DIMS, PAGE_SIZES))]
    configs += [
        # The shapes the default interpret-mode tests run, compiled.
        dict(head_dim=64, page_size=16, group=4, dtype=jnp.bfloat16),
        dict(head_dim=128, page_size=64, group=8, dtype=jnp.bfloat16, soft_cap=5.0,
             sliding_window=40),
        dict(head_dim=32, page_size=16, group=1, dtype=jnp.float16, sliding_window=7,
             sm_scale=0.3, num_layers=2),
        # Extremes of the ring: one page a step, 256 keys a step, three stages.
        dict(head_dim=128, page_size=64, group=4, dtype=jnp.bfloat16, pages_per_block=1),
        dict(head_dim=64, page_size=16, group=2, dtype=jnp.bfloat16, pages_per_block=16),
        dict(head_dim=128, page_size=64, group=16, dtype=jnp.bfloat16, num_stages=3),
        dict(head_dim=128, page_size=16, group=64, dtype=jnp.float16),
        # Split-K: float32 partials and log-sum-exp; at head_dim 256 the partial tile
        # leaves room for one ring slot only.
        dict(head_dim=128, page_size=16, group=4, dtype=jnp.bfloat16, num_splits=4),
        dict(head_dim=256, page_size=64, group=8, dtype=jnp.float16, num_splits=2),
        # 8-bit pages, widened to q's dtype in shared memory (e4m3 -> bf16 via float32).
        dict(head_dim=128, page_size=16, group=4, dtype=jnp.bfloat16, pages_dtype=jnp.int8),
        dict(head_dim=64, page_size=8, group=8, dtype=jnp.bfloat16,
             pages_dtype=jnp.float8_e4m3fn, num_splits=4, soft_cap=5.0),
        dict(head_dim=256, page_size=64, group=1, dtype=jnp.float16,
             pages_dtype=jnp.float8_e4m3fn, sliding_window=40),
        dict(head_dim=32, page_size=32, group=2, dtype=jnp.float16, pages_dtype=jnp.int8,
             num_layers=2, num_splits=3),
    ]
    return configs


def compiles_without_spills(config):
    """Whether check_config takes it on a GPU (it refuses what spills, see below)."""
    ppb = config.get("pages_per_block") or ra.default_pages_per_block(config["page_size"])
    return not ra.spills(config["head_dim"], ppb * config["page_size"])


def config_id(config):
    return "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in config.items())


@pytest.mark.parametrize("config", [c for c in representative_matrix()
                                    if compiles_without_spills(c)], ids=config_id)
def test_exports_for_cuda(config):
    assert_lowers(export(**config))


@pytest.mark.slow
@pytest.mark.parametrize("config", [
    dict(head_dim=d, page_size=s, group=g, dtype=t)
    for d, s, g, t in itertools.product(HEAD_DIMS, PAGE_SIZES, GROUPS, DTYPES)
    if compiles_without_spills(dict(head_dim=d, page_size=s))], ids=config_id)
def test_exports_for_cuda_full_matrix(config):
    assert_lowers(export(**config))


@functools.cache
def export_decode(head_dim, page_size, group, dtype, pages_dtype=None, **options):
    """The decode-tile kernel for CUDA: q [3, Hq, D] over a 2-kv-head pool."""
    pages_dtype = dtype if pages_dtype is None else pages_dtype
    pool, batch = (NUM_KV_HEADS, 32, page_size, head_dim), 3
    args = [jax.ShapeDtypeStruct((batch, NUM_KV_HEADS * group, head_dim), dtype),
            jax.ShapeDtypeStruct(pool, pages_dtype), jax.ShapeDtypeStruct(pool, pages_dtype),
            jax.ShapeDtypeStruct((batch, 8), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)]
    scale = jax.ShapeDtypeStruct(pool[:-1], jnp.bfloat16) if pages_dtype != dtype else None

    def decode(q, k, v, tables, lengths, k_scale, v_scale):
        return mosaic_decode.paged_decode(q, k, v, tables, lengths, k_scale=k_scale,
                                          v_scale=v_scale, **options)
    return jax.export.export(jax.jit(decode), platforms=["cuda"])(*args, scale, scale)


DECODE_CONFIGS = [
    dict(head_dim=128, page_size=16, group=4, dtype=jnp.bfloat16),
    dict(head_dim=64, page_size=8, group=1, dtype=jnp.float16),
    dict(head_dim=256, page_size=64, group=8, dtype=jnp.bfloat16),
    dict(head_dim=128, page_size=32, group=16, dtype=jnp.float16, num_splits=4),
    dict(head_dim=64, page_size=128, group=64, dtype=jnp.bfloat16),
    dict(head_dim=128, page_size=16, group=4, dtype=jnp.bfloat16, pages_dtype=jnp.int8,
         num_splits=4),
    dict(head_dim=64, page_size=64, group=8, dtype=jnp.bfloat16,
         pages_dtype=jnp.float8_e4m3fn, sliding_window=40, soft_cap=3.0),
    dict(head_dim=256, page_size=8, group=4, dtype=jnp.float16, pages_dtype=jnp.float8_e4m3fn),
    # The warp-specialized pipeline: two warpgroups, setmaxnreg, a consumed barrier ring.
    dict(head_dim=128, page_size=16, group=4, dtype=jnp.bfloat16, warp_specialized=True),
    dict(head_dim=64, page_size=64, group=1, dtype=jnp.float16, pages_dtype=jnp.int8,
         num_splits=3, warp_specialized=True),
]


@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=config_id)
def test_decode_tile_exports_for_cuda(config):
    assert_lowers(export_decode(**config))


def test_spilling_configurations_are_refused_but_lower(monkeypatch):
    """check_config refuses what the sm_90a compile shows spilling (ragged: head_dim 256,
    256 keys a step; decode tile: head_dim x keys a step of 32 K), naming it; the decode
    tile takes head_dim 256 at its default step, the ragged kernel head_dim 128 at page 8
    (it spilled with a barrier per page copy); forced, the refused configurations still
    lower (they are slow, not wrong)."""
    for head_dim, page_size, ppb in ((256, 16, None), (256, 64, None), (128, 8, 32),
                                     (64, 16, 16)):
        with pytest.raises(ValueError, match="spills registers"):
            ra.check_config(8, 2, head_dim, page_size, jnp.bfloat16, ppb)
        ra.check_config(8, 2, head_dim, page_size, jnp.bfloat16, ppb, interpret=True)
    for head_dim, page_size, ppb in ((128, 8, 32), (256, 64, 2)):
        with pytest.raises(ValueError, match="decode tile .* spills registers"):
            mosaic_decode.check_config(8, 2, head_dim, page_size, jnp.bfloat16, ppb)
        mosaic_decode.check_config(8, 2, head_dim, page_size, jnp.bfloat16, ppb,
                                   interpret=True)
    mosaic_decode.check_config(8, 2, 256, 16, jnp.bfloat16)
    mosaic_decode.check_config(8, 2, 64, 8, jnp.bfloat16, 32)
    ra.check_config(8, 2, 128, 16, jnp.bfloat16)
    ra.check_config(8, 2, 128, 8, jnp.bfloat16)
    monkeypatch.setattr(ra, "REFUSE_SPILLING", False)
    assert_lowers(export.__wrapped__(256, 16, 4, jnp.bfloat16))


def test_shared_memory_estimate_covers_mosaic_allocation(monkeypatch):
    """The largest configuration smem_bytes admits lowers (Mosaic GPU checks its own
    allocation against 227 KiB while lowering)."""
    monkeypatch.setattr(ra, "REFUSE_SPILLING", False)
    config = dict(head_dim=256, page_size=64, group=8, dtype=jnp.float16, num_splits=2,
                  num_stages=1)
    assert ra.smem_bytes(256, 64, jnp.float16, 1, 1, 2) <= ra.SMEM_BUDGET
    assert_lowers(export.__wrapped__(**config))
    with pytest.raises(ValueError, match="shared memory"):
        ra.check_config(16, 2, 256, 64, jnp.float16, 1, 2, num_splits=2)


def test_barrier_limit_counts_ring_slots_not_page_copies(monkeypatch):
    """One K and one V barrier per ring slot: 32 pages a step (64 copies in flight, once
    refused as 64 barriers) lower for both kernels (the decode tile takes them; the ragged
    kernel refuses 256 keys a step as spilling); 33 slots (int8 pages at
    head_dim 32 fit shared memory) are refused, naming the limit, and really do not lower."""
    ra.check_config(8, 2, 64, 8, jnp.bfloat16, 32, 2, refuse_spilling=False)
    mosaic_decode.check_config(8, 2, 64, 8, jnp.bfloat16, 32, 2)
    assert_lowers(export_decode.__wrapped__(64, 8, 4, jnp.bfloat16, pages_per_block=32,
                                            num_stages=2))
    monkeypatch.setattr(ra, "REFUSE_SPILLING", False)   # 256 keys spill in the ragged kernel
    assert_lowers(export.__wrapped__(64, 8, 4, jnp.bfloat16, pages_per_block=32, num_stages=2))
    assert ra.smem_bytes(32, 16, jnp.int8, 4, 33, q_dtype=jnp.bfloat16) <= ra.SMEM_BUDGET
    with pytest.raises(ValueError, match="num_stages=33 .*32 barriers per group"):
        ra.check_config(4, 2, 32, 16, jnp.int8, 4, 33, q_dtype=jnp.bfloat16)
    monkeypatch.setattr(ra, "check_config", lambda *args, **kwargs: None)
    with pytest.raises(Exception, match="32 barriers"):
        export.__wrapped__(32, 16, 2, jnp.bfloat16, pages_dtype=jnp.int8, num_stages=33)


def test_refused_float32_really_does_not_lower(monkeypatch):
    """check_config refuses float32 on a GPU because Mosaic GPU cannot lower it."""
    with pytest.raises(ValueError, match="float32"):
        ra.check_config(8, 2, 64, 16, jnp.float32)
    monkeypatch.setattr(ra, "check_config", lambda *args, **kwargs: None)
    with pytest.raises(Exception, match="WGMMA|wgmma|A in registers"):
        export.__wrapped__(64, 16, 4, jnp.float32)
