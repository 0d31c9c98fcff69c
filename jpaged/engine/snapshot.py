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
import itertools
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.engine import model_loading
from jpaged.core.cache import KVCache, put_pages
from jpaged.parallel.replicas import Replicas
from jpaged.host.request import Request, Stream
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.sequence import Sequence, SequenceStatus

FORMAT = "jpaged-snapshot"
VERSION = 1
HOST_FILE = "snapshot.json"
ARRAYS_DIR = "arrays"
LEAVES = ("k", "v", "k_scale", "v_scale")
# LLM options a restore may change: where and how the same state runs, not what it is.
# ``dtype``: the params' (a snapshot of dtype=None taken on an accelerator holds bfloat16
# pages; on a CPU pass dtype="bfloat16"); the pool geometry check still applies.
OVERRIDABLE = ("model", "tensor_parallel", "mesh", "attention_impl", "dtype")


# -- JSON of open-typed values ---------------------------------------------------------

def _pack(x):
    """``x`` as JSON: tuples and dicts (any keys) tagged, so ``_unpack`` rebuilds them."""
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    if isinstance(x, tuple):
        return {"tuple": [_pack(i) for i in x]}
    if isinstance(x, list):
        return [_pack(i) for i in x]
    if isinstance(x, dict):
        return {"items": [[_pack(k), _pack(v)] for k, v in x.items()]}
    raise ValueError(f"cannot write a {type(x).__name__} ({x!r}) into a snapshot")


def _unpack(x):
    if isinstance(x, list):
        return [_unpack(i) for i in x]
    if isinstance(x, dict):
        if "tuple" in x:
            return tuple(_unpack(i) for i in x["tuple"])
        return {_unpack(k): _unpack(v) for k, v in x["items"]}
    return x


def _peek(obj, name: str) -> int:
    """The next value of ``obj``'s ``itertools.count`` ``name``, leaving it unchanged."""
    value = next(getattr(obj, name))
    setattr(obj, name, itertools.count(value))
    return value


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
    saved_at = time.perf_counter()
    for r, engine in enumerate(engines):
        state, arrays[f"replica{r}"] = _engine_state(engine, llm.model_config, saved_at)
        host["replicas"].append(state)
    if isinstance(llm.engine, Replicas):
        host["router"] = _replicas_state(llm.engine)
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


def _engine_state(engine, config, saved_at: float) -> tuple[dict, dict]:
    scheduler, bm, runner = engine.scheduler, engine.scheduler.block_manager, engine.runner
    seqs, refs = [], {}

    def ref(seq: Sequence) -> int:
        if id(seq) not in refs:
            refs[id(seq)] = len(seqs)
            seqs.append(seq)
        return refs[id(seq)]

    state = {
        "next_request_id": _peek(engine, "_ids"),
        "rng": _pack(engine.rng.bit_generator.state),
        "num_steps": engine.num_steps, "host_time": engine.host_time,
        "step_time": engine.step_time,
        "requests": [_request_state(r, ref, saved_at) for r in engine.requests.values()],
        "scheduler": {
            "seqs": [ref(s) for s in scheduler.seqs.values()],
            "waiting": [ref(s) for s in scheduler.waiting],   # the heap's list, as it is
            "running": [ref(s) for s in scheduler.running],
            "swapped": [ref(s) for s in scheduler.swapped],
            "requests": [[rid, [ref(s) for s in group]]
                         for rid, group in scheduler.requests.items()],
            "next_arrival": _peek(scheduler, "_arrivals"),
            "next_fork": _peek(scheduler, "_forks"),
            "num_preemptions": scheduler.num_preemptions,
            "table_rows": [[seq_id, row] for seq_id, (row, _) in scheduler._tables.rows.items()],
            "free_rows": list(scheduler._tables.free_rows),
        },
        "block_manager": {
            "ref_counts": list(bm.ref_counts),
            "free_queue": list(bm.free_queue),
            "cache": [[_pack(key), page, key_id] for key, (page, key_id) in bm.cache.items()],
            "next_key_id": _peek(bm, "_key_ids"),
            "host_free": list(bm.host_free),
            "hit_tokens": bm.hit_tokens, "query_tokens": bm.query_tokens,
        },
    }
    state["seqs"] = [_seq_state(s) for s in seqs]
    # The null page always goes along: orbax refuses empty arrays.
    device_pages = [0] + [p for p in range(1, bm.num_pages)
                          if bm.ref_counts[p] > 0 or p in bm.page_keys]
    copies = _kv_copies(runner.cache, config)
    arrays = {"device_pages": np.asarray(device_pages, np.int32),
              "device": _take(runner.cache, device_pages, copies)}
    host_pages = sorted(set(range(bm.num_host_pages)) - set(bm.host_free))
    if host_pages:
        arrays["host_pages"] = np.asarray(host_pages, np.int32)
        arrays["host"] = _take(runner.host.pages, host_pages, copies)
    state["num_device_pages"], state["num_host_pages"] = len(device_pages), len(host_pages)
    return state, arrays


def _take(pool: KVCache, pages: list[int], copies: int) -> dict:
    """``pages`` of every leaf as numpy, one copy of each kv head."""
    index = np.asarray(pages, np.int32)
    return {name: np.asarray(jax.device_get(leaf[:, ::copies][:, :, index]))
            for name, leaf in zip(LEAVES, (pool.k, pool.v, pool.k_scale, pool.v_scale))
            if leaf is not None}


def _seq_state(seq: Sequence) -> dict:
    return {"seq_id": seq.seq_id, "request_id": seq.request_id, "token_ids": seq.token_ids,
            "num_prompt_tokens": seq.num_prompt_tokens, "max_tokens": seq.max_tokens,
            "order": _pack(seq.order), "extra_keys": _pack(seq.extra_keys),
            "num_computed_tokens": seq.num_computed_tokens, "status": seq.status.value,
            "finish_reason": seq.finish_reason, "block_table": seq.block_table,
            "host_table": seq.host_table, "cache_keys": seq.cache_keys}


def _request_state(request: Request, ref, saved_at: float) -> dict:
    metrics = dataclasses.asdict(request.metrics)
    for name in ("arrival_time", "first_token_time", "finished_time"):
        if metrics[name] is not None:   # perf_counter is per process: keep the age
            metrics[name] -= saved_at
    return {
        "request_id": request.request_id, "prompt": request.prompt,
        "prompt_token_ids": request.prompt_token_ids,
        "params": _pack(dataclasses.asdict(request.params)), "seeds": request.seeds,
        "metrics": metrics, "finished": request.finished,
        "streams": [[seq_id, {"index": s.index, "seed": s.seed,
                              "cumulative_logprob": s.cumulative_logprob,
                              "logprobs": _pack(s.logprobs), "text": s.text}]
                    for seq_id, s in request.streams.items()],
        "seqs": [[seq_id, ref(seq)] for seq_id, seq in request.seqs.items()],
        "hypotheses": [[score, ref(seq)] for score, seq in request.hypotheses],
    }


def _replicas_state(replicas: Replicas) -> dict:
    return {"owner": replicas.owner, "next_request_id": _peek(replicas, "_ids"),
            "pages": [list(pages) for pages in replicas.router.pages]}


# -- restoring -------------------------------------------------------------------------

def restore(llm_class, path, **overrides):
    """A new ``llm_class`` (``LLM``) holding the snapshot at ``path``; see
    ``LLM.from_snapshot``."""
    path = Path(path)
    try:
        return _restore(llm_class, path, overrides)
    except (KeyError, IndexError, TypeError) as error:   # valid JSON, not our layout
        raise ValueError(f"{path} is a malformed snapshot ({type(error).__name__}: "
                         f"{error})") from error


def _restore(llm_class, path: Path, overrides: dict):
    host, arrays = _read(path)
    options = _options(host, overrides)
    _check_model(host, options["model"])
    llm = llm_class(**options)
    _check_geometry(host["geometry"], _geometry(llm), "the restored LLM")
    engines = _engines(llm.engine)
    if len(engines) != len(host["replicas"]):
        raise ValueError(f"the snapshot has {len(host['replicas'])} data-parallel replicas, "
                         f"the restored LLM {len(engines)}")
    for r, (engine, state) in enumerate(zip(engines, host["replicas"])):
        _load_engine(engine, state, arrays[f"replica{r}"], llm.model_config)
    if isinstance(llm.engine, Replicas):
        router = host["router"]
        llm.engine.owner = {rid: int(r) for rid, r in router["owner"].items()}
        llm.engine._ids = itertools.count(router["next_request_id"])
        for pages, keys in zip(llm.engine.router.pages, router["pages"]):
            pages.update(dict.fromkeys(keys))
    return llm


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


def _check_model(host: dict, model) -> None:
    """Refuse a model whose config differs from the snapshot's, naming the fields."""
    config = _config_dict(model_loading.model_config(model))
    saved = host["config"]
    differ = sorted(k for k in set(config) | set(saved) if config.get(k) != saved.get(k))
    if differ:
        raise ValueError("the model differs from the snapshot's: " + ", ".join(
            f"{k}={_unpack(config.get(k))!r} (snapshot: {_unpack(saved.get(k))!r})"
            for k in differ))


def _check_geometry(saved: dict, now: dict, what: str) -> None:
    differ = [k for k in saved if saved[k] != now.get(k)]
    if differ:
        raise ValueError(f"the snapshot's pool geometry differs from {what}'s: " + ", ".join(
            f"{k}={now.get(k)!r} (snapshot: {saved[k]!r})" for k in differ))


def _load_engine(engine, state: dict, arrays: dict, config) -> None:
    """Fill a fresh engine (same options) with a saved engine's state and pages."""
    scheduler, bm, runner = engine.scheduler, engine.scheduler.block_manager, engine.runner
    seqs = [_seq(s) for s in state["seqs"]]
    now = time.perf_counter()
    engine.requests = {r["request_id"]: _request(r, seqs, now) for r in state["requests"]}
    engine._ids = itertools.count(state["next_request_id"])
    engine.rng.bit_generator.state = _unpack(state["rng"])
    engine.num_steps, engine.host_time = state["num_steps"], state["host_time"]
    engine.step_time = state["step_time"]

    s = state["scheduler"]
    scheduler.seqs = {seqs[i].seq_id: seqs[i] for i in s["seqs"]}
    scheduler.waiting = [seqs[i] for i in s["waiting"]]
    scheduler.running = [seqs[i] for i in s["running"]]
    scheduler.swapped = [seqs[i] for i in s["swapped"]]
    scheduler.requests = {rid: [seqs[i] for i in group] for rid, group in s["requests"]}
    scheduler._arrivals = itertools.count(s["next_arrival"])
    scheduler._forks = itertools.count(s["next_fork"])
    scheduler.num_preemptions = s["num_preemptions"]
    tables = scheduler._tables
    tables.free_rows = list(s["free_rows"])
    # Each row is copied whole on its next use (as after a copy-on-write).
    tables.rows = {seq_id: [row, 0] for seq_id, row in s["table_rows"]}
    tables.array[:] = 0

    b = state["block_manager"]
    bm.ref_counts = list(b["ref_counts"])
    bm.set_free_queue(b["free_queue"])
    bm.cache, bm.page_keys = {}, {}
    for key, page, key_id in b["cache"]:
        key = _unpack(key)
        bm.cache[key] = (page, key_id)
        bm.page_keys[page] = key
    bm._key_ids = itertools.count(b["next_key_id"])
    bm.host_free = list(b["host_free"])
    bm.hit_tokens, bm.query_tokens = b["hit_tokens"], b["query_tokens"]

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


def _seq(state: dict) -> Sequence:
    seq = Sequence(state["seq_id"], state["token_ids"], state["max_tokens"],
                   request_id=state["request_id"], order=_unpack(state["order"]),
                   extra_keys=_unpack(state["extra_keys"]))
    seq.num_prompt_tokens = state["num_prompt_tokens"]
    seq.num_computed_tokens = state["num_computed_tokens"]
    seq.status = SequenceStatus(state["status"])
    seq.finish_reason = state["finish_reason"]
    seq.block_table = list(state["block_table"])
    seq.host_table = list(state["host_table"])
    seq.cache_keys = list(state["cache_keys"])
    return seq


def _request(state: dict, seqs: list[Sequence], now: float) -> Request:
    request = Request(state["request_id"], state["prompt"], state["prompt_token_ids"],
                      SamplingParams(**_unpack(state["params"])), state["seeds"], now)
    for name, value in state["metrics"].items():
        if name in ("arrival_time", "first_token_time", "finished_time") and value is not None:
            value += now
        setattr(request.metrics, name, value)
    request.finished = state["finished"]
    for seq_id, s in state["streams"]:
        request.streams[seq_id] = Stream(s["index"], s["seed"], s["cumulative_logprob"],
                                         _unpack(s["logprobs"]), s["text"])
    request.seqs = {seq_id: seqs[i] for seq_id, i in state["seqs"]}
    request.hypotheses = [(score, seqs[i]) for score, i in state["hypotheses"]]
    return request
