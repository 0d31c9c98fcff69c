"""The pieces of vLLM's offline ``LLM`` API beside ``generate``: prompt lists, the progress
bar, beam search's parameters and outputs, and the sampling defaults a checkpoint's
``generation_config.json`` sets. ``LLM`` (``jpaged.engine.engine``) uses them."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from jpaged.host.request import Logprob, RequestOutput
from jpaged.host.sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field (vLLM reads the same five; like
# vLLM, do_sample is not read: a temperature the checkpoint sets applies).
GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                            "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                            "max_new_tokens": "max_tokens"}


def as_prompt_list(prompts) -> list:
    """One prompt (text, token ids, or a prompt dict) or a list of them, as a list."""
    if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple, np.ndarray)) and len(prompts)
            and isinstance(prompts[0], (int, np.integer))):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        return list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, token ids, a prompt dict or a list of "
                         f"them, got {type(prompts).__name__}")
    return list(prompts)


def refuse_options(method: str, options: dict) -> None:
    """A vLLM keyword an ``LLM`` method does not take is a ValueError naming it."""
    if options:
        raise ValueError(f"LLM.{method}() does not support {', '.join(sorted(options))} "
                         f"(vLLM options jpaged does not have)")


class Progress:
    """vLLM's progress bar over finished requests (tqdm, or the factory ``use_tqdm``
    names), with input and output tokens per second; nothing when ``use_tqdm`` is
    False."""

    def __init__(self, use_tqdm, total: int):
        self.bar = None
        if use_tqdm is False or use_tqdm is None:
            return
        if use_tqdm is True:
            from tqdm.auto import tqdm as use_tqdm
        elif not callable(use_tqdm):
            raise ValueError(f"use_tqdm must be a bool or a tqdm-like factory, got "
                             f"{use_tqdm!r}")
        self.bar = use_tqdm(total=total, desc="Processed prompts", dynamic_ncols=True,
                            postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        self.start = time.perf_counter()
        self.input_tokens = self.output_tokens = 0

    def finished(self, output: RequestOutput) -> None:
        if self.bar is None:
            return
        self.input_tokens += len(output.prompt_token_ids)
        self.output_tokens += sum(len(c.token_ids) for c in output.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.postfix = (f"est. speed input: {self.input_tokens / elapsed:.2f} toks/s, "
                            f"output: {self.output_tokens / elapsed:.2f} toks/s")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generation_defaults(model, setting: str) -> dict:
    """The ``SamplingParams`` fields the checkpoint's ``generation_config.json`` sets.

    setting: "auto" (the model directory's file, if any), "vllm" (none: SamplingParams'
    own defaults), or a directory that must hold a ``generation_config.json``."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        if not isinstance(model, str) or not os.path.isdir(model):
            return {}
        directory = model
    elif os.path.isfile(os.path.join(setting, "generation_config.json")):
        directory = setting
    else:
        raise ValueError(f"generation_config={setting!r}: expected 'auto', 'vllm' or a "
                         f"directory holding a generation_config.json")
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        config = json.load(f)
    defaults = {field: config[key] for key, field in GENERATION_CONFIG_FIELDS.items()
                if config.get(key) is not None}
    SamplingParams(**defaults)   # a ValueError now names a bad value in the file
    return defaults


@dataclasses.dataclass
class BeamSearchParams:
    """vLLM's ``BeamSearchParams``: ``beam_width`` beams of up to ``max_tokens`` tokens,
    ranked by cumulative logprob / length ** ``length_penalty``."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def sampling_params(self) -> SamplingParams:
        if self.temperature != 0:
            raise ValueError(f"BeamSearchParams temperature={self.temperature} is not "
                             f"supported: jpaged's beam search keeps the most likely beams "
                             f"(temperature 0)")
        return SamplingParams(n=self.beam_width, use_beam_search=True, temperature=0.0,
                              max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                              length_penalty=self.length_penalty,
                              include_stop_str_in_output=self.include_stop_str_in_output)


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` are the prompt's then the generated ones, ``text`` their
    decoded text (prompt included, as vLLM's)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float
    text: str | None
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class BeamSearchOutput:
    """The beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search_output(output: RequestOutput, decode) -> BeamSearchOutput:
    sequences = []
    for completion in output.outputs:
        tokens = output.prompt_token_ids + completion.token_ids
        sequences.append(BeamSearchSequence(tokens, completion.logprobs or [],
                                            completion.cumulative_logprob, decode(tokens),
                                            completion.finish_reason, completion.stop_reason))
    return BeamSearchOutput(sequences)
