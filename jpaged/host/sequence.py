"""One generation stream: its tokens, how many of them have K/V in the cache, its pages."""

import enum
from collections.abc import Hashable


# A token sampled by a step still running on the device (async scheduling): it holds the
# token's place until the step's ids come back; never a real token id.
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


class Sequence:
    """Tokens (prompt + generated) of one stream, and the pages that hold their K/V.

    The scheduler changes the tokens and the status; the block manager changes the pages.
    ``num_computed_tokens`` catches up with ``num_tokens`` (vLLM V1 style): a prefill chunk or
    a decode step is simply the next ``num_tokens - num_computed_tokens`` tokens, or a part.
    ``order`` sorts the queues: (priority, arrival, fork) with lower first; forks sort right
    after their parent.
    """

    def __init__(self, seq_id: str, token_ids: list[int], max_tokens: int, *, request_id=None,
                 order: tuple = (0, 0, 0), extra_keys: Hashable = None):
        self.seq_id = seq_id
        self.request_id = seq_id if request_id is None else request_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.max_tokens = max_tokens
        self.order = order
        self.extra_keys = extra_keys
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason = None
        self.block_table: list[int] = []   # device pages, logical page i -> physical page
        self.host_table: list[int] = []    # host pages while swapped out
        self.cache_keys: list[int] = []    # prefix-cache key ids of its full, computed pages

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def __lt__(self, other: "Sequence") -> bool:
        return self.order < other.order

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.value})")
