"""Bring your own model: a minimal Flax decoder on jpaged's paged KV cache, decoded by the
jitted loop and served by the engine, on one device or tensor-parallel.

The jpaged-specific parts are one line in the attention layer and the dense layers:
``cached_attention`` writes this step's K/V into the pool and attends over the pages
(decode or prefill, as ``meta`` says); ``jpaged.parallel.layers``' column- and row-parallel
layers declare how their params split and all-reduce themselves, so the same model runs
tensor-parallel with ``LLM(model, tensor_parallel=N)``. Everything else is ordinary Flax.
``ModelBundle(config, params, forward)`` makes it a ``jpaged.core.interfaces.Model``, which the
engine and ``decode_loop`` drive (add ``tokenizer=`` for text prompts, ``eos_token_ids=``
to stop at an end-of-sequence id).

    python examples/custom_model.py [--steps 32] [--batch 4] [--tensor-parallel 2]

With ``--tensor-parallel N`` on a CPU, JAX is started with 8 host devices.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and any(a.startswith("--tensor-parallel") for a in sys.argv):
    # Must be set before JAX starts; a CPU shows one device otherwise.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jpaged.core.attention import AttentionMetadata, cached_attention  # noqa: E402
from jpaged.core.cache import KVCache, PageTable  # noqa: E402
from jpaged.decode_loop import decode_loop, prepare  # noqa: E402
from jpaged.engine.engine import LLM  # noqa: E402
from jpaged.core.interfaces import ModelBundle  # noqa: E402
from jpaged.parallel.layers import (HEADS, KV_HEADS, MLP, ColumnParallelDense,  # noqa: E402
                           RowParallelDense, logical_axes)
from jpaged.host.sampling_params import SamplingParams  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    """Hashable (a static jit argument): a ``jpaged.core.interfaces.ModelConfig``. Tensor
    parallelism runs each device with its share of the three counts it splits (heads, kv
    heads, intermediate_size)."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 1024


class PagedSelfAttention(nn.Module):
    config: Config

    @nn.compact
    def __call__(self, x, cache, layer, meta):
        """x: ``[T, E]`` (this step's tokens, flattened); layer: this layer's index in the
        pool. Returns (``[T, E]``, the cache with this step's K/V written)."""
        c = self.config

        def project(name, heads, axis):   # [T, heads, D]
            y = ColumnParallelDense(heads * c.head_dim, axis, use_bias=True, name=name)(x)
            return y.reshape(-1, heads, c.head_dim)

        q = project("q", c.num_heads, HEADS)
        k, v = project("k", c.num_kv_heads, KV_HEADS), project("v", c.num_kv_heads, KV_HEADS)
        out, cache = cached_attention(q, k, v, cache, layer, meta)
        out = RowParallelDense(x.shape[-1], HEADS, use_bias=True, name="o")(
            out.reshape(out.shape[0], -1))
        return out, cache


class Decoder(nn.Module):
    """Pre-norm transformer with learned positions (no rotary: any model works)."""

    config: Config

    @nn.compact
    def __call__(self, token_ids, cache, meta, logits_indices):
        c = self.config
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="tokens")(token_ids)
             + nn.Embed(c.max_position_embeddings, c.hidden_size, name="positions")(
                 meta.positions))
        for layer in range(c.num_layers):
            h, cache = PagedSelfAttention(c, name=f"attention_{layer}")(
                nn.LayerNorm()(x), cache, layer, meta)
            x = x + h
            up = ColumnParallelDense(c.intermediate_size, MLP, use_bias=True)(nn.LayerNorm()(x))
            x = x + RowParallelDense(c.hidden_size, MLP, use_bias=True)(nn.gelu(up))
        return nn.Dense(c.vocab_size)(nn.LayerNorm()(x[logits_indices])), cache


def forward(params, config: Config, cache, token_ids, meta, logits_indices):
    """token_ids, meta: one step's tokens ``int32[T]``; returns (logits for the tokens at
    ``logits_indices``, the cache)."""
    return Decoder(config).apply({"params": params}, token_ids, cache, meta, logits_indices)


def init_model(config: Config, seed: int = 0) -> ModelBundle:
    """Random params, traced through one decode step on a one-page pool."""
    cache = KVCache.create(config.num_layers, config.num_kv_heads, config.head_dim,
                           page_size=1, num_pages=2)
    one = jnp.zeros(1, jnp.int32)
    meta = AttentionMetadata(slot_mapping=one + 1, q_seq=one, positions=one,
                             page_table=PageTable.from_lists([[1]], [1]), is_decode=True)
    boxed = Decoder(config).init(jax.random.key(seed), one, cache, meta, one)["params"]
    # Random biases (init makes them zero), so that a bias added once per device would show.
    params = nn.unbox(boxed)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * jax.random.normal(next(keys), x.shape)
        if path[-1].key == "bias" else x, params)
    # param_axes: how tensor parallelism splits the params, as the layers declared them.
    return ModelBundle(config, params, forward, param_axes=logical_axes(boxed))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tensor-parallel", type=int, default=None,
                        help="the engine splits the model over this many devices")
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
    # The engine, on one device or split over --tensor-parallel devices.
    llm = LLM(model, tensor_parallel=args.tensor_parallel, page_size=8, num_pages=64,
              max_num_seqs=args.batch)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=args.steps, temperature=0.0,
                                                   ignore_eos=True))
    results["engine"] = np.array([o.token_ids for o in outputs])
    for row, tokens in enumerate(results["engine"]):
        print(f"engine tokens {row}: {tokens.tolist()}")
    return {"prompts": prompts, "model": model, **results}


if __name__ == "__main__":
    main()
