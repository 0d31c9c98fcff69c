"""The declared interfaces between jpaged's parts: what the engine needs of a model, and
what a driver (``LLM``, the benchmarks, ``Replicas``) needs of an engine.

``models.Model`` (the Llama family) and the bundle in ``examples/custom_model.py`` satisfy
``Model``; ``LLMEngine`` and ``Replicas`` satisfy ``Engine``. Nothing here imports Flax or
``models``: jpaged drives any object with these attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:   # annotations only: host-side users (replicas) stay free of JAX
    import jax

    from jpaged.attention import AttentionMetadata
    from jpaged.cache import KVCache

# The mesh axis tensor parallelism splits over; ``jpaged.layers.RowParallelDense`` reduces
# over it and ``jpaged.parallel`` builds meshes with it.
MODEL_AXIS = "model"
# Logical axes a model's params declare (``Model.param_axes``): the model width
# (replicated), query heads, kv heads (replicated when fewer than devices) and MLP hidden
# units. ``jpaged.parallel.RULES`` maps them to mesh axes.
EMBED, HEADS, KV_HEADS, MLP = "embed", "heads", "kv_heads", "mlp"


class ModelConfig(Protocol):
    """The hyperparameters jpaged reads; hashable (a static jit argument).

    The cache geometry (``num_layers``, ``num_kv_heads``, ``head_dim``), the vocabulary and
    the longest sequence. Tensor parallelism (``jpaged.parallel``) also reads
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


class Model(Protocol):
    """What the engine, ``decode_loop`` and ``jpaged.parallel`` drive.

    ``params``: any pytree ``forward`` takes. ``tokenizer``: a ``tokenizers.Tokenizer`` or
    None (prompts are then token ids); ``eos_token_ids``: may be empty. ``param_axes``:
    ``{"/"-joined param path: logical axis name of each dim}`` for the params that tensor
    parallelism splits (see ``jpaged.layers.logical_axes``); params not in it are
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


class Engine(Protocol):
    """Continuous batching behind one interface: one ``LLMEngine``, or ``Replicas`` of it.

    ``step`` returns the ``RequestOutput``\\ s of the requests that made progress;
    ``metrics`` the queue, pool and prefix-cache counters (``LLMEngine.metrics``);
    ``tokenizer`` the model's, or None.
    """

    def add_request(self, prompt, params=None, request_id: str | None = None,
                    priority: int = 0) -> str: ...
    def abort(self, request_id: str) -> None: ...
    def step(self) -> list: ...
    def has_unfinished_requests(self) -> bool: ...
    def metrics(self) -> dict: ...
    @property
    def num_compilations(self) -> int: ...
    @property
    def num_steps(self) -> int: ...
    @property
    def tokenizer(self) -> Any: ...
