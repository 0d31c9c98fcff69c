"""Save and restore params with orbax-checkpoint (the stable StandardCheckpointer API)."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def save_params(path: str, params) -> None:
    """Write ``params`` to the directory ``path`` (created; an existing one is replaced)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(path), params, force=True)
        checkpointer.wait_until_finished()


def restore_params(path: str, like=None):
    """Read params saved by ``save_params``.

    like: a params tree or its ``jax.ShapeDtypeStruct``s (with shardings) giving the shape,
    dtype and placement of each restored array; None restores them as saved.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    target = None if like is None else jax.tree.map(_abstract, like)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


def _abstract(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
