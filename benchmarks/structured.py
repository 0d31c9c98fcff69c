"""What structured outputs and prompt logprobs cost on the engine (tiny model).

Decode: ``--batch`` sequences decode ``--steps`` steps after their prefill; the median wall
time of one ``LLMEngine.step`` with (1) no rule, (2) ``allowed_token_ids`` covering the
whole vocabulary (the device mask and its host copy only), (3) a regex grammar that stays
open (xgrammar fills each row's mask on the host every step, then the device applies it).
Prompt logprobs: ``--prompts`` prompts of ``--prompt-len`` tokens prefilled (max_tokens 1)
with and without ``prompt_logprobs=5``; the extra time per prompt token.

Every case runs once to compile, then is timed. Timings on a shared CPU are noisy.

    PYTHONPATH=$PWD python benchmarks/structured.py   # ~2 min on 2 busy CPU cores
"""

import argparse
import json
import pathlib
import statistics
import string
import time

import jax
import numpy as np

from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams
from jpaged.models import Model, init_params, tiny_config


def byte_level_tokenizer(vocab_size: int):
    """A byte-level BPE trained on random lowercase words to ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    letters = list(string.ascii_lowercase)
    corpus = [" ".join("".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(40))
              for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def decode_step_ms(llm, batch: int, steps: int, params: SamplingParams) -> float:
    """Median ms of a decode step of ``batch`` rows (after the prompts' prefill)."""
    engine = llm.engine
    rng = np.random.default_rng(1)
    for _ in range(batch):
        engine.add_request(rng.integers(1, 200, 8).tolist(), params)
    while engine.scheduler.waiting or any(s.num_output_tokens == 0
                                          for s in engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    return 1e3 * statistics.median(times)


def prefill_seconds(llm, prompts, params: SamplingParams) -> float:
    start = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/structured")
    args = parser.parse_args()

    tok = byte_level_tokenizer(args.vocab)
    config = tiny_config(vocab_size=tok.get_vocab_size(), max_position_embeddings=1024)
    model = Model(config, init_params(config, jax.random.key(0)), tokenizer=tok,
                  eos_token_ids=(tok.token_to_id("<eos>"),))
    llm = LLM(model, page_size=16, num_pages=1024, max_num_seqs=64,
              max_num_batched_tokens=1024, max_model_len=1024)
    base = dict(max_tokens=args.steps + 8, temperature=1.0, seed=0)
    cases = {"none": SamplingParams(**base),
             "mask only (allowed_token_ids = all)": SamplingParams(
                 **base, allowed_token_ids=list(range(config.vocab_size))),
             "grammar (regex, xgrammar)": SamplingParams(**base, guided_regex="[a-z ]{4000}")}
    decode = {}
    for name, params in cases.items():
        decode_step_ms(llm, args.batch, 4, params)   # compile
        decode[name] = min(decode_step_ms(llm, args.batch, args.steps, params)
                           for _ in range(2))

    rng = np.random.default_rng(2)
    scoring = {}
    for name, extra in (("no prompt logprobs", {}), ("prompt_logprobs=5", {"prompt_logprobs": 5})):
        params = SamplingParams(max_tokens=1, temperature=0, **extra)
        # Fresh prompts each run: a repeated prompt would be a prefix-cache hit.
        runs = [[rng.integers(1, 200, args.prompt_len).tolist() for _ in range(args.prompts)]
                for _ in range(4)]
        prefill_seconds(llm, runs[0], params)   # compile
        scoring[name] = min(prefill_seconds(llm, prompts, params) for prompts in runs[1:])
    tokens = args.prompts * args.prompt_len
    extra_us = 1e6 * (scoring["prompt_logprobs=5"] - scoring["no prompt logprobs"]) / tokens

    lines = [f"# Structured outputs and prompt logprobs (tiny model, vocab {config.vocab_size}, "
             f"{jax.devices()[0].platform})", "",
             f"Decode step, batch {args.batch}, median of {args.steps} steps (best of 2 "
             f"runs):", "",
             "| rules | ms / step | vs none |", "|---|---|---|"]
    for name, ms in decode.items():
        lines.append(f"| {name} | {ms:.2f} | {ms / decode['none']:.2f}x |")
    lines += ["", f"Prefill of {args.prompts} prompts x {args.prompt_len} tokens "
              f"(max_tokens 1, fresh prompts, best of 3):", "", "| | s | us / prompt token |", "|---|---|---|"]
    for name, seconds in scoring.items():
        lines.append(f"| {name} | {seconds:.3f} | {1e6 * seconds / tokens:.1f} |")
    lines += ["", f"prompt logprobs add {extra_us:.1f} us per prompt token "
              f"({scoring['prompt_logprobs=5'] / scoring['no prompt logprobs']:.2f}x the "
              f"prefill). Shared CPU: timings are noisy."]
    text = "\n".join(lines)
    print(text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({
        "args": vars(args), "vocab_size": config.vocab_size, "decode_step_ms": decode,
        "prefill_seconds": scoring, "prompt_logprobs_us_per_token": extra_us}, indent=1))


if __name__ == "__main__":
    main()
