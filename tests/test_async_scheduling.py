"""Async scheduling (``async_scheduling=True``): the engine plans and dispatches step N+1
before step N's sampled ids reach the host. Outputs must equal a synchronous run's token
for token (greedy and seeded; a stop takes effect one step late and the extra token is
never emitted), and an abort of a request whose step is in flight, faults in or around
the step in flight, or a device step failing after its dispatch leave nothing behind."""

import jax
import numpy as np
import pytest

from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.sequence import PLACEHOLDER
from jpaged.models import Model, init_params, tiny_config
from jpaged.tools import faults
from jpaged.tools.soak import FAULTS, FaultInjector

CONFIG = tiny_config(num_layers=2, max_position_embeddings=128)
# One geometry for every test, tests/test_faults.py's (the step programs compile once per
# process): a small pool, so rows whose last token is still on the device are preempted
# and recomputed.
OPTIONS = dict(page_size=4, num_pages=20, max_num_seqs=6, max_num_batched_tokens=32,
               max_model_len=128)


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def word_model(model):
    """The model with a tokenizer whose token i is the word ``w{i}`` (stop strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(CONFIG.vocab_size)},
                                           unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return Model(CONFIG, model.params, tokenizer=tokenizer)


def run_out(engine, max_steps=200):
    """Step until every request ended (at most ``max_steps``: a stuck engine fails);
    returns every output reported."""
    outputs = []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        outputs += engine.step()
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def summary(outputs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outputs]


def assert_same(got, expected):
    """Tokens, text, finish and stop reasons exactly; logprobs to float32 rounding (a row
    that stops a step late still sits in the next batch, whose other shape may round the
    logits differently)."""
    assert summary(got) == summary(expected)
    for g, e in zip(got, expected):
        for a, b in zip(g.outputs, e.outputs):
            np.testing.assert_allclose(a.cumulative_logprob, b.cumulative_logprob, rtol=1e-5)
            if b.logprobs is not None:
                assert [sorted(d) for d in a.logprobs] == [sorted(d) for d in b.logprobs]
                np.testing.assert_allclose(
                    [v.logprob for d in a.logprobs for v in d.values()],
                    [v.logprob for d in b.logprobs for v in d.values()], rtol=1e-5)


def counting_feeds(engine):
    """Count the dispatches that took tokens from a step still on the device."""
    calls = {"fed": 0}
    dispatch = engine.runner.dispatch

    def wrapped(moves, batch, feed=None):
        calls["fed"] += feed is not None
        return dispatch(moves, batch, feed)

    engine.runner.dispatch = wrapped
    return calls


def workload(reference):
    """Greedy, seeded with logprobs, a stop token and a stop string drawn from a greedy
    run of ``reference`` (so they hit mid-output: a step late under async), max_tokens=1,
    seeded top-p."""
    batch = prompts(1, [5, 11, 19, 7, 9, 12])
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in reference.generate(batch[:5], greedy,
                                                                  use_tqdm=False)]
    params = [
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[tokens[2][4]]),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                       stop=[f"w{tokens[4][6]}"]),
        SamplingParams(max_tokens=28, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
    ]
    return batch, params


def test_outputs_equal_a_synchronous_run(word_model):
    """Under preemption (rows whose last token is still on the device are recomputed);
    stops take effect a step late, the extra token never shows."""
    reference = LLM(word_model, async_scheduling=False, **OPTIONS)
    batch, params = workload(reference)
    expected = reference.generate(batch, params, use_tqdm=False)
    assert expected[2].finish_reason == "stop" and expected[4].finish_reason == "stop"
    assert expected[2].outputs[0].stop_reason == params[2].stop_token_ids[0]
    llm = LLM(word_model, async_scheduling=True, **OPTIONS)
    calls = counting_feeds(llm.engine)
    assert_same(llm.generate(batch, params, use_tqdm=False), expected)
    assert calls["fed"] > 5 and llm.engine.scheduler.num_preemptions > 0
    faults.assert_empty(llm.engine)


@pytest.mark.slow
def test_requests_that_need_each_token_step_synchronously(word_model):
    """Parallel samples, penalties and prompt logprobs beside overlapped requests: while
    one needing each token on the host lives (parallel samples), the engine steps
    synchronously; penalties overlap (tests/test_engine.py checks them against a
    recompute); outputs equal a synchronous run's."""
    reference = LLM(word_model, async_scheduling=False, **OPTIONS)
    batch, params = workload(reference)
    batch += prompts(5, [6, 8, 10])
    params += [SamplingParams(max_tokens=8, temperature=0.8, n=3, seed=3, ignore_eos=True),
               SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1.3,
                              ignore_eos=True),
               SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True,
                              prompt_logprobs=2)]
    expected = reference.generate(batch, params, use_tqdm=False)
    llm = LLM(word_model, async_scheduling=True, **OPTIONS)
    got = llm.generate(batch, params, use_tqdm=False)
    assert_same(got, expected)
    np.testing.assert_allclose(
        [lp.logprob for e in got[-1].prompt_logprobs[1:] for lp in e.values()],
        [lp.logprob for e in expected[-1].prompt_logprobs[1:] for lp in e.values()],
        rtol=1e-5)
    # Prompt logprobs alone overlap (they need no token on the host).
    alone = llm.generate(batch[-1:], params[-1:], use_tqdm=False)
    assert_same(alone, expected[-1:])
    faults.assert_empty(llm.engine)


def test_abort_of_a_request_whose_step_is_in_flight(model):
    batch = prompts(2, [6, 10, 4])
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=1, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model, **OPTIONS).generate(
        batch, params, use_tqdm=False)]
    engine = LLM(model, async_scheduling=True, **OPTIONS).engine
    engine.isolate_faults = False   # no failure may be recovered silently
    ids = [engine.add_request(p, params) for p in batch]
    for _ in range(4):
        engine.step()
    held = [s for s in engine._inflight.plan.seqs if s.request_id == ids[1]]
    assert held and held[0].token_ids[-1] == PLACEHOLDER
    engine.abort(ids[1])
    engine.scheduler.check()
    assert ids[1] not in engine.scheduler.requests
    outputs = run_out(engine)
    assert ids[1] not in {o.request_id for o in outputs}
    # A streamed output names a finish reason only once its request is done (a server
    # ends the stream there), also while the length limit's last token is on the device.
    assert all(o.finished == (o.outputs[0].finish_reason is not None) for o in outputs)
    done = {o.request_id: o.outputs[0].token_ids for o in outputs if o.finished}
    assert done == {ids[0]: expected[0], ids[2]: expected[2]}
    faults.assert_empty(engine)
    with pytest.raises(ValueError, match="unknown request id"):
        engine.abort(ids[1])


def test_faults_around_the_step_in_flight_leave_the_tokens_of_a_clean_run(model):
    """Each fault kind of the soak in turn (interrupted before the device step, after it,
    the donated pool consumed, the host update failing), each while an earlier step is
    in flight: rolled back, nothing leaked, the same tokens as a run without faults."""
    batch = prompts(3, [5, 11, 19, 7])
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)] * 2
    expected = [o.outputs[0].token_ids for o in LLM(model, **OPTIONS).generate(
        batch, params, use_tqdm=False)]
    engine = LLM(model, async_scheduling=True, **OPTIONS).engine
    injector = FaultInjector(engine)
    ids = [engine.add_request(p, s) for p, s in zip(batch, params)]
    done, kinds = {}, ["interrupt", None, "after", None, "consumed", None, "apply", None]
    for step in range(200):
        if not engine.has_unfinished_requests():
            break
        kind = kinds[step % len(kinds)] if step < 4 * len(kinds) else None
        injector.arm(kind)
        in_flight = engine._inflight is not None
        try:
            outputs = engine.step()
        except FAULTS:
            assert in_flight or step == 0
            outputs = []
        engine.scheduler.check()
        done.update({o.request_id: o.outputs[0].token_ids for o in outputs if o.finished})
    assert injector.failed >= 8   # each kind twice at least
    assert [done[i] for i in ids] == expected
    faults.assert_empty(engine)


def test_a_device_failure_seen_at_fetch_fails_both_steps_and_recomputes(model):
    """A device step's error surfaces when its ids are fetched, after the next step (which
    read its tokens and pool on the device) was dispatched: that one is rolled back, the
    pool replaced, the failed step's rows recompute and give a clean run's tokens."""
    batch = prompts(4, [5, 9, 13])
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=2, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(model, **OPTIONS).generate(
        batch, params, use_tqdm=False)]
    engine = LLM(model, async_scheduling=True, **OPTIONS).engine
    engine.isolate_faults = False
    fetch, calls = engine.runner.fetch, {"n": 0}

    def failing_fetch(result):
        calls["n"] += 1
        if calls["n"] in (3, 7):
            raise RuntimeError("INTERNAL: the device step failed")
        return fetch(result)

    engine.runner.fetch = failing_fetch
    ids = [engine.add_request(p, params) for p in batch]
    done, failures = {}, 0
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        try:
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step()
                         if o.finished})
        except RuntimeError:
            failures += 1
            assert engine._inflight is None
        engine.scheduler.check()
    assert failures == 2 and [done[i] for i in ids] == expected
    faults.assert_empty(engine)


class RaisingTokenizer:
    """``tokenizer`` whose batched decode raises on any window holding token ``poison``."""

    def __init__(self, tokenizer, poison: int):
        self.tokenizer, self.poison = tokenizer, poison

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode_batch(self, windows, **options):
        if any(self.poison in window for window in windows):
            raise RuntimeError(f"cannot decode token {self.poison}")
        return self.tokenizer.decode_batch(windows, **options)


def test_a_tokenizer_that_raises_on_decode_fails_its_request_alone(word_model):
    """Under async scheduling, decoding one request's token raises: that request finishes
    with reason "error" naming the tokenizer's failure, the others give a clean run's
    outputs, nothing leaks, and the engine serves a new request after."""
    reference = LLM(word_model, async_scheduling=False, **OPTIONS)
    batch = prompts(7, [5, 9, 7, 11])
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = reference.generate(batch, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in expected]
    others = {t for i, ids in enumerate(tokens) if i != 1 for t in ids}
    poison = next(t for t in tokens[1][2:] if t not in others)
    model = Model(CONFIG, word_model.params,
                  tokenizer=RaisingTokenizer(word_model.tokenizer, poison))
    engine = LLM(model, async_scheduling=True, **OPTIONS).engine
    ids = [engine.add_request(p, params) for p in batch]
    culprit = engine.requests[ids[1]]
    done = {o.request_id: o for o in run_out(engine) if o.finished}
    failed = done.pop(ids[1])
    assert failed.outputs[0].finish_reason == "error"
    assert poison not in failed.outputs[0].token_ids   # never emitted past the failure
    assert summary([done[ids[i]] for i in (0, 2, 3)]) == summary(
        [expected[i] for i in (0, 2, 3)])
    assert "the tokenizer failed to decode" in culprit.error, culprit.error
    faults.assert_empty(engine)
    clean = next(i for i, output in enumerate(tokens) if poison not in output)
    again = engine.add_request(batch[clean], params)
    assert summary([o for o in run_out(engine) if o.request_id == again][-1:]) == summary(
        [expected[clean]])
    faults.assert_empty(engine)


def test_a_rolled_back_step_keeps_each_text_equal_to_its_tokens(word_model):
    """A step that fails after its rows were detokenized (building the outputs raises) is
    undone with each stream's decoder: straight after it, every text is the decode of the
    tokens its stream keeps (not a stale text until its next step), and the run ends with
    a clean run's outputs."""
    tokenizer = word_model.tokenizer
    batch = prompts(6, [5, 9, 7])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = LLM(word_model, **OPTIONS).generate(batch, params, use_tqdm=False)
    engine = LLM(word_model, async_scheduling=True, **OPTIONS).engine
    ids = [engine.add_request(p, params, stream=False) for p in batch]
    outputs, done, failed, checked = engine._outputs, {}, 0, 0

    def failing(requests):
        raise KeyboardInterrupt

    for step in range(100):
        if not engine.has_unfinished_requests():
            break
        engine._outputs = failing if step in (3, 6, 9) else outputs
        try:
            done.update({o.request_id: o for o in engine.step() if o.finished})
            continue
        except KeyboardInterrupt:
            failed += 1
        engine.scheduler.check()
        for request in engine.requests.values():
            for seq_id, stream in request.streams.items():
                kept = [t for t in request.seqs[seq_id].output_token_ids if t != PLACEHOLDER]
                if kept:
                    assert stream.current_text() == tokenizer.decode(kept)
                    checked += 1
    assert failed == 3 and checked >= 6
    assert summary([done[i] for i in ids]) == summary(expected)
    faults.assert_empty(engine)
