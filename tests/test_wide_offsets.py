"""The Triton decode kernel addresses pools of every size inside the pool.

jax's Pallas Triton lowering gives an array 64-bit offsets only above 2**32 bytes, and
Triton sign-extends a 32-bit offset: 8-bit pools of 2-4 GiB would be read at wrapped,
negative addresses. ``lowering.install_wide_offsets`` (installed by ``paged_decode``) makes
every array of more than 2**31 elements use 64-bit offsets. Checked here on the Triton IR
(every CI leg, every jax) and on the compiled PTX where jaxlib's CUDA Triton compiler is
installed (CI's resources leg runs the same PTX check: ``benchmarks/kernel_resources.py
--check``). The pools are ShapeDtypeStructs: lowering a 4.5 GiB pool allocates nothing.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax._src.lib.mlir import ir

from jpaged.pallas_kernels import lowering
from jpaged.pallas_kernels import paged_decode as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_resources as kr  # noqa: E402

try:  # private helper: an MLIR context with the Triton dialect, to read the kernel IR
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax._src.pallas.triton.lowering import _new_ir_context as triton_ir_context
except ImportError:  # pragma: no cover - depends on the installed jax
    triton_lowering = triton_ir_context = None

CASES = dict(kr.address_cases())
# The window jax's own rule gets wrong, and the sizes around it.
WINDOW = ["int8 pool 3 GiB", "int8 pool 4 GiB", "int8 stacked 4 x 768 MiB"]

needs_triton_ir = pytest.mark.skipif(triton_ir_context is None,
                                     reason="this jax has no Pallas Triton IR context")


@pytest.fixture
def jax_offset_rule(monkeypatch):
    """jax's own offset rule back in place, for the duration of one test."""
    original = triton_lowering._compute_offsets_from_indices.__wrapped__
    monkeypatch.setattr(triton_lowering, "_compute_offsets_from_indices", original)
    jax.clear_caches()
    yield
    jax.clear_caches()


def ttir_errors(label):
    [kernel] = lowering.triton_kernels(kr.export_config(**CASES[label]))
    with triton_ir_context():
        text = str(ir.Module.parse(kernel.ir))
    assert kr._TTIR_ADDPTR.findall(text), "no tt.addptr found: the parser lost its way"
    return kr.ttir_address_errors(text, kernel.elements())


def test_wide_offsets_installed():
    assert pd.WIDE_OFFSETS


@needs_triton_ir
@pytest.mark.parametrize("label", list(CASES))
def test_triton_ir_addresses(label):
    assert ttir_errors(label) == []


@needs_triton_ir
@pytest.mark.parametrize("label", WINDOW)
def test_triton_ir_check_fails_with_jax_rule(label, jax_offset_rule):
    errors = ttir_errors(label)
    assert errors and all("i32 offsets into argument" in e for e in errors), errors


def test_ptx_addresses():
    compile_fn, reason = kr.triton_compiler()
    if compile_fn is None:
        pytest.skip(f"PTX address check not run here ({reason}); CI's resources leg runs "
                    f"it: benchmarks/kernel_resources.py --check")
    rows = kr.check_addresses(compile_fn, log=lambda *_: None)
    assert [r["case"] for r in rows] == list(CASES)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def decode_shapes(dtype, num_pages):
    """eval_shape of paged_decode over a pool of ``num_pages`` Llama-3-8B pages."""
    pool = jax.ShapeDtypeStruct((8, num_pages, 16, 128), dtype)
    scale = jax.ShapeDtypeStruct(pool.shape[:-1], jnp.bfloat16)
    return jax.eval_shape(
        lambda q, k, v, t, n, ks, vs: pd.paged_decode(q, k, v, t, n, k_scale=ks, v_scale=vs),
        jax.ShapeDtypeStruct((2, 32, 128), jnp.bfloat16), pool, pool,
        jax.ShapeDtypeStruct((2, 8), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32),
        scale, scale)


def test_refuses_the_window_without_wide_offsets(monkeypatch):
    """Where this jax's lowering cannot be corrected, the window is refused, not misread."""
    monkeypatch.setattr(pd, "WIDE_OFFSETS", False)
    pages_3gib = 3 * 2**30 // (8 * 16 * 128)
    with pytest.raises(ValueError, match=r"2\*\*31 elements"):
        decode_shapes(jnp.int8, pages_3gib)
    decode_shapes(jnp.int8, pages_3gib // 2)  # 1.5 GiB: 32-bit offsets are right
    decode_shapes(jnp.int8, 3 * pages_3gib // 2)  # 4.5 GiB: jax's rule gives 64 bits
