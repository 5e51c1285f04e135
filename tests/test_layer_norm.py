"""Layer normalisation inside the fused steps (Ba et al. 2016, as Haste's LayerNormLSTM and
LayerNormGRU): the reference against finite differences, against the formulas written out with
torch-free NumPy and against torch.nn.functional.layer_norm with autograd; the kernels against the
reference over an awkward grid, alone and with peepholes, dropout and zoneout; bits across thread
counts; the layers; every misuse."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import (
    assert_close,
    central_differences,
    make_inputs,
    make_upstream,
    run_backward,
    run_forward,
    tol,
)

import rnnfast
from rnnfast import ops, reference
from rnnfast.cells import CELLS

LN_CELLS = [name for name, spec in CELLS.items() if spec.layer_norm]
OTHER_CELLS = [name for name, spec in CELLS.items() if not spec.layer_norm]
SEED = 20261202


def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(keys).encode()))


def _ln_params(cell, H, dtype, rng) -> dict:
    """Gains around 1 and a bias around 0, not exactly 1 and 0, so a swapped or ignored
    parameter shows."""
    spec = CELLS[cell]
    GH = spec.gates * H
    p = {"ln_gamma_ih": rng.uniform(0.5, 1.5, GH), "ln_gamma_hh": rng.uniform(0.5, 1.5, GH)}
    if spec.has_c:
        p.update(ln_gamma_c=rng.uniform(0.5, 1.5, H), ln_beta_c=rng.uniform(-0.3, 0.3, H))
    return {k: v.astype(dtype) for k, v in p.items()}


def _options(cell):
    """Layer norm alone and with what each cell combines it with."""
    out = [{}, {"recurrent_dropout": 0.3, "zoneout": 0.2},
           {"recurrent_dropout": 0.3, "recurrent_dropout_mode": "variational"}]  # fmt: skip
    if CELLS[cell].peephole:
        out.append({"peephole": True})
    return out


def _ids(options):
    return "-".join(f"{k}{v}" for k, v in options.items()) or "plain"


CASES = [(c, o) for c in LN_CELLS for o in _options(c)]
CASE_IDS = [f"{c}-{_ids(o)}" for c, o in CASES]


def _case(cell, T, N, C, H, rng, dtype=np.float64, lengths_kind="mixed", options=None):
    """inputs (with the layer-norm parameters and, where asked, peepholes), upstream, options."""
    options = dict(options or {})
    inputs = make_inputs(cell, T, N, C, H, dtype, rng, lengths_kind=lengths_kind)
    inputs.update(_ln_params(cell, H, dtype, rng))
    if options.pop("peephole", False):
        inputs["w_peephole"] = rng.uniform(-0.5, 0.5, (3, H)).astype(dtype)
    return inputs, make_upstream(cell, T, N, H, dtype, rng), options


def _loss(api, cell, inputs, up, options):
    y, h, c, _ = run_forward(api, cell, **inputs, seed=SEED, **options)
    total = (y * up["dy"]).sum() + (h * up["dh_n"]).sum()
    return total + ((c * up["dc_n"]).sum() if c is not None else 0.0)


GRAD_OF = {"x": "dx", "w_ih": "dw_ih", "w_hh": "dw_hh", "b_ih": "db_ih", "b_hh": "db_hh",
           "h0": "dh0", "c0": "dc0", "w_peephole": "dw_peephole", "ln_gamma_ih": "dln_gamma_ih",
           "ln_gamma_hh": "dln_gamma_hh", "ln_gamma_c": "dln_gamma_c",
           "ln_beta_c": "dln_beta_c"}  # fmt: skip


@pytest.mark.parametrize("cell, options", CASES, ids=CASE_IDS)
def test_reference_against_finite_differences(cell, options):
    inputs, up, options = _case(cell, 5, 4, 3, 6, _rng("fd", cell, _ids(options)),
                                options=options)  # fmt: skip
    _, _, _, ctx = run_forward(reference, cell, **inputs, seed=SEED, **options)
    grads = run_backward(reference, cell, ctx, **up)
    assert {GRAD_OF[k] for k in inputs if k in GRAD_OF and inputs[k] is not None} == set(grads)
    for key, name in GRAD_OF.items():
        if inputs.get(key) is None:
            continue
        numeric = central_differences(lambda: _loss(reference, cell, inputs, up, options),
                                      inputs[key])  # fmt: skip
        assert np.abs(numeric).max() > 1e-3, f"{name}: a vanishing gradient tests nothing"
        assert_close(grads[name], numeric, rtol=1e-6, atol=1e-8, name=name)


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _ln(v, gain, bias=0.0):
    """LN(v; gain, bias) per row: mean and biased variance by np.var, eps 1e-5."""
    mean = v.mean(axis=1, keepdims=True)
    return (v - mean) / np.sqrt(v.var(axis=1, keepdims=True) + 1e-5) * gain + bias


def _written_out(cell, inputs):
    """The layer-norm LSTM and GRU step by step from the issue's formulas (no lengths)."""
    x, w_ih, w_hh, b_ih, b_hh = (inputs[k] for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh"))
    g_ih, g_hh = inputs["ln_gamma_ih"], inputs["ln_gamma_hh"]
    H = w_hh.shape[1]
    h, c, ys = inputs["h0"].copy(), inputs["c0"], []
    for t in range(x.shape[0]):
        ax = _ln(x[t] @ w_ih.T, g_ih) + b_ih
        ah = _ln(h @ w_hh.T, g_hh) + b_hh
        if cell == "lstm":
            a = ax + ah
            i, f, g, o = (a[:, k * H : (k + 1) * H] for k in range(4))
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(_ln(c, inputs["ln_gamma_c"], inputs["ln_beta_c"]))
        else:
            r = _sigmoid(ax[:, :H] + ah[:, :H])
            z = _sigmoid(ax[:, H : 2 * H] + ah[:, H : 2 * H])
            n = np.tanh(ax[:, 2 * H :] + r * ah[:, 2 * H :])
            h = (1 - z) * n + z * h
        ys.append(h)
    return np.stack(ys), h, c


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reference_and_kernels_are_the_formulas(cell, training):
    inputs, _, _ = _case(cell, 6, 3, 4, 5, _rng("formulas", cell), lengths_kind=None)
    want = _written_out(cell, inputs)
    for api in (reference, ops):
        got = run_forward(api, cell, **inputs, training=training)
        for name, a, b in zip(("y", "h_n", "c_n"), got[:3], want, strict=True):
            assert_close(a, b, **tol(np.float64), name=name)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reference_against_torch_layer_norm(cell):
    """The same step written with torch.nn.functional.layer_norm, gradients by autograd."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    inputs, up, _ = _case(cell, 5, 3, 4, 7, _rng("torch", cell))
    lengths = inputs["lengths"]
    H = inputs["w_hh"].shape[1]
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()
              if isinstance(v, np.ndarray) and v.dtype.kind == "f"}  # fmt: skip
    p = leaves
    h, c = p["h0"], p.get("c0")
    ys = []
    for t in range(inputs["x"].shape[0]):
        ax = F.layer_norm(p["x"][t] @ p["w_ih"].T, (p["w_ih"].shape[0],), p["ln_gamma_ih"],
                          eps=1e-5) + p["b_ih"]  # fmt: skip
        ah = F.layer_norm(h @ p["w_hh"].T, (p["w_hh"].shape[0],), p["ln_gamma_hh"],
                          eps=1e-5) + p["b_hh"]  # fmt: skip
        if cell == "lstm":
            i, f, g, o = (ax + ah).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            c_ln = F.layer_norm(c_new, (H,), p["ln_gamma_c"], p["ln_beta_c"], eps=1e-5)
            h_new = torch.sigmoid(o) * torch.tanh(c_ln)
        else:
            (xr, xz, xn), (hr, hz, hn) = ax.chunk(3, dim=1), ah.chunk(3, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h_new = (1 - z) * torch.tanh(xn + r * hn) + z * h
        active = torch.tensor(t < lengths)[:, None]
        ys.append(torch.where(active, h_new, torch.zeros_like(h_new)))
        h = torch.where(active, h_new, h)
        if cell == "lstm":
            c = torch.where(active, c_new, c)
    y = torch.stack(ys)
    loss = (y * torch.tensor(up["dy"])).sum() + (h * torch.tensor(up["dh_n"])).sum()
    if cell == "lstm":
        loss = loss + (c * torch.tensor(up["dc_n"])).sum()
    loss.backward()
    want_y, _, _, ctx = run_forward(reference, cell, **inputs)
    assert_close(want_y, y.detach().numpy(), **tol(np.float64), name="y")
    grads = run_backward(reference, cell, ctx, **up)
    for key, name in GRAD_OF.items():
        if key in leaves:
            assert_close(grads[name], leaves[key].grad.numpy(), **tol(np.float64, "grad"),
                         name=name)  # fmt: skip


# ---- the kernels against the reference ------------------------------------------------------

# the last: at 25 rows (13 and 12 a thread) and small weights the forward's two threads split
# the batch rather than the units (build_info()["rows_apart"]), each normalising its own rows
GRID = [(7, 5, 6, 40, "mixed"), (4, 16, 9, 150, "positive"), (3, 2, 3, 17, "zero"),
        (5, 3, 4, 1, None), (0, 3, 4, 20, None), (12, 25, 20, 100, "mixed")]  # fmt: skip
SHAPES_FOR_BITS = [(6, 16, 8, 150), (12, 25, 20, 100)]  # (T, N, C, H): the units split, rows apart


@pytest.mark.openmp
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cell, options", CASES, ids=CASE_IDS)
def test_kernels_match_the_reference(cell, options, dtype, threads):
    before = rnnfast.get_num_threads()
    rnnfast.set_num_threads(threads)
    try:
        for T, N, C, H, lengths_kind in GRID:
            rng = _rng("grid", cell, _ids(options), T, N, H)
            inputs, up, opts = _case(cell, T, N, C, H, rng, lengths_kind=lengths_kind,
                                     options=options)  # fmt: skip
            low = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                       else v) for k, v in inputs.items()}  # fmt: skip
            ref_in = {k: (v.astype(dtype).astype(np.float64) if isinstance(v, np.ndarray)
                          and v.dtype.kind == "f" else v) for k, v in inputs.items()}  # fmt: skip
            for training in (False, True):  # the training pair stays for backward
                got = run_forward(ops, cell, **low, seed=SEED, training=training, **opts)
                want = run_forward(reference, cell, **ref_in, seed=SEED, training=training,
                                   **opts)  # fmt: skip
                for name, a, b in zip(("y", "h_n", "c_n"), got[:3], want[:3], strict=True):
                    assert_close(a, b, **tol(dtype), name=f"{name} at {(T, N, C, H)}")
            g = run_backward(ops, cell, got[3], **{k: None if v is None else v.astype(dtype)
                                                     for k, v in up.items()})  # fmt: skip
            w = run_backward(reference, cell, want[3], **up)
            assert set(g) == set(w)
            for name in w:
                # layer norm's gradients reach the hundreds where a product's spread is small:
                # float32's error, near zero too, is that of the largest
                bound = tol(dtype, "grad")
                bound["atol"] *= max(1.0, float(np.abs(w[name]).max(initial=0)))
                assert_close(g[name], w[name], **bound, name=f"{name} at {(T, N, H)}")
    finally:
        rnnfast.set_num_threads(before)


@pytest.mark.openmp
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("cell, options", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES_FOR_BITS, ids=["units_split", "rows_apart"])
def test_same_bits_for_any_thread_count(cell, options, dtype, shape):
    inputs, up, opts = _case(cell, *shape, _rng("bits", cell), dtype, options=options)
    before = rnnfast.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            rnnfast.set_num_threads(threads)
            y, h, c, ctx = run_forward(ops, cell, **inputs, seed=SEED, **opts)
            y_eval = run_forward(ops, cell, **inputs, training=False, **opts)[0]
            results.append((y.copy(), h, run_backward(ops, cell, ctx, **up), y_eval))
    finally:
        rnnfast.set_num_threads(before)
    (y1, h1, g1, e1), (y2, h2, g2, e2) = results
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(h1, h2)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)


@pytest.mark.parametrize("cell", LN_CELLS)
def test_padding_is_never_normalised_into_anything(cell):
    """NaN in x past a sequence's end reaches no output, no statistic and no gradient."""
    inputs, up, _ = _case(cell, 5, 4, 3, 24, _rng("nan", cell), np.float32)
    inputs["lengths"] = np.array([5, 2, 0, 4])
    clean = run_forward(ops, cell, **inputs)
    g_clean = run_backward(ops, cell, clean[3], **up)
    x = inputs["x"].copy()
    x[2:, 1] = np.nan
    x[:, 2] = np.inf
    dirty = run_forward(ops, cell, **dict(inputs, x=x))
    g_dirty = run_backward(ops, cell, dirty[3], **up)
    for a, b in zip(clean[:3], dirty[:3], strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)
    for k in g_clean:
        np.testing.assert_array_equal(g_clean[k], g_dirty[k], err_msg=k)


# ---- misuse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("api", [ops, reference], ids=["ops", "reference"])
def test_misuse_raises_clearly(api):
    rng = _rng("misuse")
    lstm, _, _ = _case("lstm", 3, 2, 3, 4, rng)
    gru, _, _ = _case("gru", 3, 2, 3, 4, rng)
    with pytest.raises(ValueError, match="ln_gamma_ih must have shape \\(16,\\)"):
        run_forward(api, "lstm", **dict(lstm, ln_gamma_ih=np.ones(12)))
    with pytest.raises(ValueError, match="missing ln_gamma_c, ln_beta_c"):
        run_forward(api, "lstm", **dict(lstm, ln_gamma_c=None, ln_beta_c=None))
    with pytest.raises(ValueError, match="needs all of.*missing ln_gamma_hh"):
        run_forward(api, "gru", **dict(gru, ln_gamma_hh=None))
    with pytest.raises(TypeError, match="ln_beta_c has dtype float32 but x has dtype float64"):
        run_forward(api, "lstm", **dict(lstm, ln_beta_c=lstm["ln_beta_c"].astype(np.float32)))
    with pytest.raises(ValueError, match="ln_gamma_c is only for cells with a cell state"):
        run_forward(api, "gru", **gru, ln_gamma_c=np.ones(4))
    for cell in OTHER_CELLS:
        inputs, _, _ = _case("gru" if CELLS[cell].gates == 3 else "rnn_tanh", 3, 2, 3, 4, rng)
        with pytest.raises(ValueError, match=f"layer norm .* not {cell}"):
            run_forward(api, cell, **inputs)
    proj = dict(lstm, w_hh=rng.standard_normal((16, 2)), h0=None)
    with pytest.raises(ValueError, match="layer norm is not supported with a projection"):
        run_forward(api, "lstm", **proj, w_hr=rng.standard_normal((2, 4)))


def test_extension_checks_the_parameters_itself():
    rng = _rng("extension")
    x = rng.standard_normal((3, 2, 3))
    w_ih, w_hh = rng.standard_normal((12, 3)), rng.standard_normal((12, 4))
    ones = np.ones(12)
    with pytest.raises(ValueError, match="not gru_reset_before"):
        rnnfast._C.gru_reset_before_forward(x, w_ih, w_hh, None, None, None, None, None, True,
                                            ln=(ones, ones, None, None))  # fmt: skip
    with pytest.raises(ValueError, match="ln_gamma_hh must have shape"):
        rnnfast._C.gru_forward(x, w_ih, w_hh, None, None, None, None, None, True,
                               ln=(ones, np.ones(3), None, None))  # fmt: skip
    with pytest.raises(ValueError, match="4-tuple"):
        rnnfast._C.gru_forward(x, w_ih, w_hh, None, None, None, None, None, True, ln=(ones,))
    with pytest.raises(TypeError, match="ln_gamma_c is required"):
        rnnfast._C.lstm_forward(x, rng.standard_normal((16, 3)), rng.standard_normal((16, 4)),
                                None, None, None, None, None, True,
                                ln=(np.ones(16), np.ones(16), None, np.zeros(4)))  # fmt: skip


def test_public_functions_take_the_parameters():
    rng = _rng("public")
    lstm, up, _ = _case("lstm", 4, 2, 3, 8, rng, lengths_kind=None)
    ln = {k: lstm[k] for k in ("ln_gamma_ih", "ln_gamma_hh", "ln_gamma_c", "ln_beta_c")}
    y, h, c, ctx = ops.lstm_forward(lstm["x"], lstm["w_ih"], lstm["w_hh"], **ln)
    yr, *_ = reference.lstm_forward(lstm["x"], lstm["w_ih"], lstm["w_hh"], **ln)
    assert_close(y, yr, **tol(np.float64))
    g = ops.lstm_backward(ctx, up["dy"])
    assert {"dln_gamma_ih", "dln_gamma_hh", "dln_gamma_c", "dln_beta_c"} <= set(g)
    gru, _, _ = _case("gru", 4, 2, 3, 8, rng)
    y, _, ctx = ops.gru_forward(
        gru["x"],
        gru["w_ih"],
        gru["w_hh"],
        ln_gamma_ih=gru["ln_gamma_ih"],
        ln_gamma_hh=gru["ln_gamma_hh"],
    )
    assert set(ops.gru_backward(ctx, y)) >= {"dln_gamma_ih", "dln_gamma_hh"}
    with pytest.raises(ValueError, match="not gru_reset_before"):
        ops.gru_forward(
            gru["x"],
            gru["w_ih"],
            gru["w_hh"],
            reset_after=False,
            ln_gamma_ih=gru["ln_gamma_ih"],
            ln_gamma_hh=gru["ln_gamma_hh"],
        )


# ---- the layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "lstm_cifg", "gru"])
def test_layer_gradients(kind):
    """A stacked bidirectional layer-norm layer against central differences, gains perturbed away
    from 1 so that their gradients are not a special case."""
    cls, extra = {"lstm": (rnnfast.LSTM, {}), "gru": (rnnfast.GRU, {}),
                  "lstm_cifg": (rnnfast.LSTM, {"coupled_input_forget": True})}[kind]  # fmt: skip
    layer = cls(3, 6, num_layers=2, bidirectional=True, dtype=np.float64, seed=11,
                layer_norm=True, **extra)  # fmt: skip
    rng = _rng("layer", kind)
    for name, p in layer.params.items():
        if name.startswith("ln_"):
            p += rng.uniform(-0.3, 0.3, p.shape)
    x = rng.standard_normal((5, 2, 3))
    lengths = np.array([5, 3])
    dy = rng.standard_normal((5, 2, 12))

    def loss():
        y, _ = layer(x, lengths=lengths)
        return (y * dy).sum()

    loss()
    layer.zero_grad()
    dx, _ = layer.backward(dy)
    names = ["ln_gamma_ih_l0", "ln_gamma_hh_l1_reverse", "weight_hh_l0"]
    if CELLS[layer.mode].has_c:
        names += ["ln_gamma_c_l1", "ln_beta_c_l0_reverse"]
    for name in names:
        numeric = central_differences(loss, layer.params[name])
        assert_close(layer.grads[name], numeric, rtol=1e-6, atol=1e-8, name=name)
    assert_close(dx, central_differences(loss, x), rtol=1e-6, atol=1e-8, name="dx")


def test_layer_parameters_and_options():
    layer = rnnfast.LSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=True)
    sd = layer.state_dict()
    for suffix in ("_l0", "_l1_reverse"):
        np.testing.assert_array_equal(sd["ln_gamma_ih" + suffix], np.ones(16, np.float32))
        np.testing.assert_array_equal(sd["ln_gamma_hh" + suffix], np.ones(16, np.float32))
        np.testing.assert_array_equal(sd["ln_gamma_c" + suffix], np.ones(4, np.float32))
        np.testing.assert_array_equal(sd["ln_beta_c" + suffix], np.zeros(4, np.float32))
    assert "layer_norm=True" in repr(layer)
    assert "ln_gamma_c_l0" not in rnnfast.GRU(3, 4, layer_norm=True).state_dict()
    assert not any(k.startswith("ln_") for k in rnnfast.LSTM(3, 4).state_dict())
    with pytest.raises(ValueError, match="layer_norm=True is for LSTM layers"):
        rnnfast.RNN(3, 4, layer_norm=True)
    with pytest.raises(ValueError, match="not gru_reset_before"):
        rnnfast.GRU(3, 4, reset_after=False, layer_norm=True)
    with pytest.raises(ValueError, match="not supported with proj_size"):
        rnnfast.LSTM(3, 4, proj_size=2, layer_norm=True)
    with pytest.raises(TypeError, match="layer_norm must be True or False"):
        rnnfast.LSTM(3, 4, layer_norm=1)
    # eval mode runs the same normalisation, and a fresh layer loads the state dict
    x = _rng("eval").standard_normal((4, 2, 3)).astype(np.float32)
    y_train = layer(x)[0]
    y_eval = layer.eval()(x)[0]
    assert_close(y_eval, y_train, **tol(np.float32), name="y")
    other = rnnfast.LSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=True, seed=5).eval()
    other.load_state_dict(sd)
    np.testing.assert_array_equal(other(x)[0], y_eval)
