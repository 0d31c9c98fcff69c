"""A step is all or nothing: whatever raises inside it (the device step interrupted, a
device out-of-memory that consumed the donated pool, a bug in the host update), the
engine is left consistent and, stepping on, gives token for token what a run without the
fault gives, with no page leaked. ``LLM.generate`` / ``LLM.stream`` abort their requests
when the caller is interrupted or stops iterating."""

import jax
import numpy as np
import pytest

from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams
from jpaged.tools.soak import FAULTS, FaultInjector, InjectedDeviceError
from jpaged.models import Model, init_params, tiny_config

CONFIG = tiny_config(num_layers=2, max_position_embeddings=128)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
SAMPLES = SamplingParams(max_tokens=8, temperature=0.8, n=3, seed=3, ignore_eos=True)
BEAMS = SamplingParams(max_tokens=6, temperature=0.0, n=2, best_of=3, use_beam_search=True,
                       ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def workload():
    """Greedy and seeded requests, parallel samples and beams (copy-on-write), prompts
    sharing a 12-token prefix (prefix-cache hits)."""
    shared = prompts(1, [12])[0]
    batch = prompts(2, [5, 11, 19]) + [shared + p for p in prompts(3, [3, 7])] + prompts(4, [9])
    params = [GREEDY, SEEDED, SAMPLES, GREEDY, SEEDED, BEAMS]
    return list(zip(batch, params))


def check_all_free(engine):
    bm = engine.scheduler.block_manager
    assert not engine.has_unfinished_requests() and not engine.scheduler.seqs
    assert bm.num_free_pages == bm.num_pages - 1
    assert not any(bm.ref_counts)
    assert len(bm.host_free) == bm.num_host_pages


def run(engine, work, injector=None):
    """Every request to the end, surviving the injected faults; checks the host state
    after every step. Returns {request id: each completion's tokens}."""
    for i, (prompt, params) in enumerate(work):
        engine.add_request(prompt, params, request_id=str(i))
    done = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        try:
            outputs = engine.step()
        except FAULTS:
            outputs = []
        engine.scheduler.check()
        done.update({o.request_id: [c.token_ids for c in o.outputs]
                     for o in outputs if o.finished})
    check_all_free(engine)
    return done


SETUPS = {
    "roomy": dict(num_pages=128, max_num_seqs=8, max_num_batched_tokens=512),
    "swap": dict(num_pages=20, max_num_seqs=6, max_num_batched_tokens=32,
                 preemption_mode="swap", num_host_pages=64),
    "recompute": dict(num_pages=20, max_num_seqs=6, max_num_batched_tokens=32),
}


@pytest.fixture(scope="module")
def clean(model):
    """Outputs of each setup without faults."""
    return {name: run(LLM(model, page_size=4, max_model_len=128, **setup).engine,
                      _work(name)) for name, setup in SETUPS.items()}


def _work(setup):
    # Beams rank every live beam of a request in one step; a preemption that splits them
    # changes the search whatever happens, so they run where nothing is preempted.
    return workload() if setup == "roomy" else workload()[:5]


KINDS = ["interrupt", "after", "consumed", "apply"]
# Every fault kind and every setup in CI (a diagonal); the rest of the product under -m slow.
IN_CI = {("roomy", "interrupt"), ("swap", "after"), ("recompute", "consumed"),
         ("swap", "apply")}


@pytest.mark.parametrize("setup,kind", [
    pytest.param(setup, kind, marks=() if (setup, kind) in IN_CI else pytest.mark.slow)
    for setup in SETUPS for kind in KINDS])
def test_faults_leave_the_tokens_of_a_clean_run(model, clean, setup, kind):
    llm = LLM(model, page_size=4, max_model_len=128, **SETUPS[setup])
    llm.engine.isolate_faults = False   # each fault reaches the caller (tests/test_faults.py)
    injector = FaultInjector(llm.engine, kind, calls=[2, 3, 5, 8, 10])
    assert run(llm.engine, _work(setup), injector) == clean[setup]
    assert injector.failed == 5
    if setup != "roomy":
        assert llm.engine.scheduler.num_preemptions > 0
    if kind != "apply":
        assert injector.moves > 0   # some failed steps had swaps or copy-on-write copies


def test_keyboard_interrupt_in_generate_leaves_the_engine_empty(model):
    """The issue's scenario: Ctrl-C during the 4th device step of a generate of 6 prompts."""
    work = workload()[:5] + [(prompts(5, [14])[0], GREEDY)]
    batch, params = [p for p, _ in work], [s for _, s in work]
    expected = [[c.token_ids for c in o.outputs] for o in LLM(
        model, page_size=4, num_pages=48, max_model_len=128).generate(batch, params)]
    llm = LLM(model, page_size=4, num_pages=48, max_model_len=128)
    injector = FaultInjector(llm.engine, "interrupt", calls=[4])
    with pytest.raises(KeyboardInterrupt):
        llm.generate(batch, params)
    check_all_free(llm.engine)
    assert [[c.token_ids for c in o.outputs] for o in llm.generate(batch, params)] == expected
    assert injector.failed == 1
    check_all_free(llm.engine)


def test_device_oom_in_generate_recovers_the_pool(model):
    llm = LLM(model, page_size=4, num_pages=48, max_model_len=128, kv_cache_dtype="int8")
    batch = [p for p, _ in workload()[:3]]
    expected = [o.token_ids for o in llm.generate(batch, GREEDY)]
    injector = FaultInjector(llm.engine, "consumed", calls=[3])
    # Fault isolation retries the step (in halves): it succeeds, nobody is failed.
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == expected
    assert injector.failed == 1 and llm.engine.can_step
    check_all_free(llm.engine)
    llm.engine.isolate_faults = False
    FaultInjector(llm.engine, "consumed", calls=[3])
    with pytest.raises(InjectedDeviceError):
        llm.generate(batch, GREEDY)
    check_all_free(llm.engine)
    assert not llm.engine.scheduler.block_manager.cache   # its pages' K/V were lost
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == expected


def test_a_stream_stopped_early_aborts_its_requests(model):
    llm = LLM(model, page_size=4, num_pages=48, max_model_len=128)
    batch = [p for p, _ in workload()]
    stream = llm.stream(batch, GREEDY)
    first = next(stream)
    assert not first.finished and llm.engine.has_unfinished_requests()
    stream.close()
    check_all_free(llm.engine)
    for _ in llm.stream(batch, SamplingParams(max_tokens=1, temperature=0.0)):
        break   # dropping the generator closes it too
    check_all_free(llm.engine)
    expected = [o.token_ids for o in LLM(model, page_size=4, num_pages=48,
                                         max_model_len=128).generate(batch, GREEDY)]
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == expected


def test_check_names_a_leaked_page(model):
    llm = LLM(model, page_size=4, num_pages=48, max_model_len=128)
    engine = llm.engine
    engine.add_request(prompts(6, [9])[0], GREEDY)
    engine.step()
    engine.scheduler.check()
    seq = engine.scheduler.running[0]
    engine.scheduler.block_manager.ref_counts[seq.block_table[0]] += 1
    with pytest.raises(RuntimeError, match=f"page {seq.block_table[0]}: ref count 2, held by 1"):
        engine.scheduler.check()
    engine.scheduler.block_manager.ref_counts[seq.block_table[0]] -= 1
    seq.num_computed_tokens = seq.num_tokens   # nothing left to compute: stuck
    with pytest.raises(RuntimeError, match="nothing left to compute"):
        engine.scheduler.check()


def test_a_stream_record_restores_every_field_a_step_may_change():
    """``Stream.record`` names every field but the two a step never changes, and undoes
    a step's changes to all of them, its decoder's window and text included."""
    import dataclasses

    from jpaged.host.detokenizer import DecodeState
    from jpaged.host.request import Logprob, Stream, restore_streams

    assert {f.name for f in dataclasses.fields(Stream)} == {
        "index", "seed", "logprobs", *Stream.STEP_FIELDS}
    stream = Stream(0, 5, 1.5, [{3: Logprob(-0.5)}], "ab", None)
    state = stream.decoding(True, 2)
    state.window += [7, 8]
    state.emit("ab")
    before = (dataclasses.astuple(stream), state.snapshot()[1:7], state.text, state.tail)
    record = stream.record()
    stream.cumulative_logprob, stream.text, stream.stop_reason = -3.0, "abcd", "cd"
    stream.logprobs.append({4: Logprob(-1.0)})
    state.window += [9]
    state.fed, state.read = 3, 3
    state.emit("cd")
    state.window = state.window[1:]   # the window moved
    state.cut("a")
    restore_streams([record])
    assert stream.decoder is state
    assert (dataclasses.astuple(stream), state.snapshot()[1:7], state.text,
            state.tail) == before
    assert state.window == [7, 8]
