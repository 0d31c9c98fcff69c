"""Lowering the Triton kernels for CUDA without a GPU: the CI's view of what a GPU would get.

``export_for_cuda`` runs ``jax.export`` with ``platforms=["cuda"]`` on a CPU machine;
``triton_kernels`` pulls each Triton kernel's IR (and its num_warps / num_stages) out of
the exported module, so it can be verified or compiled for sm_90 (see
``benchmarks/kernel_resources.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import jax
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
    jaxlib 0.10-0.12) the kernel name, Triton IR bytecode, num_warps, num_stages."""

    target: str
    name: str | None = None
    ir: bytes | None = None
    num_warps: int | None = None
    num_stages: int | None = None


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


def _kernel(call) -> TritonKernel:
    target = ir.StringAttr(call.attributes["call_target_name"]).value
    if "mhlo.backend_config" not in call.attributes:
        return TritonKernel(target)
    config = call.attributes["mhlo.backend_config"]
    if not isinstance(config, ir.DictAttr) or "ir" not in config:
        return TritonKernel(target)
    return TritonKernel(target, ir.StringAttr(config["name"]).value,
                        ir.StringAttr(config["ir"]).value_bytes,
                        ir.IntegerAttr(config["num_warps"]).value,
                        ir.IntegerAttr(config["num_stages"]).value)
