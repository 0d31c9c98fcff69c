"""The engine end to end: greedy outputs equal a no-cache recompute, whatever the engine
does on the way (continuous batching, chunked prefill, preemption, prefix hits, swaps)."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpaged.core.interfaces
from jpaged.tools.bench import Trace, run_trace
from jpaged.engine.engine import LLM, LLMEngine
from jpaged.core.interfaces import ModelBundle
from jpaged.host.sampling_params import SamplingParams
from jpaged.models import Model, forward, forward_no_cache, init_params, tiny_config

CONFIG = tiny_config(num_layers=2, max_position_embeddings=128)
REF_LEN = 64   # recompute inputs are right-padded to one shape: one compilation
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


@functools.partial(jax.jit, static_argnums=1)
def _last_logits(params, config, tokens, length):
    return forward_no_cache(params, config, tokens)[0, length - 1]


def recompute_greedy(model, prompt, num_tokens):
    """Greedy continuation recomputing the whole sequence every token: no cache at all."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        padded = np.zeros((1, REF_LEN), np.int32)
        padded[0, :len(tokens)] = tokens
        tokens.append(int(jnp.argmax(_last_logits(model.params, model.config, padded,
                                                  len(tokens)))))
    return tokens[len(prompt):]


def recompute_penalized(model, prompt, num_tokens, params):
    """``recompute_greedy`` with vLLM's penalties applied in float64 to each step's
    logits: repetition over the prompt and the output, frequency and presence over the
    output."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        padded = np.zeros((1, REF_LEN), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = np.asarray(_last_logits(model.params, model.config, padded, len(tokens)),
                            np.float64)
        counts = np.bincount(tokens[len(prompt):], minlength=len(logits))
        seen = (np.bincount(tokens, minlength=len(logits)) > 0)
        r = params.repetition_penalty
        logits = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def references(model):
    """Prompts sharing a 20-token prefix (prefix-cache hits) and their greedy outputs."""
    shared = prompts(1, [20])[0]
    batch = prompts(2, [3, 9, 17, 30, 41]) + [shared + p for p in prompts(3, [5, 13, 2])]
    return batch, [recompute_greedy(model, p, GREEDY.max_tokens) for p in batch]


def engine_outputs(llm, batch, params=GREEDY):
    return [o.token_ids for o in llm.generate(batch, params)]


def test_penalties_equal_a_recompute_through_preemption(model):
    """Greedy with repetition, frequency and presence penalties (each row's token history
    kept in persistent columns) equals a no-cache recompute that applies the penalties in
    float64, on a pool small enough to preempt and recompute, rows changing places;
    synchronous and with async scheduling (the token in flight fed into the history)."""
    batch = prompts(4, [3, 9, 17, 30, 41, 6])
    params = [SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, **p) for p in (
        dict(repetition_penalty=1.8), dict(frequency_penalty=1.5),
        dict(presence_penalty=2.0, repetition_penalty=0.7), dict(frequency_penalty=-0.8),
        dict(), dict(repetition_penalty=1.3, presence_penalty=-1.0, frequency_penalty=0.9))]
    expected = [recompute_penalized(model, p, 14, q) for p, q in zip(batch, params)]
    for overlap in (False, True):
        llm = LLM(model, page_size=4, max_num_seqs=4, max_model_len=128, num_pages=16,
                  max_num_batched_tokens=32, async_scheduling=overlap)
        fed, dispatch = [], llm.engine.runner.dispatch

        def counted(moves, batch, feed=None):
            fed.append(0 if feed is None else len(feed.history_rows))
            return dispatch(moves, batch, feed)

        llm.engine.runner.dispatch = counted
        got = [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]
        assert llm.engine.scheduler.num_preemptions > 0
        assert got == expected
        # With overlap the histories take the token in flight on the device: the engine
        # does not step synchronously for penalties.
        assert (sum(fed) > 20) == overlap


@pytest.mark.parametrize("setup", [
    dict(num_pages=64, max_num_batched_tokens=64),                  # chunked prefill
    dict(num_pages=16, max_num_batched_tokens=32),                  # preemption (recompute)
    dict(num_pages=16, max_num_batched_tokens=32, preemption_mode="swap", num_host_pages=64),
    dict(num_pages=64, max_num_batched_tokens=256, enable_prefix_caching=False),
], ids=["chunked", "preempt-recompute", "preempt-swap", "no-prefix-cache"])
def test_greedy_equals_recompute(model, references, setup):
    batch, expected = references
    llm = LLM(model, page_size=4, max_num_seqs=4, max_model_len=128, **setup)
    assert engine_outputs(llm, batch) == expected
    scheduler = llm.engine.scheduler
    if setup["num_pages"] == 16:
        assert scheduler.num_preemptions > 0
    assert not scheduler.seqs and not scheduler.running


def test_prefix_cache_hits_and_reports_them(model, references):
    batch, expected = references
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=2, max_model_len=128)
    outputs = llm.generate(batch, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    cached = [o.metrics.num_cached_tokens for o in outputs]
    assert max(cached[-3:]) >= 16   # the shared 20-token prefix: 4 full pages
    assert all(c % 4 == 0 for c in cached)


def test_recycled_pages_never_leak(model, references):
    """NaN in every free page (cached prefix pages excepted: they hold live K/V) before
    every step: outputs unchanged."""
    batch, expected = references
    llm = LLM(model, page_size=4, num_pages=20, max_num_seqs=4, max_model_len=128,
              max_num_batched_tokens=32)
    assert greedy_on_poisoned_pool(llm.engine, batch) == expected


def greedy_on_poisoned_pool(engine, prompts) -> list[list[int]]:
    """Greedy tokens of ``prompts``, with NaN written into every free page (cached prefix
    pages excepted: they hold live K/V) before every step."""
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    results = {}
    while engine.has_unfinished_requests():
        bm = engine.scheduler.block_manager
        engine.runner.poison_free_pages(set(bm.free_queue) - set(bm.page_keys))
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.token_ids
    return [results[i] for i in ids]


def test_dense_baseline_matches(model, references):
    batch, expected = references
    llm = LLM(model, page_size=64, num_pages=4, max_num_seqs=3, max_model_len=64,
              static_batching=True, enable_prefix_caching=False)
    assert engine_outputs(llm, batch) == expected


def test_a_bundle_of_config_params_and_forward(model, references):
    """A user's model needs only its config, params and forward: ModelBundle's defaults
    (no tokenizer, no EOS, no param_axes) run in the engine. Anything else is refused."""
    batch, expected = references
    bundle = ModelBundle(model.config, model.params, forward)
    assert isinstance(bundle, jpaged.core.interfaces.Model)
    llm = LLM(bundle, page_size=4, num_pages=64, max_num_seqs=4, max_model_len=128)
    assert engine_outputs(llm, batch) == expected
    with pytest.raises(ValueError, match="needs a tokenizer"):
        llm.generate(["text"], GREEDY)
    partial = types.SimpleNamespace(config=model.config, params=model.params, forward=forward)
    for bad in (partial, {"config": model.config}, None):
        with pytest.raises(ValueError, match=r"expected a model \(jpaged.core.interfaces.Model.*"
                                             r"got " + type(bad).__name__):
            LLM(bad, num_pages=8)


def test_bench_replays_a_trace_through_the_engine_protocol(model):
    """jpaged.tools.bench's figures come from Engine.metrics(): every request finishes with its
    output length, at most max_num_seqs run at once, the host share is a fraction."""
    requests = Trace(num_requests=6, prompt_median=8, output_median=5, max_len=32).sample(
        CONFIG.vocab_size)
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=4, max_model_len=128)
    figures = run_trace(llm.engine, requests)
    assert figures["requests"] == 6 and figures["max_in_flight"] == 4
    assert figures["output_tokens_per_s"] * figures["seconds"] == pytest.approx(
        sum(r["output_len"] for r in requests))
    assert 0 < figures["host_share"] < 1 and figures["preemptions"] == 0


def test_compilations_are_bounded(model):
    llm = LLM(model, page_size=4, num_pages=128, max_num_seqs=8, max_model_len=128,
              max_num_batched_tokens=64)
    before = llm.engine.num_compilations
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 60, 40)
    outs = rng.integers(1, 30, 40)
    llm.generate(prompts(6, lengths), [SamplingParams(max_tokens=int(n), temperature=0.0)
                                       for n in outs])
    # token buckets 16/32/64 for prefill and 8 rows for decode, a few table widths.
    assert llm.engine.num_compilations - before <= 12


def test_seeds_repeat_and_n_samples_differ(model):
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=8, max_model_len=128)
    prompt = prompts(7, [10])[0]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=42, n=3, ignore_eos=True)
    first = llm.generate([prompt], params)[0]
    again = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len(first.outputs) == 3
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    # The n samples share the prompt's pages: no leak once they are done.
    bm = llm.engine.scheduler.block_manager
    assert all(count == 0 for count in bm.ref_counts)


def test_beam_search_finds_a_higher_likelihood(model):
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=8, max_model_len=128)
    prompt = prompts(8, [6])[0]
    greedy = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                   ignore_eos=True, logprobs=1))[0]
    beam = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, n=2,
                                                 use_beam_search=True, best_of=4,
                                                 ignore_eos=True, length_penalty=0.0))[0]
    assert len(beam.outputs) == 2
    assert beam.outputs[0].cumulative_logprob >= greedy.outputs[0].cumulative_logprob - 1e-4
    # The best beam's score is the sum of its tokens' logprobs under a no-cache recompute.
    tokens = prompt + beam.outputs[0].token_ids
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, :len(tokens)] = tokens
    logprobs = jax.nn.log_softmax(forward_no_cache(model.params, CONFIG, padded)[0], -1)
    expected = sum(float(logprobs[len(prompt) + i - 1, t])
                   for i, t in enumerate(beam.outputs[0].token_ids))
    assert beam.outputs[0].cumulative_logprob == pytest.approx(expected, abs=1e-3)
    assert all(count == 0 for count in llm.engine.scheduler.block_manager.ref_counts)


def test_stop_token_and_streaming(model, references):
    batch, expected = references
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=8, max_model_len=128)
    stop = expected[0][3]
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop])
    streamed = [o for o in llm.stream([batch[0]], params)]
    assert streamed[-1].finished and streamed[-1].finish_reason == "stop"
    final = streamed[-1].token_ids
    assert final == expected[0][:expected[0].index(stop) + 1]
    lengths = [len(o.token_ids) for o in streamed]
    assert lengths == sorted(lengths) and len(streamed) > 1


def test_logprobs_match_recompute(model):
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=8, max_model_len=128)
    prompt = prompts(9, [7])[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2,
                                                ignore_eos=True))[0].outputs[0]
    tokens = prompt + out.token_ids
    padded = np.zeros((1, REF_LEN), np.int32)
    padded[0, :len(tokens)] = tokens
    ref = jax.nn.log_softmax(forward_no_cache(model.params, CONFIG, padded)[0], -1)
    for i, (token, top) in enumerate(zip(out.token_ids, out.logprobs)):
        row = np.asarray(ref[len(prompt) + i - 1])
        assert top[token].logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert len(top) <= 3 and set(np.argsort(-row)[:2]) <= set(top)


def test_abort_frees_everything(model):
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=8, max_model_len=128)
    engine = llm.engine
    keep = engine.add_request(prompts(10, [12])[0], GREEDY)
    drop = engine.add_request(prompts(11, [30])[0], GREEDY)
    engine.step()
    engine.abort(drop)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [keep]
    assert all(count == 0 for count in engine.scheduler.block_manager.ref_counts)
    with pytest.raises(ValueError, match="unknown request id 'nope'"):
        engine.abort("nope")


@pytest.mark.parametrize("prompt, params, message", [
    (list(range(200)), {}, "longer than max_model_len=128"),
    ([], {}, "empty prompt"),
    ([1, 2, 3], dict(n=0), "n must be >= 1, got 0"),
    ([1, 2, 3], dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    ([1, 2, 3], dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    ([1, 2, 3], dict(stop=5), "unknown stop type"),
    ([1, 99999], {}, "token id 99999 is outside the vocabulary"),
    ("text", {}, "needs a tokenizer"),
    # Bounds at admission (issue 20): each used to leave the scheduler holding a request
    # the engine did not track, or fail the step of every request in the batch.
    ([1, 2, 3], dict(n=10**12), "n=1000000000000 exceeds max_num_seqs=8"),
    ([1, 2, 3], dict(n=9, seed=1), "n=9 exceeds max_num_seqs=8"),
    ([1, 2, 3], dict(top_k=2**31), "top_k=2147483648 exceeds the vocabulary size"),
    ([1, 2, 3], dict(logprobs=10**6), "logprobs=1000000 exceeds the vocabulary size"),
    ([1, 2, 3], dict(use_beam_search=True, best_of=300), "best_of=300 exceeds max_num_seqs"),
])
def test_bad_requests_leave_others_running(model, references, prompt, params, message):
    batch, expected = references
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=8, max_model_len=128)
    engine = llm.engine
    good = engine.add_request(batch[1], GREEDY)
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams(**{"temperature": 0.0, **params}))
    result = None
    while engine.has_unfinished_requests():
        result = next((o for o in engine.step() if o.finished), result)
    assert result.request_id == good and result.token_ids == expected[1]


def test_logprobs_up_to_a_vocabulary_that_is_no_power_of_two():
    """logprobs = the whole vocabulary (300 tokens) is admitted and runs beside another
    request: the top-k width is not rounded up past the vocabulary."""
    config = tiny_config(num_layers=1, vocab_size=300, max_position_embeddings=128)
    llm = LLM(Model(config, init_params(config, jax.random.key(1))), page_size=4,
              num_pages=32, max_num_seqs=4, max_model_len=64)
    everything = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=300)
    outputs = llm.generate([[1, 2, 3], [4, 5]], [everything, GREEDY])
    assert [len(o.token_ids) for o in outputs] == [3, 12]
    for entry, token in zip(outputs[0].outputs[0].logprobs, outputs[0].token_ids):
        assert len(entry) == 300 and max(entry, key=lambda t: entry[t].logprob) == token


def test_beam_width_is_bounded_by_the_vocabulary(model):
    """2 * width candidates per beam step must exist: 300 beams of a 512-token vocabulary
    are refused at admission, and the engine holds nothing afterwards."""
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=300, max_num_batched_tokens=512,
              max_model_len=128)
    with pytest.raises(ValueError, match=r"best_of=300 beams need 2 \* 300 candidates"):
        llm.engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, best_of=300,
                                                         use_beam_search=True))
    assert not llm.engine.has_unfinished_requests() and not llm.engine.scheduler.requests


def test_generate_is_all_or_nothing(model):
    llm = LLM(model, page_size=4, num_pages=64, max_num_seqs=8, max_model_len=128)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate([[1, 2, 3], []], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert not llm.engine.scheduler.seqs


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: token i is the word ``w{i}``."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, decoders

    vocab = {f"w{i}": i for i in range(CONFIG.vocab_size)}
    tokenizer = Tokenizer(tok_models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return tokenizer


def test_text_prompts_and_stop_strings(model, word_tokenizer):
    with_text = Model(CONFIG, model.params, tokenizer=word_tokenizer)
    llm = LLM(with_text, page_size=4, num_pages=64, max_num_seqs=8, max_model_len=128)
    prompt = "w5 w17 w300 w2 w9"
    ids = word_tokenizer.encode(prompt).ids
    expected = recompute_greedy(model, ids, 8)
    full = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert full.prompt == prompt and full.prompt_token_ids == ids
    assert full.token_ids == expected and full.finish_reason == "length"
    assert full.text == " ".join(f"w{t}" for t in expected)
    stop = f"w{expected[4]}"
    first = full.text.find(stop)
    cut = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0,
                                                stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:first]
    assert cut.token_ids == expected[:len(cut.token_ids)] and len(cut.token_ids) <= 5


@pytest.mark.parametrize("prompt, message", [
    ("hello", "a text prompt needs a tokenizer"),
    ({"ids": [1]}, "a prompt dict holds prompt and/or prompt_token_ids; ids is not supported"),
    ([1, 2.5], "prompt must be a string or a list of token ids, got list"),
])
def test_replicas_refuse_prompts_by_the_engines_rule(prompt, message):
    """Routing and the engine turn prompts into ids with one function: a prompt the
    engine refuses is refused by the router with the same message, before any replica."""
    from types import SimpleNamespace

    from jpaged.parallel.replicas import Replicas
    from jpaged.host.request import prompt_token_ids

    with pytest.raises(ValueError, match=message):
        prompt_token_ids(prompt, None)
    pool = SimpleNamespace(page_size=4, num_usable_pages=8)
    engines = [SimpleNamespace(tokenizer=None, requests={},
                               scheduler=SimpleNamespace(block_manager=pool))
               for _ in range(2)]
    replicas = Replicas(engines)
    with pytest.raises(ValueError, match=message):
        replicas.add_request(prompt)
    assert replicas.owner == {}
    assert prompt_token_ids(np.array([3, 4]), None) == (None, [3, 4])


def test_warm_up_freezes_the_heap_out_of_collections(model):
    """After ``LLM.warm_up`` compiled the step programs, the objects alive then are frozen
    (``gc.freeze``): a full collection no longer walks them; generation still works."""
    import gc
    gc.unfreeze()
    llm = LLM(model, page_size=4, max_num_seqs=2, max_num_batched_tokens=16,
              max_model_len=16, num_pages=16)
    try:
        assert gc.get_freeze_count() == 0
        llm.warm_up()
        assert gc.get_freeze_count() > 1000
        batch = prompts(6, [3, 5])
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        assert engine_outputs(llm, batch, params) == [recompute_greedy(model, p, 4)
                                                      for p in batch]
    finally:
        gc.unfreeze()
