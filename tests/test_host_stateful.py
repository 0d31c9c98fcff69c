"""Random operation sequences against BlockManager and Scheduler.

After every step: the pool invariants (no page both free and owned, ref counts equal the
number of block tables holding a page, nothing leaks, page counts per sequence), and a
shadow of the device: each slot records the token prefix whose K/V it would hold, so a
wrong prefix hit, a missed copy-on-write or a bad swap plan shows up as wrong content.
"""

import itertools
import math
import re

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from jpaged.engine.batch import BatchBuilder
from jpaged.host.block_manager import BlockManager
from jpaged.host.scheduler import Scheduler
from jpaged.host.sequence import Sequence, SequenceStatus

RUNNING, WAITING, SWAPPED = SequenceStatus.RUNNING, SequenceStatus.WAITING, SequenceStatus.SWAPPED

STATEFUL = settings(max_examples=max(50, settings.default.max_examples), stateful_step_count=40,
                    deadline=None)

# Prompts share prefixes (and use a 4-token vocabulary) so prefix hits are frequent.
PREFIXES = [(), (1, 2, 3, 0, 1, 2, 3, 0), (1, 2, 3, 0, 2, 2, 2, 2, 1)]
PROMPTS = st.builds(lambda head, tail: list(head) + tail, st.sampled_from(PREFIXES),
                    st.lists(st.integers(0, 3), max_size=8)).filter(bool)
EXTRA_KEYS = st.sampled_from([None, "tenant-a"])


class Shadow:
    """Device and host pools as {page: [content per slot]}; content of the slot of position p
    of a sequence is (extra keys, its tokens up to p): K/V depends on the whole prefix."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self.pools = {"device": {}, "host": {}}

    def copy(self, plan, src: str, dst: str) -> None:
        empty = [None] * self.page_size
        contents = [list(self.pools[src].get(s, empty)) for s, _ in plan]
        for (_, d), content in zip(plan, contents):
            self.pools[dst][d] = content

    def write(self, seq: Sequence, slot: int, pos: int) -> None:
        page, offset = divmod(slot, self.page_size)
        self.pools["device"].setdefault(page, [None] * self.page_size)[offset] = \
            (seq.extra_keys, tuple(seq.token_ids[:pos + 1]))

    def check(self, seq: Sequence) -> None:
        """Every computed position of ``seq`` holds its own K/V, on device or host."""
        pool, table = ((self.pools["host"], seq.host_table) if seq.status is SWAPPED
                       else (self.pools["device"], seq.block_table))
        for pos in range(seq.num_computed_tokens):
            page, offset = table[pos // self.page_size], pos % self.page_size
            assert pool[page][offset] == (seq.extra_keys, tuple(seq.token_ids[:pos + 1])), \
                f"{seq} position {pos}"

    def check_cache(self, bm: BlockManager) -> None:
        """Each cached page holds what its key says, right after its parent's prefix."""
        last = {key_id: self.pools["device"][page][-1] for page, key_id in bm.cache.values()}
        for (parent, tokens, extra), (page, key_id) in bm.cache.items():
            content_extra, prefix = last[key_id]
            assert content_extra == extra and prefix[-len(tokens):] == tokens
            if parent in last:
                assert last[parent][1] + tokens == prefix


def check_pool(bm: BlockManager, seqs) -> None:
    seqs = list(seqs)
    owned = {}
    for seq in seqs:
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert not (seq.block_table and seq.host_table)
        for page in seq.block_table:
            owned[page] = owned.get(page, 0) + 1
    assert 0 not in owned and 0 not in bm.free_queue
    for page in range(1, bm.num_pages):
        assert bm.ref_counts[page] == owned.get(page, 0), f"page {page}"
        assert (page in bm.free_queue) == (page not in owned), f"page {page} free and owned"
    hosts = [h for seq in seqs for h in seq.host_table]
    assert sorted(hosts + bm.host_free) == list(range(bm.num_host_pages))
    assert len(bm.page_keys) == len(bm.cache)
    assert all(bm.page_keys[page] == key for key, (page, _) in bm.cache.items())
    # Empty pages are reused before any cached page is evicted.
    cached = [page in bm.page_keys for page in bm.free_queue]
    assert cached == sorted(cached)


def is_bucket(n: int, minimum: int, maximum: int) -> bool:
    return n == minimum or n == maximum or (n > minimum and n & (n - 1) == 0)


def check_page_counts(seq: Sequence, page_size: int) -> None:
    """A running sequence has ceil(tokens / page_size) pages; just after `update` appended
    a token, the page for that token comes with the next `schedule`."""
    pages = len(seq.block_table)
    pending_decode = seq.num_tokens - seq.num_computed_tokens == 1
    assert pages == math.ceil(seq.num_tokens / page_size) or (
        pending_decode and pages == math.ceil((seq.num_tokens - 1) / page_size)), seq


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_pages=st.integers(2, 20), page_size=st.sampled_from([1, 2, 4]),
                num_host_pages=st.integers(0, 12), watermark=st.sampled_from([0.0, 0.1]),
                caching=st.booleans())
    def setup(self, num_pages, page_size, num_host_pages, watermark, caching):
        self.bm = BlockManager(num_pages, page_size, num_host_pages=num_host_pages,
                               watermark=watermark, enable_prefix_caching=caching)
        self.shadow = Shadow(page_size)
        self.live: list[Sequence] = []
        self.ids = itertools.count()

    def running(self):
        return [s for s in self.live if s.status is RUNNING]

    def compute(self, seq: Sequence) -> None:
        """What a step does: write K/V of the uncomputed tokens, then cache full pages."""
        ps = self.bm.page_size
        for pos in range(seq.num_computed_tokens, seq.num_tokens):
            page = seq.block_table[pos // ps]
            assert self.bm.ref_counts[page] == 1 and page not in self.bm.page_keys
            self.shadow.write(seq, page * ps + pos % ps, pos)
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_full_pages(seq)

    @rule(prompt=PROMPTS, extra=EXTRA_KEYS)
    def allocate(self, prompt, extra):
        seq = Sequence(f"s{next(self.ids)}", prompt, 100, extra_keys=extra)
        if not self.bm.can_allocate(seq):
            return
        cached = self.bm.allocate(seq)
        assert cached % self.bm.page_size == 0 and cached < seq.num_tokens
        seq.num_computed_tokens, seq.status = cached, RUNNING
        self.shadow.check(seq)   # the prefix it was served is its own
        self.live.append(seq)
        self.compute(seq)

    @precondition(lambda self: self.running())
    @rule(data=st.data(), token=st.integers(0, 3))
    def append(self, data, token):
        self.append_token(data.draw(st.sampled_from(self.running())), token)

    def append_token(self, seq, token):
        seq.token_ids.append(token)
        if not self.bm.can_append(seq):
            seq.token_ids.pop()
            return
        copy = self.bm.append_slot(seq)
        if copy is not None:
            src, dst = copy
            assert self.bm.ref_counts[src] >= 1 and self.bm.ref_counts[dst] == 1
            self.shadow.copy([copy], "device", "device")
        self.compute(seq)

    @precondition(lambda self: self.running())
    @rule(data=st.data(), token=st.none() | st.integers(0, 3))
    def fork(self, data, token):
        """A child sharing the parent's pages; with a token, the child writes at once."""
        parent = data.draw(st.sampled_from(self.running()))
        child = Sequence(f"s{next(self.ids)}", parent.token_ids, 100,
                         extra_keys=parent.extra_keys)
        child.num_computed_tokens, child.status = parent.num_computed_tokens, RUNNING
        self.bm.fork(parent, child)
        self.live.append(child)
        if token is not None:
            self.append_token(child, token)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.live))
        self.bm.free(seq)
        self.live.remove(seq)

    @precondition(lambda self: self.running())
    @rule(data=st.data())
    def swap_out(self, data):
        seq = data.draw(st.sampled_from(self.running()))
        if self.bm.can_swap_out(seq):
            self.shadow.copy(self.bm.swap_out(seq), "device", "host")
            seq.status = SWAPPED

    @precondition(lambda self: any(s.status is SWAPPED for s in self.live))
    @rule(data=st.data())
    def swap_in(self, data):
        seq = data.draw(st.sampled_from([s for s in self.live if s.status is SWAPPED]))
        if self.bm.can_swap_in(seq):
            self.shadow.copy(self.bm.swap_in(seq), "host", "device")
            seq.status = RUNNING

    @rule()
    def reset_prefix_cache(self):
        assert self.bm.reset_prefix_cache() == (not self.live)

    @invariant()
    def pool_is_consistent(self):
        check_pool(self.bm, self.live)
        for seq in self.live:
            self.shadow.check(seq)
            if seq.status is RUNNING:
                assert len(seq.block_table) == math.ceil(seq.num_tokens / self.bm.page_size)
        self.shadow.check_cache(self.bm)

    def teardown(self):
        for seq in self.live:
            self.bm.free(seq)
        check_pool(self.bm, [])
        assert self.bm.reset_prefix_cache() and not self.bm.cache
        assert self.bm.num_free_pages == self.bm.num_pages - 1


class SchedulerMachine(RuleBasedStateMachine):
    # Pools from tiny (preemption, swapping) to roomy (forks live long enough to share).
    @initialize(num_pages=st.integers(3, 40), page_size=st.sampled_from([1, 2, 4]),
                num_host_pages=st.integers(0, 16), watermark=st.sampled_from([0.0, 0.1]),
                caching=st.booleans(), max_num_seqs=st.integers(1, 6),
                extra_budget=st.integers(0, 24), max_model_len=st.integers(8, 64),
                mode=st.sampled_from(["recompute", "swap"]),
                policy=st.sampled_from(["fcfs", "priority"]), static=st.booleans())
    def setup(self, num_pages, page_size, num_host_pages, watermark, caching, max_num_seqs,
              extra_budget, max_model_len, mode, policy, static):
        bm = BlockManager(num_pages, page_size, num_host_pages=num_host_pages,
                          watermark=watermark, enable_prefix_caching=caching)
        self.sched = Scheduler(bm, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_seqs + extra_budget,
                               max_model_len=max_model_len, policy=policy,
                               preemption_mode=mode, static_batching=static)
        self.builder = BatchBuilder.for_scheduler(self.sched, min_token_bucket=4,
                                                  min_seq_bucket=2, min_page_bucket=2)
        self.bm = bm
        self.shadow = Shadow(page_size)
        self.expected: dict[str, list[int]] = {}   # seq_id -> the tokens it must have
        self.ids = itertools.count()

    def state(self):
        s = self.sched
        return ([x.seq_id for x in s.running], sorted(x.seq_id for x in s.waiting),
                [x.seq_id for x in s.swapped], list(self.bm.free_queue), list(self.bm.ref_counts))

    @rule(prompts=st.lists(PROMPTS | st.lists(st.integers(0, 3), min_size=12, max_size=40),
                           min_size=1, max_size=3),
          max_tokens=st.integers(1, 24), priority=st.integers(0, 2), extra=EXTRA_KEYS)
    def add(self, prompts, max_tokens, priority, extra):
        for prompt in prompts:
            self.add_one(prompt, max_tokens, priority, extra)

    def add_one(self, prompt, max_tokens, priority, extra):
        rid, before = f"r{next(self.ids)}", self.state()
        if len(prompt) > self.sched.max_model_len:
            with pytest.raises(ValueError, match="longer than max_model_len"):
                self.sched.add_request(rid, prompt, max_tokens, priority, extra_keys=extra)
        elif len(prompt) > self.sched.max_len:
            with pytest.raises(ValueError, match="pages, the pool can give one sequence"):
                self.sched.add_request(rid, prompt, max_tokens, priority, extra_keys=extra)
        else:
            self.sched.add_request(rid, prompt, max_tokens, priority, extra_keys=extra)
            self.expected[rid] = list(prompt)
            return
        assert self.state() == before

    @rule(data=st.data())
    def bad_input(self, data):
        """Each bad input gets its own error and disturbs nothing."""
        before, live = self.state(), sorted(self.sched.requests)
        cases = {
            "empty prompt": lambda: self.sched.add_request("bad", [], 4),
            "max_tokens=0 must be >= 1": lambda: self.sched.add_request("bad", [1, 2], 0),
            "unknown request id 'nope'": lambda: self.sched.abort("nope"),
        }
        if live:
            cases[f"request id '{live[0]}' is already in use"] = \
                lambda: self.sched.add_request(live[0], [1, 2], 4)
        message = data.draw(st.sampled_from(sorted(cases)))
        with pytest.raises(ValueError, match=re.escape(message)):
            cases[message]()
        assert self.state() == before

    @rule(data=st.data(), steps=st.integers(1, 4))
    def step(self, data, steps):
        for _ in range(steps):
            if data.draw(st.integers(0, 4), label="fails (0: yes)") == 0:
                self.failed_step(data, data.draw(st.integers(0, 4)))
            else:
                self.one_step(data)

    def one_step(self, data):
        s, ps = self.sched, self.bm.page_size
        decodes = [x for x in s.running if x.num_tokens - x.num_computed_tokens == 1]
        out = s.schedule()
        rows, n = out.num_seqs, out.num_tokens
        assert n == sum(out.num_new_tokens) <= s.max_num_batched_tokens
        assert rows <= s.max_num_seqs and len(s.running) <= s.max_num_seqs
        assert len({id(x) for x in out.seqs}) == rows and min(out.num_new_tokens, default=1) >= 1
        assert all(x in out.seqs or x in out.preempted for x in decodes), "decode starved"
        for seq, start, k in zip(out.seqs, out.start_positions, out.num_new_tokens):
            assert seq.status is RUNNING and start + k == seq.num_computed_tokens
            assert len(seq.block_table) == math.ceil(seq.num_tokens / ps)
        for x in s.running:
            check_page_counts(x, ps)
        batch = self.builder.build(out)
        self.check_arrays(out, batch)
        # The device step: copies first, then every token writes its slot.
        self.shadow.copy(out.swap_out, "device", "host")
        self.shadow.copy(out.swap_in, "host", "device")
        self.shadow.copy(out.copies, "device", "device")
        written = {}
        for j in range(n):
            seq, pos = out.seqs[batch.q_seq[j]], int(batch.positions[j])
            page = int(batch.slot_mapping[j]) // ps
            assert written.setdefault(page, seq) is seq, "two sequences write one page"
            assert self.bm.ref_counts[page] == 1 and page not in self.bm.page_keys
            self.shadow.write(seq, int(batch.slot_mapping[j]), pos)
        sampled = data.draw(st.lists(st.integers(0, 3), min_size=len(out.sample),
                                     max_size=len(out.sample)))
        for i, seq in enumerate(out.seqs):
            if out.sample[i]:
                self.expected[seq.seq_id].append(sampled[i])
        for seq in s.update(out, sampled):
            assert seq.finish_reason == "length" and seq.token_ids == self.expected[seq.seq_id]
            assert seq.num_output_tokens == seq.max_tokens or seq.num_tokens >= s.max_len

    @rule(data=st.data(), done=st.integers(0, 4))
    def failed_step(self, data, done):
        """A step whose device part fails after ``done`` of its stages (swap-outs,
        swap-ins, copy-on-write copies, the token writes) is rolled back: the invariant's
        shadow check then proves every computed position still holds its own K/V."""
        s = self.sched
        s.begin()
        out = s.schedule()
        batch = self.builder.build(out)
        stages = [lambda: self.shadow.copy(out.swap_out, "device", "host"),
                  lambda: self.shadow.copy(out.swap_in, "host", "device"),
                  lambda: self.shadow.copy(out.copies, "device", "device")]
        stages.append(lambda: [self.shadow.write(out.seqs[batch.q_seq[j]],
                                                 int(batch.slot_mapping[j]),
                                                 int(batch.positions[j]))
                               for j in range(out.num_tokens)])
        if done:
            s.device_may_write()
        for stage in stages[:done]:
            stage()
        s.roll_back()
        s.check()

    def check_arrays(self, out, batch):
        s, ps, n, rows = self.builder, self.bm.page_size, out.num_tokens, out.num_seqs
        T, B = len(batch.token_ids), len(batch.context_lens)
        W = batch.block_tables.shape[1]
        assert batch.block_tables.shape[0] == B and T >= n and B >= rows
        assert out.is_decode == batch.is_decode == (rows > 0 and n == rows)
        assert T == B if out.is_decode else is_bucket(T, s.min_token_bucket,
                                                      s.max_num_batched_tokens)
        assert is_bucket(B, s.min_seq_bucket, s.max_num_seqs)
        assert is_bucket(W, s.min_page_bucket, s.max_pages_per_seq)
        for arr in (batch.positions, batch.slot_mapping, batch.q_seq, batch.token_ids):
            assert arr.dtype.name == "int32" and len(arr) == T and not arr[n:].any()
        for i, seq in enumerate(out.seqs):
            table = batch.block_tables[i]
            assert list(table[:len(seq.block_table)]) == seq.block_table
            assert not table[len(seq.block_table):].any()
            assert batch.context_lens[i] == out.start_positions[i] + out.num_new_tokens[i]
            last = batch.logits_indices[i]
            assert batch.q_seq[last] == i and batch.positions[last] == batch.context_lens[i] - 1
            assert out.sample[i] == (batch.context_lens[i] == seq.num_tokens)
        for j in range(n):
            seq, pos = out.seqs[batch.q_seq[j]], batch.positions[j]
            assert batch.token_ids[j] == seq.token_ids[pos]
            assert batch.slot_mapping[j] == seq.block_table[pos // ps] * ps + pos % ps
        assert not batch.context_lens[rows:].any() and len(out.sample) == rows

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data(), token=st.none() | st.integers(0, 3))
    def fork(self, data, token):
        """Parallel sampling / beam search: a child continues from its own token. Only a
        sequence between two decode steps can fork."""
        parent = data.draw(st.sampled_from(self.sched.running))
        child_id = f"c{next(self.ids)}"
        if parent.num_tokens - parent.num_computed_tokens != 1:
            before = self.state()
            with pytest.raises(ValueError, match="cannot fork sequence"):
                self.sched.fork(parent, child_id, token)
            assert self.state() == before
            return
        child = self.sched.fork(parent, child_id, token)
        self.expected[child_id] = list(self.expected[parent.seq_id])
        if token is not None:
            self.expected[child_id][-1] = token
        # The first write after a fork is the copy-on-write; that step may fail.
        if data.draw(st.booleans()):
            self.one_step(data)
        else:
            self.failed_step(data, data.draw(st.integers(0, 4)))

    @precondition(lambda self: self.sched.seqs)
    @rule(data=st.data(), whole_request=st.booleans())
    def stop(self, data, whole_request):
        """The engine finishes one sequence (EOS) or aborts a whole request."""
        seq = data.draw(st.sampled_from(sorted(self.sched.seqs.values())))
        seqs = list(self.sched.requests[seq.request_id]) if whole_request else [seq]
        if whole_request:
            self.sched.abort(seq.request_id)
        else:
            self.sched.finish(seq, "stop")
        for x in seqs:
            assert x.finish_reason == ("abort" if whole_request else "stop")
            assert not x.block_table and not x.host_table and x.seq_id not in self.sched.seqs

    @rule()
    def reset_prefix_cache(self):
        held = any(x.block_table or x.host_table for x in self.sched.seqs.values())
        assert self.bm.reset_prefix_cache() == (not held)

    @invariant()
    def consistent(self):
        s = self.sched
        check_pool(self.bm, s.seqs.values())
        assert s.running == sorted(s.running) and s.swapped == sorted(s.swapped)
        queues = {RUNNING: s.running, WAITING: s.waiting, SWAPPED: s.swapped}
        assert sum(map(len, queues.values())) == len(s.seqs)
        for seq in s.seqs.values():
            assert seq.token_ids == self.expected[seq.seq_id]
            assert seq in queues[seq.status]
            if seq.status is WAITING:
                assert not seq.block_table and not seq.host_table
            if seq.status is RUNNING:
                check_page_counts(seq, self.bm.page_size)
            self.shadow.check(seq)
        self.shadow.check_cache(self.bm)

    def teardown(self):
        """Everything left runs to completion (no deadlock), then the pool is whole again."""
        s = self.sched
        for _ in range(2000):
            if not s.has_unfinished():
                break
            out = s.schedule()
            s.update(out, [1] * len(out.sample))
        assert not s.has_unfinished(), "requests never finished"
        check_pool(self.bm, [])
        assert self.bm.reset_prefix_cache() and self.bm.num_free_pages == self.bm.num_pages - 1


TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = STATEFUL
TestSchedulerStateful = SchedulerMachine.TestCase
TestSchedulerStateful.settings = STATEFUL
