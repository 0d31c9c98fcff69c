"""Lowering the Triton kernels for CUDA without a GPU: the CI's view of what a GPU would get.

``export_for_cuda`` runs ``jax.export`` with ``platforms=["cuda"]`` on a CPU machine;
``triton_kernels`` pulls each Triton kernel's IR (and its num_warps / num_stages) out of
the exported module, so it can be verified or compiled for sm_90 (see
``benchmarks/kernel_resources.py``).

``install_wide_offsets`` corrects one rule of jax's Pallas Triton lowering (64-bit element
offsets for every array of more than 2**31 elements); ``paged_decode`` installs it on
import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings

import jax
import numpy as np
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir

# The Triton custom call is named differently across jaxlib versions.
TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
# The GPU the kernels are sized for (H100/H200: 132 SMs, compute capability 9.0).
TARGET_DEVICE_KIND = "NVIDIA H200"
TARGET_NUM_SMS = 132
# jax >= 0.11 emits this at every Pallas Triton lowering. The Triton backend is what this
# kernel targets until the Mosaic GPU kernel replaces it, so this one message is silenced
# where we lower; any other deprecation still shows.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"


@contextlib.contextmanager
def triton_deprecation_silenced():
    """Silence exactly jax's Pallas Triton deprecation warning inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION,
                                category=DeprecationWarning)
        yield


# Element offsets up to this fit a signed 32-bit integer; Triton's tt.addptr sign-extends a
# 32-bit offset, so an array with more elements needs 64-bit offsets.
MAX_INT32_ELEMENTS = 2**31


def install_wide_offsets() -> bool:
    """Make jax's Pallas Triton lowering compute 64-bit offsets for every array of more
    than 2**31 elements; returns whether the lowering now does.

    jax picks 64-bit offsets only for arrays over 2**32 *bytes*
    (``_compute_offsets_from_indices``), but the offsets count *elements* and Triton
    sign-extends a 32-bit one: a 1-byte array (int8 or float8 KV codes) of 2-4 GiB gets
    offsets past 2**31 that wrap negative, and the kernel reads outside the pool. 2- and
    4-byte arrays are not affected (their element counts stay below 2**31 up to 4 GiB).
    The wrapper shows jax a 2-byte dtype for such an array, whose size then passes 2**32
    bytes (the only use jax makes of the dtype there). Private API, checked by the Triton
    IR test (tests/test_wide_offsets.py, every jax CI runs) and the PTX test
    (``benchmarks/kernel_resources.py --check``); where jax lacks the function it returns
    False and ``needs_wide_offsets`` lets callers refuse the arrays it would get wrong.
    """
    try:
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError:  # pragma: no cover - depends on the installed jax
        return False
    original = getattr(triton_lowering, "_compute_offsets_from_indices", None)
    if original is None:  # pragma: no cover - depends on the installed jax
        return False
    if getattr(original, "jpaged_wide_offsets", False):
        return True

    @functools.wraps(original)  # __wrapped__ keeps jax's own rule (the tests restore it)
    def compute_offsets(block_info, nd_indexer, *args, **kwargs):
        aval = block_info.full_shape_dtype
        if needs_wide_offsets(aval.shape, aval.dtype):
            block_info = dataclasses.replace(
                block_info, full_shape_dtype=aval.update(dtype=np.dtype(np.uint16)))
        return original(block_info, nd_indexer, *args, **kwargs)

    compute_offsets.jpaged_wide_offsets = True
    triton_lowering._compute_offsets_from_indices = compute_offsets
    return True


def needs_wide_offsets(shape, dtype) -> bool:
    """Whether jax's own rule would give this array 32-bit offsets past 2**31 elements."""
    elements = math.prod(shape)
    return elements > MAX_INT32_ELEMENTS and elements * np.dtype(dtype).itemsize <= 2**32


def _jax_version() -> tuple[int, ...]:
    return tuple(int(part) for part in jax.__version__.split(".")[:3] if part.isdigit())


def cuda_device_context():
    """What a CPU-side CUDA lowering needs: on jax >= 0.11 the Pallas Triton lowering asks
    the device for its compute capability, so an abstract H200 stands in for it; older jax
    falls back to sm_90 by itself."""
    if _jax_version() < (0, 11):
        return contextlib.nullcontext()
    from jax.sharding import AbstractMesh, use_abstract_mesh
    try:
        from jax.sharding import AbstractDevice
    except ImportError:  # pragma: no cover - depends on the installed jax
        from jax._src.mesh import AbstractDevice
    device = AbstractDevice(device_kind=TARGET_DEVICE_KIND, platform="cuda",
                            num_cores=TARGET_NUM_SMS)
    return use_abstract_mesh(AbstractMesh((), (), abstract_device=device))


def export_for_cuda(fn, *args):
    """``jax.export`` of ``jax.jit(fn)`` for CUDA, from any machine."""
    disabled = [jax.export.DisabledSafetyCheck.custom_call(name) for name in TRITON_CALLS]
    with cuda_device_context(), triton_deprecation_silenced():
        return jax.export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=disabled)(*args)


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Triton custom call: its target, and (where the IR travels in the call, as on
    jaxlib 0.10-0.12) the kernel name, Triton IR bytecode, num_warps, num_stages.
    ``arrays``: (shape, element type) of each kernel argument in order, the call's
    operands then its results (a Triton kernel's outputs are arguments too)."""

    target: str
    name: str | None = None
    ir: bytes | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    arrays: tuple[tuple[tuple[int, ...], str], ...] = ()

    def elements(self) -> list[int]:
        """Element count of each kernel argument."""
        return [math.prod(shape) for shape, _ in self.arrays]


def custom_calls(exported) -> list[TritonKernel]:
    """Every ``stablehlo.custom_call`` of an exported module (Triton or not)."""
    calls = []
    with mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        if child.operation.name == "stablehlo.custom_call":
                            calls.append(_kernel(child.operation))
                        walk(child.operation)

        walk(module.operation)
    return calls


def triton_kernels(exported) -> list[TritonKernel]:
    return [call for call in custom_calls(exported) if call.target in TRITON_CALLS]


def _array(value) -> tuple[tuple[int, ...], str]:
    kind = ir.RankedTensorType(value.type)
    return tuple(kind.shape), str(kind.element_type)


def _kernel(call) -> TritonKernel:
    target = ir.StringAttr(call.attributes["call_target_name"]).value
    if "mhlo.backend_config" not in call.attributes:
        return TritonKernel(target)
    config = call.attributes["mhlo.backend_config"]
    if not isinstance(config, ir.DictAttr) or "ir" not in config:
        return TritonKernel(target)
    arrays = tuple(_array(v) for v in [*call.operands, *call.results])
    return TritonKernel(target, ir.StringAttr(config["name"]).value,
                        ir.StringAttr(config["ir"]).value_bytes,
                        ir.IntegerAttr(config["num_warps"]).value,
                        ir.IntegerAttr(config["num_stages"]).value, arrays)
