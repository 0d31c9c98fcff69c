"""Host-side page allocator: free queue, ref counts, copy-on-write, prefix cache, swap.

Pure Python over integers; the device only ever sees the block tables and the page-copy
plans this module returns.
"""

from collections import OrderedDict

from jpaged.host.journal import Journal
from jpaged.host.sequence import Sequence
from jpaged.core.shapes import cdiv


class BlockManager:
    """Hands out the pages of a pool of ``num_pages`` pages of ``page_size`` slots.

    Page 0 is the null page and is never handed out. Every page has a reference count (the
    number of block tables holding it). Pages with count 0 sit in ``free_queue``, an ordered
    dict used as an O(1) queue: pages holding nothing at the front, then pages the prefix
    cache still remembers, least recently released first, so a cached page is evicted only
    when no empty page is left.

    Prefix caching: a full page whose K/V has been computed is registered under the key
    ``(parent key id, its token ids, extra keys)``, where the parent key id names the
    previous page's entry. Hashing the key thus chains the hashes over the whole prefix,
    and the dict compares the whole key on a hit (token ids included), so a hash collision
    can never serve another prompt's K/V. Key ids are never reused.

    Swap: a host pool of ``num_host_pages`` pages; ``swap_out`` / ``swap_in`` return the
    ``(src, dst)`` page copies the device must perform.

    ``watermark``: fraction of the pool that admission of new prompts leaves free, so a
    burst of prompts cannot take the pages running sequences need to grow.

    ``journal``: every change to the pages' state (and to sequences' tables) is recorded
    there first, so a failed step can be undone (``jpaged.host.journal``). The free queue
    is derived state: its order is that of ``stamps`` (a page's place, given when it
    joins the queue: decreasing at the front, increasing at the back), so an undo
    restores the stamps and rebuilds the queue (``rebuild_free_queue``). ``taken``: the
    pages this transaction took from the free queue, the only ones a step's device writes
    can overwrite besides the slots its rows own.
    """

    # Attributes ``state_dict`` leaves out: the constructor's options, and ``page_keys``,
    # rebuilt from ``cache`` (tests/test_state.py holds every attribute to one of the two).
    # The stamps are the free queue's order, which state_dict saves; ``journal`` and
    # ``taken`` live within one transaction.
    DERIVED = ("num_pages", "page_size", "num_host_pages", "watermark_pages",
               "enable_prefix_caching", "page_keys", "stamps", "_front", "_back", "journal",
               "taken")

    def __init__(self, num_pages: int, page_size: int, *, num_host_pages: int = 0,
                 watermark: float = 0.01, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least 2 (page 0 is the null page)")
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        if num_host_pages < 0:
            raise ValueError(f"num_host_pages={num_host_pages} must be >= 0")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark={watermark} must be in [0, 1)")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_host_pages = num_host_pages
        self.watermark_pages = int(watermark * num_pages)
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.free_queue = OrderedDict.fromkeys(range(1, num_pages))
        self.stamps = [page - num_pages for page in range(num_pages)]
        self._front, self._back = -num_pages, 0   # the last stamps given at each end
        self.journal = Journal()
        self.taken: list[int] = []
        self.cache: dict[tuple, tuple[int, int]] = {}   # key -> (page, key id)
        self.page_keys: dict[int, tuple] = {}            # cached page -> its key
        self.next_key_id = 1                             # 0 is the root: no parent page
        self.host_free = list(range(num_host_pages))
        self.hit_tokens = 0
        self.query_tokens = 0

    def state_dict(self) -> dict:
        """The allocator's state as plain values (copies): ref counts, the free queue in
        order, prefix-cache entries ``(key, page, key id)``, the key counter, the host free
        list and the hit counters."""
        return {"ref_counts": list(self.ref_counts), "free_queue": list(self.free_queue),
                "cache": [(key, page, key_id) for key, (page, key_id) in self.cache.items()],
                "next_key_id": self.next_key_id, "host_free": list(self.host_free),
                "hit_tokens": self.hit_tokens, "query_tokens": self.query_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Take the state of ``state_dict`` (of a block manager with these options).
        Checks the sizes and ranges a later step would index with (a ValueError names
        the first bad value); ``check_pages`` checks the rest against the holders."""
        ref_counts, free_queue = list(state["ref_counts"]), list(state["free_queue"])
        host_free = list(state["host_free"])
        if len(ref_counts) != self.num_pages:
            raise ValueError(f"{len(ref_counts)} ref counts for a pool of {self.num_pages} "
                             f"pages")
        _check_ids("free page", free_queue, 1, self.num_pages)
        _check_ids("free host page", host_free, 0, self.num_host_pages)
        next_key_id = _count("next_key_id", state["next_key_id"])
        cache, page_keys = {}, {}
        for key, page, key_id in state["cache"]:
            _check_ids("cached page", [page], 1, self.num_pages)
            _check_ids("prefix-cache key id", [key_id], 1, next_key_id)
            if key in cache or page in page_keys:
                raise ValueError(f"prefix-cache entry for page {page} given twice")
            cache[key], page_keys[page] = (page, key_id), key
        self.ref_counts = [_count("ref count", c) for c in ref_counts]
        self.set_free_queue(free_queue)
        self.cache, self.page_keys, self.next_key_id = cache, page_keys, next_key_id
        self.host_free = host_free
        self.hit_tokens = _count("hit_tokens", state["hit_tokens"])
        self.query_tokens = _count("query_tokens", state["query_tokens"])

    def check_pages(self, holders: list[int], host_held: list[int]) -> None:
        """Check the allocator against who holds what: ``holders[p]``, the block tables
        holding device page p; ``host_held``, the host pages swapped sequences hold. Each
        ref count equals its holders, the free queue holds exactly the pages nobody holds,
        host pages are free or held, once, and every prefix-cache entry names its page.
        Raises RuntimeError naming the first broken rule."""
        for page in range(1, self.num_pages):
            if self.ref_counts[page] != holders[page]:
                raise RuntimeError(f"page {page}: ref count {self.ref_counts[page]}, held by "
                                   f"{holders[page]} block tables")
            if (page in self.free_queue) != (holders[page] == 0):
                raise RuntimeError(f"page {page}: held by {holders[page]}, "
                                   f"{'' if page in self.free_queue else 'not '}in the free "
                                   f"queue")
        if holders[0] or self.ref_counts[0]:
            raise RuntimeError("the null page is held")
        if len(self.free_queue) != sum(h == 0 for h in holders[1:]):
            raise RuntimeError("the free queue holds a page outside the pool")
        if sorted(host_held + self.host_free) != list(range(self.num_host_pages)):
            raise RuntimeError(f"host pages: {sorted(host_held)} held, "
                               f"{sorted(self.host_free)} free")
        for page, key in self.page_keys.items():
            if self.cache.get(key, (None,))[0] != page:
                raise RuntimeError(f"page {page}: its prefix-cache entry names another page")

    @property
    def num_free_pages(self) -> int:
        """Pages with ref count 0, cached ones included (they are evicted on demand)."""
        return len(self.free_queue)

    @property
    def num_usable_pages(self) -> int:
        """Pages one sequence may ever hold: the pool less the null page and the watermark."""
        return self.num_pages - 1 - self.watermark_pages

    # -- allocation ------------------------------------------------------------------

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether ``allocate(seq)`` fits and leaves the admission watermark free."""
        needed = self._pages_to_take(seq, self._match(seq))
        return len(self.free_queue) - needed >= self.watermark_pages

    def allocate(self, seq: Sequence) -> int:
        """Give ``seq`` pages for all its tokens, reusing cached prefix pages.

        Returns the number of leading tokens whose K/V is already cached (whole pages,
        never the last token, so the step that computes it has logits to sample from).
        """
        hits = self._match(seq)
        needed = self._pages_to_take(seq, hits)
        if needed > len(self.free_queue):
            raise RuntimeError(f"sequence {seq.seq_id!r} needs {needed} pages, "
                               f"{len(self.free_queue)} are free")
        journal = self.journal
        for page, _ in hits:
            self._take(page)
        fresh = cdiv(seq.num_tokens, self.page_size) - len(hits)
        table = [page for page, _ in hits]   # joins seq first: a fault leaks no page
        journal.attr(seq, "block_table")
        seq.block_table = table
        for _ in range(fresh):
            table.append(self._pop_free())
        journal.attr(seq, "cache_keys")
        seq.cache_keys = [key_id for _, key_id in hits]
        num_cached = len(hits) * self.page_size
        if self.enable_prefix_caching:
            journal.attr(self, "query_tokens")
            journal.attr(self, "hit_tokens")
            self.query_tokens += seq.num_tokens
            self.hit_tokens += num_cached
        return num_cached

    def can_append(self, seq: Sequence) -> bool:
        """Whether ``append_slot(seq)`` can get the fresh page it may need."""
        return bool(self.free_queue) or not self._needs_page(seq)

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make the slot of ``seq``'s last token writable, before a step writes it.

        Adds a page when the last one is full. If the page the token goes into is shared
        (after a fork), the sequence gets a fresh page and the ``(src, dst)`` copy the
        device must perform first is returned; otherwise None.
        """
        table, num_tokens = seq.block_table, len(seq.token_ids)   # hot: no property calls
        if len(table) * self.page_size < num_tokens:
            self.journal.length(table)
            table.append(self._pop_free())
            return None
        i = (num_tokens - 1) // self.page_size
        src = table[i]
        if self.ref_counts[src] == 1:
            return None
        self.journal.item(table, i)
        table[i] = self._pop_free()
        self._release(src)
        return src, table[i]

    def free(self, seq: Sequence) -> None:
        """Release every device and host page of ``seq``.

        Tail pages are released first so that, among cached pages, a sequence's tail is
        evicted before its head (a head is more likely to be a shared prefix).
        """
        journal = self.journal
        for page in reversed(seq.block_table):
            self._release(page)
        journal.length(self.host_free)
        self.host_free.extend(seq.host_table)
        journal.vars(seq)   # the tables are replaced, not changed: O(1) to record
        seq.block_table, seq.host_table, seq.cache_keys = [], [], []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share every page of ``parent`` (copy-on-write on the next write)."""
        journal = self.journal
        journal.attr(child, "block_table")
        child.block_table = list(parent.block_table)
        journal.attr(child, "cache_keys")
        child.cache_keys = list(parent.cache_keys)
        for page in child.block_table:
            journal.item(self.ref_counts, page)
            self.ref_counts[page] += 1

    # -- prefix cache ----------------------------------------------------------------

    def cache_full_pages(self, seq: Sequence, upto: int | None = None) -> None:
        """Register the pages of ``seq`` that are full and computed (call after a step);
        ``upto``: only within its first ``upto`` tokens (those a finished step computed,
        while a later one is still running: async scheduling).

        If an equal page is already cached (another sequence computed the same prefix
        at the same time), that entry is adopted as the parent of the next page and this
        sequence's copy stays private.
        """
        if not self.enable_prefix_caching:
            return
        ps, keys, journal = self.page_size, seq.cache_keys, self.journal
        parent = keys[-1] if keys else 0
        computed = seq.num_computed_tokens if upto is None else min(upto,
                                                                    seq.num_computed_tokens)
        start, end = len(keys), computed // ps
        if start < end:
            journal.length(keys)
        for i in range(start, end):
            key = (parent, tuple(seq.token_ids[i * ps:(i + 1) * ps]), seq.extra_keys)
            entry = self.cache.get(key)
            if entry is None:
                page = seq.block_table[i]
                journal.item(self.page_keys, page)
                journal.item(self.cache, key)
                journal.attr(self, "next_key_id")
                entry = self.cache[key] = (page, self.next_key_id)
                self.next_key_id += 1
                self.page_keys[page] = key
            parent = entry[1]
            keys.append(parent)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached page. Refused (returns False) while any page is held."""
        if len(self.free_queue) < self.num_pages - 1 or len(self.host_free) < self.num_host_pages:
            return False
        self.cache.clear()
        self.page_keys.clear()
        return True

    def forget_prefix_cache(self) -> None:
        """Forget every cached page, held or not: their K/V is gone (the device pool was
        replaced). Unlike ``reset_prefix_cache``, for recovery: the caller frees or
        re-registers the pages still held."""
        self.cache.clear()
        self.page_keys.clear()

    def _match(self, seq: Sequence) -> list[tuple[int, int]]:
        """(page, key id) of the cached full pages that start ``seq``, last token excluded."""
        if not self.enable_prefix_caching:
            return []
        ps, tokens, hits, parent = self.page_size, seq.token_ids, [], 0
        for start in range(0, (seq.num_tokens - 1) // ps * ps, ps):
            entry = self.cache.get((parent, tuple(tokens[start:start + ps]), seq.extra_keys))
            if entry is None:
                break
            hits.append(entry)
            parent = entry[1]
        return hits

    # -- swap ------------------------------------------------------------------------

    def can_swap_out(self, seq: Sequence) -> bool:
        return len(seq.block_table) <= len(self.host_free)

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move ``seq``'s pages to the host pool; returns (device page, host page) copies."""
        free, n = self.host_free, len(seq.block_table)
        plan = list(zip(seq.block_table, reversed(free[len(free) - n:])))
        journal = self.journal
        journal.attr(self, "host_free")   # replaced, not changed: O(1) to record
        self.host_free = free[:len(free) - n]
        journal.vars(seq)
        seq.host_table = [host for _, host in plan]   # held by seq before its pages go
        for page in reversed(seq.block_table):
            self._release(page)
        seq.block_table = []
        return plan

    def can_swap_in(self, seq: Sequence) -> bool:
        """Room for the pages back, the next token's slot included, above the watermark."""
        needed = cdiv(seq.num_tokens, self.page_size)
        return len(self.free_queue) - needed >= self.watermark_pages

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move ``seq``'s pages back to the device; returns (host page, device page) copies."""
        journal = self.journal
        journal.vars(seq)
        table = seq.block_table = []
        plan = []
        for host in seq.host_table:
            table.append(self._pop_free())
            plan.append((host, table[-1]))
        journal.length(self.host_free)
        self.host_free.extend(seq.host_table)
        seq.host_table = []
        return plan

    # -- metrics ---------------------------------------------------------------------

    def kv_utilization(self, seqs) -> float:
        """Slots holding a token of ``seqs`` / slots of the pages they hold (shared pages
        counted once); 0.0 when they hold none."""
        ps = self.page_size
        full, partial = set(), {}
        for seq in seqs:
            table = seq.block_table
            if not table:
                continue
            full.update(table[:-1])
            last = min(seq.num_tokens - (len(table) - 1) * ps, ps)
            if last == ps:
                full.add(table[-1])
            else:
                partial[table[-1]] = max(partial.get(table[-1], 0), last)
        partial = {p: n for p, n in partial.items() if p not in full}
        pages = len(full) + len(partial)
        return (len(full) * ps + sum(partial.values())) / (pages * ps) if pages else 0.0

    def metrics(self, seqs) -> dict:
        """Pool counters; ``seqs`` are the sequences holding device pages (for utilization)."""
        return {
            "used_pages": self.num_pages - 1 - len(self.free_queue),
            "free_pages": len(self.free_queue),
            "cached_pages": len(self.page_keys),
            "host_used_pages": self.num_host_pages - len(self.host_free),
            "prefix_hit_rate": self.hit_tokens / self.query_tokens if self.query_tokens else 0.0,
            "prefix_hit_tokens": self.hit_tokens,
            "prefix_query_tokens": self.query_tokens,
            "kv_utilization": self.kv_utilization(seqs),
        }

    # -- pages -----------------------------------------------------------------------

    def _pages_to_take(self, seq: Sequence, hits: list[tuple[int, int]]) -> int:
        """Pages ``allocate`` removes from the free queue: fresh ones and revived cached ones."""
        revived = sum(self.ref_counts[page] == 0 for page, _ in hits)
        return cdiv(seq.num_tokens, self.page_size) - len(hits) + revived

    def _needs_page(self, seq: Sequence) -> bool:
        table, num_tokens = seq.block_table, len(seq.token_ids)
        if len(table) * self.page_size < num_tokens:
            return True
        return self.ref_counts[table[(num_tokens - 1) // self.page_size]] > 1

    def _take(self, page: int) -> None:
        self.journal.item(self.ref_counts, page)
        if self.ref_counts[page] == 0:
            del self.free_queue[page]
        self.ref_counts[page] += 1

    def _pop_free(self) -> int:
        """The front page of the free queue, held once. The caller must record where the
        page goes (a table) before its next fault point: until then it is free on undo."""
        journal, page = self.journal, next(iter(self.free_queue))
        if journal.active:
            self.taken.append(page)
        journal.item(self.ref_counts, page)
        key = self.page_keys.get(page)
        if key is not None:
            journal.item(self.page_keys, page)
            journal.item(self.cache, key)
            del self.cache[key]
            del self.page_keys[page]
        del self.free_queue[page]
        self.ref_counts[page] = 1
        return page

    def _release(self, page: int) -> None:
        journal = self.journal
        journal.item(self.ref_counts, page)
        self.ref_counts[page] -= 1
        if self.ref_counts[page] == 0:
            journal.item(self.stamps, page)
            if page in self.page_keys:   # the back: evicted last, least recent first
                self._back += 1
                self.stamps[page] = self._back
                self.free_queue[page] = None
            else:                        # the front: reused first
                self._to_front(page)

    def _to_front(self, page: int) -> None:
        self._front -= 1
        self.stamps[page] = self._front
        self.free_queue[page] = None
        self.free_queue.move_to_end(page, last=False)

    def set_free_queue(self, pages) -> None:
        """Make ``pages`` the free queue, in this order (a snapshot restored)."""
        pages = list(pages)
        self.free_queue = OrderedDict.fromkeys(pages)
        for i, page in enumerate(pages):
            self.stamps[page] = i - len(pages)
        self._front, self._back = -len(pages), 0

    def rebuild_free_queue(self) -> None:
        """After an undo: the free queue is the pages with no holder, in stamp order."""
        self.free_queue = OrderedDict.fromkeys(sorted(
            (p for p in range(1, self.num_pages) if self.ref_counts[p] == 0),
            key=self.stamps.__getitem__))

    def forget_pages(self, pages) -> None:
        """Drop the prefix-cache entries of ``pages`` (their K/V was overwritten); free ones
        move to the front of the queue. Not journaled: for recovery, after an undo."""
        for page in pages:
            key = self.page_keys.pop(page, None)
            if key is not None:
                del self.cache[key]
                if self.ref_counts[page] == 0:
                    self._to_front(page)


def _count(name: str, value) -> int:
    """``value`` if it is an int >= 0, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: expected an int >= 0")
    return value


def _check_ids(what: str, ids, low: int, high: int) -> None:
    """Every id an int in [low, high), none twice; else a ValueError naming the first bad."""
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not low <= i < high:
            raise ValueError(f"{what} {i!r} is outside [{low}, {high})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"a {what} is listed twice in {sorted(ids)[:20]}")
