"""Tensor-parallel Flax dense layers (Megatron style), usable in any model.

A ``ColumnParallelDense`` splits its output features over the ``"model"`` mesh axis; a
``RowParallelDense`` splits its input features and completes its partial output with one
all-reduce (``psum``) inside the layer, then adds its bias once. A column-parallel layer
followed by a row-parallel one (attention's q/k/v then o, the MLP's up then down) needs
that one collective and nothing else.

Each kernel and bias declares its *logical* axes (``nn.with_logical_partitioning``):
``"embed"`` (the model width, replicated), ``"heads"``, ``"kv_heads"`` and ``"mlp"`` (split).
``jpaged.parallel.mesh.RULES`` maps them to mesh axes, so sharding is read from this data,
never from layer names. ``logical_axes`` turns a model's boxed init into the
``param_axes`` mapping the engine's model bundle carries.

The layers run unchanged on one device and per device under ``jax.shard_map`` (as
``jpaged.parallel.mesh.shard_forward`` runs a model): outside a ``"model"`` axis the psum is
skipped. Feature counts are this device's share (the model is traced with the per-device
config, see ``jpaged.parallel.mesh.local_config``).

This module imports Flax; ``import jpaged`` does not import it (only models and user code
that build layers do).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax

from jpaged.core.interfaces import EMBED, HEADS, KV_HEADS, MLP, MODEL_AXIS as MODEL, param_path

__all__ = ["EMBED", "HEADS", "KV_HEADS", "MLP", "ColumnParallelDense", "RowParallelDense",
           "logical_axes", "model_axis_size"]


def model_axis_size() -> int:
    """Devices along the ``"model"`` axis of the enclosing ``shard_map``; 1 outside one."""
    try:
        return jax.lax.axis_size(MODEL)
    except NameError:   # no "model" axis bound: one device
        return 1


class ColumnParallelDense(nn.Module):
    """``y = x @ kernel + bias``, output features split over the model axis.

    x: ``[..., E]`` (replicated); returns ``[..., features]``, this device's share.
    ``axis``: the logical name of the output features (``HEADS``, ``KV_HEADS`` or ``MLP``).
    """

    features: int
    axis: str
    use_bias: bool = False
    in_axis: str = EMBED

    @nn.compact
    def __call__(self, x):
        kernel = _kernel(self, x.shape[-1], (self.in_axis, self.axis))
        bias = _bias(self, self.axis) if self.use_bias else None
        return _dense(x, kernel, bias)


class RowParallelDense(nn.Module):
    """``y = psum(x @ kernel) + bias``, input features split over the model axis.

    x: ``[..., F]``, this device's share of the features a column-parallel layer produced;
    returns ``[..., features]``, complete and replicated. The psum is part of the layer, so
    no caller can forget it and return one device's partial sum; the bias (replicated)
    is added after it, once, not once per device.
    """

    features: int
    axis: str
    use_bias: bool = False
    out_axis: str = EMBED

    @nn.compact
    def __call__(self, x):
        kernel = _kernel(self, x.shape[-1], (self.axis, self.out_axis))
        bias = _bias(self, self.out_axis) if self.use_bias else None
        y = _dense(x, kernel, None)
        if model_axis_size() > 1:
            y = jax.lax.psum(y, MODEL)
        return y if bias is None else _dense(y, None, bias)


def _kernel(layer: nn.Module, in_features: int, axes: tuple[str, str]):
    """The ``[in_features, layer.features]`` kernel, its dims named ``axes``."""
    return layer.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                              axes),
                       (in_features, layer.features))


def _bias(layer: nn.Module, axis: str):
    return layer.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                            (axis,)), (layer.features,))


def _dense(x, kernel, bias):
    """``x @ kernel + bias`` (either may be None) in the dtype ``nn.Dense`` would use."""
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    y = x if kernel is None else jax.lax.dot_general(x, kernel,
                                                     (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


def logical_axes(boxed_params, leading: Mapping[str, tuple] | None = None
                 ) -> dict[str, tuple[str | None, ...]]:
    """``{"a/b/kernel": logical axis names}`` of every partitioned param of a boxed params
    tree (what ``Module.init`` returns with these layers); unannotated params are omitted
    (replicated). ``leading``: axes prepended under a top-level key, e.g. ``{"layers":
    (None,)}`` for params stacked over layers."""
    leading = leading or {}
    axes = {}
    specs = nn.get_partition_spec(boxed_params)
    for path, spec in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]:
        if len(spec):
            name = param_path(path)
            axes[name] = tuple(leading.get(name.split("/")[0], ())) + tuple(spec)
    return axes
