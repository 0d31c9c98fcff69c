"""Launch-plan model of the decode kernels: what each launches and keeps resident, from
its planner and its resources, for Llama-3-8B decode on an H100/H200 (132 SMs).

No GPU and no timing: for each kernel and (batch, context) this asks the kernel's own
split planner what grid it launches, takes the CTAs one SM holds from compiled figures
(the Triton kernel: ``results/kernel_resources.json``; the Mosaic kernels:
``results/mosaic_resources.json``, registers from their sm_90a cubins, shared memory from
their own estimate), and derives:

- ``CTAs``: programs launched; ``busy``: the share of the 132 SMs the first wave reaches;
- ``res/SM``: CTAs resident per SM; ``KiB/SM``: bytes of K/V copies in flight per SM
  (resident CTAs x ring stages x one step's K and V bytes: what hides HBM latency);
- ``pad``: the share of the MMA work on padded rows or columns (query heads per tile).

Targets (issue 23): every SM busy from batch 1 at context >= 4k; padded MMA work under
50% in decode.

    PYTHONPATH=. python benchmarks/kernel_model.py

prints the table and writes ``benchmarks/results/kernel_model.{md,json}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jpaged.pallas_kernels import mosaic_decode as md
from jpaged.pallas_kernels import paged_decode as pd
from jpaged.pallas_kernels import ragged_attention as ra

NUM_SMS = 132
# Llama-3-8B attention: 32 query heads over 8 kv heads of 128; pages of 16 tokens.
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
DTYPE = jnp.bfloat16
BATCHES = (1, 4, 16, 64, 256)
CONTEXTS = (1024, 4096, 16384, 32768)
RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass
class Row:
    kernel: str
    batch: int
    context: int
    ctas: int
    busy: float
    resident_per_sm: int
    inflight_kib_per_sm: float
    padded: float
    resident_source: str


def triton_row(batch, context, compiled) -> Row:
    ppb = pd.default_pages_per_block(PAGE_SIZE, HEAD_DIM, DTYPE)
    lengths = np.full((batch,), context, np.int32)
    width = context // PAGE_SIZE
    blocks = pd.blocks_to_cover(lengths, width, ppb, PAGE_SIZE)
    _, splits = pd.split_plan(blocks, pd.choose_num_splits(batch, NUM_KV_HEADS, blocks))
    # The table compiles 1 split (final output) and 3 (the partial-output variant).
    figures = compiled.get((HEAD_DIM, PAGE_SIZE, "bfloat16", 1 if splits == 1 else 3))
    resident, source = (figures["programs_per_sm"], "compiled") if figures else (None, "-")
    tokens = ppb * PAGE_SIZE
    stages = figures["num_stages"] if figures else pd.default_num_stages(tokens, HEAD_DIM, DTYPE)
    rows = max(pd.MIN_DOT_SIZE, 1 << (NUM_Q_HEADS // NUM_KV_HEADS - 1).bit_length())
    return _row("triton", batch, context, batch * NUM_KV_HEADS * splits, resident, stages,
                tokens, 1 - (NUM_Q_HEADS // NUM_KV_HEADS) / rows, source)


def compiled_mosaic() -> dict:
    """(kernel, split-K or not) -> CTAs per SM of the head_dim 128, page 16, bf16 rows."""
    path = RESULTS / "mosaic_resources.json"
    if not path.exists():
        return {}
    group = NUM_Q_HEADS // NUM_KV_HEADS
    return {(r["kernel"], r["num_splits"] > 1): r["ctas_per_sm"]
            for r in json.loads(path.read_text())
            if (r["head_dim"], r["page_size"], r["pages"], r["group"])
            == (HEAD_DIM, PAGE_SIZE, "bfloat16", group) and not r.get("warp_specialized")}


def ragged_row(batch, context, mosaic) -> Row:
    group = NUM_Q_HEADS // NUM_KV_HEADS
    ppb = ra.default_pages_per_block(PAGE_SIZE)
    rows = np.arange(batch, dtype=np.int32)
    lengths = np.full((batch,), context, np.int32)
    splits = ra.plan_num_splits(rows, lengths, num_kv_heads=NUM_KV_HEADS, group=group,
                                width=context // PAGE_SIZE, page_size=PAGE_SIZE,
                                pages_per_block=ppb, head_dim=HEAD_DIM, dtype=DTYPE)
    stages = ra.default_num_stages(HEAD_DIM, PAGE_SIZE, DTYPE, ppb, splits)
    resident = mosaic.get(("ragged", splits > 1))
    num_blocks = -(-batch // (ra.BLOCK_ROWS // group)) + batch + 1   # launched, empty too
    return _row("mosaic-ragged", batch, context, NUM_KV_HEADS * num_blocks * splits, resident,
                stages, ppb * PAGE_SIZE, 1 - group / ra.BLOCK_ROWS,
                "compiled" if resident else "-")


def decode_tile_row(batch, context, mosaic) -> Row:
    group = NUM_Q_HEADS // NUM_KV_HEADS
    ppb = ra.default_pages_per_block(PAGE_SIZE)
    rows = np.arange(batch, dtype=np.int32)
    lengths = np.full((batch,), context, np.int32)
    splits = ra.plan_num_splits(rows, lengths, num_kv_heads=NUM_KV_HEADS, group=ra.BLOCK_ROWS,
                                width=context // PAGE_SIZE, page_size=PAGE_SIZE,
                                pages_per_block=ppb, head_dim=HEAD_DIM, dtype=DTYPE,
                                check_partial_smem=False)
    stages = md.default_num_stages(HEAD_DIM, PAGE_SIZE, DTYPE, ppb, group)
    resident = mosaic.get(("decode", splits > 1))
    return _row("mosaic-decode", batch, context, NUM_KV_HEADS * batch * splits, resident,
                stages, ppb * PAGE_SIZE, md.padded_fraction(group),
                "compiled" if resident else "-")


def _row(kernel, batch, context, ctas, resident, stages, tokens, padded, source) -> Row:
    step_bytes = 2 * tokens * HEAD_DIM * jnp.dtype(DTYPE).itemsize
    per_sm = None if resident is None else min(resident, math.ceil(ctas / NUM_SMS))
    inflight = None if per_sm is None else per_sm * stages * step_bytes / 1024
    return Row(kernel, batch, context, ctas, min(1.0, ctas / NUM_SMS), resident, inflight,
               padded, source)


def compiled_triton() -> dict:
    path = RESULTS / "kernel_resources.json"
    if not path.exists():
        return {}
    return {(r["head_dim"], r["page_size"], r["dtype"], r["num_splits"]): r
            for r in json.loads(path.read_text()) if r["q_dtype"] == r["dtype"]}


def table(rows) -> str:
    head = ("| kernel | batch | context | CTAs | busy | res/SM | KiB/SM | pad | res/SM from |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r.kernel} | {r.batch} | {r.context} | {r.ctas} | {r.busy:.0%} | "
             f"{r.resident_per_sm if r.resident_per_sm is not None else '-'} | "
             f"{'-' if r.inflight_kib_per_sm is None else f'{r.inflight_kib_per_sm:.0f}'} | "
             f"{r.padded:.0%} | {r.resident_source} |" for r in rows]
    return "\n".join([head, *lines])


def padding_table(groups=(1, 4, 8)) -> str:
    """Padded share of a decode token's MMA work per GQA group: the ragged kernel's 64
    query rows, the decode tile's ``num_cols`` columns (8 at least: wgmma's smallest N)."""
    lines = ["| GQA group | ragged kernel (64 rows) | decode tile (columns) |", "|---|---|---|"]
    lines += [f"| {g} | {1 - g / ra.BLOCK_ROWS:.1%} | {md.padded_fraction(g):.1%} "
              f"({md.num_cols(g)}) |" for g in groups]
    return "\n".join(lines)


def main():
    compiled, mosaic = compiled_triton(), compiled_mosaic()
    rows = [make(b, c) for b in BATCHES for c in CONTEXTS
            for make in (lambda b, c: triton_row(b, c, compiled),
                         lambda b, c: ragged_row(b, c, mosaic),
                         lambda b, c: decode_tile_row(b, c, mosaic))]
    text = table(rows)
    padding = padding_table()
    print(text + "\n\n" + padding)
    RESULTS.mkdir(exist_ok=True)
    intro = ("# Decode launch-plan model (Llama-3-8B heads, page 16, bf16, 132 SMs)\n\n"
             "From the kernels' own split planners and resources; no GPU, no timing "
             "(`benchmarks/kernel_model.py`). busy = share of SMs the first wave reaches; "
             "KiB/SM = K/V copies in flight per SM (resident CTAs used x stages x step "
             "bytes); pad = share of MMA work on padding; res/SM from the sm_90a compiles "
             "(results/kernel_resources.json, results/mosaic_resources.json).\n\n")
    (RESULTS / "kernel_model.md").write_text(
        intro + text + "\n\nPadded MMA share of a decode token by GQA group (Llama-3-8B "
        "is group 4):\n\n" + padding + "\n")
    (RESULTS / "kernel_model.json").write_text(
        json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
