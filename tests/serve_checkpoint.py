"""A tiny Llama checkpoint on disk (config.json, safetensors, a word-level tokenizer,
optionally a chat template), written without torch: what ``jpaged serve --model DIR`` and
``LLM(model=DIR)`` read in the server tests."""

import json
import os

import jax
import numpy as np

import hf_checkpoint
from jpaged import models

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
    params = models.init_params(CONFIG, jax.random.key(seed), np.float32)
    hf_checkpoint.write_checkpoint(directory, CONFIG, hf_checkpoint.hf_tensors(CONFIG, params),
                                   {**hf_checkpoint.hf_config_dict(CONFIG), "hidden_act": "silu"})
    _tokenizer().save(os.path.join(directory, "tokenizer.json"))
    tokenizer_config = {"bos_token": None, "eos_token": "<|end|>"}
    if chat_template:
        tokenizer_config["chat_template"] = TEMPLATE
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    return directory
