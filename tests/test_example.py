"""examples/custom_model.py runs, and its loop's tokens agree with a recompute."""

import importlib.util
import pathlib
import sys

import numpy as np

from jpaged.decode_loop import prepare

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "custom_model.py"


def load_example():
    spec = importlib.util.spec_from_file_location("custom_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def test_custom_model_example(capsys):
    result = load_example().main(["--steps", "6", "--batch", "3"])
    assert "paged and dense tokens equal: True" in capsys.readouterr().out
    np.testing.assert_array_equal(result["paged"], result["dense"])
    # Greedy: prefilling each prompt with all its generated tokens but the last predicts it.
    sequences = [prompt + result["paged"][row, :-1].tolist()
                 for row, prompt in enumerate(result["prompts"])]
    _, _, last = prepare(result["model"], sequences, num_steps=1)
    np.testing.assert_array_equal(last, result["paged"][:, -1])
