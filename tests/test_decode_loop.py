"""The jitted decode loop: same tokens as the engine, the dense layout and a recompute;
EOS, the cache it leaves, one compilation, donation, jit/vmap, and bad inputs."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import models
from jpaged.engine.batch import StepBatch
from jpaged.host.block_manager import BlockManager
from jpaged.core.cache import KVCache, PageTable
from jpaged.decode_loop import (NO_EOS, PAD_TOKEN, _decode, _model_step, decode_loop,
                                num_compilations, prepare, reserve, sampling_tensors)
from jpaged.engine.engine import LLMEngine
from jpaged.engine.runner import _step as runner_step
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.scheduler import Scheduler
from jpaged.pallas_kernels.xla_attention import MAX_BLOCK_TOKENS

CONFIG = models.tiny_config(num_layers=2)
LENGTHS = (5, 17, 9)
STEPS = 8
PAGE_SIZE = 4
NUM_PAGES = 24  # one pool size for every prepare, so the prefill compiles once
REF_LEN = 32    # forward_no_cache inputs are right-padded to one shape: one compilation

GREEDY = SamplingParams(temperature=0.0)

reference = jax.jit(models.forward_no_cache, static_argnums=1)


@pytest.fixture(scope="module")
def model():
    return models.Model(CONFIG, models.init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in LENGTHS]


def run(model, prompts, **options):
    cache, table, first = prepare(model, prompts, num_steps=STEPS, page_size=PAGE_SIZE,
                                  num_pages=NUM_PAGES)
    return table, first, decode_loop(model, model.params, cache, table, first,
                                     num_steps=STEPS, **options)


@pytest.fixture(scope="module")
def greedy(model, prompts):
    """The paged greedy run: (table, first tokens, output with the cache as numpy)."""
    table, first, out = run(model, prompts)
    return table, np.asarray(first), jax.tree.map(np.asarray, out)


def generated(first, out):
    """Output tokens 0..STEPS of each row (first token, then the loop's)."""
    return np.concatenate([np.asarray(first)[:, None], np.asarray(out.tokens)], axis=1)


@pytest.fixture(scope="module")
def engine(model):
    """One engine for every comparison (no prefix caching, so repeated prompts take the
    same shapes): its step compiles once per shape, not once per test."""
    cache = KVCache.create(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, 16, 16)
    manager = BlockManager(16, 16, enable_prefix_caching=False)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    return LLMEngine(model, cache, scheduler)


def engine_tokens(engine, prompts, sampling):
    """Output tokens 0..STEPS of each prompt, served by the engine."""
    ids = [engine.add_request(p, SamplingParams(
        max_tokens=STEPS + 1, temperature=params.temperature, top_k=params.top_k,
        top_p=params.top_p, seed=params.seed, ignore_eos=True))
        for p, params in zip(prompts, sampling)]
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    return np.array([finished[i] for i in ids])


def recompute_tokens(model, prompts):
    """Greedy decoding by re-running forward_no_cache over the whole sequence each token."""
    sequences = [list(p) for p in prompts]
    for _ in range(STEPS + 1):
        padded = jnp.asarray([s + [0] * (REF_LEN - len(s)) for s in sequences], jnp.int32)
        logits = np.asarray(reference(model.params, CONFIG, padded))
        for row, seq in enumerate(sequences):
            seq.append(int(np.argmax(logits[row, len(seq) - 1])))
    return np.array([s[len(p):] for s, p in zip(sequences, prompts)])


def test_greedy_matches_engine_dense_and_recompute(model, prompts, greedy, engine):
    _, first, out = greedy
    tokens = generated(first, out)
    np.testing.assert_array_equal(tokens, engine_tokens(engine, prompts, [GREEDY] * 3))
    np.testing.assert_array_equal(tokens, recompute_tokens(model, prompts))
    cache, table, dense_first = prepare(model, prompts, num_steps=STEPS, dense=True)
    assert cache.page_size == max(LENGTHS) + STEPS
    np.testing.assert_array_equal(table.block_tables, [[1], [2], [3]])
    dense = decode_loop(model, model.params, cache, table, dense_first, num_steps=STEPS)
    np.testing.assert_array_equal(tokens, generated(dense_first, dense))
    np.testing.assert_allclose(out.logprobs, dense.logprobs, atol=1e-4)
    assert (out.logprobs < 0).all()
    np.testing.assert_array_equal(out.lengths, np.array(LENGTHS) + STEPS)
    assert int(out.steps) == STEPS


def test_cache_holds_the_recomputed_kv(model, prompts, greedy):
    """Prefilling prompt + generated tokens into a fresh pool gives the K/V the loop wrote."""
    table, first, out = greedy
    tokens = generated(first, out)
    sequences = [list(p) + tokens[row, :STEPS].tolist() for row, p in enumerate(prompts)]
    ref_cache, ref_table, _ = prepare(model, sequences, num_steps=1, page_size=PAGE_SIZE,
                                      num_pages=NUM_PAGES)
    for row, length in enumerate(out.lengths):
        positions = np.arange(int(length))
        got_pages = np.asarray(table.block_tables)[row, positions // PAGE_SIZE]
        ref_pages = np.asarray(ref_table.block_tables)[row, positions // PAGE_SIZE]
        offsets = positions % PAGE_SIZE
        for name in ("k", "v"):
            got = getattr(out.cache, name)[:, :, got_pages, offsets]
            want = np.asarray(getattr(ref_cache, name))[:, :, ref_pages, offsets]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} of sequence {row}")


def test_eos_stops_one_row_and_leaves_the_others(model, prompts, greedy):
    _, first, out = greedy
    stop_row, others = 1, np.array([0, 2])
    # A token the stop row produces that no other row ever produces (nor the stop row earlier).
    eos, at = next((int(t), i) for i, t in enumerate(out.tokens[stop_row])
                   if t not in out.tokens[others] and t not in first
                   and t not in out.tokens[stop_row, :i])
    table, _, stopped = run(model, prompts, eos_id=eos)
    np.testing.assert_array_equal(stopped.tokens[others], out.tokens[others])
    np.testing.assert_array_equal(stopped.lengths[others], out.lengths[others])
    np.testing.assert_array_equal(stopped.tokens[stop_row, :at + 1], out.tokens[stop_row, :at + 1])
    assert (np.asarray(stopped.tokens[stop_row, at + 1:]) == PAD_TOKEN).all()
    assert (np.asarray(stopped.logprobs[stop_row, at + 1:]) == 0).all()
    # K/V of the prompt, the first token and tokens up to the EOS (whose K/V is not written).
    length = LENGTHS[stop_row] + at + 1
    assert int(stopped.lengths[stop_row]) == length
    positions = np.arange(length, LENGTHS[stop_row] + STEPS)
    pages = np.asarray(table.block_tables)[stop_row, positions // PAGE_SIZE]
    assert (np.asarray(stopped.cache.k)[:, :, pages, positions % PAGE_SIZE] == 0).all()

    # Rows whose first token is the EOS do nothing; the loop exits once all rows stopped.
    cache, table, first_tokens = prepare(model, prompts, num_steps=STEPS, page_size=PAGE_SIZE,
                                         num_pages=NUM_PAGES)
    first_tokens = first_tokens.at[jnp.array(others)].set(eos)
    alone = decode_loop(model, model.params, cache, table, first_tokens, num_steps=STEPS,
                        eos_id=eos)
    assert int(alone.steps) == at + 1
    np.testing.assert_array_equal(alone.tokens[stop_row], stopped.tokens[stop_row])
    assert (np.asarray(alone.tokens[others]) == PAD_TOKEN).all()
    np.testing.assert_array_equal(alone.lengths[others], np.array(LENGTHS)[others])


def test_one_compilation_and_the_cache_is_donated(model, prompts, greedy):
    """The fixture compiled the loop and the prefill for these shapes: further calls with
    other values (first tokens, an EOS id) add no program, and write the pool in place."""
    _, first, out = greedy
    absent = next(t for t in range(CONFIG.vocab_size) if t not in out.tokens and t not in first)
    cache, table, first = prepare(model, prompts, num_steps=STEPS, page_size=PAGE_SIZE,
                                  num_pages=NUM_PAGES)
    compiled = num_compilations()
    assert compiled >= 2   # the fixture's loop and prefill were counted
    pointer = cache.k.unsafe_buffer_pointer()
    out = decode_loop(model, model.params, cache, table, first, num_steps=STEPS, eos_id=absent)
    assert cache.k.is_deleted()
    assert out.cache.k.unsafe_buffer_pointer() == pointer
    np.testing.assert_array_equal(out.tokens, greedy[2].tokens)
    again = decode_loop(model, model.params, out.cache, table, first[::-1], num_steps=STEPS)
    assert again.cache.k.unsafe_buffer_pointer() == pointer
    assert num_compilations() == compiled


def test_jit_and_vmap_over_independent_pools(model, prompts, greedy):
    """Two pools (the prompts, and the prompts in reverse order) in one jitted vmap, with
    the model as a bare step function."""
    _, first, out = greedy
    runs = [prepare(model, p, num_steps=STEPS, page_size=PAGE_SIZE, num_pages=NUM_PAGES)
            for p in (prompts, prompts[::-1])]
    caches, tables, firsts = jax.tree.map(lambda *x: jnp.stack(x), *runs)

    def step(params, cache, token_ids, meta):   # a bare step function, not a model bundle
        rows = jnp.arange(token_ids.shape[0], dtype=jnp.int32)
        return models.forward(params, CONFIG, cache, token_ids, meta, rows)

    @jax.jit
    def generate(params, caches, tables, firsts):
        def one(cache, table, first):
            return decode_loop(step, params, cache, table, first, num_steps=STEPS).tokens
        return jax.vmap(one)(caches, tables, firsts)

    tokens = generate(model.params, caches, tables, firsts)
    np.testing.assert_array_equal(tokens[0], out.tokens)
    np.testing.assert_array_equal(tokens[1], out.tokens[::-1])


def test_sampled_rows_match_the_engine(model, prompts, greedy, engine):
    """Seeded rows draw output token i with the key (seed, i), as the engine does; a greedy
    row in a sampled batch still gives the greedy tokens."""
    _, _, out = greedy
    sampling = [GREEDY, SamplingParams(temperature=1.0, seed=7),
                SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=8)]
    cache, table, first = prepare(model, prompts, num_steps=STEPS, page_size=PAGE_SIZE,
                                  num_pages=NUM_PAGES, sampling=sampling)
    sampled = decode_loop(model, model.params, cache, table, first, num_steps=STEPS,
                          sampling=sampling)
    tokens = generated(first, sampled)
    np.testing.assert_array_equal(tokens, engine_tokens(engine, prompts, sampling))
    np.testing.assert_array_equal(tokens[0, 1:], out.tokens[0])
    np.testing.assert_allclose(sampled.logprobs[0], out.logprobs[0], atol=1e-5)
    assert (tokens[1:, 1:] != out.tokens[1:]).any()


# -- the pool is written in place whatever the batch -----------------------------------


def pool_sized_results(hlo: str, size: int) -> list[str]:
    """The opcode of each instruction of a compiled program (fusion bodies aside) whose
    result has ``size`` elements; a fusion is named by its root: "fusion:scatter"."""
    roots, computation = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.-]+) \(", line)
        computation = header.group(1) if header else computation
        root = re.match(r"\s+ROOT %\S+ = \S+ ([\w-]+)\(", line)
        if root:
            roots[computation] = root.group(1)
    fused = set(re.findall(r"calls=%([\w.-]+)", hlo))
    results = []
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.-]+) \(", line)
        computation = header.group(1) if header else computation
        op = re.match(r"\s+(?:ROOT )?%\S+ = \w+\[([\d,]+)\]\S* ([\w-]+)\(", line)
        if (op and computation not in fused
                and np.prod([int(d) for d in op.group(1).split(",")]) == size):
            name = op.group(2)
            if name == "fusion":
                name += ":" + roots[re.search(r"calls=%([\w.-]+)", line).group(1)]
            results.append(name)
    return results


@pytest.mark.parametrize("batch", [1, 4])
def test_the_loop_and_the_engine_step_write_the_pool_in_place(model, batch):
    """Compiled for one and for several tokens per step, neither the decode loop nor the
    engine's step makes a pool-sized array other than the in-place writes: no copy. (At
    one token the write becomes a dynamic-update-slice; XLA once fused it a second time
    into a reshape of the pool for the attention's gather, which cost 8 copies of the pool
    per layer per step.) The context spans several attention blocks, so the attention is
    a loop, as at real lengths."""
    context = MAX_BLOCK_TOKENS + 100
    cache, table = reserve(CONFIG, [context] * batch, num_steps=STEPS, page_size=PAGE_SIZE)
    rows = jnp.arange(batch, dtype=jnp.int32)
    tokens, tensors = jnp.zeros(batch, jnp.int32), sampling_tensors(None, batch)
    page = table.block_tables[rows, context // PAGE_SIZE]
    step_batch = StepBatch(token_ids=tokens, positions=table.lengths,
                           slot_mapping=page * PAGE_SIZE + context % PAGE_SIZE, q_seq=rows,
                           block_tables=table.block_tables, context_lens=table.lengths + 1,
                           logits_indices=rows, sampling=tensors, is_decode=True, num_top=0)
    programs = {
        "loop": _decode.lower(_model_step(model)[0], STEPS, True, model.params, cache, table,
                              tokens, jnp.asarray(NO_EOS, jnp.int32), tensors),
        "engine step": runner_step.lower(model.forward, model.config, "auto", model.params, cache,
                                         step_batch)}
    for name, program in programs.items():
        results = pool_sized_results(program.compile().as_text(), cache.k.size)
        made = [op for op in results if op not in ("parameter", "get-tuple-element", "bitcast")]
        assert made and all(op.removeprefix("fusion:") in ("scatter", "dynamic-update-slice")
                            for op in made), (name, results)


# -- bad inputs: each a ValueError before anything is traced --------------------------


@pytest.fixture
def empty(model):
    """An unfilled pool and table shaped like prepare's, and first tokens (no compile)."""
    cache, table = reserve(CONFIG, LENGTHS, num_steps=STEPS, page_size=PAGE_SIZE,
                           num_pages=NUM_PAGES)
    return cache, table, jnp.array([1, 2, 3], jnp.int32)


def loop(model, cache, table, first, **options):
    options.setdefault("num_steps", STEPS)
    return decode_loop(model, model.params, cache, table, first, **options)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_bad_num_steps(model, empty, steps):
    with pytest.raises(ValueError, match=f"num_steps must be a positive integer, got {steps}"):
        loop(model, *empty, num_steps=steps)


def test_num_steps_beyond_the_reserved_pages(model, empty):
    cache, table, first = empty
    with pytest.raises(ValueError, match=r"num_steps=12 does not fit sequence 1: length 17 \+ "
                                         r"12 steps needs 29 slots, its table holds 7 pages"):
        loop(model, cache, table, first, num_steps=12)
    # Row 1 (the long one) is out of the way: row 0 owns 4 pages, 16 slots, it needs 17.
    with pytest.raises(ValueError, match=r"sequence 0 needs page column 4 for num_steps=12"):
        loop(model, cache, table, first.at[1].set(9), num_steps=12, eos_id=9)


def test_lengths_disagree_with_the_reserved_pages(model, empty):
    cache, table, first = empty
    longer = PageTable(table.block_tables, table.lengths.at[0].set(20))
    with pytest.raises(ValueError, match="sequence 0 needs page column 4 for its length 20"):
        loop(model, cache, longer, first)
    with pytest.raises(ValueError, match=r"first_tokens must be \[B=3\].*got shape \(2,\)"):
        loop(model, cache, table, first[:2])
    shared = PageTable(table.block_tables.at[2].set(table.block_tables[1]), table.lengths)
    with pytest.raises(ValueError, match="page 9 .column 4 of sequence 1. is written by the "
                                         "loop but also used by another row"):
        loop(model, cache, shared, first)


@pytest.mark.parametrize("field, value", [("num_kv_heads", 4), ("num_layers", 3),
                                          ("head_dim", 16)])
def test_cache_does_not_fit_the_model(model, empty, field, value):
    _, table, first = empty
    geometry = dict(num_layers=CONFIG.num_layers, num_kv_heads=CONFIG.num_kv_heads,
                    head_dim=CONFIG.head_dim, page_size=PAGE_SIZE, num_pages=NUM_PAGES)
    cache = KVCache.create(**{**geometry, field: value})
    with pytest.raises(ValueError, match=f"the cache has {field}={value} but the model has "
                                         f"{field}={getattr(CONFIG, field)}"):
        loop(model, cache, table, first)


def test_other_bad_loop_inputs(model, empty):
    cache, table, first = empty
    with pytest.raises(ValueError, match="first token 512 of sequence 2 is outside"):
        loop(model, cache, table, first.at[2].set(512))
    with pytest.raises(ValueError, match="eos_id must be None, a token id >= 0"):
        loop(model, cache, table, first, eos_id=-2)
    with pytest.raises(ValueError, match="sampling.1. asks for penalties"):
        loop(model, cache, table, first, sampling=[SamplingParams(), SamplingParams(
            repetition_penalty=1.2), SamplingParams()])
    with pytest.raises(ValueError, match="got 2 SamplingParams for a batch of 3"):
        loop(model, cache, table, first, sampling=[SamplingParams()] * 2)
    # Half a model (no params, tokenizer, ...) is neither a Model nor a step function.
    half = types.SimpleNamespace(config=CONFIG, forward=model.forward)
    with pytest.raises(ValueError, match=r"model must be a jpaged.core.interfaces.Model .* or a "
                                         r"step function .*got SimpleNamespace"):
        decode_loop(half, model.params, cache, table, first, num_steps=STEPS)


def test_bad_prepare_inputs(model, prompts):
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty list of token ids"):
        prepare(model, [prompts[0], []], num_steps=STEPS)
    with pytest.raises(ValueError, match="prompt 0: token id 600 is outside the vocabulary"):
        prepare(model, [[1, 600]], num_steps=STEPS)
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 0"):
        prepare(model, prompts, num_steps=0)
    with pytest.raises(ValueError, match="full at sequence 1: length 17 \\+ num_steps 8 needs "
                                         "7 pages, 5 are free"):
        prepare(model, prompts, num_steps=STEPS, page_size=PAGE_SIZE, num_pages=10)
    with pytest.raises(ValueError, match="pass num_pages or memory, not both"):
        prepare(model, prompts, num_steps=STEPS, num_pages=10, memory=2**20)
    with pytest.raises(ValueError, match=r"expected a model .*got dict"):
        prepare({"config": CONFIG, "params": model.params}, prompts, num_steps=STEPS)
