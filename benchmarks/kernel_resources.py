"""Compile every default Triton decode configuration for sm_90 from the CPU and report
registers, spills, shared memory and the programs that fit one SM.

Triton IR comes from ``jax.export`` for CUDA (``jpaged.pallas_kernels.lowering``); jaxlib's Triton
(the handler the ``jax-cuda12-pjrt`` plugin registers; ``JAX_PLATFORMS=cpu`` lets it load
without a GPU) turns it into PTX and reports shared memory; ``ptxas -v`` gives registers,
spills and stack. ptxas is taken from ``$PTXAS``, else the ``nvidia-cuda-nvcc-cu12`` wheel,
else the PATH. Without the handler or ptxas this prints why and exits 0 with ``--check``
(nothing to check), so a CPU-only machine without those extras is not a failure.

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/kernel_resources.py --check

writes ``benchmarks/results/kernel_resources.{md,json}``; ``--check`` exits 1 if any
configuration spills or needs more than 227 KiB of shared memory.

It also checks the kernel's addresses from its PTX (``benchmarks/results/
kernel_addresses.md``): pools of every dtype just under 2 GiB, at 3 and 4 GiB and past
4 GiB (ShapeDtypeStructs: nothing is allocated), stacked layers, a table and scales of
more than 2**31 elements. A 32-bit offset that Triton sign-extends into an address wraps
negative past 2**31 elements, so no address into an argument of more elements may hold
one (``address_errors``); ``--check`` exits 1 if any does.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from jpaged.pallas_kernels import lowering
from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels.quantization import FORMATS, SCALE_DTYPE, is_quantized

ARCH = "9.0"
PTXAS_ARCH = "sm_90a"  # Triton targets sm_90a on Hopper
# Per SM on sm_90: 64 K registers, 228 KiB shared memory (227 KiB per block, 1 KiB of it
# reserved per block), 64 warps, 32 blocks.
REGISTERS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 256  # registers per warp are allocated in these units

HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (8, 16, 32, 64, 128)
# Every GQA group up to 16 pads to the same 16-row kernel, so one stands for all of them.
GROUPS = (8,)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# 8-bit pages are read with bfloat16 queries (what models run) and float32 ones (TF32x3
# dots over the dequantized tile).
FORMATS_8BIT = tuple(FORMATS.values())
QUERY_DTYPES_8BIT = (jnp.bfloat16, jnp.float32)
NUM_KV_HEADS = 2
RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass
class Resources:
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    smem_bytes: int
    num_warps: int
    num_stages: int

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes)

    @property
    def programs_per_sm(self) -> int:
        return programs_per_sm(self.registers, self.num_warps, self.smem_bytes)


def programs_per_sm(registers: int, num_warps: int, smem_bytes: int) -> int:
    """Resident programs (CTAs) per sm_90 SM, limited by registers, shared memory, warps."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // num_warps if per_warp else MAX_BLOCKS_PER_SM
    by_smem = SMEM_PER_SM // (smem_bytes + SMEM_RESERVED_PER_BLOCK)
    return min(by_registers, by_smem, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)


def ptxas_figure(report: str, pattern: str) -> int:
    """The number ``pattern`` captures in the last report of ``ptxas -v`` output."""
    found = re.findall(pattern, report)
    if not found:
        raise ValueError(f"no {pattern!r} in ptxas output:\n{report[-3000:]}")
    return int(found[-1])


def parse_ptxas(report: str) -> dict:
    """Registers, spills and stack from ``ptxas -v`` output (the kernel's last report)."""
    def last(pattern):
        return ptxas_figure(report, pattern)
    return dict(registers=last(r"Used (\d+) registers"),
                stack_bytes=last(r"(\d+) bytes stack frame"),
                spill_store_bytes=last(r"(\d+) bytes spill stores"),
                spill_load_bytes=last(r"(\d+) bytes spill loads"))


def find_ptxas() -> str | None:
    if os.environ.get("PTXAS"):
        return os.environ["PTXAS"]
    try:
        import nvidia.cuda_nvcc
        for root in nvidia.cuda_nvcc.__path__:
            candidate = Path(root) / "bin" / "ptxas"
            if candidate.exists():
                return str(candidate)
    except ImportError:
        pass
    return shutil.which("ptxas")


def triton_compiler():
    """jaxlib's Triton compile function, or None with the reason."""
    try:
        from jax._src.lib import triton
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        return None, f"jaxlib has no Triton module ({err})"
    if not hasattr(triton, "compile"):
        return None, f"jax {jax.__version__} exposes no Triton compile function"
    jax.devices()  # plugins register their handlers when the backends initialise
    if not triton.has_compilation_handler("cuda"):
        return None, ("no CUDA Triton compilation handler: install jax-cuda12-plugin and "
                      "jax-cuda12-pjrt of this jax version and set JAX_PLATFORMS=cpu")
    return triton.compile, None


def compile_kernel(kernel: lowering.TritonKernel, compile_fn, ptxas: str) -> Resources:
    result = compile_fn("cuda", kernel.ir, ARCH, num_warps=kernel.num_warps, num_ctas=1,
                        num_stages=kernel.num_stages)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(result.asm)
        done = subprocess.run([ptxas, f"-arch={PTXAS_ARCH}", "-v", str(ptx), "-o",
                               str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"ptxas failed ({done.returncode}): {done.stderr}")
    return Resources(smem_bytes=int(result.smem_bytes), num_warps=kernel.num_warps,
                     num_stages=kernel.num_stages, **parse_ptxas(done.stderr + done.stdout))


def configurations():
    """(label, config) for every shape check_config accepts with the default tuning, each
    with one split (the in-kernel output path) and with several (partials + merge): float
    pages with queries of their dtype, 8-bit pages with each of QUERY_DTYPES_8BIT."""
    kinds = [(d, d) for d in DTYPES] + list(itertools.product(FORMATS_8BIT,
                                                              QUERY_DTYPES_8BIT))
    for head_dim, page_size, group, (dtype, q_dtype) in itertools.product(
            HEAD_DIMS, PAGE_SIZES, GROUPS, kinds):
        try:
            pd.check_config(NUM_KV_HEADS * group, NUM_KV_HEADS, head_dim, page_size, dtype,
                            q_dtype=q_dtype)
        except ValueError:
            continue
        for num_splits in (1, 3):
            yield dict(head_dim=head_dim, page_size=page_size, group=group,
                       dtype=jnp.dtype(dtype).name, q_dtype=jnp.dtype(q_dtype).name,
                       num_splits=num_splits)


def export_config(head_dim, page_size, group, dtype, q_dtype, num_splits, *, num_pages=64,
                  width=16, batch=2, num_layers=None, num_kv_heads=NUM_KV_HEADS):
    """jax.export for CUDA of one decode call on ShapeDtypeStructs (nothing allocated, so
    a pool of any size costs nothing); ``num_layers`` stacks the pool (traced layer)."""
    pool = (num_kv_heads, num_pages, page_size, head_dim)
    pool = jax.ShapeDtypeStruct(pool if num_layers is None else (num_layers, *pool), dtype)
    args = [jax.ShapeDtypeStruct((batch, num_kv_heads * group, head_dim), q_dtype), pool,
            pool, jax.ShapeDtypeStruct((batch, width), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32)]
    if is_quantized(dtype):
        args += [jax.ShapeDtypeStruct(pool.shape[:-1], SCALE_DTYPE)] * 2
    if num_layers is not None:
        args.append(jax.ShapeDtypeStruct((), jnp.int32))

    def decode(q, k, v, tables, lengths, *rest):
        layer = rest[-1] if num_layers is not None else None
        scales = rest[:2] if is_quantized(dtype) else ()
        return pd.paged_decode(q, k, v, tables, lengths, layer=layer, num_splits=num_splits,
                               **dict(zip(("k_scale", "v_scale"), scales)))

    return lowering.export_for_cuda(decode, *args)


# ---------------------------------------------------------------- addresses

GiB = 2**30
# Pool sizes (bytes per K or V pool) around the 32-bit limits: element offsets pass 2**31
# in 1-byte pools from 2 GiB, and jax's own rule switches to 64 bits above 4 GiB.
ADDRESS_POOL_BYTES = {"under 2 GiB": 2 * GiB - 1, "3 GiB": 3 * GiB, "4 GiB": 4 * GiB,
                      "4.5 GiB": 4 * GiB + GiB // 2}
# Llama-3-8B's attention geometry: 8 kv heads, head_dim 128, pages of 16.
ADDRESS_MODEL = dict(num_kv_heads=8, head_dim=128, page_size=16, group=4)


def address_cases():
    """(label, export_config kwargs): every pool dtype at every ADDRESS_POOL_BYTES, a
    stacked 3 GiB int8 pool, and a table and 8-bit scales of more than 2**31 elements
    (the other arguments a kernel indexes by data)."""
    model = ADDRESS_MODEL
    page_elements = model["num_kv_heads"] * model["page_size"] * model["head_dim"]
    kinds = [(d, jnp.bfloat16) for d in FORMATS_8BIT] + [(d, d) for d in DTYPES]
    for (dtype, q_dtype), (size, pool_bytes) in itertools.product(
            kinds, ADDRESS_POOL_BYTES.items()):
        pages = pool_bytes // (page_elements * jnp.dtype(dtype).itemsize)
        yield (f"{jnp.dtype(dtype).name} pool {size}",
               dict(model, dtype=dtype, q_dtype=q_dtype, num_splits=1, num_pages=pages))
    int8 = FORMATS_8BIT[0]
    yield ("int8 stacked 4 x 768 MiB", dict(model, dtype=int8, q_dtype=jnp.bfloat16,
                                            num_splits=3, num_layers=4,
                                            num_pages=3 * GiB // (4 * page_elements)))
    yield ("table of 2**31 + 2**16 entries", dict(model, dtype=jnp.bfloat16,
                                                  q_dtype=jnp.bfloat16, num_splits=1,
                                                  width=2**16, batch=2**15 + 1))
    # Scales have a head_dim-th of the codes' elements: head_dim 16 and 2**35 codes.
    yield ("int8 scales of 2**31 elements", dict(model, dtype=int8, q_dtype=jnp.bfloat16,
                                                 num_splits=1, head_dim=16,
                                                 num_pages=2**35 // (8 * 16 * 16)))


# PTX: a register, a bracketed address, a kernel parameter, the instructions that widen a
# signed 32-bit (or narrower) value to 64 bits.
_REGISTER = re.compile(r"%[a-z]+\d*")
_BRACKET = re.compile(r"\[([^\]]*)\]")
_PARAM = re.compile(r"_param_(\d+)\b")
_SIGN_EXTENDING = re.compile(r"^(cvt\.s64\.s(8|16|32)|(mul|mad)\.wide\.s(16|32))\b")
_NO_DESTINATION = ("st.", "cp.", "red.", "bar.", "prefetch", "ret", "bra", "fence",
                   "membar", "mbarrier", "barrier")


def _ptx_statements(ptx: str):
    """(opcode, operands) of each PTX instruction, labels, predicates and braces off."""
    ptx = re.sub(r"//[^\n]*", "", ptx)
    for raw in (part for line in ptx.splitlines() for part in line.split(";")):
        text = re.sub(r"^[\s{}]*((\$?[\w$]+:)\s*)*[\s{}]*", "", raw)
        text = re.sub(r"^@!?%\w+\s+", "", text).strip()
        if text and not text.startswith("."):
            opcode, _, operands = text.partition(" ")
            yield opcode, operands.strip()


@dataclasses.dataclass(frozen=True)
class Access:
    """One global memory access: its instruction, the kernel parameters its address is
    computed from, and the sign-extending instructions on that computation."""

    opcode: str
    params: tuple[int, ...]
    sign_extended: tuple[str, ...]


def ptx_accesses(ptx: str) -> list[Access]:
    """Every global load, store and async copy with where its address comes from: the
    registers of the address are traced back through the instructions that define them
    to the parameters (``ld.param``); a value loaded from memory (a page id) is data and
    ends the trace."""
    defs, accesses = {}, []
    for opcode, operands in _ptx_statements(ptx):
        if ".global" in opcode:
            accesses.append((opcode, [reg for inside in _BRACKET.findall(operands)
                                      for reg in _REGISTER.findall(inside)]))
        if opcode.startswith(_NO_DESTINATION):
            continue
        closing = "}" if operands.startswith("{") else ","
        destination, _, sources = operands.partition(closing)
        for reg in _REGISTER.findall(destination):
            defs.setdefault(reg, []).append((opcode, sources))
    result = []
    for opcode, registers in accesses:
        params, extended, seen = set(), [], set()
        while registers:
            reg = registers.pop()
            if reg in seen:
                continue
            seen.add(reg)
            for def_opcode, sources in defs.get(reg, ()):
                if def_opcode.startswith("ld.param"):
                    params.update(int(p) for p in _PARAM.findall(sources))
                elif not def_opcode.startswith("ld."):
                    if _SIGN_EXTENDING.match(def_opcode):
                        extended.append(def_opcode)
                    registers += _REGISTER.findall(sources)
        result.append(Access(opcode, tuple(sorted(params)), tuple(extended)))
    return result


def address_errors(ptx: str, elements: list[int]) -> list[str]:
    """Why the PTX may address outside an argument (``elements``: each kernel argument's
    element count): a sign-extended 32-bit offset into an argument of more than 2**31
    elements, an access from no parameter or several, or such an argument never read."""
    errors, reached = [], set()
    for access in ptx_accesses(ptx):
        if len(access.params) != 1 or access.params[0] >= len(elements):
            errors.append(f"{access.opcode}: address from parameters {access.params}")
            continue
        [param] = access.params
        reached.add(param)
        if access.sign_extended and elements[param] > lowering.MAX_INT32_ELEMENTS:
            errors.append(f"{access.opcode}: a sign-extended 32-bit offset "
                          f"({', '.join(access.sign_extended)}) into argument {param} of "
                          f"{elements[param]} elements")
    for param, count in enumerate(elements):
        if count > lowering.MAX_INT32_ELEMENTS and param not in reached:
            errors.append(f"argument {param} of {count} elements: no access found")
    return errors


_TTIR_ADDPTR = re.compile(r"(%[\w#]+) = tt\.addptr (%[\w#]+), %[\w#]+ : [^,]+, "
                          r"(?:tensor<[\dx]*x)?(i\d+)")
_TTIR_DEF = re.compile(r"(%[\w#]+) = (?:tt\.splat|tt\.broadcast|tt\.expand_dims|"
                       r"tt\.reshape|tt\.addptr) (%[\w#]+)")


def ttir_address_errors(ir_text: str, elements: list[int]) -> list[str]:
    """The Triton IR's view of ``address_errors``: every ``tt.addptr`` traced back (through
    splats, broadcasts, reshapes and earlier addptrs) to its argument; a 32-bit offset into
    an argument of more than 2**31 elements is an error (Triton sign-extends it)."""
    sources = dict(_TTIR_DEF.findall(ir_text))
    errors, reached = [], set()
    for _, pointer, offset_type in _TTIR_ADDPTR.findall(ir_text):
        seen = set()
        while pointer in sources and pointer not in seen:
            seen.add(pointer)
            pointer = sources[pointer]
        found = re.fullmatch(r"%arg(\d+)", pointer)
        if not found or int(found.group(1)) >= len(elements):
            errors.append(f"tt.addptr from {pointer}, not a kernel argument")
            continue
        param = int(found.group(1))
        reached.add(param)
        if offset_type != "i64" and elements[param] > lowering.MAX_INT32_ELEMENTS:
            errors.append(f"tt.addptr with {offset_type} offsets into argument {param} of "
                          f"{elements[param]} elements")
    for param, count in enumerate(elements):
        if count > lowering.MAX_INT32_ELEMENTS and param not in reached:
            errors.append(f"argument {param} of {count} elements: no tt.addptr found")
    return errors


def check_addresses(compile_fn, log=print) -> list[dict]:
    """One row per address case: its arguments' element counts and the PTX's errors."""
    rows = []
    for label, config in address_cases():
        [kernel] = lowering.triton_kernels(export_config(**config))
        result = compile_fn("cuda", kernel.ir, ARCH, num_warps=kernel.num_warps,
                            num_ctas=1, num_stages=kernel.num_stages)
        accesses = ptx_accesses(result.asm)
        errors = address_errors(result.asm, kernel.elements())
        rows.append(dict(case=label, largest=max(kernel.elements()),
                         accesses=len(accesses),
                         sign_extended=sum(bool(a.sign_extended) for a in accesses),
                         errors=errors, ok=not errors))
        log(f"addresses {label}: {len(accesses)} accesses, "
            f"{'ok' if not errors else 'FAIL ' + '; '.join(errors[:3])}")
    return rows


def address_markdown(rows) -> str:
    lines = ["# Triton decode kernel addresses (sm_90 PTX)", "",
             f"Compiled from the CPU (jax {jax.__version__}) with ShapeDtypeStructs; every "
             f"global access traced back to its kernel argument. A sign-extended 32-bit "
             f"offset is an error only into an argument of more than 2**31 elements "
             f"(there it wraps negative).", "",
             "| case | largest argument (elements) | accesses | with sign-extended offsets "
             "| ok |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['largest']} | {r['accesses']} | {r['sign_extended']} | "
              f"{'ok' if r['ok'] else 'FAIL: ' + '; '.join(r['errors'][:2])} |" for r in rows]
    return "\n".join(lines) + "\n"


def measure(compile_fn, ptxas, log=print) -> list[dict]:
    """One row per configuration; kernels with identical IR are compiled once."""
    rows, compiled = [], {}
    for config in configurations():
        kernels = lowering.triton_kernels(export_config(**config))
        if len(kernels) != 1 or kernels[0].ir is None:
            raise RuntimeError(f"{config}: expected one Triton kernel with its IR, got "
                               f"{kernels}")
        kernel = kernels[0]
        key = (hashlib.sha256(kernel.ir).hexdigest(), kernel.num_warps, kernel.num_stages)
        if key not in compiled:
            compiled[key] = compile_kernel(kernel, compile_fn, ptxas)
        resources = compiled[key]
        row = dict(config, **dataclasses.asdict(resources),
                   programs_per_sm=resources.programs_per_sm,
                   ok=not resources.spills and resources.smem_bytes <= SMEM_PER_BLOCK)
        log(f"{config} -> {resources.registers} regs, spills "
            f"{resources.spill_store_bytes}/{resources.spill_load_bytes} B, smem "
            f"{resources.smem_bytes} B, {resources.programs_per_sm}/SM")
        rows.append(row)
    return rows


def occupancy_error(rows) -> str | None:
    """The split count assumes pd.PROGRAMS_PER_SM programs of the default bf16
    configuration (head_dim 128, page 16) per SM: say so if the compile disagrees."""
    fits = {r["programs_per_sm"] for r in rows
            if (r["head_dim"], r["page_size"], r["dtype"]) == (128, 16, "bfloat16")}
    if fits != {pd.PROGRAMS_PER_SM}:
        return (f"pd.PROGRAMS_PER_SM={pd.PROGRAMS_PER_SM} but the default bf16 "
                f"configuration fits {sorted(fits)} programs per SM")
    return None


def markdown(rows, title) -> str:
    lines = [f"# {title}", "",
             f"Triton decode kernel compiled for {PTXAS_ARCH} from the CPU (jax "
             f"{jax.__version__}); {len(rows)} configurations, default tuning. A row is "
             f"flagged when it spills or needs more than {SMEM_PER_BLOCK // 1024} KiB of "
             f"shared memory. GQA groups 1-16 share one 16-row kernel (listed as group "
             f"{GROUPS[0]}); programs/SM counts registers, shared memory and warps on one "
             f"sm_90 SM. dtype is the pages' (8-bit pages carry bfloat16 scales), q the "
             f"queries' and the dots' operands'.", "",
             "| head_dim | page | group | dtype | q | splits | warps | stages | regs | "
             "spill st/ld B | stack B | smem KiB | programs/SM | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['head_dim']} | {r['page_size']} | {r['group']} | {r['dtype']} | "
            f"{r['q_dtype']} | {r['num_splits']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
            f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['stack_bytes']} | "
            f"{r['smem_bytes'] / 1024:.1f} | {r['programs_per_sm']} | "
            f"{'ok' if r['ok'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` into ``path`` between ``<!-- name -->`` markers, keeping the other
    sections: the Triton and the Mosaic scripts each own one section of
    kernel_resources.md and run side by side in CI, so the file is replaced at once
    (never seen half written) and a section from an older file is kept as it was."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old + ("\n" if old else "") + block
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on spills or shared memory over the limit")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_resources",
                        help="path stem of the .md and .json written")
    parser.add_argument("--title", default="Triton decode kernel resources (sm_90)")
    args = parser.parse_args(argv)
    compile_fn, reason = triton_compiler()
    ptxas = find_ptxas()
    if compile_fn is None or ptxas is None:
        reason = reason or ("no ptxas: install nvidia-cuda-nvcc-cu12, put ptxas on the PATH "
                            "or set PTXAS")
        print(f"kernel_resources: SKIPPED, {reason}")
        return 0
    print(f"kernel_resources: jax {jax.__version__}, ptxas {ptxas}")
    address_rows = check_addresses(compile_fn)
    rows = measure(compile_fn, ptxas)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    write_section(args.out.with_suffix(".md"), "triton", markdown(rows, args.title))
    addresses = args.out.with_name("kernel_addresses")
    addresses.with_suffix(".json").write_text(json.dumps(address_rows, indent=1))
    addresses.with_suffix(".md").write_text(address_markdown(address_rows))
    bad = [r for r in rows + address_rows if not r["ok"]]
    for r in bad:
        print(f"kernel_resources: FAIL {r}")
    occupancy = occupancy_error(rows)
    if occupancy:
        print(f"kernel_resources: FAIL {occupancy}")
        bad.append(occupancy)
    total = len(rows) + len(address_rows)
    print(f"kernel_resources: {total - len(bad)}/{total} configurations and address cases ok")
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
