"""``LLM`` options that are not plain numbers: vLLM's spellings and memory-based sizing.

vLLM users write ``LLM(model, tensor_parallel_size=2, block_size=16, swap_space=4,
gpu_memory_utilization=0.9)``. jpaged keeps one name per concept (``tensor_parallel``,
``page_size``, ...); ``translate_vllm_names`` is the one place the other spelling maps onto
it. Names the two share (``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``,
``enable_prefix_caching``, ``dtype``, ``seed``) need no mapping.
"""

from __future__ import annotations

import functools

GIB = 2**30

# vLLM keyword -> (jpaged keyword, conversion of the value).
VLLM_NAMES = {
    "tensor_parallel_size": ("tensor_parallel", None),
    "data_parallel_size": ("data_parallel", None),
    "block_size": ("page_size", None),
    "gpu_memory_utilization": ("memory_utilization", None),
    # vLLM's swap space is GiB of host memory per device for swapped-out KV pages.
    "swap_space": ("host_cache_bytes", lambda gib: int(gib * GIB)),
}


def translate_vllm_names(options: dict) -> dict:
    """``options`` with every vLLM spelling replaced by jpaged's; a ValueError when a
    concept is given under both names."""
    translated = dict(options)
    for vllm_name, (name, convert) in VLLM_NAMES.items():
        if vllm_name not in options:
            continue
        if name in options:
            raise ValueError(f"{vllm_name}= and {name}= name the same option; pass one "
                             f"(got {vllm_name}={options[vllm_name]!r}, {name}={options[name]!r})")
        value = translated.pop(vllm_name)
        if convert is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{vllm_name} must be a number >= 0, got {value!r}")
            value = convert(value)
        translated[name] = value
    return translated


# The pool budget per device when nothing sizes it, or the device reports no memory (CPU).
FALLBACK_KV_BYTES = 64 * 2**20


def kv_bytes_from_utilization(fraction: float, devices) -> int:
    """KV pool bytes per device for ``memory_utilization=fraction``: ``fraction`` of each
    device's memory (``memory_stats()["bytes_limit"]``) less what is in use once the
    weights are loaded, on the device with the least room. A device that reports no
    memory statistics (CPU) falls back to ``FALLBACK_KV_BYTES``. Unlike vLLM, no profiling
    run reserves activation memory: leave headroom in ``fraction``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {fraction!r}")
    room = []
    for device in devices:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return FALLBACK_KV_BYTES
        room.append(int(fraction * stats["bytes_limit"]) - stats.get("bytes_in_use", 0))
    if min(room) <= 0:
        raise ValueError(f"memory_utilization={fraction}: the weights already use more than "
                         f"that fraction of device memory ({min(room)} bytes left)")
    return min(room)


def accepts_vllm_names(init):
    """Decorates ``LLM.__init__`` so it also takes vLLM's keyword names."""

    @functools.wraps(init)
    def wrapper(self, model="tiny", **options):
        init(self, model, **translate_vllm_names(options))

    return wrapper
