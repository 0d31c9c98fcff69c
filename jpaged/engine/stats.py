"""The periodic stats line of ``log_stats`` (vLLM's engine log): prompt and generation
throughput since the last line, requests running / waiting / swapped, KV pool use and the
prefix-cache hit rate. Fed the outputs of each step; logs at most once per interval."""

from __future__ import annotations

import logging
import time

from jpaged.engine.config import LOG_STATS_INTERVAL_S

log = logging.getLogger("jpaged.stats")


class StatsLogger:
    def __init__(self, engine, interval: float = LOG_STATS_INTERVAL_S):
        self.engine = engine
        self.interval = interval
        self.last = time.monotonic()
        self.prompt_tokens = self.generation_tokens = 0
        self.seen: dict[str, int] = {}   # tokens reported so far, by unfinished request

    def observe(self, outputs) -> None:
        """Count the tokens of one step's outputs; log when the interval has passed."""
        for output in outputs:
            before = self.seen.pop(output.request_id, None)
            if before is None:
                self.prompt_tokens += len(output.prompt_token_ids)
                before = 0
            tokens = sum(len(c.token_ids) for c in output.outputs)
            self.generation_tokens += max(tokens - before, 0)
            if not output.finished:
                self.seen[output.request_id] = tokens
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.log(now)

    def forget(self, request_id: str) -> None:
        """An aborted request: it will report no more."""
        self.seen.pop(request_id, None)

    def log(self, now: float) -> None:
        elapsed = max(now - self.last, 1e-9)
        m = self.engine.metrics()
        usable = max(m.get("num_pages", 2) - 1, 1)
        log.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f "
                 "tokens/s, Running: %d reqs, Swapped: %d reqs, Pending: %d reqs, KV cache "
                 "usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                 self.prompt_tokens / elapsed, self.generation_tokens / elapsed,
                 m.get("num_running", 0), m.get("num_swapped", 0), m.get("num_waiting", 0),
                 100 * m.get("used_pages", 0) / usable, 100 * m.get("prefix_hit_rate", 0.0))
        self.last = now
        self.prompt_tokens = self.generation_tokens = 0
