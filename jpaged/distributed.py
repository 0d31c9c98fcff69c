"""One engine over several processes (``jax.distributed``): process 0 schedules, all run.

Under ``jax.distributed.initialize`` a tensor-parallel ``LLM`` spans every process's
devices, and each jitted step is one SPMD program that every process must launch with
the same inputs. Only process 0 keeps the host state (requests, scheduler, block
manager): its runner is a ``Leader``, which broadcasts each step's plan (the padded
arrays of the ``SchedulerOutput``, the page copies, the sampling rows) with JAX's own
``multihost_utils.broadcast_one_to_all`` before running the step; the other processes
call ``serve``, which receives plans and runs the same steps until process 0 calls
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
runtime notices (its heartbeat timeout). ``python -m jpaged.distributed`` is that script
as a command (see ``jpaged.cli.distributed_main``).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils

from jpaged.sampling import SamplingTensors
from jpaged.scheduler import SchedulerOutput

BATCH_FIELDS = ("token_ids", "positions", "slot_mapping", "q_seq", "block_tables",
                "context_lens")
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingTensors))
# Every array of a plan: the batch, copy-on-write pairs [N, 2], logits rows,
# flags [is_decode, num_top], then the sampling tensors. All are rank 1 or 2.
NAMES = BATCH_FIELDS + ("copies", "logits_indices", "flags") + SAMPLING_FIELDS
DTYPES = (np.int32, np.float32, np.uint32)


class Leader:
    """Process 0's runner: broadcasts each step's plan, then runs it like every process.

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

    def execute(self, out: SchedulerOutput, logits_indices, tensors, num_top: int):
        _broadcast(pack(out, logits_indices, tensors, num_top))
        return self.runner.execute(out, logits_indices, tensors, num_top)


def serve(llm) -> None:
    """Processes other than 0: run process 0's steps until it calls ``stop``."""
    runner = llm.engine.runner
    while (plan := _broadcast(None)) is not None:
        runner.execute(*unpack(plan))


def stop() -> None:
    """Process 0: release the processes blocked in ``serve``."""
    _broadcast(None)


def pack(out: SchedulerOutput, logits_indices, tensors: SamplingTensors,
         num_top: int) -> dict[str, np.ndarray]:
    """What ``ModelRunner.execute`` reads, as arrays (swaps excluded, see ``Leader``)."""
    plan = {name: np.asarray(getattr(out, name)) for name in BATCH_FIELDS}
    plan["copies"] = np.asarray(out.copies, np.int32).reshape(-1, 2)
    plan["logits_indices"] = np.asarray(logits_indices)
    plan["flags"] = np.array([out.is_decode, num_top], np.int32)
    plan.update({name: np.asarray(getattr(tensors, name)) for name in SAMPLING_FIELDS})
    return plan


def unpack(plan: dict[str, np.ndarray]):
    """The arguments of ``ModelRunner.execute`` back from a plan."""
    is_decode, num_top = (int(x) for x in plan["flags"])
    out = SchedulerOutput(copies=[tuple(pair) for pair in plan["copies"].tolist()],
                          is_decode=bool(is_decode),
                          **{name: plan[name] for name in BATCH_FIELDS})
    tensors = SamplingTensors(**{name: plan[name] for name in SAMPLING_FIELDS})
    return out, plan["logits_indices"], tensors, num_top


def _broadcast(plan: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """Process 0's ``plan`` (None: stop) on every process; the others pass None.

    Two broadcasts: a header with each array's dtype and shape, so the receivers can
    allocate matching buffers, then the arrays.
    """
    header = np.full((len(NAMES) + 1, 3), -1, np.int32)
    if plan is not None:
        header[0, 0] = 1
        for row, name in enumerate(NAMES, 1):
            array = plan[name]
            header[row, 0] = DTYPES.index(array.dtype.type)
            header[row, 1:1 + array.ndim] = array.shape
    header = multihost_utils.broadcast_one_to_all(header)
    if header[0, 0] != 1:
        return None
    if plan is None:
        plan = {name: np.zeros([d for d in row[1:] if d >= 0], DTYPES[row[0]])
                for name, row in zip(NAMES, header[1:])}
    return multihost_utils.broadcast_one_to_all(plan)


if __name__ == "__main__":
    # ``python -m jpaged.distributed`` runs this file as a new module, ``__main__``; the
    # command itself lives at the engine end (jpaged.cli), which imports this module.
    from jpaged.cli import distributed_main

    distributed_main()
