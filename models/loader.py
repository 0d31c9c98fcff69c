"""Load Hugging Face checkpoints (``config.json`` + safetensors) onto the stacked Flax params."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jpaged.models.config import ModelConfig, tiny_config
from jpaged.models.llama import forward, init_params, param_axes, param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some older checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory!r} (looked for {path})")
    with open(path) as f:
        return ModelConfig.from_hf(json.load(f))


def hf_names(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None, bool]]:
    """HF tensor name -> (Flax param path, layer index or None, transpose?).

    HF Linear weights are ``[out, in]``; Flax Dense kernels are ``[in, out]``.
    """
    names = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), None, False),
             "model.norm.weight": (("norm", "weight"), None, False)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), None, True)
    per_layer = {"input_layernorm.weight": ("input_layernorm", "weight"),
                 "post_attention_layernorm.weight": ("post_attention_layernorm", "weight")}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        per_layer[f"self_attn.{proj}.weight"] = ("self_attn", proj, "kernel")
    if config.attention_bias:
        for proj in ("q_proj", "k_proj", "v_proj"):
            per_layer[f"self_attn.{proj}.bias"] = ("self_attn", proj, "bias")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        per_layer[f"mlp.{proj}.weight"] = ("mlp", proj, "kernel")
    for i in range(config.num_layers):
        for suffix, path in per_layer.items():
            names[f"model.layers.{i}.{suffix}"] = (("layers",) + path, i, path[-1] == "kernel")
    return names


def _tensor_files(directory: str) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file} listed in {index_path} does not exist")
        return files
    path = os.path.join(directory, SINGLE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory!r}")
    with safe_open(path, framework="numpy") as f:
        return {name: path for name in f.keys()}


def default_dtype():
    """bfloat16 on accelerators, float32 on CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load_hf(directory: str, dtype=None,
            place: Callable[[str, np.ndarray], jax.Array] | None = None):
    """Read a HF Llama/Qwen2/Mistral checkpoint directory -> (ModelConfig, params).

    dtype: param dtype (default: ``default_dtype()``). place(name, array) puts one stacked
    host array on devices (default ``jax.device_put``); name is the Flax path joined by "/",
    so tensor parallelism can hand each param its own sharding.
    """
    config = load_config(directory)
    dtype = jnp.dtype(default_dtype() if dtype is None else dtype)
    place = place or (lambda name, array: jax.device_put(array))
    files = _tensor_files(directory)
    names = hf_names(config)
    for name, file in files.items():
        tied_head = config.tie_word_embeddings and name == "lm_head.weight"
        if name not in names and not tied_head and not name.endswith(IGNORED_SUFFIXES):
            raise ValueError(f"unexpected tensor {name!r} in {file}")
    missing = sorted(set(names) - set(files))
    if missing:
        raise ValueError(f"tensor {missing[0]!r} missing from the checkpoint in {directory!r} "
                         f"(files: {', '.join(sorted(set(files.values())))}; "
                         f"{len(missing)} missing in all)")

    # Per-layer tensors are collected into one host buffer per param, then placed once.
    expected = param_shapes(config)
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    for file in sorted(set(files[name] for name in names)):
        with safe_open(file, framework="numpy") as f:
            for name in [n for n in names if files[n] == file]:
                path, layer, transpose = names[name]
                shape = _lookup(expected, path).shape
                array = f.get_tensor(name)
                array = array.T if transpose else array
                want = shape if layer is None else shape[1:]
                if array.shape != want:
                    raise ValueError(f"tensor {name!r} in {file} has shape "
                                     f"{_hf_shape(array.shape, transpose)}, expected "
                                     f"{_hf_shape(want, transpose)} for {config.architecture}")
                if layer is None:
                    buffers[path] = array.astype(dtype)
                else:
                    buffers.setdefault(path, np.empty(shape, dtype))[layer] = array
    params: dict = {}
    for path, array in buffers.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = place("/".join(path), array)
    return config, params


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _hf_shape(shape, transpose):
    return tuple(reversed(shape)) if transpose else tuple(shape)


def load_tokenizer(directory: str):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``, or None when there is none."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


@dataclasses.dataclass(frozen=True)
class Model:
    """A Llama-family model bundle: a ``jpaged.core.interfaces.Model``."""

    config: ModelConfig
    params: Any
    forward: Callable = forward
    tokenizer: Any = None
    eos_token_ids: tuple[int, ...] = ()

    @functools.cached_property   # traces the modules' init: computed once per bundle
    def param_axes(self) -> dict[str, tuple[str | None, ...]]:
        return param_axes(self.config)


def load_model(spec: str, dtype=None, seed: int = 0, place=None) -> Model:
    """``"tiny"`` (the embedded random model, from ``seed``) or a HF checkpoint directory
    (``place``: see ``load_hf``)."""
    if spec == "tiny":
        config = tiny_config()
        dtype = default_dtype() if dtype is None else dtype
        return Model(config, init_params(config, jax.random.key(seed), dtype))
    config, params = load_hf(spec, dtype, place)
    return Model(config, params, tokenizer=load_tokenizer(spec),
                 eos_token_ids=_eos_token_ids(spec))


def _eos_token_ids(directory: str) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (an int or a list in each)."""
    ids = set()
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            ids.update([] if eos is None else [eos] if isinstance(eos, int) else eos)
    return tuple(sorted(ids))
