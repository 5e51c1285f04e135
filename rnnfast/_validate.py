"""Argument checks shared by the kernels' API (ops) and the NumPy reference.

Every check raises with the offending name, shape or value, so that a bad call never reaches a
kernel. The checked arrays come back C-contiguous (copied only where needed, never modified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .cells import cell_spec

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Checked:
    """Validated, C-contiguous forward inputs. h0 and c0 are None where zero; lengths is int32."""

    x: np.ndarray
    w_ih: np.ndarray
    w_hh: np.ndarray
    b_ih: np.ndarray | None
    b_hh: np.ndarray | None
    h0: np.ndarray | None
    c0: np.ndarray | None
    lengths: np.ndarray | None
    w_peephole: np.ndarray | None = None  # (3, H), cells that take peepholes only
    w_hr: np.ndarray | None = None  # (P, H), cells with a projection only
    # (gamma_ih, gamma_hh, gamma_c, beta_c): cells with layer_norm only, the last two None
    # without c
    layer_norm: tuple | None = None

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """T, N, C and R, the size of h (H, or P with a projection)."""
        T, N, C = self.x.shape
        return T, N, C, self.w_hh.shape[1]

    @property
    def cell_size(self) -> int:
        """H: the size of c and of each gate (R but with a projection)."""
        return self.w_hr.shape[1] if self.w_hr is not None else self.w_hh.shape[1]


def _array(name, a, dtype=None):
    try:  # a bfloat16 CUDA torch tensor raises from the attribute itself
        on_gpu = hasattr(a, "__cuda_array_interface__")
    except Exception:
        on_gpu = True
    if on_gpu:
        raise TypeError(f"{name} is a GPU array; pass GPU arrays only together (see rnnfast.cuda)")
    a = np.asarray(a)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {a.dtype} but x has dtype {dtype}; mixing dtypes is not allowed "
            "(cast explicitly)"
        )
    # an explicitly little-endian dtype ('<f4', as pickle and np.frombuffer give) equals float32
    # but is not NumPy's own dtype object, which the bindings compare by identity
    canonical = np.dtype(a.dtype.name)
    if a.dtype is not canonical:
        a = a.view(canonical)
    # aligned as well as contiguous: the kernels load whole elements (a view at an odd byte offset
    # of a buffer is contiguous but not aligned); the flags first, as np.require costs 0.6 us
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.require(a, requirements="CA")


def _shaped(name, a, shape, dtype, array=_array):
    a = array(name, a, dtype)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return a


def check_lengths(lengths, T: int, N: int) -> np.ndarray | None:
    """lengths as a contiguous int32 array of size N with values in [0, T], or None."""
    if lengths is None:
        return None
    lengths = np.asarray(lengths)
    if lengths.dtype == np.bool_ or not np.issubdtype(lengths.dtype, np.integer):
        raise TypeError(f"lengths must be an integer array, got dtype {lengths.dtype}")
    if lengths.shape != (N,):
        raise ValueError(f"lengths must have shape ({N},) (one per batch row), got {lengths.shape}")
    if N and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lengths.min())}")
    if N and lengths.max() > T:
        raise ValueError(f"lengths must be <= T = {T} (the number of steps in x), got "
                         f"{int(lengths.max())}")  # fmt: skip
    return np.ascontiguousarray(lengths, dtype=np.int32)


LAYER_NORM_NAMES = ("ln_gamma_ih", "ln_gamma_hh", "ln_gamma_c", "ln_beta_c")


def check_layer_norm(spec, H: int, dtype, params: dict | None, projection: bool,
                     array=_array) -> tuple | None:  # fmt: skip
    """Layer norm's parameters ({name: array or None} over LAYER_NORM_NAMES) as the kernels take
    them: None where all are None, else (gamma_ih, gamma_hh, gamma_c, beta_c), checked."""
    params = {k: v for k, v in (params or {}).items() if v is not None}
    if not params:
        return None
    if not spec.layer_norm:
        cells = "lstm, lstm_cifg and gru (reset_after=True)"
        raise ValueError(f"layer norm ({', '.join(params)}) is only for the {cells} cells, "
                         f"not {spec.name}")  # fmt: skip
    if projection:
        raise ValueError("layer norm is not supported with a projection (w_hr)")
    wanted = spec.layer_norm_names
    extra = [k for k in params if k not in wanted]
    if extra:
        raise ValueError(f"{', '.join(extra)} is only for cells with a cell state, not {spec.name}")
    missing = [k for k in wanted if k not in params]
    if missing:
        raise ValueError(f"layer norm on {spec.name} needs all of {', '.join(wanted)}; "
                         f"missing {', '.join(missing)}")  # fmt: skip
    GH = spec.gates * H
    shapes = {"ln_gamma_ih": (GH,), "ln_gamma_hh": (GH,), "ln_gamma_c": (H,), "ln_beta_c": (H,)}
    return tuple(_shaped(k, params[k], shapes[k], dtype, array) if k in params else None
                 for k in LAYER_NORM_NAMES)  # fmt: skip


def check_forward_inputs(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, array=_array,
                         w_peephole=None, w_hr=None, layer_norm=None) -> Checked:  # fmt: skip
    """The forward arguments checked and made contiguous by ``array(name, a, dtype=None)`` (NumPy
    here; rnnfast.cuda passes its CuPy conversion). lengths must be on the host."""
    spec = cell_spec(cell)
    G = spec.gates
    x = array("x", x)
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D (T, N, C), time-major, got shape {x.shape}")
    T, N, C = x.shape
    if N == 0:
        raise ValueError(f"x has an empty batch (shape {x.shape}); N must be at least 1")
    if C == 0:
        raise ValueError(f"x has input size 0 (shape {x.shape}); C must be at least 1")
    w_hh = array("w_hh", w_hh, x.dtype)
    if w_hr is not None:
        if not spec.projection:
            raise ValueError(f"w_hr (a projection) is only for LSTM cells, not {cell}")
        w_hr = array("w_hr", w_hr, x.dtype)
        if w_hr.ndim != 2 or not 0 < w_hr.shape[0] < w_hr.shape[1]:
            raise ValueError(f"w_hr must have shape (P, H) with 0 < P < H, got {w_hr.shape}")
        P, H = w_hr.shape
        if w_hh.shape != (G * H, P):
            raise ValueError(
                f"w_hh must have shape ({G}*H, P) = {(G * H, P)} for {cell} with a projection "
                f"w_hr of shape {w_hr.shape}, got {w_hh.shape}"
            )
    elif w_hh.ndim != 2 or w_hh.shape[1] == 0 or w_hh.shape[0] != G * w_hh.shape[1]:
        raise ValueError(
            f"w_hh must have shape ({G}*H, H) for {cell} (G = {G} gates), got {w_hh.shape}"
        )
    else:
        H = P = w_hh.shape[1]
    w_ih = _shaped("w_ih", w_ih, (G * H, C), x.dtype, array)
    b_ih = None if b_ih is None else _shaped("b_ih", b_ih, (G * H,), x.dtype, array)
    b_hh = None if b_hh is None else _shaped("b_hh", b_hh, (G * H,), x.dtype, array)
    h0 = None if h0 is None else _shaped("h0", h0, (N, P), x.dtype, array)
    if c0 is not None and not spec.has_c:
        raise ValueError(f"c0 is only for LSTM, not {cell}")
    c0 = None if c0 is None else _shaped("c0", c0, (N, H), x.dtype, array)
    if w_peephole is not None:
        if not spec.peephole:
            raise ValueError(f"w_peephole is only for LSTM cells, not {cell}")
        w_peephole = _shaped("w_peephole", w_peephole, (3, H), x.dtype, array)
    ln = check_layer_norm(spec, H, x.dtype, layer_norm, w_hr is not None, array)
    return Checked(x, w_ih, w_hh, b_ih, b_hh, h0, c0, check_lengths(lengths, T, N), w_peephole,
                   w_hr, ln)  # fmt: skip


def check_backward_inputs(cell, a: Checked, dy, dh_n, dc_n, array=_array):
    """dy, dh_n, dc_n checked against the forward's shapes and dtype (None stays None)."""
    T, N, _, R = a.dims
    dtype = a.x.dtype
    dy = None if dy is None else _shaped("dy", dy, (T, N, R), dtype, array)
    dh_n = None if dh_n is None else _shaped("dh_n", dh_n, (N, R), dtype, array)
    if dc_n is not None and not cell_spec(cell).has_c:
        raise ValueError(f"dc_n is only for LSTM, not {cell}")
    dc_n = None if dc_n is None else _shaped("dc_n", dc_n, (N, a.cell_size), dtype, array)
    return dy, dh_n, dc_n


def check_context(cell: str, ctx, context_type: type, api: str) -> None:
    """Raises unless ctx is a training context of ``context_type`` from ``{api}.{cell}_forward``."""
    if not isinstance(ctx, context_type) or ctx.cell != cell:
        raise TypeError(f"{cell}_backward needs the context returned by {api}.{cell}_forward")
    if not ctx.training:
        raise RuntimeError(
            f"{cell}_backward: this context comes from an inference forward (training=False), "
            "which keeps nothing for backward; run the forward with training=True to "
            "differentiate it"
        )


MATMUL_PRECISIONS = ("float32", "bfloat16")


def check_matmul_precision(matmul_precision) -> bool:
    """True for the bfloat16 products, False for float32; anything else raises."""
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(
            f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}"
        )
    return matmul_precision == "bfloat16"


class Noise(NamedTuple):
    """A call's recurrent dropout and zoneout, as the kernels take them (csrc/rnnfast/noise.h):
    an element is kept (a zoneout unit takes its new value) where its 32-bit Philox draw is at
    least the probability's threshold, floor(p * 2**32)."""

    seed: int
    stream: int
    candidate: float
    candidate_threshold: int
    zoneout: float
    zoneout_threshold: int
    variational: float = 0.0  # recurrent dropout on h_{t-1} into the products (Gal and Ghahramani)
    variational_threshold: int = 0


DROPOUT_MODES = ("semeniuta", "variational")
NOISE_STREAMS = 1 << 28  # the counter word holds the stream above 4 bits of purpose


def threshold(p: float) -> int:
    """The keep threshold of probability p in [0, 1): floor(p * 2**32)."""
    return min(int(p * 2**32), 2**32 - 1)


def _probability(name, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1), got {p!r}")
    p = float(p)
    if not 0 <= p < 1:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def check_noise(cell, recurrent_dropout=0.0, recurrent_dropout_mode="semeniuta", zoneout=0.0,
                seed=None, noise_stream=0, projection=False) -> Noise | None:  # fmt: skip
    """The call's Noise, or None where both probabilities are 0. seed None draws a fresh one."""
    spec = cell_spec(cell)
    p_drop = _probability("recurrent_dropout", recurrent_dropout)
    p_zone = _probability("zoneout", zoneout)
    if recurrent_dropout_mode not in DROPOUT_MODES:
        raise ValueError(
            f"recurrent_dropout_mode must be one of {DROPOUT_MODES}, got {recurrent_dropout_mode!r}"
        )
    if isinstance(noise_stream, bool) or not isinstance(noise_stream, (int, np.integer)):
        raise TypeError(f"noise_stream must be an int, got {noise_stream!r}")
    if not 0 <= noise_stream < NOISE_STREAMS:
        raise ValueError(f"noise_stream must be in [0, 2**28), got {noise_stream}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    variational = recurrent_dropout_mode == "variational"
    if p_drop > 0 and not variational:
        if spec.gates == 1:
            raise ValueError(
                f'recurrent_dropout_mode="semeniuta" drops the candidate, which the {spec.name} '
                "cell does not have (the LSTM's g, the GRU's n)"
            )
    if p_zone > 0 and projection:
        raise ValueError("zoneout is not supported with a projection (w_hr)")
    if p_drop > 0 and variational and projection:
        raise ValueError('recurrent_dropout_mode="variational" is not supported with a projection')
    if p_drop == 0 and p_zone == 0:
        return None
    if seed is None:
        seed = int(np.random.default_rng().integers(2**63))
    p_cand, p_var = (0.0, p_drop) if variational else (p_drop, 0.0)
    return Noise(int(seed), int(noise_stream), p_cand, threshold(p_cand), p_zone, threshold(p_zone),
                 p_var, threshold(p_var))  # fmt: skip


MASK_KINDS = {"candidate": 1, "variational": 2, "zoneout": 3}  # NoisePurpose (noise.h)


def check_mask_request(kind, p, seed, noise_stream) -> Noise | None:
    """The Noise a ``recurrent_masks(kind, p, seed, ...)`` call reproduces (None for p = 0)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {sorted(MASK_KINDS)}, got {kind!r}")
    if seed is None:
        raise TypeError("recurrent_masks needs the seed of the forward it reproduces")
    return check_noise("lstm", p, "semeniuta", 0.0, seed, noise_stream)
