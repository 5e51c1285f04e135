"""rnnfast.layers.Attention: every score against central finite differences (float64), against
the same computation written with torch ops (autograd), exact zeros at padded positions, the
single-step and all-steps forms agreeing, and misuse."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, assert_grad_matches_differences

import rnnfast

SCORES = rnnfast.Attention.SCORES
S, T, N = 3, 5, 4


def _setup(score, seed=0, Q=6, K=6):
    rng = np.random.default_rng(seed)
    attn = rnnfast.Attention(Q, K, score, attn_size=7, dtype=np.float64, seed=seed)
    q = rng.standard_normal((S, N, Q))
    k = rng.standard_normal((T, N, K))
    k[4, 1] = np.nan  # padding: never read
    lengths = np.array([5, 4, 1, 3])
    return attn, q, k, lengths, rng


def _loss(attn, q, k, lengths, wc, ww):
    c, a = attn(q, k, lengths)
    return float((c * wc).sum() + (a * ww).sum())


@pytest.mark.parametrize("score", SCORES)
def test_gradients_match_finite_differences(score):
    attn, q, k, lengths, rng = _setup(score, Q=6 if score in ("dot", "scaled_dot") else 4)
    wc = rng.standard_normal((S, N, k.shape[2]))
    ww = rng.standard_normal((S, N, T))
    c, a = attn(q, k, lengths)
    attn.zero_grad()
    dq, dk = attn.backward(wc, ww)
    assert np.isfinite(c).all() and not dk[4, 1].any() and not dk[1:, 2].any()
    assert (a[:, 2, 1:] == 0).all() and (a[:, 1, 4] == 0).all()
    k_clean = np.where(np.isnan(k), 0.0, k)
    for name, arr, grad in [("q", q, dq), ("k", k_clean, dk)] + [
            (n, attn.params[n], attn.grads[n]) for n in attn.params]:  # fmt: skip
        assert_grad_matches_differences(lambda: _loss(attn, q, k_clean, lengths, wc, ww), arr,
                                        grad, name, samples=15)  # fmt: skip


@pytest.mark.parametrize("score", SCORES)
def test_matches_torch(score):
    torch = pytest.importorskip("torch")
    attn, q, k, lengths, rng = _setup(score)
    k = np.where(np.isnan(k), 0.0, k)
    wc = rng.standard_normal((S, N, 6))
    c, a = attn(q, k, lengths)
    dq, dk = attn.backward(wc)
    qt, kt = (torch.from_numpy(x.copy()).requires_grad_() for x in (q, k))
    params = {n: torch.from_numpy(v.copy()).requires_grad_() for n, v in attn.params.items()}
    qb, kb = qt.transpose(0, 1), kt.transpose(0, 1)  # (N, S, Q), (N, T, K)
    if score in ("dot", "scaled_dot"):
        e = qb @ kb.transpose(1, 2)
        if score == "scaled_dot":
            e = e / np.sqrt(6)
    elif score == "bilinear":
        e = qb @ params["weight"] @ kb.transpose(1, 2)
    else:  # v^T tanh(W [q; k]) over every (step, position) pair, written out
        pairs = torch.cat([qb[:, :, None].expand(-1, -1, T, -1),
                           kb[:, None].expand(-1, S, -1, -1)], dim=-1)  # fmt: skip
        e = torch.tanh(pairs @ params["weight"].T) @ params["v"]
    mask = torch.arange(T)[None, :] < torch.from_numpy(lengths)[:, None]
    at = torch.softmax(e.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    ct = (at @ kb).transpose(0, 1)
    (ct * torch.from_numpy(wc)).sum().backward()
    assert_close(c, ct.detach().numpy(), 1e-12, 1e-12, "context")
    assert_close(a, at.transpose(0, 1).detach().numpy(), 1e-12, 1e-12, "weights")
    assert_close(dq, qt.grad.numpy(), 1e-11, 1e-12, "dquery")
    assert_close(dk, kt.grad.numpy(), 1e-11, 1e-12, "dkeys")
    for n, p in params.items():
        assert_close(attn.grads[n], p.grad.numpy(), 1e-11, 1e-12, n)


def test_one_step_is_a_slice_of_all_steps():
    attn, q, k, lengths, _ = _setup("bilinear")
    c, a = attn(q, k, lengths)
    c1, a1 = attn(q[1], k, lengths)
    assert c1.shape == (N, 6) and a1.shape == (N, T)
    # a few ulps: NumPy's BLAS may sum one query's products in another order than a batch's
    # (AVX-512 kernels on AMD Zen 5 differ in the last bit)
    assert_close(c1, c[1], 1e-14, 0, "context")
    dq, dk = attn.backward(np.ones((N, 6)))
    assert dq.shape == (N, 6) and dk.shape == k.shape


def test_misuse():
    attn = rnnfast.Attention(4, 6, "bilinear")
    q, k = np.zeros((2, 4), np.float32), np.zeros((3, 2, 6), np.float32)
    with pytest.raises(ValueError, match="query_size == key_size"):
        rnnfast.Attention(4, 6, "dot")
    with pytest.raises(ValueError, match="score must be one of"):
        rnnfast.Attention(4, 6, "cosine")
    with pytest.raises(ValueError, match=r"keys must be \(T, N, 6\)"):
        attn(q, np.zeros((3, 2, 5), np.float32))
    with pytest.raises(ValueError, match="query must be"):
        attn(np.zeros((3, 4), np.float32), k)
    with pytest.raises(ValueError, match="lengths >= 1"):
        attn(q, k, [3, 0])
    with pytest.raises(RuntimeError, match="training-mode forward not yet backpropagated"):
        attn.eval()(q, k)
        attn.backward(np.zeros((2, 6), np.float32))


@pytest.mark.parametrize("score", SCORES)
def test_calls_are_backpropagated_latest_first(score):
    # a decoder with input feeding attends once a step and backpropagates its steps in reverse
    rng = np.random.default_rng(4)
    attn = rnnfast.Attention(6, 6, score, dtype=np.float64, seed=1)
    keys = rng.standard_normal((5, 3, 6))
    queries = rng.standard_normal((3, 3, 6))
    dcs = rng.standard_normal((3, 3, 6))
    one_by_one = []
    for q, dc in zip(queries, dcs, strict=True):
        attn.zero_grad()
        attn(q, keys, [5, 2, 4])
        one_by_one.append((*attn.backward(dc), {k: v.copy() for k, v in attn.grads.items()}))
    attn.zero_grad()
    for q in queries:
        attn(q, keys, [5, 2, 4])
    for t in reversed(range(3)):
        dq, dk = attn.backward(dcs[t])
        np.testing.assert_array_equal(dq, one_by_one[t][0])
        np.testing.assert_array_equal(dk, one_by_one[t][1])
    for name, g in attn.grads.items():
        np.testing.assert_allclose(g, sum(o[2][name] for o in one_by_one), rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="not yet backpropagated"):
        attn.backward(dcs[0])
    attn(queries[0], keys)
    attn.clear()
    with pytest.raises(RuntimeError, match="not yet backpropagated"):
        attn.backward(dcs[0])


@pytest.mark.parametrize("score", SCORES)
def test_prepared_keys_give_the_same_steps(score):
    """A step loop over attn.prepare(keys, lengths) computes what passing keys and lengths at
    every step computes, forward and backward, bit for bit."""
    attn, q, k, lengths, rng = _setup(score)
    dc = rng.standard_normal((S, N, attn.key_size))
    prepared = attn.prepare(k, lengths)
    results = []
    for per_step in (lambda s: attn(q[s], k, lengths), lambda s: attn(q[s], prepared)):
        attn.zero_grad()
        outs = [per_step(s) for s in range(S)]
        backs = [attn.backward(dc[s]) for s in reversed(range(S))]
        results.append((outs, backs, {n: g.copy() for n, g in attn.grads.items()}))
    (o1, b1, g1), (o2, b2, g2) = results
    for x, y in zip(o1 + b1, o2 + b2, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)
    for n in g1:
        np.testing.assert_array_equal(g1[n], g2[n])


def test_prepared_keys_errors():
    attn, q, k, lengths, _ = _setup("bilinear")
    prepared = attn.prepare(k, lengths)
    with pytest.raises(ValueError, match="pass lengths to prepare"):
        attn(q[0], prepared, lengths)
    other = rnnfast.Attention(6, 6, "bilinear", dtype=np.float32)
    with pytest.raises(ValueError, match="prepared for float64 keys of size 6"):
        other(q[0].astype(np.float32), prepared)
    with pytest.raises(ValueError, match="lengths >= 1"):
        attn.prepare(k, np.array([5, 0, 1, 3]))
    with pytest.raises(ValueError, match="T = 0"):
        attn.prepare(k[:0])
