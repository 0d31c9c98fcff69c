"""plot_pool: the page states it draws match the block manager's own accounting."""

import random

import numpy as np
import pytest

from jpaged.host.block_manager import BlockManager
from jpaged.tools.pool_plot import PoolView, plot_pool
from jpaged.host.sequence import Sequence

pytest.importorskip("matplotlib")


def _random_pool(seed):
    """A pool after random allocations, forks, prefix-cache registrations and frees."""
    rng = random.Random(seed)
    bm = BlockManager(48, 4, watermark=0.0)
    live = []
    for i in range(10):
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
        s = Sequence(f"r{i}", prompt, max_tokens=8)
        if not bm.can_allocate(s):
            break
        bm.allocate(s)
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_pages(s)
        live.append(s)
        if rng.random() < 0.3:
            child = Sequence(f"r{i}.1", s.token_ids, 8, request_id=s.request_id)
            bm.fork(s, child)
            live.append(child)
        if rng.random() < 0.3:
            gone = live.pop(rng.randrange(len(live)))
            bm.free(gone)
    return bm, live


@pytest.mark.parametrize("seed", range(4))
def test_view_matches_the_tables(seed):
    bm, live = _random_pool(seed)
    view = PoolView.of(bm, live)
    holders = {}
    for s in live:
        for page in s.block_table:
            holders.setdefault(page, set()).add(s.seq_id)
    held = sorted(holders)
    assert list(np.flatnonzero(view.state == 3)) == held
    assert view.state[0] == 0
    assert set(np.flatnonzero(view.shared)) == {p for p, h in holders.items() if len(h) > 1}
    cached_free = {p for p in bm.page_keys if p not in holders}
    assert set(np.flatnonzero(view.state == 2)) == cached_free
    assert (view.state == 1).sum() == bm.num_pages - 1 - len(held) - len(cached_free)
    for page in held:   # coloured by a request that really holds it
        owners = {s.request_id for s in live if page in s.block_table}
        assert view.requests[view.owner[page]] in owners
    assert view.utilization == pytest.approx(len(held) / (bm.num_pages - 1))


def test_plot_writes_a_png(tmp_path):
    bm, live = _random_pool(1)
    path = tmp_path / "pool.png"
    plot_pool(bm, path, seqs=live, title="random pool")
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 200
    # Not a blank canvas: held pages are drawn in colour.
    assert (np.abs(image[..., 0] - image[..., 1]) > 0.1).any()


def test_rejects_what_is_not_a_pool(tmp_path):
    with pytest.raises(ValueError, match="got dict"):
        plot_pool({}, tmp_path / "x.png")
