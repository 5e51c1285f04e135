"""Recurrent dropout on the candidate (Semeniuta et al.) and on h_{t-1} into the products
(variational, Gal and Ghahramani), and zoneout (Krueger et al.): the masks,
the reference against finite differences and against the formulas written out step by step, the
kernels against the reference, determinism, the eval-mode semantics and every misuse."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import (
    CELLS,
    GATES,
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

CANDIDATE_CELLS = [c for c in CELLS if GATES[c] > 1]  # the LSTMs' g, the GRUs' n
SEED = 20261202


def _rng(*keys) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(keys).encode()))


VARIATIONAL = {"recurrent_dropout": 0.3, "recurrent_dropout_mode": "variational"}


def _options(cell):
    """The noise options each cell takes: zoneout alone, each dropout alone, with zoneout."""
    out = [{"zoneout": 0.3}, VARIATIONAL, {**VARIATIONAL, "zoneout": 0.2}]
    if GATES[cell] > 1:
        out += [{"recurrent_dropout": 0.4}, {"recurrent_dropout": 0.25, "zoneout": 0.2}]
    return out


def _ids(options):
    names = {"recurrent_dropout": "drop", "recurrent_dropout_mode": "", "zoneout": "zone"}
    return "-".join(f"{names[k]}{v}" for k, v in options.items())


ALL_CASES = [(c, o) for c in CELLS for o in _options(c)]


# ---- the masks ----------------------------------------------------------------------------------


def test_philox_known_answers():
    # Random123's known-answer vectors for Philox-4x32-10
    def words(*args):
        return [int(w) for w in reference.philox4x32_10(*args)]

    assert words(0, 0, 0, 0, 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    m = 0xFFFFFFFF
    assert words(m, m, m, m, m, m) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert words(*pi) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("kind", ["candidate", "zoneout", "variational"])
def test_kernel_masks_are_the_reference_masks(kind):
    for seed, stream in ((0, 0), (2**64 - 1, 5), (SEED, 2**28 - 1)):
        got = ops.recurrent_masks(kind, 0.37, seed, 6, 5, 41, noise_stream=stream)
        want = reference.recurrent_masks(kind, 0.37, seed, 6, 5, 41, noise_stream=stream)
        assert got.dtype == bool and got.shape == (6, 5, 41)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_rate_within_three_sigma(p):
    masks = ops.recurrent_masks("zoneout", p, SEED, 50, 40, 100)
    n = masks.size
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(masks.mean() - (1 - p)) < 3 * sigma, masks.mean()


def test_masks_differ_by_step_row_stream_seed_and_purpose():
    a = ops.recurrent_masks("candidate", 0.5, SEED, 4, 4, 64)
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[:, 0], a[:, 1])
    assert not np.array_equal(a, ops.recurrent_masks("candidate", 0.5, SEED + 1, 4, 4, 64))
    assert not np.array_equal(a, ops.recurrent_masks("candidate", 0.5, SEED, 4, 4, 64,
                                                     noise_stream=1))  # fmt: skip
    assert not np.array_equal(a, ops.recurrent_masks("zoneout", 0.5, SEED, 4, 4, 64))
    assert ops.recurrent_masks("zoneout", 0.0, SEED, 2, 3, 4).all()
    v = ops.recurrent_masks("variational", 0.5, SEED, 3, 4, 64)
    assert (v == v[0]).all(), "variational dropout keeps one mask for the whole sequence"
    assert not np.array_equal(v[0], a[0])


# ---- the reference ------------------------------------------------------------------------------


def _case(cell, T, N, C, H, rng, dtype=np.float64, lengths_kind="mixed"):
    inputs = make_inputs(cell, T, N, C, H, dtype, rng, lengths_kind=lengths_kind)
    return inputs, make_upstream(cell, T, N, H, dtype, rng)


def _loss(api, cell, inputs, up, options):
    y, h, c, _ = run_forward(api, cell, **inputs, seed=SEED, **options)
    total = (y * up["dy"]).sum() + (h * up["dh_n"]).sum()
    return total + ((c * up["dc_n"]).sum() if c is not None else 0.0)


@pytest.mark.parametrize("cell, options", ALL_CASES, ids=[f"{c}-{_ids(o)}" for c, o in ALL_CASES])
def test_reference_against_finite_differences(cell, options):
    # with a fixed seed the masks are fixed: the training forward is a deterministic function
    inputs, up = _case(cell, 5, 4, 3, 6, _rng("fd", cell, _ids(options)))
    _, _, _, ctx = run_forward(reference, cell, **inputs, seed=SEED, **options)
    grads = run_backward(reference, cell, ctx, **up)
    for key, name in (("x", "dx"), ("w_ih", "dw_ih"), ("w_hh", "dw_hh"), ("b_ih", "db_ih"),
                      ("b_hh", "db_hh"), ("h0", "dh0"), ("c0", "dc0")):  # fmt: skip
        if inputs.get(key) is None:
            continue
        numeric = central_differences(lambda: _loss(reference, cell, inputs, up, options),
                                      inputs[key])  # fmt: skip
        assert np.abs(numeric).max() > 1e-3, f"{name}: a vanishing gradient tests nothing"
        assert_close(grads[name], numeric, rtol=1e-6, atol=1e-8, name=name)


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _written_out(cell, inputs, p_drop, mode, p_zone, training):
    """The LSTM and GRU with both options, a step at a time from the formulas (no lengths)."""
    x, w_ih, w_hh, b_ih, b_hh = (inputs[k] for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh"))
    T, N, _ = x.shape
    H = w_hh.shape[1]
    keep = ops.recurrent_masks("candidate", p_drop, SEED, T, N, H)
    v = ops.recurrent_masks("variational", p_drop, SEED, 1, N, H)[0] / (1 - p_drop)
    take = ops.recurrent_masks("zoneout", p_zone, SEED, T, N, H)
    h, c, ys = inputs["h0"].copy(), None if inputs["c0"] is None else inputs["c0"].copy(), []
    for t in range(T):
        d = keep[t] / (1 - p_drop) if training and mode == "semeniuta" else 1.0
        h_in = h * v if training and mode == "variational" else h  # what W_hh multiplies
        ax, ah = x[t] @ w_ih.T + b_ih, h_in @ w_hh.T + b_hh
        if cell == "lstm":
            a = ax + ah
            i, f, g, o = (a[:, k * H : (k + 1) * H] for k in range(4))
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g) * d
            new = _sigmoid(o) * np.tanh(c)
        else:
            r = _sigmoid(ax[:, :H] + ah[:, :H])
            z = _sigmoid(ax[:, H : 2 * H] + ah[:, H : 2 * H])
            n = np.tanh(ax[:, 2 * H :] + r * ah[:, 2 * H :])
            new = (1 - z) * n * d + z * h
        h = np.where(take[t], new, h) if training else p_zone * h + (1 - p_zone) * new
        ys.append(h)
    return np.stack(ys), h, c


@pytest.mark.parametrize("mode", ["semeniuta", "variational"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reference_is_the_formulas(cell, training, mode):
    inputs, _ = _case(cell, 6, 3, 4, 5, _rng("formulas", cell), lengths_kind=None)
    options = {"recurrent_dropout": 0.3, "recurrent_dropout_mode": mode, "zoneout": 0.4}
    want_y, want_h, want_c = _written_out(cell, inputs, 0.3, mode, 0.4, training)
    for api in (reference, ops):
        y, h, c, _ = run_forward(api, cell, **inputs, seed=SEED, training=training, **options)
        assert_close(y, want_y, **tol(np.float64), name="y")
        assert_close(h, want_h, **tol(np.float64), name="h_n")
        if c is not None:
            assert_close(c, want_c, **tol(np.float64), name="c_n")


# ---- the kernels against the reference ------------------------------------------------------


# the last: at 25 rows (13 and 12 a thread) and small weights two threads split the batch rather
# than the units (build_info()["rows_apart"]), each drawing its own rows' masks
GRID = [(7, 5, 6, 40, "mixed"), (4, 16, 9, 150, "positive"), (3, 2, 3, 17, "zero"),
        (30, 25, 20, 100, "mixed")]  # fmt: skip
SHAPES_FOR_BITS = [(6, 16, 8, 150), (30, 25, 20, 100)]  # (T, N, C, H): the units split, rows apart


@pytest.mark.openmp
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cell, options", ALL_CASES, ids=[f"{c}-{_ids(o)}" for c, o in ALL_CASES])
def test_kernels_match_the_reference(cell, options, dtype, threads):
    before = rnnfast.get_num_threads()
    rnnfast.set_num_threads(threads)
    try:
        for T, N, C, H, lengths_kind in GRID:
            rng = _rng("grid", cell, _ids(options), T, N, H)
            inputs, up = _case(cell, T, N, C, H, rng, lengths_kind=lengths_kind)
            low = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                       else v) for k, v in inputs.items()}  # fmt: skip
            ref_in = {k: (v.astype(dtype).astype(np.float64) if isinstance(v, np.ndarray)
                          and v.dtype.kind == "f" else v) for k, v in inputs.items()}  # fmt: skip
            for training in (False, True):  # the training pair stays for backward
                got = run_forward(ops, cell, **low, seed=SEED, training=training, **options)
                want = run_forward(reference, cell, **ref_in, seed=SEED, training=training,
                                   **options)  # fmt: skip
                for name, a, b in zip(("y", "h_n", "c_n"), got[:3], want[:3], strict=True):
                    assert_close(a, b, **tol(dtype), name=name)
            g = run_backward(ops, cell, got[3], **{k: None if v is None else v.astype(dtype)
                                                     for k, v in up.items()})  # fmt: skip
            w = run_backward(reference, cell, want[3], **up)
            for name in w:
                assert_close(g[name], w[name], **tol(dtype, "grad"), name=name)
    finally:
        rnnfast.set_num_threads(before)


@pytest.mark.openmp
@pytest.mark.parametrize("cell, options", ALL_CASES, ids=[f"{c}-{_ids(o)}" for c, o in ALL_CASES])
@pytest.mark.parametrize("shape", SHAPES_FOR_BITS, ids=["units_split", "rows_apart"])
def test_same_seed_same_bits_for_any_thread_count(cell, options, shape):
    inputs, up = _case(cell, *shape, _rng("bits", cell), np.float32)
    before = rnnfast.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            rnnfast.set_num_threads(threads)
            y, h, c, ctx = run_forward(ops, cell, **inputs, seed=SEED, **options)
            y_eval = run_forward(ops, cell, **inputs, training=False, **options)[0]
            results.append((y.copy(), h, run_backward(ops, cell, ctx, **up), y_eval))
    finally:
        rnnfast.set_num_threads(before)
    (y1, h1, g1, e1), (y2, h2, g2, e2) = results
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(h1, h2)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
    y3, *_ = run_forward(ops, cell, **inputs, seed=SEED + 1, **options)
    assert not np.array_equal(y1, y3), "another seed must draw other masks"


# ---- semantics ------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_zero_probability_is_the_plain_cell_bitwise(cell):
    inputs, up = _case(cell, 5, 16, 7, 70, _rng("zero", cell), np.float32)
    y0, h0, _, ctx0 = run_forward(ops, cell, **inputs)
    y, h, _, ctx = run_forward(ops, cell, **inputs, recurrent_dropout=0.0, zoneout=0.0, seed=3)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(h, h0)
    g0, g = run_backward(ops, cell, ctx0, **up), run_backward(ops, cell, ctx, **up)
    for k in g0:
        np.testing.assert_array_equal(g[k], g0[k], err_msg=k)


@pytest.mark.parametrize("cell", CANDIDATE_CELLS)
def test_eval_mode_applies_no_dropout(cell):
    inputs, _ = _case(cell, 5, 3, 4, 20, _rng("eval", cell))
    for api in (ops, reference):
        plain = run_forward(api, cell, **inputs, training=False)
        dropped = run_forward(api, cell, **inputs, training=False, recurrent_dropout=0.5, seed=1)
        assert_close(dropped[0], plain[0], **tol(np.float64), name="y")
        trained = run_forward(api, cell, **inputs, recurrent_dropout=0.5, seed=1)
        assert not np.allclose(trained[0], plain[0]), "training must drop units"


def test_unseeded_calls_draw_fresh_masks_and_backward_reuses_them():
    inputs, up = _case("lstm", 6, 4, 5, 30, _rng("fresh"), lengths_kind=None)
    y1, _, _, ctx1 = run_forward(ops, "lstm", **inputs, recurrent_dropout=0.5)
    y2, *_ = run_forward(ops, "lstm", **inputs, recurrent_dropout=0.5)
    assert not np.array_equal(y1, y2)
    seed = ctx1.noise.seed
    y3, _, _, ctx3 = run_forward(reference, "lstm", **inputs, recurrent_dropout=0.5, seed=seed)
    assert_close(y1, y3, **tol(np.float64), name="y")
    g1, g3 = run_backward(ops, "lstm", ctx1, **up), run_backward(reference, "lstm", ctx3, **up)
    for k in g3:
        assert_close(g1[k], g3[k], **tol(np.float64, "grad"), name=k)


def test_public_functions_take_the_options():
    rng = _rng("public")
    x = rng.standard_normal((4, 2, 3))
    lstm = make_inputs("lstm", 4, 2, 3, 8, np.float64, rng)
    y, *_ = ops.lstm_forward(x, lstm["w_ih"], lstm["w_hh"], recurrent_dropout=0.3, zoneout=0.1,
                             seed=5)  # fmt: skip
    yr, *_ = reference.lstm_forward(x, lstm["w_ih"], lstm["w_hh"], recurrent_dropout=0.3,
                                    zoneout=0.1, seed=5)  # fmt: skip
    assert_close(y, yr, **tol(np.float64))
    gru = make_inputs("gru", 4, 2, 3, 8, np.float64, rng)
    y, _, ctx = ops.gru_forward(x, gru["w_ih"], gru["w_hh"], recurrent_dropout=0.3, seed=5,
                                reset_after=False)  # fmt: skip
    assert ctx.noise.candidate == 0.3 and ctx.cell == "gru_reset_before"
    rnn = make_inputs("rnn_tanh", 4, 2, 3, 8, np.float64, rng)
    y, _, ctx = ops.rnn_forward(x, rnn["w_ih"], rnn["w_hh"], zoneout=0.2, seed=5)
    assert ctx.noise.zoneout == 0.2


# ---- misuse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("api", [ops, reference], ids=["ops", "reference"])
def test_misuse_raises_clearly(api):
    rng = _rng("misuse")
    lstm = make_inputs("lstm", 3, 2, 3, 4, np.float64, rng)
    rnn = make_inputs("rnn_tanh", 3, 2, 3, 4, np.float64, rng)
    bad = [
        ({"recurrent_dropout": 1.0}, ValueError, r"recurrent_dropout must be in \[0, 1\)"),
        ({"recurrent_dropout": -0.1}, ValueError, "recurrent_dropout must be in"),
        ({"zoneout": float("nan")}, ValueError, "zoneout must be in"),
        ({"zoneout": "0.1"}, TypeError, "zoneout must be a number"),
        ({"zoneout": True}, TypeError, "zoneout must be a number"),
        ({"recurrent_dropout": 0.1, "recurrent_dropout_mode": "gal"}, ValueError,
         "recurrent_dropout_mode must be one of"),
        ({"zoneout": 0.1, "seed": -1}, ValueError, "seed must be in"),
        ({"zoneout": 0.1, "seed": 1.5}, TypeError, "seed must be an int"),
        ({"zoneout": 0.1, "noise_stream": 2**28}, ValueError, "noise_stream must be in"),
    ]  # fmt: skip
    for options, error, match in bad:
        with pytest.raises(error, match=match):
            run_forward(api, "lstm", **lstm, **options)
    with pytest.raises(ValueError, match="rnn_tanh cell does not have"):
        run_forward(api, "rnn_tanh", **rnn, recurrent_dropout=0.2)
    w_hr = rng.standard_normal((2, 4))
    proj = dict(lstm, w_hh=rng.standard_normal((16, 2)), h0=None)
    with pytest.raises(ValueError, match="zoneout is not supported with a projection"):
        run_forward(api, "lstm", **proj, w_hr=w_hr, zoneout=0.1)
    with pytest.raises(ValueError, match="variational.*not supported with a projection"):
        run_forward(api, "lstm", **proj, w_hr=w_hr, **VARIATIONAL)


def test_extension_checks_the_noise_itself():
    rng = _rng("extension")
    x = rng.standard_normal((3, 2, 3))
    w_ih, w_hh = rng.standard_normal((4, 3)), rng.standard_normal((4, 4))
    with pytest.raises(ValueError, match="candidate needs a cell with one"):
        rnnfast._C.rnn_tanh_forward(x, w_ih, w_hh, None, None, None, None, None, True,
                                    noise=(1, 0, 0.5, 2**31, 0.0, 0, 0.0, 0))  # fmt: skip
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        rnnfast._C.rnn_tanh_forward(x, w_ih, w_hh, None, None, None, None, None, True,
                                    noise=(1, 0, 0.0, 0, 1.5, 0, 0.0, 0))  # fmt: skip
    with pytest.raises(ValueError, match="8-tuple"):
        rnnfast._C.rnn_tanh_forward(x, w_ih, w_hh, None, None, None, None, None, True,
                                    noise=(1, 0))  # fmt: skip


# ---- the layers -------------------------------------------------------------------------------


def _layer(kind, **kwargs):
    cls = {"lstm": rnnfast.LSTM, "gru": rnnfast.GRU, "rnn": rnnfast.RNN}[kind]
    return cls(3, 6, num_layers=2, bidirectional=True, dtype=np.float64, seed=11, **kwargs)


@pytest.mark.parametrize("kind, mode", [("lstm", "semeniuta"), ("lstm", "variational"),
                                        ("gru", "semeniuta"), ("gru", "variational"),
                                        ("rnn", "variational")])  # fmt: skip
def test_layer_gradients_with_dropout_and_zoneout(kind, mode):
    """The stacked bidirectional layer's backward against central differences, the layer's
    generator reset before each forward so that every call draws the same masks."""
    layer = _layer(kind, recurrent_dropout=0.3, recurrent_dropout_mode=mode, zoneout=0.2)
    rng = _rng("layer", kind)
    x = rng.standard_normal((5, 2, 3))
    lengths = np.array([5, 3])
    dy = rng.standard_normal((5, 2, 12))

    def loss():
        layer.rng = np.random.default_rng(99)
        y, _ = layer(x, lengths=lengths)
        return (y * dy).sum()

    loss()
    layer.zero_grad()
    dx, _ = layer.backward(dy)
    for name in ("weight_hh_l0", "weight_hh_l1_reverse", "bias_ih_l1"):
        numeric = central_differences(loss, layer.params[name])
        assert_close(layer.grads[name], numeric, rtol=1e-6, atol=1e-8, name=name)
    assert_close(dx, central_differences(loss, x), rtol=1e-6, atol=1e-8, name="dx")


def test_layer_masks_come_from_its_seed():
    a, b = _layer("lstm", recurrent_dropout=0.4, zoneout=0.1), _layer("lstm", recurrent_dropout=0.4,
                                                                     zoneout=0.1)  # fmt: skip
    x = _rng("seeded").standard_normal((6, 3, 3))
    ya, yb = a(x)[0], b(x)[0]
    np.testing.assert_array_equal(ya, yb)  # the same seed: the same masks
    assert not np.array_equal(a(x)[0], ya), "each forward draws fresh masks"
    plain = _layer("lstm")
    assert not np.allclose(plain(x)[0], ya)
    assert "recurrent_dropout=0.4" in repr(a) and "zoneout=0.1" in repr(a)


def test_layer_eval_mode_is_deterministic_and_the_expectation():
    layer = rnnfast.GRU(3, 5, dtype=np.float64, seed=2, recurrent_dropout=0.5, zoneout=0.3).eval()
    x = _rng("eval-layer").standard_normal((4, 2, 3))
    y1, y2 = layer(x)[0], layer(x)[0]
    np.testing.assert_array_equal(y1, y2)
    p = layer.params
    want, *_ = reference.gru_forward(x, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                                     p["bias_hh_l0"], training=False, zoneout=0.3)  # fmt: skip
    assert_close(y1, want, **tol(np.float64), name="y")


def test_layer_options_are_checked():
    with pytest.raises(ValueError, match="zoneout must be in"):
        rnnfast.LSTM(3, 4, zoneout=1.0)
    with pytest.raises(ValueError, match="the rnn_tanh cell does not have"):
        rnnfast.RNN(3, 4, recurrent_dropout=0.2, recurrent_dropout_mode="semeniuta")
    with pytest.raises(ValueError, match="zoneout is not supported with a projection"):
        rnnfast.LSTM(3, 4, proj_size=2, zoneout=0.1)
    layer = rnnfast.RNN(3, 4, zoneout=0.2, recurrent_dropout=0.1)  # variational: the RNN's default
    assert layer.recurrent_dropout_mode == "variational" and layer.zoneout == 0.2
    assert rnnfast.LSTM(3, 4).recurrent_dropout_mode == "semeniuta"
