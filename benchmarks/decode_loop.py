"""The jitted decode loop, paged vs dense, on identical inputs.

For each (batch, context): both pools get the same random K/V for ``context`` tokens per
sequence (a prefill would cost far more than the loop on a CPU and changes nothing in
the timing), the same first tokens, and ``jpaged.decode_loop`` runs ``--steps`` greedy
tokens on each, timed alternately, median of ``--repeats``. Paged: pages of
``--page-size`` tokens from a BlockManager. Dense: the contiguous layout, one page of
context + steps tokens per sequence (row b owns page b + 1), same model code.

Also, per configuration, one layer's decode attention alone: paged pool, the dense layout
through the same paged kernel, and ``jpaged.dense_attention`` on a true contiguous
``[B, Hkv, L, D]`` array (does the dense layout handicap the dense loop?). And per context,
the largest batch a fixed KV memory holds: paged (a BlockManager reserving each request's
actual prompt + steps, rounded up to pages) vs dense (memory / max_len).

    python benchmarks/decode_loop.py           # default sweep, ~3-4 minutes on 2 CPU cores
    python benchmarks/decode_loop.py --full    # batch 1..64 x context 512..8192
    python benchmarks/decode_loop.py --configs 16x2048 --repeats 15   # the headline alone

Writes benchmarks/results/decode_loop.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jpaged import models  # noqa: E402
from jpaged.core.attention import dense_attention, paged_attention  # noqa: E402
from jpaged.host.block_manager import BlockManager  # noqa: E402
from jpaged.core.shapes import cdiv  # noqa: E402
from jpaged.core.cache import KVCache, PageTable  # noqa: E402
from jpaged.decode_loop import decode_loop, reserve  # noqa: E402
from jpaged.host.sequence import Sequence  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HEADLINE = (16, 2048)
DEFAULT_GRID = [(1, 2048), (4, 2048), (16, 2048), (64, 2048), (16, 512), (16, 8192)]
FULL_BATCHES = (1, 2, 4, 8, 16, 32, 64)
FULL_CONTEXTS = (512, 1024, 2048, 4096, 8192)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def filled_pools(config, batch, context, steps, page_size, seed):
    """Paged and dense pools (and tables) holding the same random K/V for ``context``
    tokens of every row."""
    lengths = [context] * batch
    paged, paged_table = reserve(config, lengths, num_steps=steps, page_size=page_size)
    dense, dense_table = reserve(config, lengths, num_steps=steps, dense=True)
    keys = jax.random.split(jax.random.key(seed))
    paged = KVCache(*(jax.random.normal(key, paged.k.shape) for key in keys))

    @jax.jit
    def contiguous(pool):
        # Row b's pages in table order are its tokens in order: [L, Hkv, B, W * S, D].
        rows = pool[:, :, paged_table.block_tables]
        rows = rows.reshape(rows.shape[:3] + (-1, rows.shape[-1]))[:, :, :, :context + steps]
        return jnp.zeros(dense.k.shape, pool.dtype).at[:, :, 1:].set(rows)

    return (paged, paged_table), (KVCache(contiguous(paged.k), contiguous(paged.v)), dense_table)


def time_loops(model, batch, context, steps, page_size, repeats, seed=0):
    """Interleaved timing of the paged and the dense loop; the caches are donated, so each
    call gets the one the previous call returned."""
    pools = dict(zip(("paged", "dense"),
                     filled_pools(model.config, batch, context, steps, page_size, seed)))
    first = jnp.asarray(np.random.default_rng(seed).integers(0, model.config.vocab_size,
                                                             batch), jnp.int32)
    caches = {name: cache for name, (cache, _) in pools.items()}
    tokens, times = {}, {name: [] for name in pools}

    def call(name):
        out = decode_loop(model, model.params, caches[name], pools[name][1], first,
                          num_steps=steps)
        jax.block_until_ready(out)
        caches[name] = out.cache
        tokens[name] = np.asarray(out.tokens)

    for name in pools:
        call(name)   # compile
    for _ in range(repeats):
        for name in pools:
            start = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - start)
    paged, dense = (statistics.median(times[name]) for name in ("paged", "dense"))
    return dict(batch=batch, context=context, paged_s=paged, dense_s=dense,
                paged_tok_s=batch * steps / paged, dense_tok_s=batch * steps / dense,
                ratio=paged / dense,
                tokens_equal=float((tokens["paged"] == tokens["dense"]).mean()),
                **time_attention(model.config, caches, pools["paged"][1], pools["dense"][1],
                                 context, repeats))


def time_attention(config, caches, paged_table, dense_table, context, repeats):
    """One layer's decode attention (ms): paged pool, dense layout, true contiguous array."""
    paged, dense = caches["paged"], caches["dense"]
    batch = paged_table.batch
    lengths = jnp.full((batch,), context + 1, jnp.int32)
    q = jax.random.normal(jax.random.key(1), (batch, config.num_heads, config.head_dim))
    contiguous = dense.k[0, :, 1:].swapaxes(0, 1), dense.v[0, :, 1:].swapaxes(0, 1)
    paged_fn = jax.jit(lambda q, k, v, t: paged_attention(q, k, v, t, layer=0))
    dense_fn = jax.jit(lambda q, k, v: dense_attention(q, k, v, lengths))
    runs = {"attn_paged_ms": lambda: paged_fn(q, paged.k, paged.v,
                                              PageTable(paged_table.block_tables, lengths)),
            "attn_dense_layout_ms": lambda: paged_fn(q, dense.k, dense.v,
                                                     PageTable(dense_table.block_tables,
                                                               lengths)),
            "attn_true_dense_ms": lambda: dense_fn(q, *contiguous)}
    for run in runs.values():
        jax.block_until_ready(run())
    return {name: 1e3 * median_seconds(run, repeats) for name, run in runs.items()}


def max_batches(config, context, steps, page_size, memory, seed=0):
    """Largest batch of requests with prompts uniform in [1, context] that ``memory`` bytes
    of K/V hold, paged vs dense."""
    geometry = (config.num_layers, config.num_kv_heads, config.head_dim)
    max_len = context + steps
    # Dense: one page of max_len per sequence; the layout's null page costs one more.
    dense = KVCache.pages_for_memory(memory, *geometry, max_len) - 1
    manager = BlockManager(KVCache.pages_for_memory(memory, *geometry, page_size), page_size,
                           watermark=0.0, enable_prefix_caching=False)
    lengths = np.random.default_rng(seed).integers(1, context + 1, 100_000)
    paged = 0
    while True:
        seq = Sequence(str(paged), [0] * (int(lengths[paged]) + steps), steps)
        if not manager.can_allocate(seq):
            break
        manager.allocate(seq)
        paged += 1
    needed = lengths[:paged] + steps
    return dict(context=context, memory_mib=memory / 2**20, dense=dense, paged=paged,
                paged_over_dense=paged / dense if dense else float("inf"),
                paged_slot_use=float(needed.sum() / (cdiv(needed, page_size).sum() * page_size)))


def markdown(meta, rows, batches) -> str:
    lines = [f"# Decode loop: paged vs dense (jpaged.decode_loop)\n",
             f"{meta['device']}, {meta['cpus']} CPUs, jax {meta['jax']}; model: "
             f"{meta['model']}; {meta['steps']} greedy steps per loop, median of "
             f"{meta['repeats']} interleaved repeats; page_size {meta['page_size']}.\n",
             f"**Headline: paged/dense loop time at batch {HEADLINE[0]}, context "
             f"{HEADLINE[1]}: {meta['headline_ratio']:.2f}**\n",
             "Both loops run the same model and kernel on the same K/V and first tokens; "
             "dense is one page of context + steps tokens per row. tokens equal: fraction of "
             "output tokens the two loops agree on. attn columns: one layer's decode "
             "attention alone, on the paged pool, on the dense layout (same paged kernel) "
             "and with `dense_attention` on a true contiguous `[B, Hkv, L, D]` array.\n",
             "| batch | context | paged tok/s | dense tok/s | paged/dense time | tokens equal "
             "| attn paged ms | attn dense layout ms | attn true dense ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['paged_tok_s']:.0f} | "
                     f"{r['dense_tok_s']:.0f} | {r['ratio']:.2f} | {r['tokens_equal']:.2f} | "
                     f"{r['attn_paged_ms']:.2f} | {r['attn_dense_layout_ms']:.2f} | "
                     f"{r['attn_true_dense_ms']:.2f} |")
    lines += ["", f"Largest batch in {batches[0]['memory_mib']:.0f} MiB of K/V, prompts "
              f"uniform in [1, context] + {meta['steps']} steps:\n",
              "| context | dense | paged | paged/dense | paged slot use |",
              "|---:|---:|---:|---:|---:|"]
    for b in batches:
        lines.append(f"| {b['context']} | {b['dense']} | {b['paged']} | "
                     f"{b['paged_over_dense']:.2f} | {b['paged_slot_use']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(rows, batches, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, ratio, fit) = plt.subplots(1, 3, figsize=(16, 4.5))
    for context in sorted({r["context"] for r in rows}):
        some = sorted((r for r in rows if r["context"] == context), key=lambda r: r["batch"])
        if len(some) < 2:
            continue
        line, = speed.plot([r["batch"] for r in some], [r["paged_tok_s"] for r in some],
                           "o-", label=f"paged, ctx {context}")
        speed.plot([r["batch"] for r in some], [r["dense_tok_s"] for r in some], "s--",
                   color=line.get_color(), label=f"dense, ctx {context}")
    speed.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s",
              title="decode loop throughput")
    speed.legend(fontsize=7)
    labels = [f"{r['batch']}x{r['context']}" for r in rows]
    ratio.bar(labels, [r["ratio"] for r in rows])
    ratio.axhline(1.0, color="black", lw=0.8)
    ratio.set(ylabel="paged / dense loop time", title="batch x context")
    ratio.tick_params(axis="x", rotation=60, labelsize=7)
    x = np.arange(len(batches))
    fit.bar(x - 0.2, [b["dense"] for b in batches], 0.4, label="dense")
    fit.bar(x + 0.2, [b["paged"] for b in batches], 0.4, label="paged")
    fit.set(xticks=x, xticklabels=[str(b["context"]) for b in batches], yscale="log",
            xlabel="context", ylabel="max batch",
            title=f"max batch in {batches[0]['memory_mib']:.0f} MiB of K/V")
    fit.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="paged vs dense jitted decode loop")
    parser.add_argument("--full", action="store_true", help="batch 1..64 x context 512..8192")
    parser.add_argument("--configs", nargs="+", metavar="BxC",
                        help="only these batch x context pairs, e.g. 16x2048")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--memory-mib", type=float, default=256)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    config = models.tiny_config(num_layers=args.layers, max_position_embeddings=16384)
    model = models.Model(config, models.init_params(config, jax.random.key(0)))
    if args.configs:
        grid = [tuple(int(n) for n in pair.split("x")) for pair in args.configs]
    else:
        grid = ([(b, c) for c in FULL_CONTEXTS for b in FULL_BATCHES] if args.full
                else DEFAULT_GRID)
    print(f"{'batch':>5} {'context':>7} {'paged tok/s':>12} {'dense tok/s':>12} "
          f"{'paged/dense':>11} {'equal':>6} {'attn paged/layout/true ms':>27}", flush=True)
    rows = []
    for batch, context in grid:
        r = time_loops(model, batch, context, args.steps, args.page_size, args.repeats)
        rows.append(r)
        print(f"{batch:>5} {context:>7} {r['paged_tok_s']:>12.0f} {r['dense_tok_s']:>12.0f} "
              f"{r['ratio']:>11.2f} {r['tokens_equal']:>6.2f} {r['attn_paged_ms']:>9.2f}"
              f"{r['attn_dense_layout_ms']:>9.2f}{r['attn_true_dense_ms']:>9.2f}", flush=True)
    memory = int(args.memory_mib * 2**20)
    batches = [max_batches(config, c, args.steps, args.page_size, memory)
               for c in sorted({c for _, c in grid})]
    print(f"\nlargest batch in {args.memory_mib:.0f} MiB of K/V (prompts uniform in "
          f"[1, context] + {args.steps} steps)")
    for b in batches:
        print(f"  context {b['context']:>5}: dense {b['dense']:>5}  paged {b['paged']:>5}  "
              f"({b['paged_over_dense']:.2f}x)")
    headline = next((r["ratio"] for r in rows if (r["batch"], r["context"]) == HEADLINE),
                    float("nan"))
    print(f"\nheadline: paged/dense loop time at batch {HEADLINE[0]}, context {HEADLINE[1]}: "
          f"{headline:.2f}")
    meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                cpus=os.cpu_count(), jax=jax.__version__, python=platform.python_version(),
                model=f"tiny_config(num_layers={args.layers}) (hidden {config.hidden_size}, "
                      f"{config.num_heads} q / {config.num_kv_heads} kv heads, head_dim "
                      f"{config.head_dim}, float32)",
                steps=args.steps, repeats=args.repeats, page_size=args.page_size,
                headline_ratio=headline, command=" ".join(["python benchmarks/decode_loop.py"]
                                                          + (argv or sys.argv[1:])))
    result = dict(meta=meta, loops=rows, max_batch=batches)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_loop.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "decode_loop.md"), "w") as f:
        f.write(markdown(meta, rows, batches))
    plot(rows, batches, os.path.join(args.out, "decode_loop.png"))
    return result


if __name__ == "__main__":
    main()
