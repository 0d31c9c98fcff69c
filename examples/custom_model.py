"""Bring your own model: a minimal Flax decoder on jpaged's paged KV cache, decoded by the
jitted loop.

The only jpaged-specific part is one line in the attention layer:
``jpaged.cached_attention`` writes this step's K/V into the pool and attends over the
pages (decode or prefill, as ``meta`` says). Everything else is ordinary Flax, and
``forward`` has the signature the engine and ``decode_loop`` drive, so this model also
runs in ``jpaged.engine.LLMEngine``.

    python examples/custom_model.py [--steps 32] [--batch 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jpaged
from jpaged.decode_loop import decode_loop, prepare


@dataclasses.dataclass(frozen=True)
class Config:
    """Hashable (a static jit argument); decode_loop reads the four cache/vocab fields."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_len: int = 1024


class PagedSelfAttention(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, cache, layer, meta):
        """x: ``[T, E]`` (this step's tokens, flattened); layer: this layer's index in the
        pool. Returns (``[T, E]``, the cache with this step's K/V written)."""
        c = self.config
        q = nn.DenseGeneral((c.num_heads, c.head_dim), name="q")(x)       # [T, Hq, D]
        k = nn.DenseGeneral((c.num_kv_heads, c.head_dim), name="k")(x)    # [T, Hkv, D]
        v = nn.DenseGeneral((c.num_kv_heads, c.head_dim), name="v")(x)
        out, cache = jpaged.cached_attention(q, k, v, cache, layer, meta)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o")(out), cache


class Decoder(nn.Module):
    """Pre-norm transformer with learned positions (no rotary: any model works)."""

    config: Config

    @nn.compact
    def __call__(self, token_ids, cache, meta, logits_indices):
        c = self.config
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="tokens")(token_ids)
             + nn.Embed(c.max_len, c.hidden_size, name="positions")(meta.positions))
        for layer in range(c.num_layers):
            h, cache = PagedSelfAttention(c, name=f"attention_{layer}")(
                nn.LayerNorm()(x), cache, layer, meta)
            x = x + h
            x = x + nn.Dense(c.hidden_size)(nn.gelu(nn.Dense(4 * c.hidden_size)(
                nn.LayerNorm()(x))))
        return nn.Dense(c.vocab_size)(nn.LayerNorm()(x[logits_indices])), cache


def forward(params, config: Config, cache, token_ids, meta, logits_indices):
    """token_ids, meta: one step's tokens ``int32[T]``; returns (logits for the tokens at
    ``logits_indices``, the cache)."""
    return Decoder(config).apply({"params": params}, token_ids, cache, meta, logits_indices)


class Model(NamedTuple):
    """The bundle decode_loop, prepare and the engine take."""

    config: Config
    params: Any
    forward: Callable = forward


def init_model(config: Config, seed: int = 0) -> Model:
    """Random params, traced through one decode step on a one-page pool."""
    cache = jpaged.KVCache.create(config.num_layers, config.num_kv_heads, config.head_dim,
                                  page_size=1, num_pages=2)
    one = jnp.zeros(1, jnp.int32)
    meta = jpaged.AttentionMetadata(slot_mapping=one + 1, q_seq=one, positions=one,
                                    page_table=jpaged.PageTable.from_lists([[1]], [1]),
                                    is_decode=True)
    params = Decoder(config).init(jax.random.key(seed), one, cache, meta, one)["params"]
    return Model(config, params)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)

    model = init_model(Config())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, int(n)).tolist()
               for n in rng.integers(4, 40, args.batch)]
    results = {}
    for layout, dense in (("paged", False), ("dense", True)):
        # Three lines from prompts to a jitted loop:
        cache, table, first = prepare(model, prompts, num_steps=args.steps, dense=dense)
        out = decode_loop(model, model.params, cache, table, first, num_steps=args.steps)
        tokens = np.concatenate([np.asarray(first)[:, None], np.asarray(out.tokens)], axis=1)
        start = time.perf_counter()   # a second call: compiled already, the cache reused
        jax.block_until_ready(decode_loop(model, model.params, out.cache, table, first,
                                          num_steps=args.steps))
        seconds = time.perf_counter() - start
        results[layout] = tokens
        print(f"{layout}: {args.batch * args.steps / seconds:8.0f} tokens/s, first row "
              f"{tokens[0, :12].tolist()}...")
    same = bool((results["paged"] == results["dense"]).all())
    print(f"paged and dense tokens equal: {same}")
    return {"prompts": prompts, "model": model, **results}


if __name__ == "__main__":
    main()
