"""Incremental detokenization and stop strings against full decodes, on random token
streams, for tokenizers the tests train themselves: a byte-level BPE (GPT-2 / Llama 3
kind) and SentencePiece-style BPEs (Metaspace or Llama 2's Replace/Strip decoder, byte
fallback)."""

import json
import random

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from jpaged.host.detokenizer import DecodeState, Detokenizer
from jpaged.host.request import Stream
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.sequence import Sequence, SequenceStatus
from jpaged.host.stop import StopRules

CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Paged attention stores keys and values in fixed-size pages, each one indexed. ",
    "Ünïcödé wörds: naïve café, smörgåsbord, jalapeño; 東京 と 大阪, 한국어, emoji 🙂🚀! ",
    "  two spaces,\ttabs\tand\nnew lines\n\n  indented ",
] * 20
SPECIALS = ["<s>", "</s>"]


def _byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _sentencepiece(decoder: str):
    """A BPE over Metaspace pieces with the 256 ``<0xNN>`` byte-fallback tokens; its
    decoder is Metaspace's or Llama 2's (Replace, ByteFallback, Fuse, Strip)."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True))
    if decoder == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁",
                                                            prepend_scheme="always")])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, limit_alphabet=60))
    # Byte fallback needs the byte tokens in the vocabulary: append them.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


TOKENIZERS = {"byte_level": _byte_level, "metaspace": lambda: _sentencepiece("metaspace"),
              "llama2": lambda: _sentencepiece("llama2")}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _streams(tokenizer, rng: random.Random, count: int, length: int) -> list[list[int]]:
    """Token streams of three kinds: uniform over the whole vocabulary (specials and
    byte tokens included), encodings of random text (multi-byte characters, byte
    fallback, runs of spaces), and mixes of the two."""
    vocab = tokenizer.get_vocab_size()
    chars = "ab éü東京🙂🚀\n\t  x.,"
    streams = []
    for i in range(count):
        if i % 3 == 0:
            ids = [rng.randrange(vocab) for _ in range(length)]
        else:
            text = "".join(rng.choice(chars) for _ in range(length))
            ids = tokenizer.encode(text).ids[:length]
            if i % 3 == 2:
                ids = [t if rng.random() < 0.8 else rng.randrange(vocab) for t in ids]
        streams.append(ids)
    return streams


@pytest.mark.parametrize("max_window", [1, 8])
def test_text_is_a_full_decode_at_every_step(tokenizer, max_window):
    """Fed one or a few tokens at a time, in batches, each stream's text is at every step
    a prefix of the full decode of its tokens that lacks at most a held-back end, and
    equals the full decode once flushed. Windows stay short (``max_window=1`` moves
    them at every chance)."""
    rng = random.Random(max_window)
    detok = Detokenizer(tokenizer, max_window)
    streams = _streams(tokenizer, rng, 24, 60)
    states = [DecodeState() for _ in streams]
    fed = [0] * len(streams)
    longest_window = 0
    while any(f < len(s) for f, s in zip(fed, streams)):
        live = [i for i, s in enumerate(streams) if fed[i] < len(s)]
        chunks = []
        for i in live:
            take = rng.choice([1, 1, 1, 2, 3])
            chunks.append(streams[i][fed[i]:fed[i] + take])
            fed[i] += len(chunks[-1])
        for i, new in zip(live, detok.step([states[i] for i in live], chunks)):
            states[i].emit(new)
            full = tokenizer.decode(streams[i][:fed[i]])
            text = states[i].text
            assert full.startswith(text), (i, fed[i], text, full)
            held = full[len(text):]
            # Only an incomplete end is held back: what the tokens since the last emission
            # decode to.
            assert len(held) <= len(tokenizer.decode(states[i].window[states[i].read:])) + 2
            if i % 3 == 1:   # encoded text: a random stream may hold back long runs
                longest_window = max(longest_window, len(states[i].window))
    for state, ids in zip(states, streams):
        state.emit(detok.flush(state))
        assert state.text == tokenizer.decode(ids)
    assert longest_window <= detok.max_window + 12   # not growing with the 60 tokens


def test_stop_strings_cut_like_a_full_decode(tokenizer):
    """Streams stop where a stop string first appears in the full decode: the text is
    cut before it, whichever step completed it and however the tokens split it."""
    rng = random.Random(1)
    rules = StopRules([], tokenizer)
    for ids in _streams(tokenizer, rng, 30, 40):
        full = tokenizer.decode(ids)
        if len(full) < 4:
            continue
        at = rng.randrange(len(full) - 3)
        stop = [full[at:at + rng.choice([1, 2, 3])], "never-in-the-text-" * 3]
        params = SamplingParams(stop=stop[::rng.choice([1, -1])], max_tokens=len(ids) + 1)
        seq = Sequence("s", [1, 2], len(ids) + 1)
        stream = Stream(0, 0)
        for token in ids:
            seq.token_ids.append(token)
            if rules.check(params, seq, stream):
                break
        else:
            seq.status = SequenceStatus.FINISHED   # the length limit: flush the end
            assert not rules.check(params, seq, stream) or False
        text = tokenizer.decode(seq.output_token_ids)
        first = min(p for p in (text.find(s) for s in stop) if p >= 0) if any(
            s in text for s in stop) else -1
        if first >= 0:
            assert stream.current_text() == text[:first], (stop, text)
        else:
            assert stream.current_text() == text


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_as_decode_does(tokenizer, skip):
    detok = Detokenizer(tokenizer)
    eos = tokenizer.token_to_id("</s>")
    ids = tokenizer.encode("café 東京 ok").ids
    ids = ids[:2] + [eos] + ids[2:] + [eos]
    state = DecodeState(skip_special_tokens=skip)
    for t in ids:
        state.emit(detok.step([state], [[t]])[0])
    state.emit(detok.flush(state))
    assert state.text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("</s>" in state.text) == (not skip)


def test_stop_reason_and_include_stop_str_in_output(tokenizer):
    ids = tokenizer.encode("ab café ab").ids
    full = tokenizer.decode(ids)
    for include in (False, True):
        rules = StopRules([], tokenizer)
        params = SamplingParams(stop=["zz", "é"], include_stop_str_in_output=include)
        seq, stream = Sequence("s", [0], 20), Stream(0, 0)
        for t in ids:
            seq.token_ids.append(t)
            if rules.check(params, seq, stream):
                break
        end = full.index("é") + (1 if include else 0)
        assert stream.current_text() == full[:end] and stream.stop_reason == "é"


def test_a_stop_string_longer_than_the_output_never_matches(tokenizer):
    rules = StopRules([], tokenizer)
    ids = tokenizer.encode("ab").ids
    seq, stream = Sequence("s", [0], 10), Stream(0, 0)
    params = SamplingParams(stop=["ab" * 50])
    for t in ids:
        seq.token_ids.append(t)
        assert not rules.check(params, seq, stream)
    assert stream.current_text() == tokenizer.decode(ids)


def test_a_tokenizer_that_raises_gives_a_clear_error(tokenizer):
    class Broken:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def decode_batch(self, *args, **kwargs):
            raise RuntimeError("boom")

    rules = StopRules([], Broken())
    seq = Sequence("s", [0, 1], 10)
    seq.token_ids.append(2)
    with pytest.raises(ValueError, match="tokenizer failed to decode"):
        rules.check(SamplingParams(), seq, Stream(0, 0))


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        SamplingParams(stop=["ok", ""])


def test_no_token_decodes_to_more_characters_than_the_servers_bound(tokenizer):
    """`jpaged serve` refuses a text prompt longer than max_model_len x this bound
    characters without tokenizing it: the bound must hold for every token, alone and
    after another (a leading-space rule adds no character beyond the written one)."""
    from jpaged.serving.server import longest_token_chars

    bound = longest_token_chars(tokenizer)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    for token in range(size):
        assert len(tokenizer.decode([token], skip_special_tokens=False)) <= bound, token
        pair = tokenizer.decode([0, token], skip_special_tokens=False)
        assert len(pair) - len(tokenizer.decode([0], skip_special_tokens=False)) <= bound, token


def test_joined_pieces_restore_to_a_snapshot(monkeypatch):
    """Text pieces are joined into one string every ``JOIN_PIECES`` (here 3): a snapshot
    taken before a join still restores the text and its tail exactly (the join makes a
    new list; the snapshot keeps the old one), over random emits and undos."""
    from jpaged.host import detokenizer
    monkeypatch.setattr(detokenizer, "JOIN_PIECES", 3)
    rng = random.Random(0)
    state, text = DecodeState(keep=4), ""
    for _ in range(200):
        snapshot, before = state.snapshot(), text
        for _ in range(rng.randrange(1, 6)):
            piece = "".join(rng.choice("abcé ") for _ in range(rng.randrange(1, 4)))
            state.emit(piece)
            text += piece
        assert len(state._pieces) < 3 and state.text == text
        if rng.random() < 0.4:   # the step is undone
            state.restore(snapshot)
            text = before
        assert state.text == text and state.tail == text[-4:]
