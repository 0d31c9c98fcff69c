"""One engine over several processes (``jax.distributed``): process 0 schedules, all run.

Under ``jax.distributed.initialize`` a tensor-parallel ``LLM`` spans every process's
devices, and each jitted step is one SPMD program that every process must launch with
the same inputs. Only process 0 keeps the host state (requests, scheduler, block
manager): its runner is a ``Leader``, which broadcasts each step's inputs (the page
moves and the ``StepBatch``, one flattened pytree) with JAX's own
``multihost_utils.broadcast_one_to_all`` before running the step; the other processes
call ``serve``, which receives them and runs the same steps until process 0 calls
``stop``. Run the same script on every process::

    jax.distributed.initialize(coordinator, num_processes, process_id)
    llm = LLM("tiny", tensor_parallel=jax.device_count())
    if jax.process_index() == 0:
        try:
            outputs = llm.generate(prompts, params)
        finally:
            distributed.stop()
    else:
        distributed.serve(llm)

A process that dies leaves the others blocked in a collective until JAX's distributed
runtime notices (its heartbeat timeout). ``python -m jpaged.parallel.distributed`` is that script
as a command (see ``jpaged.serving.cli.distributed_main``).
"""

from __future__ import annotations

import pickle

import jax
import numpy as np
from jax.experimental import multihost_utils

from jpaged.engine.batch import StepBatch
from jpaged.host.scheduler import PageMoves

# Room for a step's description (its pytree structure, then each leaf's dtype and shape):
# a few hundred bytes for a StepBatch, whatever its shapes.
HEADER_BYTES = 16384


class Leader:
    """Process 0's runner: broadcasts each step's inputs, then runs them like every process.

    Wraps a ``ModelRunner``; everything else is the runner's. Swap preemption is not
    supported: the host pool would hold only process 0's shards.
    """

    def __init__(self, runner):
        if runner.host is not None:
            raise ValueError("num_host_pages > 0 (swap to host) is not supported under "
                             "jax.distributed; use preemption_mode='recompute'")
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, moves: PageMoves, batch: StepBatch):
        broadcast((moves, batch))
        return self.runner.execute(moves, batch)


def serve(llm) -> None:
    """Processes other than 0: run process 0's steps until it calls ``stop``."""
    runner = llm.engine.runner
    while (step := broadcast(None)) is not None:
        runner.execute(*step)


def stop() -> None:
    """Process 0: release the processes blocked in ``serve``."""
    broadcast(None)


def broadcast(tree):
    """Process 0's pytree of numpy arrays (None: stop) on every process; the others pass
    None. Generic: any pytree whose leaves are arrays travels, a new batch field included.

    Two broadcasts: a header describing the tree (its structure, pickled, and each leaf's
    dtype and shape), so the receivers can allocate matching buffers, then the leaves.
    Pickle is safe here: the header comes from process 0 of the same job.
    """
    header = np.zeros(HEADER_BYTES, np.uint8)
    if tree is not None:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        leaves = [np.asarray(leaf) for leaf in leaves]
        description = pickle.dumps((treedef, [(x.dtype.str, x.shape) for x in leaves]))
        if len(description) + 4 > HEADER_BYTES:
            raise ValueError(f"a step description of {len(description)} bytes does not fit "
                             f"in HEADER_BYTES={HEADER_BYTES}")
        header[:4] = np.frombuffer(np.uint32(len(description)).tobytes(), np.uint8)
        header[4:4 + len(description)] = np.frombuffer(description, np.uint8)
    header = np.asarray(multihost_utils.broadcast_one_to_all(header))
    size = int(header[:4].view(np.uint32)[0])
    if not size:
        return None
    if tree is None:
        treedef, specs = pickle.loads(header[4:4 + size].tobytes())
        leaves = [np.zeros(shape, dtype) for dtype, shape in specs]
    leaves = multihost_utils.broadcast_one_to_all(leaves)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])


if __name__ == "__main__":
    # ``python -m jpaged.parallel.distributed`` runs this file as a new module, ``__main__``; the
    # command itself lives at the engine end (jpaged.serving.cli), which imports this module.
    from jpaged.serving.cli import distributed_main

    distributed_main()
