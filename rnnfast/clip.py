"""Gradient clipping in place, as torch.nn.utils.clip_grad_value_ and clip_grad_norm_.

Both take a dict of name -> ndarray (for example ``layer.grads``) or any iterable of arrays, and
modify the arrays in place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

__all__ = ["NonFiniteError", "NonFiniteGuard", "clip_grad_norm_", "clip_grad_value_", "grad_norm"]


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


def _at_least_single(g: np.ndarray) -> np.ndarray:
    return g.astype(np.promote_types(g.dtype, np.float32), copy=False)


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
        # per-array norms first, as torch does: no overflow from squaring a large total; and in
        # float32 at least, since a float16 sum of squares overflows from a norm of 256
        per = np.array([np.linalg.norm(_at_least_single(g).ravel()) for g in arrays], np.float64)
        return float(np.linalg.norm(per))
    total = sum(float(np.sum(np.abs(g.astype(np.float64)) ** norm_type)) for g in arrays)
    return total ** (1.0 / norm_type)


def clip_grad_norm_(grads, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> float:  # fmt: skip
    """Scales all gradients together so that their global norm is at most ``max_norm``.

    Returns the total norm before clipping, as torch does (scale = max_norm / (norm + 1e-6),
    applied only where it is below 1).

    A gradient holding NaN or infinity has no finite norm to clip to. Then the gradients are
    left exactly as they are and the non-finite total is returned (with
    ``error_if_nonfinite=True``, RuntimeError instead), so that the caller can see it and skip
    the step: ``if not math.isfinite(norm): continue``. (torch scales by max_norm / inf or NaN
    there, which zeroes or poisons every gradient.) rnnfast's trainers skip such steps.
    """
    max_norm = float(max_norm)
    if max_norm < 0 or math.isnan(max_norm):
        raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    arrays = _arrays(grads)
    total = grad_norm(arrays, norm_type)
    if not math.isfinite(total):
        if error_if_nonfinite:
            raise RuntimeError(
                f"the total norm of order {norm_type} of the gradients is non-finite ({total}), "
                "so it cannot be clipped; the gradients were left unchanged"
            )
        return total
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


class NonFiniteError(FloatingPointError):
    """Training met too many steps in a row whose loss or gradient was NaN or infinite."""


class NonFiniteGuard:
    """What a training loop does with a non-finite step: skip it, and stop after ``patience``.

        guard = NonFiniteGuard()
        ...
        norm = clip_grad_norm_(model.grads, 5.0)
        if not guard.step_ok(loss, norm):
            continue  # parameters and optimizer state untouched
        opt.step(model.grads)

    ``step_ok`` is True for a finite loss and gradient norm. Otherwise it counts the step as
    skipped and returns False, and at the ``patience``-th non-finite step in a row it raises
    NonFiniteError instead (a run that keeps diverging is better stopped than skipped through).
    """

    def __init__(self, patience: int = 5):
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.skipped = 0  # steps skipped in all
        self.in_a_row = 0

    def step_ok(self, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.patience:
            raise NonFiniteError(
                f"{self.in_a_row} training steps in a row had a non-finite loss or gradient "
                f"(last: loss {loss}, gradient norm {grad_norm}); stopped, parameters as after the "
                "last finite step. Try a lower learning rate or gradient clipping."
            )
        return False
