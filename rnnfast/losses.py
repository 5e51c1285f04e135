"""Softmax cross-entropy over logits (..., V) with a mask or ignore_index, and perplexity.

The loss returns its own gradient with respect to the logits, so a training step is
``loss, dlogits = softmax_cross_entropy(logits, targets)`` then ``head.backward(dlogits)``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["log_softmax", "softmax", "softmax_cross_entropy", "perplexity"]


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
    safe = np.where(kept, targets, 0)
    logp = log_softmax(logits)
    picked = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    # dropped positions (padding) are never read: a NaN in their logits must not reach the sum
    losses = np.where(kept, -picked * weight, 0.0)
    if reduction == "none":
        scale = weight
        loss = losses.astype(logits.dtype)
    else:
        total = float(weight.sum())
        if reduction == "sum":
            loss, scale = float(losses.sum()), weight
        elif total == 0:
            loss, scale = math.nan, weight * 0
        else:
            loss, scale = float(losses.sum()) / total, weight / total
    grad = np.exp(logp)
    np.put_along_axis(grad, safe[..., None],
                      np.take_along_axis(grad, safe[..., None], axis=-1) - 1, axis=-1)  # fmt: skip
    grad = np.where(kept[..., None], grad * scale[..., None], 0.0)
    return loss, grad.astype(logits.dtype, copy=False)


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats): the effective number of equally likely choices."""
    return math.exp(min(float(loss), 700.0))
