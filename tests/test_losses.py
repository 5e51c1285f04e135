"""The losses against torch.nn.functional: values and gradients for every reduction, and misuse."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

from rnnfast import losses

REDUCTIONS = ["mean", "sum", "none"]


def _torch_grad(fn, x, reduction):
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x).requires_grad_()
    out = fn(torch, xt)
    (out.sum() if reduction == "none" else out).backward()
    return out.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_matches_torch(reduction):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    loss, dx = losses.mse_loss(x, y, reduction)
    ref, dref = _torch_grad(
        lambda t, xt: t.nn.functional.mse_loss(xt, t.from_numpy(y), reduction=reduction), x,
        reduction)  # fmt: skip
    assert_close(np.asarray(loss), ref, 1e-12, 1e-12, "loss")
    assert_close(dx, dref, 1e-12, 1e-12, "dx")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_binary_cross_entropy_matches_torch(reduction, weighted):
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, (3, 4))
    p[0, 0], p[0, 1] = 0.0, 1.0  # the clamped logs
    y = rng.integers(0, 2, (3, 4)).astype(np.float64)
    y[0, 0], y[0, 1] = 1.0, 0.0
    w = rng.uniform(0.5, 2, (4,)) if weighted else None
    loss, dp = losses.binary_cross_entropy(p, y, w, reduction)
    ref, dref = _torch_grad(
        lambda t, pt: t.nn.functional.binary_cross_entropy(
            pt, t.from_numpy(y), None if w is None else t.from_numpy(w), reduction=reduction),
        p, reduction)  # fmt: skip
    assert_close(np.asarray(loss), ref, 1e-12, 1e-12, "loss")
    assert_close(dp, dref, 1e-9, 1e-9, "dprobs")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pos_weight", [None, "per class"])
def test_bce_with_logits_matches_torch(reduction, pos_weight):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3)) * 4
    x[0] = [60.0, -60.0, 0.0]  # far out on both sides: stable
    y = rng.uniform(0, 1, (5, 3))
    w = rng.uniform(0.5, 2, (5, 1))
    pw = None if pos_weight is None else rng.uniform(0.5, 3, 3)
    loss, dx = losses.binary_cross_entropy_with_logits(x, y, w, pw, reduction)
    ref, dref = _torch_grad(
        lambda t, xt: t.nn.functional.binary_cross_entropy_with_logits(
            xt, t.from_numpy(y), t.from_numpy(w), reduction=reduction,
            pos_weight=None if pw is None else t.from_numpy(pw)), x, reduction)  # fmt: skip
    assert_close(np.asarray(loss), ref, 1e-12, 1e-12, "loss")
    assert_close(dx, dref, 1e-12, 1e-12, "dlogits")
    assert np.isfinite(dx).all()


def test_float32_in_float32_out_and_empty_mean_is_nan():
    x = np.zeros((2, 3), np.float32)
    _, d = losses.mse_loss(x, x)
    assert d.dtype == np.float32
    loss, d = losses.mse_loss(np.zeros((0, 3)), np.zeros((0, 3)))
    assert np.isnan(loss) and d.shape == (0, 3)


def test_losses_misuse():
    with pytest.raises(ValueError, match=r"target has shape \(3,\), the input \(2,\)"):
        losses.mse_loss(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="probabilities in"):
        losses.binary_cross_entropy(np.array([0.5, 1.5]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="probabilities in"):
        losses.binary_cross_entropy(np.array([np.nan]), np.array([0.0]))
    with pytest.raises(TypeError, match="floating point"):
        losses.binary_cross_entropy_with_logits(np.array([1, 2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        losses.mse_loss(np.zeros(2), np.zeros(2), "average")
    with pytest.raises(ValueError, match="does not broadcast"):
        losses.binary_cross_entropy_with_logits(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match="pos_weight"):
        losses.binary_cross_entropy_with_logits(np.zeros((2, 3)), np.zeros((2, 3)),
                                                pos_weight=np.ones(2))  # fmt: skip
