"""Llama-family decoder (Llama, Qwen2, Mistral) in Flax linen, running on the paged KV cache.

Each layer is a linen module applied with one layer's slice of the stacked params inside a
``jax.lax.scan``, so compile time does not grow with depth. The layer never sees the cache:
it calls an ``attend(q, k, v)`` function, which for the paged forward is one call to
``jpaged.core.attention.cached_attention`` with the whole cache in the scan carry and a traced
layer index.

The projections are ``jpaged.parallel.layers``' column- and row-parallel layers, so the model runs
tensor-parallel (``jpaged.parallel.mesh``) as it is: with a per-device config, the o_proj and
down_proj layers all-reduce their partial outputs themselves.

Params (a plain dict; ``L`` layers, ``E`` hidden, ``I`` intermediate, ``V`` vocab)::

    embed_tokens/embedding [V, E]            norm/weight [E]          lm_head/kernel [E, V]
    layers/input_layernorm/weight [L, E]     layers/post_attention_layernorm/weight [L, E]
    layers/self_attn/{q,k,v}_proj/kernel [L, E, H * D] (+ bias [L, H * D] with attention_bias)
    layers/self_attn/o_proj/kernel [L, Hq * D, E]
    layers/mlp/{gate,up}_proj/kernel [L, E, I]     layers/mlp/down_proj/kernel [L, I, E]

``lm_head`` is absent when ``tie_word_embeddings`` (the head is ``embedding.T``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpaged.core.attention import AttentionMetadata, cached_attention
from jpaged.core.cache import KVCache
from jpaged.parallel.layers import HEADS, KV_HEADS, MLP as MLP_AXIS, ColumnParallelDense, \
    RowParallelDense, logical_axes
from jpaged.models.config import ModelConfig
from jpaged.pallas_kernels.reference import causal_mask


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``float32[head_dim // 2]``, with Llama-3 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling
    if scaling is not None:
        wavelen = 2 * np.pi / inv_freq
        old_len = scaling.original_max_position_embeddings
        smooth = ((old_len / wavelen - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor))
        interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = np.where(wavelen < old_len / scaling.high_freq_factor, inv_freq,
                            np.where(wavelen > old_len / scaling.low_freq_factor,
                                     inv_freq / scaling.factor, interpolated))
    return inv_freq.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotary embedding, HF "rotate_half" layout. x: ``[..., H, D]``; positions: ``int32[...]``."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Cast back before the weight, as HF does, so bf16 checkpoints round the same way.
        return weight * normed.astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, attend):
        """x: ``[..., E]``; attend(q ``[..., Hq, D]``, k, v ``[..., Hkv, D]``) -> (out, state)."""
        c = self.config
        lead = x.shape[:-1]

        def project(name, heads, axis):
            y = ColumnParallelDense(heads * c.head_dim, axis, use_bias=c.attention_bias,
                                    name=name)(x)
            return y.reshape(*lead, heads, c.head_dim)

        inv_freq = rope_frequencies(c)
        q = apply_rope(project("q_proj", c.num_heads, HEADS), positions, inv_freq)
        k = apply_rope(project("k_proj", c.num_kv_heads, KV_HEADS), positions, inv_freq)
        out, state = attend(q, k, project("v_proj", c.num_kv_heads, KV_HEADS))
        out = RowParallelDense(c.hidden_size, HEADS, name="o_proj")(out.reshape(*lead, -1))
        return out, state


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = ColumnParallelDense(c.intermediate_size, MLP_AXIS, name="gate_proj")(x)
        up = ColumnParallelDense(c.intermediate_size, MLP_AXIS, name="up_proj")(x)
        return RowParallelDense(c.hidden_size, MLP_AXIS, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU block. Returns (x, whatever state ``attend`` returned)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, attend):
        c = self.config
        h, state = Attention(c, name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), positions, attend)
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, state


def _run_layers(params, config: ModelConfig, x, positions, attend, state):
    """Scan the stacked layers. attend(q, k, v, state, layer) -> (out, state); ``state`` (the
    KV cache, or None) rides in the carry and ``layer`` is a traced int32 index."""
    layer = DecoderLayer(config)

    def body(carry, inputs):
        x, state = carry
        layer_params, index = inputs
        x, state = layer.apply({"params": layer_params}, x, positions,
                               lambda q, k, v: attend(q, k, v, state, index))
        return (x, state), None

    indices = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x, state), _ = jax.lax.scan(body, (x, state), (params["layers"], indices))
    return x, state


def _embed(params, token_ids):
    return params["embed_tokens"]["embedding"][token_ids]


def _logits(params, config: ModelConfig, x):
    """Final norm and LM head: ``[..., E]`` -> float32 ``[..., V]``."""
    x = RMSNorm(config.rms_norm_eps).apply({"params": params["norm"]}, x)
    if config.tie_word_embeddings:
        head = params["embed_tokens"]["embedding"].T
    else:
        head = params["lm_head"]["kernel"]
    return jnp.matmul(x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def forward(params, config: ModelConfig, cache: KVCache, token_ids,
            meta: AttentionMetadata, logits_indices):
    """One engine step over the paged cache (a ``jpaged.core.interfaces.Forward``).

    token_ids: ``int32[T]`` (prefill chunks and/or decode tokens, flattened; meta.positions
    give their absolute positions); logits_indices: ``int32[B]``, which tokens need logits.
    Returns (logits ``float32[B, V]``, the cache with this step's K/V written).
    ``config`` is static: jit with ``static_argnums=1`` or bind it with functools.partial.
    """
    _check_cache(config, cache)
    if token_ids.ndim != 1 or logits_indices.ndim != 1:
        raise ValueError(f"token_ids and logits_indices must be rank 1, got shapes "
                         f"{tuple(token_ids.shape)} and {tuple(logits_indices.shape)}")

    def attend(q, k, v, cache, layer):
        return cached_attention(q, k, v, cache, layer, meta,
                                sliding_window=config.sliding_window)

    x, cache = _run_layers(params, config, _embed(params, token_ids), meta.positions, attend,
                           cache)
    return _logits(params, config, x[logits_indices]), cache


def _check_cache(config: ModelConfig, cache: KVCache) -> None:
    expected = (config.num_layers, config.num_kv_heads, config.head_dim)
    got = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
    if got != expected:
        raise ValueError(f"cache has (num_layers, num_kv_heads, head_dim) = {got}, the model "
                         f"needs {expected}")


def causal_attention(q, k, v, sliding_window=None):
    """Plain causal attention over whole sequences, no cache: the recompute reference.

    q: ``[B, L, Hq, D]``; k, v: ``[B, L, Hkv, D]``. Returns ``[B, L, Hq, D]`` in q's dtype.
    """
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * q.shape[-1] ** -0.5
    pos = jnp.arange(q.shape[1])
    visible = causal_mask(pos, pos, sliding_window)
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(q.dtype)


def forward_no_cache(params, config: ModelConfig, token_ids):
    """Logits ``float32[B, L, V]`` of whole sequences ``int32[B, L]`` (positions 0..L-1)."""
    batch, length = token_ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    def attend(q, k, v, state, layer):
        return causal_attention(q, k, v, config.sliding_window), state

    x, _ = _run_layers(params, config, _embed(params, token_ids), positions, attend, None)
    return _logits(params, config, x)


def _boxed_shapes(config: ModelConfig) -> dict:
    """The params tree as float32 ``jax.ShapeDtypeStruct``s, declared by the modules, the
    parallel layers' params boxed with their logical axes; per-layer params unstacked."""
    x = jnp.zeros((1, config.hidden_size), jnp.float32)
    positions = jnp.zeros((1,), jnp.int32)
    key = jax.random.key(0)

    def init():
        layer = DecoderLayer(config).init(key, x, positions, lambda q, k, v: (q, None))
        params = {"embed_tokens": nn.Embed(config.vocab_size, config.hidden_size).init(
                      key, positions)["params"],
                  "layers": layer["params"],
                  "norm": RMSNorm(config.rms_norm_eps).init(key, x)["params"]}
        if not config.tie_word_embeddings:
            params["lm_head"] = nn.Dense(config.vocab_size, use_bias=False).init(key, x)["params"]
        return params

    return jax.eval_shape(init)


def param_axes(config: ModelConfig) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of the params the parallel layers split (``jpaged.core.interfaces.Model``);
    the stacked layer axis is never split."""
    return logical_axes(_boxed_shapes(config), leading={"layers": (None,)})


def param_shapes(config: ModelConfig) -> dict:
    """The params tree as float32 ``jax.ShapeDtypeStruct``s, declared by the modules."""
    shapes = nn.unbox(_boxed_shapes(config))
    shapes["layers"] = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct((config.num_layers,) + s.shape, s.dtype), shapes["layers"])
    return shapes


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: ModelConfig, rng, dtype=jnp.float32):
    """Random params (the embedded demo model, tests); see the module docstring for the tree.

    Norm weights 1, biases 0, kernels and embeddings N(0, 1 / fan_in). All values come from
    one flat normal draw: one draw per param makes the CPU compile an order slower.
    """
    paths_shapes, treedef = jax.tree.flatten_with_path(param_shapes(config))
    sizes = [s.size for _, s in paths_shapes]
    noise = jnp.split(jax.random.normal(rng, (sum(sizes),), jnp.float32),
                      np.cumsum(sizes)[:-1])

    def value(path, shape, z):
        kind = path[-1].key
        if kind == "weight":
            return jnp.ones(shape.shape, dtype)
        if kind == "bias":
            return jnp.zeros(shape.shape, dtype)
        fan_in = shape.shape[-1] if kind == "embedding" else shape.shape[-2]
        return (z.reshape(shape.shape) * fan_in ** -0.5).astype(dtype)

    return jax.tree.unflatten(treedef, [value(path, shape, z)
                                        for (path, shape), z in zip(paths_shapes, noise)])
