"""Scheduler: budget and cap, chunked prefill, no decode starvation, preemption and resume,
priorities, forks, aborts, and bad input (the device arrays: test_batch.py)."""

import random

import pytest

from jpaged.engine.batch import BatchBuilder
from jpaged.host.block_manager import BlockManager
from jpaged.host.scheduler import Scheduler
from jpaged.host.sequence import SequenceStatus

BUCKETS = {"min_token_bucket": 8, "min_seq_bucket": 2, "min_page_bucket": 2}


def make(num_pages=64, page_size=4, *, num_host_pages=0, caching=True, watermark=0.0, **kwargs):
    bm = BlockManager(num_pages, page_size, num_host_pages=num_host_pages, watermark=watermark,
                      enable_prefix_caching=caching)
    kwargs = {"max_num_seqs": 8, "max_num_batched_tokens": 32, "max_model_len": 256, **kwargs}
    return Scheduler(bm, **kwargs)


def builder(sched, **buckets):
    """The batch builder the engine pairs with ``sched`` (the tests' small buckets)."""
    return BatchBuilder.for_scheduler(sched, **{**BUCKETS, **buckets})


def next_token(tokens):
    """A deterministic stand-in for the model: the next token depends on all tokens so far."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) + len(tokens)) % 97


def drive(sched, on_step=None, max_steps=5000):
    """The engine's loop: schedule, run the step, update. Returns outputs by sequence id."""
    outputs = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outputs
        out = sched.schedule()
        if on_step is not None:
            on_step(out)
        sampled = [next_token(s.token_ids) for s in out.seqs]
        for seq in sched.update(out, sampled):
            outputs[seq.seq_id] = seq.output_token_ids
    raise AssertionError("requests never finished")


def random_requests(sched, count, seed, max_prompt=40, max_tokens=20):
    rng = random.Random(seed)
    for i in range(count):
        prompt = [rng.randrange(97) for _ in range(rng.randint(1, max_prompt))]
        sched.add_request(f"r{i}", prompt, rng.randint(1, max_tokens))


def state(sched):
    bm = sched.block_manager
    return ([s.seq_id for s in sched.running], sorted(s.seq_id for s in sched.waiting),
            [s.seq_id for s in sched.swapped], list(bm.free_queue), list(bm.ref_counts),
            sorted(sched.seqs))


def test_budget_and_cap_are_never_exceeded():
    sched = make(num_pages=40, max_num_seqs=5, max_num_batched_tokens=24)
    random_requests(sched, 30, seed=0)

    def check(out):
        assert sum(out.num_new_tokens) <= 24 and out.num_seqs <= 5 and len(sched.running) <= 5
        batch = builder(sched).build(out)
        assert len(batch.token_ids) <= 32 and len(batch.context_lens) <= 8

    assert len(drive(sched, check)) == 30


def test_chunked_prefill_covers_each_prompt_exactly_once():
    sched = make(num_pages=200, max_num_seqs=4, max_num_batched_tokens=16)
    random_requests(sched, 12, seed=1, max_prompt=50, max_tokens=6)
    prompts = {s.seq_id: s.num_prompt_tokens for s in sched.waiting}
    covered = {seq_id: [] for seq_id in prompts}
    mixed = []

    def record(out):
        assert not out.preempted
        for seq, start, n in zip(out.seqs, out.start_positions, out.num_new_tokens):
            if start < prompts[seq.seq_id]:
                covered[seq.seq_id] += range(start, start + n)
        mixed.append(1 in out.num_new_tokens and max(out.num_new_tokens) > 1)

    drive(sched, record)
    assert covered == {seq_id: list(range(n)) for seq_id, n in prompts.items()}
    assert any(mixed)   # decodes and prefill chunks share steps


def test_decodes_are_never_starved_by_a_stream_of_prompts():
    sched = make(num_pages=400, max_num_seqs=8, max_num_batched_tokens=16)
    sched.add_request("a", [1, 2, 3], 30)
    sched.add_request("b", [4, 5], 30)
    out = sched.schedule()                   # both prompts in one step
    sched.update(out, [7] * len(out.sample))
    for i in range(29):                      # a new long prompt every step
        if len(sched.running) < 8:
            sched.add_request(f"p{i}", list(range(40)), 50)
        out = sched.schedule()
        decoding = {s.seq_id for s, n in zip(out.seqs, out.num_new_tokens) if n == 1}
        assert {"a", "b"} <= decoding
        sched.update(out, [7] * len(out.sample))
    assert "a" not in sched.seqs and "b" not in sched.seqs   # 30 tokens in 30 steps


@pytest.mark.parametrize("mode, host_pages", [("recompute", 0), ("swap", 64), ("swap", 0)])
def test_preempted_sequences_resume_with_exactly_their_tokens(mode, host_pages):
    roomy = make(num_pages=400)
    random_requests(roomy, 16, seed=2)
    expected = drive(roomy)
    tight = make(num_pages=20, num_host_pages=host_pages, preemption_mode=mode)
    random_requests(tight, 16, seed=2)
    swaps = []
    assert drive(tight, lambda out: swaps.append(bool(out.swap_out))) == expected
    assert tight.num_preemptions > 0 and any(swaps) == (host_pages > 0)
    assert tight.block_manager.num_free_pages == 19


def test_recompute_preemption_takes_the_newest_and_puts_it_first_in_line():
    sched = make(num_pages=5, page_size=2, max_num_seqs=4)   # 4 usable pages
    sched.add_request("old", [1, 2, 3, 4], 10)
    sched.add_request("new", [5, 6, 7, 8], 10)
    sched.update(sched.schedule(), [1, 1])   # both prefilled: 2 pages each, full
    sched.add_request("later", [7], 10)
    out = sched.schedule()                   # "old" needs a page: "new" is preempted
    assert [s.seq_id for s in out.preempted] == ["new"] and [s.seq_id for s in out.seqs] == ["old"]
    assert sched.waiting[0].seq_id == "new" and sched.seqs["new"].num_computed_tokens == 0
    assert sched.seqs["new"].token_ids == [5, 6, 7, 8, 1]


def test_priority_policy_admits_and_keeps_the_most_urgent():
    sched = make(num_pages=5, page_size=2, max_num_seqs=4, policy="priority")
    sched.add_request("low", [1, 2, 3, 4], 10, priority=5)
    sched.add_request("high", [5, 6, 7, 8], 10, priority=0)
    out = sched.schedule()
    assert [s.seq_id for s in out.seqs] == ["high", "low"]
    sched.update(out, [1, 1])
    out = sched.schedule()                  # one more page is needed: "low" is the victim
    assert [s.seq_id for s in out.preempted] == ["low"]


def test_static_batching_fills_the_batch_then_runs_it_to_the_end():
    sched = make(max_num_seqs=4, max_num_batched_tokens=8, static_batching=True)
    for i in range(6):
        sched.add_request(f"r{i}", [i + 1] * 5, 2 + i)
    first = sched.schedule()                 # the budget admits r0 and a chunk of r1
    sched.update(first, [9] * len(first.sample))
    second = sched.schedule()                # r0 decodes: the batch is closed
    sched.update(second, [9] * len(second.sample))
    assert [s.seq_id for s in first.seqs] == ["r0", "r1"]
    assert [s.seq_id for s in second.seqs] == ["r0", "r1"]
    while "r1" in sched.seqs:
        assert {s.seq_id for s in sched.running} <= {"r0", "r1"}
        sched.update(out := sched.schedule(), [9] * len(out.sample))
    out = sched.schedule()                   # the batch is empty: the next one forms
    assert [s.seq_id for s in out.seqs] == ["r2", "r3"]


def test_prefix_hit_starts_after_the_cached_pages():
    sched = make(page_size=4)
    system = list(range(50, 70))             # 20 tokens: 5 full pages
    sched.add_request("first", system + [1, 2], 2)
    drive(sched)
    sched.add_request("second", system + [3], 2)
    sched.add_request("same", system, 2)
    out = sched.schedule()
    assert out.start_positions == [20, 16] and out.num_new_tokens == [1, 4]
    assert sched.block_manager.metrics([])["prefix_hit_rate"] > 0.5


def test_fork_shares_pages_and_copies_on_write():
    sched = make(page_size=4)
    parent = sched.add_request("req", list(range(6)), 5)
    sched.update(sched.schedule(), [9])
    children = [sched.fork(parent, f"req-{i}", token_id=10 + i) for i in range(3)]
    assert all(c.block_table == parent.block_table for c in children)
    assert [c.token_ids[-1] for c in children] == [10, 11, 12] and parent.token_ids[-1] == 9
    shared = parent.block_table[1]           # half full: all four write into it next
    out = sched.schedule()
    # The first three writers copy, the last one is then alone in the page.
    assert len(out.copies) == 3 and len({dst for _, dst in out.copies}) == 3
    assert {src for src, _ in out.copies} == {shared} and children[-1].block_table[1] == shared
    assert len(set(builder(sched).build(out).slot_mapping[:4].tolist())) == 4
    sched.update(out, [1, 2, 3, 4])
    drive(sched)
    assert sched.block_manager.num_free_pages == 63


def test_fork_over_the_cap_makes_the_newest_wait():
    sched = make(max_num_seqs=2, max_num_batched_tokens=8)
    parent = sched.add_request("req", [1, 2, 3], 4)
    sched.update(sched.schedule(), [5])
    sched.fork(parent, "c1", 6)
    sched.fork(parent, "c2", 7)
    out = sched.schedule()
    assert [s.seq_id for s in out.preempted] == ["c2"] and out.num_seqs == 2
    sched.update(out, [8, 8])
    outputs = drive(sched)
    assert outputs["c2"][0] == 7 and len(outputs["c2"]) == 4


def test_abort_frees_running_waiting_and_swapped_sequences():
    sched = make(num_pages=9, page_size=2, num_host_pages=16, preemption_mode="swap")
    for i in range(4):
        sched.add_request(f"r{i}", [i] * 5, 20)
    while not sched.swapped:
        out = sched.schedule()
        sched.update(out, [1] * len(out.sample))
    assert sched.running and sched.waiting
    child = sched.fork(sched.running[0], "child")
    for rid in list(sched.requests):
        sched.abort(rid)
    assert child.finish_reason == "abort" and not sched.seqs and not sched.requests
    bm = sched.block_manager
    assert bm.num_free_pages == 8 and len(bm.host_free) == 16 and bm.reset_prefix_cache()


def test_update_skips_sequences_finished_after_schedule():
    sched = make()
    sched.add_request("a", [1, 2], 3)
    out = sched.schedule()
    sched.abort("a")
    assert sched.update(out, [5]) == [] and not sched.seqs


def test_stops_at_max_tokens_and_at_max_model_len():
    sched = make(max_model_len=10)
    sched.add_request("short", [1, 2], 3)
    sched.add_request("long", list(range(8)), 100)
    outputs = drive(sched)
    assert len(outputs["short"]) == 3 and len(outputs["long"]) == 2


def test_empty_step():
    out = make().schedule()
    assert out.num_seqs == 0 and out.num_tokens == 0 and not out.is_decode
    assert not any(out.sample)


def test_metrics():
    sched = make()
    sched.add_request("a", range(5), 2)
    sched.schedule()
    m = sched.metrics()
    assert m["num_running"] == 1 and m["used_pages"] == 2
    assert m["kv_utilization"] == pytest.approx(5 / 8)


# -- bad input: a clear error naming the value, and nothing else disturbed ---------------

@pytest.fixture
def busy():
    """A scheduler with a running, a waiting request, and a cached prefix."""
    sched = make(num_pages=12, page_size=4, max_num_seqs=1, max_model_len=100)
    sched.add_request("run", list(range(9)), 4)
    sched.add_request("wait", [1, 2], 4)
    sched.update(sched.schedule(), [3])
    return sched


@pytest.mark.parametrize("call, message", [
    (lambda s: s.add_request("x", list(range(101)), 4),
     "prompt of 101 tokens is longer than max_model_len=100"),
    (lambda s: s.add_request("x", list(range(45)), 4),
     "prompt of 45 tokens needs 12 pages, the pool can give one sequence 11"),
    (lambda s: s.add_request("x", [1], 0), "max_tokens=0 must be >= 1"),
    (lambda s: s.add_request("x", [1], -3), "max_tokens=-3 must be >= 1"),
    (lambda s: s.add_request("x", [], 4), "request 'x': empty prompt"),
    (lambda s: s.add_request("run", [1], 4), "request id 'run' is already in use"),
    (lambda s: s.add_request("wait", [1], 4), "request id 'wait' is already in use"),
    (lambda s: s.abort("nope"), "unknown request id 'nope'"),
    (lambda s: s.fork(s.seqs["wait"], "child"), "cannot fork sequence 'wait': it is not running"),
    (lambda s: s.fork(s.seqs["run"], "wait"), "sequence id 'wait' is already in use"),
])
def test_bad_input_is_refused_without_side_effects(busy, call, message):
    before = state(busy)
    with pytest.raises(ValueError, match=message):
        call(busy)
    assert state(busy) == before


def test_fork_in_the_middle_of_a_step_is_refused():
    sched = make()
    seq = sched.add_request("a", [1, 2, 3], 4)
    sched.schedule()                         # computed, but no sampled token yet
    with pytest.raises(ValueError, match="cannot fork sequence 'a' in the middle"):
        sched.fork(seq, "child")


def test_update_needs_a_token_per_row():
    sched = make()
    sched.add_request("a", [1], 4)
    sched.add_request("b", [2], 4)
    out = sched.schedule()
    with pytest.raises(ValueError, match="1 sampled token ids for 2 rows"):
        sched.update(out, [7])
    assert [s.num_tokens for s in out.seqs] == [1, 1]


def test_finish_of_a_finished_sequence_is_refused():
    sched = make()
    seq = sched.add_request("a", [1], 4)
    sched.finish(seq)
    with pytest.raises(ValueError, match="sequence 'a' is not live"):
        sched.finish(seq)
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "stop"


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=0), "max_num_seqs=0"),
    (dict(max_num_seqs=64, max_num_batched_tokens=32), "max_num_batched_tokens=32"),
    (dict(max_model_len=0), "max_model_len=0"),
    (dict(policy="lifo"), "policy='lifo'"),
    (dict(preemption_mode="drop"), "preemption_mode='drop'"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_host_side_imports_neither_jax_nor_the_model():
    """block_manager and scheduler (and what they import of jpaged) are pure host logic:
    read from the source, their imports reach no JAX, Flax or models module."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    seen, todo, external = set(), ["jpaged.host.block_manager", "jpaged.host.scheduler"], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        tree = ast.parse((root / (module.replace(".", "/") + ".py")).read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("jpaged."):
                    todo.append(name)
                else:
                    external.add(name.split(".")[0])
    assert seen >= {"jpaged.host.sequence", "jpaged.core.shapes"}
    assert not external & {"jax", "jaxlib", "flax", "models", "jpaged"}, external
