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
    MASK_KINDS,
    Checked,
    Noise,
    check_backward_inputs,
    check_context,
    check_forward_inputs,
    check_mask_request,
    check_matmul_precision,
    check_noise,
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
    "recurrent_masks",
    "philox4x32_10",
]


LAYER_NORM_EPS = 1e-5


def _layer_norm(v):
    """(v_hat, rstd): each row of v normalised over its last axis (mean and biased variance, eps
    1e-5, as torch.nn.functional.layer_norm), and 1/sqrt(var + eps) as (rows, 1)."""
    mean = v.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt(((v - mean) ** 2).mean(axis=-1, keepdims=True) + LAYER_NORM_EPS)
    return (v - mean) * rstd, rstd


def _layer_norm_backward(du, saved):
    """The gradient reaching v from du, that of v_hat (saved: _layer_norm's (v_hat, rstd))."""
    v_hat, rstd = saved
    mean_du = du.mean(axis=-1, keepdims=True)
    return rstd * (du - mean_du - v_hat * (du * v_hat).mean(axis=-1, keepdims=True))


def _sigmoid(a):
    with np.errstate(over="ignore"):  # exp(-a) = inf for very negative a gives the right 0
        return 1 / (1 + np.exp(-a))


# ---- recurrent dropout and zoneout: the masks -------------------------------------------------


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[np.ndarray, ...]:
    """The four 32-bit words of Philox-4x32-10 (Salmon et al. 2011) of counters (c0, c1, c2, c3)
    under key (k0, k1), elementwise over broadcast uint32 arrays."""
    u32 = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, np.uint64) for c in np.broadcast_arrays(c0, c1, c2, c3))
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & u32, (k1 + np.uint64(0xBB67AE85)) & u32
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & u32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & u32,
        )
    return tuple(c.astype(np.uint32) for c in (c0, c1, c2, c3))


def _keeps(noise: Noise, purpose: str, p_threshold: int, t: int, N: int, H: int) -> np.ndarray:
    """(N, H) bool: which elements of step t are kept (rnnfast/_validate.Noise, noise.h): word
    t % 4 of Philox(unit, row, t // 4, stream and purpose) against the threshold."""
    word = (noise.stream << 4) | MASK_KINDS[purpose]
    units, rows = np.arange(H, dtype=np.uint64)[None, :], np.arange(N, dtype=np.uint64)[:, None]
    draws = philox4x32_10(units, rows, t // 4, word, noise.seed & 0xFFFFFFFF, noise.seed >> 32)
    return draws[t % 4] >= p_threshold


def recurrent_masks(kind: str, p: float, seed: int, T: int, N: int, H: int, *,
                    noise_stream: int = 0) -> np.ndarray:  # fmt: skip
    """As rnnfast.ops.recurrent_masks, computed here in NumPy."""
    noise = check_mask_request(kind, p, seed, noise_stream)
    if noise is None:
        return np.ones((T, N, H), bool)
    step = (lambda t: 0) if kind == "variational" else (lambda t: t)  # one mask a sequence
    masks = [_keeps(noise, kind, noise.candidate_threshold, step(t), N, H) for t in range(T)]
    return np.stack(masks) if masks else np.ones((0, N, H), bool)


# ---- the cells --------------------------------------------------------------------------------
# A cell owns its recurrent products, as in the kernels. step(a_x, h, c, w) -> (h_new, c_new,
# saved): a_x the input projection with b_ih, w the step's weights (_StepWeights); c and c_new are
# None for cells without a cell state. step_backward(saved, h, dh, dc, w) -> (da_x, dh_prev,
# dc_prev, grads): dh and dc are the total gradients reaching h_new and c_new, da_x that of a_x,
# dh_prev and dc_prev those of the old state, grads this step's share of the recurrent
# parameters' gradients (dw_hh, db_hh and dw_peephole where the cell has it).


class _StepWeights(NamedTuple):
    w_hh: np.ndarray  # (G*H, H) as given: the backward's products
    w_hh_rounded: np.ndarray  # the forward's (rounded to bfloat16 for that precision)
    b_hh: np.ndarray | None
    w_peephole: np.ndarray | None  # (3, H) rows i, f, o
    w_hr: np.ndarray | None  # (P, H) the projection, as given
    w_hr_rounded: np.ndarray | None  # and for the forward's product
    rounded: Callable  # what the forward's products do to their left operand
    drop: np.ndarray | None = None  # (N, H) this step's candidate scale: 0 or 1/(1-p)
    vscale: np.ndarray | None = None  # (N, R) variational dropout's scale of the products' input
    layer_norm: tuple | None = None  # (gamma_ih, gamma_hh, gamma_c, beta_c), or None

    def inp(self, h):
        """What the recurrent products multiply where they are given h: h * vscale."""
        return h if self.vscale is None else h * self.vscale

    def recur(self, h, rows=slice(None)):
        """inp(h) W_hh^T + b_hh for the gate rows ``rows`` of W_hh."""
        return self.recur_saving(h, rows)[0]

    def recur_saving(self, h, rows=slice(None)):
        """(recur(h, rows), what back needs of it): with layer norm the product is
        LN(inp(h) W_hh^T) * gamma_hh + b_hh, and the second item is _layer_norm's (v_hat, rstd);
        else None."""
        a = self.rounded(self.inp(h)) @ self.w_hh_rounded[rows].T
        saved = None
        if self.layer_norm is not None:
            v_hat, rstd = saved = _layer_norm(a)
            a = v_hat * self.layer_norm[1][rows]
        return (a if self.b_hh is None else a + self.b_hh[rows]), saved

    def raw(self, da, ln=None):
        """The gradient of the raw product inp(h) W_hh^T from da, that of recur's output."""
        return da if ln is None else _layer_norm_backward(da * self.layer_norm[1], ln)

    def back(self, da, rows=slice(None), ln=None):
        """The gradient reaching h through recur(h, rows) from that of its output, da (ln: what
        recur_saving kept)."""
        return self.inp(self.raw(da, ln) @ self.w_hh[rows])


def _recurrent_grads(da_h, h_in, w: _StepWeights, ln=None, **more) -> dict:
    """This step's dw_hh (raw(da_h)^T inp(h_in)), db_hh and with layer norm dln_gamma_hh, plus
    ``more``."""
    grads = {"dw_hh": w.raw(da_h, ln).T @ w.inp(h_in), "db_hh": da_h.sum(axis=0), **more}
    if ln is not None:
        grads["dln_gamma_hh"] = (da_h * ln[0]).sum(axis=0)
    return grads


def _lstm_cell(coupled: bool):
    """The LSTM's step pair; coupled: f = 1 - i with gate blocks i, g, o. Peepholes where
    w.w_peephole is given: i and f see c, o sees c_new. A projection where w.w_hr is given:
    h_new = (o * tanh(c_new)) W_hr^T."""

    def step(a_x, h, c, w):
        a_h, ln_h = w.recur_saving(h)
        a = a_x + a_h
        if coupled:
            a_i, a_g, a_o = np.split(a, 3, axis=1)
        else:
            a_i, a_f, a_g, a_o = np.split(a, 4, axis=1)
        p = w.w_peephole
        if p is not None:
            a_i = a_i + p[0] * c
            if not coupled:
                a_f = a_f + p[1] * c
        i = _sigmoid(a_i)
        f = 1 - i if coupled else _sigmoid(a_f)
        g = np.tanh(a_g)
        c_new = f * c + i * (g if w.drop is None else g * w.drop)
        if p is not None:
            a_o = a_o + p[2] * c_new
        o = _sigmoid(a_o)
        ln_c = None
        if w.layer_norm is None:
            h_new = m = o * np.tanh(c_new)
        else:  # h = o * tanh(LN(c) * gamma_c + beta_c)
            c_hat, _ = ln_c = _layer_norm(c_new)
            h_new = m = o * np.tanh(c_hat * w.layer_norm[2] + w.layer_norm[3])
        if w.w_hr is not None:
            h_new = w.rounded(m) @ w.w_hr_rounded.T
        return h_new, c_new, (i, f, g, o, c, c_new, m, ln_h, ln_c)

    def step_backward(saved, h, dh, dc, w):
        i, f, g, o, c_prev, c, m, ln_h, ln_c = saved
        more = {}
        if w.w_hr is not None:  # back through the projection: dh becomes that of m
            more["dw_hr"] = dh.T @ m
            dh = dh @ w.w_hr
        p = w.w_peephole
        if ln_c is None:
            tc = np.tanh(c)
            da_o = dh * tc * o * (1 - o)
            dc = dc + dh * o * (1 - tc * tc)
        else:
            gamma_c, beta_c = w.layer_norm[2:]
            tc = np.tanh(ln_c[0] * gamma_c + beta_c)
            da_o = dh * tc * o * (1 - o)
            d_out = dh * o * (1 - tc * tc)  # reaching LN(c) * gamma_c + beta_c
            dc = dc + _layer_norm_backward(d_out * gamma_c, ln_c)
            more["dln_gamma_c"] = (d_out * ln_c[0]).sum(axis=0)
            more["dln_beta_c"] = d_out.sum(axis=0)
        if p is not None:
            dc = dc + da_o * p[2]
        drop = 1 if w.drop is None else w.drop
        if coupled:
            da_i = dc * (g * drop - c_prev) * i * (1 - i)
            da_f = np.zeros_like(da_i)
        else:
            da_i = dc * g * drop * i * (1 - i)
            da_f = dc * c_prev * f * (1 - f)
        da_g = dc * i * drop * (1 - g * g)
        dc_prev = dc * f
        if p is not None:
            dc_prev = dc_prev + da_i * p[0] + da_f * p[1]
            more["dw_peephole"] = np.stack([(da_i * c_prev).sum(0), (da_f * c_prev).sum(0),
                                            (da_o * c).sum(0)])  # fmt: skip
        blocks = [da_i, da_g, da_o] if coupled else [da_i, da_f, da_g, da_o]
        da = np.concatenate(blocks, axis=1)
        return da, w.back(da, ln=ln_h), dc_prev, _recurrent_grads(da, h, w, ln_h, **more)

    return step, step_backward


def _gru_step(a_x, h, c, w):
    x_r, x_z, x_n = np.split(a_x, 3, axis=1)
    a_h, ln_h = w.recur_saving(h)
    hh_r, hh_z, hh_n = np.split(a_h, 3, axis=1)
    r = _sigmoid(x_r + hh_r)
    z = _sigmoid(x_z + hh_z)
    n = np.tanh(x_n + r * hh_n)
    drop = 1 if w.drop is None else w.drop
    h_new = (1 - z) * (n * drop) + z * h
    return h_new, None, (r, z, n, hh_n, ln_h)


def _gru_step_backward(saved, h, dh, dc, w):
    r, z, n, hh_n, ln_h = saved
    drop = 1 if w.drop is None else w.drop
    da_n = dh * drop * (1 - z) * (1 - n * n)
    da_z = dh * (h - n * drop) * z * (1 - z)
    da_r = da_n * hh_n * r * (1 - r)
    # r multiplies the recurrent part of n only: a_h's n slot gets da_n * r, a_x's gets da_n
    da_x = np.concatenate([da_r, da_z, da_n], axis=1)
    da_h = np.concatenate([da_r, da_z, da_n * r], axis=1)
    return da_x, dh * z + w.back(da_h, ln=ln_h), None, _recurrent_grads(da_h, h, w, ln_h)


def _gru_reset_before_step(a_x, h, c, w):
    H = h.shape[1]
    x_r, x_z, x_n = np.split(a_x, 3, axis=1)
    hh_r, hh_z = np.split(w.recur(h, slice(0, 2 * H)), 2, axis=1)
    r = _sigmoid(x_r + hh_r)
    z = _sigmoid(x_z + hh_z)
    rh = r * h  # the reset gate acts on h before the candidate's product
    n = np.tanh(x_n + w.recur(rh, slice(2 * H, 3 * H)))
    drop = 1 if w.drop is None else w.drop
    h_new = (1 - z) * (n * drop) + z * h
    return h_new, None, (r, z, n, rh)


def _gru_reset_before_step_backward(saved, h, dh, dc, w):
    r, z, n, rh = saved
    H = h.shape[1]
    drop = 1 if w.drop is None else w.drop
    da_n = dh * drop * (1 - z) * (1 - n * n)
    da_z = dh * (h - n * drop) * z * (1 - z)
    drh = da_n @ w.w_hh[2 * H :]  # the gradient of the n product's input, r * inp(h)
    da_r = drh * w.inp(h) * r * (1 - r)
    da_rz = np.concatenate([da_r, da_z], axis=1)
    dh_prev = dh * z + w.inp(drh * r) + w.back(da_rz, slice(0, 2 * H))
    da = np.concatenate([da_r, da_z, da_n], axis=1)
    grads = {"dw_hh": np.concatenate([da_rz.T @ w.inp(h), da_n.T @ w.inp(rh)]),
             "db_hh": da.sum(axis=0)}  # fmt: skip
    return da, dh_prev, None, grads


def _rnn_tanh_step(a_x, h, c, w):
    h_new = np.tanh(a_x + w.recur(h))
    return h_new, None, h_new


def _rnn_tanh_step_backward(h_new, h, dh, dc, w):
    da = dh * (1 - h_new * h_new)
    return da, w.back(da), None, _recurrent_grads(da, h, w)


def _rnn_relu_step(a_x, h, c, w):
    h_new = np.maximum(a_x + w.recur(h), 0)  # a NaN stays NaN, as in torch.relu and the kernels
    return h_new, None, h_new


def _rnn_relu_step_backward(h_new, h, dh, dc, w):
    # relu'(0) = 0 as in torch; a NaN output passes its gradient on, as the kernels (cell.h) do
    da = np.where((h_new > 0) | np.isnan(h_new), dh, 0)
    return da, w.back(da), None, _recurrent_grads(da, h, w)


class _Cell(NamedTuple):
    step: Callable
    step_backward: Callable


_CELLS = {
    "lstm": _Cell(*_lstm_cell(coupled=False)),
    "gru": _Cell(_gru_step, _gru_step_backward),
    "rnn_tanh": _Cell(_rnn_tanh_step, _rnn_tanh_step_backward),
    "rnn_relu": _Cell(_rnn_relu_step, _rnn_relu_step_backward),
    "lstm_cifg": _Cell(*_lstm_cell(coupled=True)),
    "gru_reset_before": _Cell(_gru_reset_before_step, _gru_reset_before_step_backward),
}


# ---- the loop skeleton ------------------------------------------------------------------------


class _Saved(NamedTuple):
    hs: np.ndarray  # (T, N, H): the state h before each step
    steps: list  # per step, what the cell's step returned for its backward
    ln_x: tuple | None = None  # with layer norm: _layer_norm's (v_hat, rstd) of x W_ih^T


@dataclass(frozen=True)
class ReferenceContext:
    """What backward needs from a reference forward. ``saved`` is None for an inference forward."""

    cell: str
    inputs: Checked
    saved: _Saved | None
    noise: Noise | None = None

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


def _step_weights(a: Checked, rounded=lambda m: m) -> _StepWeights:
    w_hr = a.w_hr
    return _StepWeights(a.w_hh, rounded(a.w_hh), a.b_hh, a.w_peephole, w_hr,
                        None if w_hr is None else rounded(w_hr), rounded,
                        layer_norm=a.layer_norm)  # fmt: skip


def _variational(w: _StepWeights, noise: Noise | None, N: int, R: int, dtype) -> _StepWeights:
    """w with variational dropout's scale of h_{t-1} where the products take it (one mask a row
    for the whole sequence: Philox step 0)."""
    if noise is None or noise.variational == 0:
        return w
    kept = _keeps(noise, "variational", noise.variational_threshold, 0, N, R)
    return w._replace(vscale=np.where(kept, 1 / (1 - noise.variational), 0).astype(dtype))


def forward(cell: str, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
            training=True, matmul_precision="float32", w_peephole=None, w_hr=None,
            recurrent_dropout=0.0, recurrent_dropout_mode="semeniuta", zoneout=0.0, seed=None,
            noise_stream=0, ln_gamma_ih=None, ln_gamma_hh=None, ln_gamma_c=None,
            ln_beta_c=None):  # fmt: skip
    """Any cell over a whole sequence, by name; returns ``(y, h_n, c_n, ctx)`` as
    rnnfast.ops.forward (c_n None for a cell without a cell state).

    Layer norm: a_x = LN(x_t W_ih^T) * gamma_ih + b_ih and a_h = LN(h W_hh^T) * gamma_hh + b_hh
    in place of the two projections, and the LSTM's h' = o * tanh(LN(c') * gamma_c + beta_c),
    LN normalising each row over its features (all G*H gate columns; H for c).

    Recurrent dropout (Semeniuta): the candidate enters the state as g * d (LSTM, c = f c + i g d)
    or n * d (GRU, h = (1 - z) n d + z h), d = keep / (1 - p) from the step's candidate mask;
    training only. Variational: every recurrent product multiplies h * v (the reset-before GRU's
    r * h * v), v = keep / (1 - p) from one mask per row for the whole sequence.
    Zoneout: h_t = h_new where the step's zoneout mask takes it, else h_{t-1};
    with training=False, h_t = p h_{t-1} + (1 - p) h_new. Masks: ``recurrent_masks``."""
    spec = cell_spec(cell)
    cell = spec.name
    bf16 = check_matmul_precision(matmul_precision)
    noise = check_noise(cell, recurrent_dropout, recurrent_dropout_mode, zoneout, seed,
                        noise_stream, projection=w_hr is not None)  # fmt: skip
    rounded = _round_to_bfloat16 if bf16 else (lambda m: m)  # what the products multiply
    layer_norm = {"ln_gamma_ih": ln_gamma_ih, "ln_gamma_hh": ln_gamma_hh,
                  "ln_gamma_c": ln_gamma_c, "ln_beta_c": ln_beta_c}  # fmt: skip
    a = check_forward_inputs(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths,
                             w_peephole=w_peephole, w_hr=w_hr, layer_norm=layer_norm)  # fmt: skip
    T, N, _, R = a.dims  # R: the size of h (P with a projection), H that of c
    H = a.cell_size
    dtype = a.x.dtype
    step = _CELLS[cell].step
    active = _active(a)
    w = _variational(_step_weights(a, rounded), noise if training else None, N, R, dtype)

    h = np.zeros((N, R), dtype) if a.h0 is None else a.h0.copy()
    c = None
    if spec.has_c:
        c = np.zeros((N, H), dtype) if a.c0 is None else a.c0.copy()
    # (T, N, G*H): every step's input projection at once; the padding is never read
    a_x = rounded(np.where(active, a.x, 0)) @ rounded(a.w_ih).T
    ln_x = None
    if a.layer_norm is not None:
        x_hat, _ = ln_x = _layer_norm(a_x)
        a_x = x_hat * a.layer_norm[0]
    if a.b_ih is not None:
        a_x = a_x + a.b_ih

    y = np.zeros((T, N, R), dtype)
    hs = np.zeros((T, N, R), dtype)
    steps = []
    for t in range(T):
        w_t = w
        if noise is not None and noise.candidate > 0 and training:
            kept = _keeps(noise, "candidate", noise.candidate_threshold, t, N, H)
            w_t = w._replace(drop=np.where(kept, 1 / (1 - noise.candidate), 0).astype(dtype))
        h_new, c_new, saved = step(a_x[t], h, c, w_t)
        if noise is not None and noise.zoneout > 0:
            p = noise.zoneout
            if training:
                taken = _keeps(noise, "zoneout", noise.zoneout_threshold, t, N, R)
                h_new = np.where(taken, h_new, h)
            else:
                h_new = p * h + (1 - p) * h_new
        m = active[t]
        y[t] = np.where(m, h_new, 0)
        hs[t] = h
        steps.append(saved)
        h = np.where(m, h_new, h)  # finished sequences keep their final state
        if c is not None:
            c = np.where(m, c_new, c)
    ctx = ReferenceContext(cell, a, _Saved(hs, steps, ln_x) if training else None, noise)
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
    T, N, C, R = a.dims
    H = a.cell_size
    GH = spec.gates * H
    dtype = a.x.dtype
    step_backward = _CELLS[cell].step_backward
    active = _active(a)
    hs, steps, ln_x = ctx.saved
    w = _variational(_step_weights(a), ctx.noise, N, R, dtype)

    dh = np.zeros((N, R), dtype) if dh_n is None else dh_n.copy()
    dc = None
    if spec.has_c:
        dc = np.zeros((N, H), dtype) if dc_n is None else dc_n.copy()
    da_x = np.zeros((T, N, GH), dtype)
    sums: dict = {}  # the recurrent parameters' gradients, summed over the steps
    noise = ctx.noise
    for t in reversed(range(T)):
        m = active[t]
        if dy is not None:
            dh = dh + np.where(m, dy[t], 0)  # y is zero past the length: no gradient there
        w_t, carry = w, 0
        if noise is not None and noise.candidate > 0:
            kept = _keeps(noise, "candidate", noise.candidate_threshold, t, N, H)
            w_t = w._replace(drop=np.where(kept, 1 / (1 - noise.candidate), 0).astype(dtype))
        dh_step = dh
        if noise is not None and noise.zoneout > 0:  # a zoned-out unit passes dh to h_{t-1}
            taken = _keeps(noise, "zoneout", noise.zoneout_threshold, t, N, R)
            dh_step, carry = np.where(taken, dh, 0), np.where(taken, 0, dh)
        # a padded row takes no part in the step: zero gradients in, its dh and dc passed on
        gx, dh_prev, dc_prev, grads = step_backward(
            steps[t],
            hs[t],
            np.where(m, dh_step, 0),
            None if dc is None else np.where(m, dc, 0),
            w_t,
        )
        dh_prev = dh_prev + carry
        da_x[t] = np.where(m, gx, 0)
        for k, v in grads.items():
            sums[k] = sums[k] + v if k in sums else v
        dh = np.where(m, dh_prev, dh)
        if dc is not None:
            dc = np.where(m, dc_prev, dc)

    def summed(name, like):  # a recurrent parameter's gradient (zero for T = 0)
        return sums[name] if name in sums else np.zeros_like(like)

    # back through the x side's layer norm: da_x is that of LN(x W_ih^T) * gamma_ih + b_ih
    dx_raw = da_x if ln_x is None else _layer_norm_backward(da_x * a.layer_norm[0], ln_x)
    grads = {
        "dx": dx_raw @ a.w_ih,
        "dh0": dh,
        # padded rows of x are the caller's and never read: 0 * NaN there must not reach dw_ih
        "dw_ih": dx_raw.reshape(-1, GH).T @ np.where(active, a.x, 0).reshape(-1, C),
        "dw_hh": summed("dw_hh", a.w_hh),
        "db_ih": None if a.b_ih is None else da_x.sum(axis=(0, 1)),
        "db_hh": None if a.b_hh is None else summed("db_hh", a.b_hh),
        "dc0": dc,
        "dw_peephole": None if a.w_peephole is None else summed("dw_peephole", a.w_peephole),
        "dw_hr": None if a.w_hr is None else summed("dw_hr", a.w_hr),
    }
    if a.layer_norm is not None:
        gamma_ih, gamma_hh, gamma_c, beta_c = a.layer_norm
        grads["dln_gamma_ih"] = (da_x * ln_x[0]).sum(axis=(0, 1))
        grads["dln_gamma_hh"] = summed("dln_gamma_hh", gamma_hh)
        if gamma_c is not None:
            grads["dln_gamma_c"] = summed("dln_gamma_c", gamma_c)
            grads["dln_beta_c"] = summed("dln_beta_c", beta_c)
    names = spec.grads_of(a.w_peephole is not None, a.w_hr is not None, a.layer_norm is not None)
    return {k: grads[k] for k in names}


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

    ``w_peephole`` (3, H) = [p_i, p_f, p_o] adds peepholes (Gers & Schmidhuber 2000):

        i = s(a_i + p_i * c)    f = s(a_f + p_f * c)    o = s(a_o + p_o * c')

    ``coupled_input_forget=True`` couples the gates (CIFG): a has three blocks i, g, o (w_ih
    (3H, C), w_hh (3H, H), biases (3H,)) and f = 1 - i; p_f is then unused.

    ``w_hr`` (P, H), 0 < P < H, projects h (LSTMP, Sak et al. 2014; torch's proj_size):

        h' = (o * tanh(c')) W_hr^T

    so h, h0, h_n and y_t are (N, P) and w_hh is (4H, P) (3H with coupled gates); c stays (N, H).
    """,
    "lstm_backward": """Gradients of an LSTM forward: dict with dx dh0 dc0 dw_ih dw_hh db_ih db_hh.

    Backward through one step, from the total gradients dh' and dc' reaching h' and c':

        dc  = dc' + dh' * o * (1 - tanh(c')^2)
        da_o = dh' * tanh(c') * o (1 - o)     da_i = dc * g * i (1 - i)
        da_f = dc * c * f (1 - f)             da_g = dc * i * (1 - g^2)
        dc_prev = dc * f                      dh_prev = da W_hh

    With peepholes, dc also takes da_o * p_o, dc_prev takes da_i * p_i + da_f * p_f, and
    dw_peephole = [sum da_i * c, sum da_f * c, sum da_o * c'] over steps and rows. Coupled:
    da_i = dc * (g - c) * i (1 - i), da_f = 0. With a projection, dh' above is dh' W_hr (the
    gradient of m = o * tanh(c')), and dw_hr = sum dh'^T m.

    dy (T, N, H), dh_n and dc_n (N, H) may each be None (zero). db_* is None where the forward
    had no bias.
    """,
    "gru_forward": """GRU over a whole sequence, gate order r, z, n. Returns ``(y, h_n, ctx)``.

    Per step, with a_x and a_h each split into r, z, n blocks of (N, H) (the reset gate multiplies
    the recurrent product including its bias, as in PyTorch and cuDNN):

        r = s(ax_r + ah_r)    z = s(ax_z + ah_z)    n = tanh(ax_n + r * ah_n)
        h' = (1 - z) * n + z * h                     y_t = h'

    ``reset_after=False`` applies r to h before the candidate's product (Cho et al. 2014):

        n = tanh(ax_n + (r * h) W_hn^T + b_hn)

    Shapes as lstm_forward with G = 3 and no c0.
    """,
    "gru_backward": """Gradients of a GRU forward: dict with dx dh0 dw_ih dw_hh db_ih db_hh.

    Backward through one step, from the total gradient dh' reaching h':

        dax_n = dh' * (1 - z) * (1 - n^2)     dah_n = dax_n * r
        da_z = dh' * (h - n) * z (1 - z)      da_r = dax_n * ah_n * r (1 - r)
        dh_prev = dh' * z + [da_r, da_z, dah_n] W_hh

    With reset_after=False: da_n = dh' (1 - z)(1 - n^2), d(r*h) = da_n W_hn, da_r = d(r*h) *
    h * r (1 - r), dh_prev = dh' * z + d(r*h) * r + [da_r, da_z] W_h{r,z}, and W_hn's gradient
    is da_n^T (r * h).
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
