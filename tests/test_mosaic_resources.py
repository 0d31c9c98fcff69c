"""The Mosaic resource report's parsing and the figures the kernels rely on (the compile
itself runs in CI's resource leg: ``benchmarks/mosaic_resources.py --check``)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jpaged.pallas_kernels import ragged_attention as ra

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import mosaic_resources as mr  # noqa: E402

REPORT = """ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    32 bytes stack frame, 44 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 255 registers, used 2 barriers, 1 bytes smem
cuModuleLoadData failed: stub libcuda: no GPU
"""


def test_parse_ptxas():
    assert mr.parse_ptxas(REPORT) == dict(registers=255, barriers=2, stack_bytes=32,
                                          spill_store_bytes=44, spill_load_bytes=32)
    with pytest.raises(ValueError, match="registers"):
        mr.parse_ptxas("cuModuleLoadData failed")


@pytest.mark.parametrize("registers,smem,expected", [
    (255, 83 * 1024, 2),     # the ragged kernel: register-bound at 2
    (128, 82 * 1024, 2),     # the decode tile at head_dim 128: shared-memory-bound
    (128, 40 * 1024, 4),     # register-bound at 4
    (32, 0, 16),             # 32 registers x 128 threads: 16 CTAs
])
def test_ctas_per_sm(registers, smem, expected):
    assert mr.ctas_per_sm(registers, smem) == expected


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build an ELF")
def test_elf_symbols_finds_hidden_functions(tmp_path):
    """The NVPTX registration is a hidden symbol: the reader must see .symtab entries."""
    source = tmp_path / "lib.c"
    source.write_text('__attribute__((visibility("hidden"))) int hidden(void) { return 1; }\n'
                      'int shown(void) { return hidden(); }\n')
    library = tmp_path / "lib.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    found = mr.elf_symbols(library, {"hidden", "shown", "absent"})
    assert set(found) == {"hidden", "shown"} and all(found.values())


def test_committed_figures_match_the_kernels_assumptions():
    """results/mosaic_resources.json (the last compile): each kernel's refusals are
    exactly its spilling rows, nothing accepted spills, and the split-K planner's
    PROGRAMS_PER_SM is what the default ragged configuration holds per SM."""
    rows = json.loads((ROOT / "benchmarks/results/mosaic_resources.json").read_text())
    assert rows
    for row in rows:
        assert row["refused"] == (row["spill_store_bytes"] > 0), row
    default = [r for r in rows if (r["kernel"], r["head_dim"], r["page_size"], r["pages"],
                                   r["num_splits"], r["group"])
               == ("ragged", 128, 16, "bfloat16", 1, 4)]
    assert [r["ctas_per_sm"] for r in default] == [ra.PROGRAMS_PER_SM]
