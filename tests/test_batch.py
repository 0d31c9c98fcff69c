"""The batch builder (plan -> StepBatch), the shared shape arithmetic, and the generic
broadcast of a batch: a field added to StepBatch travels without other changes."""

import dataclasses

import jax
import numpy as np

from jpaged.parallel import distributed
from jpaged.engine.batch import SamplingRow, StepBatch
from jpaged.engine.sampler import _pad_histories
from jpaged.engine.sampling_rows import TokenHistories
from jpaged.host.sampling_params import SamplingParams
from jpaged.host.scheduler import PageMoves
from jpaged.core.shapes import bucket, cdiv, check_positive, flat_layout
from test_scheduler import builder, make

import pytest


def test_step_arrays_for_a_mixed_step():
    sched = make(page_size=4, max_num_batched_tokens=8)
    sched.add_request("a", [11, 12, 13], 5)
    sched.update(sched.schedule(), [14])
    sched.add_request("b", list(range(20, 30)), 5)
    out = sched.schedule()                   # a decodes, b gets a 7-token chunk
    batch = builder(sched, min_token_bucket=4, min_seq_bucket=2).build(out)
    a, b = out.seqs
    assert out.num_new_tokens == [1, 7] and out.start_positions == [3, 0] and not out.is_decode
    assert batch.token_ids.tolist() == [14] + list(range(20, 27))
    assert batch.positions.tolist() == [3, 0, 1, 2, 3, 4, 5, 6]
    assert batch.q_seq.tolist() == [0] + [1] * 7
    ta, tb = a.block_table, b.block_table
    assert batch.slot_mapping.tolist() == ([ta[0] * 4 + 3]
                                           + [tb[p // 4] * 4 + p % 4 for p in range(7)])
    assert batch.block_tables.shape == (2, 4) and batch.block_tables[1].tolist() == tb + [0]
    assert batch.context_lens.tolist() == [4, 7] and batch.logits_indices.tolist() == [0, 7]
    assert out.sample == [True, False]
    assert all(x.dtype == np.int32 for x in (batch.token_ids, batch.positions,
                                            batch.slot_mapping, batch.q_seq,
                                            batch.block_tables, batch.context_lens,
                                            batch.logits_indices))


def test_decode_step_pads_tokens_like_rows():
    sched = make()
    for i in range(3):
        sched.add_request(f"r{i}", [i + 1], 4)
    out = sched.schedule()                   # three one-token prompts: a decode-shaped step
    batch = builder(sched, min_seq_bucket=4).build(out)
    assert out.is_decode and batch.is_decode
    assert len(batch.token_ids) == len(batch.context_lens) == 4
    assert batch.slot_mapping[3] == 0 and batch.context_lens[3] == 0 and len(out.sample) == 3


def test_empty_step_arrays():
    sched = make()
    batch = builder(sched).build(sched.schedule())
    assert not batch.slot_mapping.any() and not batch.context_lens.any()


def test_extra_sampling_rows_share_their_rows_logits():
    sched = make()
    sched.add_request("a", [1, 2, 3], 4)
    sched.add_request("b", [4, 5], 4)
    out = sched.schedule()
    a, b = out.seqs
    p = SamplingParams(temperature=1.0, seed=3)
    rows = [SamplingRow(0, p, 11, a), SamplingRow(1, p, 12, b), SamplingRow(1, p, 13, b)]
    batch = builder(sched).build(out, rows, num_top=4)
    # Two rows padded to 2, then the extra row (row 1's logits), padded to a bucket.
    assert batch.logits_indices.tolist() == [2, 4, 4, 0]
    assert batch.sampling.seed.tolist() == [11, 12, 13, 0]
    assert batch.sampling.temperature.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert batch.num_top == 4


def test_histories_only_when_a_penalty_reads_them():
    sched = make()
    sched.add_request("a", [1, 2, 3], 4)
    out = sched.schedule()
    (a,) = out.seqs
    plain = builder(sched).build(out, [SamplingRow(0, SamplingParams(), 0, a)])
    assert plain.sampling.prompt_tokens.shape[1] == plain.sampling.output_tokens.shape[1] == 0
    penalized = builder(sched).build(
        out, [SamplingRow(0, SamplingParams(repetition_penalty=1.5), 0, a)])
    assert penalized.sampling.prompt_tokens[0, :4].tolist() == [1, 2, 3, -1]


def test_every_batch_field_travels_through_the_broadcast():
    """What multi-process sends is the flattened pytree: every field of StepBatch (and of
    its sampling tensors), static ones included, comes back equal, so a new field is
    written only in jpaged/engine/batch.py (the dataclass and BatchBuilder.build)."""
    sched = make()
    sched.add_request("a", [1, 2, 3, 4, 5], 4)
    out = sched.schedule()
    batch = builder(sched).build(out, num_top=2)
    moves = PageMoves(*(np.arange(2 * k, dtype=np.int32).reshape(k, 2) for k in (0, 1, 3)))
    got_moves, got = distributed.broadcast((moves, batch))   # one process: sends to itself
    assert isinstance(got, StepBatch) and got.num_top == 2 and got.is_decode == batch.is_decode
    for field in dataclasses.fields(StepBatch):
        want, have = getattr(batch, field.name), getattr(got, field.name)
        if field.metadata.get("static"):
            assert want == have
            continue
        for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(have), strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    for x, y in zip(moves, got_moves, strict=True):
        np.testing.assert_array_equal(x, y)
    assert distributed.broadcast(None) is None


def test_buckets_are_powers_of_two_within_bounds():
    assert [bucket(n, 8, 64) for n in (0, 1, 8, 9, 33, 64)] == [8, 8, 8, 16, 64, 64]
    assert bucket(70, 8, 100) == 100 and bucket(3, 8, 4) == 8
    assert bucket(3000, 8) == 4096 and bucket(0, 0) == 1   # no upper limit


def test_cdiv_and_flat_layout():
    assert [cdiv(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    np.testing.assert_array_equal(cdiv(np.array([3, 8]), 4), [1, 2])
    tables = np.array([[5, 6], [7, 0]], np.int32)
    rows, positions, slots = flat_layout([3, 0], [2, 1], tables, 4)
    assert rows.tolist() == [0, 0, 1] and positions.tolist() == [3, 4, 0]
    assert slots.tolist() == [5 * 4 + 3, 6 * 4 + 0, 7 * 4]


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "4", None])
def test_check_positive_names_the_value(value):
    with pytest.raises(ValueError, match=f"size must be a positive integer, got {value!r}"):
        check_positive(size=value)
    check_positive(size=np.int64(3))


@pytest.mark.parametrize("seed", range(3))
def test_persistent_sampling_columns_equal_a_rebuild_on_random_joins_and_leaves(seed):
    """Requests join, run, finish, are aborted and preempted at random (a small pool, swap
    and recompute); every step's sampling tensors from the persistent columns equal the
    ones rebuilt from the params, row for row, padding included, the penalties' token
    histories too. Token rules (bias entries) ride along. Some steps fail after their
    batch is built and are undone (the histories are not told)."""
    rng = np.random.default_rng(seed)
    sched = make(num_pages=24, num_host_pages=8, max_num_seqs=6,
                 preemption_mode=["recompute", "swap"][seed % 2])
    fast, slow = builder(sched), builder(sched)
    slow.persistent = False
    params, seeds, next_id, persistent_steps, penalty_steps = {}, {}, 0, 0, 0
    for step in range(60):
        for _ in range(rng.integers(0, 3)):
            rid = f"r{next_id}"
            next_id += 1
            params[rid] = SamplingParams(
                temperature=float(rng.choice([0.0, 0.7, 1.3])), top_k=int(rng.choice([-1, 5])),
                top_p=float(rng.choice([1.0, 0.9])), min_p=float(rng.choice([0.0, 0.1])),
                repetition_penalty=float(rng.choice([1.0] * 5 + [1.2])),
                presence_penalty=float(rng.choice([0.0] * 5 + [0.5])),
                frequency_penalty=float(rng.choice([0.0] * 5 + [-0.3])),
                max_tokens=int(rng.integers(1, 12)))
            seeds[rid] = int(rng.integers(0, 2**40))
            sched.add_request(rid, rng.integers(1, 90, rng.integers(1, 14)).tolist(),
                              params[rid].max_tokens)
        out = sched.schedule()
        rows = [SamplingRow(i, params[s.request_id], seeds[s.request_id] + len(s.seq_id), s,
                            [(int(rng.integers(0, 90)), 1.5)] if rng.random() < 0.2 else None)
                for i, s in enumerate(out.seqs)]
        got, want = fast.build(out, rows).sampling, slow.build(out, rows).sampling
        for name, value in dataclasses.asdict(want).items():
            np.testing.assert_array_equal(getattr(got, name), value, err_msg=name)
        persistent_steps += fast.columns is not None
        penalty_steps += any(r.params.uses_penalties for r in rows)
        if rng.random() < 0.15:   # the step fails after its tokens are appended
            sched.begin()
            sched.update(out, rng.integers(1, 90, len(out.seqs)))
            sched.roll_back()
            continue
        sched.update(out, rng.integers(1, 90, len(out.seqs)))
        live = list(sched.requests)
        if live and rng.random() < 0.2:
            sched.abort(live[rng.integers(len(live))])
    assert persistent_steps > 20 and penalty_steps > 10 and next_id > 30


class _Seq:
    def __init__(self, tokens, num_prompt):
        self.token_ids, self.num_prompt_tokens = tokens, num_prompt


@pytest.mark.parametrize("seed", range(2))
def test_token_histories_follow_owners_appends_and_undos(seed):
    """Random owners, appended tokens (a few, or many at once: capacity grows) and undone
    tokens on 5 mirror rows; each step's arrays equal the histories padded from scratch
    (``SamplingTensors``' own padding), the padding row all -1. An undo takes back
    tokens no batch has read (as in the engine), or any tokens followed by ``forget``
    (the engine's undo)."""
    rng = np.random.default_rng(seed)
    histories, seqs, seen = TokenHistories(5), [None] * 5, [0] * 5
    for _ in range(150):
        slot = int(rng.integers(5))
        seq, action = seqs[slot], rng.random()
        if seq is None or action < 0.1:   # a new owner
            prompt = rng.integers(0, 50, rng.integers(1, 40)).tolist()
            seqs[slot], seen[slot] = _Seq(prompt, len(prompt)), len(prompt)
        elif action < 0.25 and len(seq.token_ids) > seq.num_prompt_tokens:   # an undo
            anything, length = rng.random() < 0.5, len(seq.token_ids)
            lowest = seq.num_prompt_tokens if anything else seen[slot]
            if lowest < length:
                del seq.token_ids[int(rng.integers(lowest, length)):]
            if anything:   # other tokens, past the old length: only `forget` can tell
                histories.forget()
                seq.token_ids += rng.integers(50, 90, length + 1 - len(seq.token_ids)).tolist()
        else:
            seq.token_ids += rng.integers(0, 50, 1 if action < 0.9 else 70).tolist()
        rows = [i for i in range(5) if seqs[i] is not None and rng.random() < 0.8]
        live = [seqs[i] for i in rows]
        for i in rows:
            seen[i] = len(seqs[i].token_ids)
        prompt, output = histories.arrays(rows, live, 5, 8)
        want_prompt = _pad_histories([s.token_ids[:s.num_prompt_tokens] for s in live]
                                     + [[]] * (8 - len(rows)), 8, 8, None, "prompt_tokens")
        want_output = _pad_histories([s.token_ids[s.num_prompt_tokens:] for s in live]
                                     + [[]] * (8 - len(rows)), 8, 8, None, "output_tokens")
        np.testing.assert_array_equal(prompt, want_prompt)
        np.testing.assert_array_equal(output, want_output)
