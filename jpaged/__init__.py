"""jpaged: PagedAttention for JAX."""

from jpaged.attention import (AttentionMetadata, cached_attention, dense_attention,
                              paged_attention, paged_prefill_attention)
from jpaged.cache import KVCache, PageTable, copy_pages, write

__all__ = [
    "AttentionMetadata",
    "KVCache",
    "PageTable",
    "cached_attention",
    "copy_pages",
    "dense_attention",
    "paged_attention",
    "paged_prefill_attention",
    "write",
]
