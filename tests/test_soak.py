"""The soak (``jpaged.tools.soak``, ``benchmarks/soak.py``) at CI sizes: random adds, aborts and
steps with faults injected and snapshots restored, every step checked (no page leaked,
ref counts equal holders, nothing stuck), greedy requests equal to a clean run."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from jpaged.tools.soak import Soak, SoakConfig
from jpaged.models import Model, init_params, tiny_config

CONFIG = tiny_config(num_layers=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


def test_tiny_soak(model):
    """A few hundred operations, greedy and seeded requests only (two programs to compile)."""
    config = SoakConfig(operations=250, seed=6, fault_rate=0.08, snapshot_every=70, num_prompts=8,
                        kinds=dict(greedy=.6, seeded=.4), logprobs=False)
    result = Soak(model, config).run()
    assert result.operations == 250 and result.pages_leaked == 0
    assert result.faults_injected >= 5 and result.faults_survived == result.faults_injected
    assert result.snapshots >= 2 and result.greedy_checked >= 10
    assert result.preemptions > 0
    assert result.faults_by_kind["host"] > 0 and result.host_points > 0


@pytest.mark.slow
@pytest.mark.parametrize("preemption_mode", ["swap", "recompute"])
def test_soak(model, preemption_mode):
    """Every request kind (n samples, beams, logprobs), a few thousand operations."""
    config = SoakConfig(operations=3000, seed=2, fault_rate=0.03, snapshot_every=200,
                        preemption_mode=preemption_mode)
    result = Soak(model, config).run()
    assert result.pages_leaked == 0 and result.faults_survived == result.faults_injected
    assert all(result.faults_by_kind.values()) and result.fault_moves > 0
    assert result.snapshots >= 5 and result.greedy_checked >= 100 and result.preemptions > 0


def test_soak_refuses_an_unknown_fault(model):
    soak = Soak(model, SoakConfig(operations=1, snapshot_every=0))
    with pytest.raises(ValueError, match="unknown fault kind 'meteor'"):
        soak.injector.arm("meteor")


@pytest.mark.slow
def test_soak_data_parallel_2(tmp_path):
    """``benchmarks/soak.py --data-parallel 2``: two replicas on fake CPU devices (set before
    JAX starts, so in a subprocess), faults in either replica's steps."""
    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "soak.py"), "--data-parallel", "2",
         "--operations", "400", "--seed", "3", "--fault-rate", "0.08", "--snapshot-every", "100",
         "--out", str(tmp_path)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((tmp_path / "soak_dp2.json").read_text())["result"]
    assert result["pages_leaked"] == 0 and result["faults_injected"] >= 5
    assert result["faults_survived"] == result["faults_injected"]
    assert result["greedy_checked"] >= 10 and result["snapshots"] >= 1
