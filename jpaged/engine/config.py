"""`EngineConfig`: every option of an `LLM`, in one frozen dataclass validated once.

`LLM(model, **options)`, `jpaged serve`, `jpaged generate` and snapshots all take their
options from it; the command-line flags are generated from its fields (`add_arguments`),
so every option is reachable from the command line with its default in `--help`.

One name per concept, one meaning per name: `dtype` is the parameters' dtype,
`kv_cache_dtype` the pool's. vLLM users write `LLM(model, tensor_parallel_size=2,
block_size=16, swap_space=4, gpu_memory_utilization=0.9)`: `VLLM_NAMES` is the one place
those spellings map onto jpaged's (`EngineConfig.from_options`). Names the two share
(`max_num_seqs`, `max_num_batched_tokens`, `max_model_len`, `enable_prefix_caching`,
`dtype`, `seed`) need no mapping.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import typing

import numpy as np

GIB = 2**30

# vLLM keyword -> (jpaged keyword, conversion of the value).
VLLM_NAMES = {
    "tensor_parallel_size": ("tensor_parallel", None),
    "data_parallel_size": ("data_parallel", None),
    "block_size": ("page_size", None),
    "gpu_memory_utilization": ("memory_utilization", None),
    # vLLM's swap space is GiB of host memory per device for swapped-out KV pages.
    "swap_space": ("host_cache_bytes", lambda gib: int(gib * GIB)),
}



@dataclasses.dataclass(frozen=True)
class VllmOption:
    """An option of vLLM's ``LLM`` / ``vllm serve`` with no field of its own here: what it
    means in jpaged (``why``), the values jpaged honours (``allowed``; any other is a
    ValueError quoting ``why``) and the jpaged options a value sets (``sets``)."""

    kind: type
    why: str
    allowed: typing.Callable[[typing.Any], bool] = lambda value: True
    sets: typing.Callable[[typing.Any], dict] = lambda value: {}


# Every vLLM option jpaged knows of: accepted with its meaning, or refused with the reason.
# An option in neither table is an unknown option (a ValueError too).
VLLM_OPTIONS = {
    "trust_remote_code": VllmOption(
        bool, "jpaged builds Llama-family models with its own code and never runs a "
        "checkpoint's, so there is no remote code to trust"),
    "enforce_eager": VllmOption(
        bool, "vLLM's eager mode skips capturing CUDA graphs at start-up; jpaged's steps are "
        "always compiled, and enforce_eager=True skips compiling them ahead of the first "
        "request (warmup=False), enforce_eager=False compiles them all first (warmup=True)",
        sets=lambda value: {"warmup": not value}),
    "disable_log_stats": VllmOption(
        bool, "turns off the periodic stats log (log_stats)",
        sets=lambda value: {"log_stats": not value}),
    "tokenizer_mode": VllmOption(
        str, "jpaged reads tokenizer.json with the tokenizers library (vLLM's 'auto' fast "
        "tokenizer); 'slow', 'mistral' and custom modes are not available",
        allowed=lambda value: value in ("auto", "hf")),
    "skip_tokenizer_init": VllmOption(
        bool, "jpaged always loads the checkpoint's tokenizer when it has one (prompts may "
        "still be token ids)", allowed=lambda value: value is False),
    "revision": VllmOption(
        str, "jpaged loads a local checkpoint directory and downloads nothing",
        allowed=lambda value: value is None),
    "tokenizer_revision": VllmOption(
        str, "jpaged loads a local tokenizer directory and downloads nothing",
        allowed=lambda value: value is None),
    "download_dir": VllmOption(
        str, "jpaged loads a local checkpoint directory and downloads nothing",
        allowed=lambda value: value is None),
    "load_format": VllmOption(
        str, "jpaged reads safetensors checkpoints only",
        allowed=lambda value: value in ("auto", "safetensors")),
    "quantization": VllmOption(
        str, "jpaged runs unquantized weights (8-bit KV pages: kv_cache_dtype)",
        allowed=lambda value: value is None),
    "pipeline_parallel_size": VllmOption(
        int, "jpaged splits a model over devices with tensor parallelism only",
        allowed=lambda value: value == 1),
    "enable_chunked_prefill": VllmOption(
        bool, "jpaged always splits long prompts into chunks of max_num_batched_tokens",
        allowed=lambda value: value is not False),
    "enable_lora": VllmOption(bool, "jpaged serves no LoRA adapters",
                              allowed=lambda value: value is False),
    "cpu_offload_gb": VllmOption(float, "jpaged keeps every weight on the device",
                                 allowed=lambda value: value == 0),
    "distributed_executor_backend": VllmOption(
        str, "jpaged runs one process per host (jpaged distributed), with no Ray or "
        "multiprocessing executor", allowed=lambda value: value is None),
    "disable_custom_all_reduce": VllmOption(
        bool, "jpaged's all-reduce is always XLA's collective: there is no custom kernel to "
        "turn off"),
    "scheduling_policy": VllmOption(
        str, "jpaged schedules by priority, then arrival: first come, first served when "
        "no request sets a priority", allowed=lambda value: value in ("fcfs", "priority")),
    "num_gpu_blocks_override": VllmOption(
        int, "the KV pages in the pool (num_pages, which also counts jpaged's null page)",
        sets=lambda value: {"num_pages": value + 1}),
}

# The pool budget per device when nothing sizes it, or the device reports no memory (CPU).
FALLBACK_KV_BYTES = 64 * 2**20

PREEMPTION_MODES = ("recompute", "swap")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
ATTENTION_IMPLS = ("auto", "pallas", "mosaic", "xla", "reference")
PARAM_DTYPES = ("float32", "bfloat16", "float16")
# vLLM's other dtype names; "auto" is the checkpoint's (jpaged's None).
DTYPE_NAMES = {"auto": None, "half": "float16", "float": "float32"}
LOG_STATS_INTERVAL_S = 10.0


def _option(default, help: str, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices))


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The options of an `LLM` (the model itself and an explicit `mesh` are passed beside
    it). Sizes of the pool: at most one of `num_pages`, `kv_cache_bytes` (per device),
    `memory_utilization`; none means 64 MiB per device. Swap pool: at most one of
    `num_host_pages`, `host_cache_bytes` (per device)."""

    page_size: int = _option(16, "tokens per KV page (vLLM: block_size)")
    num_pages: int | None = _option(None, "KV pages in the pool, the null page included")
    kv_cache_bytes: int | None = _option(None, "KV pool bytes per device")
    memory_utilization: float | None = _option(
        None, "size the pool from this fraction of each device's memory, less the weights "
        "(vLLM: gpu_memory_utilization; a CPU falls back to 64 MiB)")
    dtype: str | None = _option(None, "the parameters' dtype (default, or vLLM's 'auto': "
                                "the checkpoint's; vLLM's 'half' and 'float' too)",
                                PARAM_DTYPES + tuple(DTYPE_NAMES))
    kv_cache_dtype: str = _option("auto", "the pool's dtype: auto (the model's), or 8-bit "
                                  "pages with a scale per token", KV_CACHE_DTYPES)
    max_num_seqs: int = _option(64, "sequences per step")
    max_num_batched_tokens: int = _option(512, "tokens per step (the chunked-prefill budget)")
    max_model_len: int | None = _option(None, "longest prompt + output (default: the "
                                        "model's max_position_embeddings)")
    enable_prefix_caching: bool = _option(True, "share the pages of common prompt prefixes")
    preemption_mode: str = _option("recompute", "what a preempted sequence loses",
                                   PREEMPTION_MODES)
    num_host_pages: int | None = _option(None, "host swap pool pages")
    host_cache_bytes: int | None = _option(None, "host swap pool bytes per device (vLLM: "
                                           "swap_space, in GiB)")
    watermark: float = _option(0.01, "fraction of the pool admissions leave free")
    static_batching: bool = _option(False, "admit prompts only while the batch fills (the "
                                    "dense-cache baseline)")
    seed: int = _option(0, "the engine's seed for requests that set none")
    tensor_parallel: int | None = _option(None, "devices splitting each replica's heads "
                                          "(vLLM: tensor_parallel_size)")
    data_parallel: int | None = _option(None, "engine replicas (vLLM: data_parallel_size)")
    prefix_routing: bool = _option(False, "route a request to the replica holding its "
                                   "prefix")
    attention_impl: str = _option("auto", "the paged attention implementation",
                                  ATTENTION_IMPLS)
    tokenizer: str | None = _option(None, "a directory whose tokenizer.json replaces the "
                                    "model's")
    generation_config: str = _option(
        "auto", "sampling defaults: 'auto' reads the checkpoint's generation_config.json, "
        "'vllm' uses SamplingParams' own, or a directory holding a generation_config.json")
    log_stats: bool = _option(False, "log throughput, queues and KV pool use every "
                              f"{LOG_STATS_INTERVAL_S:g} s (vLLM: not disable_log_stats; "
                              "jpaged serve turns it on)")
    warmup: bool = _option(False, "compile every step shape before the first request, "
                           "printing the time it took (jpaged serve turns it on)")
    async_scheduling: bool = _option(True, "plan and dispatch the next step while the "
                                     "device runs this one (stops take effect a step late)")

    def __post_init__(self):
        if isinstance(self.dtype, str) and self.dtype in DTYPE_NAMES:
            object.__setattr__(self, "dtype", DTYPE_NAMES[self.dtype])
        if self.dtype is not None and not isinstance(self.dtype, str):
            # jnp.bfloat16, np.float32, np.dtype(...): the canonical name.
            object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        hints = typing.get_type_hints(EngineConfig)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and "None" in str(hints[field.name]):
                continue
            _check_type(field.name, value, hints[field.name])
            choices = field.metadata["choices"]
            if choices and value not in choices:
                raise ValueError(f"{field.name}={value!r} is not one of "
                                 f"{', '.join(choices)}")
        for name in ("page_size", "num_pages", "kv_cache_bytes", "max_num_seqs",
                     "max_num_batched_tokens", "max_model_len", "tensor_parallel",
                     "data_parallel"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        for name in ("num_host_pages", "host_cache_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got "
                             f"{self.num_pages}")
        if self.memory_utilization is not None and not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got "
                             f"{self.memory_utilization!r}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        sizes = dict(num_pages=self.num_pages, kv_cache_bytes=self.kv_cache_bytes,
                     memory_utilization=self.memory_utilization)
        if sum(v is not None for v in sizes.values()) > 1:
            raise ValueError("pass one of " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
        if self.num_host_pages is not None and self.host_cache_bytes is not None:
            raise ValueError(f"pass one of num_host_pages={self.num_host_pages}, "
                             f"host_cache_bytes={self.host_cache_bytes}")

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        """A config from keyword options in jpaged's or vLLM's names; a ValueError names an
        unknown option."""
        options = translate_vllm_names(options)
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown LLM option(s) {', '.join(unknown)}; the options are "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))} (and "
                             f"vLLM's {', '.join([*VLLM_NAMES, *VLLM_OPTIONS])})")
        return cls(**options)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(name: str, value, hint) -> None:
    text = getattr(hint, "__name__", str(hint))
    if "bool" in text:
        ok = isinstance(value, bool)
    elif "int" in text:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif "float" in text:
        ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
              and math.isfinite(value))
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{name} must be {text.replace(' | None', '')}, got {value!r}")


def translate_vllm_names(options: dict) -> dict:
    """``options`` with every vLLM spelling replaced by jpaged's (``VLLM_NAMES``) and every
    vLLM-only option checked and turned into the jpaged options it sets (``VLLM_OPTIONS``);
    a ValueError when a concept is given under both names or a value is refused."""
    translated = dict(options)
    for vllm_name, option in VLLM_OPTIONS.items():
        if vllm_name not in options:
            continue
        value = translated.pop(vllm_name)
        if value is not None and option.kind is not str and not (
                isinstance(value, option.kind) or (option.kind is float and isinstance(
                    value, numbers.Real) and not isinstance(value, bool))):
            raise ValueError(f"{vllm_name} must be {option.kind.__name__}, got {value!r}")
        if not option.allowed(value):
            raise ValueError(f"{vllm_name}={value!r} is not supported: {option.why}")
        for name, setting in option.sets(value).items():
            if name in options:
                raise ValueError(f"{vllm_name}= and {name}= set the same option; pass one "
                                 f"(got {vllm_name}={value!r}, {name}={options[name]!r})")
            translated[name] = setting
    for vllm_name, (name, convert) in VLLM_NAMES.items():
        if vllm_name not in options:
            continue
        if name in options:
            raise ValueError(f"{vllm_name}= and {name}= name the same option; pass one "
                             f"(got {vllm_name}={options[vllm_name]!r}, {name}={options[name]!r})")
        value = translated.pop(vllm_name)
        if convert is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{vllm_name} must be a number >= 0, got {value!r}")
            value = convert(value)
        translated[name] = value
    return translated


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `EngineConfig` field (``--page-size``), and vLLM's spelling beside it
    (``--block-size``, ``--swap-space`` in GiB). Every default is None on the parser, so
    `options_from_args` passes only what the command line set; `--help` shows the
    config's defaults."""
    group = parser.add_argument_group("engine options (EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    aliases = {name: vllm for vllm, (name, convert) in VLLM_NAMES.items() if convert is None}
    for field in dataclasses.fields(EngineConfig):
        flags = ["--" + field.name.replace("_", "-")]
        if field.name in aliases:
            flags.append("--" + aliases[field.name].replace("_", "-"))
        help = field.metadata["help"]
        if field.default is not None:
            help += f" (default: {field.default})"
        hint = getattr(hints[field.name], "__name__", str(hints[field.name]))
        if "bool" in hint:
            group.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help)
            continue
        kind = int if "int" in hint else float if "float" in hint else str
        group.add_argument(*flags, dest=field.name, type=kind, default=None, help=help,
                           choices=field.metadata["choices"])
    vllm = parser.add_argument_group(
        "vLLM's options (accepted with their meaning, or refused with the reason)")
    for name, option in VLLM_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if option.kind is bool:
            vllm.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                              default=None, help=option.why)
        else:
            vllm.add_argument(flag, dest=name, type=option.kind, default=None,
                              help=option.why)
    group.add_argument("--swap-space", type=float, default=None,
                       help="vLLM's swap pool size: GiB of host memory per device (sets "
                       "--host-cache-bytes; turns on swap preemption unless "
                       "--preemption-mode says otherwise)")


def options_from_args(args: argparse.Namespace) -> dict:
    """The engine options a command line set (jpaged's names), for `LLM(model, **options)`."""
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
               if getattr(args, f.name, None) is not None}
    options.update({name: getattr(args, name) for name in VLLM_OPTIONS
                    if getattr(args, name, None) is not None})
    if getattr(args, "swap_space", None) is not None:
        options["swap_space"] = args.swap_space
        options.setdefault("preemption_mode", "swap")
    return translate_vllm_names(options)


def kv_bytes_from_utilization(fraction: float, devices) -> int:
    """KV pool bytes per device for ``memory_utilization=fraction``: ``fraction`` of each
    device's memory (``memory_stats()["bytes_limit"]``) less what is in use once the
    weights are loaded, on the device with the least room. A device that reports no
    memory statistics (CPU) falls back to ``FALLBACK_KV_BYTES``. Unlike vLLM, no profiling
    run reserves activation memory: leave headroom in ``fraction``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {fraction!r}")
    room = []
    for device in devices:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return FALLBACK_KV_BYTES
        room.append(int(fraction * stats["bytes_limit"]) - stats.get("bytes_in_use", 0))
    if min(room) <= 0:
        raise ValueError(f"memory_utilization={fraction}: the weights already use more than "
                         f"that fraction of device memory ({min(room)} bytes left)")
    return min(room)
