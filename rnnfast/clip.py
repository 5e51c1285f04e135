"""Gradient clipping in place, as torch.nn.utils.clip_grad_value_ and clip_grad_norm_.

Both take a dict of name -> ndarray (for example ``layer.grads``) or any iterable of arrays, and
modify the arrays in place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["clip_grad_norm_", "clip_grad_value_", "grad_norm"]


def _arrays(grads) -> list[np.ndarray]:
    if isinstance(grads, np.ndarray):
        items = [grads]
    elif isinstance(grads, Mapping):
        items = list(grads.values())
    elif isinstance(grads, Iterable):
        items = list(grads)
    else:
        raise TypeError(
            f"grads must be a dict or an iterable of ndarrays, got {type(grads).__name__}"
        )
    out = []
    for g in items:
        if g is None:
            continue
        if not isinstance(g, np.ndarray) or g.dtype.kind != "f":
            raise TypeError(
                f"every gradient must be a floating-point ndarray, got {type(g).__name__}"
            )
        out.append(g)
    return out


def grad_norm(grads, norm_type: float = 2.0) -> float:
    """The global ``norm_type`` norm over all gradients together (inf for the max-abs norm)."""
    arrays = _arrays(grads)
    norm_type = float(norm_type)
    if not arrays:
        return 0.0
    if norm_type == math.inf:
        return float(max(np.max(np.abs(g), initial=0.0) for g in arrays))
    if norm_type <= 0:
        raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type}")
    if norm_type == 2.0:
        # per-array norms first, as torch does: no overflow from squaring a large total
        per = np.array([np.linalg.norm(g.ravel()) for g in arrays], dtype=np.float64)
        return float(np.linalg.norm(per))
    total = sum(float(np.sum(np.abs(g.astype(np.float64)) ** norm_type)) for g in arrays)
    return total ** (1.0 / norm_type)


def clip_grad_norm_(grads, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> float:  # fmt: skip
    """Scales all gradients together so that their global norm is at most ``max_norm``.

    Returns the total norm before clipping, as torch does (scale = max_norm / (norm + 1e-6),
    applied only where it is below 1).
    """
    max_norm = float(max_norm)
    if max_norm < 0 or math.isnan(max_norm):
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    arrays = _arrays(grads)
    total = grad_norm(arrays, norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({total}), so it "
            "cannot be clipped; pass error_if_nonfinite=False to clip anyway"
        )
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in arrays:
            g *= g.dtype.type(coef)
    return total


def clip_grad_value_(grads, clip_value: float) -> None:
    """Clamps every gradient element into [-clip_value, clip_value], in place."""
    clip_value = float(clip_value)
    if clip_value < 0 or math.isnan(clip_value):
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    for g in _arrays(grads):
        np.clip(g, -clip_value, clip_value, out=g)
