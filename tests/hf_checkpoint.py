"""A model's params and config in Hugging Face's checkpoint layout (the inverse of
``jpaged.models.loader``'s mapping), written without torch: what the loader, parity and server
tests read."""

import json
import pathlib

import numpy as np
from safetensors.numpy import save_file

from jpaged.models import ModelConfig
from jpaged.models.loader import hf_names


def hf_config_dict(config: ModelConfig) -> dict:
    return {"architectures": [config.architecture], "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
            "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
            "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings}


def hf_tensors(config, params) -> dict[str, np.ndarray]:
    """Our params under HF names and layouts (the inverse of the loader's mapping)."""
    tensors = {}
    for name, (path, layer, transpose) in hf_names(config).items():
        array = params
        for key in path:
            array = array[key]
        array = np.asarray(array if layer is None else array[layer])
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    return tensors


def write_checkpoint(directory, config, tensors, hf_config=None):
    """``config.json`` and ``model.safetensors`` in ``directory`` (created if missing)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config or hf_config_dict(config)))
    save_file(tensors, str(directory / "model.safetensors"))
