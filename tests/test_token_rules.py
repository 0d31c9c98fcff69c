"""logit_bias, min_tokens, allowed_token_ids and bad_words: the device sampler against a
numpy reference on random logits, and the engine end to end on the tiny model."""

import jax
import numpy as np
import pytest

from jpaged.engine.engine import LLM
from jpaged.engine.sampler import SamplingTensors, sample
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.token_rules import TokenRules, token_bitmask
from jpaged.models import Model, init_params, tiny_config

CONFIG = tiny_config(num_layers=2, vocab_size=100, max_position_embeddings=128)


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


def llm_for(model, **changes):
    return LLM(Model(CONFIG, model.params, **changes), page_size=4, num_pages=64,
               max_num_seqs=8, max_model_len=128)


def test_sampler_applies_bias_and_mask_like_numpy():
    """Greedy rows take the argmax of logits + bias among the allowed tokens; sampled rows
    never draw a banned or masked token; logprobs stay the model's."""
    rng = np.random.default_rng(0)
    rows, vocab = 6, 70
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    bias = [[(int(t), float(rng.uniform(-100, 100))) for t in rng.choice(vocab, 5, False)]
            for _ in range(rows)]
    bias[1] = None
    bias[2] = [(int(np.argmax(logits[2])), -np.inf)]
    masks = [token_bitmask(rng.choice(vocab, 20, False), vocab) for _ in range(rows)]
    masks[3] = None
    expected = logits.copy()
    for row in range(rows):
        for token, value in bias[row] or []:
            expected[row, token] += value
        if masks[row] is not None:
            allowed = np.unpackbits(masks[row].view(np.uint8), bitorder="little")[:vocab]
            expected[row, allowed == 0] = -np.inf
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature)] * rows
        tensors = SamplingTensors.from_params(params, list(range(rows)), [0] * rows,
                                              batch=8, bias=bias + [None, None],
                                              masks=masks + [None, None])
        padded = np.concatenate([logits, np.zeros((2, vocab), np.float32)])
        out = jax.jit(sample)(padded, tensors)
        tokens = np.asarray(out.tokens[:rows])
        assert np.all(np.isfinite(expected[np.arange(rows), tokens]))
        if temperature == 0:
            np.testing.assert_array_equal(tokens, np.argmax(expected, axis=-1))
        model_logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        np.testing.assert_allclose(out.logprobs[:rows], model_logprobs[np.arange(rows), tokens],
                                   atol=1e-5)


def test_logit_bias_and_allowed_token_ids(model):
    llm = llm_for(model)
    prompt = [5, 17, 33, 2, 9]
    plain = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0,
                                                  ignore_eos=True))[0].token_ids
    favoured = llm.generate([prompt], SamplingParams(
        max_tokens=6, temperature=0, logit_bias={"7": 100}))[0].token_ids
    assert favoured == [7] * 6
    banned = llm.generate([prompt], SamplingParams(
        max_tokens=6, temperature=0, logit_bias={t: -100 for t in plain}))[0].token_ids
    assert not set(banned) & set(plain)
    allowed = [3, 11, 40, 41, 99]
    sampled = llm.generate([prompt] * 4, [SamplingParams(
        max_tokens=10, temperature=1.5, seed=i, allowed_token_ids=allowed) for i in range(4)])
    assert all(set(o.token_ids) <= set(allowed) for o in sampled)
    assert len({tuple(o.token_ids) for o in sampled}) > 1


def test_min_tokens_masks_eos_and_stop_ids(model):
    prompt = [5, 17, 33, 2, 9]
    first = llm_for(model).generate([prompt], SamplingParams(
        max_tokens=4, temperature=0))[0].token_ids[0]
    llm = llm_for(model, eos_token_ids=(first,))
    stopped = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, min_tokens=3))[0]
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:2]
    second = held.token_ids[0]
    stop_ids = llm.generate([prompt], SamplingParams(
        max_tokens=8, temperature=0, min_tokens=2, stop_token_ids=[second]))[0]
    assert stop_ids.token_ids[0] not in (first, second)


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers

    tokenizer = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(CONFIG.vocab_size)},
                                               unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def test_bad_word_bans_its_last_token_after_its_prefix_only():
    rules = TokenRules(SamplingParams(bad_words=["w3 w4", "w7"]), 10, tokenizer=word_tokenizer())
    assert rules.bias_entries([1, 2]) == [(7, -np.inf)]
    assert sorted(rules.bias_entries([1, 3])) == [(4, -np.inf), (7, -np.inf)]


def test_bad_words(model):
    llm = llm_for(model, tokenizer=word_tokenizer())
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    plain = llm.generate(["w5 w17 w33"], greedy)[0].token_ids
    one = llm.generate(["w5 w17 w33"], SamplingParams(
        max_tokens=8, temperature=0, bad_words=[f"w{plain[0]}"]))[0].token_ids
    assert plain[0] not in one
    # Two words: the second is banned only right after the first.
    pair = f"w{plain[0]} w{plain[1]}"
    two = llm.generate(["w5 w17 w33"], SamplingParams(
        max_tokens=8, temperature=0, bad_words=[pair]))[0].token_ids
    assert two[0] == plain[0] and two[1] != plain[1]
    assert all((a, b) != tuple(plain[:2]) for a, b in zip(two, two[1:]))


@pytest.mark.parametrize("params, message", [
    (dict(logit_bias={5: 101}), "logit_bias of token 5 must be in"),
    (dict(logit_bias={5: -100.5}), "logit_bias of token 5 must be in"),
    (dict(logit_bias={"x": 1}), "logit_bias token id"),
    (dict(min_tokens=20, max_tokens=4), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(bad_words=[""]), "bad_words"),
    (dict(logit_bias={1: 1}, use_beam_search=True, n=2, temperature=0), "use_beam_search"),
])
def test_bad_params(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


@pytest.mark.parametrize("params, message", [
    (dict(logit_bias={100: 1.0}), "logit_bias: token id 100 is outside the vocabulary"),
    (dict(allowed_token_ids=[3, -1]), "allowed_token_ids: token id -1 is outside"),
    (dict(bad_words=["w1"]), "needs a tokenizer"),
    (dict(guided_regex="a+"), "needs a tokenizer"),
])
def test_bad_requests_leave_others_running(model, params, message):
    llm = llm_for(model)
    engine = llm.engine
    good = engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
    with pytest.raises(ValueError, match=message):
        engine.add_request([4, 5], SamplingParams(**params))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == [good]


def test_rules_check_the_vocabulary_without_an_engine():
    rules = TokenRules(SamplingParams(logit_bias={3: 2.0}, min_tokens=2, stop_token_ids=[9]),
                       vocab_size=10, eos_token_ids=[0])
    assert rules.bias_entries([1]) == [(3, 2.0), (0, -np.inf), (9, -np.inf)]
    assert rules.bias_entries([1, 2]) == [(3, 2.0)]
    assert rules.mask(None, []) is None
