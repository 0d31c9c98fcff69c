"""Snapshot files (``jpaged.engine.snapshot_files``): the directory always holds one
complete snapshot, old or new, wherever its writer dies; every byte is checked on read;
no leftovers after a read or the next save. No JAX: plain files.

The writer is killed (``os._exit``, no cleanup runs) after each step of a save in a
subprocess, and made to raise after each step in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from jpaged.engine import snapshot_files as files
from snapshot_edit import data_dir, resign

ROOT = Path(__file__).resolve().parents[1]
VERSION = 7


def _arrays(tag: int) -> dict:
    rng = np.random.default_rng(tag)
    return {"replica0.device.k": rng.normal(size=(2, 3, 4)).astype(ml_dtypes.bfloat16),
            "replica0.device.k_scale": rng.integers(-9, 9, (5, 7)).astype(np.int8),
            "pages": np.arange(tag, tag + 10, dtype=np.int32)}


def _save(path: Path, tag: int) -> None:
    files.write(path, VERSION, {"tag": tag, "nested": {"a": [1, 2]}}, _arrays(tag), overwrite=True)


def _tag(path: Path) -> int:
    """The tag of the snapshot at ``path``, checking its arrays belong to it."""
    host, arrays = files.read(path, VERSION)
    want = _arrays(host["tag"])
    assert arrays.keys() == want.keys()
    for name in want:
        assert arrays[name].dtype == want[name].dtype
        np.testing.assert_array_equal(arrays[name], want[name])
    return host["tag"]


def _entries(path: Path) -> set:
    return {p.name for p in path.iterdir()}


def test_round_trip(tmp_path):
    _save(tmp_path / "s", 1)
    assert _tag(tmp_path / "s") == 1
    with pytest.raises(ValueError, match="already exists"):
        files.write(tmp_path / "s", VERSION, {}, {})
    _save(tmp_path / "s", 2)
    assert _tag(tmp_path / "s") == 2
    assert len(_entries(tmp_path / "s")) == 2   # the manifest and one data directory


_KILLED = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_snapshot_files as t
from jpaged.engine import snapshot_files as files
from snapshot_edit import data_dir, resign
files._after_step = lambda step: os._exit(17) if step == {step!r} else None
t._save(Path({path!r}), 2)
"""


@pytest.mark.parametrize("step", files.STEPS)
def test_a_writer_killed_at_any_step_leaves_a_complete_snapshot(tmp_path, step):
    path = tmp_path / "s"
    _save(path, 1)
    script = _KILLED.format(tests=str(ROOT / "tests"), step=step, path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ,
                          PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    committed = files.STEPS.index(step) >= files.STEPS.index("commit")
    assert _tag(path) == (2 if committed else 1)
    # The read removed the dead writer's leftovers; so does the next save.
    assert len(_entries(path)) == 2, _entries(path)
    _save(path, 3)
    assert _tag(path) == 3 and len(_entries(path)) == 2


@pytest.mark.parametrize("step", files.STEPS[:-1])
def test_a_save_failing_at_any_step_leaves_the_old_one_and_nothing_else(tmp_path, step,
                                                                        monkeypatch):
    path = tmp_path / "s"
    _save(path, 1)
    before = _entries(path)

    def fail(name):
        if name == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(files, "_after_step", fail)
    with pytest.raises(KeyboardInterrupt):
        _save(path, 2)
    monkeypatch.undo()
    committed = files.STEPS.index(step) >= files.STEPS.index("commit")
    assert _tag(path) == (2 if committed else 1)
    if not committed:
        assert _entries(path) == before
    assert len(_entries(path)) == 2


def test_every_byte_flip_is_refused(tmp_path):
    """A flip of one byte anywhere in a data file, at several offsets of each."""
    path = tmp_path / "s"
    _save(path, 1)
    targets = [p for p in data_dir(path).rglob("*") if p.is_file()]
    assert len(targets) == 4
    for target in targets:
        original = target.read_bytes()
        for offset in sorted({0, len(original) // 2, len(original) - 1}):
            flipped = bytearray(original)
            flipped[offset] ^= 0x10
            target.write_bytes(bytes(flipped))
            with pytest.raises(ValueError, match="SHA-256"):
                files.read(path, VERSION)
        target.write_bytes(original[:-1])
        with pytest.raises(ValueError, match="truncated or damaged"):
            files.read(path, VERSION)
        target.write_bytes(original)
    assert _tag(path) == 1


def test_malformed_files_are_refused(tmp_path):
    path = tmp_path / "s"
    _save(path, 1)
    resign(path, files.HOST_FILE, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        files.read(path, VERSION)
    resign(path, files.HOST_FILE, b"[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        files.read(path, VERSION)
    _save(path, 1)
    manifest = json.loads((path / files.MANIFEST).read_text())
    for edit, match in [
            (dict(version=1), r"version=1\); a snapshot of this older layout"),
            (dict(data="../elsewhere"), "malformed"),
            (dict(files={**manifest["files"], "arrays/extra.bin": {"bytes": 0}}), "missing"),
            (dict(files={k: v for k, v in manifest["files"].items() if k != "arrays/pages.bin"}),
             "unlisted"),
    ]:
        (path / files.MANIFEST).write_text(json.dumps({**manifest, **edit}))
        with pytest.raises(ValueError, match=match):
            files.read(path, VERSION)
    entry = manifest["files"]["arrays/pages.bin"]
    for bad, match in [(dict(dtype="object"), "no known dtype"), (dict(shape=[11]), "bytes for"),
                       (dict(shape=[-10, -1]), "not a list of sizes")]:
        (path / files.MANIFEST).write_text(json.dumps(
            {**manifest, "files": {**manifest["files"], "arrays/pages.bin": {**entry, **bad}}}))
        with pytest.raises(ValueError, match=match):
            files.read(path, VERSION)


@pytest.mark.parametrize("old", [1, 2])
def test_older_snapshots_are_refused_by_version(tmp_path, old):
    """The layout before manifests: snapshot.json at the top, orbax arrays beside it."""
    (tmp_path / files.HOST_FILE).write_text(json.dumps({"format": files.FORMAT, "version": old}))
    (tmp_path / "arrays").mkdir()
    with pytest.raises(ValueError, match=rf"version={old}\); a snapshot of this older layout"):
        files.read(tmp_path, VERSION)
    _save(tmp_path, 1)   # overwriting one leaves the new layout only
    assert _tag(tmp_path) == 1 and len(_entries(tmp_path)) == 2
    (tmp_path / files.MANIFEST).unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        files.read(tmp_path, VERSION)
