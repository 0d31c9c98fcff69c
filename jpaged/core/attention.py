"""Paged attention entry points: one call, several implementations.

``impl="pallas"`` is the Triton decode kernel (``jpaged.pallas_kernels.paged_decode``; on a CPU it
runs in interpret mode), ``"mosaic"`` the Mosaic GPU kernels (Hopper; on a CPU they run
in Mosaic GPU interpret mode): the ragged kernel for prefill
(``jpaged.pallas_kernels.ragged_attention``) and the decode-shaped tile for decode
(``mosaic_decode``; the ragged kernel where head_dim is 32), ``"xla"`` the block-wise gather + online softmax in plain jnp
(``jpaged.pallas_kernels.xla_attention``, any backend), ``"reference"`` the readable
gather-everything version (``jpaged.pallas_kernels.reference``). ``"auto"`` takes the kernel on
a GPU when it accepts the configuration and the XLA path everywhere else; it does not
pick "mosaic" until a GPU run has measured it.

8-bit pages (int8 or float8_e4m3fn codes) come with ``k_scale`` / ``v_scale``, the pages'
shape minus head_dim (``KVCache.k_scale``); the Triton kernel, the XLA path and the
reference dequantize them inside the loop, so "auto" on a GPU takes the Triton kernel for
an 8-bit pool as for a float one. The Mosaic kernel widens the codes to q's dtype in
shared memory and applies the scales to the logits and probabilities.

Inputs are checked on the host before anything is launched; values that are only known
inside jit (page ids, lengths, a traced layer) are checked when they are concrete.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.core.cache import KVCache, PageTable, check_pages, check_table_arrays, write
from jpaged.core.shapes import check_positive
from jpaged.pallas_kernels import reference, xla_attention

IMPLS = ("auto", "pallas", "mosaic", "xla", "reference")
# Knobs of the Triton decode kernel that prefill does not take.
PALLAS_ONLY_OPTIONS = ("num_splits",)


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
    (default: True off GPU) go to the Pallas kernel; ``interpret`` also to the Mosaic one.
    """
    _validate(q, k_pages, v_pages, page_table, layer, impl, k_scale, v_scale, soft_cap=soft_cap,
              sliding_window=sliding_window, pages_per_block=pages_per_block)
    options = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    tables, lengths = page_table.block_tables, page_table.lengths
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if impl == "mosaic":
        return _mosaic_decode(q, k_pages, v_pages, page_table, layer=layer,
                              pages_per_block=pages_per_block, interpret=interpret, **scales,
                              **options)
    impl = _choose_decode_impl(impl, q, k_pages, pages_per_block)
    if impl == "pallas":
        return _pallas_decode_module().paged_decode(
            q, k_pages, v_pages, tables, lengths, layer=layer, pages_per_block=pages_per_block,
            num_splits=num_splits, interpret=not _on_gpu() if interpret is None else interpret,
            **scales, **options)
    if impl == "xla":
        return xla_attention.paged_decode(q, k_pages, v_pages, tables, lengths, layer=layer,
                                          pages_per_block=pages_per_block, **scales, **options)
    k_pages, v_pages, scales = _layer_pages(k_pages, v_pages, scales, layer)
    return reference.paged_decode_reference(q, k_pages, v_pages, tables, lengths, **scales,
                                            **options)


def paged_prefill_attention(q, k_pages, v_pages, page_table: PageTable, q_seq, q_pos, *,
                            impl: str = "auto", layer=None, k_scale=None, v_scale=None,
                            sm_scale=None, soft_cap=None, sliding_window=None,
                            pages_per_block=None, interpret=None):
    """Prefill attention: ragged query tokens, each causal over its sequence's pages.

    q: ``[T, Hq, D]``; q_seq, q_pos: ``int32[T]`` (page-table row and absolute position
    of each token); pages, scales and ``layer`` as in ``paged_attention``; page_table
    lengths count this step's tokens, whose K/V are already written. Returns
    ``[T, Hq, D]``. "mosaic" runs the Mosaic GPU ragged kernel (``interpret``: default
    True off GPU; the other implementations ignore it; a row's tokens should be
    consecutive in the batch, as the engine lays them out). The Triton kernel is
    decode-only: "auto" and "pallas" run the XLA path, so one ``impl`` option can serve
    both phases of a model.
    """
    _validate(q, k_pages, v_pages, page_table, layer, impl, k_scale, v_scale,
              soft_cap=soft_cap, sliding_window=sliding_window,
              pages_per_block=pages_per_block, q_seq=q_seq, q_pos=q_pos)
    options = dict(sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
    tables, lengths = page_table.block_tables, page_table.lengths
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if impl == "mosaic":
        return _mosaic(q, k_pages, v_pages, page_table, q_seq, q_pos, layer=layer,
                       pages_per_block=pages_per_block, interpret=interpret, **scales,
                       **options)
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
    attention_impl (static): the ``impl`` every layer's attention uses unless the model
    passes its own (the engine's and ``decode_loop``'s ``attention_impl`` option).
    """

    slot_mapping: jax.Array
    q_seq: jax.Array
    positions: jax.Array
    page_table: PageTable
    is_decode: bool = dataclasses.field(default=False, metadata=dict(static=True))
    attention_impl: str = dataclasses.field(default="auto", metadata=dict(static=True))


def cached_attention(q, k, v, cache: KVCache, layer, meta: AttentionMetadata, **options):
    """What one attention layer of a model does with the paged cache: write, then attend.

    q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` for this step's tokens; layer: int or traced
    scalar. Returns (``[T, Hq, D]``, the updated cache). Options go to the attention call;
    the whole stacked pool is passed with ``layer`` so no layer slice is copied.
    """
    cache = write(cache, k, v, meta.slot_mapping, layer=layer)
    options = {"impl": meta.attention_impl, **options}
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
        from jpaged.pallas_kernels import paged_decode
    except ImportError as err:
        raise ValueError(f"impl='pallas' needs jpaged.pallas_kernels.paged_decode, which failed to "
                         f"import: {err}") from err
    return paged_decode


def check_impl(impl) -> None:
    """Raise ValueError unless ``impl`` names an attention implementation."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def _mosaic(q, k_pages, v_pages, page_table, q_seq, q_pos, *, interpret, **options):
    """The Mosaic GPU ragged kernel over tokens at (row, position); compiled on a GPU."""
    try:
        from jpaged.pallas_kernels import ragged_attention
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        raise ValueError(f"impl='mosaic' needs jpaged.pallas_kernels.ragged_attention, which failed "
                         f"to import: {err}") from err
    rows = _concrete(q_seq)
    if rows is not None:
        ragged_attention.check_token_layout(rows, page_table.batch,
                                            q.shape[1] // k_pages.shape[-4])
    return ragged_attention.paged_attention_tokens(
        q, k_pages, v_pages, page_table.block_tables, page_table.lengths, q_seq, q_pos,
        interpret=not _on_gpu() if interpret is None else interpret, **options)


def _mosaic_decode(q, k_pages, v_pages, page_table, *, interpret, **options):
    """Decode on Mosaic GPU: the decode-shaped tile where its check_config takes the
    configuration (head_dim 64, 128, 256; a jax it lowers on), else the ragged kernel
    with one token per row (which then names what it refuses)."""
    from jpaged.pallas_kernels import mosaic_decode
    interpret = not _on_gpu() if interpret is None else interpret
    try:
        mosaic_decode.check_config(q.shape[1], k_pages.shape[-4], k_pages.shape[-1],
                                   k_pages.shape[-2], k_pages.dtype,
                                   options.get("pages_per_block"), q_dtype=q.dtype,
                                   interpret=interpret)
        decode_tile = True
    except ValueError:   # head_dim 32, or a jax it does not lower on: the ragged kernel
        decode_tile = False
    if not decode_tile:
        rows = jnp.arange(q.shape[0], dtype=jnp.int32)
        return _mosaic(q, k_pages, v_pages, page_table, rows, page_table.lengths - 1,
                       interpret=interpret, **options)
    return mosaic_decode.paged_decode(
        q, k_pages, v_pages, page_table.block_tables, page_table.lengths,
        interpret=interpret, **options)


def _choose_decode_impl(impl, q, k_pages, pages_per_block) -> str:
    """Resolve "auto"; for "pallas" let the kernel refuse what Triton cannot take."""
    if impl in ("xla", "reference") or (impl == "auto" and not _on_gpu()):
        return "xla" if impl == "auto" else impl
    num_kv_heads, _, page_size, head_dim = k_pages.shape[-4:]
    config = (q.shape[1], num_kv_heads, head_dim, page_size, k_pages.dtype, pages_per_block)
    if impl == "pallas":
        _pallas_decode_module().check_config(*config, q_dtype=q.dtype)
        return "pallas"
    try:
        _pallas_decode_module().check_config(*config, q_dtype=q.dtype)
    except ValueError as err:
        warnings.warn(f"paged_attention: the Pallas kernel cannot take this configuration "
                      f"({err}); using the XLA path", stacklevel=3)
        return "xla"
    return "pallas"


def _validate(q, k_pages, v_pages, page_table: PageTable, layer, impl, k_scale=None,
              v_scale=None, *, soft_cap,
              sliding_window, pages_per_block, q_seq=None, q_pos=None) -> None:
    """Every check of one paged attention call, once, each naming the offending value.

    Two parts, like the TPU ragged paged attention's validators: shapes, dtypes and
    options are static (checked at trace time too), values (page ids, lengths, the layer,
    q_seq rows) only when concrete. Decode passes no q_seq / q_pos (one token per row).
    """
    _check_static(q, k_pages, v_pages, page_table, layer, impl, k_scale, v_scale,
                  soft_cap=soft_cap,
                  sliding_window=sliding_window, pages_per_block=pages_per_block,
                  q_seq=q_seq, q_pos=q_pos)
    num_layers, num_pages, page_size = (k_pages.shape[0] if k_pages.ndim == 5 else None,
                                        k_pages.shape[-3], k_pages.shape[-2])
    page_table.check_values(num_pages, page_size)
    layer_value = None if layer is None else _concrete(layer)
    if num_layers is not None and layer_value is not None and not 0 <= layer_value < num_layers:
        raise ValueError(f"layer={int(layer_value)} is outside [0, {num_layers})")
    rows = None if q_seq is None else _concrete(q_seq)
    if rows is not None:
        bad = (rows < 0) | (rows >= page_table.batch)
        if bad.any():
            raise ValueError(f"q_seq value {int(rows[bad][0])} is outside "
                             f"[0, {page_table.batch})")


def _check_static(q, k_pages, v_pages, page_table, layer, impl, k_scale, v_scale, *,
                  soft_cap, sliding_window, pages_per_block, q_seq, q_pos) -> None:
    """Shapes, dtypes and options: what is known at trace time."""
    check_impl(impl)
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
    num_kv_heads, _, _, head_dim = k_pages.shape[-4:]
    _check_heads(q, num_kv_heads, head_dim)
    _check_options(soft_cap, sliding_window)
    if pages_per_block is not None:
        check_positive(pages_per_block=pages_per_block)
    check_table_arrays(page_table.block_tables, page_table.lengths)
    if q_seq is None:   # decode: row i is token i
        if q.shape[0] != page_table.batch:
            raise ValueError(f"q has batch {q.shape[0]} but the page table has "
                             f"{page_table.batch} rows")
        return
    for name, index in (("q_seq", q_seq), ("q_pos", q_pos)):
        if index.shape != (q.shape[0],) or index.dtype != np.int32:
            raise ValueError(f"{name} must be int32[T={q.shape[0]}], got {index.dtype}"
                             f"{list(index.shape)}")


def _check_layer(layer, num_layers: int) -> None:
    if layer is None:
        raise ValueError(f"stacked pages [L={num_layers}, Hkv, P, S, D] need layer=")
    if np.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(f"layer must be an integer scalar, got {layer!r}")


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
    if sliding_window is not None:
        check_positive(sliding_window=sliding_window)


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
