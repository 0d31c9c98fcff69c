import collections
import functools

import jax
import numpy as np
import pytest

from jpaged.engine.sampler import SamplingTensors, apply_filters, apply_penalties, sample
from jpaged.host.beam_search import beam_candidates, beam_score
from jpaged.host.sampling_params import SamplingParams

# Most tests share a few programs (vocabulary 16, batches of 8 or 2048): compiling is the
# slow part on a loaded CPU. TRACES counts how often each shape was traced.
VOCAB, MANY = 16, 2048
TRACES = collections.Counter()


@functools.partial(jax.jit, static_argnums=2)
def sample_jit(logits, tensors, num_top_logprobs):
    TRACES[logits.shape, tensors.prompt_tokens.shape, tensors.output_tokens.shape,
           num_top_logprobs] += 1
    return sample(logits, tensors, num_top_logprobs)


filters_jit = jax.jit(apply_filters, static_argnums=2)


def tensors_for(params, seeds=None, steps=None, **kwargs):
    seeds = list(range(len(params))) if seeds is None else seeds
    steps = [0] * len(params) if steps is None else steps
    return SamplingTensors.from_params(params, seeds, steps, **kwargs)


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kept(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0):
    """Independent reference: which tokens of one row may be sampled."""
    probs = np_softmax(logits / temperature)
    order = np.argsort(-probs)
    kept = np.zeros(len(probs), bool)
    kept[order[:top_k if top_k > 0 else len(probs)]] = True
    renormed = np.where(kept, probs, 0) / np.where(kept, probs, 0).sum()
    mass_above = 0.0
    for token in order:  # nucleus: smallest prefix whose mass reaches top_p
        if top_p < 1 and mass_above >= top_p:  # top_p = 1 is off
            kept[token] = False
        mass_above += renormed[token]
    return kept & (probs >= min_p * probs.max())


def np_penalties(logits, prompt, output, repetition, presence, frequency):
    out = logits.copy()
    for token in set(prompt) | set(output):
        out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in set(output):
        out[token] -= frequency * output.count(token) + presence
    return out


def sample_many(logits_row, params, seeds=None, steps=None):
    """Sample ``MANY`` rows of the same logits: ``params`` repeated, seeds 0.. by default."""
    tensors = tensors_for([params] * MANY, range(MANY) if seeds is None else seeds, steps)
    return np.asarray(sample_jit(np.tile(logits_row, (MANY, 1)), tensors, 0).tokens)


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(5, VOCAB)).astype(np.float32)
    params = [SamplingParams(temperature=0.0, top_k=k, top_p=p)
              for k, p in [(-1, 1.0), (1, 0.5), (3, 1.0), (0, 0.1), (100, 0.9)]]
    out = sample_jit(np.pad(logits, ((0, 3), (0, 0))), tensors_for(params, batch=8), 0)
    np.testing.assert_array_equal(out.tokens[:5], logits.argmax(-1))
    np.testing.assert_array_equal(out.tokens[5:], 0)  # padded rows: argmax of zeros


def test_greedy_rows_in_a_sampled_batch_stay_argmax():
    logits = np.random.default_rng(1).normal(size=(8, VOCAB)).astype(np.float32)
    params = [SamplingParams(temperature=t, top_p=0.5) for t in (0.0, 1.0, 0.0, 2.0)]
    out = sample_jit(logits, tensors_for(params, batch=8), 0)
    np.testing.assert_array_equal(np.asarray(out.tokens)[[0, 2]], logits[[0, 2]].argmax(-1))


def test_temperature_frequencies_match_softmax():
    temperature = 0.7
    logits = np.random.default_rng(2).uniform(-1, 1, VOCAB).astype(np.float32)
    observed = np.bincount(sample_many(logits, SamplingParams(temperature=temperature)),
                           minlength=VOCAB)
    expected = MANY * np_softmax(logits / temperature)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 45, (observed, expected)  # 15 degrees of freedom: p < 1e-4


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_never_leaves_top_k(top_k):
    logits = np.random.default_rng(3).normal(size=VOCAB).astype(np.float32)
    tokens = sample_many(logits, SamplingParams(temperature=3.0, top_k=top_k))
    assert set(tokens.tolist()) == set(np.argsort(-logits)[:top_k].tolist())


def check_filters(logits, settings, candidates):
    params = [SamplingParams(**s) for s in settings]
    filtered = np.asarray(filters_jit(logits, tensors_for(params), candidates))
    for row, setting in enumerate(settings):
        kept = np_kept(logits[row].astype(np.float64), **setting)
        np.testing.assert_array_equal(np.isfinite(filtered[row]), kept, err_msg=str(setting))
        np.testing.assert_allclose(filtered[row][kept],
                                   logits[row][kept] / setting["temperature"], rtol=1e-6)


@pytest.mark.parametrize("candidates", [VOCAB, 4])
def test_filters_match_numpy_reference(candidates):
    # With 4 candidates, rows whose kept set may pass them make the batch sort whole rows.
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(48, VOCAB)) * 2).astype(np.float32)
    settings = [dict(temperature=float(rng.uniform(0.3, 2.0)),
                     top_k=int(rng.choice([-1, 0, 1, 5, 12, VOCAB + 4])),
                     top_p=float(rng.choice([1.0, rng.uniform(0.05, 1.0)])),
                     min_p=float(rng.choice([0.0, rng.uniform(0.0, 0.5)])))
                for _ in logits]
    assert any(s["top_k"] > VOCAB and s["top_p"] == 1 and s["min_p"] == 0 for s in settings)
    check_filters(logits, settings, candidates)


def test_filters_within_the_candidates():
    # Each row's kept set is decided by its 4 largest logits, so no row is sorted whole.
    logits = np.random.default_rng(11).normal(size=(48, VOCAB)).astype(np.float32)
    logits[:, 0] += 8  # peaked rows: the 4 largest hold more than 0.8 of the mass
    assert (np.sort(np_softmax(logits), -1)[:, -4:].sum(-1) > 0.8).all()
    settings = [dict(temperature=1.0, top_k=[1, 3, 4, -1][row % 4],
                     top_p=[0.3, 0.8, 1.0][row // 16]) for row in range(48)]
    check_filters(logits, settings, 4)


@pytest.mark.parametrize("setting", [dict(top_p=0.6), dict(top_p=0.9, top_k=4),
                                     dict(min_p=0.3)])
def test_samples_stay_in_the_kept_set(setting):
    logits = np.random.default_rng(5).normal(size=VOCAB).astype(np.float32)
    tokens = sample_many(logits, SamplingParams(temperature=1.5, **setting))
    kept = np_kept(logits.astype(np.float64), temperature=1.5, **setting)
    assert set(tokens.tolist()) == set(np.flatnonzero(kept).tolist())


def test_same_seed_and_step_give_the_same_token_anywhere_in_any_batch():
    rng = np.random.default_rng(6)
    row = rng.normal(size=VOCAB).astype(np.float32)
    target = SamplingParams(temperature=1.0, top_p=0.95)
    alone = sample_many(row, target, seeds=range(MANY), steps=[7] * MANY)
    others = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0.0),
              SamplingParams(min_p=0.1, repetition_penalty=1.3)]
    for seed in range(10):
        logits = rng.normal(size=(8, VOCAB)).astype(np.float32)
        logits[2] = row
        crowd = tensors_for(others[:2] + [target] + others[2:], [99, 5, seed, 3],
                            [1, 7, 7, 0], batch=8, prompt_tokens=[[1], [], [], [4, 5]],
                            output_tokens=[[], [2], [], [6]])
        assert sample_jit(logits, crowd, 4).tokens[2] == alone[seed]


def test_different_seeds_and_steps_differ():
    row = np.zeros(VOCAB, np.float32)
    by_seed = sample_many(row, SamplingParams(), seeds=[3] * 64 + list(range(MANY - 64)),
                          steps=[0] * MANY)
    by_step = sample_many(row, SamplingParams(), seeds=[3] * MANY, steps=range(MANY))
    assert len(set(by_seed[:64].tolist())) == 1  # same seed and step: same token
    assert len(set(by_seed[:100].tolist())) > 8
    assert len(set(by_step[:100].tolist())) > 8


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(4, VOCAB)).astype(np.float32)
    prompts = [[1, 2, 2, 3], [], [5, 6], [0, 15]]
    outputs = [[3, 3, 4], [7, 7, 7, 8], [], [15, 15, 1]]
    knobs = [(1.5, 0.0, 0.0), (1.0, 0.5, 0.25), (0.8, -0.3, 0.0), (1.2, 0.4, 0.7)]
    params = [SamplingParams(repetition_penalty=r, presence_penalty=p, frequency_penalty=f)
              for r, p, f in knobs]
    tensors = tensors_for(params, prompt_tokens=prompts, output_tokens=outputs, batch=8)
    assert tensors.prompt_tokens.shape == (8, 16)
    got = jax.jit(apply_penalties)(np.pad(logits, ((0, 4), (0, 0))), tensors)
    want = [np_penalties(logits[i], prompts[i], outputs[i], *knobs[i]) for i in range(4)]
    np.testing.assert_allclose(got[:4], np.stack(want), rtol=1e-6)
    np.testing.assert_allclose(got[4:], 0.0)


def test_no_penalties_means_no_history():
    tensors = tensors_for([SamplingParams()], prompt_tokens=[[1, 2]], output_tokens=[[3]])
    assert tensors.prompt_tokens.shape == (1, 0) and tensors.output_tokens.shape == (1, 0)


def test_logprobs_and_top_logprobs():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(8, VOCAB)).astype(np.float32)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.3, frequency_penalty=0.6, repetition_penalty=1.4)]
    prompts, outputs = [[], [], [1, 2]], [[], [], [int(logits[2].argmax())] * 3]
    tensors = tensors_for(params, prompt_tokens=prompts, output_tokens=outputs, batch=8)
    out = sample_jit(logits, tensors, 4)
    for row, p in enumerate(params):
        penalized = np_penalties(logits[row].astype(np.float64), prompts[row], outputs[row],
                                 p.repetition_penalty, p.presence_penalty,
                                 p.frequency_penalty)
        reference = np_log_softmax(penalized)
        token = int(out.tokens[row])
        np.testing.assert_allclose(out.logprobs[row], reference[token], rtol=1e-5)
        np.testing.assert_array_equal(out.top_ids[row], np.argsort(-reference)[:4])
        np.testing.assert_allclose(out.top_logprobs[row], np.sort(reference)[::-1][:4],
                                   rtol=1e-5)
    assert out.top_ids.dtype == np.int32 and out.tokens.dtype == np.int32
    assert sample_jit(logits, tensors, 0).top_ids.shape == (8, 0)


def test_greedy_only_builds_only_the_argmax_and_matches_the_full_sampler():
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(8, VOCAB)).astype(np.float32)
    greedy = tensors_for([SamplingParams(temperature=0.0, top_k=3)] * 2, batch=8)
    greedy_jit = jax.jit(functools.partial(sample, greedy_only=True), static_argnums=2)
    fast, full = greedy_jit(logits, greedy, 4), sample_jit(logits, greedy, 4)
    for got, expected in zip(fast, full):
        np.testing.assert_array_equal(got, expected)
    # No cond, no filter (sort, cumsum) and no random bits: a few dozen ops.
    program = greedy_jit.lower(logits, greedy, 4).as_text()
    for op in ("stablehlo.case", "stablehlo.while", "reduce_window", "shift_right_logical"):
        assert op not in program, op
    with pytest.raises(ValueError, match="greedy_only=True but row 1 has temperature 0.7"):
        sample(logits, tensors_for([SamplingParams(temperature=0.0),
                                    SamplingParams(temperature=0.7)], batch=8),
               greedy_only=True)


def test_compiles_once_per_bucket():
    logits = np.zeros((8, VOCAB), np.float32)
    first = tensors_for([SamplingParams(temperature=0.0, presence_penalty=1.0)],
                        prompt_tokens=[[1]], output_tokens=[[]], batch=8)
    second = tensors_for([SamplingParams(top_k=3, repetition_penalty=1.1)] * 3,
                         seeds=[1, 2, 3], steps=[4, 5, 6], prompt_tokens=[[1] * 9] * 3,
                         output_tokens=[[2, 3]] * 3, batch=8)
    for tensors in (first, second, first):
        sample_jit(logits, tensors, 4)
    assert TRACES[(8, VOCAB), (8, 16), (8, 16), 4] == 1


def test_beam_candidates_match_brute_force():
    rng = np.random.default_rng(10)
    groups, width, vocab = 2, 3, 7
    logprobs = np_log_softmax(rng.normal(size=(groups * width, vocab))).astype(np.float32)
    scores = rng.normal(size=groups * width).astype(np.float32)
    scores[3:] = [-1.0, -np.inf, -np.inf]  # group 1 at its first step: one live beam
    parents, tokens, totals = beam_candidates(logprobs, scores, width)
    for g in range(groups):
        rows = range(g * width, (g + 1) * width)
        everything = sorted(((scores[r] + logprobs[r, t], r, t) for r in rows
                             for t in range(vocab)), reverse=True)[:2 * width]
        np.testing.assert_allclose(totals[g], [s for s, _, _ in everything], rtol=1e-6)
        assert list(zip(parents[g].tolist(), tokens[g].tolist())) == [
            (r, t) for _, r, t in everything]
    assert set(parents[1].tolist()) == {3}
    assert beam_score(-6.0, 4, 1.0) == -1.5


def test_beam_candidates_rejects_ragged_groups():
    with pytest.raises(ValueError, match="width=4"):
        beam_candidates(np.zeros((6, 5), np.float32), np.zeros(6, np.float32), 4)


def test_from_params_errors():
    with pytest.raises(ValueError, match="batch=1"):
        tensors_for([SamplingParams()] * 2, batch=1)
    with pytest.raises(ValueError, match="prompt_tokens"):
        tensors_for([SamplingParams(presence_penalty=1.0)])
    with pytest.raises(ValueError, match="width=2"):
        tensors_for([SamplingParams(presence_penalty=1.0)], prompt_tokens=[[1, 2, 3]],
                    output_tokens=[[]], prompt_width=2)
    with pytest.raises(ValueError, match="seeds"):
        SamplingTensors.from_params([SamplingParams()], [1, 2], [0])


def test_params_defaults_and_normalization():
    p = SamplingParams(stop="###", temperature=1, stop_token_ids=(2, 3), best_of=3)
    assert p.stop == ["###"] and p.stop_token_ids == [2, 3]
    assert isinstance(p.temperature, float) and p.num_sequences == 3 and p.max_tokens == 16
    assert SamplingParams().stop == [] and not SamplingParams().uses_penalties
    beam = SamplingParams(use_beam_search=True, temperature=0.0, n=2, best_of=4)
    assert beam.num_sequences == 4


def test_sequence_seeds():
    seeded = SamplingParams(seed=-7, n=3)
    seeds = seeded.sequence_seeds(np.random.default_rng(0))
    assert seeds == seeded.sequence_seeds(np.random.default_rng(1))
    assert len(set(seeds)) == 3 and all(0 <= s < 2**32 for s in seeds)
    assert seeds != SamplingParams(seed=7, n=3).sequence_seeds(np.random.default_rng(0))
    rng = np.random.default_rng(0)
    assert SamplingParams().sequence_seeds(rng) != SamplingParams().sequence_seeds(rng)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\], got 0.0"),
    (dict(top_p=1.5), "top_p must be in \\(0, 1\\], got 1.5"),
    (dict(top_p="0.5"), "top_p must be a finite number, got '0.5'"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(n=3, best_of=2), "best_of must be >= n=3, got 2"),
    (dict(seed=1.5), "seed"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=float("inf")), "presence_penalty"),
    (dict(frequency_penalty=None), "frequency_penalty"),
    (dict(stop=5), "unknown stop type"),
    (dict(stop=["ok", 3]), "unknown stop type"),
    (dict(stop=[""]), "stop strings"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs must be >= 0, got -1"),
    (dict(use_beam_search="yes"), "use_beam_search"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(length_penalty="long"), "length_penalty"),
    (dict(use_beam_search=True, n=2), "temperature must be 0.0 with use_beam_search"),
    (dict(use_beam_search=True, temperature=0.0, top_k=5), "top_k"),
])
def test_bad_params_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
