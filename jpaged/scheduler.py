"""Continuous batching: queues, token budget, chunked prefill, preemption.

vLLM V1 style: a sequence has ``num_computed_tokens`` catching up with its tokens, so a
step is just "the next k tokens" of each scheduled sequence, a prefill chunk or one decode
token, and one step may mix both.
"""

import bisect
import dataclasses
import heapq
import itertools

import numpy as np

from jpaged.block_manager import BlockManager, cdiv
from jpaged.sequence import Sequence, SequenceStatus

RUNNING, WAITING, SWAPPED, FINISHED = (SequenceStatus.RUNNING, SequenceStatus.WAITING,
                                       SequenceStatus.SWAPPED, SequenceStatus.FINISHED)


def bucket(n: int, minimum: int, maximum: int) -> int:
    """Padded size for ``n``: the next power of two, at least ``minimum``, capped at
    ``maximum`` (when that is larger than ``minimum``), so a run compiles few shapes."""
    return max(minimum, min(1 << max(n - 1, 0).bit_length(), maximum))


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


def flat_layout(starts, counts, block_tables: np.ndarray, page_size: int):
    """Ragged chunks laid end to end, one per table row: chunk i is tokens ``starts[i] ..
    starts[i] + counts[i] - 1`` of row i. Returns the row, position and cache slot of every
    token, each ``int32[sum(counts)]``."""
    counts = np.asarray(counts, np.int32)
    first = np.cumsum(counts) - counts   # flat index of each chunk's first token
    rows = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    positions = (np.asarray(starts, np.int32)[rows]
                 + np.arange(int(counts.sum()), dtype=np.int32) - first[rows])
    slots = block_tables[rows, positions // page_size] * page_size + positions % page_size
    return rows, positions, slots.astype(np.int32)


@dataclasses.dataclass
class SchedulerOutput:
    """One step, as the engine reads it.

    seqs: the scheduled sequences (the rows, decodes first); num_new_tokens[i] tokens of
        row i are computed this step, from position start_positions[i].
    preempted: sequences pushed out this step (back to waiting, or swapped out).
    Before the step the device performs, in this order: ``swap_out`` copies
    (device page -> host page), ``swap_in`` copies (host page -> device page), ``copies``
    (copy-on-write, device src -> dst page): a page freed by a swap-out may be reused in the
    same step. Padded shapes: T tokens, B rows, W pages per row, each a bucket; num_tokens
    is the unpadded T.

    token_ids, positions, slot_mapping, q_seq: ``int32[T]``, the rows' tokens one after the
        other; padding: token 0, position 0, slot 0 (the null page), row 0.
    block_tables: ``int32[B, W]`` padded with 0. context_lens: ``int32[B]``, each row's
        length after this step's tokens are written, 0 for padded rows.
    logits_indices: ``int32[B]``, flat index of each row's last token (0 when padded).
    sample: ``bool[B]``, rows that sample a token: decodes and prefills that complete.
    is_decode: every row has one token and token i belongs to row i (then T == B).
    """

    seqs: list = dataclasses.field(default_factory=list)
    num_new_tokens: list = dataclasses.field(default_factory=list)
    start_positions: list = dataclasses.field(default_factory=list)
    copies: list = dataclasses.field(default_factory=list)
    swap_out: list = dataclasses.field(default_factory=list)
    swap_in: list = dataclasses.field(default_factory=list)
    preempted: list = dataclasses.field(default_factory=list)
    token_ids: np.ndarray = None
    positions: np.ndarray = None
    slot_mapping: np.ndarray = None
    q_seq: np.ndarray = None
    block_tables: np.ndarray = None
    context_lens: np.ndarray = None
    logits_indices: np.ndarray = None
    sample: np.ndarray = None
    is_decode: bool = False
    num_tokens: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)


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
    Buckets: token, row and page-per-row counts are padded to powers of two, at least
    ``min_token_bucket`` / ``min_seq_bucket`` / ``min_page_bucket``.
    """

    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 4096,
                 policy: str = "fcfs", preemption_mode: str = "recompute",
                 static_batching: bool = False, min_token_bucket: int = 16,
                 min_seq_bucket: int = 8, min_page_bucket: int = 4):
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
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.preemption_mode = preemption_mode
        self.static_batching = static_batching
        self.min_token_bucket = min_token_bucket
        self.min_seq_bucket = min_seq_bucket
        self.min_page_bucket = min_page_bucket
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
        self._arrivals = itertools.count()
        self._forks = itertools.count(1)
        self.num_preemptions = 0

    # -- requests --------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids, max_tokens: int, priority: int = 0,
                    extra_keys=None) -> Sequence:
        """Queue a prompt. ``extra_keys`` (hashable) joins every prefix-cache key: prompts
        with different extra keys (adapter, tenant salt) never share cached pages."""
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
        rank = priority if self.policy == "priority" else 0
        seq = Sequence(request_id, prompt, max_tokens, order=(rank, next(self._arrivals), 0),
                       extra_keys=extra_keys)
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
                         order=seq.order[:2] + (next(self._forks),), extra_keys=seq.extra_keys)
        if token_id is not None:
            child.token_ids[-1] = int(token_id)
        child.num_prompt_tokens = seq.num_prompt_tokens
        child.num_computed_tokens = seq.num_computed_tokens
        child.status = RUNNING
        self.block_manager.fork(seq, child)
        self.seqs[child_id] = child
        self.requests[seq.request_id].append(child)
        bisect.insort(self.running, child)
        return child

    def finish(self, seq: Sequence, reason: str = "stop") -> None:
        """Stop one sequence and free its pages."""
        if self.seqs.get(seq.seq_id) is not seq:
            raise ValueError(f"sequence {seq.seq_id!r} is not live")
        if seq.status is WAITING:
            self.waiting.remove(seq)
            heapq.heapify(self.waiting)
        else:   # sorted by order, which is unique: find it in O(log n)
            queue = self.running if seq.status is RUNNING else self.swapped
            del queue[bisect.bisect_left(queue, seq)]
        self.block_manager.free(seq)
        self._tables.release(seq)
        seq.status, seq.finish_reason = FINISHED, reason
        del self.seqs[seq.seq_id]
        siblings = self.requests[seq.request_id]
        siblings.remove(seq)
        if not siblings:
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

    def schedule(self) -> SchedulerOutput:
        """Pick this step's rows, reserve their slots, and build the device arrays."""
        bm, out = self.block_manager, SchedulerOutput()
        running = self.running
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
                seq.num_computed_tokens = bm.allocate(seq)
                budget -= self._admit(out, seq, budget)
        self._fill_arrays(out)
        return out

    def update(self, out: SchedulerOutput, sampled_token_ids) -> list[Sequence]:
        """After the device step: cache the newly computed full pages and append one sampled
        token to each sampling row (``sampled_token_ids[i]`` for row i; padded entries and
        non-sampling rows are ignored). Returns the sequences that stopped on length."""
        stopped, bm = [], self.block_manager
        sampled = np.asarray(sampled_token_ids).ravel()
        if len(sampled) < len(out.seqs):
            raise ValueError(f"{len(sampled)} sampled token ids for {len(out.seqs)} rows")
        sampled = sampled[:len(out.seqs)].tolist()
        for seq, sample, token in zip(out.seqs, out.sample.tolist(), sampled):
            if seq.status is FINISHED:   # finished or aborted since `schedule`
                continue
            if seq.status is RUNNING:
                bm.cache_full_pages(seq)
            if sample:
                seq.token_ids.append(token)
                num_tokens = len(seq.token_ids)
                if (num_tokens - seq.num_prompt_tokens >= seq.max_tokens
                        or num_tokens >= self.max_len):
                    self.finish(seq, "length")
                    stopped.append(seq)
        return stopped

    def metrics(self) -> dict:
        return {**self.block_manager.metrics(self.running), "num_running": len(self.running),
                "num_waiting": len(self.waiting), "num_swapped": len(self.swapped),
                "num_preemptions": self.num_preemptions}

    # -- internals -------------------------------------------------------------------

    def _admit(self, out: SchedulerOutput, seq: Sequence, budget: int) -> int:
        seq.status = RUNNING
        bisect.insort(self.running, seq)
        return self._add_row(out, seq, min(seq.num_tokens - seq.num_computed_tokens, budget))

    def _add_row(self, out: SchedulerOutput, seq: Sequence, n: int) -> int:
        out.seqs.append(seq)
        out.num_new_tokens.append(n)
        out.start_positions.append(seq.num_computed_tokens)
        seq.num_computed_tokens += n   # advanced now, so a second schedule() never repeats it
        return n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        bm = self.block_manager
        self._tables.release(seq)
        if self.preemption_mode == "swap" and bm.can_swap_out(seq):
            out.swap_out += bm.swap_out(seq)
            seq.status = SWAPPED
            bisect.insort(self.swapped, seq)
        else:
            bm.free(seq)
            seq.num_computed_tokens = 0
            seq.status = WAITING
            heapq.heappush(self.waiting, seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _fill_arrays(self, out: SchedulerOutput) -> None:
        ps = self.block_manager.page_size
        seqs, num_rows = out.seqs, len(out.seqs)
        counts = np.array(out.num_new_tokens, np.int32)
        starts = np.array(out.start_positions, np.int32)
        num_tokens = int(counts.sum())
        out.num_tokens = num_tokens
        out.is_decode = 0 < num_rows == num_tokens
        rows = bucket(num_rows, self.min_seq_bucket, self.max_num_seqs)
        tokens = rows if out.is_decode else bucket(num_tokens, self.min_token_bucket,
                                                   self.max_num_batched_tokens)
        table_rows = [self._tables.row(s) for s in seqs]
        width = bucket(max(map(len, (s.block_table for s in seqs)), default=0),
                       self.min_page_bucket, self.max_pages_per_seq)
        out.block_tables = self._tables.array[
            table_rows + [self._tables.padding] * (rows - num_rows), :width]
        row, pos, slots = flat_layout(starts, counts, out.block_tables, ps)

        out.token_ids = np.zeros(tokens, np.int32)
        out.token_ids[:num_tokens] = (   # one token per row is the common step: no slicing
            [s.token_ids[a] for s, a in zip(seqs, out.start_positions)] if out.is_decode
            else list(itertools.chain.from_iterable(s.token_ids[a:a + n] for s, a, n in zip(
                seqs, out.start_positions, out.num_new_tokens))))
        out.positions = np.zeros(tokens, np.int32)
        out.positions[:num_tokens] = pos
        out.q_seq = np.zeros(tokens, np.int32)
        out.q_seq[:num_tokens] = row
        out.slot_mapping = np.zeros(tokens, np.int32)
        out.slot_mapping[:num_tokens] = slots
        out.context_lens = np.zeros(rows, np.int32)
        out.context_lens[:num_rows] = starts + counts
        out.logits_indices = np.zeros(rows, np.int32)
        out.logits_indices[:num_rows] = np.cumsum(counts) - 1
        out.sample = np.zeros(rows, bool)
        out.sample[:num_rows] = out.context_lens[:num_rows] == [len(s.token_ids) for s in seqs]
