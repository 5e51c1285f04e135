"""Weight initialisers that fill NumPy arrays in place (and return them), as torch.nn.init.

Every function takes ``rng``: None (fresh entropy), an int seed or a ``numpy.random.Generator``.
Fans follow torch: for a 2-D weight (out, in), fan_in = in and fan_out = out. Recurrent weights
stack G gate blocks along rows (``w_ih (G*H, C)``); pass ``gates=G`` to initialise each (H, .)
block on its own (its fan_out is then H, and orthogonal_ makes every block orthogonal).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "as_generator",
    "calculate_gain",
    "constant_",
    "zeros_",
    "uniform_",
    "normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "he_uniform_",
    "he_normal_",
    "lecun_uniform_",
    "lecun_normal_",
    "orthogonal_",
    "identity_",
    "forget_gate_bias_",
]


def as_generator(rng=None) -> np.random.Generator:
    """A numpy Generator from None, an int seed or a Generator (returned as it is)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {rng!r}")


def _float_array(name, a, min_ndim=0):
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise TypeError(f"{name} fills a floating-point ndarray in place, got {type(a).__name__}")
    if a.ndim < min_ndim:
        raise ValueError(
            f"{name} needs an array with at least {min_ndim} dimensions, got {a.shape}"
        )
    return a


def _fans(a: np.ndarray) -> tuple[int, int]:
    if a.ndim < 2:
        raise ValueError(f"fan in and fan out need an array with >= 2 dimensions, got {a.shape}")
    receptive = math.prod(a.shape[2:])
    return a.shape[1] * receptive, a.shape[0] * receptive


def _blocks(a: np.ndarray, gates: int):
    if gates < 1 or a.shape[0] % gates:
        raise ValueError(f"gates={gates} must divide the first dimension of shape {a.shape}")
    rows = a.shape[0] // gates
    return [a[k * rows : (k + 1) * rows] for k in range(gates)]


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended gain for a nonlinearity, as torch.nn.init.calculate_gain."""
    linear = ("linear", "conv1d", "conv2d", "conv3d", "sigmoid", "identity")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def constant_(a: np.ndarray, value: float) -> np.ndarray:
    _float_array("constant_", a)[...] = value
    return a


def zeros_(a: np.ndarray) -> np.ndarray:
    return constant_(a, 0.0)


def uniform_(a: np.ndarray, low: float = 0.0, high: float = 1.0, rng=None) -> np.ndarray:
    """U(low, high); ``uniform_(w, -1/sqrt(H), 1/sqrt(H))`` is torch's default for RNN weights."""
    if high < low:
        raise ValueError(f"uniform_ needs low <= high, got [{low}, {high}]")
    _float_array("uniform_", a)[...] = as_generator(rng).uniform(low, high, a.shape)
    return a


def normal_(a: np.ndarray, mean: float = 0.0, std: float = 1.0, rng=None) -> np.ndarray:
    if std < 0:
        raise ValueError(f"normal_ needs std >= 0, got {std}")
    _float_array("normal_", a)[...] = as_generator(rng).normal(mean, std, a.shape)
    return a


def _scaled(name, a, gain, gates, rng, std_of_fans, uniform):
    _float_array(name, a, 2)
    rng = as_generator(rng)
    for block in _blocks(a, gates):
        std = gain * std_of_fans(*_fans(block))
        if uniform:
            bound = math.sqrt(3.0) * std
            block[...] = rng.uniform(-bound, bound, block.shape)
        else:
            block[...] = rng.normal(0.0, std, block.shape)
    return a


def xavier_uniform_(a, gain: float = 1.0, rng=None, *, gates: int = 1) -> np.ndarray:
    """Glorot uniform: U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    return _scaled("xavier_uniform_", a, gain, gates, rng,
                   lambda fi, fo: math.sqrt(2.0 / (fi + fo)), True)  # fmt: skip


def xavier_normal_(a, gain: float = 1.0, rng=None, *, gates: int = 1) -> np.ndarray:
    """Glorot normal: N(0, std^2), std = gain * sqrt(2 / (fan_in + fan_out))."""
    return _scaled("xavier_normal_", a, gain, gates, rng,
                   lambda fi, fo: math.sqrt(2.0 / (fi + fo)), False)  # fmt: skip


def _kaiming(name, a, slope, mode, nonlinearity, rng, gates, uniform):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    gain = calculate_gain(nonlinearity, slope)
    pick = 0 if mode == "fan_in" else 1
    return _scaled(name, a, gain, gates, rng,
                   lambda fi, fo: 1.0 / math.sqrt((fi, fo)[pick]), uniform)  # fmt: skip


def kaiming_uniform_(a, slope: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu",
                     rng=None, *, gates: int = 1) -> np.ndarray:  # fmt: skip
    """He uniform: U(-b, b), b = gain * sqrt(3 / fan); ``slope`` is the leaky-ReLU slope."""
    return _kaiming("kaiming_uniform_", a, slope, mode, nonlinearity, rng, gates, True)


def kaiming_normal_(a, slope: float = 0.0, mode: str = "fan_in", nonlinearity: str = "relu",
                    rng=None, *, gates: int = 1) -> np.ndarray:  # fmt: skip
    """He normal: N(0, std^2), std = gain / sqrt(fan)."""
    return _kaiming("kaiming_normal_", a, slope, mode, nonlinearity, rng, gates, False)


he_uniform_ = kaiming_uniform_
he_normal_ = kaiming_normal_


def lecun_uniform_(a, rng=None, *, gates: int = 1) -> np.ndarray:
    """LeCun uniform: U(-b, b), b = sqrt(3 / fan_in)."""
    return _kaiming("lecun_uniform_", a, None, "fan_in", "linear", rng, gates, True)


def lecun_normal_(a, rng=None, *, gates: int = 1) -> np.ndarray:
    """LeCun normal: N(0, 1 / fan_in)."""
    return _kaiming("lecun_normal_", a, None, "fan_in", "linear", rng, gates, False)


def orthogonal_(a, gain: float = 1.0, rng=None, *, gates: int = 1) -> np.ndarray:
    """A (semi-)orthogonal matrix per gate block, times ``gain`` (Saxe et al. 2013), as torch."""
    _float_array("orthogonal_", a, 2)
    rng = as_generator(rng)
    for block in _blocks(a, gates):
        rows = block.shape[0]
        cols = block.size // rows if rows else 0
        if block.size == 0:
            continue
        flat = rng.normal(0.0, 1.0, (rows, cols))
        if rows < cols:
            flat = flat.T
        q, r = np.linalg.qr(flat)
        q *= np.sign(np.diag(r))  # makes the distribution uniform (Haar)
        if rows < cols:
            q = q.T
        block[...] = (gain * q).reshape(block.shape)
    return a


def identity_(a, gain: float = 1.0, *, gates: int = 1) -> np.ndarray:
    """``gain`` times the identity in each gate block (IRNN: ReLU RNNs with w_hh = I, Le 2015)."""
    _float_array("identity_", a, 2)
    if a.ndim != 2:
        raise ValueError(f"identity_ needs a 2-D array, got shape {a.shape}")
    for block in _blocks(a, gates):
        block[...] = 0
        np.fill_diagonal(block, gain)
    return a


def forget_gate_bias_(b: np.ndarray, value: float = 1.0) -> np.ndarray:
    """Sets the forget-gate slice (rows H:2H, gate order i, f, g, o) of an LSTM bias to ``value``.

    Use it on one of b_ih / b_hh only (they add up); the usual choice is 1 (Jozefowicz et al. 2015).
    """
    _float_array("forget_gate_bias_", b, 1)
    if b.ndim != 1 or b.shape[0] % 4:
        raise ValueError(f"an LSTM bias has shape (4*H,), got {b.shape}")
    H = b.shape[0] // 4
    b[H : 2 * H] = value
    return b
