"""An engine's host state on its own: the scheduler and block manager an `EngineConfig`
describes, and the whole-state check a snapshot runs before any pool is allocated. Both
the engine and `snapshot` use them (no JAX, no model)."""

from __future__ import annotations

import time

import numpy as np

from jpaged.engine.config import EngineConfig
from jpaged.host.block_manager import BlockManager
from jpaged.host.request import Request
from jpaged.host.scheduler import Scheduler
from jpaged.host.sequence import SequenceStatus


def make_scheduler(config: EngineConfig) -> Scheduler:
    """The scheduler and block manager of one replica of an ``LLM`` whose ``config`` has
    every size resolved (``LLM.config``: ``num_pages``, ``num_host_pages``,
    ``max_model_len``)."""
    block_manager = BlockManager(config.num_pages, config.page_size,
                                 num_host_pages=config.num_host_pages,
                                 watermark=config.watermark,
                                 enable_prefix_caching=config.enable_prefix_caching)
    return Scheduler(block_manager, max_num_seqs=config.max_num_seqs,
                     max_num_batched_tokens=config.max_num_batched_tokens,
                     max_model_len=config.max_model_len,
                     preemption_mode=config.preemption_mode,
                     static_batching=config.static_batching)


def check_state(state: dict, scheduler: Scheduler, vocab_size: int):
    """Load ``state`` (``LLMEngine.state_dict``) into ``scheduler`` (host only: no pool,
    no model) and check it whole: the scheduler's own rules (``Scheduler.check``), every
    request's sequences live in the scheduler or finished, every live sequence's request
    known, token ids in ``[0, vocab_size)``, the counters and the RNG state valid. Returns
    ``(requests by id, the numpy Generator)``; raises ValueError naming the first problem.
    A snapshot runs it before allocating any pool, then ``LLMEngine.load_state_dict``."""
    for name in ("next_id", "num_steps"):
        if isinstance(state[name], bool) or not isinstance(state[name], int) or state[name] < 0:
            raise ValueError(f"{name}={state[name]!r}: expected an int >= 0")
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state["rng"]
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"the RNG state does not restore ({error})") from None
    scheduler.load_state_dict(state["scheduler"])
    requests = {}
    for r in state["requests"]:
        request = Request.from_state(r, time.perf_counter())
        if request.request_id in requests:
            raise ValueError(f"request id {request.request_id!r} is given twice")
        requests[request.request_id] = request
        seqs = list(request.seqs.values()) + [seq for _, seq in request.hypotheses]
        tokens = [request.prompt_token_ids] + [seq.token_ids for seq in seqs]
        bad = [t for ids in tokens for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"request {request.request_id!r}: token id {bad[0]} is outside "
                             f"the vocabulary [0, {vocab_size})")
        if request.finished or not any(scheduler.seqs.get(seq_id) is seq
                                       for seq_id, seq in request.seqs.items()):
            raise ValueError(f"request {request.request_id!r} has no live sequence: it would "
                             f"never finish")
        for seq_id, seq in request.seqs.items():
            live = scheduler.seqs.get(seq_id) is seq
            if (seq.seq_id != seq_id or seq.request_id != request.request_id
                    or live == (seq.status is SequenceStatus.FINISHED)):
                raise ValueError(f"request {request.request_id!r}: sequence {seq_id!r} is "
                                 f"{seq.status.value} but {'' if live else 'not '}live in "
                                 f"the scheduler, or filed under another id")
    for request_id, group in scheduler.requests.items():
        request = requests.get(request_id)
        if request is None or any(request.seqs.get(s.seq_id) is not s for s in group):
            raise ValueError(f"the scheduler runs sequences of request {request_id!r}, "
                             f"which the engine does not follow")
    for key, (_, key_id) in scheduler.block_manager.cache.items():
        if (not isinstance(key, tuple) or len(key) != 3 or not isinstance(key[1], tuple)
                or not isinstance(key[0], int) or not 0 <= key[0] < key_id
                or len(key[1]) != scheduler.block_manager.page_size
                or not all(isinstance(t, int) and 0 <= t < vocab_size for t in key[1])):
            raise ValueError(f"prefix-cache key {str(key)[:100]} is not (an earlier parent "
                             f"key id, {scheduler.block_manager.page_size} token ids, extra "
                             f"keys)")
    return requests, rng
