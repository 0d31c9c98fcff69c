"""BlockManager: allocation, copy-on-write, prefix caching, eviction order, swap, metrics."""

import pytest

from jpaged.host.block_manager import BlockManager
from jpaged.host.sequence import Sequence


def seq(seq_id, tokens, extra_keys=None):
    return Sequence(seq_id, tokens, max_tokens=100, extra_keys=extra_keys)


def computed(bm, s):
    """What a finished step does: every token has K/V, full pages get cached."""
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_pages(s)
    return s


def test_allocate_append_free_cycle_uses_every_page_but_the_null_page():
    bm = BlockManager(5, 4, watermark=0.0)
    a = seq("a", range(10))
    assert bm.can_allocate(a) and bm.allocate(a) == 0
    assert sorted(a.block_table) == [1, 2, 3] and 0 not in a.block_table
    a.token_ids += [10, 11]              # still in the third page
    assert bm.append_slot(a) is None and len(a.block_table) == 3
    a.token_ids.append(12)               # a fourth page
    assert bm.can_append(a) and bm.append_slot(a) is None and len(a.block_table) == 4
    assert bm.num_free_pages == 0
    a.token_ids += [13, 14, 15, 16]
    assert not bm.can_append(a)
    bm.free(a)
    assert bm.num_free_pages == 4 and a.block_table == [] and bm.ref_counts == [0] * 5


def test_watermark_keeps_pages_for_running_sequences():
    bm = BlockManager(11, 1, watermark=0.2)   # 10 usable pages, 2 held back from admission
    assert bm.watermark_pages == 2 and bm.num_usable_pages == 8
    assert not bm.can_allocate(seq("big", range(9)))
    a = seq("a", range(8))
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert not bm.can_allocate(seq("one", [1]))
    a.token_ids.append(8)
    assert bm.can_append(a)                  # growth may use the watermark


def test_allocate_raises_instead_of_overcommitting():
    bm = BlockManager(3, 2, watermark=0.0)
    with pytest.raises(RuntimeError, match="needs 3 pages, 2 are free"):
        bm.allocate(seq("a", range(5)))
    assert bm.num_free_pages == 2


def test_fork_shares_pages_and_the_first_writer_copies():
    bm = BlockManager(8, 4, watermark=0.0)
    parent = seq("p", range(6))
    bm.allocate(parent)
    child = Sequence("c", parent.token_ids, 100)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert [bm.ref_counts[p] for p in parent.block_table] == [2, 2]
    shared = parent.block_table[1]
    child.token_ids.append(6)                 # writes into the shared, half-full page
    assert bm.can_append(child)
    src, dst = bm.append_slot(child)
    assert src == shared and dst not in parent.block_table and child.block_table[1] == dst
    assert bm.ref_counts[shared] == 1 and bm.ref_counts[dst] == 1
    parent.token_ids.append(7)                # now alone in its page: no copy
    assert bm.append_slot(parent) is None and parent.block_table[1] == shared


def test_copy_on_write_needs_a_free_page():
    bm = BlockManager(3, 4, watermark=0.0)
    parent = seq("p", range(5))
    bm.allocate(parent)
    child = Sequence("c", parent.token_ids, 100)
    bm.fork(parent, child)
    child.token_ids.append(9)
    assert not bm.can_append(child)


def test_prefix_hit_skips_full_pages_but_never_the_last_token():
    bm = BlockManager(16, 4, watermark=0.0)
    a = seq("a", range(12))
    bm.allocate(a)
    computed(bm, a)
    assert len(bm.cache) == 3
    b = seq("b", list(range(8)) + [99, 98])   # shares two full pages
    assert bm.allocate(b) == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.ref_counts[a.block_table[0]] == 2
    c = seq("c", range(12))                   # identical prompt: its last page is recomputed
    assert bm.allocate(c) == 8
    assert c.block_table[2] != a.block_table[2]
    d = seq("d", range(13))                   # 3 full pages before the last token
    assert bm.allocate(d) == 12
    assert bm.metrics([])["prefix_hit_rate"] == pytest.approx((8 + 8 + 12) / (12 + 10 + 12 + 13))


def test_extra_keys_separate_caches():
    bm = BlockManager(16, 4, watermark=0.0)
    a = seq("a", range(9), extra_keys="tenant-a")
    bm.allocate(a)
    computed(bm, a)
    assert bm.allocate(seq("b", range(9), extra_keys="tenant-b")) == 0
    assert bm.allocate(seq("n", range(9))) == 0
    assert bm.allocate(seq("a2", range(9), extra_keys="tenant-a")) == 8


def test_hash_collision_never_serves_another_prompt():
    # In CPython hash(2**61) == hash(1): these pages collide in the dict, the keys differ.
    assert hash(2 ** 61) == hash(1)
    first, other = [1, 2, 3, 4, 5], [2 ** 61, 2, 3, 4, 5]
    assert hash((0, tuple(first[:4]), None)) == hash((0, tuple(other[:4]), None))
    bm = BlockManager(8, 4, watermark=0.0)
    a = seq("a", first)
    bm.allocate(a)
    computed(bm, a)
    assert bm.allocate(seq("b", other)) == 0


def test_prefix_caching_can_be_switched_off():
    bm = BlockManager(16, 4, watermark=0.0, enable_prefix_caching=False)
    a = seq("a", range(9))
    bm.allocate(a)
    computed(bm, a)
    assert not bm.cache and bm.allocate(seq("b", range(9))) == 0
    assert bm.metrics([])["prefix_hit_rate"] == 0.0


def test_eviction_reuses_empty_pages_first_then_lru_tail_before_head():
    bm = BlockManager(8, 2, watermark=0.0)   # 7 usable pages
    a = seq("a", range(7))                   # pages: 3 full (cached) + 1 partial
    bm.allocate(a)
    computed(bm, a)
    head, middle, tail, partial = a.block_table
    bm.free(a)
    assert bm.metrics([])["cached_pages"] == 3 and bm.num_free_pages == 7
    # 4 empty pages (3 never used + the partial one) go first.
    b = seq("b", range(100, 108))
    bm.allocate(b)
    assert partial in b.block_table and not {head, middle, tail} & set(b.block_table)
    c = seq("c", [50, 51])                   # one more page: evicts the tail first
    bm.allocate(c)
    assert c.block_table == [tail] and len(bm.cache) == 2
    bm.free(b)
    bm.free(c)
    # The head is still a hit, the evicted tail is not.
    assert bm.allocate(seq("again", range(7))) == 4


def test_a_hit_refreshes_recency():
    bm = BlockManager(6, 2, watermark=0.0)   # 5 usable pages
    x, y = seq("x", [1, 1, 9]), seq("y", [2, 2, 9])
    for s in (x, y):
        bm.allocate(s)
        computed(bm, s)
    x_head, y_head = x.block_table[0], y.block_table[0]
    bm.free(x)
    bm.free(y)                               # y released after x
    x2 = seq("x2", [1, 1, 7])
    assert bm.allocate(x2) == 2              # x's head hit, then released again: now newest
    bm.free(x2)
    fill = seq("fill", range(8))             # 4 pages: all 3 empty ones + the LRU cached one
    bm.allocate(fill)
    assert y_head in fill.block_table and x_head not in fill.block_table


def test_reset_prefix_cache_is_refused_while_pages_are_held():
    bm = BlockManager(8, 2, watermark=0.0)
    a = seq("a", range(5))
    bm.allocate(a)
    computed(bm, a)
    assert not bm.reset_prefix_cache() and bm.cache
    bm.free(a)
    assert bm.reset_prefix_cache() and not bm.cache and not bm.page_keys
    assert bm.allocate(seq("b", range(5))) == 0


def test_swap_out_and_in_return_copy_plans():
    bm = BlockManager(8, 4, num_host_pages=3, watermark=0.0)
    a = seq("a", range(10))
    bm.allocate(a)
    device = list(a.block_table)
    assert bm.can_swap_out(a)
    out = bm.swap_out(a)
    assert [d for d, _ in out] == device and a.block_table == [] and len(a.host_table) == 3
    assert [h for _, h in out] == a.host_table and bm.num_free_pages == 7
    b = seq("b", range(4))
    bm.allocate(b)
    assert not bm.can_swap_out(b)            # the host pool is full
    host = list(a.host_table)
    assert bm.can_swap_in(a)
    back = bm.swap_in(a)
    assert [h for h, _ in back] == host and [d for _, d in back] == a.block_table
    assert a.host_table == [] and sorted(bm.host_free) == [0, 1, 2]


def test_swap_in_waits_for_room_above_the_watermark():
    bm = BlockManager(6, 2, num_host_pages=4, watermark=0.0)
    a = seq("a", range(6))
    bm.allocate(a)
    bm.swap_out(a)
    b = seq("b", range(6))
    bm.allocate(b)
    assert not bm.can_swap_in(a)             # 2 free, 3 needed
    bm.free(b)
    assert bm.can_swap_in(a)


def test_metrics_count_pages_and_kv_utilization():
    bm = BlockManager(10, 4, num_host_pages=2, watermark=0.0)
    a, b = seq("a", range(6)), seq("b", range(100, 101))
    for s in (a, b):
        bm.allocate(s)
    child = Sequence("c", a.token_ids, 100)
    bm.fork(a, child)                        # shared pages count once
    m = bm.metrics([a, b, child])
    assert m["used_pages"] == 3 and m["free_pages"] == 6 and m["host_used_pages"] == 0
    assert m["kv_utilization"] == pytest.approx((6 + 1) / 12)
    assert bm.kv_utilization([]) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_pages=1, page_size=4), "num_pages=1"),
    (dict(num_pages=8, page_size=0), "page_size=0"),
    (dict(num_pages=8, page_size=4, num_host_pages=-1), "num_host_pages=-1"),
    (dict(num_pages=8, page_size=4, watermark=1.0), "watermark=1.0"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockManager(**kwargs)
