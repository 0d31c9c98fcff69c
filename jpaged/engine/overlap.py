"""Async scheduling's records: the step in flight, and how its tokens reach the next step.

With ``async_scheduling`` the engine plans, builds and dispatches step N+1 before step N's
sampled ids come back (``LLMEngine._step_async``). Each sampling row of a dispatched step
appends a ``PLACEHOLDER`` to its sequence, so the next plan continues the row; the next
batch takes that token from step N's device output (``feed``), never from the host.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from jpaged.engine.batch import StepBatch
from jpaged.engine.sampling_rows import IN_FLIGHT
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.scheduler import StepPlan
from jpaged.host.sequence import PLACEHOLDER


@dataclasses.dataclass
class InFlight:
    """A step dispatched to the device whose sampled ids the host has not applied.

    result: its ``SamplerOutput`` of device arrays; ``sampled``: the same fetched to numpy
    (kept, so a step applied again after a failed host update does not wait twice).
    placeholders: seq_id -> (plan row, index in its ``token_ids``) of each sampling row.
    scored: the batch's prompt-logprob rows (``LLMEngine._scored``)."""

    plan: StepPlan
    batch: StepBatch
    result: object
    placeholders: dict
    scored: list
    sampled: object = None


def needs_each_token(params: SamplingParams) -> bool:
    """Whether a request's next step needs its last token on the host before it is planned
    (parallel samples and beams fork from it, even a beam search of width 1 chooses
    through its candidates; token rules and grammars constrain the next one): async
    scheduling steps synchronously while such a request lives. Penalties need no such
    thing: the token in flight reaches their history on the device (``feed``)."""
    return params.num_sequences > 1 or params.use_beam_search or params.uses_token_rules


def placeholders_of(plan: StepPlan) -> dict:
    """``InFlight.placeholders`` of ``plan``, before its placeholders are appended: each
    running sampling row's next token goes at the end of its sequence."""
    return {seq.seq_id: (row, len(seq.token_ids))
            for row, (seq, sample) in enumerate(zip(plan.seqs, plan.sample)) if sample}


class Feed(NamedTuple):
    """What ``ModelRunner.dispatch`` takes from the step in flight: flat token
    ``token_index[i]`` of the batch is ``tokens[token_rows[i]]``, and so is entry
    ``(history_rows[j], history_cols[j])`` of its penalties' output history with
    ``tokens[history_from[j]]`` (``tokens``: the step in flight's
    ``SamplerOutput.tokens``, on the device)."""

    token_index: np.ndarray
    token_rows: np.ndarray
    tokens: object
    history_rows: np.ndarray
    history_cols: np.ndarray
    history_from: np.ndarray


def feed(plan: StepPlan, batch: StepBatch, prev: InFlight | None) -> Feed | None:
    """``ModelRunner.dispatch``'s feed for ``plan``: each row whose chunk ends on a
    placeholder ``prev`` samples takes that token, into its input and (penalties) into
    its output history; None if none. Raises RuntimeError if the batch holds a
    placeholder or an ``IN_FLIGHT`` history entry nothing feeds (a bug: the step would
    embed id -1, or a penalty would miss a token)."""
    index, rows, history, end = [], [], [], 0
    if prev is not None:
        for row, (seq, start, n) in enumerate(zip(plan.seqs, plan.start_positions,
                                                  plan.num_new_tokens)):
            end += n
            source = prev.placeholders.get(seq.seq_id)
            if (source is not None and source[1] == start + n - 1
                    and seq.token_ids[source[1]] == PLACEHOLDER):
                index.append(end - 1)
                rows.append(source[0])
                history.append((row, source[1] - seq.num_prompt_tokens, source[0]))
    holes = int(np.count_nonzero(np.asarray(batch.token_ids) == PLACEHOLDER))
    if holes != len(index):
        raise RuntimeError(f"the batch holds {holes} placeholder tokens, {len(index)} are "
                           f"fed from the step in flight")
    outputs = np.asarray(batch.sampling.output_tokens)
    if not outputs.shape[1]:
        history = []
    holes = int(np.count_nonzero(outputs == IN_FLIGHT))
    if holes != len(history):
        raise RuntimeError(f"the batch's penalty histories hold {holes} tokens in flight, "
                           f"{len(history)} are fed from the step in flight")
    if not index:
        return None
    tokens = prev.result.tokens if prev.sampled is None else prev.sampled.tokens
    history = np.asarray(history, np.int32).reshape(-1, 3)
    return Feed(np.asarray(index, np.int32), np.asarray(rows, np.int32), tokens,
                history[:, 0], history[:, 1], history[:, 2])
