"""Structured outputs (xgrammar): every seeded sample of a random tiny model under a regex,
a choice list, a JSON schema or an EBNF grammar matches it, while its unconstrained
samples do not; a constraint that allows everything leaves greedy output unchanged; bad
constraints are ValueErrors naming them while other requests keep running."""

import json
import re

import jax
import pytest

pytest.importorskip("xgrammar")

from jpaged.engine.engine import LLM  # noqa: E402
from jpaged.host.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402
from jpaged.models import Model, init_params, tiny_config  # noqa: E402

CORPUS = ['{"name": "alice", "age": 31, "ok": true}', "yes no maybe [1, 2, 3] (4)",
          "the quick brown fox jumps over the lazy dog", "aab-yes ba-no"]
REGEX = r"[ab]{1,5}-(yes|no)"
CHOICES = ["yes", "no way", "maybe", "{json}"]
SCHEMA = {"type": "object", "properties": {
    "name": {"enum": ["alice", "bob", "c d"]}, "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}},
    "required": ["name", "ok", "tags"], "additionalProperties": False}
GRAMMAR = 'root ::= "(" digit+ ")" | "[" digit ("," digit)* "]"\ndigit ::= [0-9]'


def tokenizer():
    """A byte-level BPE (GPT-2 / Llama-3 style) trained on a few lines: ~120 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<eos>"], show_progress=False))
    return tok


@pytest.fixture(scope="module")
def llm():
    tok = tokenizer()
    config = tiny_config(num_layers=2, vocab_size=tok.get_vocab_size(),
                         max_position_embeddings=256)
    model = Model(config, init_params(config, jax.random.key(0)), tokenizer=tok,
                  eos_token_ids=(tok.token_to_id("<eos>"),))
    return LLM(model, page_size=8, num_pages=512, max_num_seqs=64, max_model_len=256)


def samples(llm, count, max_tokens=48, **guided):
    prompts = [[1 + i % 7, 2, 3 + i % 5] for i in range(count)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, **guided)
              for i in range(count)]
    return llm.generate(prompts, params)


def check_schema(text):
    value = json.loads(text)
    assert set(value) == {"name", "ok", "tags"}, text
    assert value["name"] in ("alice", "bob", "c d") and isinstance(value["ok"], bool)
    assert len(value["tags"]) <= 3 and set(value["tags"]) <= {"x", "y"}


def run_all_kinds(llm, count):
    unconstrained = samples(llm, count)
    assert sum(bool(re.fullmatch(REGEX, o.text)) for o in unconstrained) == 0
    for output in samples(llm, count, guided_regex=REGEX):
        assert output.finish_reason == "stop" and re.fullmatch(REGEX, output.text), output.text
    choices = samples(llm, count, guided_choice=CHOICES)
    assert all(o.text in CHOICES for o in choices)
    assert len({o.text for o in choices}) > 1   # sampled, not stuck on one
    for output in samples(llm, count, max_tokens=80, guided_json=SCHEMA):
        check_schema(output.text)
    for output in samples(llm, count, structured_outputs=StructuredOutputsParams(
            grammar=GRAMMAR), max_tokens=24):
        assert output.finish_reason == "length" or re.fullmatch(
            r"\(\d+\)|\[\d(,\d)*\]", output.text), output.text


def test_every_constrained_sample_matches(llm):
    run_all_kinds(llm, 8)


@pytest.mark.slow
def test_hundreds_of_constrained_samples_match(llm):
    run_all_kinds(llm, 512)


def test_a_constraint_allowing_everything_keeps_greedy(llm):
    """The corpus has no newline, so ``.*`` allows every token (and EOS) at every step:
    the mask path must not change the greedy choice."""
    prompts = [[1, 2, 3], [4, 5, 6, 7], [9]]
    plain = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    masked = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0,
                                                  guided_regex=".*"))
    assert [o.token_ids for o in masked] == [o.token_ids for o in plain]
    assert all(len(o.token_ids) > 3 for o in plain)


def test_json_object_and_parallel_samples(llm):
    outputs = llm.generate([[1, 2, 3]], SamplingParams(
        max_tokens=48, temperature=1.0, seed=5, n=4, guided_choice=CHOICES))
    assert all(c.text in CHOICES for c in outputs[0].outputs)
    for output in samples(llm, 8, max_tokens=64, guided_json_object=True):
        assert output.text.startswith("{")
        if output.finish_reason == "stop":
            assert isinstance(json.loads(output.text), dict)


@pytest.mark.parametrize("guided, message", [
    (dict(guided_regex="(ab"), "guided_regex='\\(ab' is rejected"),
    (dict(guided_json={"type": "no-such-type"}), "guided_json=.* is rejected"),
    (dict(guided_json="{not json"), "guided_json=.* is rejected"),
    (dict(guided_grammar="root ::= "), "guided_grammar=.* is rejected"),
])
def test_rejected_constraints_leave_others_running(llm, guided, message):
    engine = llm.engine
    good = engine.add_request([1, 2], SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(ValueError, match=message):
        engine.add_request([3, 4], SamplingParams(**guided))
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [good]


@pytest.mark.parametrize("guided, message", [
    (dict(guided_choice=[]), "guided_choice must be a non-empty list"),
    (dict(guided_choice=["a", ""]), "guided_choice must be a non-empty list"),
    (dict(guided_regex="a", guided_choice=["a"]), "at most one"),
    (dict(guided_regex="a", ignore_eos=True), "ignore_eos"),
    (dict(structured_outputs={"regex": "a"}, guided_regex="b"), "both set"),
    (dict(guided_regex=""), "guided_regex must be a non-empty string"),
])
def test_bad_guided_params(guided, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**guided)


# -- the server: response_format, guided_* fields, token rules, refusals ----------------


@pytest.fixture(scope="module")
def http(llm):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from jpaged.host.chat import ChatTemplate
    from jpaged.serving.server import Server

    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", {})
    server = Server(llm.engine, "m", chat_template=template, max_model_len=llm.max_model_len)
    with TestClient(server.app) as client:
        yield client


def test_server_constrains_completions_and_chat(http):
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    answer = http.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "the fox"}], "n": 4,
        "temperature": 1.0, "seed": 3, "max_tokens": 80, "response_format": schema})
    assert answer.status_code == 200, answer.text
    for choice in answer.json()["choices"]:
        check_schema(choice["message"]["content"])
    answer = http.post("/v1/completions", json={
        "model": "m", "prompt": ["yes", "the"], "n": 3, "temperature": 1.0, "seed": 1,
        "max_tokens": 40, "guided_regex": REGEX})
    texts = [c["text"] for c in answer.json()["choices"]]
    assert len(texts) == 6 and all(re.fullmatch(REGEX, t) for t in texts), texts
    answer = http.post("/v1/completions", json={
        "model": "m", "prompt": "the", "temperature": 1.0, "seed": 2, "max_tokens": 40,
        "guided_choice": CHOICES})
    assert answer.json()["choices"][0]["text"] in CHOICES


def test_server_applies_logit_bias_and_min_tokens(http, llm):
    eos = llm.engine.tokenizer.token_to_id("<eos>")
    answer = http.post("/v1/completions", json={
        "model": "m", "prompt": "the", "max_tokens": 5, "temperature": 0,
        "logit_bias": {str(eos): 100}, "min_tokens": 3, "return_token_ids": True})
    choice = answer.json()["choices"][0]
    # EOS is favoured by 100 but banned until the third token, which it then is.
    assert eos not in choice["token_ids"][:3] and len(choice["token_ids"]) == 4


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"suffix": "end"}, "suffix"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"guided_regex": "(ab"}, "guided_regex"),
    ({"guided_json": {"type": "no-such-type"}}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
    ({"max_tokens": 256}, "max_tokens"),
    ({"min_tokens": 99}, "min_tokens"),
])
def test_server_refuses_what_it_does_not_support(http, body, param):
    answer = http.post("/v1/completions", json={"model": "m", "prompt": "the quick brown",
                                                **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.text
    assert http.post("/v1/completions", json={"model": "m", "prompt": "the",
                                              "max_tokens": 2}).status_code == 200
