"""Engine snapshots: everything an ``LLM`` holds between two steps, written to a directory
and restored in another process, also on another tensor-parallel size.

A snapshot directory holds:

- ``snapshot.json``: the host state, plain JSON: the format version, the ``LLM`` options
  and model spec, the model config and the pool geometry (checked on restore), then per
  replica the engine (request-id counter, its ``numpy`` RNG state, step counters), every
  request (tokens, ``SamplingParams``, seeds, streams with logprobs, beam hypotheses,
  metrics), every sequence once (tokens, computed count, status, order, block and host
  tables, prefix-cache key ids), the scheduler's queues, order counters and table rows,
  and the block manager (ref counts, the free queue in order, prefix-cache entries with
  their key ids, the key counter, the host pool's free list).
  JSON rather than pickle: a snapshot names no Python class, so it survives the engine's
  modules moving, and reading one never runs code. Values of open type (tuples in cache
  keys, ``extra_keys``, dicts keyed by token id) go through ``_pack``.
- ``arrays/``: an orbax checkpoint of the pages in use only: device pages with a ref
  count or a prefix-cache entry, host (swap) pages not free, K and V and the scales of
  an 8-bit pool, with the model's own kv heads (tensor parallelism's replicated kv heads
  dropped on save and repeated on restore, so the pool reshards to any size).

``snapshot.json`` is written last, into a temporary directory beside the target that is
renamed into place: a crash mid-save leaves the previous snapshot whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.engine import model_loading
from jpaged.engine.config import EngineConfig
from jpaged.core.cache import KVCache, put_pages
from jpaged.parallel.replicas import Replicas
from jpaged.host.sequence import Sequence

FORMAT = "jpaged-snapshot"
# 2: the classes' own ``state_dict``s (``jpaged.host``, ``LLMEngine``, ``Replicas``).
VERSION = 2
HOST_FILE = "snapshot.json"
ARRAYS_DIR = "arrays"
LEAVES = ("k", "v", "k_scale", "v_scale")
# LLM options a restore may change: where and how the same state runs, not what it is.
# ``dtype``: the params' (a snapshot of dtype=None taken on an accelerator holds bfloat16
# pages; on a CPU pass dtype="bfloat16"); the pool geometry check still applies.
OVERRIDABLE = ("model", "tensor_parallel", "mesh", "attention_impl", "dtype")


# -- JSON of the classes' states -------------------------------------------------------

class _Sequences:
    """Writing: each ``Sequence`` met in a state once, in order; ``ref`` its index."""

    def __init__(self):
        self.seqs, self.index = [], {}

    def ref(self, seq: Sequence) -> int:
        if id(seq) not in self.index:
            self.index[id(seq)] = len(self.seqs)
            self.seqs.append(seq)
        return self.index[id(seq)]


def _pack(x, seqs: _Sequences | None = None):
    """``x`` (a ``state_dict``'s plain values) as JSON: tuples and dicts with other than
    string keys tagged, sequences as references into ``seqs``; ``_unpack`` rebuilds it."""
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    if isinstance(x, Sequence) and seqs is not None:
        return {"__seq__": seqs.ref(x)}
    if isinstance(x, tuple):
        return {"__tuple__": [_pack(i, seqs) for i in x]}
    if isinstance(x, list):
        return [_pack(i, seqs) for i in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: _pack(v, seqs) for k, v in x.items()}
        return {"__items__": [[_pack(k, seqs), _pack(v, seqs)] for k, v in x.items()]}
    raise ValueError(f"cannot write a {type(x).__name__} ({x!r}) into a snapshot")


def _unpack(x, seqs: list | None = None):
    """The value ``_pack`` wrote, sequence references resolved in ``seqs``."""
    if isinstance(x, list):
        return [_unpack(i, seqs) for i in x]
    if not isinstance(x, dict):
        return x
    tags = [k for k in x if k.startswith("__")]
    if not tags:
        return {k: _unpack(v, seqs) for k, v in x.items()}
    if len(x) != 1 or tags[0] not in ("__tuple__", "__items__", "__seq__"):
        raise ValueError(f"unknown tag(s) {tags} in the snapshot")
    value = x[tags[0]]
    if tags[0] == "__seq__":
        if seqs is None or isinstance(value, bool) or not isinstance(value, int) \
                or not 0 <= value < len(seqs):
            raise ValueError(f"sequence reference {value!r} is outside the snapshot's "
                             f"{len(seqs or ())} sequences")
        return seqs[value]
    if not isinstance(value, list):
        raise ValueError(f"{tags[0]} holds a {type(value).__name__}, not a list")
    if tags[0] == "__tuple__":
        return tuple(_unpack(i, seqs) for i in value)
    return {_unpack(k, seqs): _unpack(v, seqs) for k, v in value}


# -- saving ----------------------------------------------------------------------------

def save(llm, path, overwrite: bool = False) -> None:
    """Write ``llm``'s whole state to the directory ``path`` (see the module docstring)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
    engines = _engines(llm.engine)
    host = {"format": FORMAT, "version": VERSION, "model": llm._spec,
            "options": llm.config.to_dict(), "config": _config_dict(llm.model_config),
            "geometry": _geometry(llm), "replicas": [], "router": None}
    arrays = {}
    for r, engine in enumerate(engines):
        state, arrays[f"replica{r}"] = _engine_state(engine, llm.model_config)
        host["replicas"].append(state)
    if isinstance(llm.engine, Replicas):
        host["router"] = _pack(llm.engine.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, host, arrays)
        _replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(directory: Path, host: dict, arrays: dict) -> None:
    import orbax.checkpoint as ocp

    directory.mkdir()
    ocp.PyTreeCheckpointer().save((directory / ARRAYS_DIR).absolute(), arrays)
    # Last, and on disk before the rename: a directory without it is an unfinished save.
    with open(directory / HOST_FILE, "w") as f:
        f.write(json.dumps(host))
        f.flush()
        os.fsync(f.fileno())


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an old ``path`` is moved aside first and removed only
    once the new one is in place."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        if old is not None:
            old.rename(path)
        raise
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


def _engines(engine) -> list:
    return engine.engines if isinstance(engine, Replicas) else [engine]


def _config_dict(config) -> dict:
    if dataclasses.is_dataclass(config):
        return {k: _pack(v) for k, v in dataclasses.asdict(config).items()}
    return {name: getattr(config, name) for name in
            ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings")}


def _geometry(llm) -> dict:
    config, info = llm.model_config, llm.kv_cache_info()
    return dict(page_size=info["page_size"], num_layers=config.num_layers,
                num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                kv_cache_dtype=info["kv_cache_dtype"], num_pages=info["num_pages"],
                num_host_pages=llm.config.num_host_pages)


def _kv_copies(cache: KVCache, config) -> int:
    """How many times tensor parallelism repeats each kv head in ``cache``."""
    return cache.k.shape[1] // config.num_kv_heads


def _engine_state(engine, config) -> tuple[dict, dict]:
    """One engine's ``state_dict`` as JSON (each sequence once, under ``sequences``) and
    its pages in use as numpy arrays."""
    bm, runner, seqs = engine.scheduler.block_manager, engine.runner, _Sequences()
    state = _pack(engine.state_dict(), seqs)
    state["sequences"] = [_pack(seq.state_dict()) for seq in seqs.seqs]
    # The null page always goes along: orbax refuses empty arrays.
    device_pages, host_pages = _pages_in_use(bm)
    copies = _kv_copies(runner.cache, config)
    arrays = {"device_pages": np.asarray(device_pages, np.int32),
              "device": _take(runner.cache, device_pages, copies)}
    if host_pages:
        arrays["host_pages"] = np.asarray(host_pages, np.int32)
        arrays["host"] = _take(runner.host.pages, host_pages, copies)
    state["num_device_pages"], state["num_host_pages"] = len(device_pages), len(host_pages)
    return state, arrays


def _pages_in_use(bm) -> tuple[list[int], list[int]]:
    """The device pages a snapshot carries (the null page, pages with a ref count or a
    prefix-cache entry) and the host pages (those not free)."""
    device = [0] + [p for p in range(1, bm.num_pages) if bm.ref_counts[p] > 0 or p in bm.page_keys]
    return device, sorted(set(range(bm.num_host_pages)) - set(bm.host_free))


def _take(pool: KVCache, pages: list[int], copies: int) -> dict:
    """``pages`` of every leaf as numpy, one copy of each kv head."""
    index = np.asarray(pages, np.int32)
    return {name: np.asarray(jax.device_get(leaf[:, ::copies][:, :, index]))
            for name, leaf in zip(LEAVES, (pool.k, pool.v, pool.k_scale, pool.v_scale))
            if leaf is not None}


# -- restoring -------------------------------------------------------------------------

def restore(llm_class, path, **overrides):
    """A new ``llm_class`` (``LLM``) holding the snapshot at ``path``; see
    ``LLM.from_snapshot``."""
    path = Path(path)
    try:
        return _restore(llm_class, path, overrides)
    except (KeyError, IndexError, TypeError, AttributeError, RecursionError) as error:
        # Valid JSON, not our layout (or nested past Python's stack).
        raise ValueError(f"{path} is a malformed snapshot ({type(error).__name__}: "
                         f"{str(error)[:200]})") from None


def _restore(llm_class, path: Path, overrides: dict):
    from jpaged.engine.engine import check_state, make_scheduler   # engine imports this module

    host, arrays = _read(path)
    options = _options(host, overrides)
    vocab_size = _check_model(host, options["model"])
    # The whole host state, checked on host-only schedulers before any pool exists.
    config = EngineConfig.from_options(**{k: v for k, v in options.items()
                                          if k not in ("model", "mesh")})
    replicas = host["replicas"]
    if not isinstance(replicas, list) or (
            "mesh" not in options and len(replicas) != (config.data_parallel or 1)):
        raise ValueError(f"the snapshot holds {len(replicas)} replicas, its options "
                         f"data_parallel={config.data_parallel}")
    for r, state in enumerate(replicas):
        scheduler = make_scheduler(config)
        check_state(_engine_from(state), scheduler, vocab_size)
        _check_pages(scheduler.block_manager, state, arrays[f"replica{r}"], f"replica {r}")
    llm = llm_class(**options)
    _check_geometry(host["geometry"], _geometry(llm), "the restored LLM")
    engines = _engines(llm.engine)
    if len(engines) != len(replicas):
        raise ValueError(f"the snapshot has {len(replicas)} data-parallel replicas, "
                         f"the restored LLM {len(engines)}")
    for r, (engine, state) in enumerate(zip(engines, replicas)):
        engine.load_state_dict(_engine_from(state))
        _load_pages(engine, state, arrays[f"replica{r}"], llm.model_config)
    if isinstance(llm.engine, Replicas):
        llm.engine.load_state_dict(_unpack(host["router"]))
    return llm


def _engine_from(state: dict) -> dict:
    """An engine's ``state_dict`` from its JSON, with sequences made anew."""
    seqs = [Sequence.from_state(_unpack(s)) for s in state["sequences"]]
    return _unpack({k: v for k, v in state.items() if k != "sequences"}, seqs)


def _check_pages(bm, state: dict, arrays: dict, where: str) -> None:
    """The snapshot's page arrays hold exactly the pages its state uses."""
    device, host = _pages_in_use(bm)
    saved_device = np.asarray(arrays.get("device_pages", ())).tolist()
    saved_host = np.asarray(arrays.get("host_pages", ())).tolist()
    if saved_device != device or saved_host != host:
        raise ValueError(f"{where}: the page arrays hold device pages {saved_device[:10]}... "
                         f"and host pages {saved_host[:10]}..., the state uses "
                         f"{device[:10]}... and {host[:10]}...")


def _read(path: Path) -> tuple[dict, dict]:
    """The host state and the arrays of a snapshot, checked for completeness."""
    import orbax.checkpoint as ocp

    if not path.is_dir():
        raise ValueError(f"{path} is not a snapshot directory")
    try:
        host = json.loads((path / HOST_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a complete snapshot: cannot read {HOST_FILE} "
                         f"({error})") from None
    if host.get("format") != FORMAT or host.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} file (format="
                         f"{host.get('format')!r}, version={host.get('version')!r})")
    try:
        arrays = ocp.PyTreeCheckpointer().restore((path / ARRAYS_DIR).absolute())
    except Exception as error:   # orbax raises many types for a damaged checkpoint
        raise ValueError(f"{path} is truncated or damaged: its page arrays do not restore "
                         f"({type(error).__name__}: {error})") from None
    geometry = host["geometry"]
    for r, state in enumerate(host["replicas"]):
        _check_arrays(arrays.get(f"replica{r}"), state, geometry, f"{path} replica {r}")
    return host, arrays


def _check_arrays(arrays, state: dict, geometry: dict, where: str) -> None:
    if arrays is None:
        raise ValueError(f"{where}: no page arrays in the snapshot (truncated)")
    for kind, count in (("device", state["num_device_pages"]),
                        ("host", state["num_host_pages"])):
        if not count:
            continue
        leaves = arrays.get(kind, {})
        expected = (geometry["num_layers"], geometry["num_kv_heads"], count,
                    geometry["page_size"], geometry["head_dim"])
        k = leaves.get("k")
        if k is None or "v" not in leaves or len(arrays.get(f"{kind}_pages", ())) != count:
            raise ValueError(f"{where}: {kind} pages missing from the arrays (truncated)")
        if tuple(k.shape) != expected or k.dtype.name != geometry["kv_cache_dtype"]:
            raise ValueError(f"{where}: {kind} pages are {k.dtype.name}{list(k.shape)}, the "
                             f"recorded geometry says {geometry['kv_cache_dtype']}"
                             f"{list(expected)}")


def _options(host: dict, overrides: dict) -> dict:
    """The LLM options of the snapshot, with the overrides a restore may change."""
    options = dict(host["options"], model=host["model"])
    for name, value in overrides.items():
        if name not in options and name != "mesh":
            raise ValueError(f"unknown LLM option {name}={value!r}")
        if name not in OVERRIDABLE and value != options[name]:
            raise ValueError(f"{name}={value!r} differs from the snapshot's {name}="
                             f"{options[name]!r}; only {', '.join(OVERRIDABLE)} may change on "
                             f"restore")
        options[name] = value
    if "mesh" in overrides:
        options.pop("tensor_parallel"), options.pop("data_parallel")
    if options["model"] is None:
        raise ValueError(f"the snapshot's model was a bundle, not a name: pass model= "
                         f"(config {host['config']})")
    return options


def _check_model(host: dict, model) -> int:
    """Refuse a model whose config differs from the snapshot's, naming the fields; returns
    its vocabulary size."""
    model_config = model_loading.model_config(model)
    config = _config_dict(model_config)
    saved = host["config"]
    differ = sorted(k for k in set(config) | set(saved) if config.get(k) != saved.get(k))
    if differ:
        raise ValueError("the model differs from the snapshot's: " + ", ".join(
            f"{k}={_unpack(config.get(k))!r} (snapshot: {_unpack(saved.get(k))!r})"
            for k in differ))
    return model_config.vocab_size


def _check_geometry(saved: dict, now: dict, what: str) -> None:
    differ = [k for k in saved if saved[k] != now.get(k)]
    if differ:
        raise ValueError(f"the snapshot's pool geometry differs from {what}'s: " + ", ".join(
            f"{k}={now.get(k)!r} (snapshot: {saved[k]!r})" for k in differ))


def _load_pages(engine, state: dict, arrays: dict, config) -> None:
    """Put a saved engine's pages into a fresh engine's pools."""
    runner = engine.runner
    copies = _kv_copies(runner.cache, config)
    put = jax.jit(put_pages, donate_argnums=(0,))
    runner.cache = put(runner.cache, jnp.asarray(arrays["device_pages"]),
                       _pool(arrays["device"], copies))
    if state["num_host_pages"]:
        pages = np.asarray(arrays["host_pages"])
        for pool, new in zip(jax.tree.leaves(runner.host.pages),
                             jax.tree.leaves(_pool(arrays["host"], copies))):
            pool[:, :, pages] = new


def _pool(leaves: dict, copies: int) -> KVCache:
    """Saved leaves as a KVCache with each kv head repeated ``copies`` times."""
    return KVCache(**{name: np.repeat(np.asarray(leaves[name]), copies, axis=1)
                      if name in leaves else None for name in LEAVES})
