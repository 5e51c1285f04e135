"""Pure-NumPy reference of every cell: forward and backpropagation through time, loops over t.

Same public signatures, argument checks and semantics as rnnfast.ops (see its module docstring),
written to be obviously correct rather than fast; it computes in the dtype of x, so the tests
feed it float64 and trust it after checking it against finite differences and torch.

Notation, per step t and batch row: x_t (N, C) the input, h (N, H) and c (N, H) the state before
the step, s(.) the logistic sigmoid, * the elementwise product, and the two projections

    a_x = x_t W_ih^T + b_ih        a_h = h W_hh^T + b_hh        both (N, G*H), split into gates.

``matmul_precision="bfloat16"`` rounds x, the weights and each step's h to bfloat16 (to nearest,
ties to even) before the two products, as the fused kernels' bfloat16 path does, and computes the
rest in the dtype of x: the exact result of the rounded products, to check that path against.

A sequence n with lengths[n] = L runs steps 0..L-1 only: y[t, n] = 0 for t >= L, its final state
is the state after step L-1 (h0, c0 when L = 0), and padded positions get no gradient.

Every cell has one row in ``_CELLS`` here: a ``step`` (projections and state in, new state
out, plus what its backward needs) and a ``step_backward`` (gradients reaching the new state in,
gradients of both projections and of the old state out). ``forward`` and ``backward`` are the one
loop skeleton that runs any row over time, with masking by length; the per-cell public functions
are made from them (rnnfast.cells.public_functions), as in rnnfast.ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ._validate import (
    Checked,
    check_backward_inputs,
    check_context,
    check_forward_inputs,
    check_matmul_precision,
)
from .cells import cell_spec, public_functions

__all__ = [
    "ReferenceContext",
    "lstm_forward",
    "lstm_backward",
    "gru_forward",
    "gru_backward",
    "rnn_forward",
    "rnn_backward",
]


def _sigmoid(a):
    with np.errstate(over="ignore"):  # exp(-a) = inf for very negative a gives the right 0
        return 1 / (1 + np.exp(-a))


# ---- the cells --------------------------------------------------------------------------------
# step(a_x, a_h, h, c) -> (h_new, c_new, saved); c and c_new are None for cells without a cell
# state. step_backward(saved, h, dh, dc) -> (da_x, da_h, dh_direct, dc_prev): dh and dc are the
# total gradients reaching h_new and c_new; da_x and da_h those of the two projections (equal
# unless the cell treats them differently, as the GRU's n gate does); dh_direct the part of the
# gradient of h that does not pass through W_hh (the skeleton adds da_h W_hh).


def _lstm_step(a_x, a_h, h, c):
    i, f, g, o = np.split(a_x + a_h, 4, axis=1)
    i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
    c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    return h_new, c_new, (i, f, g, o, c, c_new)


def _lstm_step_backward(saved, h, dh, dc):
    i, f, g, o, c_prev, c = saved
    tc = np.tanh(c)
    dc = dc + dh * o * (1 - tc * tc)
    da_i = dc * g * i * (1 - i)
    da_f = dc * c_prev * f * (1 - f)
    da_g = dc * i * (1 - g * g)
    da_o = dh * tc * o * (1 - o)
    da = np.concatenate([da_i, da_f, da_g, da_o], axis=1)
    return da, da, 0, dc * f


def _gru_step(a_x, a_h, h, c):
    x_r, x_z, x_n = np.split(a_x, 3, axis=1)
    hh_r, hh_z, hh_n = np.split(a_h, 3, axis=1)
    r = _sigmoid(x_r + hh_r)
    z = _sigmoid(x_z + hh_z)
    n = np.tanh(x_n + r * hh_n)
    h_new = (1 - z) * n + z * h
    return h_new, None, (r, z, n, hh_n)


def _gru_step_backward(saved, h, dh, dc):
    r, z, n, hh_n = saved
    da_n = dh * (1 - z) * (1 - n * n)
    da_z = dh * (h - n) * z * (1 - z)
    da_r = da_n * hh_n * r * (1 - r)
    # r multiplies the recurrent part of n only: a_h's n slot gets da_n * r, a_x's gets da_n
    da_x = np.concatenate([da_r, da_z, da_n], axis=1)
    da_h = np.concatenate([da_r, da_z, da_n * r], axis=1)
    return da_x, da_h, dh * z, None


def _rnn_tanh_step(a_x, a_h, h, c):
    h_new = np.tanh(a_x + a_h)
    return h_new, None, h_new


def _rnn_tanh_step_backward(h_new, h, dh, dc):
    da = dh * (1 - h_new * h_new)
    return da, da, 0, None


def _rnn_relu_step(a_x, a_h, h, c):
    h_new = np.maximum(a_x + a_h, 0)  # a NaN stays NaN, as in torch.relu and the kernels
    return h_new, None, h_new


def _rnn_relu_step_backward(h_new, h, dh, dc):
    # relu'(0) = 0 as in torch; a NaN output passes its gradient on, as the kernels (cell.h) do
    da = np.where((h_new > 0) | np.isnan(h_new), dh, 0)
    return da, da, 0, None


class _Cell(NamedTuple):
    step: Callable
    step_backward: Callable


_CELLS = {
    "lstm": _Cell(_lstm_step, _lstm_step_backward),
    "gru": _Cell(_gru_step, _gru_step_backward),
    "rnn_tanh": _Cell(_rnn_tanh_step, _rnn_tanh_step_backward),
    "rnn_relu": _Cell(_rnn_relu_step, _rnn_relu_step_backward),
}


# ---- the loop skeleton ------------------------------------------------------------------------


class _Saved(NamedTuple):
    hs: np.ndarray  # (T, N, H): the state h before each step
    steps: list  # per step, what the cell's step returned for its backward


@dataclass(frozen=True)
class ReferenceContext:
    """What backward needs from a reference forward. ``saved`` is None for an inference forward."""

    cell: str
    inputs: Checked
    saved: _Saved | None

    @property
    def training(self) -> bool:
        return self.saved is not None


def _round_to_bfloat16(a):
    """a rounded to bfloat16 (to nearest, ties to even) through float32, in a's dtype."""
    single = np.asarray(a, np.float32)
    bits = single.view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    # a NaN's payload could carry into the sign bit or wrap: NaN stays NaN
    return np.where(np.isnan(single), single, bits.view(np.float32)).astype(a.dtype)


def _active(a: Checked) -> np.ndarray:
    """(T, N, 1) bool: True where step t is inside sequence n (everywhere without lengths)."""
    T, N, _, _ = a.dims
    lengths = np.full(N, T) if a.lengths is None else a.lengths
    return (np.arange(T)[:, None] < lengths[None, :])[:, :, None]


def forward(cell: str, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
            training=True, matmul_precision="float32"):  # fmt: skip
    """Any cell over a whole sequence, by name; returns ``(y, h_n, c_n, ctx)`` as
    rnnfast.ops.forward (c_n None for a cell without a cell state)."""
    spec = cell_spec(cell)
    cell = spec.name
    bf16 = check_matmul_precision(matmul_precision, training)
    rounded = _round_to_bfloat16 if bf16 else (lambda m: m)  # what the products multiply
    a = check_forward_inputs(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
    T, N, _, H = a.dims
    dtype = a.x.dtype
    step = _CELLS[cell].step
    active = _active(a)

    h = np.zeros((N, H), dtype) if a.h0 is None else a.h0.copy()
    c = None
    if spec.has_c:
        c = np.zeros((N, H), dtype) if a.c0 is None else a.c0.copy()
    # (T, N, G*H): every step's input projection at once; the padding is never read
    a_x = rounded(np.where(active, a.x, 0)) @ rounded(a.w_ih).T
    w_hh = rounded(a.w_hh)
    if a.b_ih is not None:
        a_x = a_x + a.b_ih

    y = np.zeros((T, N, H), dtype)
    hs = np.zeros((T, N, H), dtype)
    steps = []
    for t in range(T):
        a_h = rounded(h) @ w_hh.T
        if a.b_hh is not None:
            a_h = a_h + a.b_hh
        h_new, c_new, saved = step(a_x[t], a_h, h, c)
        m = active[t]
        y[t] = np.where(m, h_new, 0)
        hs[t] = h
        steps.append(saved)
        h = np.where(m, h_new, h)  # finished sequences keep their final state
        if c is not None:
            c = np.where(m, c_new, c)
    ctx = ReferenceContext(cell, a, _Saved(hs, steps) if training else None)
    return y, h, c, ctx


def backward(ctx, dy=None, dh_n=None, dc_n=None, *, cell: str | None = None) -> dict:
    """Gradients of a training forward for any cell, as rnnfast.ops.backward."""
    if cell is None:
        if not isinstance(ctx, ReferenceContext):
            raise TypeError("backward needs the context returned by rnnfast.reference.forward")
        cell = ctx.cell
    spec = cell_spec(cell)
    cell = spec.name
    check_context(cell, ctx, ReferenceContext, "rnnfast.reference")
    a = ctx.inputs
    dy, dh_n, dc_n = check_backward_inputs(cell, a, dy, dh_n, dc_n)
    T, N, C, H = a.dims
    GH = spec.gates * H
    dtype = a.x.dtype
    step_backward = _CELLS[cell].step_backward
    active = _active(a)
    hs, steps = ctx.saved

    dh = np.zeros((N, H), dtype) if dh_n is None else dh_n.copy()
    dc = None
    if spec.has_c:
        dc = np.zeros((N, H), dtype) if dc_n is None else dc_n.copy()
    da_x = np.zeros((T, N, GH), dtype)
    da_h = np.zeros((T, N, GH), dtype)
    for t in reversed(range(T)):
        m = active[t]
        if dy is not None:
            dh = dh + np.where(m, dy[t], 0)  # y is zero past the length: no gradient there
        gx, gh, dh_direct, dc_prev = step_backward(steps[t], hs[t], dh, dc)
        da_x[t] = np.where(m, gx, 0)
        da_h[t] = np.where(m, gh, 0)
        dh = np.where(m, dh_direct + da_h[t] @ a.w_hh, dh)  # padded steps pass dh on unchanged
        if dc is not None:
            dc = np.where(m, dc_prev, dc)

    grads = {
        "dx": da_x @ a.w_ih,
        "dh0": dh,
        # padded rows of x are the caller's and never read: 0 * NaN there must not reach dw_ih
        "dw_ih": da_x.reshape(-1, GH).T @ np.where(active, a.x, 0).reshape(-1, C),
        "dw_hh": da_h.reshape(-1, GH).T @ hs.reshape(-1, H),
        "db_ih": None if a.b_ih is None else da_x.sum(axis=(0, 1)),
        "db_hh": None if a.b_hh is None else da_h.sum(axis=(0, 1)),
        "dc0": dc,
    }
    return {k: grads[k] for k in spec.grad_names}


# ---- the public API (signatures as rnnfast.ops) ----------------------------------------------


_DOCS = {
    "lstm_forward": """LSTM over a whole sequence, gate order i, f, g, o.

    Returns ``(y, h_n, c_n, ctx)``.

    Per step, with a = a_x + a_h split into four (N, H) blocks (see the module docstring):

        i = s(a_i)    f = s(a_f)    g = tanh(a_g)    o = s(a_o)
        c' = f * c + i * g
        h' = o * tanh(c')            y_t = h'

    x (T, N, C); w_ih (4H, C); w_hh (4H, H); b_ih, b_hh (4H,) or None; h0, c0 (N, H) or None
    (zero); lengths (N,) ints in [0, T] or None. ``training=False`` keeps nothing for backward.
    """,
    "lstm_backward": """Gradients of an LSTM forward: dict with dx dh0 dc0 dw_ih dw_hh db_ih db_hh.

    Backward through one step, from the total gradients dh' and dc' reaching h' and c':

        dc  = dc' + dh' * o * (1 - tanh(c')^2)
        da_o = dh' * tanh(c') * o (1 - o)     da_i = dc * g * i (1 - i)
        da_f = dc * c * f (1 - f)             da_g = dc * i * (1 - g^2)
        dc_prev = dc * f                      dh_prev = da W_hh

    dy (T, N, H), dh_n and dc_n (N, H) may each be None (zero). db_* is None where the forward
    had no bias.
    """,
    "gru_forward": """GRU over a whole sequence, gate order r, z, n. Returns ``(y, h_n, ctx)``.

    Per step, with a_x and a_h each split into r, z, n blocks of (N, H) (the reset gate multiplies
    the recurrent product including its bias, as in PyTorch and cuDNN):

        r = s(ax_r + ah_r)    z = s(ax_z + ah_z)    n = tanh(ax_n + r * ah_n)
        h' = (1 - z) * n + z * h                     y_t = h'

    Shapes as lstm_forward with G = 3 and no c0.
    """,
    "gru_backward": """Gradients of a GRU forward: dict with dx dh0 dw_ih dw_hh db_ih db_hh.

    Backward through one step, from the total gradient dh' reaching h':

        dax_n = dh' * (1 - z) * (1 - n^2)     dah_n = dax_n * r
        da_z = dh' * (h - n) * z (1 - z)      da_r = dax_n * ah_n * r (1 - r)
        dh_prev = dh' * z + [da_r, da_z, dah_n] W_hh
    """,
    "rnn_forward": """Vanilla RNN over a whole sequence. Returns ``(y, h_n, ctx)``.

    Per step, with act tanh or relu:

        h' = act(x_t W_ih^T + b_ih + h W_hh^T + b_hh)    y_t = h'

    Shapes as lstm_forward with G = 1 and no c0.
    """,
    "rnn_backward": """Gradients of a vanilla RNN forward: dict with dx dh0 dw_ih dw_hh db_ih db_hh.

    Backward through one step: da = dh' * (1 - h'^2) for tanh, dh' * [h' > 0] for relu;
    dh_prev = da W_hh.
    """,
}
lstm_forward, lstm_backward, gru_forward, gru_backward, rnn_forward, rnn_backward = (
    public_functions(forward, backward, __name__, _DOCS)
)
