"""The paged forward equals recomputing without a cache; loading, orbax, bad checkpoints."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_checkpoint import hf_config_dict, hf_tensors, write_checkpoint
from jpaged.core.attention import AttentionMetadata
from jpaged.core.cache import KVCache, PageTable, slots_for
from jpaged.models import (ModelConfig, RopeScaling, forward, forward_no_cache, init_params, load_hf,
                    load_model, load_tokenizer, restore_params, save_params, tiny_config)
from jpaged.models.llama import param_shapes

PAGE_SIZE = 4
NUM_PAGES = 40
WIDTH = 8  # pages per table row: 32 tokens per sequence at most
PAD_TO = 32  # prefill steps are padded to one token count, so they compile once
REF_LEN = 20  # forward_no_cache inputs are right-padded to one shape, so it compiles once

CONFIG = tiny_config(num_layers=2)
step = jax.jit(forward, static_argnums=1)
reference = jax.jit(forward_no_cache, static_argnums=1)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


class PagedRun:
    """Drives ``forward`` step by step like the engine: pages 1..P-1 handed out in a random
    order, one page-table row per sequence, the step's tokens flattened and padded."""

    def __init__(self, params, config, num_seqs, rng, fill=0.0):
        self.params, self.config = params, config
        shape = (config.num_layers, config.num_kv_heads, NUM_PAGES, PAGE_SIZE, config.head_dim)
        self.cache = KVCache(k=jnp.full(shape, fill), v=jnp.full(shape, fill))
        self.free = [int(p) for p in rng.permutation(np.arange(1, NUM_PAGES))]
        self.pages = [[] for _ in range(num_seqs)]
        self.lengths = [0] * num_seqs

    def run(self, chunks: dict[int, list[int]], decode=False):
        """chunks: row -> this step's tokens. Returns ``{(row, position): logits}``."""
        ids, slots, rows, positions = [], [], [], []
        for row, tokens in chunks.items():
            start, count = self.lengths[row], len(tokens)
            self.lengths[row] += count
            needed = -(-self.lengths[row] // PAGE_SIZE) - len(self.pages[row])
            self.pages[row] += [self.free.pop() for _ in range(needed)]
            ids += tokens
            slots += list(slots_for(self.pages[row], start, count, PAGE_SIZE))
            rows += [row] * count
            positions += range(start, start + count)
        real = len(ids)
        # Padding tokens write into the null page and read row 0; their logits are dropped.
        pad = 0 if decode else PAD_TO - real
        meta = AttentionMetadata(
            slot_mapping=jnp.asarray(slots + [0] * pad, jnp.int32),
            q_seq=jnp.asarray(rows + [0] * pad, jnp.int32),
            positions=jnp.asarray(positions + [0] * pad, jnp.int32),
            page_table=PageTable.from_lists(self.pages, self.lengths, width=WIDTH),
            is_decode=decode)
        logits, self.cache = step(self.params, self.config, self.cache,
                                  jnp.asarray(ids + [0] * pad, jnp.int32), meta,
                                  jnp.arange(real + pad, dtype=jnp.int32))
        return {(r, p): logits[i] for i, (r, p) in enumerate(zip(rows, positions))}


def random_sequences(rng, lengths, vocab):
    return [list(map(int, rng.integers(0, vocab, n))) for n in lengths]


def padded(sequences):
    """``int32[3, REF_LEN]``: right padding cannot change earlier positions of a causal model."""
    rows = [s + [0] * (REF_LEN - len(s)) for s in sequences]
    return jnp.asarray(rows + [[0] * REF_LEN] * (3 - len(rows)), jnp.int32)


def assert_matches_reference(params, config, sequences, outputs):
    """Every logit the paged run produced equals forward_no_cache at that position."""
    expected = np.asarray(reference(params, config, padded(sequences)))
    assert len(outputs) == sum(map(len, sequences))
    for (row, pos), logits in outputs.items():
        np.testing.assert_allclose(np.asarray(logits), expected[row, pos], rtol=1e-4, atol=1e-4,
                                   err_msg=f"sequence {row} position {pos}")


def test_one_prefill_of_several_prompts(params):
    rng = np.random.default_rng(1)
    prompts = random_sequences(rng, [5, 13, 8], CONFIG.vocab_size)
    run = PagedRun(params, CONFIG, len(prompts), rng)
    outputs = run.run(dict(enumerate(prompts)))
    assert_matches_reference(params, CONFIG, prompts, outputs)


@pytest.mark.parametrize("fill, window", [(0.0, None), (np.nan, None), (np.nan, 5)],
                         ids=["zeros", "nan-pages", "nan-pages-sliding-window"])
def test_chunked_prefill_then_decode(params, fill, window):
    """Random chunks over several calls, then decode steps; NaN in every slot nobody wrote
    (recycled pages, the null page) must not reach the logits."""
    config = dataclasses.replace(CONFIG, sliding_window=window)
    rng = np.random.default_rng(2)
    prompt_lengths, decode_steps = [11, 3, 16], 4
    sequences = random_sequences(rng, [n + decode_steps for n in prompt_lengths],
                                 config.vocab_size)
    run = PagedRun(params, config, len(sequences), rng, fill)
    done = [0] * len(sequences)
    outputs = {}
    while done != prompt_lengths:
        chunks = {}
        for row, length in enumerate(prompt_lengths):
            if done[row] < length and rng.random() < 0.8:
                count = min(int(rng.integers(1, 6)), length - done[row])
                chunks[row] = sequences[row][done[row]:done[row] + count]
                done[row] += count
        if chunks:
            outputs.update(run.run(chunks))
    for t in range(decode_steps):
        outputs.update(run.run({row: [seq[n + t]] for row, (seq, n)
                                in enumerate(zip(sequences, prompt_lengths))}, decode=True))
    assert_matches_reference(params, config, sequences, outputs)


def test_sliding_window_changes_logits(params):
    """The window is shorter than the prompt, so it must matter (the test above is not vacuous)."""
    tokens = padded(random_sequences(np.random.default_rng(3), [12], CONFIG.vocab_size))
    windowed = reference(params, dataclasses.replace(CONFIG, sliding_window=5), tokens)
    full = reference(params, CONFIG, tokens)
    np.testing.assert_allclose(windowed[:, :5], full[:, :5], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(windowed[:, 5:] - full[:, 5:])).max() > 1e-3


def lowered_lines(num_layers):
    config = tiny_config(num_layers=num_layers)
    params = param_shapes(config)
    shape = (num_layers, config.num_kv_heads, NUM_PAGES, PAGE_SIZE, config.head_dim)
    cache = KVCache(k=jax.ShapeDtypeStruct(shape, jnp.float32),
                    v=jax.ShapeDtypeStruct(shape, jnp.float32))
    tokens = jax.ShapeDtypeStruct((8,), jnp.int32)
    table = PageTable(jax.ShapeDtypeStruct((2, WIDTH), jnp.int32),
                      jax.ShapeDtypeStruct((2,), jnp.int32))
    meta = AttentionMetadata(tokens, tokens, tokens, table)
    lowered = step.lower(params, config, cache, tokens, meta, jax.ShapeDtypeStruct((2,), jnp.int32))
    return len(lowered.as_text().splitlines())


def test_program_size_does_not_grow_with_depth():
    assert lowered_lines(2) == lowered_lines(8)


def test_forward_rejects_a_cache_of_another_model(params):
    cache = KVCache.create(CONFIG.num_layers + 1, CONFIG.num_kv_heads, CONFIG.head_dim,
                           PAGE_SIZE, 2)
    tokens = jnp.zeros((1,), jnp.int32)
    meta = AttentionMetadata(tokens, tokens, tokens, PageTable.from_lists([[1]], [1]))
    with pytest.raises(ValueError, match=r"\(3, 2, 32\).*\(2, 2, 32\)"):
        forward(params, CONFIG, cache, tokens, meta, tokens)


def test_orbax_round_trip(params, tmp_path):
    save_params(tmp_path / "ckpt", params)
    tokens = padded(random_sequences(np.random.default_rng(4), [7, 7], CONFIG.vocab_size))
    expected = np.asarray(reference(params, CONFIG, tokens))
    for like in (None, params):
        restored = restore_params(tmp_path / "ckpt", like=like)
        assert jax.tree.structure(restored) == jax.tree.structure(params)
        np.testing.assert_array_equal(np.asarray(reference(restored, CONFIG, tokens)), expected)


def test_load_hf_maps_every_tensor(params, tmp_path):
    write_checkpoint(tmp_path, CONFIG, hf_tensors(CONFIG, params))
    placed = []

    def place(name, array):
        placed.append(name)
        return jax.device_put(array)

    config, loaded = load_hf(str(tmp_path), dtype=jnp.float32, place=place)
    assert config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    assert "layers/self_attn/q_proj/kernel" in placed
    assert len(placed) == len(jax.tree.leaves(params))
    _, bf16 = load_hf(str(tmp_path), dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_load_hf_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))


def test_load_hf_unsupported_architecture(tmp_path):
    write_checkpoint(tmp_path, CONFIG, {},
                     {**hf_config_dict(CONFIG), "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_hf(str(tmp_path))


def test_load_hf_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(str(tmp_path))


def test_load_hf_missing_tensor(params, tmp_path):
    tensors = hf_tensors(CONFIG, params)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_checkpoint(tmp_path, CONFIG, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*"
                                         r"model\.safetensors"):
        load_hf(str(tmp_path))


def test_load_hf_misshaped_tensor(params, tmp_path):
    tensors = hf_tensors(CONFIG, params)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, CONFIG.hidden_size),
                                                                 np.float32)
    write_checkpoint(tmp_path, CONFIG, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*"
                                         r"model\.safetensors.*\(3, 128\).*\(64, 128\)"):
        load_hf(str(tmp_path))


def test_load_hf_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_hf(str(tmp_path))


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4, "layer_types":
      ["full_attention", "sliding_attention"]}, "layer_types"),
])
def test_unsupported_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**hf_config_dict(CONFIG), **changes})


def test_transformers4_rope_layout():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = ModelConfig.from_hf({**hf_config_dict(CONFIG), "rope_theta": 500000.0,
                                  "rope_scaling": scaling})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("changes, window", [
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4}, 4),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": None}, None),
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4}, None),
    ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4, "use_sliding_window": True,
      "max_window_layers": 0}, 4),
])
def test_sliding_window_from_hf(changes, window):
    assert ModelConfig.from_hf({**hf_config_dict(CONFIG), **changes}).sliding_window == window


def write_tokenizer(directory):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1,
                                                                  "world": 2}, "[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))


def test_load_tokenizer(tmp_path):
    assert load_tokenizer(str(tmp_path)) is None
    write_tokenizer(tmp_path)
    assert load_tokenizer(str(tmp_path)).encode("hello world").ids == [1, 2]


def test_load_model(params, tmp_path):
    write_checkpoint(tmp_path, CONFIG, hf_tensors(CONFIG, params),
                     {**hf_config_dict(CONFIG), "eos_token_id": [2, 5]})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    write_tokenizer(tmp_path)
    model = load_model(str(tmp_path), dtype=jnp.float32)
    assert model.config == CONFIG and model.forward is forward
    assert model.eos_token_ids == (2, 5, 7)
    assert model.tokenizer.encode("hello").ids == [1]
    tiny = load_model("tiny")
    assert tiny.config == tiny_config() and tiny.tokenizer is None
    assert jax.tree.structure(tiny.params) == jax.tree.structure(param_shapes(tiny_config()))
