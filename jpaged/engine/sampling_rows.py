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

The penalties' token histories are kept the same way (``TokenHistories``): a row's prompt
is written when its owner changes and its output tokens are appended as they come, so a
step with penalties copies its new tokens, not every row's whole history.
"""

from __future__ import annotations

import numpy as np

from jpaged.core.shapes import bucket
from jpaged.engine.sampler import MIN_HISTORY_WIDTH, SamplingTensors
from jpaged.host.sequence import PLACEHOLDER

# A history entry whose token is on the device (not -1, the padding: the feed counts them).
IN_FLIGHT = -2

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
        self.histories = TokenHistories(num_rows)

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

    def forget(self) -> None:
        """Rewrite every row from its owner when next used (``TokenHistories.forget``)."""
        self.owner = [None] * len(self.owner)
        self.histories.forget()


class TokenHistories:
    """The penalties' token histories by mirror row, plus the padding row (the last, never
    written): ``prompt int32[num_rows + 1, Cp]`` and ``output int32[num_rows + 1, Co]``,
    -1 padded, their capacities powers of two that double when a history outgrows them.

    A row's prompt is written when its owner (a sequence) changes; its output tokens are
    appended as they come, ``written[row]`` of them so far. A batch is built from tokens
    already committed, so an undone step never takes back tokens written here; a
    sequence found shorter than its row is rewritten all the same, and after an undo the
    engine has every row rewritten (``forget``), as undone host state may be other
    objects. A token the device has not returned yet (async scheduling's placeholder, a
    sequence's last token) is not written: its entry reads ``IN_FLIGHT`` until the
    device fills it from the step that samples it (``overlap.feed``), and the host
    writes it once it knows it."""

    def __init__(self, num_rows: int):
        self.prompt = np.full((num_rows + 1, MIN_HISTORY_WIDTH), -1, np.int32)
        self.output = np.full((num_rows + 1, MIN_HISTORY_WIDTH), -1, np.int32)
        self.owner: list = [None] * (num_rows + 1)
        self.written = [0] * (num_rows + 1)

    def arrays(self, table_rows: list[int], seqs: list, padding: int, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(prompt_tokens, output_tokens)`` of a plan's rows (``seqs[i]`` in mirror row
        ``table_rows[i]``), padded to ``size`` rows with the padding row, each as wide as
        ``SamplingTensors.from_params`` makes it (the longest history's bucket)."""
        longest_prompt = longest_output = 0
        owner, written = self.owner, self.written
        for slot, seq in zip(table_rows, seqs):
            tokens, num_prompt = seq.token_ids, seq.num_prompt_tokens
            num_output = len(tokens) - num_prompt
            if owner[slot] is not seq or num_output < written[slot]:
                self.prompt = _fitted(self.prompt, num_prompt)
                self.prompt[slot] = -1
                self.prompt[slot, :num_prompt] = tokens[:num_prompt]
                self.output[slot] = -1
                owner[slot], written[slot] = seq, 0
            known = num_output - (num_output > 0 and tokens[-1] == PLACEHOLDER)
            done = written[slot]
            if num_output > done:   # the common step: one new token
                self.output = _fitted(self.output, num_output)
                self.output[slot, done:known] = tokens[num_prompt + done:num_prompt + known]
                self.output[slot, known:num_output] = IN_FLIGHT
                written[slot] = known
            longest_prompt = max(longest_prompt, num_prompt)
            longest_output = max(longest_output, num_output)
        index = np.full(size, padding, np.intp)
        index[:len(table_rows)] = table_rows
        return (self.prompt[index, :bucket(longest_prompt, MIN_HISTORY_WIDTH)],
                self.output[index, :bucket(longest_output, MIN_HISTORY_WIDTH)])

    def forget(self) -> None:
        """Rewrite every row from its sequence next time (after an undo of the host state,
        whose sequences may be other objects)."""
        self.owner = [None] * len(self.owner)


def _fitted(history: np.ndarray, length: int) -> np.ndarray:
    """``history``, or a copy with capacity for ``length`` tokens per row (a power of two,
    at least double: a growing history is copied O(log length) times)."""
    if length <= history.shape[1]:
        return history
    grown = np.full((len(history), max(bucket(length, MIN_HISTORY_WIDTH),
                                       2 * history.shape[1])), -1, np.int32)
    grown[:, :history.shape[1]] = history
    return grown
