"""Beam search on the engine's sequences: each step every live beam's top ``2 * width``
tokens are ranked together, the best continue (the first of a parent in place, the others
as forks sharing its pages) and those ending on a stop token become finished hypotheses.
The device returns each beam's top ``2 * width`` logprobs; ranking those few candidates is
numpy on the host (``beam_candidates``), not one more device call per request and step."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jpaged.host.request import CompletionOutput, Request, Stream, finished_copy
from jpaged.host.scheduler import Scheduler, StepPlan
from jpaged.host.sequence import Sequence, SequenceStatus
from jpaged.host.stop import StopRules

FINISHED = SequenceStatus.FINISHED


def beam_candidates(logprobs: np.ndarray, beam_scores: np.ndarray,
                    width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One beam-search step for groups of ``width`` beams.

    logprobs: ``f32[G * width, V]``, next-token logprobs of every beam (or each beam's
    top candidates, V of them), a request's beams in consecutive rows. beam_scores:
    ``f32[G * width]``, each beam's cumulative logprob; -inf for beams that do not exist
    (at the first step every beam of a group holds the same prompt, so all but one must be
    -inf or the candidates repeat).
    Returns parents (the row of ``logprobs`` a candidate extends), tokens (columns) and
    cumulative scores, each ``[G, 2 * width]``, best first, ties to the lower index:
    twice the width so that ``width`` beams remain after the engine sets aside candidates
    that end the sequence (as vLLM and HF).
    """
    logprobs, beam_scores = np.asarray(logprobs), np.asarray(beam_scores)
    rows, vocab = logprobs.shape
    if rows % width or 2 * width > width * vocab:
        raise ValueError(f"logprobs of shape {logprobs.shape} do not split into groups of "
                         f"width={width} beams with 2 * width candidates each")
    groups = rows // width
    totals = (beam_scores[:, None] + logprobs).reshape(groups, width * vocab)
    flat = np.argsort(-totals, axis=-1, kind="stable")[:, :2 * width]
    parents = flat // vocab + width * np.arange(groups)[:, None]
    return (parents.astype(np.int32), (flat % vocab).astype(np.int32),
            np.take_along_axis(totals, flat, axis=-1))


def beam_score(cumulative_logprob, num_tokens, length_penalty: float):
    """A finished beam's rank (higher is better): ``cumulative_logprob / num_tokens **
    length_penalty``, vLLM's formula with num_tokens = prompt plus output tokens."""
    return cumulative_logprob / num_tokens ** length_penalty


class BeamStep:
    """One request's chosen candidates this step: (parent index in ``beams``, token,
    cumulative score) that continue, and those that finish."""

    def __init__(self, request: Request, beams: list[Sequence]):
        self.request = request
        self.beams = beams
        self.chosen: list[tuple[int, int, float]] = []
        self.finished: list[tuple[int, int, float]] = []


def choose(plan: StepPlan, requests: dict[str, Request], sampled, tokens: np.ndarray,
           stop: StopRules) -> list[BeamStep]:
    """Choose each beam request's next beams; rewrites ``tokens`` for the parents that
    continue, so ``Scheduler.update`` appends the chosen token."""
    by_request: dict[str, list[int]] = {}
    for row, seq in enumerate(plan.seqs):
        if plan.sample[row] and requests[seq.request_id].beam_width:
            by_request.setdefault(seq.request_id, []).append(row)
    steps = []
    for request_id, rows in by_request.items():
        request = requests[request_id]
        width = request.beam_width
        step = BeamStep(request, [plan.seqs[r] for r in rows])
        beam_scores = [request.streams[s.seq_id].cumulative_logprob for s in step.beams]
        # A preemption or a rolled-back step can split a request's beams over steps, so
        # more than `width` may be live: the best `width` extend, the others are dropped.
        ranked = np.sort(np.argsort(-np.asarray(beam_scores), kind="stable")[:width])
        # Each live beam's top 2 * width tokens hold the global top 2 * width: rank
        # those, padding the group to `width` rows with beams that do not exist.
        top = np.full((width, 2 * width), -np.inf, np.float32)
        top[:len(ranked)] = sampled.top_logprobs[np.asarray(rows)[ranked], :2 * width]
        scores = np.full(width, -np.inf, np.float32)
        scores[:len(ranked)] = np.asarray(beam_scores)[ranked]
        parents, columns, new_scores = (x[0] for x in beam_candidates(top, scores, width))
        parents = ranked[np.minimum(parents, len(ranked) - 1)]
        ids = sampled.top_ids[np.asarray(rows)[parents], columns]
        for parent, token, score in zip(parents, ids, new_scores):
            if len(step.chosen) == width:
                break
            candidate = (int(parent), int(token), float(score))
            ends = stop.is_stop_token(request.params, int(token))
            (step.finished if ends else step.chosen).append(candidate)
        for parent, token, _ in reversed(step.chosen):   # the best one per parent wins
            tokens[rows[parent]] = token
        steps.append(step)
    return steps


def advance(step: BeamStep, scheduler: Scheduler, new_seq_id: Callable[[], str]
            ) -> list[Sequence]:
    """Carry out a beam step: chosen candidates continue their parent beam (the first
    in place, the others as forks sharing its pages); a candidate ending on a stop
    token, or reaching the length limit, becomes a finished hypothesis; beams left
    without a candidate are dropped. Returns the new live beams."""
    request, beams = step.request, step.beams
    for parent, token, score in step.finished:
        _hypothesis(request, beams[parent], token, score, "stop")
    children, continued = [], set()
    for parent, token, score in step.chosen:
        beam = beams[parent]
        if beam.status is FINISHED:   # update() stopped it on length
            _hypothesis(request, beam, token, score, "length")
        elif parent not in continued:        # update() appended this token already
            continued.add(parent)
            request.streams[beam.seq_id].cumulative_logprob = score
        else:
            child_id = new_seq_id()
            child = scheduler.fork(beam, child_id, token)
            request.seqs[child_id] = child
            request.streams[child_id] = Stream(0, request.seeds[0], score)
            children.append(child)
    done = len(request.hypotheses) >= request.beam_width
    for parent, beam in enumerate(beams):
        if beam.status is not FINISHED and parent not in continued:
            scheduler.finish(beam, "pruned")
    for seq_id, seq in list(request.seqs.items()):
        if done and seq.status is not FINISHED:
            scheduler.finish(seq, "pruned")
        if seq.status is FINISHED:   # what it produced lives on in the hypotheses
            del request.seqs[seq_id], request.streams[seq_id]
    return [child for child in children if child.status is not FINISHED]


def completions(request: Request, decode) -> list[CompletionOutput]:
    """The best ``n`` hypotheses (or live beams, before any finished) by length-penalized
    score."""
    penalty = request.params.length_penalty
    pool = list(request.hypotheses) or [(request.streams[s.seq_id].cumulative_logprob, s)
                                        for s in request.seqs.values()]
    ranked = sorted(pool, key=lambda h: -beam_score(h[0], h[1].num_tokens, penalty))
    return [CompletionOutput(i, seq.output_token_ids, decode(seq.output_token_ids), score,
                             None, seq.finish_reason or "length")
            for i, (score, seq) in enumerate(ranked[:request.params.n])]


def _hypothesis(request: Request, beam: Sequence, token: int, score: float,
                reason: str) -> None:
    """A finished beam: ``beam``'s tokens before this step's, then ``token``."""
    request.hypotheses.append((score, finished_copy(
        beam, f"{beam.seq_id}/{len(request.hypotheses)}", token, reason)))
