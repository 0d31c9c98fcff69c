"""vLLM's ``LLM`` keyword names, memory-based pool sizing, and the server's text holdback."""

import pytest

from jpaged import LLM
from jpaged.core.cache import KVCache
from jpaged.engine.config import (FALLBACK_KV_BYTES, GIB, kv_bytes_from_utilization,
                                translate_vllm_names)
from jpaged.serving.openai_api import ChoiceStream, RequestError, completion_request


def test_vllm_names_map_onto_jpaged_names():
    assert translate_vllm_names({"tensor_parallel_size": 2, "data_parallel_size": 1,
                                 "block_size": 32, "gpu_memory_utilization": 0.8,
                                 "swap_space": 0.5, "max_num_seqs": 8}) == {
        "tensor_parallel": 2, "data_parallel": 1, "page_size": 32, "memory_utilization": 0.8,
        "host_cache_bytes": GIB // 2, "max_num_seqs": 8}
    with pytest.raises(ValueError, match="block_size= and page_size="):
        translate_vllm_names({"block_size": 16, "page_size": 16})
    with pytest.raises(ValueError, match="swap_space must be a number"):
        translate_vllm_names({"swap_space": -1})
    with pytest.raises(ValueError, match="unknown LLM option.*no_such_option"):
        LLM("tiny", no_such_option=1)


class FakeDevice:
    def __init__(self, id, stats):
        self.id, self.stats = id, stats

    def memory_stats(self):
        return self.stats


def test_memory_utilization_sizes_from_the_device_with_least_room():
    devices = [FakeDevice(0, {"bytes_limit": 1000, "bytes_in_use": 100}),
               FakeDevice(1, {"bytes_limit": 1000, "bytes_in_use": 300})]
    assert kv_bytes_from_utilization(0.9, devices) == 900 - 300
    assert kv_bytes_from_utilization(0.5, [FakeDevice(0, None)]) == FALLBACK_KV_BYTES
    with pytest.raises(ValueError, match="weights already use"):
        kv_bytes_from_utilization(0.2, devices)
    for bad in (0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="memory_utilization must be in"):
            kv_bytes_from_utilization(bad, devices)


def test_llm_accepts_vllm_names_with_their_meaning():
    llm = LLM(model="tiny", block_size=8, gpu_memory_utilization=0.9, swap_space=0.001,
              max_num_seqs=4, max_num_batched_tokens=32, max_model_len=256,
              enable_prefix_caching=False, seed=3)
    bm = llm.engine.scheduler.block_manager
    config = llm.engine.model.config
    geometry = (config.num_layers, config.num_kv_heads, config.head_dim, 8)
    # A CPU reports no memory statistics: the documented fallback budget.
    assert bm.num_pages == KVCache.pages_for_memory(FALLBACK_KV_BYTES, *geometry)
    assert bm.num_host_pages == KVCache.pages_for_memory(int(0.001 * GIB), *geometry)
    assert bm.page_size == 8 and not bm.enable_prefix_caching
    assert llm.engine.scheduler.max_num_seqs == 4 and llm.max_model_len == 256
    with pytest.raises(ValueError, match="pass one of"):
        LLM("tiny", gpu_memory_utilization=0.5, num_pages=64)


def test_streamed_text_is_held_back_while_it_may_change():
    class Completion:
        def __init__(self, text, n, finish=None):
            self.text, self.token_ids, self.finish_reason = text, list(range(n)), finish

    stream = ChoiceStream(["STOP"])
    assert stream.advance(Completion("a b S", 3)) == ("a b ", 0, None)
    assert stream.advance(Completion("a b ST", 4)) == ("", 3, None)
    assert stream.advance(Completion("a b STx", 5)) == ("STx", 4, None)
    assert stream.advance(Completion("a b STx \ufffd", 6)) == (" ", 5, None)
    assert stream.advance(Completion("a b STx é", 7, "length")) == ("é", 6, "length")
    assert stream.text == "a b STx é"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "stop": 5}, "stop"), ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"), ({"prompt": [True]}, "prompt"),
    ({"prompt": "x", "n": 2, "best_of": 3}, "best_of")])
def test_bad_completion_fields_name_their_param(body, param):
    with pytest.raises(RequestError) as error:
        completion_request(body)
    assert error.value.param == param and error.value.status == 400


def test_import_jpaged_leaves_the_server_stack_unloaded():
    import subprocess
    import sys

    code = ("import sys, jpaged; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'starlette', 'uvicorn', 'prometheus_client', 'jinja2', 'openai', 'httpx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.strip() == "[]"


# A non-default value for every EngineConfig field, as a command line would give it.
FLAG_VALUES = dict(page_size=("8", 8), num_pages=("40", 40), kv_cache_bytes=None,
                   memory_utilization=None, dtype=("float32", "float32"),
                   kv_cache_dtype=("int8", "int8"), max_num_seqs=("3", 3),
                   max_num_batched_tokens=("48", 48), max_model_len=("96", 96),
                   enable_prefix_caching=(None, False), preemption_mode=("swap", "swap"),
                   num_host_pages=("6", 6), host_cache_bytes=None, watermark=("0.25", 0.25),
                   static_batching=(None, True), seed=("7", 7), tensor_parallel=("1", 1),
                   data_parallel=("1", 1), prefix_routing=(None, True),
                   attention_impl=("xla", "xla"), tokenizer=("/tok", "/tok"),
                   generation_config=("vllm", "vllm"), log_stats=(None, True),
                   warmup=(None, True), async_scheduling=(None, False))


def test_every_option_is_a_flag_with_its_default_in_help():
    import argparse
    import dataclasses

    from jpaged.engine.config import EngineConfig, add_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    fields = dataclasses.fields(EngineConfig)
    assert set(FLAG_VALUES) == {f.name for f in fields}   # a new field gets a case here
    help_text = " ".join(parser.format_help().split())
    argv = []
    for field in fields:
        flag = "--" + field.name.replace("_", "-")
        assert flag in help_text
        if field.default is not None:
            assert f"(default: {field.default})" in help_text, field.name
        case = FLAG_VALUES[field.name]
        if case is None:   # one of several pool sizes: checked alone below
            continue
        text, _ = case
        argv += [flag] if text is None else [flag, text]
        if isinstance(field.default, bool):
            argv[-1] = ("--no-" if field.default else "--") + field.name.replace("_", "-")
    config = EngineConfig.from_options(**options_from_args(parser.parse_args(argv)))
    for name, case in FLAG_VALUES.items():
        if case is not None:
            assert getattr(config, name) == case[1], name
    for argv, expected in ((["--kv-cache-bytes", "4096"], dict(kv_cache_bytes=4096)),
                           (["--gpu-memory-utilization", "0.5"], dict(memory_utilization=0.5)),
                           (["--block-size", "32"], dict(page_size=32)),
                           (["--swap-space", "1"], dict(host_cache_bytes=GIB,
                                                        preemption_mode="swap")),
                           (["--enforce-eager"], dict(warmup=False)),
                           (["--dtype", "half"], dict(dtype="float16")),
                           (["--dtype", "auto"], dict(dtype=None)),
                           (["--no-enforce-eager"], dict(warmup=True)),
                           (["--disable-log-stats"], dict(log_stats=False)),
                           (["--trust-remote-code", "--tokenizer-mode", "auto"], {}),
                           (["--num-gpu-blocks-override", "40"], dict(num_pages=41))):
        config = EngineConfig.from_options(**options_from_args(parser.parse_args(argv)))
        for name, value in expected.items():
            assert getattr(config, name) == value, argv


@pytest.mark.parametrize("options, message", [
    (dict(page_size=0), "page_size must be a positive integer, got 0"),
    (dict(page_size=True), "page_size must be int, got True"),
    (dict(num_pages=1), "num_pages must be >= 2"),
    (dict(kv_cache_dtype="int4"), "kv_cache_dtype='int4' is not one of auto, int8, fp8"),
    (dict(attention_impl="flash"), "attention_impl='flash' is not one of"),
    (dict(preemption_mode="drop"), "preemption_mode='drop' is not one of"),
    (dict(dtype="int3"), "dtype='int3' is not one of"),
    (dict(watermark=1.5), r"watermark must be in \[0, 1\), got 1.5"),
    (dict(memory_utilization=float("nan")), "memory_utilization must be float"),
    (dict(num_pages=64, kv_cache_bytes=2**20), "pass one of"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching must be bool"),
])
def test_config_refuses_bad_options_by_name(options, message):
    from jpaged.engine.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig.from_options(**options)


def test_dtype_names_the_params_and_kv_cache_dtype_the_pool():
    import jax.numpy as jnp

    llm = LLM("tiny", dtype=jnp.float32, kv_cache_dtype="int8", num_pages=16)
    assert llm.config.dtype == "float32" and llm.config.kv_cache_dtype == "int8"
    assert llm.kv_cache_info()["kv_cache_dtype"] == "int8"
    assert {leaf.dtype for leaf in __import__("jax").tree.leaves(llm.engine.model.params)} == {
        jnp.dtype("float32")}


@pytest.mark.parametrize("options, message", [
    (dict(quantization="awq"), "quantization='awq' is not supported: jpaged runs unquantized"),
    (dict(revision="main"), "revision='main' is not supported: jpaged loads a local"),
    (dict(pipeline_parallel_size=2), "pipeline_parallel_size=2 is not supported"),
    (dict(tokenizer_mode="slow"), "tokenizer_mode='slow' is not supported"),
    (dict(enable_lora=True), "enable_lora=True is not supported"),
    (dict(trust_remote_code="yes"), "trust_remote_code must be bool"),
    (dict(enforce_eager=True, warmup=True), "enforce_eager= and warmup= set the same option"),
    (dict(compilation_config=3), "unknown LLM option.*compilation_config"),
])
def test_vllm_only_options_are_refused_by_name(options, message):
    from jpaged.engine.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig.from_options(**options)


def test_vllm_only_options_accepted_with_their_meaning():
    from jpaged.engine.config import EngineConfig

    config = EngineConfig.from_options(trust_remote_code=True, enforce_eager=True,
                                       disable_log_stats=False, dtype="half",
                                       enable_chunked_prefill=True, load_format="auto",
                                       scheduling_policy="fcfs", num_gpu_blocks_override=99)
    assert (config.warmup, config.log_stats, config.dtype, config.num_pages) == (
        False, True, "float16", 100)
    assert EngineConfig.from_options(dtype="auto").dtype is None


def test_vllm_flags_on_the_command_line():
    """``jpaged generate`` refuses a vLLM flag it cannot honour, naming it and why."""
    import subprocess
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "-m", "jpaged", "generate", "--prompt", "1,2",
                          "--token-ids", "--quantization", "awq"], capture_output=True,
                         text=True, cwd=root, env={**__import__("os").environ,
                                                   "PYTHONPATH": root})
    assert out.returncode == 2
    assert "quantization='awq' is not supported: jpaged runs unquantized" in out.stderr
