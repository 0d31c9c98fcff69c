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

from jpaged.engine import snapshot, snapshot_files
from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams
from snapshot_edit import data_dir, host, write_host

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
    return path, _outputs(llm), host(path)


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
    again = host(tmp_path / "again")
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
    """An exception once the new files are written, before the commit (a kill at every
    step: tests/test_snapshot_files.py)."""
    path, want, _ = saved
    target = tmp_path / "s"
    LLM.from_snapshot(path).save_snapshot(target)

    def crash(step):
        if step == "manifest":
            raise KeyboardInterrupt

    monkeypatch.setattr(snapshot_files, "_after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        LLM("tiny", **OPTIONS).save_snapshot(target, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert len(list(target.iterdir())) == 2   # the manifest and its data: no temporary left
    _compare(_outputs(LLM.from_snapshot(target)), want)


def test_truncated_snapshots_are_refused(saved, tmp_path):
    import shutil

    path, _, _ = saved
    no_host = tmp_path / "no_host"
    shutil.copytree(path, no_host)
    (data_dir(no_host) / snapshot.HOST_FILE).unlink()
    with pytest.raises(ValueError, match="truncated or damaged: files missing"):
        LLM.from_snapshot(no_host)
    no_arrays = tmp_path / "no_arrays"
    shutil.copytree(path, no_arrays)
    shutil.rmtree(data_dir(no_arrays) / "arrays")
    with pytest.raises(ValueError, match="truncated"):
        LLM.from_snapshot(no_arrays)
    cut = tmp_path / "cut"
    shutil.copytree(path, cut)
    text = (data_dir(cut) / snapshot.HOST_FILE).read_text()
    (data_dir(cut) / snapshot.HOST_FILE).write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        LLM.from_snapshot(cut)
    (cut / snapshot_files.MANIFEST).unlink()
    with pytest.raises(ValueError, match="not a complete snapshot: no manifest.json"):
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
    state = host(forged)
    state["geometry"]["head_dim"] = 64
    write_host(forged, state)
    with pytest.raises(ValueError, match="geometry says"):
        LLM.from_snapshot(forged)
    del state["geometry"]["head_dim"], state["replicas"]
    write_host(forged, state)
    with pytest.raises(ValueError, match="malformed snapshot"):
        LLM.from_snapshot(forged)


# -- untrusted snapshots: every edit refused before a pool is allocated ------------------

def _seq_with(state: dict, what) -> dict:
    """The first saved sequence (JSON) of replica 0 for which ``what(seq)`` holds."""
    return next(q for q in state["replicas"][0]["sequences"] if what(q))


def _set(path, value):
    """An edit setting the item at ``path`` (keys / indices from the host state) to
    ``value`` (or to ``value(old)`` if callable)."""
    def edit(state):
        *head, last = path
        for key in head:
            state = state[key]
        state[last] = value(state[last]) if callable(value) else value
    return edit


def _live(q):
    return q["status"] != "finished" and q["block_table"]


R = ("replicas", 0)
BM = R + ("scheduler", "block_manager")
EDITS = {
    "num_pages": (_set(("options", "num_pages"), 10**6), "num_pages=1000000 differ"),
    "geometry_and_options": (lambda s: (_set(("options", "num_pages"), 10**6)(s),
                                        _set(("geometry", "num_pages"), 10**6)(s)),
                             "block manager has 40 pages"),
    "page_out_of_range": (lambda s: _seq_with(s, _live)["block_table"].__setitem__(0, 10**6),
                          "outside"),
    "negative_page": (lambda s: _seq_with(s, _live)["block_table"].__setitem__(0, -1),
                      "outside"),
    "ref_count": (_set(BM + ("ref_counts", 1), lambda c: c + 1), "ref count"),
    "token_id": (lambda s: _seq_with(s, _live)["token_ids"].__setitem__(0, 10**9),
                 "outside the vocabulary"),
    "computed": (lambda s: _seq_with(s, _live).__setitem__("num_computed_tokens", 10**4),
                 "num_computed_tokens"),
    "queue": (_set(R + ("scheduler", "waiting"), lambda w: w[1:]), "live sequences"),
    "status": (lambda s: _seq_with(s, _live).__setitem__("status", "waiting"),
               "queue of its status|holds"),
    "pages_saved": (_set(R + ("device_pages",), lambda p: p[:-1]), "saves device pages"),
    "rng": (_set(R + ("rng",), {"bit_generator": "nope"}), "RNG state"),
    "seq_reference": (_set(R + ("scheduler", "waiting", 0), {"__seq__": 9999}),
                      "sequence reference 9999"),
    "unknown_tag": (_set(R + ("scheduler", "waiting", 0), {"__pickle__": "x"}), "unknown tag"),
    "params": (_set(R + ("requests", 0, "params", "top_p"), 7.0), "top_p"),
    "request_dropped": (_set(R + ("requests",), lambda r: r[1:]), "does not follow"),
    "counter": (_set(R + ("next_id",), "x"), "next_id"),
    "arrival_counter": (_set(R + ("scheduler", "next_arrival"), 0), "the counters are at"),
    "key_counter": (_set(BM + ("next_key_id",), 1), "key id|key counter"),
    "stream": (lambda s: next(iter(s["replicas"][0]["requests"][0]["streams"].values()))
               .__setitem__("cumulative_logprob", "x"), "stream"),
    "hit_tokens": (_set(BM + ("hit_tokens",), -1), "hit_tokens=-1"),
    "cache_key": (_set(BM + ("cache", 0, "__tuple__", 0, "__tuple__", 1, "__tuple__", 0), 10**9),
                  "prefix-cache key"),
    "fingerprint": (_set(("fingerprint",), "0" * 64), "fingerprint differs"),
    "model_path": (_set(("model",), "/"), "fingerprint|more than"),
    "config": (_set(("config", "vocab_size"), 7), "vocab_size"),
    "replicas": (_set(("replicas",), []), "replicas"),
    "nested_list": (_set(R + ("sequences", 0, "extra_keys"), json.loads("[" * 900 + "]" * 900)),
                    "malformed|hashable"),
}


@pytest.fixture
def no_pool(monkeypatch):
    """Fails the test if anything allocates a KV pool."""
    from jpaged.core.cache import KVCache

    def refuse(*args, **kwargs):
        raise AssertionError("a pool was allocated before the snapshot was refused")

    monkeypatch.setattr(KVCache, "create", refuse)


@pytest.mark.parametrize("name", list(EDITS))
def test_edited_snapshots_are_refused_before_allocating(saved, tmp_path, no_pool, name):
    """Edits that keep the checksums right (the manifest re-signed), so they reach the
    checks behind them: each is a ValueError naming the problem, before any pool."""
    import shutil

    edit, match = EDITS[name]
    path = tmp_path / "s"
    shutil.copytree(saved[0], path)
    state = host(path)
    edit(state)
    write_host(path, state)
    with pytest.raises(ValueError, match=match):
        LLM.from_snapshot(path)


def test_deep_nesting_and_unsigned_edits_are_refused(saved, tmp_path, no_pool):
    import shutil

    from snapshot_edit import resign

    path = tmp_path / "s"
    shutil.copytree(saved[0], path)
    text = (data_dir(path) / snapshot.HOST_FILE).read_text()
    deep = text.replace('"num_steps": ', '"num_steps": ' + "[" * 100_000 + "]" * 100_000 + ", "
                        '"was": ', 1)
    resign(path, snapshot.HOST_FILE, deep.encode())
    with pytest.raises(ValueError, match="nested too deeply"):
        LLM.from_snapshot(path)
    (data_dir(path) / snapshot.HOST_FILE).write_text(text.replace('"num_steps": ',
                                                                  '"num_steps": 1', 1))
    with pytest.raises(ValueError, match="truncated or damaged|SHA-256"):
        LLM.from_snapshot(path)


def test_byte_flips_in_arrays_are_refused(saved, tmp_path, no_pool):
    import shutil

    path = tmp_path / "s"
    shutil.copytree(saved[0], path)
    targets = sorted((data_dir(path) / "arrays").iterdir())
    assert len(targets) >= 4   # device and host K and V
    for target in targets:
        original = target.read_bytes()
        flipped = bytearray(original)
        flipped[len(original) // 3] ^= 0x01
        target.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match=f"{target.name} is damaged: its SHA-256"):
            LLM.from_snapshot(path)
        target.write_bytes(original)


def test_pools_beyond_the_memory_bound_are_refused(saved, no_pool):
    with pytest.raises(ValueError, match="more than max_pool_bytes=100000"):
        LLM.from_snapshot(saved[0], max_pool_bytes=10**5)


def test_a_restore_leaves_no_temporary_directories(saved, tmp_path):
    """A dead writer's data directory (its pid is gone) is removed by the next restore."""
    import shutil

    path = tmp_path / "s"
    shutil.copytree(saved[0], path)
    shutil.copytree(data_dir(path), path / "data-999999999-0123abcd")
    (path / ".manifest.json-data-999999999-0123abcd.tmp").write_text("{}")
    assert len(list(path.iterdir())) == 4
    LLM.from_snapshot(path)
    assert len(list(path.iterdir())) == 2


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
