"""The resource check's arithmetic (the compile itself runs in CI's resource leg:
``benchmarks/kernel_resources.py --check``)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_resources as kr  # noqa: E402

PTXAS_REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'jpaged_paged_decode' for 'sm_90a'
ptxas info    : Function properties for jpaged_paged_decode
    48 bytes stack frame, 52 bytes spill stores, 60 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem
"""


def test_parse_ptxas():
    assert kr.parse_ptxas(PTXAS_REPORT) == dict(registers=255, stack_bytes=48,
                                                spill_store_bytes=52, spill_load_bytes=60)
    with pytest.raises(ValueError, match="registers"):
        kr.parse_ptxas("ptxas info    : 0 bytes gmem")


@pytest.mark.parametrize("registers,warps,smem,expected", [
    (128, 4, 55296, 4),    # default bf16 tile: registers and shared memory both allow 4
    (255, 4, 4096, 2),     # register-bound
    (64, 4, 110592, 2),    # shared-memory-bound
    (32, 1, 0, 32),        # the 32-block cap
    (24, 16, 0, 4),        # the 64-warp cap
])
def test_programs_per_sm(registers, warps, smem, expected):
    assert kr.programs_per_sm(registers, warps, smem) == expected


def test_flags_spills_and_shared_memory():
    rows = [dict(head_dim=128, page_size=16, dtype="bfloat16", programs_per_sm=4)]
    assert kr.occupancy_error(rows) is None
    rows[0]["programs_per_sm"] = 3
    assert "PROGRAMS_PER_SM" in kr.occupancy_error(rows)
    spilling = kr.Resources(registers=255, spill_store_bytes=4, spill_load_bytes=4,
                            stack_bytes=8, smem_bytes=1024, num_warps=4, num_stages=1)
    assert spilling.spills
