"""Tensor and data parallelism: a sharded engine gives the single-device engine's tokens.

Multi-device checks need 8 fake CPU devices, and XLA_FLAGS must be set before JAX starts
(this process already runs JAX on one device), so they run in a subprocess:
``python tests/test_parallel.py CASE...`` runs the cases and prints their results as one
JSON line, which the tests below assert on. Routing and bad inputs run here.
"""

import functools
import json
import operator
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from hf_checkpoint import hf_tensors, write_checkpoint
from jpaged.engine.batch import StepBatch
from jpaged.core.cache import PageTable
from jpaged.engine.engine import LLM
from jpaged.core.interfaces import ModelBundle
from jpaged.parallel.replicas import MAX_IMBALANCE, Replicas, Router
from jpaged.engine.runner import _step as runner_step
from jpaged.engine.sampler import SamplingTensors
from jpaged.host.sampling_params import SamplingParams
from jpaged.models import Model, init_params, tiny_config

DEVICES = 8
SMALL = dict(num_layers=2, max_position_embeddings=128)
# One prefill bucket and one decode bucket for the prompts below: two compilations.
ENGINE = dict(page_size=8, num_pages=32, max_num_seqs=8, max_num_batched_tokens=64)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
TOLERANCE = 1e-5
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def run_cases(*cases) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, *cases], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- in the subprocess ---------------------------------------------------------------

def tiny_model(**overrides) -> Model:
    config = tiny_config(**{**SMALL, **overrides})
    return Model(config, init_params(config, jax.random.key(0)))


def prompts(vocab: int, lengths=(5, 12, 9, 3), seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def generate(llm, batch):
    """Greedy tokens and top logprobs (log-softmax of the logits) of every step."""
    outputs = llm.generate(batch, GREEDY)
    return ([o.token_ids for o in outputs],
            [[sorted((t, lp.logprob) for t, lp in step.items()) for step in o.outputs[0].logprobs]
             for o in outputs])


def compare(reference, llm, batch) -> dict:
    (ref_tokens, ref_top), (tokens, top) = generate(reference, batch), generate(llm, batch)
    pairs = [(a, b) for seq_a, seq_b in zip(ref_top, top) for a, b in zip(seq_a, seq_b)]
    return dict(tokens_equal=tokens == ref_tokens, tokens=tokens,
                same_top_ids=all([i for i, _ in a] == [i for i, _ in b] for a, b in pairs),
                max_logprob_error=max(abs(x[1] - y[1]) for a, b in pairs for x, y in zip(a, b)))


def pool_report(runner, reference_runner=None, copies=1) -> dict:
    """Sharding of the KV pool, and (same requests, same pages) its values against the
    single-device pool, each kv head repeated ``copies`` times."""
    k = runner.cache.k
    shards = sorted(k.addressable_shards, key=lambda s: s.device.id)
    report = dict(spec=list(k.sharding.spec), shape=list(k.shape),
                  devices=[s.device.id for s in shards],
                  shard_shapes=[list(s.data.shape) for s in shards],
                  shard_heads=[[s.index[1].start, s.index[1].stop] for s in shards])
    if reference_runner is not None:
        expected = np.repeat(np.asarray(reference_runner.cache.k), copies, axis=1)
        report["max_error"] = float(max(np.abs(np.asarray(s.data) - expected[s.index]).max()
                                        for s in shards))
    return report


def param_shards(params, path) -> list:
    x = functools.reduce(operator.getitem, path.split("/"), params)
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


def decode_hlo(llm, batch=8, width=4) -> str:
    """The compiled text of the engine's decode step (a padded batch of ``batch`` rows)."""
    model, cache = llm.engine.runner.model, llm.engine.runner.cache
    zeros = np.zeros(batch, np.int32)
    tensors = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * batch,
                                          [0] * batch, [0] * batch)
    step_batch = StepBatch(token_ids=zeros, positions=zeros, slot_mapping=zeros,
                           q_seq=np.arange(batch, dtype=np.int32),
                           block_tables=np.zeros((batch, width), np.int32), context_lens=zeros,
                           logits_indices=zeros, sampling=tensors, is_decode=True, num_top=0)
    return runner_step.lower(model.forward, model.config, "auto", model.params, cache,
                             step_batch).compile().as_text()


def collectives(hlo: str) -> dict:
    """Collective ops per HLO computation, and the trip count of each while loop's body."""
    per_computation, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%(\S+) \(.*\{$", line)
        if header:
            name = header.group(1)
        for op in COLLECTIVES:
            count = len(re.findall(rf"\s{op}(?:-start)?\(", line))
            if count:
                ops = per_computation.setdefault(name, {})
                ops[op] = ops.get(op, 0) + count
    loops = {body: int(n) for body, n in
             re.findall(r'body=%([\w.\-]+).*?"known_trip_count":\{"n":"(\d+)"', hlo)}
    return dict(per_computation=per_computation, loop_trip_counts=loops)


def pallas_under_shard_map() -> float:
    """The Pallas decode kernel (interpret mode) per device on its local heads of a
    sharded pool, as the model's step runs it on a GPU: max error against the reference."""
    from jax.sharding import PartitionSpec as P

    from jpaged.parallel import mesh as parallel
    from jpaged.core.attention import paged_attention

    mesh = parallel.replica_meshes(parallel.make_mesh(2))[0]
    keys = jax.random.split(jax.random.key(0), 3)
    k, v = (jax.random.normal(key, (2, 2, 8, 8, 32)) for key in keys[:2])   # [L, Hkv, P, S, D]
    q = jax.random.normal(keys[2], (2, 4, 32))
    table = PageTable(np.array([[1, 2], [3, 0]], np.int32), np.array([10, 5], np.int32))
    heads = P(None, parallel.MODEL)

    def attend(q, k, v, table):
        return paged_attention(q, k, v, table, impl="pallas", layer=1, interpret=True)

    out = jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads, P()),
                                out_specs=heads, check_vma=False))(q, k, v, table)
    expected = paged_attention(q, k, v, table, impl="reference", layer=1)
    return float(np.abs(np.asarray(out) - np.asarray(expected)).max())


def row_parallel_layers() -> dict:
    """A column-parallel then a row-parallel layer, both with random biases, on 2 devices
    under ``shard_map`` (params split by their declared axes) against the same layers on
    one device, on random inputs: the max error, and how far off a bias added per device
    and a missing psum would be."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from jpaged.parallel import mesh as parallel
    from jpaged.parallel.layers import MLP, ColumnParallelDense, RowParallelDense, logical_axes

    class Block(nn.Module):
        hidden: int   # this device's hidden units: 64 on one device, 32 on each of two

        @nn.compact
        def __call__(self, x):
            h = ColumnParallelDense(self.hidden, MLP, use_bias=True, name="up")(x)
            return RowParallelDense(32, MLP, use_bias=True, name="down")(jnp.tanh(h))

    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (5, 32))
    boxed = Block(64).init(keys[1], x)["params"]
    params = jax.tree_util.tree_map_with_path(   # random biases (init makes them zero)
        lambda path, p: p + jax.random.normal(keys[2], p.shape) if path[-1].key == "bias"
        else p, nn.unbox(boxed))
    axes = logical_axes(boxed)
    expected = Block(64).apply({"params": params}, x)
    mesh = parallel.replica_meshes(parallel.make_mesh(2))[0]
    sharded = jax.jit(jax.shard_map(lambda p, x: Block(32).apply({"params": p}, x), mesh=mesh,
                                    in_specs=(parallel.param_specs(params, axes), P()),
                                    out_specs=P()))(params, x)
    bias = params["down"]["bias"]
    # One device's partial sum (what a layer without its psum would return) + the bias.
    half = {"up": {k: v[..., :32] for k, v in params["up"].items()},
            "down": {"kernel": params["down"]["kernel"][:32], "bias": bias}}
    partial = Block(32).apply({"params": half}, x)
    error = lambda y: float(np.abs(np.asarray(y) - np.asarray(expected)).max())
    return dict(axes={k: list(v) for k, v in axes.items()}, max_error=error(sharded),
                bias_twice_error=error(sharded + bias), partial_error=error(partial))


def mesh_axes_reordered() -> bool:
    """A ("model", "data") mesh is read as its ("data", "model") transpose."""
    from jpaged.parallel import mesh as parallel

    devices = np.array(jax.devices()).reshape(4, 2)
    mesh = parallel.check_mesh(Mesh(devices, ("model", "data")))
    return mesh.axis_names == ("data", "model") and (mesh.devices == devices.T).all()


def case_tp2() -> dict:
    model = tiny_model()
    batch = prompts(model.config.vocab_size)
    reference, llm = LLM(model, **ENGINE), LLM(model, tensor_parallel=2, **ENGINE)
    result = compare(reference, llm, batch)
    again = LLM(model, tensor_parallel=2, **ENGINE)   # the same layout: the same programs
    compiled = again.engine.num_compilations
    generate(again, batch)
    recompiled = again.engine.num_compilations - compiled
    start = time.perf_counter()
    hlo = decode_hlo(llm)
    return dict(result, pool=pool_report(llm.engine.runner, reference.engine.runner),
                recompiled=recompiled,
                q_proj_shards=param_shards(llm.engine.model.params,
                                           "layers/self_attn/q_proj/kernel"),
                down_proj_shards=param_shards(llm.engine.model.params,
                                              "layers/mlp/down_proj/kernel"),
                hlo=collectives(hlo), hlo_seconds=time.perf_counter() - start,
                num_layers=model.config.num_layers, pallas_error=pallas_under_shard_map(),
                row_parallel=row_parallel_layers(),
                mesh_axes_reordered=bool(mesh_axes_reordered()),
                no_axes_error=no_param_axes_error(model))


def no_param_axes_error(model) -> str:
    """The error for a bundle that declares no param_axes, asked to run on 2 devices."""
    try:
        LLM(ModelBundle(model.config, model.params, model.forward), tensor_parallel=2,
            **ENGINE)
    except ValueError as error:
        return str(error)
    return "no error"


def case_tp4() -> dict:
    """4 devices: the tiny model's 2 kv heads replicated, and a model with 4 kv heads."""
    result = {}
    for name, model in (("replicated", tiny_model()),
                        ("8_heads", tiny_model(num_heads=8, num_kv_heads=4, head_dim=16))):
        batch = prompts(model.config.vocab_size)
        reference = LLM(model, **ENGINE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            llm = LLM(model, tensor_parallel=4, **ENGINE)
        copies = 4 // model.config.num_kv_heads
        result[name] = dict(compare(reference, llm, batch),
                            warnings=[str(w.message) for w in caught],
                            pool=pool_report(llm.engine.runner, reference.engine.runner,
                                             copies))
    return result


def case_dp2_tp4() -> dict:
    """Two replicas of 4 devices, loaded from a checkpoint directory, prefix routing."""
    model = tiny_model()
    vocab = model.config.vocab_size
    shared = prompts(vocab, [16], seed=1)[0]   # two pages
    first = [prompts(vocab, [5], seed=2)[0], shared + [1]]
    second = [shared + [2, 3], shared + [4], prompts(vocab, [7], seed=3)[0]]
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory, model.config, hf_tensors(model.config, model.params))
        reference = LLM(directory, **ENGINE)
        llm = LLM(directory, tensor_parallel=4, data_parallel=2, prefix_routing=True,
                  **ENGINE)
        results = [compare(reference, llm, batch) for batch in (first, second)]
    engines = llm.engine.engines
    return dict(tokens_equal=all(r["tokens_equal"] for r in results),
                max_logprob_error=max(r["max_logprob_error"] for r in results),
                same_top_ids=all(r["same_top_ids"] for r in results),
                hit_tokens=[e.scheduler.block_manager.hit_tokens for e in engines],
                pools=[pool_report(e.runner) for e in engines],
                q_proj_shards=[param_shards(e.model.params, "layers/self_attn/q_proj/kernel")
                               for e in engines],
                k_proj_shards=[param_shards(e.model.params, "layers/self_attn/k_proj/kernel")
                               for e in engines],
                param_devices=[sorted(d.id for d in
                                      e.model.params["embed_tokens"]["embedding"].devices())
                               for e in engines])


def case_tp2_int8() -> dict:
    """An int8 pool on 2 devices: the scales split over kv heads like their pages."""
    model = tiny_model()
    batch = prompts(model.config.vocab_size)
    reference = LLM(model, kv_cache_dtype="int8", **ENGINE)
    llm = LLM(model, tensor_parallel=2, kv_cache_dtype="int8", **ENGINE)
    result = compare(reference, llm, batch)
    scale = llm.engine.runner.cache.k_scale
    shards = sorted(scale.addressable_shards, key=lambda s: s.device.id)
    expected = np.asarray(reference.engine.runner.cache.k_scale, np.float32)
    return dict(result, scale_spec=list(scale.sharding.spec),
                scale_shard_shapes=[list(s.data.shape) for s in shards],
                scale_max_error=float(max(np.abs(np.asarray(s.data, np.float32)
                                                 - expected[s.index]).max() for s in shards)))


CASES = {"tp2": case_tp2, "tp4": case_tp4, "dp2_tp4": case_dp2_tp4,
         "tp2_int8": case_tp2_int8}


# -- the tests -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tp2():
    return run_cases("tp2")["tp2"]


@pytest.fixture(scope="module")
def slow_cases():
    return run_cases("tp4", "dp2_tp4", "tp2_int8")


def assert_matches_single_device(result):
    assert result["tokens_equal"], result
    assert result["same_top_ids"], result
    assert result["max_logprob_error"] < TOLERANCE, result


def test_tp2_matches_single_device(tp2):
    assert_matches_single_device(tp2)


def test_a_second_engine_on_the_same_layout_compiles_nothing(tp2):
    """The sharded forward is a static argument of the jitted step: equal for the same
    model, axes and mesh, so a second engine reuses the first one's programs (a closure
    per engine compiled them all again and kept them: a process making engines, as the
    fault sweeps do, ran out of memory maps)."""
    assert tp2["recompiled"] == 0, tp2


def test_tp2_refuses_a_model_without_param_axes(tp2):
    """Replicated params with each device's share of the heads would be a wrong answer."""
    assert re.search(r"tensor parallelism over 2 devices needs the model's param_axes.*"
                     r"this ModelBundle declares none", tp2["no_axes_error"]), tp2


def test_tp2_kv_pool_sharding(tp2):
    pool = tp2["pool"]
    # [L, Hkv, P, S, D] = [2, 2, 32, 8, 32]: one kv head of every page on each device.
    assert pool["spec"] == [None, "model"]
    assert pool["shape"] == [2, 2, 32, 8, 32]
    assert pool["devices"] == [0, 1]
    assert pool["shard_shapes"] == [[2, 1, 32, 8, 32]] * 2
    assert pool["shard_heads"] == [[0, 1], [1, 2]]
    assert pool["max_error"] < TOLERANCE
    assert tp2["q_proj_shards"] == [[2, 128, 64]]      # [L, E, Hq * D / 2]
    assert tp2["down_proj_shards"] == [[2, 128, 128]]  # [L, I / 2, E]


def test_mesh_axes_in_any_order(tp2):
    assert tp2["mesh_axes_reordered"]


def test_pallas_kernel_on_local_heads(tp2):
    assert tp2["pallas_error"] < TOLERANCE


def test_row_parallel_bias_added_once(tp2):
    """TP=2 layers give the one-device output: the row-parallel bias is added once, after
    the all-reduce. The psum is inside the layer, so no model built from it can return
    one device's partial sum; the last two checks show this test would see either fault."""
    result = tp2["row_parallel"]
    assert result["axes"] == {"up/kernel": ["embed", "mlp"], "up/bias": ["mlp"],
                              "down/kernel": ["mlp", "embed"], "down/bias": ["embed"]}
    assert result["max_error"] < TOLERANCE, result
    assert result["bias_twice_error"] > 0.1, result
    assert result["partial_error"] > 0.1, result


def test_tp2_decode_step_collectives(tp2):
    """Exactly two all-reduces, both in the body of the loop over layers; nothing else."""
    hlo = tp2["hlo"]
    places = {name: ops for name, ops in hlo["per_computation"].items()}
    assert list(places.values()) == [{"all-reduce": 2}], places
    [body] = places
    assert hlo["loop_trip_counts"].get(body) == tp2["num_layers"], hlo


@pytest.mark.slow
def test_tp4_with_replicated_kv_heads(slow_cases):
    result = slow_cases["tp4"]["replicated"]
    assert_matches_single_device(result)
    assert any("replicated 2 times" in w for w in result["warnings"]), result["warnings"]
    pool = result["pool"]
    assert pool["shape"] == [2, 4, 32, 8, 32] and pool["devices"] == [0, 1, 2, 3]
    assert pool["shard_shapes"] == [[2, 1, 32, 8, 32]] * 4
    assert pool["max_error"] < TOLERANCE


@pytest.mark.slow
def test_tp4_eight_heads(slow_cases):
    result = slow_cases["tp4"]["8_heads"]
    assert_matches_single_device(result)
    assert not result["warnings"]
    assert result["pool"]["shard_shapes"] == [[2, 1, 32, 8, 16]] * 4
    assert result["pool"]["max_error"] < TOLERANCE


@pytest.mark.slow
def test_dp2_tp4_from_checkpoint(slow_cases):
    result = slow_cases["dp2_tp4"]
    assert_matches_single_device(result)
    assert [p["devices"] for p in result["pools"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert result["param_devices"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(p["shard_shapes"] == [[2, 1, 32, 8, 32]] * 4 for p in result["pools"])
    assert result["q_proj_shards"] == [[[2, 128, 32]]] * 2   # Hq * D / 4
    assert result["k_proj_shards"] == [[[2, 128, 32]]] * 2   # 4 replicated kv heads / 4
    # The shared-prefix prompts followed the first one to replica 1 and hit its cache.
    assert result["hit_tokens"] == [0, 32], result["hit_tokens"]


# -- routing (host only) ---------------------------------------------------------------

@pytest.mark.slow
def test_tp2_int8_pool(slow_cases):
    """Same tokens as one device with an int8 pool; the scales ``[L, Hkv, P, S]`` split over
    kv heads. Partial sums in another order move K/V by float rounding, which can move a
    code by one step: logprobs agree to 1e-2, not 1e-5."""
    result = slow_cases["tp2_int8"]
    assert result["tokens_equal"] and result["same_top_ids"], result
    assert result["max_logprob_error"] < 1e-2, result
    assert result["scale_spec"] == [None, "model"]
    assert result["scale_shard_shapes"] == [[2, 1, 32, 8]] * 2
    assert result["scale_max_error"] < 1e-2


def test_router_least_loaded():
    router = Router(3, page_size=4, capacity=100)
    assert router.choose([1] * 9, [2, 1, 1]) == 1
    assert router.choose([1] * 9, [0, 0, 0]) == 0


def test_router_prefix_aware():
    router = Router(2, page_size=4, capacity=100, prefix_aware=True)
    shared = list(range(8))
    router.record(1, shared + [50])
    assert router.choose(shared + [60, 61], [0, 3]) == 1        # two cached pages
    assert router.choose(shared[:3] + [99], [0, 3]) == 0        # no whole page shared
    assert router.choose([7] + shared, [0, 3]) == 0             # same tokens, not a prefix
    assert router.choose(shared, [0, MAX_IMBALANCE + 1]) == 0   # too busy: balance wins
    assert Router(2, 4, 100).choose(shared, [1, 0]) == 1        # prefix-blind by default


def test_router_forgets_beyond_capacity():
    router = Router(2, page_size=2, capacity=3, prefix_aware=True)
    router.record(1, [1, 2, 3, 4])
    assert router.choose([1, 2, 3, 4], [0, 0]) == 1
    router.record(1, [9, 9, 8, 8])   # 4 pages recorded: the oldest, [1, 2], is forgotten
    assert router.choose([1, 2, 3, 4], [0, 0]) == 0


class FakeEngine:
    """What Replicas uses of an LLMEngine."""

    def __init__(self):
        self.requests, self.tokenizer, self.num_compilations, self.num_steps = {}, None, 1, 0
        self.scheduler = type("S", (), {"block_manager": type("B", (), dict(
            page_size=4, num_usable_pages=10))()})()

    def add_request(self, prompt, params, request_id, priority, stream=True):
        self.requests[request_id] = prompt

    def abort(self, request_id):
        del self.requests[request_id]

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        request_id = next(iter(self.requests))
        self.requests.pop(request_id)
        return [type("Out", (), dict(request_id=request_id, finished=True))()]


def test_replicas_route_step_and_abort():
    engines = [FakeEngine(), FakeEngine()]
    replicas = Replicas(engines, prefix_routing=True)
    ids = [replicas.add_request(p) for p in ([1] * 8, [2] * 8, [1] * 8 + [3], [4])]
    assert ids == ["0", "1", "2", "3"]
    # "2" follows "0"'s prefix; "1" and "3" go to the least loaded.
    assert list(engines[0].requests) == ["0", "2"] and list(engines[1].requests) == ["1", "3"]
    with pytest.raises(ValueError, match="already in use"):
        replicas.add_request([5], request_id="1")
    replicas.abort("3")
    assert sorted(o.request_id for o in replicas.step()) == ["0", "1"]
    assert replicas.has_unfinished_requests()
    with pytest.raises(ValueError, match="unknown request id '1'"):
        replicas.abort("1")
    replicas.step()
    assert not replicas.has_unfinished_requests() and replicas.owner == {}


# -- bad input: clear errors before anything is loaded -------------------------------

def unloaded(**overrides) -> Model:
    """A bundle whose params are None: any use of them would fail differently."""
    return Model(tiny_config(**overrides), None)


@pytest.mark.parametrize("options, message", [
    (dict(tensor_parallel=3), "model axis of size 3 does not divide the 4 query heads"),
    (dict(tensor_parallel=0), "tensor_parallel must be a positive integer, got 0"),
    (dict(data_parallel=2), "data_parallel=2 x tensor_parallel=1 needs 2 devices, only 1"),
])
def test_bad_layouts(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(unloaded(), **options)


def test_bad_meshes():
    device = np.array(jax.devices()[:1])
    with pytest.raises(ValueError, match="mesh axis 'tensor' is not one of"):
        LLM(unloaded(), mesh=Mesh(device, ("tensor",)))
    with pytest.raises(ValueError, match="either mesh= or tensor_parallel="):
        LLM(unloaded(), mesh=Mesh(device, ("model",)), tensor_parallel=1)


def test_mlp_not_divisible():
    with pytest.raises(ValueError, match="intermediate_size=250"):
        LLM(unloaded(intermediate_size=250), tensor_parallel=4)


def test_checkpoint_checked_before_loading(tmp_path):
    """Only config.json exists: the layout error comes before any weight is looked for."""
    config = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads)))
    with pytest.raises(ValueError, match="does not divide the 4 query heads"):
        LLM(str(tmp_path), tensor_parallel=8)


if __name__ == "__main__":
    print(json.dumps({case: CASES[case]() for case in sys.argv[1:]}))
