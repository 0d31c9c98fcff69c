"""Tensor parallelism on a ``jax.sharding.Mesh``, and the split into data-parallel replicas.

A mesh has up to two axes: ``"data"`` (replicas, each a whole engine with its own pool,
block manager and scheduler; see ``jpaged.parallel.replicas``) and ``"model"`` (tensor parallelism
inside a replica, Megatron style):

- The model is built from ``jpaged.parallel.layers``: column-parallel layers (Llama's q/k/v and
  gate/up projections) are split by output features, row-parallel ones (o_proj,
  down_proj) by input features and complete their partial outputs with one all-reduce
  inside the layer: the only two collectives of a Llama layer. Which dims are split is
  declared by the layers as logical axes (the model's ``param_axes``), mapped to mesh
  axes by ``RULES``; everything else (embeddings, norms, the LM head) is replicated.
- The KV pool ``[L, Hkv, P, S, D]`` is split over its kv-head axis: every device holds
  its heads of every page, so one block table serves all devices and the host-side
  block manager is the same as on one device.
- The model's whole step runs per device under ``shard_map`` with a per-device config
  (its local head and hidden counts), so attention, the Pallas kernel included, sees
  local shapes and nothing in it communicates.
- When the model axis has more devices than there are kv heads, kv heads are replicated
  (params with a ``"kv_heads"`` axis repeated head by head) until every device holds
  whole heads.

Checkpoints are placed straight into this layout: ``placer`` is ``models.load_hf``'s
``place`` hook, and each device receives only its shard.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpaged.parallel import distributed
from jpaged.engine import model_loading
from jpaged.core.interfaces import (HEADS, KV_HEADS, MLP, MODEL_AXIS, Model, ModelConfig,
                               param_path)
from jpaged.parallel.replicas import Replicas
from jpaged.core.shapes import check_positive

DATA, MODEL = "data", MODEL_AXIS
AXES = (DATA, MODEL)
# Logical axis (declared by the model's layers, see jpaged.parallel.layers) -> mesh axis; a logical
# axis not listed is replicated. The one place that decides what tensor parallelism splits.
RULES = {HEADS: MODEL, KV_HEADS: MODEL, MLP: MODEL}
CACHE_SPEC = P(None, MODEL)   # KVCache k, v: [L, Hkv, P, S, D], split over kv heads


def make_mesh(tensor_parallel: int = 1, data_parallel: int = 1, devices=None) -> Mesh:
    """A ``("data", "model")`` mesh over the first ``data_parallel * tensor_parallel``
    devices (default ``jax.devices()``): replica i holds devices ``i*T .. i*T + T - 1``."""
    devices = jax.devices() if devices is None else list(devices)
    check_positive(tensor_parallel=tensor_parallel, data_parallel=data_parallel)
    needed = tensor_parallel * data_parallel
    if needed > len(devices):
        raise ValueError(f"data_parallel={data_parallel} x tensor_parallel={tensor_parallel} "
                         f"needs {needed} devices, only {len(devices)} are available")
    return Mesh(np.asarray(devices[:needed]).reshape(data_parallel, tensor_parallel), AXES)


def check_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` as a 2-D ``("data", "model")`` mesh; either axis may be absent (size 1)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = [name for name in mesh.axis_names if name not in AXES]
    if unknown:
        raise ValueError(f"mesh axis {unknown[0]!r} is not one of {AXES}")
    devices = np.transpose(mesh.devices, [mesh.axis_names.index(a) for a in AXES
                                          if a in mesh.axis_names])
    return Mesh(devices.reshape(mesh.shape.get(DATA, 1), mesh.shape.get(MODEL, 1)), AXES)


def kv_replication(config, model_size: int) -> int:
    """How many copies of each kv head make whole heads on each of ``model_size`` devices."""
    return model_size // math.gcd(model_size, config.num_kv_heads)


def sharded_config(config, model_size: int):
    """The global config of the tensor-parallel model: kv heads replicated as needed.

    Raises ValueError naming the count the model axis does not divide. Replicated kv
    heads always divide: their count is lcm(model_size, kv heads), which divides the query
    heads whenever ``model_size`` does.
    """
    if config.num_heads % model_size:
        raise ValueError(f"the model axis of size {model_size} does not divide the "
                         f"{config.num_heads} query heads")
    if config.intermediate_size % model_size:
        raise ValueError(f"the model axis of size {model_size} does not divide the MLP's "
                         f"intermediate_size={config.intermediate_size}")
    copies = kv_replication(config, model_size)
    kv_heads = config.num_kv_heads * copies
    if copies > 1:
        warnings.warn(f"tensor parallel over {model_size} devices with {config.num_kv_heads} "
                      f"kv heads: each kv head is replicated {copies} times ({kv_heads} kv "
                      f"heads, {kv_heads // model_size} per device)")
    return dataclasses.replace(config, num_kv_heads=kv_heads)


def local_config(config, model_size: int):
    """What one device of the model axis runs: its share of heads and MLP hidden units."""
    return dataclasses.replace(config, num_heads=config.num_heads // model_size,
                               num_kv_heads=config.num_kv_heads // model_size,
                               intermediate_size=config.intermediate_size // model_size)


def param_spec(axes: tuple[str | None, ...] | None) -> P:
    """The PartitionSpec of a param whose dims have logical ``axes`` (None: replicated)."""
    return P(*(RULES.get(axis) for axis in axes or ()))


def param_specs(params, param_axes: Mapping[str, tuple]):
    """The PartitionSpec tree of a params tree, from the model's ``param_axes``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_spec(param_axes.get(param_path(path))), params)


def replicate_kv_heads(array: np.ndarray, axes: tuple | None, head_dim: int,
                       copies: int) -> np.ndarray:
    """Repeat each kv head of a param with a ``"kv_heads"`` axis ``copies`` times (new head
    j = old j // copies), e.g. a k projection kernel ``[L, E, Hkv * D]``; others pass
    through."""
    if copies == 1 or KV_HEADS not in (axes or ()):
        return array
    dim = axes.index(KV_HEADS)
    heads = array.reshape(array.shape[:dim] + (-1, head_dim) + array.shape[dim + 1:])
    return np.repeat(heads, copies, axis=dim).reshape(
        array.shape[:dim] + (-1,) + array.shape[dim + 1:])


def placer(config: ModelConfig, param_axes: Mapping[str, tuple], mesh: Mesh):
    """``place(name, host_array) -> jax.Array`` for ``models.load_hf``: kv heads replicated
    for ``mesh``'s model axis, then each device of ``mesh`` (2-D, see ``check_mesh``) gets
    only its shard. ``config`` is the checkpoint's config; ``param_axes`` the model's
    declared logical axes (see ``jpaged.core.interfaces.Model``)."""
    copies = kv_replication(config, mesh.shape[MODEL])

    def place(name: str, array: np.ndarray) -> jax.Array:
        axes = param_axes.get(name)
        array = replicate_kv_heads(np.asarray(array), axes, config.head_dim, copies)
        sharding = NamedSharding(mesh, param_spec(axes))
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place


def place_params(params, config: ModelConfig, param_axes: Mapping[str, tuple], mesh: Mesh):
    """Params already in memory (e.g. the random demo model) -> the sharded layout."""
    place = placer(config, param_axes, mesh)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: place(param_path(path), np.asarray(x)), params)


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One 1-D ``("model",)`` mesh per row of a 2-D mesh's data axis."""
    return [Mesh(row, (MODEL,)) for row in mesh.devices]


def split_replicas(tree, mesh: Mesh) -> list:
    """Arrays on a 2-D mesh, replicated over "data" -> one tree per replica, each on its
    own devices, built from the shards already there (no copy)."""
    def take(x, replica: Mesh):
        devices = set(replica.devices.flat)
        sharding = NamedSharding(replica, x.sharding.spec)
        shards = [s.data for s in x.addressable_shards if s.device in devices]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)

    return [jax.tree.map(lambda x: take(x, replica), tree) for replica in replica_meshes(mesh)]


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """Where a replica's KV pool lives: split over kv heads along the model axis."""
    return NamedSharding(mesh, CACHE_SPEC)


@dataclasses.dataclass(frozen=True)
class ShardedForward:
    """A model's ``forward`` (``jpaged.core.interfaces.Forward``) run per device of the
    1-D ``mesh`` under ``shard_map``; build it with ``shard_forward``.

    Params are split by their declared ``param_axes`` (``(name, axes)`` pairs), the cache
    by ``CACHE_SPEC``, the batch and the returned logits are replicated. ``config`` is the
    global (``sharded_config``) one; each device runs ``local_config`` of it. The model's
    row-parallel layers (``jpaged.parallel.layers.RowParallelDense``) do the all-reduces.

    A value, not a closure: it is a static argument of the engine's jitted step, so two
    engines sharding the same model over the same devices share the compiled programs
    (a closure per engine compiled every program again and kept each in the step's cache:
    a process making engines ran out of memory maps).
    """

    forward: Any
    param_axes: tuple
    mesh: Mesh

    def __call__(self, params, config, cache, token_ids, meta, logits_indices):
        local, forward = local_config(config, self.mesh.shape[MODEL]), self.forward

        def per_device(params, cache, token_ids, meta, logits_indices):
            return forward(params, local, cache, token_ids, meta, logits_indices)

        # check_vma=False: a pallas_call's output declares no varying mesh axes, which
        # check_vma=True refuses. The row-parallel layers' psums make the logits replicated.
        run = jax.shard_map(per_device, mesh=self.mesh,
                            in_specs=(param_specs(params, dict(self.param_axes)), CACHE_SPEC,
                                      P(), P(), P()),
                            out_specs=(P(), CACHE_SPEC), check_vma=False)
        return run(params, cache, token_ids, meta, logits_indices)


def shard_forward(forward, param_axes: Mapping[str, tuple], mesh: Mesh) -> ShardedForward:
    """``forward`` run per device of the 1-D ``mesh`` (see ``ShardedForward``)."""
    return ShardedForward(forward, tuple(sorted(param_axes.items())), mesh)


def shard_model(model: Model, config: ModelConfig, params, mesh: Mesh) -> Model:
    """A model bundle running tensor parallel on the 1-D ``mesh``: ``config`` the
    ``sharded_config``, ``params`` already placed for it."""
    return dataclasses.replace(model, config=config, params=params,
                               forward=shard_forward(model.forward, model.param_axes, mesh))


class Layout:
    """Where an ``LLM`` runs: a ``("data", "model")`` mesh, one engine replica per row.

    ``create`` checks the mesh against the model before any weight is loaded; ``load``
    puts one copy of the model on each replica's devices; ``engine`` joins the replicas'
    engines into the one ``LLM`` drives.
    """

    def __init__(self, mesh: Mesh, config, sharded):
        self.mesh = mesh        # 2-D, see check_mesh
        self.config = config    # the checkpoint's
        self.sharded = sharded  # its sharded_config
        if jax.process_count() > 1:
            if self.num_replicas > 1:
                raise ValueError(f"data_parallel={self.num_replicas}: under jax.distributed "
                                 f"only tensor parallelism over every device is supported")
            if mesh.size != jax.device_count():
                raise ValueError(f"under jax.distributed the mesh must span all "
                                 f"{jax.device_count()} devices, it has {mesh.size}")

    @classmethod
    def create(cls, model, mesh=None, tensor_parallel=None, data_parallel=None):
        """The layout the ``LLM`` options ask for, or None for plain single-device. The
        model is checked first (only its config is read), then the devices."""
        if mesh is None and tensor_parallel is None and data_parallel is None:
            return None
        if mesh is not None and (tensor_parallel is not None or data_parallel is not None):
            raise ValueError("pass either mesh= or tensor_parallel=/data_parallel=, not both")
        if mesh is not None:
            mesh = check_mesh(mesh)
            tensor_parallel = mesh.shape[MODEL]
        tensor_parallel = 1 if tensor_parallel is None else tensor_parallel
        check_positive(tensor_parallel=tensor_parallel)
        config = model_loading.model_config(model)
        sharded = sharded_config(config, tensor_parallel)
        if mesh is None:
            mesh = make_mesh(tensor_parallel, 1 if data_parallel is None else data_parallel)
        return cls(mesh, config, sharded)

    @property
    def model_size(self) -> int:
        return self.mesh.shape[MODEL]

    @property
    def num_replicas(self) -> int:
        return self.mesh.shape[DATA]

    def load(self, model, dtype=None) -> list[tuple[Model, NamedSharding]]:
        """(model bundle, KV pool sharding) of each replica. A checkpoint directory is read
        once and each device receives only its shard; "tiny" and bundles are placed from
        memory."""
        if isinstance(model, str) and model != "tiny":
            axes = model_loading.param_axes(self.config)
            model = model_loading.load_model(model, dtype,
                                             place=placer(self.config, axes, self.mesh))
        else:
            model = model_loading.load_model(model, dtype)
            if self.model_size > 1 and not model.param_axes:
                # Every param would be replicated while each device runs its share of the
                # heads: a wrong answer, not a slow one.
                raise ValueError(f"tensor parallelism over {self.model_size} devices needs "
                                 f"the model's param_axes (jpaged.parallel.layers.logical_axes of its "
                                 f"params); this {type(model).__name__} declares none")
            model = dataclasses.replace(model, params=place_params(
                model.params, self.config, model.param_axes, self.mesh))
        return [(shard_model(model, self.sharded, params, mesh), cache_sharding(mesh))
                for params, mesh in zip(split_replicas(model.params, self.mesh),
                                        replica_meshes(self.mesh))]

    def engine(self, engines, prefix_routing: bool = False):
        """What ``LLM`` drives: the one engine, or ``Replicas`` routing between several;
        under jax.distributed, process 0's runner broadcasts each step (see
        ``jpaged.parallel.distributed``)."""
        if len(engines) > 1:
            return Replicas(engines, prefix_routing)
        if jax.process_count() > 1 and jax.process_index() == 0:
            engines[0].runner = distributed.Leader(engines[0].runner)
            # The other processes replay whole steps (`execute`): no step stays in flight.
            engines[0].async_scheduling = False
        return engines[0]
