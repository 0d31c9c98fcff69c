"""The engine: the batch builder (`batch`), the jitted step (`runner`), the device sampler
(`sampler`), `LLMEngine` and `LLM` (`engine`), loading a model by name (`model_loading`),
options (`llm_options`) and snapshots (`snapshot`)."""

import importlib


def __getattr__(name: str):
    # `from jpaged.engine import LLM` without loading the engine for `jpaged.engine.batch`.
    if name in ("LLM", "LLMEngine"):
        return getattr(importlib.import_module("jpaged.engine.engine"), name)
    raise AttributeError(f"module 'jpaged.engine' has no attribute {name!r}")
