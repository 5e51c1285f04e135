"""Trust the NumPy reference first: finite differences, torch.nn as an oracle, and the semantics
(lengths, missing arguments, inference contexts) that the kernels' tests then take from it."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import (
    CELLS,
    HAS_C,
    TORCH_CELLS,
    assert_close,
    central_differences,
    make_inputs,
    make_upstream,
    noncontiguous,
    run_backward,
    run_forward,
    tol,
)

from rnnfast import reference as ref

# gradient name -> the forward argument it differentiates
WRT = {"dx": "x", "dh0": "h0", "dc0": "c0", "dw_ih": "w_ih", "dw_hh": "w_hh", "db_ih": "b_ih",
       "db_hh": "b_hh"}  # fmt: skip


def _rng(*keys) -> np.random.Generator:
    """A generator seeded from the test's parameters (stable across runs, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(keys).encode()))


def _setup(cell, T, N, C, H, rng, dtype=np.float64, **kwargs):
    inputs = make_inputs(cell, T, N, C, H, dtype, rng, **kwargs)
    upstream = make_upstream(cell, T, N, H, dtype, rng)
    return inputs, upstream


def _loss(cell, inputs, upstream) -> float:
    """sum(y*dy) + sum(h_n*dh_n) (+ sum(c_n*dc_n)): its gradients are what backward returns."""
    y, h_n, c_n, _ = run_forward(ref, cell, **inputs, training=False)
    total = np.sum(y * upstream["dy"]) + np.sum(h_n * upstream["dh_n"])
    if c_n is not None:
        total += np.sum(c_n * upstream["dc_n"])
    return float(total)


def _explicit_states(cell, inputs):
    """inputs with h0 (and c0 for LSTM) given as zeros where missing, so they can be perturbed."""
    inputs = dict(inputs)
    N, H = inputs["x"].shape[1], inputs["w_hh"].shape[1]
    for key in ("h0", "c0") if HAS_C[cell] else ("h0",):
        if inputs[key] is None:
            inputs[key] = np.zeros((N, H))
    return inputs


# ---- (1) against central finite differences -----------------------------------------------------


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("lengths_kind", [None, "mixed"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_match_finite_differences(cell, lengths_kind, with_state):
    T, N, C, H = 3, 4, 2, 3
    rng = _rng("fd", cell, lengths_kind, with_state)
    kwargs = {"with_state": with_state, "lengths_kind": lengths_kind}
    inputs, upstream = _setup(cell, T, N, C, H, rng, **kwargs)
    if lengths_kind == "mixed":
        assert 0 in inputs["lengths"] and T in inputs["lengths"]
    _, _, _, ctx = run_forward(ref, cell, **inputs)
    grads = run_backward(ref, cell, ctx, **upstream)

    # a missing state is a zero state: differentiate with respect to explicit zeros
    inputs = _explicit_states(cell, inputs)
    for name, key in WRT.items():
        if key == "c0" and not HAS_C[cell]:
            assert name not in grads
            continue
        numeric = central_differences(lambda: _loss(cell, inputs, upstream), inputs[key])
        assert np.abs(numeric).max() > 1e-3, f"{name}: a vanishing gradient tests nothing"
        assert_close(grads[name], numeric, rtol=1e-6, atol=1e-8, name=name)


# ---- (2) against torch.nn.LSTM / GRU / RNN -----------------------------------------------------


def _torch_module(torch, cell, C, H, inputs):
    bias = inputs["b_ih"] is not None
    kw = {"bias": bias, "dtype": torch.float64}
    if cell == "lstm":
        module = torch.nn.LSTM(C, H, **kw)
    elif cell == "gru":
        module = torch.nn.GRU(C, H, **kw)
    else:
        module = torch.nn.RNN(C, H, nonlinearity=cell.removeprefix("rnn_"), **kw)
    names = {"weight_ih_l0": "w_ih", "weight_hh_l0": "w_hh"}
    if bias:
        names |= {"bias_ih_l0": "b_ih", "bias_hh_l0": "b_hh"}
    with torch.no_grad():
        for param, key in names.items():
            getattr(module, param).copy_(torch.from_numpy(inputs[key]))
    return module, names


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("lengths_kind", [None, "positive"])
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_matches_torch(cell, lengths_kind, with_state, with_bias):
    torch = pytest.importorskip("torch")
    T, N, C, H = 6, 5, 4, 7
    rng = _rng("torch", cell, lengths_kind, with_state, with_bias)
    inputs, upstream = _setup(cell, T, N, C, H, rng, with_state=with_state, with_bias=with_bias,
                              lengths_kind=lengths_kind)  # fmt: skip
    y, h_n, c_n, ctx = run_forward(ref, cell, **inputs)
    grads = run_backward(ref, cell, ctx, **upstream)

    module, names = _torch_module(torch, cell, C, H, inputs)
    full = _explicit_states(cell, inputs)  # torch gets explicit zeros, to differentiate them
    x = torch.tensor(full["x"], requires_grad=True)
    h0 = torch.tensor(full["h0"][None], requires_grad=True)
    c0 = torch.tensor(full["c0"][None], requires_grad=True) if HAS_C[cell] else None
    seq = x
    if inputs["lengths"] is not None:
        lengths = torch.from_numpy(inputs["lengths"])
        seq = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, state = module(seq, (h0, c0) if HAS_C[cell] else h0)
    if inputs["lengths"] is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    t_h_n, t_c_n = state if HAS_C[cell] else (state, None)
    loss = (out * torch.from_numpy(upstream["dy"])).sum()
    loss = loss + (t_h_n[0] * torch.from_numpy(upstream["dh_n"])).sum()
    if HAS_C[cell]:
        loss = loss + (t_c_n[0] * torch.from_numpy(upstream["dc_n"])).sum()
    loss.backward()

    close = {"rtol": 1e-12, "atol": 1e-12}
    assert_close(y, out.detach().numpy(), **close, name="y")
    assert_close(h_n, t_h_n[0].detach().numpy(), **close, name="h_n")
    expected = {"dx": x.grad.numpy(), "dh0": h0.grad[0].numpy()}
    if HAS_C[cell]:
        assert_close(c_n, t_c_n[0].detach().numpy(), **close, name="c_n")
        expected["dc0"] = c0.grad[0].numpy()
    for param, key in names.items():
        expected["d" + key] = getattr(module, param).grad.numpy()
    if not with_bias:
        expected |= {"db_ih": None, "db_hh": None}
    assert set(grads) == set(expected)
    for name, want in expected.items():
        assert_close(grads[name], want, **close, name=name)


# ---- (3) semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_lengths_equal_running_each_sequence_alone(cell):
    """A batch with lengths is the batch of its sequences, each truncated and run on its own."""
    T, N, C, H = 5, 6, 3, 4
    inputs, upstream = _setup(cell, T, N, C, H, _rng("alone", cell), lengths_kind="mixed")
    y, h_n, c_n, ctx = run_forward(ref, cell, **inputs)
    grads = run_backward(ref, cell, ctx, **upstream)
    lengths = inputs["lengths"]
    weight_grads = {k: 0.0 for k in ("dw_ih", "dw_hh", "db_ih", "db_hh")}
    for n, L in enumerate(lengths):
        row = dict(inputs, lengths=None)
        row["x"] = inputs["x"][:L, n : n + 1]
        row["h0"] = inputs["h0"][n : n + 1]
        row["c0"] = None if not HAS_C[cell] else inputs["c0"][n : n + 1]
        up = {k: None if v is None else v[n : n + 1] for k, v in upstream.items()}
        up["dy"] = upstream["dy"][:L, n : n + 1]
        if L == 0:  # x with no steps: the final state is the initial state
            assert_close(h_n[n], inputs["h0"][n], 0, 0, name="h_n of a length-0 row")
            if HAS_C[cell]:
                assert_close(c_n[n], inputs["c0"][n], 0, 0, name="c_n of a length-0 row")
                assert_close(grads["dc0"][n], upstream["dc_n"][n], 0, 0, name="dc0, length 0")
            assert_close(grads["dh0"][n], upstream["dh_n"][n], 0, 0, name="dh0, length 0")
            assert not grads["dx"][:, n].any()
            assert not y[:, n].any()
            continue
        y1, h1, c1, ctx1 = run_forward(ref, cell, **row)
        g1 = run_backward(ref, cell, ctx1, **up)
        assert_close(y[:L, n], y1[:, 0], 1e-14, 1e-14, name=f"y[:{L}, {n}]")
        assert not y[L:, n].any(), f"y is not zero past length {L} in row {n}"
        assert_close(h_n[n], h1[0], 1e-14, 1e-14, name=f"h_n[{n}]")
        if HAS_C[cell]:
            assert_close(c_n[n], c1[0], 1e-14, 1e-14, name=f"c_n[{n}]")
            assert_close(grads["dc0"][n], g1["dc0"][0], 1e-12, 1e-12, name=f"dc0[{n}]")
        assert_close(grads["dx"][:L, n], g1["dx"][:, 0], 1e-12, 1e-12, name=f"dx[:{L}, {n}]")
        assert not grads["dx"][L:, n].any(), f"padded positions of row {n} have a gradient"
        assert_close(grads["dh0"][n], g1["dh0"][0], 1e-12, 1e-12, name=f"dh0[{n}]")
        for k in weight_grads:
            weight_grads[k] = weight_grads[k] + g1[k]
    for k, total in weight_grads.items():
        assert_close(grads[k], total, 1e-12, 1e-12, name=f"{k} (sum over rows)")


@pytest.mark.parametrize("cell", CELLS)
def test_full_lengths_equal_no_lengths(cell):
    T, N, C, H = 4, 3, 2, 5
    inputs, upstream = _setup(cell, T, N, C, H, _rng("full", cell), lengths_kind="full")
    out_full = run_forward(ref, cell, **inputs)
    out_none = run_forward(ref, cell, **dict(inputs, lengths=None))
    for a, b, name in zip(out_full[:3], out_none[:3], ["y", "h_n", "c_n"], strict=True):
        assert_close(a, b, 0, 0, name=name)
    g_full = run_backward(ref, cell, out_full[3], **upstream)
    g_none = run_backward(ref, cell, out_none[3], **upstream)
    for name in g_full:
        assert_close(g_full[name], g_none[name], 0, 0, name=name)


@pytest.mark.parametrize("cell", CELLS)
def test_missing_arguments_are_zeros(cell):
    """h0/c0 None equals zero states; dy/dh_n/dc_n None equal zero upstream gradients."""
    T, N, C, H = 4, 3, 2, 5
    inputs, upstream = _setup(cell, T, N, C, H, _rng("zeros", cell), with_state=False,
                              lengths_kind="mixed")  # fmt: skip
    y, h_n, c_n, ctx = run_forward(ref, cell, **inputs)
    y0, h_n0, c_n0, ctx0 = run_forward(ref, cell, **_explicit_states(cell, inputs))
    assert_close(y, y0, 0, 0, name="y")
    assert_close(h_n, h_n0, 0, 0, name="h_n")
    assert_close(c_n, c_n0, 0, 0, name="c_n")
    zeros = {k: None if v is None else np.zeros_like(v) for k, v in upstream.items()}
    for drop in upstream:
        if upstream[drop] is None:
            continue
        given = dict(upstream, **{drop: zeros[drop]})
        missing = dict(upstream, **{drop: None})
        g_given = run_backward(ref, cell, ctx, **given)
        g_missing = run_backward(ref, cell, ctx, **missing)
        for name in g_given:
            assert_close(g_missing[name], g_given[name], 0, 0, name=f"{name} with {drop}=None")
    g = run_backward(ref, cell, ctx, None)
    assert all(not v.any() for v in g.values()), "no upstream gradient must give zero gradients"


@pytest.mark.parametrize("cell", CELLS)
def test_no_bias_gives_none_gradients(cell):
    inputs, upstream = _setup(cell, 3, 2, 2, 3, _rng("nobias", cell), with_bias=False)
    *_, ctx = run_forward(ref, cell, **inputs)
    grads = run_backward(ref, cell, ctx, **upstream)
    assert grads["db_ih"] is None and grads["db_hh"] is None
    assert grads["dw_ih"].any() and grads["dw_hh"].any()
    # with only one of the biases, only that one has a gradient
    inputs["b_hh"] = np.ones(inputs["w_hh"].shape[0])
    *_, ctx = run_forward(ref, cell, **inputs)
    grads = run_backward(ref, cell, ctx, **upstream)
    assert grads["db_ih"] is None and grads["db_hh"].shape == inputs["b_hh"].shape


@pytest.mark.parametrize("cell", CELLS)
def test_inference_context_cannot_be_differentiated(cell):
    inputs, upstream = _setup(cell, 3, 2, 2, 3, _rng("infer", cell), lengths_kind="mixed")
    y, h_n, c_n, ctx = run_forward(ref, cell, **inputs, training=False)
    assert not ctx.training
    with pytest.raises(RuntimeError, match="training=False"):
        run_backward(ref, cell, ctx, **upstream)
    y_t, h_n_t, c_n_t, ctx_t = run_forward(ref, cell, **inputs)
    assert ctx_t.training
    assert_close(y, y_t, 0, 0, name="y")
    assert_close(h_n, h_n_t, 0, 0, name="h_n")
    assert_close(c_n, c_n_t, 0, 0, name="c_n")


def test_backward_needs_its_own_forward_context():
    inputs, upstream = _setup("gru", 3, 2, 2, 3, _rng("ctx"))
    *_, ctx = run_forward(ref, "gru", **inputs)
    with pytest.raises(TypeError, match="lstm_backward"):
        ref.lstm_backward(ctx, upstream["dy"])
    with pytest.raises(TypeError, match="rnn_backward"):
        ref.rnn_backward(ctx, upstream["dy"])
    with pytest.raises(TypeError, match="gru_backward"):
        ref.gru_backward(object(), upstream["dy"])


@pytest.mark.parametrize("cell", CELLS)
def test_inputs_are_not_modified(cell):
    inputs, upstream = _setup(cell, 4, 3, 2, 3, _rng("readonly", cell), lengths_kind="mixed")
    before = {k: None if v is None else v.copy() for k, v in (inputs | upstream).items()}
    for v in (inputs | upstream).values():
        if v is not None:
            v.flags.writeable = False  # an in-place write raises here, not later
    *_, ctx = run_forward(ref, cell, **inputs)
    run_backward(ref, cell, ctx, **upstream)
    for k, v in (inputs | upstream).items():
        assert (v is None and before[k] is None) or np.array_equal(v, before[k]), k


@pytest.mark.parametrize("cell", CELLS)
def test_outputs_do_not_alias_inputs(cell):
    """h_n of a length-0 row equals h0, but must be a new array (writing it leaves h0 alone)."""
    inputs, upstream = _setup(cell, 2, 2, 2, 3, _rng("alias", cell), lengths_kind="zero")
    y, h_n, c_n, ctx = run_forward(ref, cell, **inputs)
    grads = run_backward(ref, cell, ctx, **upstream)
    assert not np.shares_memory(h_n, inputs["h0"])
    assert not np.shares_memory(grads["dh0"], upstream["dh_n"])
    if HAS_C[cell]:
        assert not np.shares_memory(c_n, inputs["c0"])
        assert not np.shares_memory(grads["dc0"], upstream["dc_n"])


@pytest.mark.parametrize("cell", CELLS)
def test_noncontiguous_inputs_give_the_same_result(cell):
    inputs, upstream = _setup(cell, 4, 3, 2, 3, _rng("strided", cell), lengths_kind="mixed")
    strided = {k: v if v is None or k == "lengths" else noncontiguous(v) for k, v in inputs.items()}
    strided_up = {k: None if v is None else noncontiguous(v) for k, v in upstream.items()}
    out = run_forward(ref, cell, **inputs)
    out_s = run_forward(ref, cell, **strided)
    for a, b, name in zip(out[:3], out_s[:3], ["y", "h_n", "c_n"], strict=True):
        assert_close(b, a, 0, 0, name=name)
    g = run_backward(ref, cell, out[3], **upstream)
    g_s = run_backward(ref, cell, out_s[3], **strided_up)
    for name in g:
        assert_close(g_s[name], g[name], 0, 0, name=name)


@pytest.mark.parametrize("cell", CELLS)
def test_float32_computes_in_float32(cell):
    inputs, upstream = _setup(cell, 5, 3, 4, 6, _rng("f32", cell), lengths_kind="mixed")
    f32 = {k: v.astype(np.float32) if v is not None and v.dtype.kind == "f" else v
           for k, v in inputs.items()}  # fmt: skip
    up32 = {k: None if v is None else v.astype(np.float32) for k, v in upstream.items()}
    y, h_n, c_n, ctx = run_forward(ref, cell, **f32)
    grads = run_backward(ref, cell, ctx, **up32)
    y64, h_n64, c_n64, ctx64 = run_forward(ref, cell, **inputs)
    grads64 = run_backward(ref, cell, ctx64, **upstream)
    for a, b, name in zip([y, h_n, c_n], [y64, h_n64, c_n64], ["y", "h_n", "c_n"], strict=True):
        assert a is None or a.dtype == np.float32, name
        assert_close(a, b, **tol(np.float32, "output"), name=name)
    for name, g in grads.items():
        assert g.dtype == np.float32, name
        assert_close(g, grads64[name], **tol(np.float32, "grad"), name=name)


@pytest.mark.parametrize("cell", CELLS)
def test_zero_steps(cell):
    inputs, upstream = _setup(cell, 0, 2, 3, 4, _rng("empty", cell), lengths_kind="zero")
    y, h_n, c_n, ctx = run_forward(ref, cell, **inputs)
    assert y.shape == (0, 2, 4)
    assert not np.shares_memory(h_n, inputs["h0"]), "h_n must not be the caller's h0"
    assert_close(h_n, inputs["h0"], 0, 0, name="h_n")
    assert_close(c_n, inputs["c0"], 0, 0, name="c_n")
    grads = run_backward(ref, cell, ctx, **upstream)
    assert grads["dx"].shape == (0, 2, 3)
    assert_close(grads["dh0"], upstream["dh_n"], 0, 0, name="dh0")
    assert not grads["dw_ih"].any() and not grads["dw_hh"].any() and not grads["db_hh"].any()


def test_relu_is_not_tanh():
    """The nonlinearity argument reaches the cell: relu output is >= 0 and unbounded."""
    inputs = make_inputs("rnn_relu", 4, 3, 2, 5, np.float64, _rng("relu"))
    inputs["w_ih"] *= 10
    y_relu, *_ = run_forward(ref, "rnn_relu", **inputs)
    y_tanh, *_ = run_forward(ref, "rnn_tanh", **inputs)
    assert (y_relu >= 0).all() and y_relu.max() > 1
    assert (y_tanh < 0).any() and np.abs(y_tanh).max() <= 1


def test_argument_errors_are_those_of_the_api():
    x = np.zeros((2, 3, 4))
    w_ih, w_hh = np.zeros((8, 4)), np.zeros((8, 2))
    with pytest.raises(ValueError, match="nonlinearity"):
        ref.rnn_forward(x, w_ih[:2], w_hh[:2], nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"w_hh must have shape"):
        ref.lstm_forward(x, w_ih, np.zeros((6, 2)))
    with pytest.raises(TypeError, match="mixing dtypes"):
        ref.lstm_forward(x, w_ih.astype(np.float32), w_hh)
    with pytest.raises(ValueError, match="lengths must be <= T"):
        ref.lstm_forward(x, w_ih, w_hh, lengths=[1, 2, 3])
    *_, ctx = ref.lstm_forward(x, w_ih, w_hh)
    with pytest.raises(ValueError, match="dy must have shape"):
        ref.lstm_backward(ctx, np.zeros((2, 3, 3)))


def test_round_to_bfloat16_is_to_nearest_ties_to_even():
    from rnnfast.reference import _round_to_bfloat16

    ulp = 2.0**-7  # of bfloat16 at 1
    x = np.array([1 + ulp / 2, 1 + 1.5 * ulp, 1 + 0.51 * ulp, -1 - 0.49 * ulp, 3.0, 0.0, np.inf])
    want = np.array([1.0, 1 + 2 * ulp, 1 + ulp, -1.0, 3.0, 0.0, np.inf])
    np.testing.assert_array_equal(_round_to_bfloat16(x), want)
    all_ones_nan = np.array([0xFFFFFFFF], np.uint32).view(np.float32)
    assert np.isnan(_round_to_bfloat16(all_ones_nan)).all()
    assert _round_to_bfloat16(x).dtype == np.float64
