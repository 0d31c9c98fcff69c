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

    # Every attribute is state (tests/test_state.py checks that ``state_dict`` has them all).
    DERIVED = ()

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

    def state_dict(self) -> dict:
        """Every attribute as plain values (the status by its value)."""
        return {**vars(self), "token_ids": list(self.token_ids), "status": self.status.value,
                "block_table": list(self.block_table), "host_table": list(self.host_table),
                "cache_keys": list(self.cache_keys)}

    @classmethod
    def from_state(cls, state: dict) -> "Sequence":
        """The sequence ``state_dict`` describes. Checks types and lengths (a ValueError
        names the first bad value); the scheduler checks the pages against the pool."""
        seq = cls(_text("seq_id", state["seq_id"]), _ints("token_ids", state["token_ids"]),
                  _int("max_tokens", state["max_tokens"], 1),
                  request_id=_text("request_id", state["request_id"]),
                  order=state["order"], extra_keys=state["extra_keys"])
        if not (isinstance(seq.order, tuple) and len(seq.order) == 3
                and all(isinstance(i, int) for i in seq.order)):
            raise ValueError(f"sequence {seq.seq_id!r}: order={seq.order!r}, expected "
                             f"(priority, arrival, fork)")
        hash(seq.extra_keys)   # TypeError (a malformed snapshot) if not hashable
        seq.num_prompt_tokens = _int("num_prompt_tokens", state["num_prompt_tokens"], 1,
                                     len(seq.token_ids))
        seq.num_computed_tokens = _int("num_computed_tokens", state["num_computed_tokens"], 0,
                                       len(seq.token_ids))
        seq.status = SequenceStatus(state["status"])
        seq.finish_reason = state["finish_reason"]
        if seq.finish_reason is not None:
            _text("finish_reason", seq.finish_reason)
        seq.block_table = _ints("block_table", state["block_table"])
        seq.host_table = _ints("host_table", state["host_table"])
        seq.cache_keys = _ints("cache_keys", state["cache_keys"])
        return seq

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


def _int(name: str, value, low: int, high: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, int) or value < low
            or (high is not None and value > high)):
        raise ValueError(f"{name}={value!r}: expected an int in [{low}, "
                         f"{'...' if high is None else high}]")
    return value


def _ints(name: str, values) -> list[int]:
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a list of ints, got {str(values)[:80]}")
    return list(values)


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r}: expected a string")
    return value
