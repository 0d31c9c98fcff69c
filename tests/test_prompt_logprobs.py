"""Prompt logprobs (``SamplingParams(prompt_logprobs=k)``) equal a no-cache float32 forward
of Hugging Face transformers on a tiny random checkpoint, through chunked prefill, a
prefix-cache hit and preemption."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jpaged import LLM, SamplingParams  # noqa: E402

TOP = 3
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param)) if "norm" in name else param.normal_(0, 0.1)
    model.eval()
    directory = tmp_path_factory.mktemp("prompt-logprobs")
    model.save_pretrained(directory)
    return str(directory), model


def hf_logprobs(model, prompt):
    """float32 [P, V] log-softmax of the logits at every prompt position, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def check(output, expected, prompt, top):
    """Position 0 is None; position p holds the prompt token's logprob and the top ids."""
    scores = output.prompt_logprobs
    assert len(scores) == len(prompt) and scores[0] is None
    for p in range(1, len(prompt)):
        row = expected[p - 1]
        entry = scores[p]
        assert abs(entry[prompt[p]].logprob - row[prompt[p]]) < TOLERANCE, p
        assert entry[prompt[p]].rank == 1 + np.sum(row > row[prompt[p]]), p
        best = np.argsort(-row)[:top]
        assert set(best) <= set(entry) and len(entry) <= top + 1, (p, best, entry)
        for token, logprob in entry.items():
            assert abs(logprob.logprob - row[token]) < TOLERANCE, (p, token)


def prompts(n, length, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(1, 96, length + i))) for i in range(n)]


def test_prompt_logprobs_match_hf_through_chunked_prefill(checkpoint):
    directory, model = checkpoint
    # 16-token chunks split the 21..23-token prompts; two rows share a step.
    llm = LLM(directory, dtype="float32", page_size=4, num_pages=128, max_num_seqs=4,
              max_num_batched_tokens=16, max_model_len=64)
    batch = prompts(3, 21)
    outputs = llm.generate(batch + [batch[0]], [SamplingParams(
        max_tokens=2, temperature=0, prompt_logprobs=TOP)] * 3 + [SamplingParams(
            max_tokens=2, temperature=0)])
    for output, prompt in zip(outputs[:3], batch):
        check(output, hf_logprobs(model, prompt), prompt, TOP)
    assert outputs[3].prompt_logprobs is None


def test_a_cached_prefix_is_scored_anyway(checkpoint):
    """The first request fills the prefix cache; the second, asking for prompt logprobs
    over the same 20 tokens, gets every position (it reads no other request's pages);
    the third, without, does hit the cache."""
    directory, model = checkpoint
    llm = LLM(directory, dtype="float32", page_size=4, num_pages=128, max_num_seqs=4,
              max_model_len=64)
    prompt = prompts(1, 20, seed=1)[0]
    greedy = SamplingParams(max_tokens=1, temperature=0)
    llm.generate([prompt], greedy)
    scored = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0,
                                                   prompt_logprobs=1))[0]
    check(scored, hf_logprobs(model, prompt), prompt, 1)
    assert scored.metrics.num_cached_tokens == 0
    assert llm.generate([prompt], greedy)[0].metrics.num_cached_tokens == 16


def test_preempted_prompt_keeps_its_scores(checkpoint):
    """A pool too small for three long prompts preempts one (recompute); every request's
    prompt logprobs still match."""
    directory, model = checkpoint
    llm = LLM(directory, dtype="float32", page_size=4, num_pages=20, max_num_seqs=3,
              max_num_batched_tokens=32, max_model_len=64, watermark=0.0)
    batch = prompts(3, 22, seed=2)
    outputs = llm.generate(batch, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                 prompt_logprobs=2))
    for output, prompt in zip(outputs, batch):
        check(output, hf_logprobs(model, prompt), prompt, 2)
    assert llm.engine.metrics()["num_preemptions"] > 0


@pytest.mark.parametrize("value", [-1, 21, 2.5, True])
def test_bad_prompt_logprobs(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)


# -- /v1/completions echo --------------------------------------------------------------


@pytest.fixture(scope="module")
def http(checkpoint):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from jpaged.serving.server import Server

    directory, _ = checkpoint
    llm = LLM(directory, dtype="float32", page_size=4, num_pages=128, max_num_seqs=4,
              max_num_batched_tokens=16, max_model_len=64)
    with TestClient(Server(llm.engine, "m", max_model_len=64).app) as client:
        yield client


def test_echo_scores_a_batch_of_prompts(http, checkpoint):
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens 0, several prompts."""
    _, model = checkpoint
    batch = prompts(2, 18, seed=3)
    answer = http.post("/v1/completions", json={"model": "m", "prompt": batch, "echo": True,
                                                "logprobs": 2, "max_tokens": 0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 0
    for choice, prompt in zip(body["choices"], batch):
        logprobs, expected = choice["logprobs"], hf_logprobs(model, prompt)
        assert logprobs["tokens"] == [f"token_id:{t}" for t in prompt]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        got = np.array(logprobs["token_logprobs"][1:])
        np.testing.assert_allclose(got, expected[np.arange(len(prompt) - 1), prompt[1:]],
                                   atol=TOLERANCE)
        for p, top in enumerate(logprobs["top_logprobs"][1:]):
            best = np.argsort(-expected[p])[:2]
            assert list(top) == [f"token_id:{t}" for t in best]
        offsets = logprobs["text_offset"]
        assert offsets[0] == 0 and offsets == sorted(offsets) and len(offsets) == len(prompt)


def test_echo_with_generation_appends_the_completion(http):
    prompt = prompts(1, 10, seed=4)[0]
    answer = http.post("/v1/completions", json={"model": "m", "prompt": prompt, "echo": True,
                                                "logprobs": 1, "max_tokens": 3,
                                                "temperature": 0, "ignore_eos": True,
                                                "return_token_ids": True})
    choice = answer.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(choice["token_ids"]) == 3 and len(logprobs["tokens"]) == len(prompt) + 3
    assert logprobs["tokens"][len(prompt):] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(isinstance(x, float) for x in logprobs["token_logprobs"][1:])


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"echo": True, "stream": True}, "echo"),
    ({"echo": True, "use_beam_search": True, "n": 2}, "echo"),
    ({"suffix": "x"}, "suffix"),
    ({"echo": True, "logprobs": 21}, "logprobs"),
])
def test_unsupported_echo_requests_are_400(http, body, param):
    answer = http.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 3], **body})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    assert http.post("/v1/completions", json={"model": "m", "prompt": [1, 2],
                                              "max_tokens": 1}).status_code == 200
