"""Plan -> ``StepBatch``: the one place that turns a step's plan into device arrays.

The scheduler decides (``StepPlan``: rows, token counts, page moves); ``BatchBuilder``
lays the plan out as a few padded arrays whose shapes come from a small set of buckets,
so a long run compiles a bounded number of programs; the runner feeds the ``StepBatch``
to one jitted step, and ``jpaged.parallel.distributed`` broadcasts it as a flattened pytree.
A new batch field is written here only: a field of ``StepBatch`` and its value in
``BatchBuilder.build`` (tests/test_batch.py checks that every field travels).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import jax
import numpy as np

from jpaged.core.attention import AttentionMetadata
from jpaged.core.cache import PageTable
from jpaged.engine.sampler import SamplingTensors, _token_rule_arrays
from jpaged.engine.sampling_rows import SamplingColumns
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.scheduler import Scheduler, StepPlan
from jpaged.host.sequence import Sequence
from jpaged.core.shapes import bucket, flat_layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Everything one jitted step reads (a pytree). Padded shapes: T tokens, B rows,
    W pages per row, R sampling rows, each a bucket.

    token_ids, positions, slot_mapping, q_seq: ``int32[T]``, the rows' tokens one after
        the other; padding: token 0, position 0, slot 0 (the null page), row 0.
    block_tables: ``int32[B, W]`` padded with 0. context_lens: ``int32[B]``, each row's
        length after this step's tokens are written, 0 for padded rows.
    logits_indices: ``int32[R]``, the flat token whose logits sampling row r uses: rows
        0..B-1 are the plan's rows (0 when padded), the rest extra samples of a row's
        logits (the first tokens of parallel samples). sampling: its ``R`` rows.
    prompt_indices, prompt_targets: ``int32[L]``, the flat tokens whose prompt logprobs
        this step scores and the prompt token that follows each (L = 0 when no row asks
        for prompt logprobs, else a bucket; padding 0).
    is_decode (static): every row has one token and token i belongs to row i (T == B).
    num_top (static): top logprobs to return per sampling row.
    num_prompt_top (static): top logprobs to return per scored prompt token.
    """

    token_ids: jax.Array
    positions: jax.Array
    slot_mapping: jax.Array
    q_seq: jax.Array
    block_tables: jax.Array
    context_lens: jax.Array
    logits_indices: jax.Array
    sampling: SamplingTensors
    prompt_indices: jax.Array = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.int32))
    prompt_targets: jax.Array = dataclasses.field(
        default_factory=lambda: np.zeros(0, np.int32))
    is_decode: bool = dataclasses.field(default=False, metadata=dict(static=True))
    num_top: int = dataclasses.field(default=0, metadata=dict(static=True))
    num_prompt_top: int = dataclasses.field(default=0, metadata=dict(static=True))

    def attention_metadata(self, attention_impl: str = "auto") -> AttentionMetadata:
        """The model's view of this batch; ``attention_impl`` is the runner's choice."""
        return AttentionMetadata(slot_mapping=self.slot_mapping, q_seq=self.q_seq,
                                 positions=self.positions,
                                 page_table=PageTable(self.block_tables, self.context_lens),
                                 is_decode=self.is_decode, attention_impl=attention_impl)


class SamplingRow(NamedTuple):
    """One token to sample: from the logits of plan row ``row``, with ``params`` and
    ``seed``, continuing ``seq`` (its output count is the step index; its tokens feed
    the penalties). bias, mask: the row's token rules this step (``(token id, bias)``
    entries, an ``int32[W]`` allowed bitmask; None: none), see ``jpaged.host.token_rules``."""

    row: int
    params: SamplingParams
    seed: int
    seq: Sequence
    bias: list | None = None
    mask: np.ndarray | None = None


GREEDY = SamplingParams(temperature=0.0)


class BatchBuilder:
    """Lays plans out as ``StepBatch``\\ es. Token, row and page-per-row counts are padded
    to powers of two, at least ``min_token_bucket`` / ``min_seq_bucket`` /
    ``min_page_bucket`` and at most the scheduler's limits."""

    def __init__(self, page_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_pages_per_seq: int, *, min_token_bucket: int = 16,
                 min_seq_bucket: int = 8, min_page_bucket: int = 4):
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_pages_per_seq = max_pages_per_seq
        self.min_token_bucket = min_token_bucket
        self.min_seq_bucket = min_seq_bucket
        self.min_page_bucket = min_page_bucket
        # Sampling parameters by block-table mirror row (see ``jpaged.engine.sampling_rows``);
        # ``persistent=False`` rebuilds them every step (the reference path).
        self.columns: SamplingColumns | None = None
        self.persistent = True

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler, **buckets) -> "BatchBuilder":
        return cls(scheduler.block_manager.page_size, scheduler.max_num_seqs,
                   scheduler.max_num_batched_tokens, scheduler.max_pages_per_seq, **buckets)

    def build(self, plan: StepPlan, sampling: list[SamplingRow] | None = None,
              num_top: int = 0, scored: list[tuple[int, int]] = (),
              num_prompt_top: int = 0, *, lookup=None) -> StepBatch:
        """The batch of ``plan``. sampling: one ``SamplingRow`` per plan row, in order, then
        any extra rows; default: every row greedy. scored: ``(plan row, k)``: score the
        first k tokens of the row's chunk against the token after each (prompt logprobs).
        lookup: instead of ``sampling``, ``seq -> (params, seed)`` for plans whose rows
        are all plain (no token rules, penalties or extra rows): the persistent columns
        ask it only for a row whose owner changed (``SamplingColumns.tensors_of``)."""
        seqs, num_rows, num_tokens = plan.seqs, plan.num_seqs, plan.num_tokens
        counts = np.array(plan.num_new_tokens, np.int32)
        starts = np.array(plan.start_positions, np.int32)
        is_decode = plan.is_decode
        rows = bucket(num_rows, self.min_seq_bucket, self.max_num_seqs)
        tokens = rows if is_decode else bucket(num_tokens, self.min_token_bucket,
                                               self.max_num_batched_tokens)
        width = bucket(max((len(s.block_table) for s in seqs), default=0),
                       self.min_page_bucket, self.max_pages_per_seq)
        padding = len(plan.tables) - 1   # the mirror's all-zero row
        block_tables = plan.tables[plan.table_rows + [padding] * (rows - num_rows), :width]
        row, pos, slots = flat_layout(starts, counts, block_tables, self.page_size)

        token_ids = np.zeros(tokens, np.int32)
        token_ids[:num_tokens] = (   # one token per row is the common step: no slicing
            [s.token_ids[a] for s, a in zip(seqs, plan.start_positions)] if is_decode
            else list(itertools.chain.from_iterable(s.token_ids[a:a + n] for s, a, n in zip(
                seqs, plan.start_positions, plan.num_new_tokens))))
        context_lens = _padded(starts + counts, rows)
        last = np.cumsum(counts) - 1   # flat index of each row's last token
        if lookup is not None and not self.persistent:   # the reference path
            sampling = [SamplingRow(i, *lookup(s), s) for i, s in enumerate(seqs)]
            lookup = None
        elif lookup is not None:
            sampling = []
        elif sampling is None:
            sampling = [SamplingRow(i, GREEDY, 0, s) for i, s in enumerate(seqs)]
        extra = sampling[num_rows:]
        size = bucket(rows + len(extra), rows)
        logits_indices = np.zeros(size, np.int32)
        logits_indices[:num_rows] = last
        logits_indices[rows:rows + len(extra)] = last[[r.row for r in extra]]
        prompt_indices, prompt_targets = self._scored(plan, scored, last - counts + 1)
        if lookup is not None:
            tensors = self._columns(plan).tensors_of(plan.table_rows, seqs, lookup,
                                                     len(plan.tables) - 1, rows)
        else:
            tensors = self._persistent(plan, sampling, rows, size)
        if tensors is None:
            tensors = _sampling_tensors(sampling[:num_rows] + [None] * (rows - num_rows)
                                        + extra, size)
        return StepBatch(
            token_ids=token_ids, positions=_padded(pos, tokens),
            slot_mapping=_padded(slots, tokens), q_seq=_padded(row, tokens),
            block_tables=block_tables, context_lens=context_lens,
            logits_indices=logits_indices,
            sampling=tensors,
            prompt_indices=prompt_indices, prompt_targets=prompt_targets,
            is_decode=is_decode, num_top=num_top, num_prompt_top=num_prompt_top)

    def _persistent(self, plan: StepPlan, sampling: list[SamplingRow], rows: int,
                    size: int) -> SamplingTensors | None:
        """The sampling tensors from the persistent columns, the penalties' histories
        included; None where the rebuild path serves (extra rows of parallel samples)."""
        num_rows = plan.num_seqs
        if not self.persistent or len(sampling) != num_rows or size != rows:
            return None
        padded = sampling + [None] * (rows - num_rows)
        extra = _token_rule_arrays([r and r.bias for r in padded],
                                   [r and r.mask for r in padded], num_rows, rows)
        columns, padding = self._columns(plan), len(plan.tables) - 1
        if any(r.params.uses_penalties for r in sampling):
            histories = columns.histories.arrays(plan.table_rows, [r.seq for r in sampling],
                                                 padding, rows)
        else:
            histories = (np.zeros((rows, 0), np.int32),) * 2
        return columns.tensors(plan.table_rows, sampling, padding, rows,
                               prompt_tokens=histories[0], output_tokens=histories[1], **extra)

    def forget(self) -> None:
        """The host state was undone: the persistent columns rewrite each row from its
        sequence when next used."""
        if self.columns is not None:
            self.columns.forget()

    def _columns(self, plan: StepPlan) -> SamplingColumns:
        """The persistent columns, one row per row of the plan's table mirror."""
        if self.columns is None or len(self.columns.owner) != len(plan.tables):
            self.columns = SamplingColumns(len(plan.tables) - 1)
        return self.columns

    def _scored(self, plan: StepPlan, scored, first: np.ndarray):
        """``prompt_indices`` and ``prompt_targets`` of the ``scored`` rows; ``first``:
        each row's first flat token."""
        total = sum(k for _, k in scored)
        size = bucket(total, self.min_token_bucket, self.max_num_batched_tokens) if total else 0
        indices, targets = np.zeros(size, np.int32), np.zeros(size, np.int32)
        at = 0
        for row, k in scored:
            start = plan.start_positions[row]
            indices[at:at + k] = np.arange(first[row], first[row] + k)
            targets[at:at + k] = plan.seqs[row].token_ids[start + 1:start + 1 + k]
            at += k
        return indices, targets


    def step_shapes(self) -> list[tuple[bool, int, int, int]]:
        """Every ``(is_decode, tokens, rows, pages per row)`` a plan can be padded to: the
        programs warm-up compiles. A decode step has one token per row; otherwise rows
        never outnumber tokens."""
        def buckets(limit: int, minimum: int, start: int = 1) -> dict[int, list[int]]:
            sizes: dict[int, list[int]] = {}   # bucket -> the counts padded to it
            for n in range(start, limit + 1):
                sizes.setdefault(bucket(n, minimum, limit), []).append(n)
            return sizes

        rows = buckets(self.max_num_seqs, self.min_seq_bucket)
        tokens = buckets(self.max_num_batched_tokens, self.min_token_bucket)
        # The tables have max_pages_per_seq columns: a bucket past it is cut to it.
        widths = sorted({min(w, self.max_pages_per_seq)
                         for w in buckets(self.max_pages_per_seq, self.min_page_bucket, 0)})
        shapes = [(True, r, r, w) for r in sorted(rows) for w in widths]
        shapes += [(False, t, r, w) for t in sorted(tokens) for r in sorted(rows)
                   if min(rows[r]) <= max(tokens[t]) for w in widths]
        return shapes

    def warmup_batch(self, is_decode: bool, tokens: int, rows: int, width: int) -> StepBatch:
        """A greedy batch of these shapes that touches only the null page (every token
        writes slot 0; every row reads one token of page 0), built as ``build`` builds
        one, so it compiles the same program."""
        zeros = np.zeros(tokens, np.int32)
        return StepBatch(
            token_ids=zeros, positions=zeros, slot_mapping=zeros, q_seq=zeros,
            block_tables=np.zeros((rows, width), np.int32),
            context_lens=np.ones(rows, np.int32), logits_indices=np.zeros(rows, np.int32),
            sampling=_sampling_tensors([None] * rows, rows), is_decode=is_decode, num_top=0)


def _padded(values, size: int) -> np.ndarray:
    out = np.zeros(size, np.int32)
    out[:len(values)] = values
    return out


def _sampling_tensors(rows: list[SamplingRow | None], size: int) -> SamplingTensors:
    """Padded (None) rows are greedy; histories are copied only when a penalty reads them."""
    params = [r.params if r else GREEDY for r in rows]
    histories = {}
    if any(p.uses_penalties for p in params):
        histories = dict(
            prompt_tokens=[r.seq.token_ids[:r.seq.num_prompt_tokens] if r else [] for r in rows],
            output_tokens=[r.seq.output_token_ids if r else [] for r in rows])
    return SamplingTensors.from_params(
        params, [r.seed if r else 0 for r in rows],
        [r.seq.num_output_tokens if r else 0 for r in rows], batch=size, **histories,
        bias=[r and r.bias for r in rows], masks=[r and r.mask for r in rows])
