"""Shape arithmetic every layer shares: padded sizes, page counts, ragged layouts, and the
one check for a positive integer size.

Pure numpy and Python: the host side (block manager, scheduler) imports it without JAX.
"""

import numbers

import numpy as np


def bucket(n: int, minimum: int, maximum: int | None = None) -> int:
    """Padded size for ``n``: the next power of two, at least ``minimum``, capped at
    ``maximum`` (when given and larger than ``minimum``), so a run compiles few shapes."""
    size = max(minimum, 1 << max(n - 1, 0).bit_length())
    return size if maximum is None else max(minimum, min(size, maximum))


def cdiv(a, b):
    """Ceiling division (ints or integer arrays): the pages that hold ``a`` tokens."""
    return -(-a // b)


def flat_layout(starts, counts, block_tables: np.ndarray, page_size: int):
    """Ragged chunks laid end to end, one per table row: chunk i is tokens ``starts[i] ..
    starts[i] + counts[i] - 1`` of row i. Returns the row, position and cache slot of every
    token, each ``int32[sum(counts)]``."""
    counts = np.asarray(counts, np.int32)
    first = np.cumsum(counts) - counts   # flat index of each chunk's first token
    rows = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    positions = (np.asarray(starts, np.int32)[rows]
                 + np.arange(int(counts.sum()), dtype=np.int32) - first[rows])
    slots = block_tables[rows, positions // page_size] * page_size + positions % page_size
    return rows, positions, slots.astype(np.int32)


def check_positive(**values) -> None:
    """Every ``name=value`` must be an integer >= 1 (numpy integers too, bools not)."""
    for name, value in values.items():
        if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
                or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
