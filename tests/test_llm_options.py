"""vLLM's ``LLM`` keyword names, memory-based pool sizing, and the server's text holdback."""

import pytest

from jpaged import LLM
from jpaged.cache import KVCache
from jpaged.llm_options import (FALLBACK_KV_BYTES, GIB, kv_bytes_from_utilization,
                                translate_vllm_names)
from jpaged.protocol import ChoiceStream, RequestError, completion_request


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
    with pytest.raises(TypeError, match="unexpected keyword"):
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
