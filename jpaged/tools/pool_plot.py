"""A picture of the KV pool: one cell per page, coloured by the request holding it.

Host-only: reads a ``BlockManager`` (ref counts, free queue, prefix cache) and the
sequences holding pages; never touches the device. Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from jpaged.host.block_manager import BlockManager
from jpaged.host.scheduler import Scheduler

COLUMNS = 64        # cells per row of the picture
NULL = (0.15, 0.15, 0.15, 1.0)
FREE = (1.0, 1.0, 1.0, 1.0)
CACHED = (0.78, 0.78, 0.78, 1.0)   # ref count 0, still a prefix-cache entry: evicted on demand


@dataclass
class PoolView:
    """What one pool holds, page by page.

    state: ``int8[num_pages]``: 0 null, 1 free, 2 cached but free, 3 held.
    owner: ``int32[num_pages]``: index into ``requests`` of the first holder, -1 if none.
    shared: ``bool[num_pages]``: held by more than one block table (copy-on-write / prefix).
    """

    state: np.ndarray
    owner: np.ndarray
    shared: np.ndarray
    requests: list[str]

    @classmethod
    def of(cls, block_manager: BlockManager, seqs) -> "PoolView":
        n = block_manager.num_pages
        refs = np.asarray(block_manager.ref_counts)
        state = np.where(refs > 0, 3, 1).astype(np.int8)
        cached = [p for p in block_manager.page_keys if refs[p] == 0]
        state[cached] = 2
        state[0] = 0
        owner = np.full(n, -1, np.int32)
        requests: list[str] = []
        for seq in sorted(seqs, key=lambda s: s.order):
            if seq.request_id not in requests:
                requests.append(seq.request_id)
            index = requests.index(seq.request_id)
            for page in seq.block_table:
                if owner[page] < 0:
                    owner[page] = index
        return cls(state, owner, refs > 1, requests)

    @property
    def used_pages(self) -> int:
        return int((self.state == 3).sum())

    @property
    def utilization(self) -> float:
        """Held pages / allocatable pages (the null page excluded)."""
        return self.used_pages / max(len(self.state) - 1, 1)


def _views(source, seqs) -> list[tuple[str, PoolView]]:
    """(label, view) per pool of ``source``: a BlockManager (with ``seqs``), a Scheduler,
    an ``LLMEngine``, an ``LLM`` or data-parallel replicas."""
    from jpaged.engine.engine import LLM, LLMEngine
    from jpaged.parallel.replicas import Replicas

    if isinstance(source, BlockManager):
        return [("pool", PoolView.of(source, seqs or []))]
    if isinstance(source, Scheduler):
        live = list(source.seqs.values()) if seqs is None else seqs
        return [("pool", PoolView.of(source.block_manager, live))]
    if isinstance(source, LLM):
        return _views(source.engine, seqs)
    if isinstance(source, LLMEngine):
        return _views(source.scheduler, seqs)
    if isinstance(source, Replicas):
        return [(f"replica {r}", view) for r, engine in enumerate(source.engines)
                for _, view in _views(engine, None)]
    raise ValueError(f"plot_pool takes a BlockManager, Scheduler, LLMEngine, LLM or "
                     f"data-parallel replicas, got {type(source).__name__}")


def _colours(view: PoolView) -> np.ndarray:
    """RGBA ``float[num_pages, 4]``: one colour per request, fixed by its id."""
    from matplotlib import colormaps

    palette = colormaps["tab20"]
    rgba = np.empty((len(view.state), 4))
    rgba[view.state == 0] = NULL
    rgba[view.state == 1] = FREE
    rgba[view.state == 2] = CACHED
    for page in np.flatnonzero(view.state == 3):
        request = view.requests[view.owner[page]] if view.owner[page] >= 0 else "?"
        rgba[page] = palette(zlib.crc32(str(request).encode()) % palette.N)
    return rgba


def plot_pool(source, path, *, seqs=None, title: str | None = None):
    """Draw every page of the pool(s) of ``source`` as a cell and save the figure to ``path``.

    Cells: coloured by the request holding the page (one colour per request id), a black
    dot on pages shared by several block tables (copy-on-write forks, prefix hits), light
    grey for cached-but-free pages (prefix-cache entries evicted on demand), white for free
    pages, dark for the null page 0. The title gives the utilization (held pages over
    allocatable pages) and the counts. Returns the matplotlib figure.

    source: a ``BlockManager`` (pass ``seqs``, the sequences holding pages, to colour them
    by request), a ``Scheduler``, an ``LLMEngine``, an ``LLM`` (every data-parallel replica
    is drawn, one panel each).
    """
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_pool needs matplotlib: pip install 'jpaged[plot]'") from error
    views = _views(source, seqs)
    rows = max(math.ceil(len(v.state) / COLUMNS) for _, v in views)
    fig, axes = plt.subplots(len(views), 1, squeeze=False,
                             figsize=(10, 1.0 + len(views) * (0.6 + 0.16 * rows)))
    for ax, (label, view) in zip(axes[:, 0], views):
        n = len(view.state)
        grid = np.ones((rows * COLUMNS, 4))
        grid[:n] = _colours(view)
        ax.imshow(grid.reshape(rows, COLUMNS, 4), interpolation="nearest", aspect="equal")
        shared = np.flatnonzero(view.shared)
        ax.scatter(shared % COLUMNS, shared // COLUMNS, s=4, c="black", marker="o")
        ax.set_xticks([])
        ax.set_yticks([])
        counts = np.bincount(view.state, minlength=4)
        ax.set_title(f"{label}: {view.utilization:.1%} of {n - 1} pages held "
                     f"({len(view.requests)} requests, {len(shared)} shared, "
                     f"{counts[2]} cached free, {counts[1]} free)", fontsize=9)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    legend = [Patch(facecolor=NULL, label="null page"), Patch(facecolor=CACHED, label="cached, free"),
              Patch(facecolor=FREE, edgecolor="grey", label="free"),
              Line2D([], [], color="black", marker="o", linestyle="", markersize=3,
                     label="shared")]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
