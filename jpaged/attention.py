"""Paged attention entry points: one call, several implementations.

``impl="reference"`` is the readable gather-everything version from
``pallas_kernels.reference``; ``"xla"`` and ``"pallas"`` are the fast paths.
"""

from __future__ import annotations

import dataclasses

import jax

from jpaged.cache import KVCache, PageTable, write
from pallas_kernels import reference

IMPLS = ("auto", "pallas", "xla", "reference")


def paged_attention(q, k_pages, v_pages, page_table: PageTable, *, impl: str = "auto",
                    sm_scale=None, soft_cap=None, sliding_window=None):
    """Decode attention: one query token per sequence over its paged K/V.

    q: ``[B, Hq, D]``; k_pages, v_pages: ``[Hkv, P, S, D]`` (one layer of a ``KVCache``);
    page_table: block tables ``int32[B, W]`` and lengths ``int32[B]``. Returns ``[B, Hq, D]``.
    """
    return reference.paged_decode_reference(q, k_pages, v_pages, page_table.block_tables,
                                            page_table.lengths, sm_scale=sm_scale,
                                            soft_cap=soft_cap, sliding_window=sliding_window)


def paged_prefill_attention(q, k_pages, v_pages, page_table: PageTable, q_seq, q_pos, *,
                            impl: str = "auto", sm_scale=None, soft_cap=None,
                            sliding_window=None):
    """Prefill attention: ragged query tokens, each causal over its sequence's pages.

    q: ``[T, Hq, D]``; q_seq, q_pos: ``int32[T]``; page_table lengths count this step's
    tokens, whose K/V are already written. Returns ``[T, Hq, D]``.
    """
    return reference.paged_prefill_reference(q, k_pages, v_pages, page_table.block_tables,
                                             page_table.lengths, q_seq, q_pos,
                                             sm_scale=sm_scale, soft_cap=soft_cap,
                                             sliding_window=sliding_window)


def dense_attention(q, k, v, lengths, *, sm_scale=None, soft_cap=None, sliding_window=None):
    """Decode attention over contiguous K/V ``[B, Hkv, L, D]``; q ``[B, Hq, D]``."""
    return reference.dense_decode_reference(q, k, v, lengths, sm_scale=sm_scale,
                                            soft_cap=soft_cap, sliding_window=sliding_window)


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
    scalar. Returns (``[T, Hq, D]``, the updated cache). Options go to the attention call.
    """
    cache = write(cache, k, v, meta.slot_mapping, layer=layer)
    k_pages, v_pages = cache.layer(layer)
    if meta.is_decode:
        out = paged_attention(q, k_pages, v_pages, meta.page_table, **options)
    else:
        out = paged_prefill_attention(q, k_pages, v_pages, meta.page_table, meta.q_seq,
                                      meta.positions, **options)
    return out, cache
