"""A tiny Llama checkpoint on disk (config.json, safetensors, a word-level tokenizer,
optionally a chat template), written without torch: what ``jpaged serve --model DIR`` and
``LLM(model=DIR)`` read in the server tests."""

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

import models
from models.loader import hf_names

CONFIG = models.tiny_config(vocab_size=256, max_position_embeddings=1024)
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Words 0..255 of the vocabulary: the roles, then w4, w5, ...
WORDS = list(ROLES) + [f"w{i}" for i in range(len(ROLES), CONFIG.vocab_size)]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers

    tokenizer = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                               unk_token="w4"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return tokenizer


def write_checkpoint(directory: str, chat_template: bool = True, seed: int = 0) -> str:
    """A random-weight tiny Llama in Hugging Face's layout; returns ``directory``."""
    os.makedirs(directory, exist_ok=True)
    params = models.init_params(CONFIG, jax.random.key(seed), np.float32)
    tensors = {}
    for name, (path, layer, transpose) in hf_names(CONFIG).items():
        array = params
        for key in path:
            array = array[key]
        array = np.asarray(array if layer is None else array[layer])
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": CONFIG.vocab_size,
          "hidden_size": CONFIG.hidden_size, "intermediate_size": CONFIG.intermediate_size,
          "num_hidden_layers": CONFIG.num_layers, "num_attention_heads": CONFIG.num_heads,
          "num_key_value_heads": CONFIG.num_kv_heads, "head_dim": CONFIG.head_dim,
          "rms_norm_eps": CONFIG.rms_norm_eps, "rope_theta": CONFIG.rope_theta,
          "max_position_embeddings": CONFIG.max_position_embeddings,
          "tie_word_embeddings": False, "hidden_act": "silu"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f)
    _tokenizer().save(os.path.join(directory, "tokenizer.json"))
    tokenizer_config = {"bos_token": None, "eos_token": "<|end|>"}
    if chat_template:
        tokenizer_config["chat_template"] = TEMPLATE
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    return directory
