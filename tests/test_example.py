"""examples/custom_model.py runs, and its loop's tokens agree with a recompute."""

import contextlib
import importlib.util
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jpaged.decode_loop import prepare

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "custom_model.py"


def load_example():
    spec = importlib.util.spec_from_file_location("custom_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example_run():
    """The example's ``main`` in this process: its result and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = load_example().main(["--steps", "6", "--batch", "3"])
    return result, out.getvalue()


def test_custom_model_example(example_run):
    result, printed = example_run
    assert "paged and dense tokens equal: True" in printed
    np.testing.assert_array_equal(result["paged"], result["dense"])
    np.testing.assert_array_equal(result["engine"], result["paged"][:, :-1])
    # Greedy: prefilling each prompt with all its generated tokens but the last predicts it.
    sequences = [prompt + result["paged"][row, :-1].tolist()
                 for row, prompt in enumerate(result["prompts"])]
    _, _, last = prepare(result["model"], sequences, num_steps=1)
    np.testing.assert_array_equal(last, result["paged"][:, -1])


def engine_lines(*flags) -> list[str]:
    """The example's engine tokens, run as a command (the TP run needs 8 host devices,
    which JAX must be given before it starts: the example sets them itself)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(EXAMPLE.parents[1]))
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "6", "--batch", "3",
                           *flags], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("engine tokens")]


def test_custom_model_tensor_parallel(example_run):
    """The user's model, built from jpaged.parallel.layers, runs tensor-parallel unchanged: the
    engine over 2 devices (a subprocess: JAX needs its host devices before it starts) prints
    the tokens the single-device run printed."""
    single = [line for line in example_run[1].splitlines() if line.startswith("engine tokens")]
    assert len(single) == 3, single
    assert engine_lines("--tensor-parallel", "2") == single
