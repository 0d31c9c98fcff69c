"""Paged attention entry points: one call, several implementations.

``impl="pallas"`` is the Triton decode kernel (``pallas_kernels.paged_decode``; on a CPU it
runs in interpret mode), ``"xla"`` the block-wise gather + online softmax in plain jnp
(``pallas_kernels.xla_attention``, any backend), ``"reference"`` the readable
gather-everything version (``pallas_kernels.reference``). ``"auto"`` takes the kernel on
a GPU when it accepts the configuration and the XLA path everywhere else.

8-bit pages (int8 or float8_e4m3fn codes) come with ``k_scale`` / ``v_scale``, the pages'
shape minus head_dim (``KVCache.k_scale``); the XLA path and the reference dequantize
them inside the loop. The Triton kernel does not read them yet: ``impl="pallas"`` refuses
an 8-bit pool and ``"auto"`` takes the XLA path for it.

Inputs are checked on the host before anything is launched; values that are only known
inside jit (page ids, lengths, a traced layer) are checked when they are concrete.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.cache import KVCache, PageTable, check_pages, write
from pallas_kernels import reference, xla_attention
from pallas_kernels.quantization import is_quantized

IMPLS = ("auto", "pallas", "xla", "reference")
# Knobs of the Pallas decode kernel that prefill (XLA only) does not take.
PALLAS_ONLY_OPTIONS = ("num_splits", "interpret")


def paged_attention(q, k_pages, v_pages, page_table: PageTable, *, impl: str = "auto",
                    layer=None, k_scale=None, v_scale=None, sm_scale=None, soft_cap=None,
                    sliding_window=None, pages_per_block=None, num_splits=None,
                    interpret=None):
    """Decode attention: one query token per sequence (at position ``length - 1``).

    q: ``[B, Hq, D]``; k_pages, v_pages: one layer ``[Hkv, P, S, D]``, or the stacked
    ``KVCache.k`` / ``.v`` ``[L, Hkv, P, S, D]`` with ``layer`` (int or traced int32 scalar;
    nothing is sliced out of the pool). 8-bit pages need k_scale, v_scale: the pages'
    shape minus D (``KVCache.k_scale`` / ``.v_scale``). page_table: block tables
    ``int32[B, W]`` and lengths ``int32[B]``. Returns ``[B, Hq, D]`` in q's dtype, zeros
    for length 0.

    ``pages_per_block`` tunes the XLA and Pallas paths; ``num_splits`` and ``interpret``
    (default: True off GPU) go to the Pallas kernel.
    """
    _check_attention_inputs(q, k_pages, v_pages, page_table, layer, impl, k_scale, v_scale,
                            soft_cap=soft_cap, sliding_window=sliding_window,
                            pages_per_block=pages_per_block)
    if q.shape[0] != page_table.batch:
        raise ValueError(f"q has batch {q.shape[0]} but the page table has {page_table.batch} "
                         f"rows")
    options = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    tables, lengths = page_table.block_tables, page_table.lengths
    impl = _choose_decode_impl(impl, q, k_pages, pages_per_block)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if impl == "pallas":
        return _pallas_decode_module().paged_decode(
            q, k_pages, v_pages, tables, lengths, layer=layer, pages_per_block=pages_per_block,
            num_splits=num_splits, interpret=not _on_gpu() if interpret is None else interpret,
            **options)
    if impl == "xla":
        return xla_attention.paged_decode(q, k_pages, v_pages, tables, lengths, layer=layer,
                                          pages_per_block=pages_per_block, **scales, **options)
    k_pages, v_pages, scales = _layer_pages(k_pages, v_pages, scales, layer)
    return reference.paged_decode_reference(q, k_pages, v_pages, tables, lengths, **scales,
                                            **options)


def paged_prefill_attention(q, k_pages, v_pages, page_table: PageTable, q_seq, q_pos, *,
                            impl: str = "auto", layer=None, k_scale=None, v_scale=None,
                            sm_scale=None, soft_cap=None, sliding_window=None,
                            pages_per_block=None):
    """Prefill attention: ragged query tokens, each causal over its sequence's pages.

    q: ``[T, Hq, D]``; q_seq, q_pos: ``int32[T]`` (page-table row and absolute position
    of each token); pages, scales and ``layer`` as in ``paged_attention``; page_table
    lengths count this step's tokens, whose K/V are already written. Returns
    ``[T, Hq, D]``. There is no Pallas prefill kernel: "auto" and "pallas" run the XLA
    path, so one ``impl`` option can serve both phases of a model.
    """
    _check_attention_inputs(q, k_pages, v_pages, page_table, layer, impl, k_scale, v_scale,
                            soft_cap=soft_cap, sliding_window=sliding_window,
                            pages_per_block=pages_per_block)
    _check_token_index("q_seq", q_seq, q.shape[0], upper=page_table.batch)
    _check_token_index("q_pos", q_pos, q.shape[0])
    options = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    tables, lengths = page_table.block_tables, page_table.lengths
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if impl == "reference":
        k_pages, v_pages, scales = _layer_pages(k_pages, v_pages, scales, layer)
        return reference.paged_prefill_reference(q, k_pages, v_pages, tables, lengths, q_seq,
                                                 q_pos, **scales, **options)
    return xla_attention.paged_prefill(q, k_pages, v_pages, tables, lengths, q_seq, q_pos,
                                       layer=layer, pages_per_block=pages_per_block, **scales,
                                       **options)


def dense_attention(q, k, v, lengths, *, impl: str = "xla", sm_scale=None, soft_cap=None,
                    sliding_window=None):
    """Decode attention over contiguous K/V: the baseline paged attention is measured
    against.

    q: ``[B, Hq, D]``; k, v: ``[B, Hkv, L, D]``; lengths: ``int32[B]`` (the query sits at
    ``length - 1``). impl: "xla" (or "auto") for the fast block-wise path, "reference".
    """
    if impl not in ("auto", "xla", "reference"):
        raise ValueError(f"impl={impl!r} for dense attention must be 'auto', 'xla' or "
                         f"'reference'")
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must both be [B={q.shape[0]}, Hkv, L, D], got shapes "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    _check_heads(q, k.shape[1], k.shape[3])
    _check_options(soft_cap, sliding_window)
    if lengths.shape != (q.shape[0],) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be int[B={q.shape[0]}], got {lengths.dtype}"
                         f"{list(lengths.shape)}")
    concrete = _concrete(lengths)
    if concrete is not None and ((concrete < 0) | (concrete > k.shape[2])).any():
        bad = int(concrete[(concrete < 0) | (concrete > k.shape[2])][0])
        raise ValueError(f"length {bad} is outside [0, L={k.shape[2]}]")
    options = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    if impl == "reference":
        return reference.dense_decode_reference(q, k, v, lengths, **options)
    return xla_attention.dense_decode(q, k, v, lengths, **options)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where a step's tokens go and what they attend to; shared by every layer.

    slot_mapping, q_seq, positions: ``int32[T]`` (cache slot, page-table row and absolute
    position of each token; padding tokens write into the null page). page_table: rows of
    the sequences in this step, lengths counting this step's tokens. is_decode (static):
    every row has exactly one token, token i belongs to row i, so the decode kernel runs.
    """

    slot_mapping: jax.Array
    q_seq: jax.Array
    positions: jax.Array
    page_table: PageTable
    is_decode: bool = dataclasses.field(default=False, metadata=dict(static=True))


def cached_attention(q, k, v, cache: KVCache, layer, meta: AttentionMetadata, **options):
    """What one attention layer of a model does with the paged cache: write, then attend.

    q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` for this step's tokens; layer: int or traced
    scalar. Returns (``[T, Hq, D]``, the updated cache). Options go to the attention call;
    the whole stacked pool is passed with ``layer`` so no layer slice is copied.
    """
    cache = write(cache, k, v, meta.slot_mapping, layer=layer)
    scales = dict(k_scale=cache.k_scale, v_scale=cache.v_scale)
    if meta.is_decode:
        out = paged_attention(q, cache.k, cache.v, meta.page_table, layer=layer, **scales,
                              **options)
    else:
        prefill_options = {name: value for name, value in options.items()
                           if name not in PALLAS_ONLY_OPTIONS}
        out = paged_prefill_attention(q, cache.k, cache.v, meta.page_table, meta.q_seq,
                                      meta.positions, layer=layer, **scales,
                                      **prefill_options)
    return out, cache


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _pallas_decode_module():
    """The Pallas kernel module, imported on first use so jpaged works without it."""
    try:
        from pallas_kernels import paged_decode
    except ImportError as err:
        raise ValueError(f"impl='pallas' needs pallas_kernels.paged_decode, which failed to "
                         f"import: {err}") from err
    return paged_decode


def _choose_decode_impl(impl, q, k_pages, pages_per_block) -> str:
    """Resolve "auto"; for "pallas" let the kernel refuse what Triton cannot take."""
    if impl in ("xla", "reference") or (impl == "auto" and not _on_gpu()):
        return "xla" if impl == "auto" else impl
    if is_quantized(k_pages.dtype):
        if impl == "pallas":
            raise ValueError(f"impl='pallas' cannot read {k_pages.dtype} pages (the Triton "
                             f"kernel reads float pages only); use impl='xla' or 'auto'")
        return "xla"
    num_kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
    config = (q.shape[1], num_kv_heads, head_dim, page_size, k_pages.dtype, pages_per_block)
    if impl == "pallas":
        _pallas_decode_module().check_config(*config)
        return "pallas"
    try:
        _pallas_decode_module().check_config(*config)
    except ValueError as err:
        warnings.warn(f"paged_attention: the Pallas kernel cannot take this configuration "
                      f"({err}); using the XLA path", stacklevel=3)
        return "xla"
    return "pallas"


def _check_attention_inputs(q, k_pages, v_pages, page_table, layer, impl, k_scale, v_scale,
                            *, soft_cap, sliding_window, pages_per_block) -> None:
    """Host-side checks shared by decode and prefill; each names the offending value."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if q.ndim != 3:
        raise ValueError(f"q must be rank 3 [tokens, Hq, D], got shape {tuple(q.shape)}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be a float array, got dtype {q.dtype}")
    check_pages(k_pages, v_pages, k_scale, v_scale)
    if k_pages.ndim == 5:
        _check_layer(layer, k_pages.shape[0])
    elif k_pages.ndim == 4:
        if layer is not None:
            raise ValueError(f"layer={layer!r} needs the stacked pool [L, Hkv, P, S, D], got "
                             f"pages of shape {tuple(k_pages.shape)}")
    else:
        raise ValueError(f"pages must be [Hkv, P, S, D] or [L, Hkv, P, S, D], got shape "
                         f"{tuple(k_pages.shape)}")
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape[-4:]
    _check_heads(q, num_kv_heads, head_dim)
    _check_options(soft_cap, sliding_window)
    if pages_per_block is not None and not (isinstance(pages_per_block, (int, np.integer))
                                            and pages_per_block > 0):
        raise ValueError(f"pages_per_block={pages_per_block!r} must be a positive integer")
    page_table.validate(num_pages, page_size)


def _check_layer(layer, num_layers: int) -> None:
    if layer is None:
        raise ValueError(f"stacked pages [L={num_layers}, Hkv, P, S, D] need layer=")
    if np.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(f"layer must be an integer scalar, got {layer!r}")
    concrete = _concrete(layer)
    if concrete is not None and not 0 <= concrete < num_layers:
        raise ValueError(f"layer={int(concrete)} is outside [0, {num_layers})")


def _check_heads(q, num_kv_heads: int, head_dim: int) -> None:
    num_q_heads = q.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_kv_heads} K/V heads do not divide the {num_q_heads} query "
                         f"heads")
    if q.shape[2] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[2]} but the K/V have head_dim {head_dim}")


def _check_options(soft_cap, sliding_window) -> None:
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap={soft_cap!r} must be positive")
    if sliding_window is not None and not (isinstance(sliding_window, (int, np.integer))
                                           and sliding_window > 0):
        raise ValueError(f"sliding_window={sliding_window!r} must be a positive integer")


def _check_token_index(name: str, index, num_tokens: int, upper=None) -> None:
    """q_seq / q_pos: ``int32[T]``; with ``upper``, values in ``[0, upper)`` when concrete."""
    if index.shape != (num_tokens,) or index.dtype != np.int32:
        raise ValueError(f"{name} must be int32[T={num_tokens}], got {index.dtype}"
                         f"{list(index.shape)}")
    concrete = _concrete(index)
    if upper is not None and concrete is not None:
        bad = (concrete < 0) | (concrete >= upper)
        if bad.any():
            raise ValueError(f"{name} value {int(concrete[bad][0])} is outside [0, {upper})")


def _concrete(x):
    """x as a numpy value, or None when it is traced (inside jit)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _layer_pages(k_pages, v_pages, scales, layer):
    """One layer's pages and scales for the reference (it may copy: not the fast path)."""
    if layer is None:
        return k_pages, v_pages, scales
    return k_pages[layer], v_pages[layer], {name: None if scale is None else scale[layer]
                                            for name, scale in scales.items()}
