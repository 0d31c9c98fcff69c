"""``jpaged serve`` against the real ``openai`` client: one live server (a subprocess on a
free loopback port) over a tiny checkpoint with a word-level tokenizer and a chat template,
checked against ``LLM.generate`` on the same checkpoint in this process."""

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time

import jinja2
import pytest

pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
import openai  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from jpaged import LLM, SamplingParams  # noqa: E402
from serve_checkpoint import CONFIG, TEMPLATE, write_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_S = 180
PROMPTS = ["w5 w6 w7", "w10 w11 w12 w13 w14 w15 w16 w17 w18", "w200", "w42 w43"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, *extra: str, env=None, statuses: list | None = None):
    """A ``jpaged serve`` subprocess; returns (process, base url, log path) once healthy.
    Without ``--warmup`` among ``extra`` it starts with ``--no-warmup`` (compiling every
    shape of the default configuration takes minutes on a CPU). ``statuses`` collects
    every ``/health`` answer on the way."""
    port = free_port()
    log_path = os.path.join(os.path.dirname(model) if os.path.isdir(model) else "/tmp",
                            f"serve-{port}.log")
    log = open(log_path, "w")
    warmup = [] if "--warmup" in extra else ["--no-warmup"]
    process = subprocess.Popen(
        [sys.executable, "-m", "jpaged", "serve", "--model", model, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", *warmup, *extra],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n"
                               + open(log_path).read()[-3000:])
        try:
            status = httpx.get(f"{url}/health", timeout=1).status_code
            if statuses is not None:
                statuses.append(status)
            if status == 200:
                return process, url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(process)
    raise RuntimeError(f"the server did not come up in {STARTUP_S} s:\n"
                       + open(log_path).read()[-3000:])


def stop_server(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("serve") / "tiny-chat"))


@pytest.fixture(scope="module")
def server(checkpoint):
    process, url, _ = start_server(checkpoint)
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return LLM(model=checkpoint)


def greedy(llm, prompts, max_tokens, **options):
    return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                **options))


def metrics(url: str) -> dict:
    """Every sample of ``/metrics`` by name (labels folded in)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- completions -----------------------------------------------------------------------


def test_greedy_completions_equal_generate(client, reference, checkpoint):
    expected = greedy(reference, PROMPTS, 12)
    response = client.completions.create(model=checkpoint, prompt=PROMPTS, max_tokens=12,
                                         temperature=0, extra_body={"return_token_ids": True})
    choices = sorted(response.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == list(range(len(PROMPTS)))
    for choice, want in zip(choices, expected):
        assert choice.text == want.text
        assert choice.model_extra["token_ids"] == want.token_ids
        assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == 12 * len(PROMPTS)
    # Token ids in, as well as text.
    ids = client.completions.create(model=checkpoint, prompt=expected[1].prompt_token_ids,
                                    max_tokens=12, temperature=0)
    assert ids.choices[0].text == expected[1].text


def test_streaming_concatenates_to_the_same_text(client, reference, checkpoint):
    want = greedy(reference, PROMPTS[1:2], 16)[0]
    chunks = list(client.completions.create(model=checkpoint, prompt=PROMPTS[1], max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16
    # A stop string: the streamed text is held back while it could be the stop string's
    # start, so stream and non-stream agree on the text cut before it.
    words = want.text.split()
    stop = f" {words[5]}"
    cut = greedy(reference, PROMPTS[1:2], 16, stop=[stop])[0]
    assert cut.text == want.text[:want.text.find(stop)] and cut.finish_reason == "stop"
    for stream in (False, True):
        answer = client.completions.create(model=checkpoint, prompt=PROMPTS[1], max_tokens=16,
                                           temperature=0, stop=stop, stream=stream)
        if stream:
            answer = list(answer)
            assert "".join(c.choices[0].text for c in answer) == cut.text
            assert answer[-1].choices[0].finish_reason == "stop"
        else:
            assert answer.choices[0].text == cut.text
            assert answer.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_sampling_options_logprobs_and_n(client, reference, checkpoint):
    params = dict(temperature=0.9, top_p=0.9, top_k=50, min_p=0.01, seed=7, n=3,
                  presence_penalty=0.3, frequency_penalty=0.2, logprobs=2)
    want = reference.generate([PROMPTS[0]], SamplingParams(max_tokens=6, **params))[0]
    response = client.completions.create(
        model=checkpoint, prompt=PROMPTS[0], max_tokens=6, **{k: params[k] for k in (
            "temperature", "top_p", "seed", "n", "presence_penalty", "frequency_penalty",
            "logprobs")}, extra_body={"top_k": 50, "min_p": 0.01})
    choices = sorted(response.choices, key=lambda c: c.index)
    assert [c.text for c in choices] == [c.text for c in want.outputs]
    for choice, completion in zip(choices, want.outputs):
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(completion.token_ids) == 6
        for logprob, top, token, entry in zip(lp.token_logprobs, lp.top_logprobs,
                                              completion.token_ids, completion.logprobs):
            assert logprob == pytest.approx(entry[token].logprob, abs=1e-5)
            assert len(top) == 2
    assert response.usage.completion_tokens == 18


# -- chat ------------------------------------------------------------------------------


def test_chat_uses_the_checkpoint_template(client, reference, checkpoint):
    messages = [{"role": "system", "content": "w20 w21"},
                {"role": "user", "content": "w30 w31 w32"}]
    text = jinja2.Template(TEMPLATE).render(messages=messages, add_generation_prompt=True)
    ids = reference.engine.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[-1] == 2 and ids[0] == 0   # <|assistant|> last, <|system|> first
    want = greedy(reference, [ids], 10)[0]
    response = client.chat.completions.create(model=checkpoint, messages=messages,
                                              max_tokens=10, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == want.text
    assert response.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=checkpoint, messages=messages,
                                                 max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    top = client.chat.completions.create(model=checkpoint, messages=messages, max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = top.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)


def test_chat_without_a_template_is_a_400():
    from starlette.testclient import TestClient

    from jpaged.serving.server import Server

    server = Server(LLM("tiny", num_pages=16, max_num_seqs=4,
                        max_num_batched_tokens=16).engine, "tiny")
    with TestClient(server.app) as http:
        answer = http.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "no_chat_template"
        answer = http.post("/v1/completions", json={"model": "tiny", "prompt": "text"})
        assert answer.status_code == 400 and "tokenizer" in answer.json()["error"]["message"]


# -- load, disconnects, bad requests ---------------------------------------------------


def test_32_concurrent_clients_complete(server, reference, checkpoint):
    prompts = [" ".join(f"w{10 + (7 * i + j) % 240}" for j in range(3 + i % 9))
               for i in range(32)]
    expected = greedy(reference, prompts, 8)

    async def one(client, i):
        if i % 2:
            stream = await client.completions.create(model=checkpoint, prompt=prompts[i],
                                                     max_tokens=8, temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in stream])
        answer = await client.completions.create(model=checkpoint, prompt=prompts[i],
                                                 max_tokens=8, temperature=0)
        return answer.choices[0].text

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused",
                                      max_retries=0, timeout=120) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(32))), timeout=300)

    texts = asyncio.run(run())
    assert texts == [o.text for o in expected]


def _stream_lines(url, body, into: list, first: threading.Event):
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        into.append(response.status_code)
        for line in response.iter_lines():
            if line.startswith("data: "):
                into.append(line[6:])
                first.set()
    first.set()


def test_disconnect_aborts_and_frees_pages(server, checkpoint):
    wait_for(lambda: metrics(server)["jpaged_kv_pages_used"] == 0, what="an idle pool")
    before = metrics(server)
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60, json={
            "model": checkpoint, "prompt": "w5 " * 40, "max_tokens": 900, "temperature": 0,
            "stream": True}) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip((l for l in lines if l.startswith("data: ")),
                                            range(3))]
        assert len(received) == 3
        during = metrics(server)
        assert during["jpaged_kv_pages_used"] >= 3   # 40 prompt tokens, pages of 16
        assert during["jpaged_num_requests_running"] == 1
    # The client hung up; the server aborts the request and frees its pages.
    wait_for(lambda: (m := metrics(server))["jpaged_kv_pages_used"] == 0
             and m["jpaged_num_requests_running"] == 0, what="the aborted request's pages")
    # A plain (non-streaming) request whose client closes its socket mid-request is
    # aborted within a step: its tokens stop, its pages come back, it never finishes.
    body = json.dumps({"model": checkpoint, "prompt": "w6 " * 40, "max_tokens": 900,
                       "temperature": 0, "ignore_eos": True}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (host.encode(), len(body), body))
        start = metrics(server)["jpaged_generation_tokens_total"]
        wait_for(lambda: metrics(server)["jpaged_generation_tokens_total"] >= start + 5,
                 what="the request generating")
        raw.shutdown(socket.SHUT_RDWR)
    at_close = metrics(server)["jpaged_generation_tokens_total"]
    wait_for(lambda: (m := metrics(server))["jpaged_kv_pages_used"] == 0
             and m["jpaged_num_requests_running"] == 0, what="the abandoned request's pages")
    after = metrics(server)
    # A scrape takes a few steps on a busy CPU; 900 would mean it ran to the end.
    assert after["jpaged_generation_tokens_total"] - at_close < 100
    assert after.get('jpaged_request_success_total{finished_reason=length}') == before.get(
        'jpaged_request_success_total{finished_reason=length}')


def test_a_disconnect_aborts_even_while_outputs_stream_in():
    """The abort does not wait for a pause in the outputs: with an output every 10 ms
    (a fast engine), a client gone after 0.3 s has its submission aborted at once."""
    from jpaged.serving.server import Server, Submission

    server = Server(LLM("tiny", num_pages=16, max_num_seqs=4,
                        max_num_batched_tokens=16).engine, "tiny")

    class Request:   # the ASGI side of a client that hangs up after 0.3 s
        def __init__(self):
            self.gone_at = time.monotonic() + 0.3

        async def receive(self):
            await asyncio.sleep(max(0.0, self.gone_at - time.monotonic()))
            return {"type": "http.disconnect"}

        async def is_disconnected(self):
            return time.monotonic() >= self.gone_at

    class Output:
        finished = False

    async def run():
        submission = Submission(["0-0"], [[5]], None, asyncio.get_running_loop())

        async def feed():
            while True:
                submission.queue.put_nowait((0, Output()))
                await asyncio.sleep(0.01)

        feeder = asyncio.ensure_future(feed())
        try:
            started = time.monotonic()
            result = await asyncio.wait_for(server._collect(Request(), submission), 5)
            return result, time.monotonic() - started, submission
        finally:
            feeder.cancel()

    result, seconds, submission = asyncio.run(run())
    assert result is None and seconds < 1.5
    assert server.engine_thread.inbox.get_nowait() == ("abort", submission)


BAD_COMPLETIONS = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    ({"prompt": "w5", "temperature": -1}, "temperature"),
    ({"prompt": "w5", "top_p": 0}, "top_p"),
    ({"prompt": "w5", "top_p": 1.5}, "top_p"),
    ({"prompt": "w5", "top_k": -2}, "top_k"),
    ({"prompt": "w5", "min_p": 2}, "min_p"),
    ({"prompt": "w5", "n": 0}, "n"),
    ({"prompt": "w5", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "w5", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "w5", "logprobs": 50}, "logprobs"),
    ({"prompt": "w5", "stop": 5}, "stop"),
    ({"prompt": "w5", "seed": 1.5}, "seed"),
    ({"prompt": "w5", "stream": "yes"}, "stream"),
    ({"prompt": "w5", "best_of": 3}, "best_of"),
    ({"prompt": "w5", "echo": True, "stream": True}, "echo"),
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, CONFIG.vocab_size]}, "prompt"),
    ({"prompt": "w5 " * (CONFIG.max_position_embeddings + 1)}, "prompt"),
]
BAD_CHATS = [
    ({}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "w5"}], "temperature": "hot"}, "temperature"),
]


def test_bad_requests_get_400_while_a_stream_completes(server, reference, checkpoint):
    want = greedy(reference, [PROMPTS[1]], 400)[0]
    lines, first = [], threading.Event()
    streamer = threading.Thread(target=_stream_lines, args=(server, {
        "model": checkpoint, "prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0,
        "stream": True}, lines, first))
    streamer.start()
    assert first.wait(120), "the stream never started"
    cases = [("completions", body, param) for body, param in BAD_COMPLETIONS]
    cases += [("chat/completions", body, param) for body, param in BAD_CHATS]

    async def send_all():   # at once, so they all land while the stream runs
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(
                f"{server}/v1/{endpoint}", content=body if isinstance(body, str)
                else json.dumps({"model": checkpoint, **body})) for endpoint, body, _ in cases))

    answers = asyncio.run(send_all())
    for (_, body, param), answer in zip(cases, answers):
        assert answer.status_code == 400, (str(body)[:80], answer.text)
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert param in (error["param"], error["code"]), (str(body)[:80], error)
    assert streamer.is_alive(), "the stream finished before the bad requests: make it longer"
    streamer.join(120)
    assert not streamer.is_alive()
    assert lines[0] == 200 and lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[1:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{server}/v1/nowhere", timeout=10).status_code == 404


# -- the rest of the surface -----------------------------------------------------------


def test_models_health_and_metrics(server, client, checkpoint):
    assert [m.id for m in client.models.list().data] == [checkpoint]
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    before = metrics(server)
    prompt = " ".join(f"w{i}" for i in range(50, 90))   # 40 tokens: 2 full pages
    for _ in range(2):
        client.completions.create(model=checkpoint, prompt=prompt, max_tokens=5, temperature=0)
    after = metrics(server)
    for name in ("jpaged_num_requests_running", "jpaged_num_requests_waiting",
                 "jpaged_num_requests_swapped", "jpaged_kv_pages_used", "jpaged_kv_pages_total",
                 "jpaged_prefix_cache_hit_rate", "jpaged_num_preemptions_total"):
        assert name in after, name
    assert after["jpaged_generation_tokens_total"] - before["jpaged_generation_tokens_total"] == 10
    assert after["jpaged_prompt_tokens_total"] - before["jpaged_prompt_tokens_total"] == 80
    # The second request found the first's two full pages in the prefix cache.
    assert (after["jpaged_prefix_cache_hits_total"]
            - before["jpaged_prefix_cache_hits_total"]) == 32
    assert after["jpaged_prefix_cache_hit_rate"] > 0
    assert (after["jpaged_time_to_first_token_seconds_count"]
            - before["jpaged_time_to_first_token_seconds_count"]) == 2
    assert (after["jpaged_time_per_output_token_seconds_count"]
            - before["jpaged_time_per_output_token_seconds_count"]) == 2
    # vLLM's names for the same series, labelled with the model (additional series).
    label = f"{{model_name={checkpoint}}}"
    twins = {"jpaged_num_requests_running": "vllm:num_requests_running",
             "jpaged_num_requests_waiting": "vllm:num_requests_waiting",
             "jpaged_num_preemptions_total": "vllm:num_preemptions_total",
             "jpaged_prefix_cache_hits_total": "vllm:prefix_cache_hits_total",
             "jpaged_prefix_cache_queries_total": "vllm:prefix_cache_queries_total",
             "jpaged_prompt_tokens_total": "vllm:prompt_tokens_total",
             "jpaged_generation_tokens_total": "vllm:generation_tokens_total",
             "jpaged_time_to_first_token_seconds_count":
                 "vllm:time_to_first_token_seconds_count",
             "jpaged_time_per_output_token_seconds_count":
                 "vllm:time_per_output_token_seconds_count"}
    for ours, theirs in twins.items():
        assert after[theirs + label] == after[ours], theirs
    used, total = after["jpaged_kv_pages_used"], after["jpaged_kv_pages_total"]
    assert after["vllm:gpu_cache_usage_perc" + label] == pytest.approx(used / (total - 1))
    assert after["vllm:e2e_request_latency_seconds_count" + label] >= 2
    assert after["vllm:request_generation_tokens_sum" + label] >= 10
    finished = f"{{finished_reason=length,model_name={checkpoint}}}"
    assert after["vllm:request_success_total" + finished] == after[
        "jpaged_request_success_total{finished_reason=length}"]


def test_model_routes_404_and_text_offset(server, client, checkpoint):
    assert client.models.retrieve(checkpoint).id == checkpoint
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-model", prompt="w5", max_tokens=2)
    assert error.value.body["code"] == "model_not_found"
    answer = client.completions.create(model=checkpoint, prompt=PROMPTS[1], max_tokens=6,
                                       temperature=0, logprobs=1)
    lp = answer.choices[0].logprobs
    # vLLM's text_offset: where each token's text starts, counting each token's text.
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    chunks = list(client.completions.create(model=checkpoint, prompt=PROMPTS[1], max_tokens=6,
                                            temperature=0, logprobs=1, stream=True))
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].logprobs]
    assert offsets[0] == 0 and len(offsets) == 6
    starts = list(itertools.accumulate([len(t) for t in texts[:-1]], initial=0))
    assert [c.choices[0].logprobs.text_offset[0] for c in chunks
            if c.choices and c.choices[0].logprobs] == starts


VLLM_SCRIPT = '''
from jpaged import LLM, SamplingParams

# Sample prompts.
prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
# Create a sampling params object.
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)


def main():
    # Create an LLM.
    llm = LLM(model=MODEL, tensor_parallel_size=1, gpu_memory_utilization=0.9,
              max_model_len=512, block_size=16, swap_space=0.01, seed=0)
    # Generate texts from the prompts.
    # The output is a list of RequestOutput objects
    # that contain the prompt, generated text, and other information.
    outputs = llm.generate(prompts, sampling_params)
    # Print the outputs.
    print("\\nGenerated Outputs:\\n" + "-" * 60)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt:    {prompt!r}")
        print(f"Output:    {generated_text!r}")
        print("-" * 60)


if __name__ == "__main__":
    main()
'''


def test_vllm_offline_script_runs_with_only_its_import_changed(checkpoint, tmp_path, capsys):
    import runpy

    script = tmp_path / "basic.py"
    script.write_text(VLLM_SCRIPT.replace("MODEL", repr(checkpoint)))
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    prompts = [eval(l.split(":", 1)[1]) for l in lines if l.startswith("Prompt:")]
    texts = [eval(l.split(":", 1)[1]) for l in lines if l.startswith("Output:")]
    assert prompts == ["Hello, my name is", "The president of the United States is",
                       "The capital of France is", "The future of AI is"]
    # vLLM's default max_tokens is 16; the tokenizer's words are w4..w255 and the roles.
    assert all(len(t.split()) == 16 for t in texts)
    assert all(w.startswith(("w", "<|")) for t in texts for w in t.split())


@pytest.mark.slow
def test_tensor_parallel_server_matches_one_device(checkpoint, reference):
    """``--tensor-parallel-size 2`` over two host devices answers as one device does."""
    want = greedy(reference, PROMPTS, 10)
    process, url, _ = start_server(checkpoint, "--tensor-parallel-size", "2", env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    try:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=300) as client:
            answer = client.completions.create(model=checkpoint, prompt=PROMPTS, max_tokens=10,
                                               temperature=0)
        texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
        assert texts == [o.text for o in want]
    finally:
        stop_server(process)


# -- vLLM's serve command line: positional model, API key, warm-up ----------------------


def test_vllm_command_line_warms_up_and_checks_the_api_key(checkpoint, reference):
    """``jpaged serve MODEL`` as vLLM's is written: the model positional, the key from
    ``VLLM_API_KEY``, vLLM's logging and loading flags; /health is 503 while every step
    shape compiles, and serving then compiles nothing new."""
    statuses = []
    process, url, log_path = start_server(
        checkpoint, "--warmup", "--max-num-seqs", "8", "--max-num-batched-tokens", "16",
        "--max-model-len", "64", "--disable-log-requests", "--uvicorn-log-level", "warning",
        "--trust-remote-code", "--generation-config", "vllm", "--disable-log-stats",
        env={"VLLM_API_KEY": "s3cret"}, statuses=statuses)
    try:
        assert statuses[0] == 503 and statuses[-1] == 200
        assert "warm-up compiled 2 step shapes in" in open(log_path).read()
        compiled = metrics(url)["jpaged_step_compilations_total"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                                 ("GET", f"/v1/models/{checkpoint}"),
                                 ("POST", "/v1/chat/completions")):
                answer = httpx.request(method, url + path, headers=headers, timeout=30,
                                       json={"model": checkpoint, "prompt": "w5"})
                assert answer.status_code == 401, (method, path, headers)
                assert answer.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        with openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0,
                           timeout=120) as client:
            answer = client.completions.create(model=checkpoint, prompt=PROMPTS[:2],
                                               max_tokens=8, temperature=0)
        want = greedy(reference, PROMPTS[:2], 8)
        assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == [
            o.text for o in want]
        assert metrics(url)["jpaged_step_compilations_total"] == compiled
    finally:
        stop_server(process)


def test_api_key_flag_and_command_line_refusals(capsys):
    from starlette.testclient import TestClient

    from jpaged.serving.cli import main
    from jpaged.serving.server import Server

    llm = LLM("tiny", num_pages=16, max_num_seqs=4, max_num_batched_tokens=16)
    # Before the server's engine thread starts: two threads must never step one engine.
    want = greedy(llm, [[5, 6, 7]], 3)[0]
    # The checkpoint's generation_config.json defaults fill what a request leaves unset.
    server = Server(llm.engine, "tiny", api_key="k",
                    sampling_defaults={"temperature": 0.0, "max_tokens": 3})
    key = {"Authorization": "Bearer k"}
    with TestClient(server.app) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers=key).status_code == 200
        assert http.get("/v1/models/tiny", headers=key).json()["id"] == "tiny"
        assert http.get("/health").status_code == 200
        answer = http.post("/v1/completions", headers=key, json={
            "model": "tiny", "prompt": [5, 6, 7], "return_token_ids": True}).json()
        assert answer["choices"][0]["token_ids"] == want.token_ids
        answer = http.post("/v1/completions", headers=key, json={
            "model": "tiny", "prompt": [5, 6, 7], "max_tokens": 5}).json()
        assert answer["usage"]["completion_tokens"] == 5
    for argv, message in ((["serve", "a", "--model", "b"], "two models"),
                          (["serve", "--quantization", "awq"], "quantization='awq' is not "
                           "supported"),
                          (["serve", "--load-format", "pt"], "load_format='pt' is not "
                           "supported: jpaged reads safetensors")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
