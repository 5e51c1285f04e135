"""The cell table: every recurrent cell rnnfast knows, one row each, and the public per-cell
functions made from it.

Everything that differs between cells in the Python layer is read from a row here (the argument
checks, ``rnnfast.ops``, ``rnnfast.reference``, ``rnnfast.cuda``, the layers, the tests and the
benchmarks); nothing tests a cell by name. A new cell is a new row (plus its kernels and its
reference step); an unknown name raises, it never falls back to another cell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CELLS", "CellSpec", "cell_spec", "family_cell", "public_functions", "rnn_cell"]


@dataclass(frozen=True)
class CellSpec:
    """One cell. ``name`` is what the kernels, contexts and layers call it."""

    name: str  # "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cifg", "gru_reset_before"
    gates: int  # G: w_ih is (G*H, C), w_hh (G*H, H), the biases (G*H,)
    has_c: bool  # carries a cell state: takes c0 and dc_n, returns c_n and dc0
    family: str  # the public functions' stem: <family>_forward, <family>_backward
    # the family's options that select this row, as the public functions and layers name them
    options: tuple[tuple[str, object], ...] = ()
    peephole: bool = False  # takes the optional w_peephole (3, H), rows i, f, o
    projection: bool = False  # takes the optional w_hr (P, H): h = (o * tanh(c)) W_hr^T
    # takes layer normalisation's gains (and, with c, c's gain and bias): ln_gamma_ih ...
    layer_norm: bool = False
    gpu: bool = True  # the CUDA backend has kernels for it
    gpu_persistent: bool = True  # and its persistent recurrence runs it (one product a step)
    torch: bool = True  # torch.nn has the same cell (an oracle for the tests)

    @property
    def grad_names(self) -> tuple[str, ...]:
        """The keys of a backward's gradient dict, in the documented order (without peepholes)."""
        c = ("dc0",) if self.has_c else ()
        return ("dx", "dh0", *c, "dw_ih", "dw_hh", "db_ih", "db_hh")

    @property
    def layer_norm_names(self) -> tuple[str, ...]:
        """Layer norm's parameters, as the functions and layers name them."""
        c = ("ln_gamma_c", "ln_beta_c") if self.has_c else ()
        return ("ln_gamma_ih", "ln_gamma_hh", *c) if self.layer_norm else ()

    def grads_of(self, peephole: bool = False, projection: bool = False,
                 layer_norm: bool = False) -> tuple[str, ...]:  # fmt: skip
        """grad_names, plus dw_peephole, dw_hr and layer norm's (d + its names) where the
        forward had them."""
        ln = tuple("d" + k for k in self.layer_norm_names) if layer_norm else ()
        return (self.grad_names + (("dw_peephole",) if peephole else ())
                + (("dw_hr",) if projection else ()) + ln)  # fmt: skip


# fmt: off
CELLS: dict[str, CellSpec] = {
    s.name: s
    for s in (
        CellSpec("lstm", 4, has_c=True, family="lstm",
                 options=(("coupled_input_forget", False),), peephole=True, projection=True,
                 layer_norm=True),
        CellSpec("gru", 3, has_c=False, family="gru", options=(("reset_after", True),),
                 layer_norm=True),
        CellSpec("rnn_tanh", 1, has_c=False, family="rnn", options=(("nonlinearity", "tanh"),)),
        CellSpec("rnn_relu", 1, has_c=False, family="rnn", options=(("nonlinearity", "relu"),)),
        # f = 1 - i (Greff et al. 2017): three gate blocks i, g, o
        CellSpec("lstm_cifg", 3, has_c=True, family="lstm",
                 options=(("coupled_input_forget", True),), peephole=True, projection=True,
                 layer_norm=True, torch=False),
        # n = tanh(x W_in^T + b_in + (r * h) W_hn^T + b_hn): Cho et al. 2014, Keras's
        # reset_after=False, ONNX's linear_before_reset=0
        CellSpec("gru_reset_before", 3, has_c=False, family="gru",
                 options=(("reset_after", False),), torch=False, gpu_persistent=False),
    )
}
# fmt: on


def family_cell(family: str, **options) -> str:
    """The cell of ``family`` ("lstm", "gru", "rnn") with these options, e.g.
    ``family_cell("gru", reset_after=False)``; ValueError naming the option for a bad value."""
    rows = [s for s in CELLS.values() if s.family == family]
    for key, value in options.items():
        known = [v for s in rows for k, v in s.options if k == key]
        if not known:
            raise TypeError(f"{family} has no option {key!r}")
        if isinstance(value, bool) != isinstance(known[0], bool) or value not in known:
            raise ValueError(f"{key} must be one of {known}, got {value!r}")
        rows = [s for s in rows if (key, value) in s.options]
    return rows[0].name


def cell_spec(name) -> CellSpec:
    """The row of ``name``; ValueError naming the known cells for anything else."""
    spec = CELLS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown cell {name!r}; rnnfast has {sorted(CELLS)}")
    return spec


def rnn_cell(nonlinearity) -> str:
    """The vanilla RNN's cell name for ``nonlinearity`` ("tanh" or "relu")."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return family_cell("rnn", nonlinearity=nonlinearity)


def public_functions(forward: Callable, backward: Callable, api: str, docs: dict[str, str]):
    """The six per-cell functions (lstm_, gru_, rnn_ forward and backward) over a module's
    uniform pair, for rnnfast.ops and rnnfast.reference alike.

    forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, *, lengths, training, matmul_precision,
    w_peephole, w_hr, recurrent_dropout, recurrent_dropout_mode, zoneout, seed, noise_stream,
    ln_gamma_ih, ln_gamma_hh, ln_gamma_c, ln_beta_c) returns (y, h_n, c_n or None, ctx);
    backward(ctx, dy, dh_n, dc_n, *, cell) returns the gradient dict and checks that ctx comes
    from a forward of ``cell``. ``api`` is the module's name (for __module__); ``docs`` holds each
    function's docstring.
    """

    def family_backward(family, ctx, dy, dh_n, dc_n):
        cell = getattr(ctx, "cell", None)
        if cell not in CELLS or CELLS[cell].family != family:
            raise TypeError(
                f"{family}_backward needs the context returned by {api}.{family}_forward"
            )
        return backward(ctx, dy, dh_n, dc_n, cell=cell)

    def lstm_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
                     training=True, matmul_precision="float32", w_peephole=None, w_hr=None,
                     coupled_input_forget=False, recurrent_dropout=0.0,
                     recurrent_dropout_mode="semeniuta", zoneout=0.0, seed=None,
                     noise_stream=0, ln_gamma_ih=None, ln_gamma_hh=None, ln_gamma_c=None,
                     ln_beta_c=None):  # fmt: skip
        cell = family_cell("lstm", coupled_input_forget=coupled_input_forget)
        return forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths, training=training,
                       matmul_precision=matmul_precision, w_peephole=w_peephole, w_hr=w_hr,
                       recurrent_dropout=recurrent_dropout,
                       recurrent_dropout_mode=recurrent_dropout_mode, zoneout=zoneout, seed=seed,
                       noise_stream=noise_stream, ln_gamma_ih=ln_gamma_ih,
                       ln_gamma_hh=ln_gamma_hh, ln_gamma_c=ln_gamma_c,
                       ln_beta_c=ln_beta_c)  # fmt: skip

    def lstm_backward(ctx, dy, dh_n=None, dc_n=None):
        return family_backward("lstm", ctx, dy, dh_n, dc_n)

    def gru_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, *, lengths=None, training=True,
                    matmul_precision="float32", reset_after=True, recurrent_dropout=0.0,
                    recurrent_dropout_mode="semeniuta", zoneout=0.0, seed=None,
                    noise_stream=0, ln_gamma_ih=None, ln_gamma_hh=None):  # fmt: skip
        cell = family_cell("gru", reset_after=reset_after)
        y, h_n, _, ctx = forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, None, lengths=lengths,
                                 training=training, matmul_precision=matmul_precision,
                                 recurrent_dropout=recurrent_dropout,
                                 recurrent_dropout_mode=recurrent_dropout_mode, zoneout=zoneout,
                                 seed=seed, noise_stream=noise_stream, ln_gamma_ih=ln_gamma_ih,
                                 ln_gamma_hh=ln_gamma_hh)  # fmt: skip
        return y, h_n, ctx

    def gru_backward(ctx, dy, dh_n=None):
        return family_backward("gru", ctx, dy, dh_n, None)

    def rnn_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, *, nonlinearity="tanh",
                    lengths=None, training=True, matmul_precision="float32", recurrent_dropout=0.0,
                    recurrent_dropout_mode="variational", zoneout=0.0, seed=None,
                    noise_stream=0):  # fmt: skip
        y, h_n, _, ctx = forward(rnn_cell(nonlinearity), x, w_ih, w_hh, b_ih, b_hh, h0, None,
                                 lengths=lengths, training=training,
                                 matmul_precision=matmul_precision,
                                 recurrent_dropout=recurrent_dropout,
                                 recurrent_dropout_mode=recurrent_dropout_mode, zoneout=zoneout,
                                 seed=seed, noise_stream=noise_stream)  # fmt: skip
        return y, h_n, ctx

    def rnn_backward(ctx, dy, dh_n=None):
        return family_backward("rnn", ctx, dy, dh_n, None)

    functions = (lstm_forward, lstm_backward, gru_forward, gru_backward, rnn_forward, rnn_backward)
    for f in functions:
        f.__module__ = api
        f.__qualname__ = f.__name__
        f.__doc__ = docs[f.__name__]
    return functions
