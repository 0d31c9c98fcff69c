"""Continuous batching: queues, token budget, chunked prefill, preemption.

vLLM V1 style: a sequence has ``num_computed_tokens`` catching up with its tokens, so a
step is just "the next k tokens" of each scheduled sequence, a prefill chunk or one decode
token, and one step may mix both.
"""

import bisect
import contextlib
import dataclasses
import heapq
from typing import NamedTuple

import numpy as np

from jpaged.host.block_manager import BlockManager
from jpaged.host.journal import truncate, deferred_interrupts
from jpaged.host.sequence import Sequence, SequenceStatus
from jpaged.core.shapes import cdiv

RUNNING, WAITING, SWAPPED, FINISHED = (SequenceStatus.RUNNING, SequenceStatus.WAITING,
                                       SequenceStatus.SWAPPED, SequenceStatus.FINISHED)
# (device pages, host pages) a live sequence of each status holds.
HOLDS = {RUNNING: (True, False), SWAPPED: (False, True), WAITING: (False, False)}


class TableRows:
    """Host mirror of the block tables of scheduled sequences, one row each, updated
    incrementally: converting every table to numpy each step costs far more than copying
    the pages added since the last step. The last row stays all zeros, for padding."""

    def __init__(self, num_rows: int, width: int):
        self.array = np.zeros((num_rows + 1, width), np.int32)
        self.padding = num_rows
        self.free_rows = list(range(num_rows))
        self.rows: dict[str, list[int]] = {}   # seq_id -> [row, pages copied so far]

    def row(self, seq: Sequence) -> int:
        entry = self.rows.get(seq.seq_id)
        if entry is None:
            entry = self.rows[seq.seq_id] = [self.free_rows.pop(), 0]
            self.array[entry[0]] = 0
        table, done = seq.block_table, entry[1]
        if done < len(table):
            self.array[entry[0], done:len(table)] = table[done:]
            entry[1] = len(table)
        return entry[0]

    def rewrite(self, seq: Sequence) -> None:
        """A page of ``seq`` was replaced (copy-on-write): copy its whole table next time."""
        entry = self.rows.get(seq.seq_id)
        if entry is not None:
            entry[1] = 0

    def release(self, seq: Sequence) -> None:
        entry = self.rows.pop(seq.seq_id, None)
        if entry is not None:
            self.free_rows.append(entry[0])

    def reset(self) -> None:
        """Forget every row (after an undo): each table is copied whole on its next use."""
        self.free_rows = list(range(self.padding))
        self.rows = {}


class PageMoves(NamedTuple):
    """The page copies a step needs before it runs, in this order (a page freed by a
    swap-out may be reused in the same step), each ``int32[N, 2]`` rows of (src, dst):
    swap_out (device page -> host page), swap_in (host page -> device page), copies
    (copy-on-write, device page -> device page)."""

    swap_out: np.ndarray
    swap_in: np.ndarray
    copies: np.ndarray


def _pairs(pairs: list[tuple[int, int]]) -> np.ndarray:
    return np.asarray(pairs, np.int32).reshape(-1, 2)


@dataclasses.dataclass
class StepPlan:
    """One step as the scheduler decided it: host values only (``jpaged.engine.batch`` turns it
    into the device arrays).

    seqs: the scheduled sequences (the rows, decodes first); num_new_tokens[i] tokens of
        row i are computed this step, from position start_positions[i]; sample[i]: whether
        row i samples a token (a decode, or a prefill whose last chunk this is).
    table_rows[i]: row i's row in ``tables``, the scheduler's host mirror of the block
        tables (``int32[rows + 1, max pages per sequence]``, the last row all zeros:
        padding), valid until the next ``schedule``.
    copies, swap_out, swap_in: (src, dst) page pairs, see ``PageMoves``.
    preempted: sequences pushed out this step (back to waiting, or swapped out).
    """

    seqs: list = dataclasses.field(default_factory=list)
    num_new_tokens: list = dataclasses.field(default_factory=list)
    start_positions: list = dataclasses.field(default_factory=list)
    sample: list = dataclasses.field(default_factory=list)
    table_rows: list = dataclasses.field(default_factory=list)
    tables: np.ndarray = None
    copies: list = dataclasses.field(default_factory=list)
    swap_out: list = dataclasses.field(default_factory=list)
    swap_in: list = dataclasses.field(default_factory=list)
    preempted: list = dataclasses.field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode(self) -> bool:
        """Every row has one token (then token i belongs to row i)."""
        return 0 < len(self.seqs) == self.num_tokens

    @property
    def moves(self) -> PageMoves:
        return PageMoves(_pairs(self.swap_out), _pairs(self.swap_in), _pairs(self.copies))


class Scheduler:
    """Decides every step which sequences run and how many tokens each.

    Per step, within ``max_num_batched_tokens`` tokens and ``max_num_seqs`` rows: running
    decodes first (one token each; if the pool is out of pages, the newest running
    sequence is preempted), then the next chunks of running prefills, then swapped
    sequences come back, then waiting prompts are admitted (the last two only in a step
    that preempted nothing, and prompts only once nothing is swapped out).

    policy: "fcfs", or "priority" (lower ``priority`` first, then arrival).
    preemption_mode: "recompute" (free the pages; the sequence goes back to the waiting
        queue, ahead of later arrivals, and recomputes all its tokens) or "swap" (to the
        block manager's host pool when it has room, else recompute).
    static_batching: the dense-cache baseline. New prompts join only while no running
        sequence has sampled a token yet (the batch is still filling); once it decodes, the
        batch runs until its last sequence finishes.
    A sequence stops with reason "length" at ``max_tokens`` or when it reaches
    ``max_model_len`` tokens (or what one sequence can hold of the pool, if less).

    Transactions: between ``begin`` and ``commit`` every change is recorded in the block
    manager's ``journal`` before it is made, and ``roll_back`` returns the scheduler, the
    block manager and the sequences to their state at ``begin`` (``jpaged.host.journal``).
    The queues and the block-table mirror are derived from the sequences' statuses and
    tables and rebuilt after an undo, so queue operations cost nothing extra.
    """

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 4096,
                 policy: str = "fcfs", preemption_mode: str = "recompute",
                 static_batching: bool = False):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} must be >= 1")
        if max_num_batched_tokens < max_num_seqs:
            # Every running sequence must be able to decode in every step.
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} must be >= "
                             f"max_num_seqs={max_num_seqs}")
        if max_model_len < 1:
            raise ValueError(f"max_model_len={max_model_len} must be >= 1")
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"policy={policy!r}: expected 'fcfs' or 'priority'")
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode={preemption_mode!r}: expected 'recompute' or 'swap'")
        self.block_manager = block_manager
        self.journal = block_manager.journal
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.preemption_mode = preemption_mode
        self.static_batching = static_batching
        ps = block_manager.page_size
        self.max_len = min(max_model_len, block_manager.num_usable_pages * ps)
        self.max_pages_per_seq = cdiv(self.max_len, ps)
        # Rows are handed out at schedule time, when at most max_num_seqs sequences run.
        self._tables = TableRows(max_num_seqs, self.max_pages_per_seq)
        self.waiting: list[Sequence] = []   # heap by Sequence.order
        self.running: list[Sequence] = []   # sorted by Sequence.order
        self.swapped: list[Sequence] = []   # sorted by Sequence.order
        self.seqs: dict[str, Sequence] = {}                # live sequences by seq_id
        self.requests: dict[str, list[Sequence]] = {}      # live sequences by request id
        self.next_arrival = 0
        self.next_fork = 1
        self.num_preemptions = 0

    # Attributes ``state_dict`` leaves out: the constructor's options, what they determine,
    # ``_tables``, a mirror of the block tables rebuilt on demand, and the block manager's
    # ``journal``, which lives within one transaction.
    DERIVED = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "policy",
               "preemption_mode", "static_batching", "max_len", "max_pages_per_seq", "_tables",
               "journal")

    def state_dict(self) -> dict:
        """The queues, counters and the block manager's state (``block_manager``). The
        sequences are the objects themselves, shared with the requests: the caller writes
        each once (see ``jpaged.engine.snapshot``)."""
        return {"seqs": dict(self.seqs), "waiting": list(self.waiting),
                "running": list(self.running), "swapped": list(self.swapped),
                "requests": {rid: list(group) for rid, group in self.requests.items()},
                "next_arrival": self.next_arrival, "next_fork": self.next_fork,
                "num_preemptions": self.num_preemptions,
                "block_manager": self.block_manager.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Take the state of ``state_dict`` (of a scheduler with these options), then
        ``check`` it: a ValueError names the first broken rule, and the scheduler must not
        be used after one."""
        self.block_manager.load_state_dict(state["block_manager"])
        self.seqs = dict(state["seqs"])
        self.waiting = list(state["waiting"])
        heapq.heapify(self.waiting)
        self.running, self.swapped = sorted(state["running"]), sorted(state["swapped"])
        self.requests = {rid: list(group) for rid, group in state["requests"].items()}
        self.next_arrival = state["next_arrival"]
        self.next_fork = state["next_fork"]
        self.num_preemptions = state["num_preemptions"]
        self._tables = TableRows(self.max_num_seqs, self.max_pages_per_seq)
        for name in ("next_arrival", "next_fork", "num_preemptions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r}: expected an int >= 0")
        try:
            self.check()
        except RuntimeError as error:
            raise ValueError(f"inconsistent scheduler state: {error}") from None
        # Counters ahead of what they numbered: a new order or prefix-cache key id must not
        # repeat a live one (queues bisect on orders; key ids chain cached pages).
        for seq in self.seqs.values():
            if seq.order[1] >= self.next_arrival or seq.order[2] >= self.next_fork:
                raise ValueError(f"{seq} has order {seq.order}, the counters are at arrival "
                                 f"{self.next_arrival}, fork {self.next_fork}")
            if not all(0 < k < self.block_manager.next_key_id for k in seq.cache_keys):
                raise ValueError(f"{seq} names prefix-cache key ids {seq.cache_keys[:8]}, "
                                 f"the key counter is at {self.block_manager.next_key_id}")

    # -- requests --------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids, max_tokens: int, priority: int = 0,
                    extra_keys=None, order: tuple | None = None) -> Sequence:
        """Queue a prompt. ``extra_keys`` (hashable) joins every prefix-cache key: prompts
        with different extra keys (adapter, tenant salt) never share cached pages.
        ``order``: a restarted request's place in the queues (``Sequence.order``), instead
        of a new arrival."""
        prompt = [int(t) for t in prompt_token_ids]
        if request_id in self.requests or request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise ValueError(f"request {request_id!r}: empty prompt")
        if max_tokens <= 0:
            raise ValueError(f"request {request_id!r}: max_tokens={max_tokens} must be >= 1")
        if len(prompt) > self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt of {len(prompt)} tokens is longer "
                             f"than max_model_len={self.max_model_len}")
        if len(prompt) > self.max_len:
            bm = self.block_manager
            raise ValueError(f"request {request_id!r}: prompt of {len(prompt)} tokens needs "
                             f"{cdiv(len(prompt), bm.page_size)} pages, the pool can give one "
                             f"sequence {bm.num_usable_pages}")
        if order is None:
            order = (priority if self.policy == "priority" else 0, self.next_arrival, 0)
            self.journal.attr(self, "next_arrival")
            self.next_arrival += 1
        seq = Sequence(request_id, prompt, max_tokens, order=order, extra_keys=extra_keys)
        journal = self.journal
        journal.item(self.seqs, request_id)
        journal.item(self.requests, request_id)
        self.seqs[request_id] = seq
        self.requests[request_id] = [seq]
        heapq.heappush(self.waiting, seq)
        return seq

    def fork(self, seq: Sequence, child_id: str, token_id: int | None = None) -> Sequence:
        """A child of running ``seq`` sharing its pages (parallel sampling, beam search).

        Call between ``update`` and the next ``schedule``. ``token_id`` replaces the child's
        last token, which has no K/V yet: each child continues from its own sampled token.
        """
        if self.seqs.get(seq.seq_id) is not seq or seq.status is not RUNNING:
            raise ValueError(f"cannot fork sequence {seq.seq_id!r}: it is not running")
        if seq.num_tokens - seq.num_computed_tokens != 1:
            raise ValueError(f"cannot fork sequence {seq.seq_id!r} in the middle of a step or "
                             "of its prefill")
        if child_id in self.seqs:
            raise ValueError(f"sequence id {child_id!r} is already in use")
        child = Sequence(child_id, seq.token_ids, seq.max_tokens, request_id=seq.request_id,
                         order=seq.order[:2] + (self.next_fork,), extra_keys=seq.extra_keys)
        self.journal.attr(self, "next_fork")
        self.next_fork += 1
        if token_id is not None:
            child.token_ids[-1] = int(token_id)
        child.num_prompt_tokens = seq.num_prompt_tokens
        child.num_computed_tokens = seq.num_computed_tokens
        child.status = RUNNING
        journal = self.journal
        journal.item(self.seqs, child_id)
        journal.item(self.requests, seq.request_id)
        self.block_manager.fork(seq, child)
        self.seqs[child_id] = child
        self.requests[seq.request_id] = self.requests[seq.request_id] + [child]
        bisect.insort(self.running, child)
        return child

    def finish(self, seq: Sequence, reason: str = "stop") -> None:
        """Stop one sequence and free its pages."""
        if self.seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"sequence {seq.seq_id!r} is not live")
        journal = self.journal
        journal.vars(seq)
        journal.item(self.seqs, seq.seq_id)
        journal.item(self.requests, seq.request_id)
        if seq.status is WAITING:
            self.waiting.remove(seq)
            heapq.heapify(self.waiting)
        else:
            self._dequeue(seq)
        self.block_manager.free(seq)
        self._tables.release(seq)
        seq.status, seq.finish_reason = FINISHED, reason
        del self.seqs[seq.seq_id]
        siblings = [s for s in self.requests[seq.request_id] if s is not seq]
        if siblings:
            self.requests[seq.request_id] = siblings
        else:
            del self.requests[seq.request_id]

    def abort(self, request_id: str) -> None:
        """Stop every sequence of a request, wherever it is, and free what it holds."""
        if request_id not in self.requests:
            raise ValueError(f"unknown request id {request_id!r}")
        for seq in list(self.requests[request_id]):
            self.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    # -- steps -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Pick this step's rows and reserve their slots. Inside a transaction
        (``begin``), a fault part way is undone by ``roll_back``."""
        out = StepPlan(tables=self._tables.array)
        self._plan(out)
        return out

    # -- transactions ----------------------------------------------------------------

    def begin(self) -> None:
        """Start recording every change (a step, or a request added or aborted)."""
        self.block_manager.taken = []
        self.journal.begin()

    def commit(self) -> None:
        self.journal.commit()

    @contextlib.contextmanager
    def transaction(self):
        """``begin``; ``commit`` if the body returns, ``roll_back`` if it raises."""
        self.begin()
        try:
            yield
            self.commit()
        except BaseException:
            with deferred_interrupts():
                self.roll_back()
            raise

    @contextlib.contextmanager
    def only(self, request_ids):
        """Plan for the sequences of ``request_ids`` alone (fault isolation): the others
        are hidden from the queues, which are derived state, and come back after."""
        ids = set(request_ids)
        self.running = [s for s in self.running if s.request_id in ids]
        self.swapped = [s for s in self.swapped if s.request_id in ids]
        self.waiting = [s for s in self.waiting if s.request_id in ids]
        heapq.heapify(self.waiting)
        try:
            yield
        finally:
            self._rebuild_queues()

    def device_may_write(self) -> None:
        """The step's page moves and device step are about to start: from here, an undo
        also repairs the pages they may have overwritten (see ``roll_back``)."""
        self.journal.device = True

    def roll_back(self) -> None:
        """Return to the state at ``begin``: the journal is replayed backwards, then the
        queues, the free queue and the table mirror are rebuilt from what it restored.

        If the device may have run part of the step, the pages the step took from the free
        queue may hold what it wrote: K/V of this step's tokens (harmless, the rows
        recompute them), a swapped-in or copied page, or K/V over a page a sequence this
        step preempted or swapped out held before and holds again now. Those pages leave
        the prefix cache, and a sequence holding one recomputes (back to waiting). Every
        other page holds what it held before the step: a step writes only its rows'
        slots past their computed tokens and the pages it took; the host pages a
        swap-out wrote were free before (no step both swaps in and out)."""
        bm, written = self.block_manager, self.journal.device
        self.journal.undo()
        bm.rebuild_free_queue()
        self._rebuild_queues()
        taken, bm.taken = set(bm.taken), []
        if written and taken:
            bm.forget_pages(taken)
            for seq in list(self.running):
                if not taken.isdisjoint(seq.block_table):
                    self._recompute(seq)

    def _rebuild_queues(self) -> None:
        queues = {RUNNING: [], SWAPPED: [], WAITING: []}
        for seq in self.seqs.values():
            queues[seq.status].append(seq)
        self.running, self.swapped = sorted(queues[RUNNING]), sorted(queues[SWAPPED])
        self.waiting = queues[WAITING]
        heapq.heapify(self.waiting)
        self._tables.reset()

    def restart(self, seq: Sequence) -> None:
        """Recompute ``seq`` from its tokens (its step was cancelled after its plan was
        committed: async scheduling): running or swapped, it goes back to waiting; a
        finished one (on length, by the token the cancelled step was to sample) comes back
        to waiting. Not journaled: for recovery, outside a transaction."""
        if seq.status is WAITING:
            return
        if seq.status is FINISHED:
            seq.status, seq.finish_reason, seq.num_computed_tokens = WAITING, None, 0
            self.seqs[seq.seq_id] = seq
            self.requests[seq.request_id] = self.requests.get(seq.request_id, []) + [seq]
            heapq.heappush(self.waiting, seq)
            return
        self._recompute(seq)

    def drop_device_pages(self) -> None:
        """The device pool was lost (a failed step consumed the donated cache and a zeroed
        one replaced it): every running sequence recomputes, and the prefix cache, whose
        pages are gone, is forgotten. Swapped sequences keep their host pages; their prefix
        keys are forgotten too, so their pages are registered afresh once back."""
        for seq in list(self.running):
            self._recompute(seq)
        for seq in self.swapped:
            seq.cache_keys = []
        self.block_manager.forget_prefix_cache()

    def _plan(self, out: StepPlan) -> None:
        bm, running = self.block_manager, self.running
        while len(running) > self.max_num_seqs:   # forks can overfill: the newest wait
            self._preempt(running.pop(), out)
        # Decodes. Victims come from the end of `running`, which this loop has not reached,
        # or are the current sequence itself. max_num_seqs <= budget: all decodes fit.
        prefills, i = [], 0
        while i < len(running):
            seq = running[i]
            pending = len(seq.token_ids) - seq.num_computed_tokens
            if pending == 1:
                while not bm.can_append(seq):
                    victim = running.pop()
                    self._preempt(victim, out)
                    if victim is seq:
                        break
                else:
                    copy = bm.append_slot(seq)
                    if copy is not None:
                        out.copies.append(copy)
                        self._tables.rewrite(seq)
                    self._add_row(out, seq, 1)
            elif pending > 1:
                prefills.append(seq)
            i += 1
        budget = self.max_num_batched_tokens - len(out.seqs)
        for seq in prefills:   # the next chunks of prompts already admitted
            if not budget:
                break
            budget -= self._add_row(out, seq, min(len(seq.token_ids) - seq.num_computed_tokens,
                                                  budget))
        if not out.preempted:
            while self.swapped and budget and len(running) < self.max_num_seqs:
                seq = self.swapped[0]
                if not bm.can_swap_in(seq):
                    break
                del self.swapped[0]
                out.swap_in += bm.swap_in(seq)
                bm.append_slot(seq)   # private pages: at most a new page, never a copy
                budget -= self._admit(out, seq, budget)
            filling = not (self.static_batching and any(s.num_output_tokens for s in running))
            while (filling and not self.swapped and self.waiting and budget
                   and len(running) < self.max_num_seqs):
                seq = self.waiting[0]
                if not bm.can_allocate(seq):
                    break
                heapq.heappop(self.waiting)
                self.journal.attr(seq, "num_computed_tokens")
                seq.num_computed_tokens = bm.allocate(seq)
                budget -= self._admit(out, seq, budget)
        out.table_rows = [self._tables.row(seq) for seq in out.seqs]

    def update(self, out: StepPlan, sampled_token_ids) -> list[Sequence]:
        """After the device step (or after dispatching it: async scheduling appends
        placeholders), cache the newly computed full pages and append one sampled
        token to each sampling row (``sampled_token_ids[i]`` for row i; padded entries and
        non-sampling rows are ignored). Returns the sequences that stopped on length."""
        stopped, bm, journal = [], self.block_manager, self.journal
        log = journal.log if journal.active else None
        sampled = np.asarray(sampled_token_ids).ravel()
        if len(sampled) < len(out.seqs):
            raise ValueError(f"{len(sampled)} sampled token ids for {len(out.seqs)} rows")
        sampled = sampled[:len(out.seqs)].tolist()
        for seq, sample, token in zip(out.seqs, out.sample, sampled):
            if seq.status is FINISHED:   # finished or aborted since `schedule`
                continue
            if seq.status is RUNNING:
                bm.cache_full_pages(seq)
            if sample:
                if log is not None:   # Journal.length, inlined: once per row and step
                    log.append((truncate, seq.token_ids, len(seq.token_ids)))
                seq.token_ids.append(token)
                num_tokens = len(seq.token_ids)
                if (num_tokens - seq.num_prompt_tokens >= seq.max_tokens
                        or num_tokens >= self.max_len):
                    self.finish(seq, "length")
                    stopped.append(seq)
        return stopped

    def check(self) -> None:
        """Check the host state between steps (tests, soaks, debugging, restored
        snapshots): every live sequence sits once in the queue of its status and in its
        request's group, holding the pages that status allows, in range; a running one has
        a token left to compute (else it would never be scheduled again) and no more
        tokens than ``max_len``; orders are unique (the queues bisect on them); then the
        block manager's ``check_pages`` (ref counts equal holders, the free queue holds
        exactly the pages nobody holds, host pages free or held once). Raises RuntimeError
        naming the first broken rule."""
        bm, holders, host = self.block_manager, [0] * self.block_manager.num_pages, []
        queues = {RUNNING: self.running, SWAPPED: self.swapped, WAITING: self.waiting}
        if sum(map(len, queues.values())) != len(self.seqs):
            raise RuntimeError(f"{len(self.seqs)} live sequences, "
                               f"{sum(map(len, queues.values()))} queued")
        where = {id(seq): status for status, queue in queues.items() for seq in queue}
        grouped = {id(seq): rid for rid, group in self.requests.items() for seq in group}
        if len(grouped) != len(self.seqs) or not all(self.requests.values()):
            raise RuntimeError(f"{len(self.seqs)} live sequences, {len(grouped)} in request "
                               f"groups")
        if len({seq.order for seq in self.seqs.values()}) != len(self.seqs):
            raise RuntimeError("two live sequences share a place in the queues (order)")
        for seq_id, seq in self.seqs.items():
            if seq.seq_id != seq_id or grouped.get(id(seq)) != seq.request_id:
                raise RuntimeError(f"{seq} is filed under {seq_id!r} / request "
                                   f"{grouped.get(id(seq))!r}")
            if where.get(id(seq)) is not seq.status:
                raise RuntimeError(f"{seq} is not in the queue of its status")
            if (bool(seq.block_table), bool(seq.host_table)) != HOLDS[seq.status]:
                raise RuntimeError(f"{seq} holds {len(seq.block_table)} pages and "
                                   f"{len(seq.host_table)} host pages")
            pages = seq.block_table or seq.host_table
            if seq.num_tokens > self.max_len or len(pages) > self.max_pages_per_seq:
                raise RuntimeError(f"{seq} is longer than max_len={self.max_len} tokens or "
                                   f"{self.max_pages_per_seq} pages")
            if seq.status is not WAITING and not (
                    seq.num_computed_tokens < seq.num_tokens
                    and seq.num_computed_tokens <= len(pages) * bm.page_size):
                raise RuntimeError(f"{seq} has nothing left to compute or too few pages "
                                   f"({len(pages)})")
            if seq.status is WAITING and seq.num_computed_tokens:
                raise RuntimeError(f"{seq} is waiting with computed tokens")
            if len(seq.cache_keys) > len(pages):
                raise RuntimeError(f"{seq}: {len(seq.cache_keys)} prefix-cache keys for "
                                   f"{len(pages)} pages")
            for page in seq.block_table:
                if not 0 < page < bm.num_pages:
                    raise RuntimeError(f"{seq} holds page {page}, outside [1, {bm.num_pages})")
                holders[page] += 1
            host += seq.host_table
        bm.check_pages(holders, host)

    def metrics(self) -> dict:
        return {**self.block_manager.metrics(self.running), "num_running": len(self.running),
                "num_waiting": len(self.waiting), "num_swapped": len(self.swapped),
                "num_preemptions": self.num_preemptions}

    # -- internals -------------------------------------------------------------------

    def _admit(self, out: StepPlan, seq: Sequence, budget: int) -> int:
        self.journal.attr(seq, "status")
        seq.status = RUNNING
        bisect.insort(self.running, seq)
        return self._add_row(out, seq, min(seq.num_tokens - seq.num_computed_tokens, budget))

    def _add_row(self, out: StepPlan, seq: Sequence, n: int) -> int:
        start, journal = seq.num_computed_tokens, self.journal
        out.seqs.append(seq)
        out.num_new_tokens.append(n)
        out.start_positions.append(start)
        if journal.active:   # Journal.attr, inlined: once per row and step
            journal.log.append((setattr, seq, "num_computed_tokens", start))
        seq.num_computed_tokens = start + n   # now, so a second schedule() never repeats it
        out.sample.append(seq.num_computed_tokens == len(seq.token_ids))
        return n

    def _preempt(self, seq: Sequence, out: StepPlan) -> None:
        bm, journal = self.block_manager, self.journal
        if self.preemption_mode == "swap" and bm.can_swap_out(seq):
            self._tables.release(seq)
            journal.attr(seq, "status")
            out.swap_out += bm.swap_out(seq)
            seq.status = SWAPPED
            bisect.insort(self.swapped, seq)
        else:
            self._requeue(seq)
        out.preempted.append(seq)
        journal.attr(self, "num_preemptions")
        self.num_preemptions += 1

    def _dequeue(self, seq: Sequence) -> None:
        """Take running or swapped ``seq`` out of its queue: sorted by order, which is
        unique, so found in O(log n)."""
        queue = self.running if seq.status is RUNNING else self.swapped
        del queue[bisect.bisect_left(queue, seq)]

    def _recompute(self, seq: Sequence) -> None:
        self._dequeue(seq)
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Free ``seq``'s pages and send it back to the waiting queue to recompute."""
        self.journal.vars(seq)
        self._tables.release(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = WAITING
        heapq.heappush(self.waiting, seq)
