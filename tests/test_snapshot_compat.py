"""A snapshot written by jpaged before the layer packages (commit 88da0d3, the flat
`jpaged/*.py` layout, snapshot format version 1) is refused by name, before any pool is
allocated: the host state it holds was written by private attributes that no longer exist.

`tests/data/snapshot_v1/snapshot.json` is that version's host file, saved after 4 steps of
two requests on `LLM("tiny", num_pages=64, max_num_seqs=4)` (its arrays are left out: the
refusal comes before they are read).
"""

import pathlib
import shutil

import pytest

from jpaged import LLM

DATA = pathlib.Path(__file__).resolve().parent / "data" / "snapshot_v1"


def test_a_snapshot_of_the_flat_layout_is_refused_by_its_version(tmp_path):
    path = tmp_path / "snapshot"
    shutil.copytree(DATA, path)
    with pytest.raises(ValueError, match=r"not a jpaged-snapshot version \d+ file .*version=1"):
        LLM.from_snapshot(path)
