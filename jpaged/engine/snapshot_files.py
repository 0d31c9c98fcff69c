"""The files of a snapshot: a directory that always holds one complete snapshot, every
byte of it checked before it is used. No JAX: plain files, ``json``, ``hashlib`` and numpy.

A snapshot directory ``path`` holds:

- ``manifest.json``: the commit record: the format and version, the name of the data
  directory, and for every file in it the size and SHA-256 (for an array also its dtype
  and shape).
- ``data-<pid>-<random>/``: ``snapshot.json`` (the host state) and ``arrays/<name>.bin``,
  each array's raw bytes (C order).

A save writes a new data directory beside the current one and syncs it, then replaces
``manifest.json`` with ``os.replace`` (atomic): whenever the writer dies, ``path`` holds
the old snapshot or the new one, whole. Then the old data directory is removed. A data
directory the manifest does not name (a save that died, or one replaced) is removed by
the next save and after a read, once the process named in it is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np

FORMAT = "jpaged-snapshot"
MANIFEST = "manifest.json"
HOST_FILE = "snapshot.json"
ARRAYS_DIR = "arrays"
MAX_JSON_BYTES = 1 << 30
# The dtypes a pool or its page lists can have, by name.
DTYPES = {name: np.dtype(t) for name, t in [
    ("int8", np.int8), ("int32", np.int32), ("float16", np.float16),
    ("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16),
    ("float8_e4m3fn", ml_dtypes.float8_e4m3fn)]}
# The steps of a save, in order; ``_after_step(name)`` runs after each (tests kill the
# writer there).
STEPS = ("data", "arrays", "host", "manifest", "commit", "clean")
_after_step = None
_DATA = re.compile(r"data-(\d+)-[0-9a-f]+")
_ARRAY = re.compile(r"[A-Za-z0-9_.]+")


def write(path: Path, version: int, host: dict, arrays: dict[str, np.ndarray],
          overwrite: bool = False) -> None:
    """Save ``host`` (JSON values) and ``arrays`` (name -> numpy array) as the snapshot
    at ``path``, replacing the one there only if ``overwrite`` (atomically, see the module
    docstring)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    data = path / f"data-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    pending = path / f".{MANIFEST}-{data.name}.tmp"
    committed = False
    try:
        (data / ARRAYS_DIR).mkdir(parents=True)
        _step("data")
        files = {}
        for name, array in arrays.items():
            if not _ARRAY.fullmatch(name) or array.dtype.name not in DTYPES:
                raise ValueError(f"cannot save array {name!r} of {array.dtype}")
            array = np.ascontiguousarray(array)
            entry = _write_file(data / ARRAYS_DIR / f"{name}.bin", array.tobytes())
            files[f"{ARRAYS_DIR}/{name}.bin"] = dict(entry, dtype=array.dtype.name,
                                                     shape=list(array.shape))
        _sync_dir(data / ARRAYS_DIR)
        _step("arrays")
        files[HOST_FILE] = _write_file(data / HOST_FILE, json.dumps(host).encode())
        _sync_dir(data)
        _step("host")
        manifest = {"format": FORMAT, "version": version, "data": data.name, "files": files}
        _write_file(pending, json.dumps(manifest).encode())
        _step("manifest")
        os.replace(pending, path / MANIFEST)
        committed = True
        _sync_dir(path)
        _step("commit")
    finally:
        if not committed:   # an exception, not a kill: leave nothing of this save
            shutil.rmtree(data, ignore_errors=True)
            pending.unlink(missing_ok=True)
    clean(path, data.name)
    for old in (path / HOST_FILE, path / ARRAYS_DIR):   # an older layout's files, replaced
        _remove(old)
    _step("clean")


def read(path: Path, version: int) -> tuple[dict, dict[str, np.ndarray]]:
    """The host state and the arrays of the snapshot at ``path``, every file checked
    against the manifest (size and SHA-256) before it is parsed. Raises ValueError naming
    what is missing, damaged or of another version. Leftovers of dead writers are removed
    afterwards."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a snapshot directory")
    if not (path / MANIFEST).is_file():
        if (path / HOST_FILE).is_file():   # the layout of versions 1 and 2
            old = _json(path / HOST_FILE, None, f"{path}/{HOST_FILE}")
            _check_version(old, version, path)
        raise ValueError(f"{path} is not a complete snapshot: no {MANIFEST}")
    manifest = _json(path / MANIFEST, None, f"{path}/{MANIFEST}")
    _check_version(manifest, version, path)
    files, data_name = manifest.get("files"), manifest.get("data")
    if not isinstance(data_name, str) or not _DATA.fullmatch(data_name) or not isinstance(
            files, dict) or HOST_FILE not in files:
        raise ValueError(f"{path}/{MANIFEST} is malformed (data={str(data_name)[:80]!r})")
    data = path / data_name
    listed = set(files)
    present = {HOST_FILE} if (data / HOST_FILE).exists() else set()
    if (data / ARRAYS_DIR).is_dir():
        present |= {f"{ARRAYS_DIR}/{p.name}" for p in (data / ARRAYS_DIR).iterdir()}
    if listed != present:
        raise ValueError(f"{path} is truncated or damaged: files missing "
                         f"{sorted(listed - present)[:5]}, unlisted {sorted(present - listed)[:5]}")
    host = _json(data / HOST_FILE, files[HOST_FILE], f"{path}/{data_name}/{HOST_FILE}")
    arrays = {}
    for name, entry in files.items():
        if name != HOST_FILE:
            arrays[_array_name(name)] = _array(data / name, entry, f"{path}/{data_name}/{name}")
    clean(path, data_name)
    return host, arrays


def data_dir(path: Path) -> Path:
    """The data directory of the snapshot at ``path`` (as its manifest names it, unchecked:
    for inspection; ``read`` checks everything)."""
    return Path(path) / json.loads((Path(path) / MANIFEST).read_text())["data"]


def clean(path: Path, keep: str) -> None:
    """Remove from ``path`` every data directory but ``keep`` and every pending manifest
    whose writer (the pid in the name) is this process or gone."""
    for entry in path.iterdir():
        name = entry.name.removeprefix(f".{MANIFEST}-").removesuffix(".tmp")
        match = _DATA.fullmatch(name)
        if match is None or name == keep:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not _alive(pid):
            _remove(entry)


def _remove(entry: Path) -> None:
    """Remove a file or directory tree, quietly where it cannot (a read-only snapshot)."""
    if entry.is_dir():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        try:
            entry.unlink(missing_ok=True)
        except OSError:
            pass


def _step(name: str) -> None:
    if _after_step is not None:
        _after_step(name)


def _write_file(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _sync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable (its entries, not only their data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def _checked_bytes(path: Path, entry: dict | None, where: str, limit: int) -> bytes:
    """The bytes of ``path``, checked against its manifest ``entry`` (size, SHA-256)."""
    size = path.stat().st_size if path.is_file() else -1
    if entry is not None:
        if not isinstance(entry, dict) or entry.get("bytes") != size:
            raise ValueError(f"{where} is truncated or damaged: {size} bytes, the manifest "
                             f"says {entry.get('bytes') if isinstance(entry, dict) else entry!r}")
    if not 0 <= size <= limit:
        raise ValueError(f"{where}: {size} bytes, expected a file of at most {limit}")
    data = path.read_bytes()
    if entry is not None and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ValueError(f"{where} is damaged: its SHA-256 differs from the manifest's")
    return data


def _json(path: Path, entry: dict | None, where: str) -> dict:
    data = _checked_bytes(path, entry, where, MAX_JSON_BYTES)
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a snapshot") from None
    except ValueError as error:
        raise ValueError(f"{path.parent} is not a complete snapshot: cannot read "
                         f"{path.name} ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} holds a {type(value).__name__}, not a JSON object")
    return value


def _check_version(record: dict, version: int, path: Path) -> None:
    if record.get("format") != FORMAT or record.get("version") != version:
        raise ValueError(f"{path}: not a {FORMAT} version {version} file (format="
                         f"{str(record.get('format'))[:80]!r}, version="
                         f"{str(record.get('version'))[:80]})" + (
                             "; a snapshot of this older layout (before jpaged checked "
                             "snapshots) restores only with the jpaged that wrote it"
                             if record.get("version") in (1, 2) else ""))


def _array_name(name: str) -> str:
    stem = name.removeprefix(f"{ARRAYS_DIR}/").removesuffix(".bin")
    if not name.startswith(f"{ARRAYS_DIR}/") or not name.endswith(".bin") \
            or not _ARRAY.fullmatch(stem):
        raise ValueError(f"the manifest lists {name[:80]!r}, not an array file")
    return stem


def _array(path: Path, entry, where: str) -> np.ndarray:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise ValueError(f"{where}: the manifest gives no known dtype")
    dtype, shape = DTYPES[entry["dtype"]], entry.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"{where}: the manifest's shape {str(shape)[:80]} is not a list of "
                         f"sizes")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if entry.get("bytes") != nbytes:
        raise ValueError(f"{where}: {entry.get('bytes')!r} bytes for {entry['dtype']}{shape}")
    data = _checked_bytes(path, entry, where, nbytes)
    return np.frombuffer(data, dtype).reshape(shape)
