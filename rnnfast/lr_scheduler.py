"""Learning-rate schedules over an rnnfast optimizer, with torch.optim.lr_scheduler's names and
semantics: build one after the optimizer, call ``step()`` once per epoch (or per batch) after
``optimizer.step(...)``; ``get_last_lr()`` is ``[optimizer.lr]``, as torch's one-group list.

Each schedule but ReduceLROnPlateau is a closed form of the step count ``last_epoch`` and the
optimizer's learning rate when its first schedule was built (``base_lr``, kept as the optimizer's
``initial_lr`` as torch keeps it), so a schedule restored from
its ``state_dict`` continues exactly.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

from .optim import Optimizer

__all__ = [
    "LRScheduler",
    "LambdaLR",
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "LinearLR",
    "CosineAnnealingLR",
    "SequentialLR",
    "ReduceLROnPlateau",
]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _number(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


class LRScheduler:
    """Base: sets ``optimizer.lr`` to ``lr_at(last_epoch)`` at construction (step 0) and at each
    ``step()``. Subclasses define ``lr_at(t)``."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{type(self).__name__} needs an rnnfast optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        # as torch's group["initial_lr"]: the first schedule on an optimizer records its rate, and
        # later ones (SequentialLR's parts) start from that, not from what the first one set
        if getattr(optimizer, "initial_lr", None) is None:
            optimizer.initial_lr = float(optimizer.lr)
        self.base_lr = float(optimizer.initial_lr)
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, t: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} does not define lr_at")

    def step(self) -> None:
        self.last_epoch += 1
        self.optimizer.lr = self.lr_at(self.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [float(self.optimizer.lr)]

    def state_dict(self) -> dict:
        """``{"last_epoch": int, "base_lr": float}``: JSON-able, for checkpoints."""
        return {"last_epoch": self.last_epoch, "base_lr": self.base_lr}

    def load_state_dict(self, state: dict) -> None:
        """Restores the step count and base rate, and sets the optimizer's rate to match."""
        if not isinstance(state, dict) or set(state) != {"last_epoch", "base_lr"}:
            raise ValueError(
                f"{type(self).__name__} state must be a dict with keys 'last_epoch' and "
                f"'base_lr', got {state!r}"
            )
        self.last_epoch = int(state["last_epoch"])
        self.base_lr = _number("base_lr", state["base_lr"])
        self.optimizer.lr = self.lr_at(self.last_epoch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self.optimizer.lr:g})"


class LambdaLR(LRScheduler):
    """lr = base_lr * lr_lambda(t)."""

    def __init__(self, optimizer: Optimizer, lr_lambda: Callable[[int], float],
                 last_epoch: int = -1) -> None:  # fmt: skip
        if not callable(lr_lambda):
            raise TypeError(f"lr_lambda must be callable, got {lr_lambda!r}")
        self.lr_lambda = lr_lambda
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int) -> float:
        return self.base_lr * float(self.lr_lambda(t))


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (t // step_size)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:  # fmt: skip
        self.step_size = _positive_int("step_size", step_size)
        self.gamma = _number("gamma", gamma, 0.0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma ** (t // self.step_size)


class MultiStepLR(LRScheduler):
    """lr = base_lr * gamma ** (the number of milestones <= t)."""

    def __init__(self, optimizer: Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:  # fmt: skip
        self.milestones = sorted(_positive_int("each milestone", m) for m in milestones)
        self.gamma = _number("gamma", gamma, 0.0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)


class ExponentialLR(LRScheduler):
    """lr = base_lr * gamma ** t."""

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = _number("gamma", gamma, 0.0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma**t


class LinearLR(LRScheduler):
    """Linear warm-up (or decay): lr = base_lr * (start_factor + (end_factor - start_factor) *
    min(t, total_iters) / total_iters)."""

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1) -> None:  # fmt: skip
        self.start_factor = _number("start_factor", start_factor, 0.0, 1.0)
        if self.start_factor == 0:
            raise ValueError("start_factor must be > 0 (as torch), got 0")
        self.end_factor = _number("end_factor", end_factor, 0.0, 1.0)
        self.total_iters = _positive_int("total_iters", total_iters)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int) -> float:
        s, e = self.start_factor, self.end_factor
        return self.base_lr * (s + (e - s) * min(t, self.total_iters) / self.total_iters)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2 (SGDR without
    restarts; past T_max it rises again, as torch's)."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:  # fmt: skip
        self.T_max = _positive_int("T_max", T_max)
        self.eta_min = _number("eta_min", eta_min, 0.0)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int) -> float:
        return (
            self.eta_min
            + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2
        )


class SequentialLR(LRScheduler):
    """schedulers[i] from milestones[i-1] on, each counting its steps from its own start (as
    torch's SequentialLR: linear warm-up, then cosine). The schedulers must share the optimizer."""

    def __init__(self, optimizer: Optimizer, schedulers: Sequence[LRScheduler],
                 milestones: Sequence[int], last_epoch: int = -1) -> None:  # fmt: skip
        schedulers = list(schedulers)
        if not schedulers or any(not isinstance(s, LRScheduler) for s in schedulers):
            raise TypeError("SequentialLR takes a non-empty list of schedulers")
        if any(s.optimizer is not optimizer for s in schedulers):
            raise ValueError("SequentialLR's schedulers must all drive the same optimizer")
        milestones = [_positive_int("each milestone", m) for m in milestones]
        if len(milestones) != len(schedulers) - 1 or milestones != sorted(set(milestones)):
            raise ValueError(
                f"SequentialLR needs {len(schedulers) - 1} increasing milestones for "
                f"{len(schedulers)} schedulers, got {milestones}"
            )
        self.schedulers, self.milestones = schedulers, milestones
        optimizer.lr = schedulers[0].base_lr  # building the later ones moved it, as in torch
        super().__init__(optimizer, last_epoch)

    def lr_at(self, t: int) -> float:
        i = bisect.bisect_right(self.milestones, t)
        start = self.milestones[i - 1] if i else 0
        return self.schedulers[i].lr_at(t - start)


class ReduceLROnPlateau:
    """Multiplies the rate by ``factor`` when a metric has stopped improving for ``patience``
    steps, as torch's: ``step(val_loss)`` after each validation. mode "min" or "max";
    threshold_mode "rel" (better than best * (1 -+ threshold)) or "abs" (best -+ threshold);
    ``cooldown`` steps after a reduction before counting again; never below ``min_lr``, and a
    change smaller than ``eps`` is not made."""

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float = 0.0, eps: float = 1e-8) -> None:  # fmt: skip
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"ReduceLROnPlateau needs an rnnfast optimizer, got {type(optimizer).__name__}"
            )
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.factor = _number("factor", factor, 0.0, 1.0)
        if self.factor == 1.0:
            raise ValueError("factor must be < 1, got 1.0")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
            raise ValueError(f"cooldown must be an integer >= 0, got {cooldown!r}")
        self.optimizer, self.mode, self.threshold_mode = optimizer, mode, threshold_mode
        self.patience, self.cooldown = patience, cooldown
        self.threshold = _number("threshold", threshold, 0.0)
        self.min_lr, self.eps = _number("min_lr", min_lr, 0.0), _number("eps", eps, 0.0)
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = self.cooldown_counter = self.last_epoch = 0

    def _better(self, value: float) -> bool:
        t = self.threshold
        if self.mode == "min":
            return value < (self.best * (1 - t) if self.threshold_mode == "rel" else self.best - t)
        return value > (self.best * (1 + t) if self.threshold_mode == "rel" else self.best + t)

    def step(self, metric: float) -> None:
        value = float(metric)
        if math.isnan(value):
            raise ValueError("ReduceLROnPlateau.step got a NaN metric")
        self.last_epoch += 1
        if self._better(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            new = max(self.optimizer.lr * self.factor, self.min_lr)
            if self.optimizer.lr - new > self.eps:
                self.optimizer.lr = new
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0

    def get_last_lr(self) -> list[float]:
        return [float(self.optimizer.lr)]

    _state = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._state}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != set(self._state):
            raise ValueError(f"ReduceLROnPlateau state must have keys {list(self._state)}")
        for k in self._state:
            setattr(self, k, state[k])
