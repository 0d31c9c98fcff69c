"""State owned by its classes: every attribute of the block manager, scheduler, sequence,
request, engine and router is saved by its ``state_dict`` or declared in ``DERIVED``, and
``load_state_dict`` of a ``state_dict`` gives the same state and the same next steps.

Host-only (no model steps): the scheduler is driven with made-up sampled tokens.
"""

import copy

import numpy as np
import pytest

from jpaged.host.block_manager import BlockManager
from jpaged.host.request import Request, Stream
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.scheduler import Scheduler
from jpaged.host.sequence import Sequence

OPTIONS = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
               preemption_mode="swap")


def undeclared(obj, state: dict) -> set:
    """Attributes of ``obj`` its state neither saves nor declares derived."""
    return set(vars(obj)) - set(state) - set(type(obj).DERIVED)


def _scheduler() -> Scheduler:
    return Scheduler(BlockManager(12, 4, num_host_pages=16), **OPTIONS)


def _busy() -> Scheduler:
    """A scheduler after steps with shared prefixes, forks, swaps and a finished fork."""
    rng = np.random.default_rng(0)
    s = _scheduler()
    prefix = rng.integers(0, 100, 8).tolist()
    for i in range(6):
        s.add_request(str(i), prefix + rng.integers(0, 100, 3 + i).tolist(), max_tokens=20)
    forked = False
    for _ in range(12):
        plan = s.schedule()
        s.update(plan, rng.integers(0, 100, len(plan.seqs)))
        running = [q for q in s.running if q.num_tokens - q.num_computed_tokens == 1]
        if running and not forked:
            s.fork(running[0], running[0].seq_id + "#1", token_id=7)
            forked = True
    s.check()
    assert s.running and s.swapped and s.waiting and s.num_preemptions
    assert any(c > 1 for c in s.block_manager.ref_counts) and s.block_manager.cache
    return s


def _seq_states(seqs) -> list:
    return [q.state_dict() for q in seqs]


def _comparable(state: dict) -> dict:
    """A scheduler's state with the sequences as their states."""
    state = dict(state)
    for name in ("waiting", "running", "swapped"):
        state[name] = sorted(map(str, _seq_states(state[name])))
    state["seqs"] = {k: q.state_dict() for k, q in state["seqs"].items()}
    state["requests"] = {k: _seq_states(g) for k, g in state["requests"].items()}
    return state


def _copied_state(s: Scheduler) -> dict:
    """``s``'s state with every sequence copied (as a snapshot's restore makes them)."""
    seqs = {id(q): Sequence.from_state(q.state_dict()) for q in s.seqs.values()}
    state = copy.deepcopy(s.state_dict(), memo={id(q): seqs[id(q)] for q in s.seqs.values()})
    return state


def _copy(s: Scheduler) -> Scheduler:
    fresh = _scheduler()
    fresh.load_state_dict(_copied_state(s))
    return fresh


def test_every_attribute_is_saved_or_derived():
    s = _busy()
    seq = next(iter(s.seqs.values()))
    request = Request("r", None, [1, 2], SamplingParams(), [5], 0.0)
    request.seqs[seq.seq_id], request.streams[seq.seq_id] = seq, Stream(0, 5)
    for obj, state in [(s, s.state_dict()), (s.block_manager, s.block_manager.state_dict()),
                       (seq, seq.state_dict()), (request, request.state_dict(0.0))]:
        assert undeclared(obj, state) == set(), type(obj).__name__
        assert not set(type(obj).DERIVED) & set(state), type(obj).__name__
        assert set(type(obj).DERIVED) <= set(vars(obj)), type(obj).__name__


def test_a_new_attribute_is_caught():
    """The rule above fails for a class that gains an attribute and saves nothing of it."""
    s = _scheduler()
    s.block_manager.pending_frees = []
    assert undeclared(s.block_manager, s.block_manager.state_dict()) == {"pending_frees"}


def test_engine_and_router_attributes_are_saved_or_derived():
    from jpaged.engine.engine import LLM
    from jpaged.parallel.replicas import Replicas

    engines = [LLM("tiny", page_size=4, num_pages=8).engine for _ in range(2)]
    replicas = Replicas(engines, prefix_routing=True)
    for obj in (engines[0], replicas, replicas.router):
        state = obj.state_dict()
        assert undeclared(obj, state) == set(), type(obj).__name__
        assert set(type(obj).DERIVED) <= set(vars(obj)), type(obj).__name__


def test_round_trip_gives_the_same_state_and_the_same_steps():
    s = _busy()
    fresh = _copy(s)
    assert _comparable(fresh.state_dict()) == _comparable(s.state_dict())
    rng = np.random.default_rng(1)
    for _ in range(10):   # both step on alike: same plans, same pages
        a, b = s.schedule(), fresh.schedule()
        assert [q.seq_id for q in a.seqs] == [q.seq_id for q in b.seqs]
        assert a.num_new_tokens == b.num_new_tokens
        assert all(np.array_equal(x, y) for x, y in zip(a.moves, b.moves))
        assert [q.block_table for q in a.seqs] == [q.block_table for q in b.seqs]
        tokens = rng.integers(0, 100, len(a.seqs))
        s.update(a, tokens), fresh.update(b, tokens)
        fresh.check()
    assert _comparable(fresh.state_dict()) == _comparable(s.state_dict())


@pytest.mark.parametrize("edit, match", [
    (lambda s, st: st["block_manager"]["ref_counts"].__setitem__(3, 9), "ref count 9"),
    (lambda s, st: st["block_manager"]["ref_counts"].append(0), "13 ref counts"),
    (lambda s, st: st["block_manager"]["free_queue"].append(40), "free page 40"),
    (lambda s, st: st["block_manager"]["host_free"].append(-1), "free host page -1"),
    (lambda s, st: st["running"][0].block_table.__setitem__(0, 12), "page 12, outside"),
    (lambda s, st: st["running"][0].block_table.__setitem__(0, -1), "page -1, outside"),
    (lambda s, st: st["waiting"].pop(), "live sequences"),
    (lambda s, st: st["requests"].pop(next(iter(st["requests"]))), "request groups"),
    (lambda s, st: setattr(st["running"][0], "num_computed_tokens",
                           st["running"][0].num_tokens), "nothing left to compute"),
    (lambda s, st: st["running"][0].token_ids.extend([1] * 64), "longer than max_len"),
    (lambda s, st: setattr(st["swapped"][0], "order", st["running"][0].order), "order"),
    (lambda s, st: st.__setitem__("next_fork", -2), "next_fork=-2"),
])
def test_inconsistent_states_are_refused(edit, match):
    s = _busy()
    state = _copied_state(s)
    edit(s, state)
    with pytest.raises(ValueError, match=match):
        _scheduler().load_state_dict(state)
