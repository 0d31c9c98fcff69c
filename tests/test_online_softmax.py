"""The online-softmax step both Mosaic kernels share, on its own: steps of keys folded in
one at a time give float64 softmax attention, in either orientation of the logits tile
(the ragged kernel's ``S [queries, keys]``, the decode tile's ``S^T [keys, queries]``), with
masked keys, a step whose keys are all masked, and a query that sees no key (output 0,
log-sum-exp -inf)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.pallas_kernels import online_softmax

QUERIES, STEPS, KEYS, D = 6, 4, 8, 16


def float64_attention(s, visible, v):
    """s, visible ``[Q, N]``; v ``[N, D]`` -> output ``[Q, D]`` (0 where no key) and
    log-sum-exp ``[Q]`` (-inf there)."""
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    seen = np.isfinite(m)
    p = np.where(visible, np.exp(s - np.where(seen, m, 0.0)), 0.0)
    total = p.sum(axis=1, keepdims=True)
    out = np.where(seen, p @ v / np.where(seen, total, 1.0), 0.0)
    lse = np.where(seen[:, 0], np.log(np.where(seen, total, 1.0))[:, 0] + m[:, 0], -np.inf)
    return out, lse


@pytest.mark.parametrize("key_axis", [1, 0], ids=["S-queries-by-keys", "ST-keys-by-queries"])
def test_steps_match_float64_softmax(key_axis):
    rng = np.random.default_rng(key_axis)
    s = rng.normal(size=(QUERIES, STEPS * KEYS)) * 4.0
    v = rng.normal(size=(STEPS * KEYS, D))
    visible = rng.random((QUERIES, STEPS * KEYS)) < 0.7
    visible[:, KEYS:2 * KEYS] = False      # a step with no visible key for any query
    visible[0] = False                     # a query that sees no key at all
    visible[1, :] = False
    visible[1, -1] = True                  # a query whose only key comes last
    query_axis = 1 - key_axis
    m = jnp.full((QUERIES,), -jnp.inf, jnp.float32)
    l = jnp.zeros((QUERIES,), jnp.float32)
    acc = jnp.zeros((QUERIES, D) if query_axis == 0 else (D, QUERIES), jnp.float32)
    for step in range(STEPS):
        keys = slice(step * KEYS, (step + 1) * KEYS)
        tile, mask = s[:, keys], visible[:, keys]
        if key_axis == 0:
            tile, mask = tile.T, mask.T
        probs, m, l, acc = online_softmax.step(
            online_softmax.logits(jnp.asarray(tile, jnp.float32), sm_scale=1.0,
                                  soft_cap=None),
            jnp.asarray(mask), m, l, acc, key_axis=key_axis)
        probs_qk = probs if key_axis == 1 else probs.T
        acc = acc + (probs_qk @ v[keys] if query_axis == 0 else (probs_qk @ v[keys]).T)
    out, lse = online_softmax.finish(acc, m, l, query_axis=query_axis)
    out = np.asarray(out if query_axis == 0 else out.T, np.float64)
    expected, expected_lse = float64_attention(s, visible, v)
    assert np.isfinite(out).all() and not out[0].any()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse, np.float64), expected_lse, rtol=1e-5)


def test_logits_scale_then_cap():
    s = jnp.asarray([-30.0, -1.0, 0.0, 2.0, 40.0])
    got = online_softmax.logits(s, sm_scale=0.5, soft_cap=5.0)
    np.testing.assert_allclose(got, 5.0 * np.tanh(0.5 * np.asarray(s) / 5.0), rtol=1e-6)
    np.testing.assert_allclose(online_softmax.logits(s, sm_scale=0.5, soft_cap=None),
                               0.5 * np.asarray(s))
