"""Logits and greedy continuations equal Hugging Face transformers (PyTorch CPU) on tiny random
checkpoints written with ``save_pretrained`` and read back with ``load_hf``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_models import PagedRun, reference  # noqa: E402 (after the skips)

from jpaged.models import load_hf  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0)
WINDOW = 5
CASES = {
    # Llama-3 scaling with original_max_position_embeddings=64 puts head_dim 16's frequencies
    # in all three bands (kept, interpolated, divided by factor).
    "llama": dict(model_type="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64)),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=WINDOW),
}
PROMPT_LEN = 12  # longer than WINDOW
NEW_TOKENS = 8


def hf_model(name, **changes):
    options = {**COMMON, **CASES[name], **changes}
    config = transformers.AutoConfig.for_model(options.pop("model_type"), **options)
    torch.manual_seed(0)
    # Eager attention applies Mistral's sliding window (checked below); zero-init biases and
    # unit norms are replaced by random values so every tensor's mapping is exercised.
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    model = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    # Llama goes through the sharded layout (an index and many files).
    model.save_pretrained(directory, max_shard_size="40KB" if request.param == "llama" else "1GB")
    config, params = load_hf(str(directory), dtype=jnp.float32)
    return request.param, model, config, params, directory


def prompts(vocab):
    return np.random.default_rng(0).integers(1, vocab, (2, PROMPT_LEN)).astype(np.int32)


def test_loaded_config(checkpoint):
    name, model, config, params, directory = checkpoint
    assert config.architecture == type(model).__name__
    assert config.tie_word_embeddings == (name == "qwen2") == ("lm_head" not in params)
    assert config.attention_bias == (name == "qwen2")
    assert config.sliding_window == (WINDOW if name == "mistral" else None)
    assert (config.rope_scaling is not None) == (name == "llama")
    if name == "llama":
        assert (directory / "model.safetensors.index.json").exists()


def test_logits_match_hf(checkpoint):
    name, model, config, params, _ = checkpoint
    tokens = prompts(config.vocab_size)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    uncached = np.asarray(reference(params, config, jnp.asarray(tokens)))
    run = PagedRun(params, config, len(tokens), np.random.default_rng(1), fill=np.nan)
    paged = run.run({row: list(map(int, seq)) for row, seq in enumerate(tokens)})
    paged = np.stack([[paged[row, pos] for pos in range(PROMPT_LEN)] for row in range(2)])
    diffs = (np.abs(uncached - expected).max(), np.abs(paged - expected).max())
    print(f"\n{name}: max |logits - HF| forward_no_cache {diffs[0]:.2e}, paged {diffs[1]:.2e}")
    assert max(diffs) < 1e-4


def test_hf_mistral_applies_the_window():
    """Guards the Mistral comparison: HF's eager path must really mask beyond the window."""
    windowed, full = hf_model("mistral"), hf_model("mistral", sliding_window=None)
    tokens = torch.from_numpy(prompts(COMMON["vocab_size"])).long()
    with torch.no_grad():
        diff = (windowed(tokens).logits - full(tokens).logits).abs().amax(dim=(0, 2))
    assert diff[:WINDOW].max() < 1e-5 and diff[WINDOW:].min() > 1e-3


def test_greedy_continuation_matches_hf(checkpoint):
    _, model, config, params, _ = checkpoint
    tokens = prompts(config.vocab_size)
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(tokens).long(), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False,
                                  attention_mask=torch.ones(tokens.shape, dtype=torch.long))
    expected = expected[:, PROMPT_LEN:].numpy()

    run = PagedRun(params, config, len(tokens), np.random.default_rng(2))
    logits = run.run({row: list(map(int, seq)) for row, seq in enumerate(tokens)})
    last = [logits[row, PROMPT_LEN - 1] for row in range(2)]
    generated = []
    for step in range(NEW_TOKENS):
        next_tokens = [int(np.argmax(row_logits)) for row_logits in last]
        generated.append(next_tokens)
        if step < NEW_TOKENS - 1:
            logits = run.run({row: [tok] for row, tok in enumerate(next_tokens)}, decode=True)
            last = [logits[row, PROMPT_LEN + step] for row in range(2)]
    np.testing.assert_array_equal(np.array(generated).T, expected)


def test_single_file_and_sharded_load_agree(checkpoint, tmp_path):
    name, model, config, params, _ = checkpoint
    if name != "llama":
        pytest.skip("one architecture is enough")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    single_config, single = load_hf(str(tmp_path), dtype=jnp.float32)
    assert single_config == config
    jax.tree.map(np.testing.assert_array_equal, single, params)
