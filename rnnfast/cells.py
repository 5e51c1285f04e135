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

__all__ = ["CELLS", "CellSpec", "cell_spec", "public_functions", "rnn_cell"]


@dataclass(frozen=True)
class CellSpec:
    """One cell. ``name`` is what the kernels, contexts and layers call it."""

    name: str  # "lstm", "gru", "rnn_tanh", "rnn_relu"
    gates: int  # G: w_ih is (G*H, C), w_hh (G*H, H), the biases (G*H,)
    has_c: bool  # carries a cell state: takes c0 and dc_n, returns c_n and dc0
    family: str  # the public functions' stem: <family>_forward, <family>_backward

    @property
    def grad_names(self) -> tuple[str, ...]:
        """The keys of a backward's gradient dict, in the documented order."""
        c = ("dc0",) if self.has_c else ()
        return ("dx", "dh0", *c, "dw_ih", "dw_hh", "db_ih", "db_hh")


CELLS: dict[str, CellSpec] = {
    s.name: s
    for s in (
        CellSpec("lstm", gates=4, has_c=True, family="lstm"),
        CellSpec("gru", gates=3, has_c=False, family="gru"),
        CellSpec("rnn_tanh", gates=1, has_c=False, family="rnn"),
        CellSpec("rnn_relu", gates=1, has_c=False, family="rnn"),
    )
}


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
    return "rnn_" + nonlinearity


def public_functions(forward: Callable, backward: Callable, api: str, docs: dict[str, str]):
    """The six per-cell functions (lstm_, gru_, rnn_ forward and backward) over a module's
    uniform pair, for rnnfast.ops and rnnfast.reference alike.

    forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, *, lengths, training, matmul_precision)
    returns (y, h_n, c_n or None, ctx); backward(ctx, dy, dh_n, dc_n, *, cell) returns the
    gradient dict and checks that ctx comes from a forward of ``cell``. ``api`` is the module's
    name (for __module__); ``docs`` holds each function's docstring.
    """

    def lstm_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
                     training=True, matmul_precision="float32"):  # fmt: skip
        return forward("lstm", x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths,
                       training=training, matmul_precision=matmul_precision)  # fmt: skip

    def lstm_backward(ctx, dy, dh_n=None, dc_n=None):
        return backward(ctx, dy, dh_n, dc_n, cell="lstm")

    def gru_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, *, lengths=None, training=True,
                    matmul_precision="float32"):  # fmt: skip
        y, h_n, _, ctx = forward("gru", x, w_ih, w_hh, b_ih, b_hh, h0, None, lengths=lengths,
                                 training=training, matmul_precision=matmul_precision)  # fmt: skip
        return y, h_n, ctx

    def gru_backward(ctx, dy, dh_n=None):
        return backward(ctx, dy, dh_n, None, cell="gru")

    def rnn_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, *, nonlinearity="tanh",
                    lengths=None, training=True, matmul_precision="float32"):  # fmt: skip
        y, h_n, _, ctx = forward(rnn_cell(nonlinearity), x, w_ih, w_hh, b_ih, b_hh, h0, None,
                                 lengths=lengths, training=training,
                                 matmul_precision=matmul_precision)  # fmt: skip
        return y, h_n, ctx

    def rnn_backward(ctx, dy, dh_n=None):
        cell = getattr(ctx, "cell", None)
        if cell not in CELLS or CELLS[cell].family != "rnn":
            raise TypeError(f"rnn_backward needs the context returned by {api}.rnn_forward")
        return backward(ctx, dy, dh_n, None, cell=cell)

    functions = (lstm_forward, lstm_backward, gru_forward, gru_backward, rnn_forward, rnn_backward)
    for f in functions:
        f.__module__ = api
        f.__qualname__ = f.__name__
        f.__doc__ = docs[f.__name__]
    return functions
