"""Data parallelism: several engines, each on its own devices, behind one engine interface.

Each replica is a whole ``LLMEngine`` (its own KV pool, block manager and scheduler on
its own devices, see ``jpaged.parallel.mesh.Layout``). A ``Router`` sends each new request to
one replica; ``Replicas.step`` advances every busy replica, in threads, so one replica's
device work overlaps the others' (JAX releases the GIL while a step runs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from jpaged.core.interfaces import Engine

from jpaged.host.journal import deferred_interrupts
from jpaged.host.request import prompt_token_ids

# A prefix match is ignored when its replica has this many more unfinished requests than
# the least loaded one: a shared system prompt must not pin every request to one replica.
MAX_IMBALANCE = 8


class Router:
    """Chooses each request's replica; host-only.

    Least loaded: fewest unfinished requests, ties to the lower index. With
    ``prefix_aware``, the replica holding the longest prefix of the prompt (in whole pages
    of ``page_size`` tokens) wins instead, unless it is ``MAX_IMBALANCE`` requests busier
    than the least loaded. What a replica holds is the router's own record of the prompts
    it sent there, each replica remembering its ``capacity`` most recently used pages
    (its pool's size): an estimate of the prefix cache that never reads the engines.
    """

    def __init__(self, num_replicas: int, page_size: int, capacity: int,
                 prefix_aware: bool = False):
        if num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas} must be >= 1")
        self.page_size = page_size
        self.capacity = capacity
        self.prefix_aware = prefix_aware
        self.pages: list[OrderedDict] = [OrderedDict() for _ in range(num_replicas)]

    DERIVED = ("page_size", "capacity", "prefix_aware")   # the constructor's options

    def state_dict(self) -> dict:
        """Each replica's page keys, least recently used first."""
        return {"pages": [list(pages) for pages in self.pages]}

    def load_state_dict(self, state: dict) -> None:
        pages = state["pages"]
        if len(pages) != len(self.pages) or not all(
                isinstance(k, int) for keys in pages for k in keys):
            raise ValueError(f"router state for {len(pages)} replicas (of int page keys), "
                             f"this router has {len(self.pages)}")
        self.pages = [OrderedDict.fromkeys(keys[-self.capacity:]) for keys in pages]

    def _keys(self, token_ids) -> list[int]:
        """One key per full page of the prompt, chained so a key names the whole prefix."""
        keys, key, ps = [], 0, self.page_size
        for start in range(0, len(token_ids) // ps * ps, ps):
            key = hash((key, tuple(token_ids[start:start + ps])))
            keys.append(key)
        return keys

    def choose(self, token_ids, loads: list[int]) -> int:
        """The replica for a prompt, given each replica's number of unfinished requests."""
        least = min(range(len(loads)), key=lambda r: (loads[r], r))
        if not self.prefix_aware:
            return least
        keys = self._keys(token_ids)
        held = {r: self._held(r, keys) for r in range(len(loads))
                if loads[r] <= loads[least] + MAX_IMBALANCE}
        return max(held, key=lambda r: (held[r], -loads[r], -r))

    def _held(self, replica: int, keys: list[int]) -> int:
        """How many leading pages of a prompt (``keys``) the record says ``replica`` holds."""
        pages = self.pages[replica]
        return next((i for i, key in enumerate(keys) if key not in pages), len(keys))

    def record(self, replica: int, token_ids) -> None:
        """``replica`` got this prompt: its pages become its most recently used."""
        held = self.pages[replica]
        for key in self._keys(token_ids):
            held[key] = None
            held.move_to_end(key)
        while len(held) > self.capacity:
            held.popitem(last=False)


class Replica(Engine, Protocol):
    """What ``Replicas`` reads of each engine beyond ``Engine`` (an ``LLMEngine`` has it):
    its unfinished ``requests``, its ``tokenizer`` (routing by prompt tokens) and its
    ``scheduler.block_manager``'s ``page_size`` and ``num_usable_pages``."""

    requests: dict
    tokenizer: Any
    scheduler: Any


class Replicas:
    """``LLMEngine``\\ s on disjoint devices, driven like one (an ``Engine``): ``add_request``
    routes, ``abort`` finds the owner, ``step`` advances every replica with work."""

    def __init__(self, engines: Sequence[Replica], prefix_routing: bool = False):
        self.engines = list(engines)
        block_manager = self.engines[0].scheduler.block_manager
        self.router = Router(len(self.engines), block_manager.page_size,
                             block_manager.num_usable_pages, prefix_routing)
        self.owner: dict[str, int] = {}   # unfinished request id -> replica
        self.next_id = 0                  # of requests added without an id
        self._pool = ThreadPoolExecutor(len(self.engines), thread_name_prefix="replica")
        self.tokenizer = self.engines[0].tokenizer
        self.outbox: list = []   # outputs of replicas whose step succeeded beside a failure

    # Attributes ``state_dict`` leaves out: each engine saves its own state (a snapshot
    # writes one per replica), the thread pool and the tokenizer are built anew.
    # ``outbox``: outputs of a step that failed in another replica, returned by the next
    # ``step``; transient like a step's outputs (a snapshot taken before it loses them).
    DERIVED = ("engines", "_pool", "tokenizer", "outbox")

    def state_dict(self) -> dict:
        """The router's state: request owners, the id counter and the router's record."""
        return {"owner": dict(self.owner), "next_id": self.next_id,
                "router": self.router.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Take ``state_dict``'s state; the engines' states are loaded apart, first: every
        owner must name a replica that follows that request."""
        owner = dict(state["owner"])
        if not all(isinstance(r, int) and 0 <= r < len(self.engines) for r in owner.values()):
            raise ValueError(f"a request is routed to a replica outside [0, "
                             f"{len(self.engines)})")
        for replica, engine in enumerate(self.engines):
            for request_id in engine.requests:
                if owner.get(request_id) != replica:
                    raise ValueError(f"replica {replica} follows request {request_id!r}, the "
                                     f"router says replica {owner.get(request_id)!r}")
        if isinstance(state["next_id"], bool) or not isinstance(state["next_id"], int):
            raise ValueError(f"next_id={state['next_id']!r}: expected an int")
        self.router.load_state_dict(state["router"])
        self.owner, self.next_id = owner, state["next_id"]

    def add_request(self, prompt, params=None, request_id: str | None = None,
                    priority: int = 0, stream: bool = True) -> str:
        """Queue a prompt on the replica the router picks; returns its request id."""
        if request_id is None:
            request_id, self.next_id = str(self.next_id), self.next_id + 1
        request_id = str(request_id)
        if request_id in self.owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        # The engine's own rule: a bad prompt is refused here, before any replica sees it.
        _, token_ids = prompt_token_ids(prompt, self.tokenizer)
        replica = self.router.choose(token_ids, [len(e.requests) for e in self.engines])
        self.owner[request_id] = replica   # first: an add cut short leaves an abortable id
        try:
            self.engines[replica].add_request(prompt, params, request_id, priority, stream)
        except BaseException:
            del self.owner[request_id]   # the engine's add is all or nothing
            raise
        self.router.record(replica, token_ids)   # an estimate: a partial record is harmless
        return request_id

    def abort(self, request_id: str) -> None:
        request_id = str(request_id)
        if request_id not in self.owner:
            raise ValueError(f"unknown request id {request_id!r}")
        engine = self.engines[self.owner[request_id]]
        if request_id in engine.requests:   # else it finished in a step not yet reported
            engine.abort(request_id)
        del self.owner[request_id]

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines)

    def metrics(self) -> dict:
        """The replicas' ``LLMEngine.metrics`` summed; the ratios recomputed over all of them."""
        each = [e.metrics() for e in self.engines]
        total = {key: sum(m[key] for m in each) for key in each[0]}
        queries = total["prefix_query_tokens"]
        total["prefix_hit_rate"] = total["prefix_hit_tokens"] / queries if queries else 0.0
        total["kv_utilization"] = sum(m["kv_utilization"] for m in each) / len(each)
        return total

    def step(self) -> list:
        """One step of every replica with work; their outputs, together.

        Each replica's step is all or nothing. If one fails, the others' steps are waited
        for (a Ctrl-C too waits for them: a replica's step must not overlap its next one)
        and their outputs kept for the next call; the first failure is re-raised, its
        replica rolled back alone."""
        busy = [e for e in self.engines if e.has_unfinished_requests()]
        with deferred_interrupts():
            futures = [self._pool.submit(e.step) for e in busy]
            errors = [f.exception() for f in futures]   # waits for every one
            outputs, self.outbox = self.outbox, []
            outputs += [o for f, e in zip(futures, errors) if e is None for o in f.result()]
            for output in outputs:
                if output.finished:
                    self.owner.pop(output.request_id, None)
            error = next((e for e in errors if e is not None), None)
            if error is not None:
                self.outbox = outputs
        if error is not None:
            raise error
        return outputs

    def warm_up(self) -> int:
        """Each replica's ``LLMEngine.warm_up`` (a replica's devices compile their own
        programs); returns the step shapes of one."""
        return max(e.warm_up() for e in self.engines)

    @property
    def can_step(self) -> bool:
        """False while some replica's steps fail for every request (see ``LLMEngine.step``)."""
        return all(getattr(e, "can_step", True) for e in self.engines)

    @property
    def num_compilations(self) -> int:
        """Step programs compiled in this process (the count is process-wide: see
        ``ModelRunner.num_compilations``)."""
        return self.engines[0].num_compilations

    @property
    def num_steps(self) -> int:
        return max(e.num_steps for e in self.engines)
