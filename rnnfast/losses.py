"""Losses that return their own gradient: softmax cross-entropy over logits (..., V) with a mask
or ignore_index, mean squared error, binary cross-entropy (on probabilities or on logits), and
perplexity.

Each loss returns ``(loss, dinput)``, the gradient with respect to its first argument, so a
training step is ``loss, dlogits = softmax_cross_entropy(logits, targets)`` then
``head.backward(dlogits)``. ``reduction`` is torch's: "mean", "sum" or "none" (per element, with
the gradient of their sum).
"""

from __future__ import annotations

import math

import numpy as np

from . import _C

__all__ = [
    "log_softmax",
    "softmax",
    "softmax_cross_entropy",
    "mse_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "perplexity",
]


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(softmax(logits)) along ``axis``, computed stably (max subtracted first)."""
    logits = np.asarray(logits)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(logits: np.ndarray, axis: int = -1, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) along ``axis``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits) / temperature
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def softmax_cross_entropy(
    logits: np.ndarray,
    targets,
    mask=None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> tuple[float | np.ndarray, np.ndarray]:
    """Cross-entropy of integer ``targets`` under softmax(``logits``); returns (loss, dlogits).

    logits: (..., V) float, for example (T, N, V); targets: integers of shape logits.shape[:-1].
    mask: optional bool or float weights of that shape (False / 0 drops a position, as padding);
    ignore_index: targets equal to it are dropped (torch's ignore_index, default none here).
    reduction: "mean" (over the kept positions, weighted by mask: torch's mean), "sum" or "none"
    (per-position losses). dlogits is the gradient of the returned loss (of the sum for "none"),
    with the dtype of logits; dropped positions get zero. With no kept position the "mean" is
    NaN, as in torch, and the gradient zero.
    """
    logits = np.asarray(logits)
    if logits.dtype.kind != "f":
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a class dimension last (..., V), got {logits.shape}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    targets = np.asarray(targets)
    if targets.dtype == np.bool_ or not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets must have shape {logits.shape[:-1]} (logits without the class axis), got "
            f"{targets.shape}"
        )
    V = logits.shape[-1]
    weight = np.ones(targets.shape, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != targets.shape:
            raise ValueError(f"mask must have shape {targets.shape}, got {mask.shape}")
        weight = weight * mask
    if ignore_index is not None:
        weight = np.where(targets == ignore_index, 0.0, weight)
    kept = weight != 0
    bad = kept & ((targets < 0) | (targets >= V))
    if bad.any():
        raise IndexError(
            f"target {int(targets[bad].flat[0])} is out of range for {V} classes "
            f"(valid: 0..{V - 1}"
            f"{'' if ignore_index is None else f' or ignore_index={ignore_index}'})"
        )
    if reduction == "none":
        scale = weight
    else:
        total = float(weight.sum())
        scale = weight / total if reduction == "mean" and total != 0 else weight
        if reduction == "mean" and total == 0:
            scale = weight * 0
    dtype = np.dtype(logits.dtype.name) if logits.dtype.itemsize in (4, 8) else np.float64
    rows = np.ascontiguousarray(logits, dtype=dtype).reshape(-1, V)
    grad, row_losses = _C.softmax_cross_entropy(
        rows, np.ascontiguousarray(targets, dtype=np.int64).reshape(-1),
        np.ascontiguousarray(kept).reshape(-1).view(np.uint8),
        np.ascontiguousarray(scale, dtype=np.float64).reshape(-1),
    )  # fmt: skip
    losses = np.where(kept, row_losses.reshape(targets.shape) * weight, 0.0)
    if reduction == "none":
        loss = losses.astype(logits.dtype)
    elif reduction == "sum":
        loss = float(losses.sum())
    else:
        loss = float(losses.sum()) / total if total != 0 else math.nan
    return loss, grad.reshape(logits.shape).astype(logits.dtype, copy=False)


def _elementwise(name: str, inp, target, weight, reduction: str):
    """inp and target as float arrays of one shape, weight broadcast to it (or None)."""
    inp = np.asarray(inp)
    if inp.dtype.kind != "f":
        raise TypeError(f"{name}'s input must be floating point, got {inp.dtype}")
    target = np.asarray(target)
    if target.dtype.kind not in "fiub":
        raise TypeError(f"{name}'s target must be numeric, got {target.dtype}")
    if target.shape != inp.shape:
        raise ValueError(
            f"{name}'s target has shape {target.shape}, the input {inp.shape}; they must match"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    target = target.astype(inp.dtype, copy=False)
    if weight is not None:
        weight = np.asarray(weight, dtype=inp.dtype)
        try:
            weight = np.broadcast_to(weight, inp.shape)
        except ValueError:
            raise ValueError(
                f"{name}'s weight of shape {weight.shape} does not broadcast to {inp.shape}"
            ) from None
    return inp, target, weight


def _reduce(losses: np.ndarray, grad: np.ndarray, reduction: str, dtype):
    """The loss as ``reduction`` asks and the gradient scaled to match (mean over every element,
    as torch's, NaN for an empty input)."""
    if reduction == "none":
        return losses.astype(dtype, copy=False), grad.astype(dtype, copy=False)
    if reduction == "sum":
        return float(losses.sum()), grad.astype(dtype, copy=False)
    if losses.size == 0:
        return math.nan, grad.astype(dtype, copy=False)
    return float(losses.sum()) / losses.size, (grad / losses.size).astype(dtype, copy=False)


def mse_loss(inp, target, reduction: str = "mean") -> tuple[float | np.ndarray, np.ndarray]:
    """(inp - target)^2, as torch.nn.functional.mse_loss; returns (loss, dinp)."""
    inp, target, _ = _elementwise("mse_loss", inp, target, None, reduction)
    diff = inp.astype(np.float64) - target
    return _reduce(diff * diff, 2 * diff, reduction, inp.dtype)


# torch's binary_cross_entropy backward divides by max(p (1 - p), 1e-12), its constant a float
_BCE_EPS = float(np.float32(1e-12))


def binary_cross_entropy(probs, target, weight=None, reduction: str = "mean"):
    """-w (y log p + (1 - y) log(1 - p)) for probabilities p in [0, 1], as
    torch.nn.functional.binary_cross_entropy (each log clamped at -100); returns (loss, dprobs).
    Prefer binary_cross_entropy_with_logits, which is stable where p saturates."""
    p, y, w = _elementwise("binary_cross_entropy", probs, target, weight, reduction)
    p64 = p.astype(np.float64)
    if not ((p64 >= 0) & (p64 <= 1)).all():
        bad = p64[~((p64 >= 0) & (p64 <= 1))].flat[0]
        raise ValueError(f"binary_cross_entropy's input must be probabilities in [0, 1], got {bad}")
    with np.errstate(divide="ignore"):
        logp, log1mp = np.maximum(np.log(p64), -100), np.maximum(np.log1p(-p64), -100)
    losses = -(y * logp + (1 - y) * log1mp)
    grad = (p64 - y) / np.maximum(p64 * (1 - p64), _BCE_EPS)
    if w is not None:
        losses, grad = losses * w, grad * w
    return _reduce(losses, grad, reduction, p.dtype)


def binary_cross_entropy_with_logits(logits, target, weight=None, pos_weight=None,
                                     reduction: str = "mean"):  # fmt: skip
    """-w (pos_weight y log s(x) + (1 - y) log(1 - s(x))), s the sigmoid, computed stably from
    the logits x, as torch.nn.functional.binary_cross_entropy_with_logits; ``pos_weight`` weighs
    the positive class (broadcast over the last axis, one per class); returns (loss, dlogits)."""
    x, y, w = _elementwise("binary_cross_entropy_with_logits", logits, target, weight, reduction)
    x64 = x.astype(np.float64)
    softplus_neg = np.logaddexp(0, -x64)  # -log s(x)
    softplus_pos = np.logaddexp(0, x64)  # -log(1 - s(x))
    pw = 1.0
    if pos_weight is not None:
        pw = np.asarray(pos_weight, dtype=np.float64)
        if pw.ndim > 1 or (pw.ndim == 1 and x.ndim and pw.shape[0] not in (1, x.shape[-1])):
            raise ValueError(
                f"pos_weight must be a scalar or one value per class ({x.shape[-1:]}), got shape "
                f"{pw.shape}"
            )
    losses = pw * y * softplus_neg + (1 - y) * softplus_pos
    sig = np.exp(-softplus_neg)
    grad = sig * (pw * y + 1 - y) - pw * y
    if w is not None:
        losses, grad = losses * w, grad * w
    return _reduce(losses, grad, reduction, x.dtype)


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats): the effective number of equally likely choices."""
    return math.exp(min(float(loss), 700.0))
