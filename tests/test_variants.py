"""The cell variants: peepholes and projections (both LSTMs), coupled input-forget gates
(lstm_cifg) and the reset-before GRU (gru_reset_before).

The plain grids of test_reference and test_ops run every row of the cell table, the variants'
included; here are what those grids cannot reach: the extra parameters w_peephole and w_hr
(finite differences, the kernels against the reference), the peers (torch.nn.LSTM(proj_size),
onnxruntime's LSTM and GRU nodes with P, input_forget, linear_before_reset, sequence_lens,
reverse and bidirectional), the public options, the layers and the errors.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from conftest import (
    assert_close,
    assert_grads_close,
    cast,
    central_differences,
    make_inputs,
    make_upstream,
    run_backward,
    run_forward,
    tol,
)

import rnnfast
from rnnfast import cells, ops, reference
from rnnfast.onnx import ONNX_GATE_BLOCKS
from rnnfast.sequences import reverse_index

LSTMS = [name for name, spec in cells.CELLS.items() if spec.peephole]


def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(keys).encode()))


def _peephole_case(cell, T, N, C, H, rng, dtype=np.float64, P=0, peephole=True, **kwargs):
    """make_inputs and make_upstream with w_peephole (unless not peephole) and, for P > 0, a
    projection w_hr (P, H) (w_hh, h0, dy and dh_n then take P columns)."""
    inputs = make_inputs(cell, T, N, C, H, dtype, rng, **kwargs)
    inputs["w_peephole"] = rng.uniform(-1, 1, (3, H)).astype(dtype) if peephole else None
    up = make_upstream(cell, T, N, H, dtype, rng)
    inputs["w_hr"] = None
    if P:
        k = 1 / np.sqrt(H)
        G = cells.cell_spec(cell).gates
        inputs["w_hr"] = rng.uniform(-k, k, (P, H)).astype(dtype)
        inputs["w_hh"] = rng.uniform(-k, k, (G * H, P)).astype(dtype)
        if inputs["h0"] is not None:
            inputs["h0"] = rng.standard_normal((N, P)).astype(dtype)
        up["dy"] = rng.standard_normal((T, N, P)).astype(dtype)
        up["dh_n"] = rng.standard_normal((N, P)).astype(dtype)
    return inputs, up


# ---- the reference: finite differences ----------------------------------------------------------

WRT = {"dx": "x", "dh0": "h0", "dc0": "c0", "dw_ih": "w_ih", "dw_hh": "w_hh", "db_ih": "b_ih",
       "db_hh": "b_hh", "dw_peephole": "w_peephole", "dw_hr": "w_hr"}  # fmt: skip
# (peephole, P) of the LSTM variants under test: peepholes, a projection, both
EXTRAS = [(True, 0), (False, 2), (True, 2)]


def _loss(cell, inputs, up) -> float:
    y, h_n, c_n, _ = run_forward(reference, cell, **inputs, training=False)
    return float(np.sum(y * up["dy"]) + np.sum(h_n * up["dh_n"]) + np.sum(c_n * up["dc_n"]))


@pytest.mark.parametrize("lengths_kind", [None, "mixed"])
@pytest.mark.parametrize(("peephole", "P"), EXTRAS, ids=["peephole", "proj", "peephole-proj"])
@pytest.mark.parametrize("cell", LSTMS)
def test_extra_parameter_gradients_match_finite_differences(cell, peephole, P, lengths_kind):
    T, N, C, H = 4, 4, 2, 3
    inputs, up = _peephole_case(cell, T, N, C, H, _rng("fd", cell, peephole, P, lengths_kind),
                                P=P, peephole=peephole, lengths_kind=lengths_kind)  # fmt: skip
    if lengths_kind:
        assert 0 in inputs["lengths"] and T in inputs["lengths"]
    _, _, _, ctx = run_forward(reference, cell, **inputs)
    grads = run_backward(reference, cell, ctx, **up)
    # the extra parameters' gradients exist where the forward had them
    wrt = {k: v for k, v in WRT.items() if inputs[v] is not None}
    assert set(grads) == set(wrt)
    for name, key in wrt.items():
        numeric = central_differences(lambda: _loss(cell, inputs, up), inputs[key])
        if name == "dw_peephole" and cell == "lstm_cifg":
            assert np.all(numeric[1] == 0) and np.all(grads[name][1] == 0), "row f is unused"
            numeric, got = numeric[[0, 2]], grads[name][[0, 2]]
        else:
            got = grads[name]
        assert np.abs(numeric).max() > 1e-3, f"{name}: a vanishing gradient tests nothing"
        assert_close(got, numeric, rtol=1e-6, atol=1e-8, name=name)


def test_zero_peepholes_are_the_plain_cell():
    inputs, up = _peephole_case("lstm", 5, 3, 4, 6, _rng("zero"), lengths_kind="mixed")
    plain = dict(inputs, w_peephole=None)
    inputs["w_peephole"][...] = 0
    for api in (ops, reference):
        y, h, c, ctx = run_forward(api, "lstm", **inputs)
        y0, h0, c0, ctx0 = run_forward(api, "lstm", **plain)
        assert_close(y, y0, **tol(np.float64))
        assert_close(c, c0, **tol(np.float64))
        g, g0 = run_backward(api, "lstm", ctx, **up), run_backward(api, "lstm", ctx0, **up)
        assert "dw_peephole" in g and "dw_peephole" not in g0
        for k in g0:
            assert_close(g[k], g0[k], **tol(np.float64, "grad"), name=k)


# ---- the kernels against the reference ----------------------------------------------------------

_SIZES = (1, 5, 64, 65, 128)
SHAPES = [((1, 7, 33)[i % 3], (1, 3, 16)[(i // 3) % 3], C, H)
          for i, (C, H) in enumerate(itertools.product(_SIZES, (1, 5, 65, 128)))]  # fmt: skip


# a projection needs 0 < P < H: no H = 1 with one
GRID = [(extras, shape) for extras in ("peephole", "proj", "peephole-proj") for shape in SHAPES
        if extras == "peephole" or shape[3] > 1]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    ("extras", "shape"), GRID, ids=lambda v: v if isinstance(v, str) else "T{}N{}C{}H{}".format(*v)
)
@pytest.mark.openmp
@pytest.mark.parametrize("cell", LSTMS)
def test_extra_parameter_kernels_match_the_reference(cell, extras, shape, dtype, threads):
    T, N, C, H = shape
    P = (1, H // 4 or 1, H - 1)[sum(shape) % 3] if "proj" in extras else 0
    lengths_kind = ("mixed", None, "zero")[sum(shape) % 3]
    rng = _rng("k", cell, extras, shape)
    inputs, up = _peephole_case(cell, T, N, C, H, rng, P=P, peephole="peephole" in extras,
                                lengths_kind=lengths_kind)  # fmt: skip
    y, h_n, c_n, ctx = run_forward(reference, cell, **inputs)
    expected = run_backward(reference, cell, ctx, **up)
    before = rnnfast.get_num_threads()
    rnnfast.set_num_threads(threads)
    try:
        got = run_forward(ops, cell, **cast(inputs, dtype))
        grads = run_backward(ops, cell, got[3], **cast(up, dtype))
        # inference keeps nothing but gives the same outputs
        y_inf = run_forward(ops, cell, **cast(inputs, dtype), training=False)[0]
    finally:
        rnnfast.set_num_threads(before)
    np.testing.assert_array_equal(y_inf, got[0])
    for name, a, e in zip(("y", "h_n", "c_n"), got[:3], (y, h_n, c_n), strict=True):
        assert a.dtype == dtype
        assert_close(a, e, **tol(dtype), name=name)
    assert_grads_close(grads, expected, dtype, names=list(expected))


@pytest.mark.openmp
@pytest.mark.parametrize("cell", LSTMS + ["gru_reset_before"])
def test_variants_are_bitwise_repeatable(cell):
    """The same call twice at each thread count gives the same bits (the peephole sums too: they
    run in a fixed order)."""
    T, N, C, H = 9, 5, 16, 96
    lstm = cells.cell_spec(cell).peephole
    inputs, up = _peephole_case(cell, T, N, C, H, _rng("bits", cell), np.float32, P=24 * lstm,
                                peephole=lstm, lengths_kind="mixed")  # fmt: skip
    results = []
    before = rnnfast.get_num_threads()
    try:
        for threads in (1, 2, 1, 2):
            rnnfast.set_num_threads(threads)
            y, h, c, ctx = run_forward(ops, cell, **inputs)
            results.append((y.copy(), h, run_backward(ops, cell, ctx, **up)))
    finally:
        rnnfast.set_num_threads(before)
    for (y, h, g), (y0, h0, g0) in zip(results[2:], results[:2], strict=True):
        np.testing.assert_array_equal(y, y0)
        np.testing.assert_array_equal(h, h0)
        for k, v in g.items():
            if v is not None:
                np.testing.assert_array_equal(v, g0[k], err_msg=k)


@pytest.mark.openmp
@pytest.mark.parametrize("cell", LSTMS)
def test_peepholes_with_rows_apart(cell):
    """At 25 rows and small weights the forward's two threads split the batch (build_info()
    ["rows_apart"]) and read every unit's peepholes; the backward keeps the units split, since
    each thread sums its units' peephole gradients over all the rows: exact against the reference,
    and the same bits on one thread as on two."""
    T, N, C, H = 12, 25, 10, 48
    inputs, up = _peephole_case(cell, T, N, C, H, _rng("rows", cell), lengths_kind="mixed")
    y, h_n, c_n, ctx = run_forward(reference, cell, **inputs)
    expected = run_backward(reference, cell, ctx, **up)
    results = []
    before = rnnfast.get_num_threads()
    try:
        for threads in (2, 1):
            rnnfast.set_num_threads(threads)
            got = run_forward(ops, cell, **cast(inputs, np.float32))
            results.append((got[0], run_backward(ops, cell, got[3], **cast(up, np.float32))))
    finally:
        rnnfast.set_num_threads(before)
    assert_close(results[0][0], y, **tol(np.float32), name="y")
    assert_grads_close(results[0][1], expected, np.float32, names=list(expected))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for k, v in results[0][1].items():
        if v is not None:
            np.testing.assert_array_equal(v, results[1][1][k], err_msg=k)


# ---- the projection against torch.nn.LSTM(proj_size) ---------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lengths_kind", [None, "positive"])
@pytest.mark.parametrize("P", [1, 3, 6])
def test_projection_matches_torch(P, lengths_kind, with_bias):
    """Forward and every gradient, with packed sequences where there are lengths."""
    torch = pytest.importorskip("torch")
    T, N, C, H = 6, 5, 4, 7
    rng = _rng("torch-proj", P, lengths_kind, with_bias)
    inputs, up = _peephole_case("lstm", T, N, C, H, rng, P=P, peephole=False,
                                with_bias=with_bias, lengths_kind=lengths_kind)  # fmt: skip
    module = torch.nn.LSTM(C, H, proj_size=P, bias=with_bias, dtype=torch.float64)
    names = {"weight_ih_l0": "w_ih", "weight_hh_l0": "w_hh", "weight_hr_l0": "w_hr"}
    if with_bias:
        names |= {"bias_ih_l0": "b_ih", "bias_hh_l0": "b_hh"}
    with torch.no_grad():
        for param, key in names.items():
            getattr(module, param).copy_(torch.from_numpy(inputs[key]))
    x = torch.tensor(inputs["x"], requires_grad=True)
    h0 = torch.tensor(inputs["h0"][None], requires_grad=True)
    c0 = torch.tensor(inputs["c0"][None], requires_grad=True)
    seq = x
    if lengths_kind:
        seq = torch.nn.utils.rnn.pack_padded_sequence(x, torch.from_numpy(inputs["lengths"]),
                                                      enforce_sorted=False)  # fmt: skip
    out, (h_n, c_n) = module(seq, (h0, c0))
    if lengths_kind:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    loss = (out * torch.from_numpy(up["dy"])).sum() + (h_n[0] * torch.from_numpy(up["dh_n"])).sum()
    loss = loss + (c_n[0] * torch.from_numpy(up["dc_n"])).sum()
    loss.backward()
    want = {"dx": x.grad, "dh0": h0.grad[0], "dc0": c0.grad[0]}
    want |= {"d" + key: getattr(module, param).grad for param, key in names.items()}
    for api in (reference, ops):
        y, h, c, ctx = run_forward(api, "lstm", **inputs)
        assert y.shape == (T, N, P) and h.shape == (N, P) and c.shape == (N, H)
        for name, a, e in (("y", y, out), ("h_n", h, h_n[0]), ("c_n", c, c_n[0])):
            assert_close(a, e.detach().numpy(), **tol(np.float64), name=name)
        grads = run_backward(api, "lstm", ctx, **up)
        for name, e in want.items():
            assert_close(grads[name], e.numpy(), **tol(np.float64, "grad"), name=name)
        assert grads.get("db_ih") is None if not with_bias else grads["db_ih"] is not None


@pytest.mark.parametrize("api", [ops, reference], ids=["ops", "reference"])
def test_bad_projection_arguments_raise(api):
    rng = _rng("proj-errors")
    T, N, C, H, P = 3, 2, 4, 6, 2
    inputs, _ = _peephole_case("lstm", T, N, C, H, rng, P=P, peephole=False)
    x, w_ih, w_hh, w_hr = (inputs[k] for k in ("x", "w_ih", "w_hh", "w_hr"))
    for bad in (np.zeros((H, H)), np.zeros((H + 1, H)), np.zeros((0, H)), np.zeros(H)):
        with pytest.raises(ValueError, match="w_hr must have shape \\(P, H\\) with 0 < P < H"):
            api.lstm_forward(x, w_ih, w_hh, w_hr=bad)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(4\*H, P\) = \(24, 2\)"):
        api.lstm_forward(x, w_ih, np.zeros((4 * H, H)), w_hr=w_hr)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 2\)"):
        api.lstm_forward(x, w_ih, w_hh, None, None, np.zeros((N, H)), w_hr=w_hr)
    with pytest.raises(ValueError, match=r"c0 must have shape \(2, 6\)"):
        api.lstm_forward(x, w_ih, w_hh, None, None, None, np.zeros((N, P)), w_hr=w_hr)
    with pytest.raises(TypeError, match="w_hr has dtype float32"):
        api.lstm_forward(x, w_ih, w_hh, w_hr=w_hr.astype(np.float32))
    *_, ctx = api.lstm_forward(x, w_ih, w_hh, w_hr=w_hr)
    with pytest.raises(ValueError, match=r"dy must have shape \(3, 2, 2\)"):
        api.lstm_backward(ctx, np.zeros((T, N, H)))
    with pytest.raises(ValueError, match=r"dc_n must have shape \(2, 6\)"):
        api.lstm_backward(ctx, None, None, np.zeros((N, P)))
    g = make_inputs("gru", T, N, C, H, np.float64, rng)
    with pytest.raises(ValueError, match="w_hr \\(a projection\\) is only for LSTM cells"):
        api.forward("gru", g["x"], g["w_ih"], g["w_hh"], w_hr=w_hr)
    with pytest.raises(TypeError):
        api.gru_forward(g["x"], g["w_ih"], g["w_hh"], w_hr=w_hr)


# ---- against onnxruntime's LSTM and GRU nodes ----------------------------------------------

# ONNX's gate order, from the exporter's table (rnnfast.onnx)
_ONNX_BLOCKS = ONNX_GATE_BLOCKS


def _onnx_blocks(a, cell, H, filler):
    """a's gate blocks ((G*H, ...) or (G*H,)) in ONNX's order; an unused block from filler."""
    blocks = [filler(a[:H].shape) if b is None else a[b * H : (b + 1) * H]
              for b in _ONNX_BLOCKS[cell]]  # fmt: skip
    return np.concatenate(blocks)


def _run_onnx(cell, direction, params, x, lengths, h0, c0):
    """One ONNX LSTM or GRU node over x (T, N, C): (Y (T, D, N, H), Y_h, Y_c or None)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    spec = cells.cell_spec(cell)
    H = params[0]["w_hh"].shape[1]
    rng = np.random.default_rng(1)
    filler = lambda shape: rng.standard_normal(shape)  # noqa: E731 - ONNX must ignore it
    W = np.stack([_onnx_blocks(p["w_ih"], cell, H, filler) for p in params])
    R = np.stack([_onnx_blocks(p["w_hh"], cell, H, filler) for p in params])
    B = np.stack([np.concatenate([_onnx_blocks(p[b], cell, H, filler) for b in ("b_ih", "b_hh")])
                  for p in params])  # fmt: skip
    feeds = {"X": x, "W": W, "R": R, "B": B, "sequence_lens": lengths, "initial_h": h0}
    attrs = {"hidden_size": H, "direction": direction}
    if spec.has_c:
        feeds["initial_c"] = c0
        if params[0].get("w_peephole") is not None:
            # ours rows i, f, o; ONNX's P is i, o, f
            feeds["P"] = np.stack([p["w_peephole"][[0, 2, 1]].reshape(-1) for p in params])
        attrs["input_forget"] = int(cell == "lstm_cifg")
    else:
        attrs["linear_before_reset"] = int(cell == "gru")
    # onnxruntime's LSTM and GRU take float32 only
    feeds = {
        k: v.astype(np.int32 if k == "sequence_lens" else np.float32) for k, v in feeds.items()
    }
    names = ["X", "W", "R", "B", "sequence_lens", "initial_h"]
    names += ["initial_c", "P"] if spec.has_c else []
    inputs = [n if n in feeds else "" for n in names]
    outputs = ["Y", "Y_h"] + (["Y_c"] if spec.has_c else [])
    node = helper.make_node("LSTM" if spec.has_c else "GRU", inputs, outputs, **attrs)
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    graph = helper.make_graph(
        [node], "cell",
        [helper.make_tensor_value_info(k, i32 if k == "sequence_lens" else f32, v.shape)
         for k, v in feeds.items()],
        [helper.make_tensor_value_info(k, f32, None) for k in outputs],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)
    return out[0], out[1], out[2] if spec.has_c else None


def _ours(api, cell, direction, params, x, lengths, h0, c0):
    """The same through rnnfast: the reverse direction runs each sequence from its last step."""
    T, N, _ = x.shape
    rev = (reverse_index(lengths, T), np.arange(N)[None, :])
    ys, hs, cs = [], [], []
    for d, p in enumerate(params):
        backwards = direction == "reverse" or d == 1
        xin = x[rev] if backwards else x
        y, h, c, _ = run_forward(api, cell, xin, **p, h0=h0[d], c0=None if c0 is None else c0[d],
                                 lengths=lengths, training=False)  # fmt: skip
        ys.append(y[rev] if backwards else y)
        hs.append(h)
        cs.append(c)
    return np.stack(ys, axis=1), np.stack(hs), None if c0 is None else np.stack(cs)


CASES = [("lstm", True), ("lstm", False), ("lstm_cifg", True), ("lstm_cifg", False),
         ("gru_reset_before", False), ("gru", False)]  # fmt: skip


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize(("cell", "peephole"), CASES, ids=lambda v: str(v))
def test_matches_onnxruntime(cell, peephole, direction):
    T, N, C, H = 6, 5, 4, 7
    rng = _rng("onnx", cell, peephole, direction)
    D = 2 if direction == "bidirectional" else 1
    spec = cells.cell_spec(cell)
    G, k = spec.gates, 1 / np.sqrt(H)
    params = []
    for _ in range(D):
        shapes = {"w_ih": (G * H, C), "w_hh": (G * H, H), "b_ih": (G * H,), "b_hh": (G * H,)}
        p = {n: rng.uniform(-k, k, shape) for n, shape in shapes.items()}
        if peephole:
            p["w_peephole"] = rng.uniform(-1, 1, (3, H))
        params.append(p)
    x = rng.standard_normal((T, N, C))
    lengths = np.array([6, 1, 4, 6, 3])  # onnxruntime takes lengths of at least 1
    h0 = rng.standard_normal((D, N, H))
    c0 = rng.standard_normal((D, N, H)) if spec.has_c else None
    want = _run_onnx(cell, direction, params, x, lengths, h0, c0)
    # onnxruntime in float32 against rnnfast in float64: float32's tolerances
    for api in (reference, ops):
        got = _ours(api, cell, direction, params, x, lengths, h0, c0)
        for name, a, e in zip(("Y", "Y_h", "Y_c"), got, want, strict=True):
            assert_close(a, e, **tol(np.float32), name=f"{api.__name__} {name}")


# ---- the public options -------------------------------------------------------------------------


def test_options_select_the_rows():
    assert cells.family_cell("lstm", coupled_input_forget=True) == "lstm_cifg"
    assert cells.family_cell("lstm", coupled_input_forget=False) == "lstm"
    assert cells.family_cell("gru", reset_after=False) == "gru_reset_before"
    assert cells.family_cell("gru") == "gru"
    for name, spec in cells.CELLS.items():
        assert cells.family_cell(spec.family, **dict(spec.options)) == name


@pytest.mark.parametrize("api", [ops, reference], ids=["ops", "reference"])
def test_per_cell_functions_take_the_options(api):
    rng = _rng("options")
    inputs, up = _peephole_case("lstm_cifg", 4, 3, 5, 6, rng)
    args = [inputs[k] for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")]
    y, h, c, ctx = api.lstm_forward(*args, w_peephole=inputs["w_peephole"],
                                    coupled_input_forget=True)  # fmt: skip
    assert ctx.cell == "lstm_cifg"
    y2, *_ = run_forward(api, "lstm_cifg", **inputs)
    np.testing.assert_array_equal(y, y2)
    g = api.lstm_backward(ctx, up["dy"], up["dh_n"], up["dc_n"])
    assert tuple(g) == cells.cell_spec("lstm_cifg").grads_of(True)
    g_inputs = make_inputs("gru_reset_before", 4, 3, 5, 6, np.float64, rng)
    gargs = [g_inputs[k] for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0")]
    y, h, ctx = api.gru_forward(*gargs, reset_after=False)
    assert ctx.cell == "gru_reset_before"
    assert set(api.gru_backward(ctx, up["dy"])) == set(cells.cell_spec("gru").grad_names)
    y_after, *_ = api.gru_forward(*gargs)
    assert not np.allclose(y, y_after), "reset_after=False must change the cell"


@pytest.mark.parametrize("api", [ops, reference], ids=["ops", "reference"])
def test_bad_variant_arguments_raise(api):
    rng = _rng("errors")
    inputs, _ = _peephole_case("lstm", 3, 2, 4, 5, rng)
    args = [inputs[k] for k in ("x", "w_ih", "w_hh")]
    with pytest.raises(ValueError, match=r"w_peephole must have shape \(3, 5\)"):
        api.lstm_forward(*args, w_peephole=np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"w_peephole must have shape \(3, 5\)"):
        api.lstm_forward(*args, w_peephole=np.zeros(15))
    with pytest.raises(TypeError, match="w_peephole has dtype float32"):
        api.lstm_forward(*args, w_peephole=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="coupled_input_forget must be one of"):
        api.lstm_forward(*args, coupled_input_forget="yes")
    with pytest.raises(ValueError, match=r"w_hh must have shape \(3\*H, H\) for lstm_cifg"):
        api.lstm_forward(*args, coupled_input_forget=True)  # four gate blocks given
    g = make_inputs("gru", 3, 2, 4, 5, np.float64, rng)
    gargs = [g[k] for k in ("x", "w_ih", "w_hh")]
    with pytest.raises(ValueError, match="reset_after must be one of"):
        api.gru_forward(*gargs, reset_after=None)
    with pytest.raises(ValueError, match="w_peephole is only for LSTM cells, not gru"):
        api.forward("gru_reset_before", *gargs, w_peephole=np.zeros((3, 5)))
    with pytest.raises(TypeError, match="peephole"):
        api.gru_forward(*gargs, w_peephole=np.zeros((3, 5)))
    with pytest.raises(TypeError, match="lstm_backward needs the context"):
        _, _, ctx = api.gru_forward(*gargs, reset_after=False)
        api.lstm_backward(ctx, None)


def test_the_extension_refuses_what_python_would():
    """The binding checks w_peephole itself: a wrong call from Python never reaches a kernel."""
    x = np.ones((2, 1, 3))
    w_ih, w_hh = np.ones((16, 3)), np.ones((16, 4))
    with pytest.raises(ValueError, match="w_peephole must have shape"):
        rnnfast._C.lstm_forward(x, w_ih, w_hh, None, None, None, None, None, True,
                                w_peephole=np.ones((3, 5)))  # fmt: skip
    with pytest.raises(ValueError, match="only for LSTM"):
        rnnfast._C.gru_forward(x, np.ones((12, 3)), np.ones((12, 4)), None, None, None, None, None,
                               True, w_peephole=np.ones((3, 4)))  # fmt: skip


# ---- the layers ----------------------------------------------------------------------------------

LAYER_VARIANTS = [
    ("LSTM", {"peephole": True}),
    ("LSTM", {"coupled_input_forget": True}),
    ("LSTM", {"coupled_input_forget": True, "peephole": True}),
    ("GRU", {"reset_after": False}),
]


@pytest.mark.parametrize(("cls", "options"), LAYER_VARIANTS, ids=lambda v: str(v))
def test_variant_stack_finite_differences(cls, options):
    """Two bidirectional layers, lengths with a 0, every parameter's gradient probed."""
    from test_layers import C, N, T, numeric_check, random_state

    rng = np.random.default_rng(12)
    layer = getattr(rnnfast, cls)(C, 3, num_layers=2, bidirectional=True, dtype=np.float64,
                                  seed=5, **options)  # fmt: skip
    for k, v in layer.params.items():  # peepholes start at +-1/sqrt(H): make them matter
        if k.startswith("weight_peephole"):
            v[...] = rng.uniform(-1, 1, v.shape)
    numeric_check(layer, rng.standard_normal((T, N, C)), random_state(layer, N, rng),
                  np.array([2, T, 0]), rng, n_probe=8)  # fmt: skip


@pytest.mark.parametrize(("cls", "options"), LAYER_VARIANTS, ids=lambda v: str(v))
def test_variant_learned_initial_state_finite_differences(cls, options):
    from test_layers import C, N, T, numeric_check

    rng = np.random.default_rng(13)
    layer = getattr(rnnfast, cls)(C, 3, learn_initial_state=True, dtype=np.float64, seed=6,
                                  **options)  # fmt: skip
    for v in layer.params.values():
        v[...] = rng.uniform(-0.8, 0.8, v.shape)
    numeric_check(layer, rng.standard_normal((T, N, C)), None, np.array([T, 1, 3]), rng)


def test_variant_parameter_names_and_shapes():
    C, H = 4, 6
    lstm = rnnfast.LSTM(C, H, num_layers=2, bidirectional=True, peephole=True)
    assert lstm.params["weight_peephole_l0"].shape == (3, H)
    assert lstm.params["weight_peephole_l1_reverse"].shape == (3, H)
    assert lstm.params["weight_ih_l0"].shape == (4 * H, C)
    cifg = rnnfast.LSTM(C, H, coupled_input_forget=True)
    assert cifg.mode == "lstm_cifg" and cifg.params["weight_hh_l0"].shape == (3 * H, H)
    assert "weight_peephole_l0" not in cifg.params
    assert "coupled_input_forget=True" in repr(cifg) and "peephole=True" in repr(lstm)
    gru = rnnfast.GRU(C, H, reset_after=False)
    assert gru.mode == "gru_reset_before" and "reset_after=False" in repr(gru)
    assert set(gru.params) == set(rnnfast.GRU(C, H).params)
    for bad, err in (({"peephole": 1}, TypeError), ({"coupled_input_forget": "no"}, ValueError)):
        with pytest.raises(err):
            rnnfast.LSTM(C, H, **bad)
    with pytest.raises(ValueError, match="peephole=True is for LSTM layers, not gru"):
        rnnfast.GRU(C, H, peephole=True)
    with pytest.raises(ValueError, match="reset_after must be one of"):
        rnnfast.GRU(C, H, reset_after="false")


def test_reset_before_gru_layer_loads_a_torch_gru_state_dict():
    """Same parameter names and shapes as the reset-after GRU: a torch state_dict loads, and the
    cell computes Cho et al.'s candidate with those weights (checked against the reference)."""
    torch = pytest.importorskip("torch")
    C, H = 4, 5
    t = torch.nn.GRU(C, H, num_layers=1, dtype=torch.float64)
    layer = rnnfast.GRU(C, H, reset_after=False, dtype=np.float64)
    layer.load_state_dict({k: v.detach().numpy() for k, v in t.state_dict().items()})
    x = np.random.default_rng(3).standard_normal((6, 2, C))
    y, h = layer(x)
    p = {k: v.detach().numpy() for k, v in t.state_dict().items()}
    y2, h2, _ = reference.gru_forward(x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                                      p["bias_hh_l0"], reset_after=False)  # fmt: skip
    assert_close(y, y2, **tol(np.float64))


@pytest.mark.parametrize("peephole", [False, True])
def test_projected_stack_finite_differences(peephole):
    from test_layers import C, N, T, numeric_check

    rng = np.random.default_rng(14)
    layer = rnnfast.LSTM(C, 5, num_layers=2, bidirectional=True, proj_size=2, peephole=peephole,
                         dtype=np.float64, seed=7)  # fmt: skip
    assert layer.params["weight_hr_l1_reverse"].shape == (2, 5)
    assert layer.params["weight_ih_l1"].shape == (20, 4)  # two directions of P = 2
    state = (rng.standard_normal((4, N, 2)), rng.standard_normal((4, N, 5)))
    numeric_check(layer, rng.standard_normal((T, N, C)), state, np.array([2, T, 0]), rng,
                  n_probe=8)  # fmt: skip


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_projected_stack_matches_torch(bidirectional):
    """torch.nn.LSTM(proj_size): its state_dict loads as it is; outputs, states and every
    gradient agree, with packed lengths."""
    torch = pytest.importorskip("torch")
    T, N, C, H, P = 6, 4, 3, 7, 3
    t = torch.nn.LSTM(C, H, num_layers=2, proj_size=P, bidirectional=bidirectional,
                      dtype=torch.float64)  # fmt: skip
    layer = rnnfast.LSTM(C, H, num_layers=2, proj_size=P, bidirectional=bidirectional,
                         dtype=np.float64)  # fmt: skip
    layer.load_state_dict({k: v.detach().numpy() for k, v in t.state_dict().items()})
    rng = np.random.default_rng(15)
    D = 2 if bidirectional else 1
    x = rng.standard_normal((T, N, C))
    h0, c0 = rng.standard_normal((2 * D, N, P)), rng.standard_normal((2 * D, N, H))
    lengths = np.array([6, 2, 5, 1])
    y, (h_n, c_n) = layer(x, (h0, c0), lengths=lengths)
    xt = torch.tensor(x, requires_grad=True)
    st = (torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True))
    packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths),
                                                     enforce_sorted=False)  # fmt: skip
    yt, (ht, ct) = t(packed, st)
    yt, _ = torch.nn.utils.rnn.pad_packed_sequence(yt, total_length=T)
    for name, a, e in (("y", y, yt), ("h_n", h_n, ht), ("c_n", c_n, ct)):
        assert_close(a, e.detach().numpy(), **tol(np.float64), name=name)
    dy, dh, dc = (rng.standard_normal(a.shape) for a in (y, h_n, c_n))
    layer.zero_grad()
    dx, (dh0, dc0) = layer.backward(dy, (dh, dc))
    loss = (yt * torch.from_numpy(dy)).sum() + (ht * torch.from_numpy(dh)).sum()
    (loss + (ct * torch.from_numpy(dc)).sum()).backward()
    assert_close(dx, xt.grad.numpy(), **tol(np.float64, "grad"), name="dx")
    assert_close(dh0, st[0].grad.numpy(), **tol(np.float64, "grad"), name="dh0")
    assert_close(dc0, st[1].grad.numpy(), **tol(np.float64, "grad"), name="dc0")
    for k, v in t.named_parameters():
        assert_close(layer.grads[k], v.grad.numpy(), **tol(np.float64, "grad"), name=k)


def test_projection_layer_errors():
    with pytest.raises(ValueError, match="proj_size must be in \\[0, hidden_size = 4\\)"):
        rnnfast.LSTM(3, 4, proj_size=4)
    with pytest.raises(TypeError, match="proj_size must be an integer"):
        rnnfast.LSTM(3, 4, proj_size=1.5)
    with pytest.raises(ValueError, match="proj_size is for LSTM layers, not gru"):
        rnnfast.GRU(3, 4, proj_size=2)
    layer = rnnfast.LSTM(3, 4, proj_size=2, learn_initial_state=True)
    assert layer.params["h0"].shape == (1, 1, 2) and layer.params["c0"].shape == (1, 1, 4)
    x = np.zeros((5, 2, 3), np.float32)
    with pytest.raises(ValueError, match="h0 must have shape \\(1, 2, 2\\).*proj_size"):
        layer(x, (np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32)))
    y, (h, c) = layer(x)
    assert y.shape == (5, 2, 2) and h.shape == (1, 2, 2) and c.shape == (1, 2, 4)
    assert "proj_size=2" in repr(layer)
