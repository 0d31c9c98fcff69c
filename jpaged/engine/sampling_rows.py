"""Per-row sampling parameters kept in persistent arrays (issue 21, item 2).

A row's temperature, top-k, top-p, min-p, penalties and seed do not change while its
sequence runs, so they are written once, when the sequence takes a row of the scheduler's
block-table mirror (``StepPlan.table_rows``), and each step gathers its rows' values with
one numpy index instead of rebuilding every column from the params in Python. A row whose
owner changed (another sequence, a fork, a restart after an undo reassigned the mirror) is
rewritten; one that left needs nothing: its next owner rewrites it. The mirror's last row
is padding and stays greedy with every filter off, so padded rows come out of the same
gather. ``SamplingTensors.from_params`` stays the reference (tests compare the two).

A row's step index (its sequence's output count) is its length less the prompt length,
which the row keeps too. With a ``lookup`` (``tensors_of``), a step whose rows are all
plain (no token rules, no extra rows) builds no per-row record at all: only a row whose
owner changed asks the engine for its params and seed.
"""

from __future__ import annotations

import numpy as np

from jpaged.engine.sampler import SamplingTensors

# The float columns in order, with the value a padded (greedy, unfiltered) row holds.
FLOATS = (("temperature", 0.0), ("top_p", 1.0), ("min_p", 0.0), ("repetition_penalty", 1.0),
          ("presence_penalty", 0.0), ("frequency_penalty", 0.0))


class SamplingColumns:
    """``num_rows`` rows of sampling parameters plus one padding row (the last)."""

    def __init__(self, num_rows: int):
        self.floats = np.array([[fill] * (num_rows + 1) for _, fill in FLOATS], np.float32)
        self.top_k = np.zeros(num_rows + 1, np.int32)
        self.seed = np.zeros(num_rows + 1, np.uint32)
        self.prompt_len = np.zeros(num_rows + 1, np.int32)
        self.owner: list = [None] * (num_rows + 1)   # (seq, params, seed) of each row

    def tensors(self, table_rows: list[int], sampling: list, padding: int,
                size: int, **extra) -> SamplingTensors:
        """The ``SamplingTensors`` of a plan's rows (``sampling[i]``: row i's
        ``SamplingRow``, in mirror row ``table_rows[i]``), padded to ``size`` with the
        padding row. ``extra``: ``prompt_tokens``, ``output_tokens`` and the token-rule
        arrays, already padded (built per step: they change every step)."""
        owner = self.owner
        for slot, r in zip(table_rows, sampling):
            held = owner[slot]
            if held is None or held[0] is not r.seq or held[1] is not r.params or held[2] != r.seed:
                self._write(slot, r.seq, r.params, r.seed)
        return self._gather(table_rows, [r.seq for r in sampling], padding, size, extra)

    def tensors_of(self, table_rows: list[int], seqs: list, lookup, padding: int,
                   size: int) -> SamplingTensors:
        """``tensors`` of a plan whose rows are all plain (``seqs[i]`` in mirror row
        ``table_rows[i]``): a row whose owner changed is written from ``lookup(seq) ->
        (params, seed)``; the others cost one identity check."""
        owner = self.owner
        for slot, seq in zip(table_rows, seqs):
            held = owner[slot]
            if held is None or held[0] is not seq:
                self._write(slot, seq, *lookup(seq))
        empty = np.zeros((size, 0), np.int32)   # no history, no token rules
        return self._gather(table_rows, seqs, padding, size,
                            dict(prompt_tokens=empty, output_tokens=empty))

    def _gather(self, table_rows, seqs, padding: int, size: int, extra: dict
                ) -> SamplingTensors:
        index = np.full(size, padding, np.intp)
        index[:len(table_rows)] = table_rows
        steps = np.zeros(size, np.int32)
        steps[:len(seqs)] = [len(seq.token_ids) for seq in seqs]
        steps -= self.prompt_len[index]
        floats = self.floats[:, index]
        return SamplingTensors(**{name: floats[i] for i, (name, _) in enumerate(FLOATS)},
                               top_k=self.top_k[index], seed=self.seed[index], step=steps,
                               **extra)

    def _write(self, slot: int, seq, p, seed: int) -> None:
        self.floats[:, slot] = (p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                                p.presence_penalty, p.frequency_penalty)
        self.top_k[slot] = max(p.top_k, 0)
        self.seed[slot] = seed % 2**32
        self.prompt_len[slot] = seq.num_prompt_tokens
        self.owner[slot] = (seq, p, seed)
