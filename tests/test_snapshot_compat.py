"""A snapshot written by jpaged before the layer packages (commit 88da0d3, the flat
`jpaged/*.py` layout) still restores and continues with the tokens that version produced.

`tests/data/snapshot_v1/` was saved by that version after 4 steps of two requests on
`LLM("tiny", num_pages=64, max_num_seqs=4)` (one seeded sample at temperature 0.8, one
greedy); `EXPECTED` is what the same process generated after saving.
"""

import pathlib
import shutil

from jpaged import LLM

DATA = pathlib.Path(__file__).resolve().parent / "data" / "snapshot_v1"
EXPECTED = {"0": [20, 417, 329, 465, 509, 277, 204, 2, 190, 370, 104, 300],
            "1": [410, 102, 410, 15, 357, 289, 15, 289, 15, 289, 196, 457]}


def test_a_snapshot_of_the_flat_layout_restores_and_continues(tmp_path):
    path = tmp_path / "snapshot"
    shutil.copytree(DATA, path)   # a restore may tidy its directory; keep the fixture intact
    llm = LLM.from_snapshot(path)
    finished = {}
    for _ in range(40):
        for output in llm.engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        if len(finished) == len(EXPECTED):
            break
    assert finished == EXPECTED
