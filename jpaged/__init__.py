"""jpaged: PagedAttention for JAX.

The paged KV cache and attention (``KVCache``, ``PageTable``, ``write``,
``paged_attention``, ``cached_attention``), the host side (``BlockManager``,
``Scheduler``), the engine (``LLM``, ``LLMEngine``, ``SamplingParams``) and the jitted
decoding loop (``decode_loop``, ``prepare``), and a picture of the pool (``plot_pool``).
Models live in the separate ``models`` package, which ``LLM("tiny")`` or
``LLM(checkpoint_dir)`` loads lazily; a model of your own is a
``jpaged.interfaces.ModelBundle(config, params, forward)``. The map of the code:
docs/architecture.md.
"""

from jpaged.attention import (AttentionMetadata, cached_attention, dense_attention,
                              paged_attention, paged_prefill_attention)
from jpaged.block_manager import BlockManager
from jpaged.cache import KVCache, PageTable, copy_pages, write
from jpaged.decode_loop import DecodeOutput, decode_loop, prepare, reserve
from jpaged.engine import LLM, LLMEngine
from jpaged.pool_plot import plot_pool
from jpaged.request import CompletionOutput, RequestOutput
from jpaged.sampling import SamplingParams
from jpaged.scheduler import Scheduler

__all__ = [
    "LLM",
    "AttentionMetadata",
    "BlockManager",
    "CompletionOutput",
    "DecodeOutput",
    "KVCache",
    "LLMEngine",
    "PageTable",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "cached_attention",
    "copy_pages",
    "decode_loop",
    "dense_attention",
    "paged_attention",
    "paged_prefill_attention",
    "plot_pool",
    "prepare",
    "reserve",
    "write",
]
