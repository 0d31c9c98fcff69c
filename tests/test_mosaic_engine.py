"""A tiny model generating greedily with the Mosaic GPU kernel (interpret mode on CPU) gives
the XLA path's tokens, through decode_loop (default run) and the engine (``-m slow``: about
a minute of interpret-mode compiles, one per batch bucket)."""

import jax
import numpy as np
import pytest

from jpaged import models
from jpaged.decode_loop import decode_loop, prepare
from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams

# head_dim 32, 4 query heads over 2 kv heads; pages of 16 tokens (the kernel takes >= 8).
CONFIG = models.tiny_config(num_layers=2, max_position_embeddings=128)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return models.Model(CONFIG, models.init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in (5, 23)]


@pytest.mark.slow
def test_engine_mosaic_matches_xla(model, prompts):
    """Chunks of 16 tokens: the 23-token prompt's second chunk starts mid-page."""
    outputs = {}
    for impl in ("xla", "mosaic"):
        llm = LLM(model, page_size=16, num_pages=16, max_num_seqs=2, max_model_len=64,
                  max_num_batched_tokens=16, attention_impl=impl)
        outputs[impl] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert outputs["mosaic"] == outputs["xla"]


def test_decode_loop_mosaic_matches_xla(model, prompts):
    tokens = {}
    for impl in ("xla", "mosaic"):
        cache, table, first = prepare(model, prompts, num_steps=3, page_size=16, num_pages=8,
                                      chunk_size=16, attention_impl=impl)
        out = decode_loop(model, model.params, cache, table, first, num_steps=3,
                          attention_impl=impl)
        tokens[impl] = (np.asarray(first).tolist(), np.asarray(out.tokens).tolist())
    assert tokens["mosaic"] == tokens["xla"]


def test_unknown_attention_impl_is_refused(model):
    with pytest.raises(ValueError, match="impl='flash'"):
        LLM(model, page_size=16, num_pages=8, attention_impl="flash")
