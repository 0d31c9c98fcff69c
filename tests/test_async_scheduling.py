"""Async scheduling (``async_scheduling=True``): the engine plans and dispatches step N+1
before step N's sampled ids reach the host. Outputs must equal a synchronous run's token
for token (greedy and seeded, stops one step late never emitting the extra token), and an
abort, a failing tokenizer or a device step failing after its dispatch leaves nothing
behind."""

import jax
import numpy as np
import pytest

from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams
from jpaged.models import Model, init_params, tiny_config
from jpaged.tools.soak import FAULTS, FaultInjector

CONFIG = tiny_config(num_layers=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def word_tokenizer():
    """Token i is the word ``w{i}``, joined with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(CONFIG.vocab_size)},
                                           unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def check_all_free(engine):
    bm = engine.scheduler.block_manager
    engine.scheduler.check()
    assert not engine.has_unfinished_requests() and not engine.scheduler.seqs
    assert bm.num_free_pages == bm.num_pages - 1 and not any(bm.ref_counts)


def summary(outputs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outputs]


def assert_same(got, expected):
    """Tokens, text and finish reasons exactly; logprobs to float32 rounding: a row that
    stops a step late still sits in the next batch, whose other shape may round the
    logits differently."""
    assert summary(got) == summary(expected)
    for g, e in zip(got, expected):
        for a, b in zip(g.outputs, e.outputs):
            np.testing.assert_allclose(a.cumulative_logprob, b.cumulative_logprob, rtol=1e-5)
            if b.logprobs is not None:
                assert [sorted(d) for d in a.logprobs] == [sorted(d) for d in b.logprobs]
                np.testing.assert_allclose(
                    [v.logprob for d in a.logprobs for v in d.values()],
                    [v.logprob for d in b.logprobs for v in d.values()], rtol=1e-5)


def workload(greedy_reference):
    """Greedy, seeded, logprobs, a stop token and a stop string picked from a greedy
    reference (so they hit mid-output), max_tokens=1, and requests that run their steps
    synchronously (parallel samples, beams, penalties)."""
    batch = prompts(1, [5, 9, 14, 3, 7, 11, 6, 8])
    stop_token = greedy_reference[2][4]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.8, seed=3, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                       stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                       stop=[f"w{greedy_reference[4][6]}"]),
        SamplingParams(max_tokens=7, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.8, n=2, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3,
                       ignore_eos=True),
    ]
    return batch, params


def counting_dispatch(engine):
    """Count the dispatches that took tokens from a step still on the device."""
    calls = {"fed": 0}
    dispatch = engine.runner.dispatch

    def wrapped(moves, batch, feed=None):
        calls["fed"] += feed is not None
        return dispatch(moves, batch, feed)

    engine.runner.dispatch = wrapped
    return calls


@pytest.mark.parametrize("setup", [dict(num_pages=64),
                                   dict(num_pages=14, max_num_batched_tokens=16)])
def test_outputs_equal_a_synchronous_run(model, word_tokenizer, setup):
    """Also under preemption (a small pool): recomputed and preempted rows whose last
    token was still on the device."""
    with_text = Model(CONFIG, model.params, tokenizer=word_tokenizer)
    options = dict(page_size=4, max_num_seqs=8, max_model_len=128, **setup)
    reference = LLM(with_text, async_scheduling=False, **options)
    greedy = reference.generate(prompts(1, [5, 9, 14, 3, 7, 11, 6, 8]),
                                SamplingParams(max_tokens=12, temperature=0.0,
                                               ignore_eos=True))
    batch, params = workload([o.token_ids for o in greedy])
    expected = reference.generate(batch, params)
    assert expected[2].finish_reason == "stop" and expected[4].finish_reason == "stop"
    llm = LLM(with_text, async_scheduling=True, **options)
    calls = counting_dispatch(llm.engine)
    assert_same(llm.generate(batch, params), expected)
    # Only the overlapped part: the others alone, so some steps really overlap.
    simple = [0, 1, 2, 3, 4, 5]
    assert_same(llm.generate([batch[i] for i in simple], [params[i] for i in simple]),
                [expected[i] for i in simple])
    assert calls["fed"] > 3
    check_all_free(llm.engine)


def test_abort_of_a_request_whose_step_is_in_flight(model):
    batch = prompts(2, [6, 10, 4])
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=1, ignore_eos=True)
    expected = [o.token_ids for o in LLM(model, page_size=4, num_pages=32,
                                         async_scheduling=False).generate(batch, params)]
    llm = LLM(model, page_size=4, num_pages=32, async_scheduling=True)
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in batch]
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    assert any(s.request_id == ids[1] for s in engine._inflight.plan.seqs)
    engine.abort(ids[1])
    engine.scheduler.check()
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert done == {ids[0]: expected[0], ids[2]: expected[2]}
    check_all_free(engine)
    with pytest.raises(ValueError, match="unknown request id"):
        engine.abort(ids[1])


@pytest.mark.parametrize("kind", ["interrupt", "after", "consumed", "apply"])
def test_faults_leave_the_tokens_of_a_clean_run(model, kind):
    batch = prompts(3, [5, 11, 19, 7])
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)] * 2
    options = dict(page_size=4, num_pages=20, max_num_seqs=6, max_num_batched_tokens=32)
    expected = [o.token_ids for o in LLM(model, async_scheduling=False,
                                         **options).generate(batch, params)]
    llm = LLM(model, async_scheduling=True, **options)
    engine = llm.engine
    injector = FaultInjector(engine, kind, calls=[2, 3, 5, 8])
    ids = [engine.add_request(p, s) for p, s in zip(batch, params)]
    done = {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        try:
            outputs = engine.step()
        except FAULTS:
            outputs = []
        engine.scheduler.check()
        done.update({o.request_id: o.token_ids for o in outputs if o.finished})
    assert injector.failed == 4
    assert [done[i] for i in ids] == expected
    check_all_free(engine)


def test_a_device_failure_seen_after_the_dispatch_rolls_back_both_steps(model):
    """The error of a device step surfaces when its ids are fetched, after the next step
    (which read them on the device) was dispatched: both are undone, their requests
    restart and give the tokens of a clean run."""
    batch = prompts(4, [5, 9, 13])
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=2, ignore_eos=True)
    options = dict(page_size=4, num_pages=32)
    expected = [o.token_ids for o in LLM(model, async_scheduling=False,
                                         **options).generate(batch, params)]
    engine = LLM(model, async_scheduling=True, **options).engine
    fetch, calls = engine.runner.fetch, {"n": 0}

    def failing_fetch(result):
        calls["n"] += 1
        if calls["n"] in (3, 6):
            raise RuntimeError("INTERNAL: the device step failed")
        return fetch(result)

    engine.runner.fetch = failing_fetch
    ids = [engine.add_request(p, params) for p in batch]
    done, failures = {}, 0
    while engine.has_unfinished_requests():
        try:
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        except RuntimeError:
            failures += 1
        engine.scheduler.check()
    assert failures == 2 and [done[i] for i in ids] == expected
    check_all_free(engine)


def test_a_tokenizer_that_raises_fails_the_generate_cleanly(model, word_tokenizer):
    class Broken:
        def __getattr__(self, name):
            return getattr(word_tokenizer, name)

        def decode_batch(self, *args, **kwargs):
            raise RuntimeError("boom")

    bundle = Model(CONFIG, model.params, tokenizer=Broken())
    for overlap in (False, True):
        llm = LLM(bundle, page_size=4, num_pages=32, async_scheduling=overlap)
        with pytest.raises(ValueError, match="tokenizer failed to decode"):
            llm.generate(prompts(5, [4, 6]), SamplingParams(max_tokens=4, temperature=0.0))
        check_all_free(llm.engine)


@pytest.mark.parametrize("overlap", [False, True])
def test_unstreamed_requests_report_only_when_finished(model, overlap):
    engine = LLM(model, page_size=4, num_pages=32, async_scheduling=overlap).engine
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    quiet = engine.add_request(prompts(6, [4])[0], params, stream=False)
    loud = engine.add_request(prompts(7, [6])[0], params)
    reported = {quiet: [], loud: []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            reported[output.request_id].append(output.finished)
    assert reported[quiet] == [True] and reported[loud][-1] and len(reported[loud]) == 5
    check_all_free(engine)
