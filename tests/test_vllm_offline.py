"""vLLM's offline examples (basic generation, chat, sampling options) written out with
only the import changed, run as scripts, and checked against what the same calls give
through jpaged's own names; the refusals of what jpaged does not have."""

import json
import os
import runpy
import shutil

import jinja2
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from serve_checkpoint import CONFIG, TEMPLATE, write_checkpoint

PROMPTS = ["w5 w6 w7", "w10 w11 w12 w13", "w200", "w42 w43"]
# The checkpoint's sampling defaults (vLLM reads the same keys).
GENERATION_CONFIG = {"temperature": 0.0, "top_k": 20, "top_p": 0.9, "max_new_tokens": 9,
                     "do_sample": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = write_checkpoint(str(tmp_path_factory.mktemp("offline") / "tiny-chat"))
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f)
    return directory


@pytest.fixture(scope="module")
def llm(checkpoint):
    # The examples' own options: their LLMs share the compiled step programs with this one.
    return LLM(checkpoint, max_model_len=512)


def run_script(source: str, checkpoint: str, tmp_path, capsys) -> str:
    script = tmp_path / "example.py"
    script.write_text(source.replace("MODEL", repr(checkpoint)))
    runpy.run_path(str(script), run_name="__main__")
    captured = capsys.readouterr()
    return captured.out + "\n" + captured.err


def printed(out: str, label: str) -> list:
    return [eval(line.split(": ", 1)[1]) for line in out.splitlines()
            if line.startswith(label + ": ")]


# vLLM's examples/offline_inference/basic/generate.py, its argument parsing replaced by the
# values it would parse.
GENERATE_EXAMPLE = '''
from jpaged import LLM


def main(args: dict):
    max_tokens = args.pop("max_tokens")
    temperature = args.pop("temperature")
    top_p = args.pop("top_p")
    top_k = args.pop("top_k")

    llm = LLM(**args)

    # Start from the checkpoint's generation_config.json, then override.
    sampling_params = llm.get_default_sampling_params()
    if max_tokens is not None:
        sampling_params.max_tokens = max_tokens
    if temperature is not None:
        sampling_params.temperature = temperature
    if top_p is not None:
        sampling_params.top_p = top_p
    if top_k is not None:
        sampling_params.top_k = top_k

    prompts = ["w5 w6 w7", "w10 w11 w12 w13", "w200", "w42 w43"]
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}")
        print(f"Generated text: {output.outputs[0].text!r}")


if __name__ == "__main__":
    main(dict(model=MODEL, max_model_len=512, block_size=16, enforce_eager=True,
              trust_remote_code=True, max_tokens=None, temperature=None, top_p=None,
              top_k=None))
'''


def test_vllm_generate_example(checkpoint, llm, tmp_path, capsys):
    out = run_script(GENERATE_EXAMPLE, checkpoint, tmp_path, capsys)
    assert printed(out, "Prompt") == PROMPTS
    # The same through jpaged's names: the generation config's values, spelled out.
    want = llm.generate(PROMPTS, SamplingParams(temperature=0.0, top_k=20, top_p=0.9,
                                                max_tokens=9), use_tqdm=False)
    assert printed(out, "Generated text") == [o.outputs[0].text for o in want]
    assert all(len(o.outputs[0].token_ids) == 9 for o in want)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_tokens) == (
        0.0, 20, 0.9, 9)
    # generate's progress bar (tqdm, on stderr), with vLLM's caption.
    assert "Processed prompts: 100%" in out and "4/4" in out


# vLLM's examples/offline_inference/basic/chat.py with its arguments spelled out.
CHAT_EXAMPLE = '''
from jpaged import LLM, SamplingParams


def main(chat_template_path):
    sampling_params = SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, top_k=-1)
    llm = LLM(model=MODEL, max_model_len=512, seed=0)

    def print_outputs(outputs):
        for output in outputs:
            print(f"Prompt: {output.prompt!r}")
            print(f"Generated text: {output.outputs[0].text!r}")
        print("-" * 80)

    conversation = [
        {"role": "system", "content": "w20 w21"},
        {"role": "user", "content": "w30"},
        {"role": "assistant", "content": "w31 w32"},
        {"role": "user", "content": "w40 w41 w42"},
    ]
    outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
    print_outputs(outputs)

    conversations = [conversation for _ in range(3)]
    outputs = llm.chat(conversations, sampling_params, use_tqdm=True)
    print_outputs(outputs)

    if chat_template_path:
        with open(chat_template_path) as f:
            chat_template = f.read()
        outputs = llm.chat(conversations, sampling_params, use_tqdm=False,
                           chat_template=chat_template)
        print_outputs(outputs)


if __name__ == "__main__":
    main(TEMPLATE_PATH)
'''
# Another template: the roles in reverse order of appearance, no generation prompt.
OTHER_TEMPLATE = ("{% for m in messages | reverse %}<|{{ m['role'] }}|> {{ m['content'] }} "
                  "{% endfor %}")


def test_vllm_chat_example(checkpoint, llm, tmp_path, capsys):
    path = tmp_path / "template.jinja"
    path.write_text(OTHER_TEMPLATE)
    out = run_script(CHAT_EXAMPLE.replace("TEMPLATE_PATH", repr(str(path))), checkpoint,
                     tmp_path, capsys)
    conversation = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w30"},
                    {"role": "assistant", "content": "w31 w32"},
                    {"role": "user", "content": "w40 w41 w42"}]
    texts = [jinja2.Template(t).render(messages=conversation, add_generation_prompt=True)
             for t in (TEMPLATE, OTHER_TEMPLATE)]
    tokenizer = llm.get_tokenizer()
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    want = [o.outputs[0].text for o in llm.generate(
        [{"prompt_token_ids": i} for i in ids], SamplingParams(max_tokens=8, temperature=0.0),
        use_tqdm=False)]
    assert printed(out, "Prompt") == [texts[0]] * 4 + [texts[1]] * 3
    assert printed(out, "Generated text") == [want[0]] * 4 + [want[1]] * 3
    assert texts[0] != texts[1] and ids[0][-1] == 2   # ends with <|assistant|>


SAMPLING_EXAMPLE = '''
from jpaged import LLM, SamplingParams

llm = LLM(model=MODEL, max_model_len=512, disable_log_stats=True)
prompt = "w10 w11 w12 w13 w14 w15"

# n samples with a seed, with logprobs.
params = SamplingParams(n=3, temperature=0.8, top_p=0.95, seed=42, max_tokens=6, logprobs=3)
for completion in llm.generate(prompt, params, use_tqdm=False)[0].outputs:
    print(f"sample {completion.index}: {completion.token_ids!r}")
    print(f"logprob: {[{t: (l.logprob, l.rank, l.decoded_token) for t, l in e.items()} for e in completion.logprobs]!r}")

# Stop strings, kept or cut, and the stop reason.
for keep in (False, True):
    params = SamplingParams(temperature=0, max_tokens=12, stop=[STOP],
                            include_stop_str_in_output=keep)
    completion = llm.generate([{"prompt": prompt}], params, use_tqdm=False)[0].outputs[0]
    print(f"stop: {(completion.text, completion.finish_reason, completion.stop_reason)!r}")

# Token ids in, no detokenization, the prompt truncated to its last 3 tokens.
params = SamplingParams(temperature=0, max_tokens=5, detokenize=False, truncate_prompt_tokens=3)
output = llm.generate([{"prompt_token_ids": [10, 11, 12, 13, 14, 15]}], params,
                      use_tqdm=False)[0]
print(f"truncated: {(output.prompt_token_ids, output.outputs[0].token_ids, output.outputs[0].text)!r}")
'''


def test_vllm_sampling_options(checkpoint, llm, tmp_path, capsys):
    greedy = llm.generate("w10 w11 w12 w13 w14 w15", SamplingParams(temperature=0, max_tokens=12),
                          use_tqdm=False)[0].outputs[0]
    stop = " " + greedy.text.split()[4]
    out = run_script(SAMPLING_EXAMPLE.replace("STOP", repr(stop)), checkpoint, tmp_path, capsys)
    # Samples: as jpaged's own call gives them.
    want = llm.generate(["w10 w11 w12 w13 w14 w15"], SamplingParams(
        n=3, temperature=0.8, top_p=0.95, seed=42, max_tokens=6, logprobs=3))[0].outputs
    assert printed(out, "sample 0") + printed(out, "sample 1") + printed(out, "sample 2") == [
        c.token_ids for c in want]
    for entries in printed(out, "logprob"):
        for entry in entries:
            by_rank = sorted((rank, lp) for lp, rank, _ in entry.values())
            assert [lp for _, lp in by_rank] == sorted([lp for _, lp in by_rank], reverse=True)
            assert {text for _, _, text in entry.values()} <= {f"w{i}" for i in range(256)} | {
                "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
    cut, kept = printed(out, "stop")
    at = greedy.text.find(stop)
    assert cut == (greedy.text[:at], "stop", stop)
    assert kept == (greedy.text[:at + len(stop)], "stop", stop)
    ids, tokens, text = printed(out, "truncated")[0]
    want = llm.generate([[13, 14, 15]], SamplingParams(temperature=0, max_tokens=5))[0]
    assert ids == [13, 14, 15] and tokens == want.outputs[0].token_ids and text == ""


@pytest.mark.slow
def test_logprob_ranks_against_the_whole_distribution(llm):
    """With every token's logprob asked for, each rank is 1 + the tokens more likely,
    the logprobs are a distribution, and the sampled token's rank is its place in it."""
    vocab = CONFIG.vocab_size
    output = llm.generate(["w7 w8"], SamplingParams(temperature=1.0, seed=3, max_tokens=4,
                                                    logprobs=vocab), use_tqdm=False)[0]
    completion = output.outputs[0]
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert len(entry) == vocab
        lps = np.array([entry[t].logprob for t in range(vocab)], np.float64)
        assert np.exp(lps).sum() == pytest.approx(1.0, abs=1e-4)
        for t in range(vocab):
            assert entry[t].rank == 1 + int((lps > lps[t]).sum()) or np.isclose(
                np.sort(lps)[::-1][entry[t].rank - 1], lps[t], atol=1e-6)
        assert entry[token].decoded_token == f"w{token}" or token < 4


def test_max_tokens_none_runs_to_the_context(checkpoint):
    llm = LLM(checkpoint, max_model_len=40)
    output = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=None,
                                                      ignore_eos=True), use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 40 - 3
    assert output.outputs[0].finish_reason == "length"


@pytest.mark.slow
def test_beam_search_is_jpaged_beam_search(llm):
    from jpaged.engine.offline import BeamSearchParams

    beams = llm.beam_search([{"prompt": "w5 w6"}, {"prompt_token_ids": [9, 10, 11]}],
                            BeamSearchParams(beam_width=3, max_tokens=4))
    want = llm.generate(["w5 w6", [9, 10, 11]], SamplingParams(
        n=3, use_beam_search=True, temperature=0.0, max_tokens=4), use_tqdm=False)
    for output, expected in zip(beams, want):
        assert [s.tokens for s in output.sequences] == [
            expected.prompt_token_ids + c.token_ids for c in expected.outputs]
        assert [s.cum_logprob for s in output.sequences] == [
            c.cumulative_logprob for c in expected.outputs]
    assert beams[0].sequences[0].text.startswith("w5 w6 ")
    with pytest.raises(ValueError, match="temperature=0.5 is not supported"):
        llm.beam_search(["w5"], BeamSearchParams(beam_width=2, max_tokens=2, temperature=0.5))


def test_cached_prompt_tokens_are_reported(llm):
    prompt = " ".join(f"w{i}" for i in range(60, 100))   # 40 tokens: 2 full pages
    first, second = (llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2),
                                  use_tqdm=False)[0] for _ in range(2))
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 32


@pytest.mark.parametrize("call, message", [
    (lambda llm: SamplingParams(output_kind=1), "output_kind= is not supported"),
    (lambda llm: SamplingParams(logits_processors=[]), "logits_processors= is not supported"),
    (lambda llm: SamplingParams(no_such=1), "no_such= is not supported"),
    (lambda llm: SamplingParams(spaces_between_special_tokens=False),
     "spaces_between_special_tokens=False is not supported"),
    (lambda llm: SamplingParams(stop=["x"], detokenize=False), "need detokenize=True"),
    (lambda llm: SamplingParams(truncate_prompt_tokens=0), "truncate_prompt_tokens must be >= 1"),
    (lambda llm: llm.generate("w5", lora_request=object()), "does not support lora_request"),
    (lambda llm: llm.generate({"prompt": "w5", "multi_modal_data": {}}),
     "multi_modal_data is not supported"),
    (lambda llm: llm.generate({"prompt_token_ids": "w5"}), "must be a list of token ids"),
    (lambda llm: llm.chat([{"role": "user", "content": "w5"}], continue_final_message=True),
     "continue_final_message=True is not supported"),
    (lambda llm: llm.chat([{"content": "w5"}]), r"messages\[0\] must be an object"),
    (lambda llm: llm.generate(["w5", "w6"], priority=[0]), "2 prompts"),
    (lambda llm: llm.generate("w5", use_tqdm="yes"), "use_tqdm must be"),
])
def test_unsupported_vllm_options_are_value_errors(llm, call, message):
    with pytest.raises(ValueError, match=message):
        call(llm)
    assert not llm.engine.has_unfinished_requests()


def test_llm_options_tokenizer_and_generation_config(checkpoint, tmp_path):
    other = tmp_path / "tok"
    other.mkdir()
    shutil.copy(os.path.join(checkpoint, "tokenizer.json"), other)
    llm = LLM(checkpoint, num_pages=32, tokenizer=str(other), generation_config="vllm")
    assert llm.get_tokenizer().encode("w9").ids == [9]
    assert llm.get_default_sampling_params() == SamplingParams()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        LLM(checkpoint, num_pages=32, tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match="generation_config="):
        LLM(checkpoint, num_pages=32, generation_config=str(tmp_path))


def test_warmup_compiles_every_shape_traffic_meets(checkpoint, capsys):
    """LLM(..., warmup=True) compiles each step shape up front (a configuration no other
    test uses: 3 pages per sequence); traffic of every prompt length then compiles none."""
    llm = LLM(checkpoint, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=40,
              warmup=True)
    assert "warm-up compiled 2 step shapes in" in capsys.readouterr().err
    compiled = llm.engine.num_compilations
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 256, n).tolist() for n in (1, 5, 16, 17, 30, 39)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.7, seed=1, max_tokens=10,
                                                   ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [10, 10, 10, 10, 10, 1]
    assert llm.engine.num_compilations == compiled


def test_stats_line(llm, caplog):
    import logging

    from jpaged.engine.stats import StatsLogger

    stats = StatsLogger(llm.engine, interval=3600)
    for output in llm.stream(["w5 w6 w7"], SamplingParams(temperature=0, max_tokens=3)):
        stats.observe([output])
    assert (stats.prompt_tokens, stats.generation_tokens, stats.seen) == (3, 3, {})
    with caplog.at_level(logging.INFO, "jpaged.stats"):
        stats.log(stats.last + 2.0)
    assert ("Avg prompt throughput: 1.5 tokens/s, Avg generation throughput: 1.5 tokens/s, "
            "Running: 0 reqs, Swapped: 0 reqs, Pending: 0 reqs, KV cache usage: 0.0%") in \
        caplog.text
