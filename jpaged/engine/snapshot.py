"""Engine snapshots: everything an ``LLM`` holds between two steps, written to a directory
and restored in another process, also on another tensor-parallel size; verified whole
before anything is allocated.

The state is the classes' own: ``LLMEngine.state_dict`` (its requests, RNG and counters,
and the scheduler's, holding the block manager's), ``Replicas.state_dict`` for data
parallelism. This module keeps the format, the arrays and the checks; the files and their
checksums are ``jpaged.engine.snapshot_files``'s (a manifest with the SHA-256 of every
file, committed atomically: a snapshot directory always holds one complete snapshot).

- ``snapshot.json``: the host state, plain JSON: the format version, the ``LLM`` options,
  the model spec and its fingerprint (``model_loading.fingerprint``), the model config
  and the pool geometry, then per replica the engine's state, each sequence once under
  ``sequences`` (the requests and the scheduler refer to them by index). JSON rather
  than pickle: a snapshot names no Python class, so it survives the engine's modules
  moving, and reading one never runs code. Values of open type (tuples in cache keys,
  ``extra_keys``, dicts keyed by token id, sequences) are tagged by ``_pack``.
- ``arrays/``: the pages in use only (device pages with a ref count or a prefix-cache
  entry, host pages not free), K and V and the scales of an 8-bit pool, with the model's
  own kv heads (tensor parallelism's replicated kv heads dropped on save and repeated on
  restore, so the pool reshards to any size).

A restore checks, in this order, before allocating any pool: every file's checksum, the
format version, the options against the geometry and a memory bound, the model's config
and fingerprint, the whole host state of every replica on host-only schedulers
(``jpaged.engine.host_state.check_state``) and the page arrays against the pages that state
uses. A ValueError names the first problem.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.engine import model_loading, snapshot_files
from jpaged.engine.host_state import check_state, make_scheduler
from jpaged.engine.config import EngineConfig
from jpaged.core.cache import SCALE_DTYPE, KVCache, is_quantized, put_pages
from jpaged.parallel.replicas import Replicas
from jpaged.host.sequence import Sequence

FORMAT = snapshot_files.FORMAT
# 2: the classes' own ``state_dict``s (``jpaged.host``, ``LLMEngine``, ``Replicas``).
# 3: a manifest of checksums committed atomically, raw array files, the model's fingerprint.
VERSION = 3
HOST_FILE = snapshot_files.HOST_FILE
LEAVES = ("k", "v", "k_scale", "v_scale")
# LLM options a restore may change: where and how the same state runs, not what it is.
# ``dtype``: the params' (a snapshot of dtype=None taken on an accelerator holds bfloat16
# pages; on a CPU pass dtype="bfloat16"); the pool geometry check still applies.
OVERRIDABLE = ("model", "tensor_parallel", "mesh", "attention_impl", "dtype",
               "async_scheduling")


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
        if not any(isinstance(i, (list, dict)) for i in x):   # token ids: no recursion
            return list(x)
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
        return tuple(_unpack(value, seqs))
    return {_unpack(k, seqs): _unpack(v, seqs) for k, v in value}


# -- saving ----------------------------------------------------------------------------

def save(llm, path, overwrite: bool = False) -> None:
    """Write ``llm``'s whole state to the directory ``path`` (see the module docstring)."""
    path = Path(path)
    if path.exists() and not overwrite:   # before the device-to-host copies
        raise ValueError(f"{path} already exists; pass overwrite=True to replace it")
    engines = _engines(llm.engine)
    host = {"format": FORMAT, "version": VERSION, "model": llm._spec,
            "fingerprint": None if llm._spec is None else model_loading.fingerprint(llm._spec),
            "options": llm.config.to_dict(), "config": _config_dict(llm.model_config),
            "geometry": _geometry(llm), "replicas": [], "router": None}
    arrays = {}
    for r, engine in enumerate(engines):
        state, pools = _engine_state(engine, llm.model_config)
        host["replicas"].append(state)
        arrays.update({f"replica{r}.{kind}.{leaf}": array for kind, leaves in pools.items()
                       for leaf, array in leaves.items()})
    if isinstance(llm.engine, Replicas):
        host["router"] = _pack(llm.engine.state_dict())
    snapshot_files.write(path, VERSION, host, arrays, overwrite)


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
    """One engine's ``state_dict`` as JSON (each sequence once, under ``sequences``; the
    pages it saves under ``device_pages`` and ``host_pages``) and those pages as numpy
    arrays, ``{"device": {leaf: array}, "host": ...}``."""
    bm, runner, seqs = engine.scheduler.block_manager, engine.runner, _Sequences()
    state = _pack(engine.state_dict(), seqs)
    state["sequences"] = [_pack(seq.state_dict()) for seq in seqs.seqs]
    state["device_pages"], state["host_pages"] = _pages_in_use(bm)
    copies = _kv_copies(runner.cache, config)
    arrays = {"device": _take(runner.cache, state["device_pages"], copies)}
    if state["host_pages"]:
        arrays["host"] = _take(runner.host.pages, state["host_pages"], copies)
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

def restore(llm_class, path, max_pool_bytes: int | None = None, **overrides):
    """A new ``llm_class`` (``LLM``) holding the snapshot at ``path``; see
    ``LLM.from_snapshot``."""
    path = Path(path)
    try:
        return _restore(llm_class, path, max_pool_bytes, overrides)
    except (KeyError, IndexError, TypeError, AttributeError, RecursionError) as error:
        # Valid JSON, not our layout (or nested past Python's stack).
        raise ValueError(f"{path} is a malformed snapshot ({type(error).__name__}: "
                         f"{str(error)[:200]})") from None


def _restore(llm_class, path: Path, max_pool_bytes: int | None, overrides: dict):

    host, arrays = snapshot_files.read(path, VERSION)
    options = _options(host, overrides)
    config = EngineConfig.from_options(**{k: v for k, v in options.items()
                                          if k not in ("model", "mesh")})
    replicas = host["replicas"]
    if not isinstance(replicas, list) or not replicas or (
            "mesh" not in options and len(replicas) != (config.data_parallel or 1)):
        raise ValueError(f"the snapshot holds {str(replicas)[:40]} replicas, its options "
                         f"data_parallel={config.data_parallel}")
    _check_sizes(host, config, replicas, max_pool_bytes)
    vocab_size = _check_model(host, options["model"])
    # The whole host state, checked on host-only schedulers before any pool exists.
    for r, state in enumerate(replicas):
        scheduler = make_scheduler(config)
        check_state(_engine_from(state), scheduler, vocab_size)
        _check_arrays(scheduler.block_manager, state, arrays, host["geometry"], f"replica{r}")
    llm = llm_class(**options)
    _check_geometry(host["geometry"], _geometry(llm), "the restored LLM")
    engines = _engines(llm.engine)
    if len(engines) != len(replicas):
        raise ValueError(f"the snapshot has {len(replicas)} data-parallel replicas, "
                         f"the restored LLM {len(engines)}")
    for r, (engine, state) in enumerate(zip(engines, replicas)):
        engine.load_state_dict(_engine_from(state))
        _load_pages(engine, state, arrays, f"replica{r}", llm.model_config)
    if isinstance(llm.engine, Replicas):
        llm.engine.load_state_dict(_unpack(host["router"]))
    return llm


def _engine_from(state: dict) -> dict:
    """An engine's ``state_dict`` from its JSON, with sequences made anew."""
    seqs = [Sequence.from_state(_unpack(s)) for s in state["sequences"]]
    return _unpack({k: v for k, v in state.items()
                    if k not in ("sequences", "device_pages", "host_pages")}, seqs)


def _check_sizes(host: dict, config: EngineConfig, replicas: list,
                 max_pool_bytes: int | None) -> None:
    """Before anything is allocated: the options the pool is built from equal the recorded
    geometry and the saved block managers' sizes, and the pools fit in ``max_pool_bytes``
    (default: the memory of this machine's devices, or of the host where a device reports
    none), device and swap pools of every replica together."""
    geometry = host["geometry"]
    for name in ("page_size", "num_pages", "num_host_pages"):
        if getattr(config, name) != geometry[name]:
            raise ValueError(f"options {name}={getattr(config, name)!r} differ from the "
                             f"snapshot's pool geometry {name}={geometry[name]!r}")
    for r, state in enumerate(replicas):
        saved = len(state["scheduler"]["block_manager"]["ref_counts"])
        if saved != config.num_pages:
            raise ValueError(f"replica {r}'s block manager has {saved} pages, the options "
                             f"num_pages={config.num_pages}")
    page_bytes = KVCache.bytes_per_page(geometry["num_layers"], geometry["num_kv_heads"],
                                        geometry["head_dim"], geometry["page_size"],
                                        jnp.dtype(geometry["kv_cache_dtype"]))
    need = page_bytes * (config.num_pages + config.num_host_pages) * len(replicas)
    limit = _memory() if max_pool_bytes is None else max_pool_bytes
    if need > limit:
        raise ValueError(f"the snapshot's pools (num_pages={config.num_pages}, "
                         f"num_host_pages={config.num_host_pages}, {len(replicas)} replicas) "
                         f"need {need} bytes, more than max_pool_bytes={limit}")


def _memory() -> int:
    """The devices' memory, summed, or the host's physical memory where they report none."""
    stats = [d.memory_stats() or {} for d in jax.devices()]
    if all("bytes_limit" in s for s in stats):
        return sum(s["bytes_limit"] for s in stats) + _host_memory()
    return _host_memory()


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_arrays(bm, state: dict, arrays: dict, geometry: dict, replica: str) -> None:
    """The page arrays of ``replica`` hold exactly the pages its state uses (``bm``, that
    state loaded), with the recorded geometry."""
    device, host = _pages_in_use(bm)
    if state["device_pages"] != device or state["host_pages"] != host:
        raise ValueError(f"{replica}: the snapshot saves device pages "
                         f"{str(state['device_pages'])[:60]} and host pages "
                         f"{str(state['host_pages'])[:60]}, its state uses "
                         f"{str(device)[:60]} and {str(host)[:60]}")
    for kind, pages in (("device", device), ("host", host)):
        names = {f"{replica}.{kind}.{leaf}" for leaf in LEAVES} & set(arrays)
        if not pages:
            continue
        quantized = is_quantized(jnp.dtype(geometry["kv_cache_dtype"]))
        want = {f"{replica}.{kind}.{leaf}" for leaf in (LEAVES if quantized else LEAVES[:2])}
        if names != want:
            raise ValueError(f"{replica}: {kind} page arrays {sorted(names)}, expected "
                             f"{sorted(want)} (truncated)")
        shape = [geometry["num_layers"], geometry["num_kv_heads"], len(pages),
                 geometry["page_size"], geometry["head_dim"]]
        for name in sorted(names):
            array, dtype = arrays[name], geometry["kv_cache_dtype"]
            want_shape = shape if name.endswith((".k", ".v")) else shape[:-1]
            if name.endswith("_scale"):
                dtype = SCALE_DTYPE.name
            if list(array.shape) != want_shape or array.dtype.name != dtype:
                raise ValueError(f"{replica}: {name} is {array.dtype.name}{list(array.shape)}, "
                                 f"the recorded geometry says {dtype}{want_shape}")


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
    """Refuse a model whose fingerprint (a name or directory: ``model_loading.fingerprint``,
    before reading anything of it) or config differs from the snapshot's, naming what
    differs; returns its vocabulary size."""
    if isinstance(model, str) and host["fingerprint"] is not None:
        if model_loading.fingerprint(model) != host["fingerprint"]:
            raise ValueError(f"model {model!r} is not the one the snapshot was taken with: "
                             f"its files' fingerprint differs")
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


def _load_pages(engine, state: dict, arrays: dict, replica: str, config) -> None:
    """Put a saved engine's pages into a fresh engine's pools."""
    runner = engine.runner
    copies = _kv_copies(runner.cache, config)
    put = jax.jit(put_pages, donate_argnums=(0,))
    runner.cache = put(runner.cache, jnp.asarray(state["device_pages"], jnp.int32),
                       _pool(arrays, f"{replica}.device", copies))
    if state["host_pages"]:
        pages = np.asarray(state["host_pages"])
        for pool, new in zip(jax.tree.leaves(runner.host.pages),
                             jax.tree.leaves(_pool(arrays, f"{replica}.host", copies))):
            pool[:, :, pages] = new


def _pool(arrays: dict, prefix: str, copies: int) -> KVCache:
    """The saved leaves ``prefix.k`` ... as a KVCache, each kv head repeated ``copies``
    times."""
    leaves = {name: arrays.get(f"{prefix}.{name}") for name in LEAVES}
    return KVCache(**{name: leaf if leaf is None or copies == 1 else
                      np.repeat(leaf, copies, axis=1) for name, leaf in leaves.items()})
