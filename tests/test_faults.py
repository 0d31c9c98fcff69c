"""A fault anywhere in the host path of a step leaves the engine exact
(``jpaged.tools.faults``): every function the host runs inside a step raises at its k-th
call in turn, or a KeyboardInterrupt arrives at a line it executes; after each fault the
host state equals the one before the step (when the device had not started),
``Scheduler.check`` passes, and stepping on gives every request exactly once with the
tokens and finish reasons of a run without faults, no page held. Workload: prefix hits,
parallel samples (copy-on-write), chunked prefill, swap or recompute preemption, beams.

A failing step whose failure belongs to some requests fails only those (reason "error");
a data-parallel replica's failure keeps the other replicas' outputs.

The CI sweeps take a sample; ``-m slow`` runs every point (numbers in the closing note of
issue 19 and ``benchmarks/fault_sweep.py``)."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams
from jpaged.models import Model, init_params, tiny_config
from jpaged.parallel.replicas import Replicas
from jpaged.tools import faults

CONFIG = tiny_config(num_layers=2, max_position_embeddings=128)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True, logprobs=2)
SAMPLES = SamplingParams(max_tokens=8, temperature=0.8, n=3, seed=3, ignore_eos=True)
BEAMS = SamplingParams(max_tokens=6, temperature=0.0, n=2, best_of=3, use_beam_search=True,
                       ignore_eos=True)
SETUPS = {
    # Chunked prefill, swap preemption, prefix hits, parallel samples.
    "swap": dict(num_pages=20, max_num_seqs=6, max_num_batched_tokens=32,
                 preemption_mode="swap", num_host_pages=64),
    "recompute": dict(num_pages=20, max_num_seqs=6, max_num_batched_tokens=32),
    # Beams rank every live beam of a request in one step: a preemption that splits them
    # changes the search whatever happens, so they run where nothing is preempted.
    "roomy": dict(num_pages=128, max_num_seqs=8, max_num_batched_tokens=512),
}


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def workload(setup: str):
    shared = prompts(1, [12])[0]
    batch = prompts(2, [5, 11, 19]) + [shared + p for p in prompts(3, [3, 7])] + prompts(4, [9])
    params = [GREEDY, SEEDED, SAMPLES, GREEDY, SEEDED, BEAMS]
    work = list(zip(batch, params))
    return work if setup == "roomy" else work[:5]


def maker(model, setup: str, replicas: int = 1):
    """``make_llm`` for a sweep; ``replicas=2``: data parallelism (two engines on this
    one device behind ``Replicas``, as ``data_parallel=2`` puts them on two)."""
    def make():
        engines = [LLM(model, page_size=4, max_model_len=128, seed=i, **SETUPS[setup]).engine
                   for i in range(replicas)]
        return types.SimpleNamespace(engine=engines[0] if replicas == 1 else Replicas(engines))
    return make


def test_call_sweep(model):
    """Every function run inside a step raises at its first call, one at a time."""
    result = faults.sweep(maker(model, "swap"), workload("swap"), "call", max_k=1)
    print(result.row())
    assert result.points >= 80 and result.faults == result.points and not result.unreached
    assert 0 < result.exact < result.faults   # before and after the device started


def test_line_sweep_sample(model):
    """A KeyboardInterrupt at one line in 12 of those run inside a step."""
    result = faults.sweep(maker(model, "swap"), workload("swap"), "line", max_k=1, every=12)
    print(result.row())
    assert result.points >= 30 and result.faults == result.points and not result.unreached
    assert 0 < result.exact < result.faults


def test_data_parallel_sweep_sample(model):
    """Faults in one replica's step (the functions of one in 3): the other's step goes
    on, its outputs kept for the next call; the failed replica alone rolls back."""
    result = faults.sweep(maker(model, "swap", replicas=2), workload("swap"), "call",
                          max_k=1, every=3)
    print(result.row())
    assert result.points >= 25 and result.faults == result.points and not result.unreached


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("mode", ["call", "line"])
def test_full_sweep(model, setup, mode):
    result = faults.sweep(maker(model, setup), workload(setup), mode,
                          max_k=3 if mode == "call" else 1)
    print(setup, result.row())
    assert result.faults >= result.points and not result.unreached


@pytest.mark.slow
def test_full_data_parallel_sweep(model):
    result = faults.sweep(maker(model, "swap", replicas=2), workload("swap"), "call", max_k=2)
    print(result.row())
    assert result.faults >= result.points and not result.unreached


# -- fault isolation -------------------------------------------------------------------

def generate(llm, work):
    outputs = llm.generate([p for p, _ in work], [s for _, s in work])
    return [faults.result_of(o) for o in outputs]


def test_a_failing_request_fails_alone(model):
    """A request that makes every step it is in fail (here: its stop check raises) is
    found by bisection and finished with reason "error"; the others give their tokens."""
    work = workload("swap")
    clean = generate(LLM(model, page_size=4, max_model_len=128, **SETUPS["swap"]), work)
    llm = LLM(model, page_size=4, max_model_len=128, **SETUPS["swap"])
    check_all = llm.engine.stop.check_all   # the engine's one call into the stop rules

    def poisoned(rows):
        if any(seq.request_id == "3" and seq.num_output_tokens >= 2 for _, seq, _ in rows):
            raise ValueError("a bug that only request 3 meets")
        return check_all(rows)

    llm.engine.stop.check_all = poisoned
    got = generate(llm, work)
    assert got[:3] + got[4:] == clean[:3] + clean[4:]
    assert [reason for _, _, reason in got[3]] == ["error"]
    assert len(got[3][0][1]) == 1   # the token it had before the failing step
    assert llm.engine.can_step
    faults.assert_empty(llm.engine)


def test_a_failure_of_every_request_is_raised_and_reported(model):
    llm = LLM(model, page_size=4, max_model_len=128, **SETUPS["swap"])
    work = workload("swap")
    for i, (prompt, params) in enumerate(work):
        llm.engine.add_request(prompt, params, request_id=str(i))
    dispatch = llm.engine.runner.dispatch   # every step's (execute dispatches too)
    llm.engine.runner.dispatch = lambda *a: (_ for _ in ()).throw(RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        llm.engine.step()
    assert not llm.engine.can_step
    llm.engine.scheduler.check()
    assert len(llm.engine.requests) == len(work)   # nobody was failed for it
    llm.engine.runner.dispatch = dispatch
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        assert llm.engine.can_step
    faults.assert_empty(llm.engine)


def test_a_replica_failure_keeps_the_other_replicas_outputs(model):
    """Replica 0's step is interrupted; replica 1's step completes and its outputs come
    with the next call; nothing is lost or repeated."""
    work = [(p, GREEDY) for p in prompts(7, [5, 6, 7, 8])]
    make = maker(model, "roomy", replicas=2)
    clean = faults.drive(make().engine, work, None, [])
    engine = make().engine
    for i, (prompt, params) in enumerate(work):
        engine.add_request(prompt, params, request_id=str(i))
    routed = dict(engine.owner)
    engine.step()
    failing = engine.engines[0]
    failing._build = lambda *args: (_ for _ in ()).throw(KeyboardInterrupt)
    before = faults.fingerprint(failing)
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    assert faults.fingerprint(failing) == before
    kept = {o.request_id for o in engine.outbox}
    assert kept and all(routed[r] == 1 for r in kept)
    del failing._build
    done = {}
    outputs = engine.step()
    assert kept <= {o.request_id for o in outputs}
    while True:
        for o in outputs:
            if o.finished:
                assert o.request_id not in done
                done[o.request_id] = faults.result_of(o)
        if not engine.has_unfinished_requests():
            break
        outputs = engine.step()
    assert done == clean
    faults.assert_empty(engine)


@pytest.mark.slow
def test_data_parallel_2_sweep_on_fake_devices():
    """``LLM(data_parallel=2)`` on two of 8 fake CPU devices (XLA_FLAGS must be set before
    JAX starts, so in a subprocess): a fault at every function, one in 2."""
    code = (
        "import json, jax\n"
        "from test_faults import SETUPS, workload\n"
        "from jpaged.engine.engine import LLM\n"
        "from jpaged.models import Model, init_params\n"
        "from jpaged.tools import faults\n"
        "from test_faults import CONFIG\n"
        "model = Model(CONFIG, init_params(CONFIG, jax.random.key(0)))\n"
        "make = lambda: LLM(model, data_parallel=2, page_size=4, max_model_len=128,\n"
        "                   **SETUPS['swap'])\n"
        "assert len(make().engine.engines) == 2\n"
        "r = faults.sweep(make, workload('swap'), 'call', max_k=1, every=2)\n"
        "print(json.dumps(r.row()))\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["points"] >= 40 and result["faults"] == result["points"]
    assert not result["unreached"]
