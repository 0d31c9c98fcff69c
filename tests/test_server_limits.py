"""``ServerLimits`` and the server's per-request output buffer, without a server: each bound
refuses the first value past it (OpenAI's error body naming the bound) and admits the value
at it; a client that stops reading holds one output per prompt, and is reported once."""

import argparse
import asyncio
import dataclasses
import json

import pytest

pytest.importorskip("starlette")
from jpaged.host.sampling_params import SamplingParams  # noqa: E402
from jpaged.serving import cli, limits as limits_module  # noqa: E402
from jpaged.serving.limits import ServerLimits  # noqa: E402
from jpaged.serving.openai_api import RequestError  # noqa: E402
from jpaged.serving.server import Submission  # noqa: E402


def refused(call, *args, match: str, status: int = 400):
    with pytest.raises(RequestError, match=match) as info:
        call(*args)
    assert info.value.status == status
    return info.value


def nested(depth: int) -> bytes:
    """A JSON object whose deepest value sits ``depth`` containers down."""
    return b'{"a": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [100_000, 65, 2])
def test_json_depth(depth):
    limits = ServerLimits(max_json_depth=64)
    assert limits.parse_body(nested(64)) == json.loads(nested(64))
    limits = ServerLimits(max_json_depth=min(depth, 64) - 1)
    error = refused(limits.parse_body, nested(depth), match="max_json_depth")
    assert error.body()["error"]["code"] == "json_too_deep"


def test_request_bounds_name_the_limit():
    limits = ServerLimits(max_prompts=3, max_logprobs=5, max_stop=4, max_stop_chars=8)
    limits.check_prompts(["a"] * 3)
    refused(limits.check_prompts, ["a"] * 4, match="4 prompts exceed max_prompts=3")
    ok = SamplingParams(logprobs=5, stop=["x" * 8] * 4, stop_token_ids=[1, 2, 3, 4])
    limits.check_params(ok)
    for params, message in [
            (SamplingParams(logprobs=6), "logprobs=6 exceeds max_logprobs=5"),
            (SamplingParams(stop=["s"] * 5), "5 stop exceed max_stop=4"),
            (SamplingParams(stop_token_ids=[1] * 5), "5 stop_token_ids exceed max_stop=4"),
            (SamplingParams(stop=["x" * 9]), "9 characters exceeds max_stop_chars=8")]:
        refused(limits.check_params, params, match=message)


@pytest.mark.parametrize("field, value", [("max_body_bytes", 0), ("header_timeout", -1.0),
                                          ("max_stop", 1.5), ("max_connections", True)])
def test_limits_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        ServerLimits(**{field: value})


def test_every_limit_is_a_serve_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(ServerLimits):
        flag = "--" + field.name.replace("_", "-")
        assert f"{flag} {field.name.upper()}" in text and f"(default: {field.default})" in text
    parser = argparse.ArgumentParser()
    limits_module.add_arguments(parser)
    args = parser.parse_args(["--max-stop", "3", "--send-timeout", "2.5"])
    assert limits_module.limits_from_args(args) == ServerLimits(max_stop=3, send_timeout=2.5)


class FakeRequest:
    """What ``read_body`` uses of a Starlette request: headers and the body stream."""

    def __init__(self, chunks, delay=0.0, length=None):
        self.headers = {} if length is None else {"content-length": str(length)}
        self.chunks, self.delay, self.read = chunks, delay, 0

    async def stream(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.delay)
            self.read += 1
            yield chunk


def test_body_size_and_time():
    limits = ServerLimits(max_body_bytes=10, body_timeout=0.2)
    assert asyncio.run(limits.read_body(FakeRequest([b"12345", b"67890"]))) == b"1234567890"
    # Refused from the declared length without reading, or after the chunk that passes it.
    declared = FakeRequest([b"x"], length=10**9)
    refused(asyncio.run, limits.read_body(declared), match="max_body_bytes=10", status=413)
    assert declared.read == 0
    endless = FakeRequest([b"123456"] * 1000)
    refused(asyncio.run, limits.read_body(endless), match="max_body_bytes=10", status=413)
    assert endless.read == 2
    slow = FakeRequest([b"1"] * 5, delay=0.1)
    refused(asyncio.run, limits.read_body(slow), match="body_timeout=0.2", status=408)


class Output:
    def __init__(self, step, finished=False):
        self.step, self.finished = step, finished


def test_outputs_of_a_client_that_does_not_read_are_coalesced():
    """1,000 steps delivered while nobody reads leave one output per prompt (the newest,
    each being cumulative), taken in the order the prompts first waited."""

    async def run():
        loop = asyncio.get_running_loop()
        submission = Submission(["a", "b"], [[1], [2]], None, loop)
        for step in range(1000):
            submission._deliver((step % 2, Output(step)))
        assert len(submission.latest) == 2
        first, second = await submission.next(), await submission.next()
        assert (first[0], first[1].step) == (0, 998) and (second[0], second[1].step) == (1, 999)
        submission._deliver((1, Output(1000, finished=True)))
        index, output = await submission.next()
        assert index == 1 and output.finished and submission.finished == {1}
        with pytest.raises(asyncio.TimeoutError):
            await submission.next(timeout=0.05)

    asyncio.run(run())


def test_a_stalled_client_is_reported_once():
    async def run():
        loop = asyncio.get_running_loop()
        stalled = []
        submission = Submission(["a"], [[1]], None, loop, send_timeout=0.1,
                                on_stall=stalled.append)
        submission._deliver((0, Output(0)))
        await submission.next()               # a reader: the clock restarts
        submission._deliver((0, Output(1)))
        await asyncio.sleep(0.05)
        submission._deliver((0, Output(2)))
        assert not stalled
        await asyncio.sleep(0.1)              # now 0.15 s untaken
        for step in (3, 4):
            submission._deliver((0, Output(step)))
        assert stalled == [submission]
        with pytest.raises(RequestError, match="send_timeout=0.1") as info:
            await submission.next()
        assert info.value.status == 408

    asyncio.run(run())
