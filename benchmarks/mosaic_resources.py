"""Compile the Mosaic GPU kernels' default configurations to sm_90a cubins from the CPU
and report registers, spills, barriers and the CTAs one SM holds.

The route (no GPU): ``jax.export(..., platforms=["cuda"])`` lowers a kernel to a
``mosaic_gpu_v2`` custom call whose backend config carries the kernel's serialized
module; the CUDA plugin's exported ``MosaicGpuCompile`` lowers that module to PTX and
runs ptxas (``MOSAIC_GPU_DUMP_PTXAS=1`` prints its ``-v`` report), then asks the driver
to load the cubin. Here the driver is a stub ``libcuda.so.1`` built from ``CUDA_STUB``
below: it reports one sm_90 device and refuses to load modules, so the compile stops
right after ptxas. Two more pieces: ``MOSAIC_GPU_RUNTIME_LIB_PATH`` (the plugin's
``libmosaic_gpu_runtime.so``) and LLVM's NVPTX target, which the plugin registers in
``mosaic::gpu::EnsureLLVMNVPTXTargetIsRegistered``, a hidden symbol called here through
its offset in the plugin's ELF symbol table. Each configuration compiles in its own
process (the environment must be set before the plugin loads).

Needs (CI leg 3's venv): jax/jaxlib 0.10.2, jax-cuda12-plugin and jax-cuda12-pjrt
0.10.2, the nvidia-cuda-nvcc-cu12 wheel (ptxas), a C compiler. Where a piece is missing
it prints which and exits 0: nothing was checked, and it says so.

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/mosaic_resources.py --check

writes ``benchmarks/results/mosaic_resources.{md,json}``; ``--check`` exits 1 when a
configuration ``check_config`` accepts spills, or one it refuses as spilling
(``ragged_attention.spills``, ``mosaic_decode.spills``, compiled here anyway) no longer
does. Shared memory is the kernels' own estimate (``smem_bytes``: every
buffer rounded up to 1 KiB, what Mosaic GPU checks against 227 KiB when lowering; ptxas
reports only static shared memory).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
REGISTERS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
THREADS = 128        # one warpgroup: both kernels launch 128 threads per CTA (256 when
                     # the decode tile is warp-specialized: a copy and a compute warpgroup)
MAX_BLOCKS_PER_SM = 32
NUM_KV_HEADS = 2

CUDA_STUB = r"""
/* A CUDA driver that reports one sm_90 device (H100/H200) and loads no module. */
typedef int CUresult;
CUresult cuInit(unsigned f) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 12080; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return 0; }
CUresult cuDeviceGet(int *d, int i) { *d = 0; return 0; }
CUresult cuCtxGetCurrent(void **c) { *c = (void *)0x1; return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuCtxPushCurrent(void *c) { return 0; }
CUresult cuCtxPopCurrent(void **c) { return 0; }
CUresult cuDeviceGetAttribute(int *v, int attribute, int d) {
  switch (attribute) {
    case 75: *v = 9; break;        /* compute capability major */
    case 76: *v = 0; break;        /* minor */
    case 16: *v = 132; break;      /* multiprocessors */
    case 97: *v = 232448; break;   /* shared memory per block, opt-in */
    default: *v = 0;
  }
  return 0;
}
CUresult cuModuleLoadData(void **m, const void *image) { return 801; }
CUresult cuModuleLoadDataEx(void **m, const void *i, unsigned n, void *o, void **v) {
  return 801;
}
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub libcuda: no GPU"; return 0; }
CUresult cuGetErrorName(CUresult e, const char **s) { *s = "CUDA_ERROR_STUB"; return 0; }
"""

REGISTRATION = "_ZN6mosaic3gpu33EnsureLLVMNVPTXTargetIsRegisteredEv"
COMPILE = "MosaicGpuCompile"


@dataclasses.dataclass
class Row:
    kernel: str
    head_dim: int
    page_size: int
    pages_per_block: int
    group: int
    dtype: str
    pages: str
    num_splits: int
    warp_specialized: bool
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    barriers: int
    smem_bytes: int
    ctas_per_sm: int
    refused: bool      # check_config refuses it on a GPU (ragged_attention.spills,
                       # mosaic_decode.spills)
    padded_mma: float  # share of a decode token's MMA work on padding (padded_mma())

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes)


def padded_mma(kernel: str, group: int) -> float:
    """Share of one decode token's MMA work spent on padding: the ragged kernel fills
    ``group`` of its 64 query rows, the decode tile ``group`` of its ``num_cols`` columns."""
    from jpaged.pallas_kernels import mosaic_decode, ragged_attention as ra
    if kernel == "decode":
        return mosaic_decode.padded_fraction(group)
    return 1.0 - group / ra.BLOCK_ROWS


def ctas_per_sm(registers: int, smem: int, threads: int = THREADS) -> int:
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (REGISTERS_PER_SM // per_warp) // (threads // 32)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK)
    return min(by_registers, by_smem, MAX_BLOCKS_PER_SM)


def elf_symbols(path: Path, names) -> dict[str, int]:
    """Values (offsets) of the named symbols in an ELF64 file's .symtab, hidden ones too."""
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    found = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:          # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for start in range(offset, offset + size, entsize):
            name_at, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", data, start)
            end = data.index(b"\0", strtab + name_at)
            name = data[strtab + name_at:end].decode(errors="replace")
            if name in names:
                found[name] = value
    return found


def find_pieces():
    """(plugin .so, runtime .so, ptxas dir, C compiler), or a string saying what is missing."""
    try:
        import jax_plugins.xla_cuda12 as cuda_plugin
        import jax_cuda12_plugin
    except ImportError as err:
        return f"no CUDA plugin (jax-cuda12-plugin, jax-cuda12-pjrt): {err}"
    plugin = Path(cuda_plugin._get_library_path())
    runtime = Path(jax_cuda12_plugin.__file__).parent / "libmosaic_gpu_runtime.so"
    if not runtime.exists():
        return f"no {runtime}"
    ptxas = os.environ.get("PTXAS")
    if not ptxas:
        try:
            import nvidia.cuda_nvcc
            candidates = [Path(p) / "bin" / "ptxas" for p in nvidia.cuda_nvcc.__path__]
            ptxas = next((str(c) for c in candidates if c.exists()), None)
        except ImportError:
            ptxas = shutil.which("ptxas")
    if not ptxas:
        return "no ptxas (nvidia-cuda-nvcc-cu12 wheel, $PTXAS or PATH)"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler for the stub libcuda.so.1"
    symbols = elf_symbols(plugin, {REGISTRATION, COMPILE})
    if set(symbols) != {REGISTRATION, COMPILE}:
        return f"{plugin.name} has no symbol table entry for {REGISTRATION} or {COMPILE}"
    return plugin, runtime, Path(ptxas).parent, compiler, symbols


def compile_module(module_path: str, plugin: str, registration_offset: int,
                   compile_offset: int) -> None:
    """Child process: register NVPTX, then MosaicGpuCompile the module (ptxas reports)."""
    dll = ctypes.CDLL(plugin)
    base = ctypes.cast(dll.MosaicGpuCompile, ctypes.c_void_p).value - compile_offset
    ctypes.CFUNCTYPE(None)(base + registration_offset)()
    compile_fn = dll.MosaicGpuCompile
    compile_fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_fn.restype = ctypes.c_void_p
    module = Path(module_path).read_bytes()
    compile_fn(module, len(module))   # NULL: the stub driver refused to load the cubin


def mosaic_modules(exported) -> list[bytes]:
    """The serialized Mosaic GPU modules of an exported function's custom calls."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    modules = []
    with mlir.make_ir_context():
        parsed = ir.Module.parse(exported.mlir_module())

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        op_ = child.operation
                        if (op_.name == "stablehlo.custom_call" and ir.StringAttr(
                                op_.attributes["call_target_name"]).value.startswith(
                                    "mosaic_gpu")):
                            config = op_.attributes["mhlo.backend_config"]
                            modules.append(ir.StringAttr(config["module"]).value_bytes)
                        walk(op_)
        walk(parsed.operation)
    return modules


def configurations():
    """Every default shape the engine would launch for head_dim 64/128/256 at pages 8,
    16, 64 (16-bit), plus split-K, 8-bit pages and GQA groups 1 and 8 at head_dim 128,
    page 16 (group 4 elsewhere), the decode tile's warp-specialized pipeline at head_dim
    64/128/256 and over int8 pages; then, at more pages a step than the default, the
    edges of the spill rules (``ragged_attention.spills``, ``mosaic_decode.spills``) on
    both sides, so that ``--check`` fails when a rule stops matching the compile."""
    configs = []
    for head_dim in (64, 128, 256):
        for page in (8, 16, 64):
            configs.append(dict(kernel="ragged", head_dim=head_dim, page_size=page, group=4,
                                dtype="bfloat16", pages="bfloat16", num_splits=1))
            configs.append(dict(kernel="decode", head_dim=head_dim, page_size=page, group=4,
                                dtype="bfloat16", pages="bfloat16", num_splits=1))
    for kernel in ("ragged", "decode"):
        configs.append(dict(kernel=kernel, head_dim=128, page_size=16, group=4,
                            dtype="bfloat16", pages="bfloat16", num_splits=4))
        for pages in ("int8", "float8_e4m3fn"):
            configs.append(dict(kernel=kernel, head_dim=128, page_size=16, group=4,
                                dtype="bfloat16", pages=pages, num_splits=1))
        for group in (1, 8):
            configs.append(dict(kernel=kernel, head_dim=128, page_size=16, group=group,
                                dtype="bfloat16", pages="bfloat16", num_splits=1))
    for head_dim, pages in ((64, "bfloat16"), (128, "bfloat16"), (256, "bfloat16"),
                            (128, "int8")):
        configs.append(dict(kernel="decode", head_dim=head_dim, page_size=16, group=4,
                            dtype="bfloat16", pages=pages, num_splits=1,
                            warp_specialized=True))
    edges = [("ragged", 128, 8, 16), ("ragged", 64, 16, 16), ("decode", 64, 8, 32),
             ("decode", 128, 16, 8), ("decode", 128, 8, 32), ("decode", 256, 64, 2)]
    for kernel, head_dim, page, pages_per_block in edges:
        configs.append(dict(kernel=kernel, head_dim=head_dim, page_size=page, group=4,
                            dtype="bfloat16", pages="bfloat16", num_splits=1,
                            pages_per_block=pages_per_block))
    from jpaged.pallas_kernels import ragged_attention as ra
    return [dict(c, warp_specialized=c.get("warp_specialized", False),
                 pages_per_block=c.get("pages_per_block")
                 or ra.default_pages_per_block(c["page_size"])) for c in configs]


def export(config):
    import jax
    import jax.numpy as jnp

    from jpaged.pallas_kernels import mosaic_decode, ragged_attention
    ragged_attention.REFUSE_SPILLING = False   # compile the refused ones too, to show why
    dtype, pages = jnp.dtype(config["dtype"]), jnp.dtype(config["pages"])
    head_dim, page, group = config["head_dim"], config["page_size"], config["group"]
    ppb = config["pages_per_block"]
    pool, batch, width = (NUM_KV_HEADS, 64, page, head_dim), 4, 16
    quantized = pages != dtype
    scale = jax.ShapeDtypeStruct(pool[:-1], jnp.bfloat16) if quantized else None
    tokens = batch
    q = jax.ShapeDtypeStruct((tokens, NUM_KV_HEADS * group, head_dim), dtype)
    common = [jax.ShapeDtypeStruct(pool, pages), jax.ShapeDtypeStruct(pool, pages),
              jax.ShapeDtypeStruct((batch, width), jnp.int32),
              jax.ShapeDtypeStruct((batch,), jnp.int32)]
    splits = config["num_splits"]
    if config["kernel"] == "decode":
        def fn(q, k, v, tables, lengths, ks, vs):
            return mosaic_decode.paged_decode(q, k, v, tables, lengths, k_scale=ks, v_scale=vs,
                                              num_splits=splits, pages_per_block=ppb,
                                              warp_specialized=config["warp_specialized"])
        args = [q, *common, scale, scale]
    else:
        def fn(q, k, v, tables, lengths, seq, pos, ks, vs):
            return ragged_attention.paged_attention_tokens(
                q, k, v, tables, lengths, seq, pos, k_scale=ks, v_scale=vs, num_splits=splits,
                pages_per_block=ppb)
        index = jax.ShapeDtypeStruct((tokens,), jnp.int32)
        args = [q, *common, index, index, scale, scale]
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)


def smem_estimate(config) -> int:
    import jax.numpy as jnp

    from jpaged.pallas_kernels import mosaic_decode, ragged_attention as ra
    dtype, pages = jnp.dtype(config["dtype"]), jnp.dtype(config["pages"])
    head_dim, page, splits = config["head_dim"], config["page_size"], config["num_splits"]
    ppb = config["pages_per_block"]
    if config["kernel"] == "decode":
        stages = mosaic_decode.default_num_stages(head_dim, page, pages, ppb, config["group"],
                                                  dtype, config["warp_specialized"])
        return mosaic_decode.smem_bytes(head_dim, page, pages, ppb, stages, config["group"],
                                        dtype)
    stages = ra.default_num_stages(head_dim, page, pages, ppb, splits, dtype)
    return ra.smem_bytes(head_dim, page, pages, ppb, stages, splits, dtype)


def parse_ptxas(report: str) -> dict:
    """The Triton table's figures (``kernel_resources.parse_ptxas``) and the barriers."""
    import kernel_resources   # beside this file; imported late: it loads jax and the kernels

    return dict(kernel_resources.parse_ptxas(report),
                barriers=kernel_resources.ptxas_figure(report, r"used (\d+) barriers"))


_EXPORT_LOCK = threading.Lock()


def compile_config(config, pieces, workdir: Path, index: int = 0) -> Row:
    """One configuration's figures; safe to run in threads (exports one at a time, then
    compiles in its own process from its own module file)."""
    plugin, runtime, ptxas_dir, _, symbols = pieces
    with _EXPORT_LOCK:   # tracing sets module globals (REFUSE_SPILLING): one at a time
        (module,) = mosaic_modules(export(config))
    module_path = workdir / f"module{index}.bin"
    module_path.write_bytes(module)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{workdir}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               MOSAIC_GPU_RUNTIME_LIB_PATH=str(runtime), MOSAIC_GPU_DUMP_PTXAS="1",
               PATH=f"{ptxas_dir}:{os.environ.get('PATH', '')}", JAX_PLATFORMS="cpu")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import mosaic_resources as m; "
            "m.compile_module(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))")
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(module_path), str(plugin),
         str(symbols[REGISTRATION]), str(symbols[COMPILE])],
        env=env, capture_output=True, text=True, timeout=600)
    figures = parse_ptxas(done.stdout + done.stderr)
    smem = smem_estimate(config)
    from jpaged.pallas_kernels import mosaic_decode, ragged_attention as ra
    block_kv = config["pages_per_block"] * config["page_size"]
    refused = (ra.spills if config["kernel"] == "ragged" else mosaic_decode.spills)(
        config["head_dim"], block_kv)
    return Row(**config, **figures, smem_bytes=smem,
               ctas_per_sm=ctas_per_sm(figures["registers"], smem,
                                       2 * THREADS if config["warp_specialized"] else THREADS),
               refused=refused,
               padded_mma=padded_mma(config["kernel"], config["group"]))


def table(rows) -> str:
    head = ("| kernel | head_dim | page | keys/step | group | q | pages | splits | threads | "
            "regs | spill st/ld B | "
            "stack B | barriers | smem KiB (est.) | CTAs/SM | padded MMA | ok |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r.kernel} | {r.head_dim} | {r.page_size} | "
             f"{r.page_size * r.pages_per_block} | {r.group} | {r.dtype} | "
             f"{r.pages} | {r.num_splits} | {2 * THREADS if r.warp_specialized else THREADS} "
             f"| {r.registers} | {r.spill_store_bytes}/"
             f"{r.spill_load_bytes} | {r.stack_bytes} | {r.barriers} | "
             f"{r.smem_bytes / 1024:.0f} | {r.ctas_per_sm} | {r.padded_mma:.0%} | "
             f"{('refused: spills' if r.refused else 'SPILLS') if r.spills else 'ok'} |"
             for r in rows]
    return "\n".join([head, *lines])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a configuration spills")
    args = parser.parse_args()
    pieces = find_pieces()
    if isinstance(pieces, str):
        print(f"mosaic_resources: SKIPPED, nothing compiled or checked: {pieces}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run([pieces[3], "-shared", "-fPIC", "-x", "c", "-", "-o",
                        str(workdir / "libcuda.so.1")], input=CUDA_STUB, text=True,
                       check=True)
        # Each compile is its own process (python, the plugin, LLVM, ptxas): one per core.
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            compiled = pool.map(lambda item: compile_config(item[1], pieces, workdir, item[0]),
                                enumerate(configurations()))
            for row in compiled:   # in order, each as soon as it and those before are done
                print(f"{row.kernel} d={row.head_dim} page={row.page_size} "
                      f"keys={row.page_size * row.pages_per_block} {row.pages} "
                      f"splits={row.num_splits}: {row.registers} regs, spills "
                      f"{row.spill_store_bytes}/{row.spill_load_bytes} B", flush=True)
                rows.append(row)
    text = table(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    intro = ("# Mosaic GPU kernel resources (sm_90a)\n\n"
             "Compiled from the CPU through the CUDA plugin's MosaicGpuCompile and ptxas with "
             "a stub driver (`benchmarks/mosaic_resources.py`; jax 0.10.2). 128 threads per "
             "CTA. smem: the kernels' own estimate (ptxas reports static shared memory "
             "only). CTAs/SM from registers and that estimate; for the warp-specialized "
             "tile (256 threads: a copy and a compute warpgroup, setmaxnreg 40 / 232) "
             "ptxas reports 232 registers and CTAs/SM counts them for all 256 threads. "
             "padded MMA: the share of "
             "a decode token's wgmma work on padding (ragged: group of 64 query rows; "
             "decode tile: group of max(8, group) columns).\n\n")
    (RESULTS / "mosaic_resources.md").write_text(intro + text + "\n")
    # The same table beside the Triton one, in kernel_resources.md's own section (imported
    # here: each compile's child process imports this module and needs none of it).
    import kernel_resources
    kernel_resources.write_section(RESULTS / "kernel_resources.md", "mosaic",
                                   intro.replace("# ", "## ", 1) + text)
    (RESULTS / "mosaic_resources.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    spilling = [r for r in rows if r.spills and not r.refused]
    if spilling:
        print(f"mosaic_resources: {len(spilling)} configuration(s) check_config accepts "
              f"spill", file=sys.stderr)
    unflagged = [r for r in rows if r.refused and not r.spills]
    if unflagged:
        print(f"mosaic_resources: {len(unflagged)} configuration(s) refused as spilling "
              f"no longer spill: update ragged_attention.spills / mosaic_decode.spills",
              file=sys.stderr)
    if args.check and (spilling or unflagged):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
