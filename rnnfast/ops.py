"""Functional API over the fused kernels: forward and backpropagation through time.

Shapes (time-major): x (T, N, C); states (N, H); y (T, N, H). Weights as PyTorch lays them out:
w_ih (G*H, C), w_hh (G*H, H), b_ih and b_hh (G*H,) or None, with G = 4 (LSTM: i, f, g, o),
3 (GRU: r, z, n) or 1 (RNN). The dtype follows x (float32 or float64); every other array must
match it. Inputs need not be C-contiguous and are never modified.

``lengths`` (1-D integers, size N, each in [0, T]) runs sequence n for lengths[n] steps: its
outputs past that are zero, its final state is the state after its own last step (the initial
state for a length of 0), and padded positions receive no gradient.

A training forward returns a context that holds the reserve for backward; ``training=False``
keeps nothing beyond the outputs and the final state, and its context cannot be differentiated.
The context keeps each input array itself where it is C-contiguous and aligned (changing it in
place before backward changes the gradients) and a contiguous aligned copy otherwise; lengths as
int32 (a copy unless it already is). Padding (x past a sequence's length) is never read: NaN there
reaches no output and no gradient.
In training mode ``y`` is a read-only view of the reserve (backward reads it): copy it before
writing to it.

``matmul_precision="bfloat16"`` (on the CPU, float32 inputs, a CPU with AVX512_BF16; see
``bfloat16_supported()``) rounds the weights and each step's operands of the matrix products to
bfloat16 and sums them in float32, on AMX tiles where the CPU has AMX-BF16 (``build_info()``
reports ``cpu_amx_bf16``), else with AVX512_BF16: about twice the multiply-adds per instruction
(on AMX an order of magnitude more) and half the weight bytes to stream, for outputs that differ
from float32's by up to about 1e-2 relative (3e-3 to 8e-3 over the benchmark grid; the cell state
and the nonlinearities stay float32; bench/RESULTS.md reports the error per shape). In training,
the backward's products (the step's dh, dx and the weight gradients) are bfloat16 too, as
torch.autocast's are: the weights, the state and every gradient stay float32. It always packs the
weights for the call, so a call with few rows in all (T*N of a few dozen or less, as in
token-by-token sampling) runs faster in float32.

GPU arrays (CuPy, or anything with ``__cuda_array_interface__`` or ``__dlpack__``) run on the
CUDA kernels and return CuPy arrays on the same device and stream; see rnnfast.cuda.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _C
from . import cuda as _gpu
from ._validate import (
    LAYER_NORM_NAMES,
    MASK_KINDS,
    Checked,
    check_backward_inputs,
    check_context,
    check_forward_inputs,
    check_mask_request,
    check_matmul_precision,
    check_noise,
)
from .cells import CELLS, cell_spec, public_functions

__all__ = [
    "RecurrentContext",
    "forward",
    "backward",
    "lstm_forward",
    "lstm_backward",
    "gru_forward",
    "gru_backward",
    "rnn_forward",
    "rnn_backward",
    "bfloat16_supported",
    "recurrent_masks",
    "gemm",
]


def bfloat16_supported() -> bool:
    """Whether this CPU runs ``matmul_precision="bfloat16"`` (it needs AVX512_BF16)."""
    return bool(_C.build_info()["cpu_avx512_bf16"])


# the kernels' entry points, one pair per row of the cell table
_KERNELS = {
    name: (getattr(_C, f"{name}_forward"), getattr(_C, f"{name}_backward")) for name in CELLS
}


@dataclass(frozen=True)
class RecurrentContext:
    """What backward needs from a forward call. ``reserve`` is None for an inference forward."""

    cell: str
    inputs: Checked
    reserve: np.ndarray | None
    noise: tuple | None = None  # the forward's dropout and zoneout (rnnfast._validate.Noise)
    bf16: bool = False  # the forward's products were bfloat16 (so are the backward's)

    @property
    def training(self) -> bool:
        return self.reserve is not None


def forward(cell: str, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
            training=True, matmul_precision="float32", w_peephole=None, w_hr=None,
            recurrent_dropout=0.0, recurrent_dropout_mode="semeniuta", zoneout=0.0, seed=None,
            noise_stream=0, ln_gamma_ih=None, ln_gamma_hh=None, ln_gamma_c=None,
            ln_beta_c=None):  # fmt: skip
    """Any cell over a whole sequence, by its name in ``rnnfast.cells.CELLS``.

    Returns ``(y, h_n, c_n, ctx)`` for every cell, c_n None for a cell without a cell state (c0
    must then be None); see the module docstring. ``w_peephole`` (3, H), rows i, f, o, for the
    cells that take peepholes (the LSTMs); ``w_hr`` (P, H), 0 < P < H, a projection for the cells
    that take one (the LSTMs, as torch.nn.LSTM(proj_size=P)): h, h0, h_n and each step of y are
    then (N, P) and w_hh is (G*H, P), while c stays (N, H).

    ``recurrent_dropout=p`` (training only) with ``recurrent_dropout_mode="semeniuta"``
    (Semeniuta et al. 2016) drops units of the candidate (the LSTM's g, the GRU's n) with a fresh
    mask each step, with ``"variational"`` (Gal and Ghahramani 2016; Keras's recurrent_dropout)
    units of h_{t-1} where it enters the recurrent products, one mask per row for the whole
    sequence; kept units are scaled by 1/(1-p). ``zoneout=p`` (Krueger et al. 2016) keeps each
    unit of h at its previous value with probability p each step; with ``training=False`` h is
    p h_{t-1} + (1-p) h_new instead. The masks come from Philox-4x32-10 keyed by ``seed`` (None:
    a fresh one, kept in the context) and counted by (unit, row, step, ``noise_stream``): the same
    seed gives the same masks and bits for any thread count; ``recurrent_masks`` returns them.
    Stacked and bidirectional layers pass noise_stream = 2 * layer + direction.

    Layer normalisation (Ba et al. 2016, as Haste's LayerNormLSTM and LayerNormGRU) for the cells
    that take it (the LSTMs without a projection, the GRU with reset_after=True): ``ln_gamma_ih``
    and ``ln_gamma_hh`` (G*H,) scale each normalised product, and the LSTM's h is
    o * tanh(LN(c) * ``ln_gamma_c`` + ``ln_beta_c``), both (H,); all or none of them. Each row is
    normalised over its features with the biased variance and eps 1e-5 (torch's layer_norm); the
    equations are in rnnfast.reference.lstm_forward and gru_forward.
    """
    layer_norm = {"ln_gamma_ih": ln_gamma_ih, "ln_gamma_hh": ln_gamma_hh,
                  "ln_gamma_c": ln_gamma_c, "ln_beta_c": ln_beta_c}  # fmt: skip
    spec = cell_spec(cell)
    bf16 = check_matmul_precision(matmul_precision)
    noise = check_noise(spec.name, recurrent_dropout, recurrent_dropout_mode, zoneout, seed,
                        noise_stream, projection=w_hr is not None)  # fmt: skip
    if _gpu.is_gpu_array(x):
        if noise is not None and spec.name == "gru_reset_before":
            raise NotImplementedError(
                "recurrent dropout and zoneout on the GPU do not cover the gru_reset_before cell "
                "(the CPU kernels do)"
            )
        if any(v is not None for v in layer_norm.values()):
            raise NotImplementedError("layer norm runs on the CPU kernels only")
        if bf16:
            raise NotImplementedError('matmul_precision="bfloat16" runs on the CPU kernels only')
        if not spec.gpu:
            raise NotImplementedError(f"the {spec.name} cell runs on the CPU kernels only")
        return _gpu.forward(spec.name, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, training,
                            w_peephole, w_hr, noise)  # fmt: skip
    a = check_forward_inputs(spec.name, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths,
                             w_peephole=w_peephole, w_hr=w_hr, layer_norm=layer_norm)  # fmt: skip
    if bf16 and a.x.dtype != np.float32:
        raise TypeError(f'matmul_precision="bfloat16" takes float32 inputs, got {a.x.dtype}')
    kernel, _ = _KERNELS[spec.name]
    y, h_n, c_n, reserve = kernel(
        a.x, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.h0, a.c0, a.lengths, bool(training), bf16,
        a.w_peephole, a.w_hr, noise, a.layer_norm,
    )  # fmt: skip
    if reserve is not None:
        y.flags.writeable = False
    return y, h_n, c_n, RecurrentContext(spec.name, a, reserve, noise, bf16)


def backward(ctx, dy=None, dh_n=None, dc_n=None, *, cell: str | None = None) -> dict:
    """Gradients of a training forward, for any cell: a dict keyed by
    ``cell_spec(ctx.cell).grad_names`` (dx dh0 [dc0] dw_ih dw_hh db_ih db_hh), and dw_peephole
    and dw_hr where the forward had w_peephole and w_hr.

    dy (T, N, H), dh_n and dc_n (N, H) may each be None (zero); dc_n only for a cell with a cell
    state. db_* is None where the forward had no bias. ``cell``, where given, is the cell the
    context must come from.
    """
    if cell is None:
        if not isinstance(ctx, (RecurrentContext, _gpu.CudaContext)):
            raise TypeError("backward needs the context returned by rnnfast.ops.forward")
        cell = ctx.cell
    spec = cell_spec(cell)
    if isinstance(ctx, _gpu.CudaContext) and ctx.cell == spec.name:
        return _gpu.backward(spec.name, ctx, dy, dh_n, dc_n)
    check_context(spec.name, ctx, RecurrentContext, "rnnfast.ops")
    a = ctx.inputs
    dy, dh_n, dc_n = check_backward_inputs(spec.name, a, dy, dh_n, dc_n)
    _, kernel = _KERNELS[spec.name]
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_peephole, dw_hr, dln = kernel(
        a.x, a.w_ih, a.w_hh, a.b_ih is not None, a.b_hh is not None, a.lengths, ctx.reserve,
        dy, dh_n, dc_n, a.w_peephole, a.w_hr, ctx.noise, a.layer_norm, ctx.bf16,
    )  # fmt: skip
    grads = {"dx": dx, "dh0": dh0, "dc0": dc0, "dw_ih": dw_ih, "dw_hh": dw_hh, "db_ih": db_ih,
             "db_hh": db_hh, "dw_peephole": dw_peephole, "dw_hr": dw_hr}  # fmt: skip
    if dln is not None:
        grads.update(zip(("d" + k for k in LAYER_NORM_NAMES), dln, strict=True))
    names = spec.grads_of(a.w_peephole is not None, a.w_hr is not None, a.layer_norm is not None)
    return {k: grads[k] for k in names}


def recurrent_masks(kind: str, p: float, seed: int, T: int, N: int, H: int, *,
                    noise_stream: int = 0) -> np.ndarray:  # fmt: skip
    """The masks a training forward with these arguments draws: bool (T, N, H), True where a
    unit is kept. ``kind`` "candidate": the candidate units recurrent dropout keeps (scaled by
    1/(1-p)) at step t, row n; "zoneout": the units of h that take their new value (False: h keeps
    its previous value); "variational": the units of h_{t-1} that enter the recurrent products,
    one mask per row for the whole sequence (every step's is the same; T = 1 gives it). Steps
    count in the order the call runs them."""
    noise = check_mask_request(kind, p, seed, noise_stream)
    if noise is None:
        return np.ones((T, N, H), bool)
    steps = min(T, 1) if kind == "variational" else T  # its counter's step is always 0
    masks = _C.recurrent_masks(MASK_KINDS[kind], noise.seed, noise.stream,
                               noise.candidate_threshold, steps, N, H)  # fmt: skip
    return np.repeat(masks, T, axis=0) if kind == "variational" else masks


def _scratch_array(shape, dtype) -> np.ndarray:
    """An uninitialised array from the kernels' scratch cache, as their own outputs: the arrays
    a training step makes afresh each step (a product's output, the layers' copy of y) would
    otherwise be new pages each time, which the OS faults in and zeroes (bench/RESULTS.md,
    session 14)."""
    return _C.empty(tuple(int(e) for e in shape), np.dtype(dtype))


def _matrix(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    # NumPy's own dtype object (a '<f4' from a buffer is not it) in C order
    return np.ascontiguousarray(a, dtype=np.dtype(a.dtype.name))


def gemm(a, b, *, trans_a: bool = False, trans_b: bool = False, out=None,
         accumulate: bool = False, matmul_precision: str = "float32") -> np.ndarray:  # fmt: skip
    """op(a) @ op(b) for 2-D float32 or float64 arrays (op transposes where asked), on the
    kernels' threads (``set_num_threads``) and rnnfast's BLAS: the products of the layers around
    the recurrent kernels (Linear, the output head), which NumPy's serial BLAS would run on one
    core. The bits do not depend on the thread count. ``out``: a C-contiguous (M, N) array of the
    dtype to write (with ``accumulate=True``, to add to) in place; it must not overlap a or b.
    ``matmul_precision="bfloat16"`` (float32, without accumulate) rounds both operands to
    bfloat16 and sums in float32, as the recurrent kernels' bfloat16 products (AMX tiles where
    the CPU has them)."""
    bf16 = check_matmul_precision(matmul_precision)
    a, b = _matrix("a", a), _matrix("b", b)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have one dtype, got {a.dtype} and {b.dtype}")
    M, N = a.shape[1 if trans_a else 0], b.shape[0 if trans_b else 1]
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True adds to out, so it needs out")
        out = _scratch_array((M, N), a.dtype)
    elif not isinstance(out, np.ndarray) or out.dtype != a.dtype:
        raise TypeError(f"out must be a {a.dtype} ndarray")
    if bf16 and (a.dtype != np.float32 or accumulate):
        raise (TypeError if a.dtype != np.float32 else ValueError)(
            'matmul_precision="bfloat16" takes float32 inputs and overwrites out (no accumulate)'
        )
    _C.gemm(a, b, out, trans_a, trans_b, accumulate, bf16)
    return out


_DOCS = {
    "lstm_forward": """LSTM over a whole sequence. Returns ``(y, h_n, c_n, ctx)``; see the
    module docstring. ``w_peephole`` (3, H), rows i, f, o, adds peepholes; with
    ``coupled_input_forget=True`` f = 1 - i and the weights hold three gate blocks i, g, o (the
    equations are in rnnfast.reference.lstm_forward).""",
    "lstm_backward": """Gradients of an LSTM forward: dict with dx dh0 dc0 dw_ih dw_hh db_ih
    db_hh, and dw_peephole where the forward had peepholes. dy (T, N, H), dh_n and dc_n (N, H)
    may each be None (zero). db_* is None where the forward had no bias.""",
    "gru_forward": """GRU over a whole sequence. Returns ``(y, h_n, ctx)``; see the module
    docstring. ``reset_after=False`` applies r to h before the candidate's recurrent product
    (Cho et al. 2014; rnnfast.reference.gru_forward has the equations).""",
    "gru_backward": "Gradients of a GRU forward: dict with dx dh0 dw_ih dw_hh db_ih db_hh.",
    "rnn_forward": """Vanilla RNN (h = act(x W_ih^T + b_ih + h W_hh^T + b_hh)), act tanh or
    relu. Returns ``(y, h_n, ctx)``; see the module docstring.""",
    "rnn_backward": """Gradients of a vanilla RNN forward: dict with dx dh0 dw_ih dw_hh db_ih
    db_hh.""",
}
lstm_forward, lstm_backward, gru_forward, gru_backward, rnn_forward, rnn_backward = (
    public_functions(forward, backward, __name__, _DOCS)
)
