"""Flax models (Llama family) that run on the paged KV cache."""

from models.checkpoint import restore_params, save_params
from models.config import ModelConfig, RopeScaling, tiny_config
from models.llama import forward, forward_no_cache, init_params, param_axes
from models.loader import Model, load_config, load_hf, load_model, load_tokenizer

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
