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


# A hand-written kernel in the shape Triton emits: param 1 (the pool) read at a
# sign-extended 32-bit offset, param 0 (a table) at a zero-extended one, and a page id
# loaded from the table feeding the pool's offset (data: the trace stops at the load).
PTX = """
.visible .entry k(.param .u64 k_param_0, .param .u64 k_param_1)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	mov.u32 	%r1, %tid.x;
	cvt.u64.u32 	%rd3, %r1;
	shl.b64 	%rd4, %rd3, 2;
	add.s64 	%rd5, %rd1, %rd4;
	mov.u32 %r2, 0x0; @%p1 ld.global.b32 { %r2 }, [ %rd5 + 0 ];
	mad.lo.s32 	%r3, %r2, 2048, %r1;
	cvt.s64.s32 	%rd6, %r3;
$L__BB0_1:
	add.s64 	%rd7, %rd2, %rd6;
	cp.async.cg.shared.global [ %r4 + 0 ], [ %rd7 + 0 ], 0x10, %r5;
	ret;
}
"""


def test_ptx_accesses_trace_addresses_to_parameters():
    table, pool = kr.ptx_accesses(PTX)
    assert table == kr.Access("ld.global.b32", (0,), ())
    assert pool == kr.Access("cp.async.cg.shared.global", (1,), ("cvt.s64.s32",))


def test_address_errors():
    small, big = 2**20, 2**31 + 1
    assert kr.address_errors(PTX, [small, small]) == []
    # The pool's sign-extended offset is an error only past 2**31 elements.
    [error] = kr.address_errors(PTX, [small, big])
    assert "sign-extended" in error and "argument 1" in error
    # A zero-extended offset into a big table is fine; an argument never read is not.
    assert kr.address_errors(PTX, [big, small]) == []
    assert "no access found" in kr.address_errors(PTX, [small, small, big])[0]
    unsigned = PTX.replace("cvt.s64.s32", "cvt.u64.u32")
    assert kr.address_errors(unsigned, [small, big]) == []


def test_each_script_rewrites_only_its_section(tmp_path):
    """kernel_resources.md holds the Triton and the Mosaic tables, each script writing its own
    section (they run side by side in CI): a rewrite replaces that section alone."""
    path = tmp_path / "kernel_resources.md"
    kr.write_section(path, "triton", "# Triton\n| a |\n")
    kr.write_section(path, "mosaic", "## Mosaic\n| b |")
    kr.write_section(path, "triton", "# Triton\n| c |\n| d |")
    text = path.read_text()
    assert "| a |" not in text and "| c |\n| d |" in text and "| b |" in text
    assert text.index("| c |") < text.index("| b |")      # the Triton table stays first
    assert text.count("<!-- triton -->") == 1 and text.count("<!-- mosaic -->") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["kernel_resources.md"]  # no temporaries
