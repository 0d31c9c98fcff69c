"""The engine's host path: outputs only for streamed or finished requests, and a
tokenizer that fails to decode fails the generate cleanly."""

import jax
import numpy as np
import pytest

from jpaged.engine.engine import LLM
from jpaged.host.sampling_params import SamplingParams
from jpaged.models import Model, init_params, tiny_config

CONFIG = tiny_config(num_layers=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0)))


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in lengths]


def check_all_free(engine):
    bm = engine.scheduler.block_manager
    engine.scheduler.check()
    assert not engine.has_unfinished_requests() and not engine.scheduler.seqs
    assert bm.num_free_pages == bm.num_pages - 1 and not any(bm.ref_counts)


def test_unstreamed_requests_report_only_when_finished(model):
    engine = LLM(model, page_size=4, num_pages=32).engine
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    quiet = engine.add_request(prompts(6, [4])[0], params, stream=False)
    loud = engine.add_request(prompts(7, [6])[0], params)
    reported = {quiet: [], loud: []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            reported[output.request_id].append(output.finished)
    assert reported[quiet] == [True] and reported[loud] == [False] * 4 + [True]
    check_all_free(engine)


def test_a_tokenizer_that_raises_fails_the_generate_cleanly(model):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(CONFIG.vocab_size)},
                                       unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece(prefix="##")

    class Broken:
        def __getattr__(self, name):
            return getattr(words, name)

        def decode_batch(self, *args, **kwargs):
            raise RuntimeError("boom")

    llm = LLM(Model(CONFIG, model.params, tokenizer=Broken()), page_size=4, num_pages=32)
    with pytest.raises(ValueError, match="tokenizer failed to decode"):
        llm.generate(prompts(5, [4, 6]), SamplingParams(max_tokens=4, temperature=0.0),
                     use_tqdm=False)
    check_all_free(llm.engine)
