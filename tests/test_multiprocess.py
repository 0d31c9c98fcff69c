"""Two processes on localhost run one tensor-parallel engine: the README's
``jpaged distributed`` commands (``python -m jpaged distributed``) (``jax.distributed``, gloo CPU collectives, one
device per process). Process 0 schedules and broadcasts every step, process 1 serves;
the tokens equal a single-device engine's in this process.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams

PROMPTS = ["5,17,3,250,9,41", "7,7,300"]
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_generate_like_one():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, "-m", "jpaged", "distributed", "--coordinator",
               f"127.0.0.1:{free_port()}", "--num-processes", "2", "--cpu-collectives", "gloo",
               "--max-tokens", str(MAX_TOKENS)]
    for prompt in PROMPTS:
        command += ["--prompt", prompt]
    start = time.perf_counter()
    procs = [subprocess.Popen(command + ["--process-id", str(i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    # The single-device reference runs here meanwhile.
    reference = LLM("tiny").generate([[int(t) for t in p.split(",")] for p in PROMPTS],
                                     SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    outputs = [p.communicate(timeout=600) for p in procs]
    seconds = time.perf_counter() - start
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-6000:]
    # Gloo also prints to stdout: the results are the JSON lines.
    results = [[json.loads(line) for line in out.splitlines() if line.startswith("{")]
               for out, _ in outputs]
    assert [line["prompt"] for line in results[0]] == PROMPTS
    assert [line["token_ids"] for line in results[0]] == [o.token_ids for o in reference]
    assert results[1] == []   # process 1 only serves
    print(f"two-process test: {seconds:.1f} s")
