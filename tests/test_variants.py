"""The cell variants: peepholes (both LSTMs), coupled input-forget gates (lstm_cifg) and the
reset-before GRU (gru_reset_before).

The plain grids of test_reference and test_ops run every row of the cell table, the variants'
included; here are what those grids cannot reach: the peephole parameter (finite differences,
the kernels against the reference), the peers (onnxruntime's LSTM and GRU nodes with P,
input_forget, linear_before_reset, sequence_lens, reverse and bidirectional), the public options
and the errors.
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
    make_inputs,
    make_upstream,
    run_backward,
    run_forward,
    tol,
)

import rnnfast
from rnnfast import cells, ops, reference
from rnnfast.sequences import reverse_index

LSTMS = [name for name, spec in cells.CELLS.items() if spec.peephole]


def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(keys).encode()))


def _peephole_case(cell, T, N, C, H, rng, dtype=np.float64, **kwargs):
    inputs = make_inputs(cell, T, N, C, H, dtype, rng, **kwargs)
    inputs["w_peephole"] = rng.uniform(-1, 1, (3, H)).astype(dtype)
    return inputs, make_upstream(cell, T, N, H, dtype, rng)


# ---- the reference: finite differences ----------------------------------------------------------

WRT = {"dx": "x", "dh0": "h0", "dc0": "c0", "dw_ih": "w_ih", "dw_hh": "w_hh", "db_ih": "b_ih",
       "db_hh": "b_hh", "dw_peephole": "w_peephole"}  # fmt: skip


def _loss(cell, inputs, up) -> float:
    y, h_n, c_n, _ = run_forward(reference, cell, **inputs, training=False)
    return float(np.sum(y * up["dy"]) + np.sum(h_n * up["dh_n"]) + np.sum(c_n * up["dc_n"]))


@pytest.mark.parametrize("lengths_kind", [None, "mixed"])
@pytest.mark.parametrize("cell", LSTMS)
def test_peephole_gradients_match_finite_differences(cell, lengths_kind):
    T, N, C, H = 4, 4, 2, 3
    inputs, up = _peephole_case(cell, T, N, C, H, _rng("fd", cell, lengths_kind),
                                lengths_kind=lengths_kind)  # fmt: skip
    if lengths_kind:
        assert 0 in inputs["lengths"] and T in inputs["lengths"]
    _, _, _, ctx = run_forward(reference, cell, **inputs)
    grads = run_backward(reference, cell, ctx, **up)
    assert set(grads) == set(WRT)
    eps = 1e-6
    for name, key in WRT.items():
        wrt = inputs[key]
        numeric = np.zeros_like(wrt)
        for i in np.ndindex(wrt.shape):
            saved = wrt[i]
            wrt[i] = saved + eps
            plus = _loss(cell, inputs, up)
            wrt[i] = saved - eps
            minus = _loss(cell, inputs, up)
            wrt[i] = saved
            numeric[i] = (plus - minus) / (2 * eps)
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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}N{}C{}H{}".format(*s))
@pytest.mark.parametrize("cell", LSTMS)
def test_peephole_kernels_match_the_reference(cell, shape, dtype, threads):
    T, N, C, H = shape
    lengths_kind = ("mixed", None, "zero")[sum(shape) % 3]
    inputs, up = _peephole_case(cell, T, N, C, H, _rng("k", cell, shape), lengths_kind=lengths_kind)
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


@pytest.mark.parametrize("cell", LSTMS + ["gru_reset_before"])
def test_variants_are_bitwise_repeatable(cell):
    """The same call twice at each thread count gives the same bits (the peephole sums too: they
    run in a fixed order)."""
    T, N, C, H = 9, 5, 16, 96
    inputs, up = _peephole_case(cell, T, N, C, H, _rng("bits", cell), np.float32,
                                lengths_kind="mixed")  # fmt: skip
    if not cells.cell_spec(cell).peephole:
        inputs["w_peephole"] = None
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


# ---- against onnxruntime's LSTM and GRU nodes ----------------------------------------------

# ONNX gate order: LSTM i, o, f, c (ours i, f, g, o; coupled i, g, o), GRU z, r, h (ours r, z, n)
_ONNX_BLOCKS = {"lstm": [0, 3, 1, 2], "lstm_cifg": [0, 2, None, 1], "gru": [1, 0, 2],
                "gru_reset_before": [1, 0, 2]}  # fmt: skip


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
