"""Flax models (Llama family) that run on the paged KV cache."""

from jpaged.models.checkpoint import restore_params, save_params
from jpaged.models.config import ModelConfig, RopeScaling, tiny_config
from jpaged.models.llama import forward, forward_no_cache, init_params, param_axes
from jpaged.models.loader import Model, load_config, load_hf, load_model, load_tokenizer

__all__ = [
    "Model",
    "ModelConfig",
    "RopeScaling",
    "forward",
    "forward_no_cache",
    "init_params",
    "param_axes",
    "load_config",
    "load_hf",
    "load_model",
    "load_tokenizer",
    "restore_params",
    "save_params",
    "tiny_config",
]
