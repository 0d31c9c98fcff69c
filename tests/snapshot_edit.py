"""Editing a snapshot on disk as an attacker would: change a data file and its manifest
entry together, so the checksums still match and the edit reaches the checks behind them."""

import hashlib
import json
from pathlib import Path

from jpaged.engine import snapshot_files as files
from jpaged.engine.snapshot_files import data_dir


def host(path: Path) -> dict:
    return json.loads((data_dir(path) / files.HOST_FILE).read_text())


def resign(path: Path, name: str, data: bytes) -> None:
    """Replace data file ``name`` of snapshot ``path`` and its manifest entry."""
    (data_dir(path) / name).write_bytes(data)
    manifest = json.loads((Path(path) / files.MANIFEST).read_text())
    manifest["files"][name].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (Path(path) / files.MANIFEST).write_text(json.dumps(manifest))


def write_host(path: Path, state: dict) -> None:
    resign(path, files.HOST_FILE, json.dumps(state).encode())
