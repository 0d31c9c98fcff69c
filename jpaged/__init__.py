"""jpaged: PagedAttention for JAX.

The package is layered; each layer imports only the ones above it in this list, and
``import jpaged`` loads none of them until a name is first used (module ``__getattr__``):

- ``jpaged.pallas_kernels``: the Pallas kernels and their references (the top-level
  ``pallas_kernels/`` folder);
- ``jpaged.core``: the paged KV cache and attention (``KVCache``, ``PageTable``, ``write``,
  ``paged_attention``, ``cached_attention``), shapes, the model interfaces;
- ``jpaged.host``: block manager, scheduler, requests, sampling parameters, stop rules
  (plain Python and numpy, no JAX);
- ``jpaged.parallel.layers`` and ``jpaged.models`` (the top-level ``models/`` folder): the
  Flax Llama family, built from the core;
- ``jpaged.engine``: the batch builder, the jitted step and sampler, ``LLMEngine``, ``LLM``;
  ``jpaged.parallel``: meshes, data-parallel replicas, several processes;
  ``jpaged.decode_loop``: a whole generation in one jit;
- ``jpaged.serving``: the OpenAI-compatible server and the ``jpaged`` command;
  ``jpaged.tools``: the throughput comparison, the soak, the pool plot.

A model of your own is a ``jpaged.core.interfaces.ModelBundle(config, params, forward)``.
The map of the code: docs/architecture.md.
"""

import importlib
import os

# From a source tree (an editable install, or PYTHONPATH at the checkout) `models/` and
# `pallas_kernels/` sit beside this folder; an installed wheel has them inside it
# (pyproject.toml's package-dir). Either way they are `jpaged.models` and
# `jpaged.pallas_kernels`, so a user's own `models.py` never shadows them.
_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, "models")):
    __path__.append(os.path.dirname(_here))  # noqa: F821 (the package's own __path__)

# Public name -> the module that defines it.
_EXPORTS = {
    "AttentionMetadata": "jpaged.core.attention",
    "cached_attention": "jpaged.core.attention",
    "dense_attention": "jpaged.core.attention",
    "paged_attention": "jpaged.core.attention",
    "paged_prefill_attention": "jpaged.core.attention",
    "KVCache": "jpaged.core.cache",
    "PageTable": "jpaged.core.cache",
    "copy_pages": "jpaged.core.cache",
    "write": "jpaged.core.cache",
    "ModelBundle": "jpaged.core.interfaces",
    "BlockManager": "jpaged.host.block_manager",
    "Scheduler": "jpaged.host.scheduler",
    "SamplingParams": "jpaged.host.sampling_params",
    "CompletionOutput": "jpaged.host.request",
    "RequestOutput": "jpaged.host.request",
    "DecodeOutput": "jpaged.decode_loop",
    "decode_loop": "jpaged.decode_loop",
    "prepare": "jpaged.decode_loop",
    "reserve": "jpaged.decode_loop",
    "LLM": "jpaged.engine.engine",
    "LLMEngine": "jpaged.engine.engine",
    "plot_pool": "jpaged.tools.pool_plot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jpaged' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
