"""Host overhead of the engine: what Python costs around each device step.

A stub model (``StubConfig``) whose forward is nearly free puts the engine's own work on
the critical path: one request per row, greedy, ``ignore_eos``, a byte-level BPE tokenizer
(Llama 3's kind, trained here) and two stop strings that never match, so every step
detokenizes and searches every row.

1. Host time per sequence per step, batch 32 / 128 / 256, outputs of 128 / 1024 / 4096
   tokens: the median step time over the last quarter of the decode steps (at least
   64), divided by the batch
   (the mean too, in the JSON), after the same run once (it compiles every page-table
   width first: the timed run compiles nothing).
2. A simulated device (``SimulatedDevice``): each step the runner dispatches occupies a
   device timeline for ``--device-ms`` (5 / 10 / 20 ms) from when it is dispatched or the
   step before it ends, whichever is later, and fetching its ids waits until it ends; so
   the device time is fixed whatever this CPU's speed, and the device never needs the
   host's Python. (An earlier version slept in a host callback inside the jitted call:
   the callback needs the GIL, so "the device" waited for the engine's Python twice per
   step, up to the 5 ms switch interval each, which a GPU never does.) Reported: device
   idle fraction (1 - busy / wall) and output tokens/s against the ideal batch / step
   time, without and (when the engine has it) with overlap.

Writes benchmarks/results/host_overhead.{json,md}.

    python benchmarks/host_overhead.py            # ~4 min on 2 shared cores
    python benchmarks/host_overhead.py --quick    # batch 32 / 128, outputs 128 / 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.core.interfaces import ModelBundle
from jpaged.engine import engine as engine_module
from jpaged.engine.config import EngineConfig
from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams

RESULTS = pathlib.Path(__file__).parent / "results"
STOP = ["\x00never\x00", "\x01also never\x01"]   # control characters the text never holds
PROMPT_LEN = 8


@dataclasses.dataclass(frozen=True)
class StubConfig:
    """A model with one tiny KV layer whose logits pick a pseudo-random next token from the
    last one."""

    vocab_size: int
    num_layers: int = 1
    num_kv_heads: int = 1
    head_dim: int = 8
    max_position_embeddings: int = 8192


class SimulatedDevice:
    """A device timeline under ``runner`` (a ``ModelRunner``): a step dispatched at time t
    runs from max(t, the end of the step before) for ``step_s`` seconds; ``fetch`` of its
    ids returns once it has ended. ``busy``: the device seconds of the steps dispatched."""

    def __init__(self, runner, step_s: float):
        self.step_s, self.end, self.busy, self.ends = step_s, 0.0, 0.0, {}
        dispatch, fetch = runner.dispatch, runner.fetch

        def timed_dispatch(*args, **kwargs):
            result = dispatch(*args, **kwargs)
            self.end = max(time.perf_counter(), self.end) + step_s
            self.busy += step_s
            self.ends[id(result)] = (result, self.end)   # the result keeps its id unique
            return result

        def timed_fetch(result):
            sampled = fetch(result)
            _, end = self.ends.pop(id(result), (None, 0.0))
            wait = end - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            return sampled

        runner.dispatch, runner.fetch = timed_dispatch, timed_fetch


def stub_forward(params, config: StubConfig, cache, token_ids, meta, logits_indices):
    """Logits ``f32[R, V]`` peaked at ``(last token * 31 + position * 17 + 5) mod V``:
    varied text, no model arithmetic. The cache is returned untouched."""
    tokens, positions = token_ids[logits_indices], meta.positions[logits_indices]
    nxt = (tokens * 31 + positions * 17 + 5) % config.vocab_size
    return jax.nn.one_hot(nxt, config.vocab_size, dtype=jnp.float32) * 10.0, cache


def train_tokenizer():
    """A byte-level BPE (GPT-2 / Llama 3 kind) of 1024 tokens, trained on this repo's docs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    root = pathlib.Path(__file__).parent.parent
    text = [(root / name).read_text() for name in ("README.md", "docs/architecture.md")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|end|>"]))
    return tokenizer


def make_llm(tokenizer, batch: int, output_len: int, device_ms: float = 0.0,
             **options) -> LLM:
    config = StubConfig(tokenizer.get_vocab_size())
    model = ModelBundle(config, {"unused": jnp.zeros((), jnp.float32)}, stub_forward,
                        tokenizer=tokenizer)
    page = 16
    pages = batch * (-(-(PROMPT_LEN + output_len) // page)) + 8
    llm = LLM(model, num_pages=pages, page_size=page, max_num_seqs=batch,
              max_num_batched_tokens=max(batch, 256), max_model_len=PROMPT_LEN + output_len + 16,
              enable_prefix_caching=False, **options)
    llm.device = SimulatedDevice(llm.engine.runner, device_ms / 1000) if device_ms else None
    return llm


def run(llm: LLM, batch: int, output_len: int, last: int = 64) -> dict:
    """Generate ``batch`` requests of ``output_len`` tokens; time every step."""
    engine = llm.engine
    rng = np.random.default_rng(0)
    vocab = llm.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, stop=STOP)
    # As LLM.generate: outputs only when finished (older engines take no `stream`).
    final_only = ({"stream": False} if "stream" in inspect.signature(engine.add_request).parameters
                  else {})
    for _ in range(batch):
        engine.add_request(rng.integers(1, vocab, PROMPT_LEN).tolist(), params, **final_only)
    device = getattr(llm, "device", None)
    busy = device.busy if device else 0.0
    compiled = engine.num_compilations
    times, pauses = [], []

    def collected(phase, info, began=[0.0]):   # the garbage collector's pauses
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - began[0])

    gc.callbacks.append(collected)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    gc.callbacks.remove(collected)
    busy = device.busy - busy if device else 0.0
    steps = np.array(times)
    # The last quarter of the steps (at least `last`; the final two may only drain): the
    # cost near the full output length, over a few seconds of a long run, so a burst of
    # other work on the machine moves it less; the median, so the step where every
    # request finishes (and the collection it may trigger) does not count.
    last = max(last, len(steps) // 4)
    tail = steps[-last - 2:-2] if len(steps) > last + 4 else steps[1:]
    return dict(batch=batch, output_len=output_len, steps=len(steps), wall_s=wall,
                device_busy_s=float(busy),
                step_ms_tail=float(np.median(tail) * 1e3),
                us_per_seq_step=float(np.median(tail) / batch * 1e6),
                mean_us_per_seq_step=float(np.mean(tail) / batch * 1e6),
                compilations=engine.num_compilations - compiled,
                gc_pause_max_ms=max(pauses, default=0.0) * 1e3,
                gc_pause_total_ms=sum(pauses) * 1e3,
                tokens_per_s=batch * output_len / wall)


def warmed(llm: LLM) -> None:
    """What ``LLM.warm_up`` does after compiling (the run before compiled): freeze the
    heap out of the garbage collector's scans, where the engine has it."""
    freeze = getattr(engine_module, "freeze_heap", None)
    if freeze is not None:
        freeze()


def gc_table(rows: list[dict]) -> str:
    lines = ["| batch | overlap | output tokens | heap frozen | longest pause | all pauses |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['overlap']} | {r['output_len']} | "
                     f"{'yes' if r['frozen'] else 'no'} | {r['gc_pause_max_ms']:.1f} ms | "
                     f"{r['gc_pause_total_ms']:.1f} ms |")
    return "\n".join(lines)


def host_table(rows: list[dict]) -> str:
    lens = sorted({r["output_len"] for r in rows})
    lines = ["| batch | overlap | " + " | ".join(f"{n} tokens" for n in lens) + " |",
             "|---" * (len(lens) + 2) + "|"]
    for batch, overlap in sorted({(r["batch"], r["overlap"]) for r in rows}):
        cells = {r["output_len"]: r for r in rows
                 if r["batch"] == batch and r["overlap"] == overlap}
        lines.append(f"| {batch} | {overlap} | " + " | ".join(
            f"{cells[n]['us_per_seq_step']:.1f} µs ({cells[n]['step_ms_tail']:.2f} ms/step)"
            if n in cells else "" for n in lens) + " |")
    return "\n".join(lines)


def device_table(rows: list[dict]) -> str:
    lines = ["| device step | overlap | device idle | host on the critical path per step "
             "(per sequence) | output tokens/s | ideal tokens/s | of ideal |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = r["batch"] / (r["device_ms"] / 1000)
        waited = (r["wall_s"] - r["device_busy_s"]) / r["steps"]
        lines.append(f"| {r['device_ms']:g} ms | {r['overlap']} | "
                     f"{1 - r['device_busy_s'] / r['wall_s']:.1%} | {waited * 1e3:.2f} ms "
                     f"({waited / r['batch'] * 1e6:.1f} µs) | {r['tokens_per_s']:.0f} | "
                     f"{ideal:.0f} | {r['tokens_per_s'] / ideal:.1%} |")
    return "\n".join(lines)


def _overlap(overlap: bool | None) -> str:
    return "n/a (synchronous engine)" if overlap is None else ("on" if overlap else "off")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--output-lens", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--device-ms", type=float, nargs="+", default=[5, 10, 20])
    parser.add_argument("--device-batch", type=int, default=256)
    parser.add_argument("--device-output-len", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "host_overhead"))
    args = parser.parse_args()
    if args.quick:
        args.batches, args.output_lens = [32, 128], [128, 1024]
    tokenizer = train_tokenizer()
    overlaps = ([False, True] if "async_scheduling" in
                {f.name for f in dataclasses.fields(EngineConfig)} else [None])

    host = []
    for batch in args.batches:
        for output_len in args.output_lens:
            for overlap in overlaps:
                options = {} if overlap is None else {"async_scheduling": overlap}
                llm = make_llm(tokenizer, batch, output_len, **options)
                # The same run first: every page-table width it reaches compiles there,
                # so the timed run compiles nothing (its `compilations` says so).
                run(llm, batch, output_len)
                warmed(llm)
                host.append({**run(llm, batch, output_len), "overlap": _overlap(overlap),
                             "frozen": True})
                gc.unfreeze()
                print(host[-1], flush=True)
    # The largest configuration once more without freezing: what the freeze saves.
    batch, output_len, overlap = max(args.batches), max(args.output_lens), overlaps[-1]
    llm = make_llm(tokenizer, batch, output_len,
                   **({} if overlap is None else {"async_scheduling": overlap}))
    run(llm, batch, output_len)
    unfrozen = {**run(llm, batch, output_len), "overlap": _overlap(overlap), "frozen": False}
    print(unfrozen, flush=True)
    device = []
    for device_ms in args.device_ms:
        for overlap in overlaps:
            options = {} if overlap is None else {"async_scheduling": overlap}
            llm = make_llm(tokenizer, args.device_batch, args.device_output_len, device_ms,
                           **options)
            run(llm, args.device_batch, args.device_output_len)   # compiles every width
            warmed(llm)
            row = run(llm, args.device_batch, args.device_output_len)
            gc.unfreeze()
            device.append({**row, "device_ms": device_ms, "overlap": _overlap(overlap)})
            print(device[-1], flush=True)

    env = f"{jax.devices()[0].platform} ({platform.machine()}), jax {jax.__version__}"
    md = "\n".join([
        "# Host overhead per step", "",
        f"{env}, shared 2-core machine (timings are noisy). Stub model (nearly free forward), "
        f"byte-level BPE tokenizer of {tokenizer.get_vocab_size()} tokens, greedy, "
        f"`ignore_eos`, two stop strings that never match, prompts of {PROMPT_LEN} tokens.",
        "`python benchmarks/host_overhead.py" + (" --quick`" if args.quick else "`"), "",
        "## Host time per sequence per step (median of the last quarter of the steps, at "
        "least 64)", "",
        "Each configuration runs twice; the second is timed (no compilation in it).", "",
        "The stub's device step is nearly free, so a step's wall time is host time; with "
        "overlap the host still does all of it, in another order.", "",
        host_table(host), "",
        "## Garbage collector pauses in the timed run", "",
        "After the heap is frozen as `LLM.warm_up` does (`freeze_heap`); the longest "
        "pause is usually the step where every request finishes.", "",
        gc_table(host + [unfrozen]), "",
        f"## Simulated device (batch {args.device_batch}, outputs of "
        f"{args.device_output_len} tokens)", "",
        "Each dispatched step occupies a simulated device timeline for the given time "
        "(`SimulatedDevice`: from its dispatch or the end of the step before, whichever is "
        "later; fetching its ids waits for its end). Idle = 1 - busy / wall; ideal "
        "tokens/s = batch / device step.", "",
        device_table(device), ""])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(env=env, host=host, unfrozen=unfrozen,
                                                        device=device),
                                                   indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
