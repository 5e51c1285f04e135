"""Optimizers over a dict of NumPy parameters, with torch.optim's names, defaults and update rules.

``opt = Adam(model.params, lr=1e-3)`` keeps a reference to the dict; ``opt.step(grads)`` updates
every parameter in place from the gradient of the same name (a name missing from ``grads``, or
mapped to None, is skipped, as torch skips a parameter whose ``.grad`` is None). Each rule follows
torch.optim's single-tensor implementation line for line, so that the two agree step for step.
Hyperparameters are plain attributes (``opt.lr = 1e-4`` is how a schedule changes them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from . import _C

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW"]


def _fused(p, g, *state):
    """Whether Adam's fused kernel takes this parameter: plain aligned C-contiguous float arrays
    of one dtype and shape (anything else, a NumPy subclass or a strided view, takes NumPy)."""
    arrays = (p, g) + tuple(a for a in state if a is not None)
    return (
        all(
            type(a) is np.ndarray
            and a.dtype == p.dtype
            and a.shape == p.shape
            and a.flags.c_contiguous
            and a.flags.aligned
            for a in arrays
        )
        and p.dtype in (np.float32, np.float64)
        and p.flags.writeable
        and not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[:i])
    )


def _check_nonneg(name, value):
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"invalid {name}: {value} (must be >= 0)")


def _check_unit(name, value, closed=False):
    _check_nonneg(name, value)
    if value > 1 or (value == 1 and not closed):
        raise ValueError(f"invalid {name}: {value} (must be in [0, 1{']' if closed else ')'})")


class Optimizer:
    """Base class: holds ``params`` (name -> ndarray, updated in place) and per-parameter state.

    Subclasses list their hyperparameters in ``_hparams`` and implement ``_update``.
    """

    _hparams: tuple[str, ...] = ()

    def __init__(self, params: Mapping[str, np.ndarray]):
        if not isinstance(params, Mapping):
            raise TypeError(
                "params must be a dict of name -> ndarray (for example layer.params), got "
                f"{type(params).__name__}"
            )
        if not params:
            raise ValueError("optimizer got an empty params dict")
        for name, p in params.items():
            if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
                raise TypeError(
                    f"parameter {name!r} must be a floating-point ndarray, got "
                    f"{getattr(p, 'dtype', type(p).__name__)}"
                )
            if not p.flags.writeable:
                raise ValueError(f"parameter {name!r} is read-only; the optimizer updates in place")
        self.params = params
        self.state: dict[str, dict[str, np.ndarray]] = {}

    @property
    def hparams(self) -> dict:
        """The hyperparameters as a dict (a copy)."""
        return {k: getattr(self, k) for k in self._hparams}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({args})"

    def step(self, grads: Mapping[str, np.ndarray | None]) -> None:
        """One update of every parameter from ``grads`` (same names as ``params``)."""
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a dict of name -> ndarray, got {type(grads).__name__}")
        unknown = set(grads) - set(self.params)
        if unknown:
            raise KeyError(f"grads has names that are not parameters: {sorted(unknown)}")
        checked = {}
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            g = np.asarray(g)
            if g.dtype.kind != "f":
                raise TypeError(
                    f"gradient {name!r} has dtype {g.dtype}; gradients must be floating-point"
                )
            if g.shape != p.shape:
                raise ValueError(
                    f"gradient {name!r} has shape {g.shape} but the parameter has shape {p.shape}"
                )
            checked[name] = g.astype(p.dtype, copy=False)
        for name, g in checked.items():
            self._update(self.params[name], g, self.state.setdefault(name, {}))

    def _update(self, p: np.ndarray, g: np.ndarray, state: dict) -> None:
        raise NotImplementedError

    def zero_grad(self, grads: Mapping[str, np.ndarray]) -> None:
        """Zeroes the given gradient arrays in place (layers also have their own zero_grad)."""
        for g in grads.values():
            if g is not None:
                g[...] = 0

    def state_dict(self) -> dict:
        """``{"hparams": {...}, "state": {param name: {buffer name: ndarray}}}``, all copies."""
        state = {
            n: {k: np.array(v, copy=True) for k, v in s.items()} for n, s in self.state.items()
        }
        return {"hparams": self.hparams, "state": state}

    def _buffers(self, hparams: dict) -> set[str]:
        """The state buffers one update with these hyperparameters creates."""
        probe = type(self)({"p": np.zeros(1)}, **hparams)
        state: dict = {}
        probe._update(probe.params["p"], np.zeros(1), state)
        return set(state)

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restores hyperparameters and state from ``state_dict()``; checks everything first.

        The hyperparameters go through the constructor's checks (a negative learning rate is
        refused as ``lr=-1`` would be), a parameter's state must hold exactly the buffers this
        optimizer keeps with them, each real-valued, with the parameter's shape (``step`` a
        single number >= 0). On any error nothing changes.
        """
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"hparams", "state"}:
            raise ValueError("optimizer state_dict must be a dict with keys 'hparams' and 'state'")
        hp, st = state_dict["hparams"], state_dict["state"]
        if not isinstance(hp, Mapping) or not isinstance(st, Mapping):
            raise ValueError("optimizer state_dict's 'hparams' and 'state' must be dicts")
        if set(hp) != set(self._hparams):
            raise ValueError(
                f"{type(self).__name__} state_dict has hyperparameters {sorted(hp)}, expected "
                f"{sorted(self._hparams)} (is it from another optimizer?)"
            )
        # a checkpoint's JSON turns tuples (Adam's betas) into lists
        hp = {k: tuple(np.asarray(v).tolist()) if isinstance(v, (list, tuple, np.ndarray)) else v
              for k, v in hp.items()}  # fmt: skip
        try:
            buffers = self._buffers(hp)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{type(self).__name__} state_dict has invalid hyperparameters: {e}"
            ) from e
        unknown = set(st) - set(self.params)
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {sorted(unknown)}")
        new_state = {}
        for name, s in st.items():
            p = self.params[name]
            if not isinstance(s, Mapping):
                raise ValueError(f"optimizer state for {name!r} must be a dict of buffers")
            if s and set(s) != buffers:
                raise ValueError(
                    f"optimizer state for {name!r} has buffers {sorted(s)}; {type(self).__name__} "
                    f"with these hyperparameters keeps {sorted(buffers)}"
                )
            new_state[name] = {}
            for k, v in s.items():
                v = np.asarray(v)
                if v.dtype.kind not in "iuf":
                    raise ValueError(f"optimizer state {name}/{k} has dtype {v.dtype}, not real")
                if k == "step":
                    if v.shape != () or not np.isfinite(v) or v < 0:
                        raise ValueError(
                            f"optimizer state {name}/step must be one number >= 0, got shape "
                            f"{v.shape} ({v if v.size == 1 else '...'})"
                        )
                elif v.shape != p.shape:
                    raise ValueError(
                        f"optimizer state {name}/{k} has shape {v.shape}, parameter has {p.shape}"
                    )
                new_state[name][k] = np.array(v, dtype=p.dtype if k != "step" else np.float64)
        for k, v in hp.items():
            setattr(self, k, v)
        self.state = new_state


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD."""

    _hparams = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False):  # fmt: skip
        super().__init__(params)
        for k, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            _check_nonneg(k, v)
        _check_nonneg("dampening", dampening)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov, self.maximize = weight_decay, bool(nesterov), maximize

    def _update(self, p, g, state):
        g = -g if self.maximize else g
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = np.array(g, copy=True)
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class Adagrad(Optimizer):
    """Adagrad, as torch.optim.Adagrad."""

    _hparams = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize")

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False):  # fmt: skip
        super().__init__(params)
        for k in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            _check_nonneg(k, locals()[k])
        self.lr, self.lr_decay, self.weight_decay = lr, lr_decay, weight_decay
        self.initial_accumulator_value, self.eps, self.maximize = (
            initial_accumulator_value, eps, maximize,
        )  # fmt: skip

    def _update(self, p, g, state):
        if not state:
            state["step"] = np.zeros((), np.float64)
            state["sum"] = np.full_like(p, self.initial_accumulator_value)
        g = -g if self.maximize else g
        state["step"] += 1
        step = float(state["step"])
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        clr = self.lr / (1 + (step - 1) * self.lr_decay)
        state["sum"] += g * g
        p -= clr * g / (np.sqrt(state["sum"]) + self.eps)


class RMSprop(Optimizer):
    """RMSprop (optionally centered, with momentum), as torch.optim.RMSprop."""

    _hparams = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, maximize=False):  # fmt: skip
        super().__init__(params)
        for k in ("lr", "eps", "weight_decay", "momentum"):
            _check_nonneg(k, locals()[k])
        _check_unit("alpha", alpha, closed=True)
        self.lr, self.alpha, self.eps, self.weight_decay = lr, alpha, eps, weight_decay
        self.momentum, self.centered, self.maximize = momentum, bool(centered), maximize

    def _update(self, p, g, state):
        if not state:
            state["step"] = np.zeros((), np.float64)
            state["square_avg"] = np.zeros_like(p)
            if self.momentum > 0:
                state["momentum_buffer"] = np.zeros_like(p)
            if self.centered:
                state["grad_avg"] = np.zeros_like(p)
        g = -g if self.maximize else g
        state["step"] += 1
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        sq = state["square_avg"]
        sq *= self.alpha
        sq += (1 - self.alpha) * g * g
        if self.centered:
            ga = state["grad_avg"]
            ga += (1 - self.alpha) * (g - ga)
            avg = np.sqrt(sq - ga * ga)
        else:
            avg = np.sqrt(sq)
        avg += self.eps
        if self.momentum > 0:
            buf = state["momentum_buffer"]
            buf *= self.momentum
            buf += g / avg
            p -= self.lr * buf
        else:
            p -= self.lr * g / avg


class Adadelta(Optimizer):
    """Adadelta, as torch.optim.Adadelta."""

    _hparams = ("lr", "rho", "eps", "weight_decay", "maximize")

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, maximize=False):
        super().__init__(params)
        for k in ("lr", "eps", "weight_decay"):
            _check_nonneg(k, locals()[k])
        _check_unit("rho", rho, closed=True)
        self.lr, self.rho, self.eps, self.weight_decay, self.maximize = (
            lr, rho, eps, weight_decay, maximize,
        )  # fmt: skip

    def _update(self, p, g, state):
        if not state:
            state["step"] = np.zeros((), np.float64)
            state["square_avg"] = np.zeros_like(p)
            state["acc_delta"] = np.zeros_like(p)
        g = -g if self.maximize else g
        state["step"] += 1
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        sq, acc = state["square_avg"], state["acc_delta"]
        sq *= self.rho
        sq += (1 - self.rho) * g * g
        delta = np.sqrt(acc + self.eps) / np.sqrt(sq + self.eps) * g
        acc *= self.rho
        acc += (1 - self.rho) * delta * delta
        p -= self.lr * delta


class Adam(Optimizer):
    """Adam (optionally AMSGrad), as torch.optim.Adam; weight_decay is L2 added to the gradient."""

    _hparams = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False):  # fmt: skip
        super().__init__(params)
        for k in ("lr", "eps", "weight_decay"):
            _check_nonneg(k, locals()[k])
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_unit("betas[0]", betas[0])
        _check_unit("betas[1]", betas[1])
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.amsgrad, self.maximize = bool(amsgrad), maximize

    def _update(self, p, g, state):
        if not state:
            state["step"] = np.zeros((), np.float64)
            state["exp_avg"] = np.zeros_like(p)
            state["exp_avg_sq"] = np.zeros_like(p)
            if self.amsgrad:
                state["max_exp_avg_sq"] = np.zeros_like(p)
        beta1, beta2 = self.betas
        state["step"] += 1
        step = float(state["step"])
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        vmax = state.get("max_exp_avg_sq") if self.amsgrad else None
        if _fused(p, g, m, v, vmax):
            # one pass on the kernels' threads, the same bits as the NumPy form below
            decoupled = self.weight_decay != 0 and self._decoupled
            _C.adam_step(
                p, g, m, v, vmax,
                keep=1 - self.lr * self.weight_decay if decoupled else 1.0,
                weight_decay=0.0 if self._decoupled else self.weight_decay,
                one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
                bias2_sqrt=bias_correction2_sqrt, step_size=self.lr / bias_correction1,
                eps=self.eps, maximize=self.maximize,
            )  # fmt: skip
            return
        g = -g if self.maximize else g
        if self.weight_decay != 0:
            if self._decoupled:
                p *= 1 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p
        # torch's arithmetic, operation for operation, in two scratch arrays instead of a fresh
        # temporary per operation (a 2M-parameter embedding took 7 ms a step, mostly in malloc)
        a, b = self._scratch(p)
        np.subtract(g, m, out=a)
        a *= 1 - beta1
        m += a
        v *= beta2
        np.multiply(g, 1 - beta2, out=a)
        a *= g
        v += a
        if vmax is not None:
            np.maximum(vmax, v, out=vmax)
            np.sqrt(vmax, out=a)
        else:
            np.sqrt(v, out=a)
        a /= bias_correction2_sqrt
        a += self.eps
        np.multiply(m, self.lr / bias_correction1, out=b)
        b /= a
        p -= b

    def _scratch(self, p):
        """Two arrays shaped and typed as p, kept between steps (not optimizer state)."""
        cache = self.__dict__.setdefault("_buffers_for", {})
        key = (p.shape, p.dtype.str)
        if key not in cache:
            cache[key] = (np.empty_like(p), np.empty_like(p))
        return cache[key]


class AdamW(Adam):
    """Adam with decoupled weight decay (p *= 1 - lr * weight_decay), as torch.optim.AdamW."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False):  # fmt: skip
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)


from . import lr_scheduler  # noqa: E402, F401  (rnnfast.optim.lr_scheduler, as torch's)
