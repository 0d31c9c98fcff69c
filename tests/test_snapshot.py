"""Engine snapshots: save mid-generation, restore (here, in a fresh process, on another
tensor-parallel size), step on: the tokens equal those of a run never interrupted.

The reference is the same engine stepping on without a snapshot. The scenario is saved
with running, waiting and swapped sequences, parallel samples sharing pages, a beam
request, seeded and unseeded sampled requests and prefix-cache hits (asserted at save
time, so the test cannot pass on an easy state). ``python tests/test_snapshot.py restore
PATH [tensor_parallel]`` runs the restore half in another process and prints its outputs
as one JSON line.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jpaged.engine import snapshot
from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
# A pool small enough that swapping and preemption happen within a few steps.
OPTIONS = dict(page_size=4, num_pages=40, num_host_pages=48, preemption_mode="swap",
               max_num_seqs=6, max_num_batched_tokens=48, max_model_len=128)
STEPS_BEFORE_SAVE = 7
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)


def _requests() -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(3)
    prefix = rng.integers(0, 512, 12).tolist()   # three full pages shared: prefix hits
    prompt = lambda n: rng.integers(0, 512, n).tolist()
    return [
        (prefix + prompt(5), GREEDY),
        (prompt(9), SamplingParams(max_tokens=24, temperature=0.9, seed=7, n=3,
                                   ignore_eos=True, logprobs=1)),
        (prompt(6), SamplingParams(max_tokens=16, use_beam_search=True, n=2, best_of=3,
                                   temperature=0.0, ignore_eos=True)),
        (prompt(11), SamplingParams(max_tokens=22, temperature=1.0, top_k=20,
                                    ignore_eos=True)),   # unseeded: the engine's rng
        (prompt(7), GREEDY),
        (prefix + prompt(3), GREEDY),
        (prompt(20), SamplingParams(max_tokens=18, temperature=0.7, top_p=0.9, seed=11,
                                    ignore_eos=True)),
        (prefix + prompt(6), GREEDY),
        (prompt(5), GREEDY),
    ]


LATE = ([5, 6, 7, 8, 9], SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))


def _outputs(llm) -> dict:
    """Step to the end after adding a request (drawing from the engine's rng); every
    request's completions as [tokens, cumulative logprob]."""
    engine = llm.engine
    engine.add_request(*LATE, request_id="late")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [[o.token_ids, o.cumulative_logprob, o.logprobs and [
                    {t: dataclasses.astuple(lp) for t, lp in e.items()} for e in o.logprobs]]
                                        for o in out.outputs]
    return json.loads(json.dumps(done))


def _started(**overrides) -> LLM:
    """An LLM mid-generation: the first prompt runs alone for two steps, so the prompts
    sharing its prefix hit the prefix cache when they come."""
    llm = LLM("tiny", **{**OPTIONS, **overrides})
    requests = _requests()
    llm.engine.add_request(*requests[0])
    llm.engine.step(), llm.engine.step()
    for prompt, params in requests[1:]:
        llm.engine.add_request(prompt, params)
    for _ in range(STEPS_BEFORE_SAVE):
        llm.engine.step()
    return llm


def _check_busy(llm) -> None:
    """The saved state has every kind of thing a snapshot must carry."""
    scheduler = llm.engine.scheduler
    bm = scheduler.block_manager
    assert scheduler.running and scheduler.waiting and scheduler.swapped
    assert any(c > 1 for c in bm.ref_counts), "no page shared by samples or a prefix"
    assert bm.hit_tokens > 0 and bm.cache
    assert any(r.beam_width for r in llm.engine.requests.values())


def _compare(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for request_id in want:
        for (tokens, logprob, top), (want_tokens, want_logprob, want_top) in zip(
                got[request_id], want[request_id], strict=True):
            assert tokens == want_tokens, request_id
            np.testing.assert_allclose(logprob, want_logprob, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(snapshot path, the uninterrupted run's outputs, the host state at save time)."""
    path = tmp_path_factory.mktemp("snap") / "engine"
    llm = _started()
    _check_busy(llm)
    llm.save_snapshot(path)
    state = json.loads((path / snapshot.HOST_FILE).read_text())
    return path, _outputs(llm), state


def _without_times(state: dict) -> dict:
    for replica in state["replicas"]:
        replica.pop("host_time"), replica.pop("step_time")
        for request in replica["requests"]:
            request.pop("metrics")
    return state


def test_restore_in_process_continues_exactly(saved, tmp_path):
    path, want, state = saved
    llm = LLM.from_snapshot(path)
    # The restored engine, saved again, is the same state (times aside).
    llm.save_snapshot(tmp_path / "again")
    again = json.loads((tmp_path / "again" / snapshot.HOST_FILE).read_text())
    assert _without_times(again) == _without_times(json.loads(json.dumps(state)))
    _compare(_outputs(llm), want)
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_pages == bm.num_pages - 1 and not llm.engine.requests


def _restore_in_subprocess(path, *args, devices: int = 1) -> dict:
    return _run_in_subprocess("restore", str(path), *args, devices=devices)


def _run_in_subprocess(*args, devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, __file__, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow   # the tensor-parallel case below is a fresh process too
def test_restore_in_a_fresh_process(saved):
    path, want, _ = saved
    _compare(_restore_in_subprocess(path), want)


def test_restore_on_two_devices_reshards_the_pool(saved):
    path, want, _ = saved
    _compare(_restore_in_subprocess(path, "2", devices=8), want)


@pytest.mark.slow
def test_reshard_with_replicated_kv_heads_and_back(saved, tmp_path):
    """4 devices for 2 kv heads: each head is stored twice in the pool; a snapshot of that
    pool holds each once, and restores on one device."""
    path, want, _ = saved
    result = _run_in_subprocess("reshard", str(path), str(tmp_path / "tp4"), devices=8)
    _compare(result["tp4"], want)
    _compare(result["tp1"], want)


@pytest.mark.slow
def test_data_parallel_replicas_each_restore(tmp_path):
    result = _run_in_subprocess("data_parallel", str(tmp_path / "s"), devices=8)
    assert result["replicas"] == 2 and result["equal"], result


@pytest.mark.slow
def test_int8_pool_carries_its_scales(tmp_path):
    llm = _started(kv_cache_dtype="int8")
    llm.save_snapshot(tmp_path / "s")
    want = _outputs(llm)
    restored = LLM.from_snapshot(tmp_path / "s")
    cache = restored.engine.runner.cache
    assert cache.k.dtype.name == "int8" and float(abs(cache.k_scale).max()) > 0
    _compare(_outputs(restored), want)


# -- refusals --------------------------------------------------------------------------

def test_existing_path_is_refused_unless_overwrite(saved, tmp_path):
    path, _, _ = saved
    llm = LLM("tiny", **OPTIONS)
    target = tmp_path / "s"
    llm.save_snapshot(target)
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        llm.save_snapshot(target)
    LLM.from_snapshot(path).save_snapshot(target, overwrite=True)
    assert len(LLM.from_snapshot(target).engine.requests) == len(_requests())


def test_a_failed_save_leaves_the_old_snapshot(saved, tmp_path, monkeypatch):
    path, want, _ = saved
    target = tmp_path / "s"
    LLM.from_snapshot(path).save_snapshot(target)
    real_write = snapshot._write

    def crash(directory, host, arrays):   # the arrays written, then the process "dies"
        real_write(directory, host, arrays)
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshot, "_write", crash)
    with pytest.raises(KeyboardInterrupt):
        LLM("tiny", **OPTIONS).save_snapshot(target, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]   # no temporary left
    _compare(_outputs(LLM.from_snapshot(target)), want)


def test_truncated_snapshots_are_refused(saved, tmp_path):
    import shutil

    path, _, _ = saved
    no_host = tmp_path / "no_host"
    shutil.copytree(path, no_host)
    (no_host / snapshot.HOST_FILE).unlink()
    with pytest.raises(ValueError, match="not a complete snapshot"):
        LLM.from_snapshot(no_host)
    no_arrays = tmp_path / "no_arrays"
    shutil.copytree(path, no_arrays)
    shutil.rmtree(no_arrays / snapshot.ARRAYS_DIR)
    with pytest.raises(ValueError, match="truncated"):
        LLM.from_snapshot(no_arrays)
    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    text = (cut / snapshot.HOST_FILE).read_text()
    (cut / snapshot.HOST_FILE).write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match="not a complete snapshot"):
        LLM.from_snapshot(cut)


def test_foreign_snapshots_are_refused(saved, tmp_path):
    import shutil

    from jpaged.models import Model, init_params, tiny_config
    import jax

    path, _, _ = saved
    with pytest.raises(ValueError, match="page_size=8 differs"):
        LLM.from_snapshot(path, page_size=8)
    config = tiny_config(num_layers=2)
    other = Model(config, init_params(config, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"num_layers=2 \(snapshot: 4\)"):
        LLM.from_snapshot(path, model=other)
    # A snapshot whose recorded geometry disagrees with its own arrays.
    forged = tmp_path / "forged"
    shutil.copytree(path, forged)
    host = json.loads((forged / snapshot.HOST_FILE).read_text())
    host["geometry"]["head_dim"] = 64
    (forged / snapshot.HOST_FILE).write_text(json.dumps(host))
    with pytest.raises(ValueError, match="geometry says"):
        LLM.from_snapshot(forged)
    del host["geometry"]["head_dim"], host["replicas"]
    (forged / snapshot.HOST_FILE).write_text(json.dumps(host))
    with pytest.raises(ValueError, match="malformed snapshot"):
        LLM.from_snapshot(forged)
    host["format"] = "something-else"
    (forged / snapshot.HOST_FILE).write_text(json.dumps(host))
    with pytest.raises(ValueError, match="not a jpaged-snapshot"):
        LLM.from_snapshot(forged)


def test_bundle_model_needs_model_override(tmp_path):
    from jpaged.models import Model, init_params, tiny_config
    import jax

    config = tiny_config(num_layers=2)
    bundle = Model(config, init_params(config, jax.random.key(1)))
    llm = LLM(bundle, page_size=4, num_pages=16)
    llm.engine.add_request([1, 2, 3], GREEDY)
    llm.engine.step()
    llm.save_snapshot(tmp_path / "s")
    with pytest.raises(ValueError, match="pass model="):
        LLM.from_snapshot(tmp_path / "s")
    restored = LLM.from_snapshot(tmp_path / "s", model=bundle)
    assert list(restored.engine.requests) == ["0"]


def _data_parallel(path: str) -> dict:
    """Two replicas saved, restored, stepped on: each replica's queues were busy and the
    outputs equal the uninterrupted run's."""
    llm = _started(data_parallel=2)
    busy = [bool(e.scheduler.running) for e in llm.engine.engines]
    llm.save_snapshot(path)
    want = _outputs(llm)
    restored = LLM.from_snapshot(path)
    got = _outputs(restored)
    _compare(got, want)
    return {"replicas": len(restored.engine.engines), "busy": busy,
            "equal": all(busy) and got.keys() == want.keys()}


if __name__ == "__main__":
    if sys.argv[1] == "restore":
        overrides = {"tensor_parallel": int(sys.argv[3])} if len(sys.argv) > 3 else {}
        print(json.dumps(_outputs(LLM.from_snapshot(sys.argv[2], **overrides))))
    elif sys.argv[1] == "reshard":
        tp4 = LLM.from_snapshot(sys.argv[2], tensor_parallel=4)
        tp4.save_snapshot(sys.argv[3])
        result = {"tp4": _outputs(tp4)}
        result["tp1"] = _outputs(LLM.from_snapshot(sys.argv[3], tensor_parallel=1))
        print(json.dumps(result))
    elif sys.argv[1] == "data_parallel":
        print(json.dumps(_data_parallel(sys.argv[2])))
