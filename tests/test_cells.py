"""The cell table: Python's rows agree with C++'s, unknown cells raise everywhere, and the uniform
pair gives the per-cell functions' results."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CELLS, make_inputs, make_upstream

import rnnfast
from rnnfast import cells, ops, reference


def test_python_and_cpp_tables_agree():
    cpp = {row["name"]: row for row in rnnfast._C.cell_table()}
    assert set(cpp) == set(cells.CELLS)
    for name, spec in cells.CELLS.items():
        assert cpp[name]["gates"] == spec.gates, name
        assert cpp[name]["has_c"] == spec.has_c, name
    assert [s.name for s in cells.CELLS.values()] == list(cells.CELLS)


@pytest.mark.parametrize("api", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("bad", ["lstmp", "LSTM", "", None, 3])
def test_unknown_cell_raises(api, bad):
    x = np.ones((2, 1, 3), np.float32)
    with pytest.raises(ValueError, match="unknown cell"):
        api.forward(bad, x, np.ones((4, 3), np.float32), np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="unknown cell"):
        cells.cell_spec(bad)


@pytest.mark.parametrize("api", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("cell", CELLS)
def test_uniform_pair_is_the_per_cell_functions(api, cell):
    """forward/backward and <family>_forward/_backward: the same arrays, bit for bit."""
    rng = np.random.default_rng(0)
    inputs = make_inputs(cell, 5, 3, 4, 8, np.float64, rng, lengths_kind="mixed")
    up = make_upstream(cell, 5, 3, 8, np.float64, rng)
    spec = cells.cell_spec(cell)
    y, h_n, c_n, ctx = api.forward(cell, **inputs)
    grads = api.backward(ctx, **up)
    assert tuple(grads) == spec.grad_names
    args = [inputs[k] for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0")]
    options = dict(spec.options)  # what selects this row of the family's function
    if spec.family == "lstm":
        y2, h2, c2, ctx2 = api.lstm_forward(*args, inputs["c0"], lengths=inputs["lengths"],
                                            **options)  # fmt: skip
        g2 = api.lstm_backward(ctx2, **up)
    elif spec.family == "gru":
        y2, h2, ctx2 = api.gru_forward(*args, lengths=inputs["lengths"], **options)
        c2, g2 = None, api.gru_backward(ctx2, up["dy"], up["dh_n"])
    else:
        y2, h2, ctx2 = api.rnn_forward(*args, lengths=inputs["lengths"], **options)
        c2, g2 = None, api.rnn_backward(ctx2, up["dy"], up["dh_n"])
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(h_n, h2)
    assert (c_n is None) == (c2 is None) == (not spec.has_c)
    assert set(g2) == set(grads)
    for k, v in grads.items():
        if v is not None:
            np.testing.assert_array_equal(v, g2[k], err_msg=k)


def test_backward_checks_the_context():
    with pytest.raises(TypeError, match="context"):
        ops.backward(object(), None)
    x = np.ones((2, 1, 3), np.float32)
    _, _, _, ctx = ops.forward("gru", x, np.ones((12, 3), np.float32), np.ones((12, 4), np.float32))
    with pytest.raises(TypeError, match="lstm_backward"):
        ops.backward(ctx, np.ones((2, 1, 4), np.float32), cell="lstm")
    with pytest.raises(TypeError, match="rnn_backward"):
        ops.rnn_backward(ctx, np.ones((2, 1, 4), np.float32))
