"""The declared interfaces between jpaged's parts: what the engine needs of a model, and
what a driver (``LLM``, the benchmarks, ``Replicas``) needs of an engine.

``models.Model`` (the Llama family) and ``ModelBundle`` (a user's own model, see
``examples/custom_model.py``) satisfy ``Model``; ``LLMEngine`` and ``Replicas`` satisfy
``Engine``. ``Model`` and ``DecodeStep`` are runtime-checkable: ``decode_loop`` tells
them apart with ``isinstance``, and ``check_model`` refuses anything that is not a
``Model``. Nothing here imports Flax or ``models``: jpaged drives any object with these
attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:   # annotations only: host-side users (replicas) stay free of JAX
    import jax

    from jpaged.core.attention import AttentionMetadata
    from jpaged.core.cache import KVCache

# The mesh axis tensor parallelism splits over; ``jpaged.parallel.layers.RowParallelDense`` reduces
# over it and ``jpaged.parallel.mesh`` builds meshes with it.
MODEL_AXIS = "model"
# Logical axes a model's params declare (``Model.param_axes``): the model width
# (replicated), query heads, kv heads (replicated when fewer than devices) and MLP hidden
# units. ``jpaged.parallel.mesh.RULES`` maps them to mesh axes.
EMBED, HEADS, KV_HEADS, MLP = "embed", "heads", "kv_heads", "mlp"


class ModelConfig(Protocol):
    """The hyperparameters jpaged reads; hashable (a static jit argument).

    The cache geometry (``num_layers``, ``num_kv_heads``, ``head_dim``), the vocabulary and
    the longest sequence. Tensor parallelism (``jpaged.parallel.mesh``) also reads
    ``num_heads`` and ``intermediate_size`` and runs each device with a
    ``dataclasses.replace``'d copy holding its share of the three counts.
    """

    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...


class Forward(Protocol):
    """One engine step of a model over the paged cache.

    token_ids: ``int32[T]``, this step's tokens flattened (prefill chunks and decode tokens;
    ``meta.positions`` holds their absolute positions, ``meta`` the slots and page tables);
    logits_indices: ``int32[B]``, which tokens need logits. Returns (logits
    ``float32[B, V]``, the cache with this step's K/V written). ``config`` is static: the
    engine jits with it as a static argument.
    """

    def __call__(self, params: Any, config: ModelConfig, cache: KVCache,
                 token_ids: jax.Array, meta: AttentionMetadata,
                 logits_indices: jax.Array) -> tuple[jax.Array, KVCache]: ...


@runtime_checkable
class Model(Protocol):
    """What the engine, ``decode_loop`` and ``jpaged.parallel.mesh`` drive (``ModelBundle`` is
    one: a user's model needs only its config, params and forward).

    ``params``: any pytree ``forward`` takes. ``tokenizer``: a ``tokenizers.Tokenizer`` or
    None (prompts are then token ids); ``eos_token_ids``: may be empty. ``param_axes``:
    ``{"/"-joined param path: logical axis name of each dim}`` for the params that tensor
    parallelism splits (see ``jpaged.parallel.layers.logical_axes``); params not in it are
    replicated, so ``{}`` suits a model that never runs tensor-parallel.
    """

    @property
    def config(self) -> ModelConfig: ...
    @property
    def params(self) -> Any: ...
    @property
    def forward(self) -> Forward: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...
    @property
    def param_axes(self) -> Mapping[str, tuple[str | None, ...]]: ...


def param_path(path) -> str:
    """The ``param_axes`` key of a param: its pytree path (from
    ``jax.tree_util.tree_flatten_with_path``) as ``"/"``-joined keys, e.g.
    ``"layers/self_attn/q_proj/kernel"``. Declaring (``jpaged.parallel.layers.logical_axes``) and
    reading (``jpaged.parallel.mesh``) both name params with it, so the two always agree."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """A ``Model`` from its parts: ``ModelBundle(config, params, forward)`` runs in the
    engine and ``decode_loop``; give ``tokenizer`` (a ``tokenizers.Tokenizer``) for text
    prompts, ``eos_token_ids`` to stop at an end-of-sequence id, and ``param_axes`` (from
    ``jpaged.parallel.layers.logical_axes``) to run tensor-parallel."""

    config: ModelConfig
    params: Any
    forward: Forward
    tokenizer: Any = None
    eos_token_ids: tuple[int, ...] = ()
    param_axes: Mapping[str, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)


def check_model(model) -> Model:
    """``model`` if it is a ``Model``, else a ValueError naming what was passed."""
    if not isinstance(model, Model):
        raise ValueError(f"expected a model (jpaged.core.interfaces.Model: config, params, "
                         f"forward, tokenizer, eos_token_ids, param_axes; "
                         f"jpaged.core.interfaces.ModelBundle(config, params, forward) builds "
                         f"one), got {type(model).__name__}")
    return model


@runtime_checkable
class DecodeStep(Protocol):
    """What ``decode_loop`` runs each iteration, when given a step function rather than a
    ``Model``: token_ids ``int32[B]`` (one decode token per row), ``meta`` in decode mode;
    returns (logits ``float32[B, V]``, the cache with their K/V written). It must be
    hashable (a static jit argument): a module-level function or a frozen dataclass."""

    def __call__(self, params: Any, cache: KVCache, token_ids: jax.Array,
                 meta: AttentionMetadata) -> tuple[jax.Array, KVCache]: ...


class Engine(Protocol):
    """Continuous batching behind one interface: one ``LLMEngine``, or ``Replicas`` of it.

    ``step`` returns the ``RequestOutput``\\ s of the requests that made progress;
    ``metrics`` the queue, pool and prefix-cache counters (``LLMEngine.metrics``);
    ``tokenizer`` the model's, or None; ``can_step`` False while its steps fail for
    every request (a failure some requests cause fails those alone; the server's
    ``/health`` answers 503 meanwhile).
    """

    def add_request(self, prompt, params=None, request_id: str | None = None,
                    priority: int = 0, stream: bool = True) -> str: ...
    def abort(self, request_id: str) -> None: ...
    def step(self) -> list: ...
    def has_unfinished_requests(self) -> bool: ...
    def metrics(self) -> dict: ...
    def warm_up(self) -> int: ...
    @property
    def num_compilations(self) -> int: ...
    @property
    def num_steps(self) -> int: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def can_step(self) -> bool: ...
