"""The CUDA backend (rnnfast.cuda) against the float64 NumPy reference and the CPU kernels.

Every test is marked cuda and skips where there is no GPU or no CUDA build (see conftest.py).
The grid: every cell x float32, float64, float16, bfloat16 x awkward shapes x lengths kinds, in
both recurrence paths (the stepped cuBLAS one and the persistent kernel). float16 and bfloat16
are compared by relative norm against the reference run on the same rounded inputs, since their
elementwise error is dominated by the rounding of every stored value.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from conftest import (
    CELLS,
    GATES,
    GPU_CELLS,
    GRAD_NAMES,
    PERSISTENT_CELLS,
    assert_close,
    cast,
    make_inputs,
    make_upstream,
    run_backward,
    run_forward,
)

pytestmark = pytest.mark.cuda

DTYPES = ["float32", "float64", "float16", "bfloat16"]
_TS, _NS, _SIZES = (1, 7, 33), (1, 3, 16), (1, 5, 64, 129)
SHAPES = [
    (_TS[i % 3], _NS[(i // 3) % 3], C, H)
    for i, (C, H) in enumerate(itertools.product(_SIZES, _SIZES))
]
LENGTHS = [None, "mixed"]
# batch tiles of 1, 3 (two tiles of 2), 16 (two of 8) and 40 (five of 8); H over several blocks
PERSISTENT_SHAPES = [(7, 1, 5, 64), (9, 3, 33, 129), (5, 16, 64, 256), (4, 40, 8, 65)]

# float32/float64 elementwise (as conftest's table, a little looser for float32: cuBLAS sums in
# another order than the CPU BLAS); float16/bfloat16 by ||actual - expected|| / ||expected||
ELEMENTWISE = {
    "float64": {"output": {"rtol": 1e-11, "atol": 1e-11}, "grad": {"rtol": 1e-9, "atol": 1e-10}},
    "float32": {"output": {"rtol": 3e-5, "atol": 3e-5}, "grad": {"rtol": 3e-4, "atol": 3e-4}},
}
RELATIVE_NORM = {
    "float16": {"output": 5e-3, "grad": 1e-2},
    "bfloat16": {"output": 3e-2, "grad": 5e-2},
}
# plus an absolute floor per element (as a root mean square): gradients far below 1 lose their
# relative precision where they are stored in the dtype (float16 subnormals below 6e-5)
ABSOLUTE_RMS = {"float16": 1e-4, "bfloat16": 1e-3}


def _np_dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _cupy():
    return pytest.importorskip("cupy")


class _Gpu:
    """rnnfast.ops' uniform pair, on the GPU path directly (ops dispatches GPU arrays here)."""

    @staticmethod
    def forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, *, lengths=None,
                training=True, w_peephole=None, w_hr=None):  # fmt: skip
        from rnnfast import cuda

        return cuda.forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, training,
                            w_peephole, w_hr)  # fmt: skip

    @staticmethod
    def backward(ctx, dy, dh_n=None, dc_n=None, *, cell):
        from rnnfast import cuda

        return cuda.backward(cell, ctx, dy, dh_n, dc_n)


GPU = _Gpu()


@pytest.fixture
def persistent_mode(request):
    from rnnfast import cuda

    before = cuda.get_options()
    cuda.set_options(persistent=request.param)
    yield request.param
    cuda.set_options(**before)


def _rounded(arrays: dict, dtype) -> dict:
    """float64 arrays rounded through ``dtype`` (the values the GPU really sees)."""
    return {
        k: v.astype(dtype).astype(np.float64)
        if isinstance(v, np.ndarray) and v.dtype.kind == "f"
        else v
        for k, v in arrays.items()
    }


@functools.cache
def _case(cell, T, N, C, H, with_state, with_bias, lengths_kind, dtype_name, seed=0):
    """Inputs in float64 (rounded through the dtype), and the reference's outputs and grads."""
    from rnnfast import reference

    rng = np.random.default_rng([seed, T, N, C, H, CELLS.index(cell)])
    inputs = make_inputs(cell, T, N, C, H, np.float64, rng, with_state, with_bias, lengths_kind)
    up = make_upstream(cell, T, N, H, np.float64, rng)
    if dtype_name in ("float16", "bfloat16"):
        inputs, up = _rounded(inputs, _np_dtype(dtype_name)), _rounded(up, _np_dtype(dtype_name))
    y, h_n, c_n, ctx = run_forward(reference, cell, **inputs)
    grads = run_backward(reference, cell, ctx, **up)
    return inputs, up, (y, h_n, c_n), grads


def _to_gpu(arrays: dict, dtype_name) -> dict:
    cupy = _cupy()
    dt = _np_dtype(dtype_name)
    out = {}
    for k, v in arrays.items():
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            out[k] = cupy.asarray(v.astype(dt))
        elif isinstance(v, np.ndarray):
            out[k] = cupy.asarray(v)
        else:
            out[k] = v
    return out


def _host(a):
    if a is None:
        return None
    return _cupy().asnumpy(a).astype(np.float64)


def _compare(actual, expected, dtype_name, kind, name, looser=1.0):
    if dtype_name in ELEMENTWISE:
        assert_close(_host(actual), expected, **ELEMENTWISE[dtype_name][kind], name=name)
        return
    a, e = _host(actual), expected
    if a is None or e is None:
        assert a is None and e is None, f"{name}: one side is None"
        return
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{name}: non-finite values"
    scale, err = np.linalg.norm(e), np.linalg.norm(a - e)
    limit = RELATIVE_NORM[dtype_name][kind] * looser
    floor = ABSOLUTE_RMS[dtype_name] * np.sqrt(e.size)
    assert err <= limit * scale + floor, (
        f"{name} ({dtype_name}): ||actual - expected|| = {err:.3e} > {limit:g} * {scale:.3e} "
        f"+ {floor:.3e}; relative {err / max(scale, 1e-300):.3e}, max abs err "
        f"{np.abs(a - e).max():.3e}"
    )


def _check(cell, dtype_name, case):
    inputs, up, expected, expected_grads = case
    y, h_n, c_n, ctx = run_forward(GPU, cell, **_to_gpu(inputs, dtype_name))
    for name, a, e in zip(("y", "h_n", "c_n"), (y, h_n, c_n), expected, strict=True):
        if a is not None:
            assert a.dtype.name == dtype_name, f"{name} dtype {a.dtype} != {dtype_name}"
        _compare(a, e, dtype_name, "output", name)
    grads = run_backward(GPU, cell, ctx, **_to_gpu(up, dtype_name))
    assert set(grads) == set(expected_grads)
    # relu's derivative jumps: a pre-activation near 0 that rounds to the other side in a 16-bit
    # dtype switches a whole path of the gradient on or off
    looser = 2.0 if cell == "rnn_relu" else 1.0
    for k in GRAD_NAMES:
        if k in expected_grads:
            _compare(grads[k], expected_grads[k], dtype_name, "grad", k, looser)


@pytest.mark.parametrize("persistent_mode", ["never", "auto"], indirect=True)
@pytest.mark.parametrize("lengths_kind", LENGTHS, ids=lambda k: str(k))
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}N{}C{}H{}".format(*s))
@pytest.mark.parametrize("cell", GPU_CELLS)
def test_grid_against_reference(cell, shape, dtype_name, lengths_kind, persistent_mode):
    _check(cell, dtype_name, _case(cell, *shape, True, True, lengths_kind, dtype_name))


@pytest.mark.parametrize("persistent_mode", ["always"], indirect=True)
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", PERSISTENT_SHAPES, ids=lambda s: "T{}N{}C{}H{}".format(*s))
@pytest.mark.parametrize("cell", PERSISTENT_CELLS)
def test_persistent_kernel_against_reference(cell, shape, dtype_name, persistent_mode):
    _check(cell, dtype_name, _case(cell, *shape, True, True, "mixed", dtype_name))


@pytest.mark.parametrize("lengths_kind", [None, "full", "zero", "mixed"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("cell", GPU_CELLS)
def test_states_biases_lengths(cell, with_state, with_bias, lengths_kind):
    _check(
        cell, "float64", _case(cell, 7, 3, 5, 64, with_state, with_bias, lengths_kind, "float64")
    )


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("cell", GPU_CELLS)
def test_matches_cpu_kernels(cell, dtype_name):
    from rnnfast import ops

    inputs, up, *_ = _case(cell, 20, 16, 33, 129, True, True, "mixed", dtype_name)
    dt = np.dtype(dtype_name)
    cpu_in, cpu_up = cast(inputs, dt), cast(up, dt)
    y, h_n, c_n, ctx = run_forward(ops, cell, **cpu_in)
    cpu_grads = run_backward(ops, cell, ctx, **cpu_up)
    gy, gh, gc, gctx = run_forward(GPU, cell, **_to_gpu(inputs, dtype_name))
    gpu_grads = run_backward(GPU, cell, gctx, **_to_gpu(up, dtype_name))
    for name, a, e in (("y", gy, y), ("h_n", gh, h_n), ("c_n", gc, c_n)):
        _compare(a, None if e is None else e.astype(np.float64), dtype_name, "output", name)
    for k, e in cpu_grads.items():
        _compare(gpu_grads[k], None if e is None else e.astype(np.float64), dtype_name, "grad", k)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("cell", GPU_CELLS)
def test_nonfinite_padding_never_reaches_the_results(cell, dtype_name, poison):
    """As on the CPU: NaN or inf in x past each length leaves every output and gradient exactly
    as zero padding does (the dw_ih product reads a copy of x with the padding zeroed)."""
    inputs, up, *_ = _case(cell, 7, 5, 33, 64, True, True, "mixed", dtype_name)
    padded = (np.arange(7)[:, None] >= inputs["lengths"][None, :])[:, :, None]
    assert padded.any()
    results = []
    for fill in (0.0, poison):
        g = _to_gpu(dict(inputs, x=np.where(padded, fill, inputs["x"])), dtype_name)
        out = run_forward(GPU, cell, **g)
        grads = run_backward(GPU, cell, out[3], **_to_gpu(up, dtype_name))
        results.append(([_host(a) for a in out[:3]], {k: _host(v) for k, v in grads.items()}))
    (outs0, grads0), (outs1, grads1) = results
    for a, b in zip(outs1, outs0, strict=True):
        np.testing.assert_array_equal(a, b)
    for k, v in grads0.items():
        if v is not None:
            assert np.isfinite(grads1[k]).all(), k
            np.testing.assert_array_equal(grads1[k], v, err_msg=k)


@pytest.mark.parametrize("cell", GPU_CELLS)
def test_inference_matches_training_and_keeps_no_reserve(cell):
    inputs, *_ = _case(cell, 7, 3, 5, 64, True, True, "mixed", "float32")
    g = _to_gpu(inputs, "float32")
    y, h_n, c_n, ctx = run_forward(GPU, cell, **g, training=True)
    yi, hi, ci, ctx_i = run_forward(GPU, cell, **g, training=False)
    assert ctx.training and not ctx_i.training and ctx_i.reserve is None
    np.testing.assert_array_equal(_host(yi), _host(y))
    np.testing.assert_array_equal(_host(hi), _host(h_n))
    if c_n is not None:
        np.testing.assert_array_equal(_host(ci), _host(c_n))
    with pytest.raises(RuntimeError, match="training=True"):
        run_backward(GPU, cell, ctx_i, dy=_cupy().ones_like(y))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("cell", GPU_CELLS)
def test_reproducible(cell, dtype_name):
    inputs, up, *_ = _case(cell, 20, 16, 33, 129, True, True, "mixed", dtype_name)
    g, gu = _to_gpu(inputs, dtype_name), _to_gpu(up, dtype_name)
    runs = []
    for _ in range(3):
        y, h_n, c_n, ctx = run_forward(GPU, cell, **g)
        grads = run_backward(GPU, cell, ctx, **gu)
        runs.append([_host(a) for a in [y, h_n, c_n] + [grads.get(k) for k in GRAD_NAMES]])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("cell", GPU_CELLS)
def test_inputs_never_modified(cell):
    inputs, up, *_ = _case(cell, 7, 3, 5, 64, True, True, "mixed", "float32")
    g, gu = _to_gpu(inputs, "float32"), _to_gpu(up, "float32")
    before = {k: _host(v) for k, v in {**g, **gu}.items() if v is not None}
    *_, ctx = run_forward(GPU, cell, **g)
    run_backward(GPU, cell, ctx, **gu)
    for k, v in {**g, **gu}.items():
        if v is not None:
            np.testing.assert_array_equal(_host(v), before[k], err_msg=k)


def test_zero_steps_returns_initial_state():
    cupy = _cupy()
    rng = np.random.default_rng(0)
    inputs = _to_gpu(make_inputs("lstm", 0, 3, 4, 5, np.float64, rng), "float64")
    y, h_n, c_n, ctx = run_forward(GPU, "lstm", **inputs)
    assert y.shape == (0, 3, 5)
    np.testing.assert_array_equal(_host(h_n), _host(inputs["h0"]))
    np.testing.assert_array_equal(_host(c_n), _host(inputs["c0"]))
    dh_n, dc_n = cupy.ones((3, 5)), cupy.full((3, 5), 2.0)
    grads = GPU.backward(ctx, cupy.zeros((0, 3, 5)), dh_n, dc_n, cell="lstm")
    np.testing.assert_array_equal(_host(grads["dh0"]), _host(dh_n))
    np.testing.assert_array_equal(_host(grads["dc0"]), _host(dc_n))
    assert not _host(grads["dw_ih"]).any() and not _host(grads["db_hh"]).any()


def test_runs_on_the_current_stream():
    cupy = _cupy()
    inputs, up, expected, _ = _case("lstm", 9, 4, 16, 32, True, True, "mixed", "float32")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        g = _to_gpu(inputs, "float32")
        y, h_n, c_n, ctx = run_forward(GPU, "lstm", **g)
        stream.synchronize()
    _compare(y, expected[0], "float32", "output", "y")


def test_ops_dispatches_gpu_arrays():
    """rnnfast.ops takes CuPy arrays and returns CuPy arrays (the lines in ops.py that route)."""
    cupy = _cupy()
    from rnnfast import ops

    inputs, up, expected, expected_grads = _case("gru", 7, 3, 5, 64, True, True, "mixed",
                                                 "float32")  # fmt: skip
    y, h_n, ctx = ops.gru_forward(**{k: v for k, v in _to_gpu(inputs, "float32").items()
                                     if k != "c0"})  # fmt: skip
    assert isinstance(y, cupy.ndarray) and isinstance(h_n, cupy.ndarray)
    _compare(y, expected[0], "float32", "output", "y")
    grads = ops.gru_backward(ctx, **{k: v for k, v in _to_gpu(up, "float32").items()
                                     if k != "dc_n"})  # fmt: skip
    _compare(grads["dw_hh"], expected_grads["dw_hh"], "float32", "grad", "dw_hh")


def test_torch_tensors_via_dlpack():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    cupy = _cupy()
    inputs, _, expected, _ = _case("lstm", 7, 3, 5, 64, True, True, None, "bfloat16")
    t = {k: torch.from_numpy(v).to("cuda", torch.bfloat16) if isinstance(v, np.ndarray) else v
         for k, v in inputs.items()}  # fmt: skip
    y, h_n, c_n, _ = run_forward(GPU, "lstm", **t)
    assert isinstance(y, cupy.ndarray) and y.dtype.name == "bfloat16"
    _compare(y, expected[0], "bfloat16", "output", "y")


def test_cpu_and_gpu_arrays_do_not_mix():
    inputs, *_ = _case("rnn_tanh", 3, 2, 4, 5, True, True, None, "float32")
    g = _to_gpu(inputs, "float32")
    g["w_hh"] = inputs["w_hh"].astype(np.float32)
    with pytest.raises(TypeError, match="GPU arrays only together"):
        run_forward(GPU, "rnn_tanh", **g)


def test_build_info_names_the_architecture():
    from rnnfast import cuda

    info = cuda.build_info()
    assert info["cuda"] and "90" in info["architectures"]
    assert info["cublas"]


@pytest.mark.parametrize("persistent_mode", ["always"], indirect=True)
@pytest.mark.parametrize("cell", [c for c in GPU_CELLS if c not in PERSISTENT_CELLS])
def test_required_persistent_kernel_refuses_cells_without_one(cell, persistent_mode):
    """A cell with a second product per step has no persistent kernel: persistent="always"
    raises naming the cell, "auto" takes the stepped kernels."""
    from rnnfast import cuda

    inputs = make_inputs(cell, 3, 2, 4, 8, np.float32, np.random.default_rng(0))
    assert not cuda._module().persistent_fits(cell, "float32", 2, 8)
    with pytest.raises(RuntimeError, match=cell):
        run_forward(GPU, cell, **_to_gpu(inputs, "float32"))


PEEPHOLE_CELLS = [c for c in GPU_CELLS if c.startswith("lstm")]


# (peephole, P): peepholes, a projection, both
EXTRAS = [(True, 0), (False, 16), (True, 5)]


@pytest.mark.parametrize("persistent_mode", ["never", "auto"], indirect=True)
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize(("peephole", "P"), EXTRAS, ids=["peephole", "proj", "peephole-proj"])
@pytest.mark.parametrize("cell", PEEPHOLE_CELLS)
def test_extra_parameters_against_reference(cell, peephole, P, dtype_name, persistent_mode):
    """w_peephole and w_hr on the GPU (the persistent kernels where they apply), dw_peephole's
    reduction and dw_hr."""
    from rnnfast import reference

    rng = np.random.default_rng([7, CELLS.index(cell), P])
    T, N, C, H = 7, 5, 33, 64
    R, k = P or H, 1 / np.sqrt(H)
    inputs = make_inputs(cell, T, N, C, H, np.float64, rng, lengths_kind="mixed")
    if peephole:
        inputs["w_peephole"] = rng.uniform(-1, 1, (3, H))
    up = make_upstream(cell, T, N, H, np.float64, rng)
    if P:
        inputs["w_hr"] = rng.uniform(-k, k, (P, H))
        inputs["w_hh"] = rng.uniform(-k, k, (inputs["w_hh"].shape[0], P))
        inputs["h0"] = rng.standard_normal((N, P))
        up["dy"], up["dh_n"] = rng.standard_normal((T, N, R)), rng.standard_normal((N, R))
    if dtype_name in ("float16", "bfloat16"):
        inputs, up = _rounded(inputs, _np_dtype(dtype_name)), _rounded(up, _np_dtype(dtype_name))
    y, h_n, c_n, ctx = run_forward(reference, cell, **inputs)
    expected = run_backward(reference, cell, ctx, **up)
    gy, gh, gc, gctx = run_forward(GPU, cell, **_to_gpu(inputs, dtype_name))
    for name, a, e in (("y", gy, y), ("h_n", gh, h_n), ("c_n", gc, c_n)):
        _compare(a, e, dtype_name, "output", name)
    grads = run_backward(GPU, cell, gctx, **_to_gpu(up, dtype_name))
    assert set(grads) == set(expected)
    assert ("dw_peephole" in grads) == peephole and ("dw_hr" in grads) == bool(P)
    for name, e in expected.items():
        _compare(grads[name], e, dtype_name, "grad", name)


@pytest.mark.parametrize("persistent_mode", ["always"], indirect=True)
def test_required_persistent_kernel_refuses_a_projection(persistent_mode):
    inputs = make_inputs("lstm", 3, 2, 4, 8, np.float32, np.random.default_rng(0))
    inputs["w_hh"] = np.ones((32, 2), np.float32)
    inputs["h0"] = None
    inputs["w_hr"] = np.ones((2, 8), np.float32)
    with pytest.raises(RuntimeError, match="with a projection"):
        run_forward(GPU, "lstm", **_to_gpu(inputs, "float32"))


# ---- recurrent dropout and zoneout: the same masks as the CPU kernels (rnnfast/noise.h) --------
NOISE_OPTIONS = {
    "semeniuta": {"recurrent_dropout": 0.3, "recurrent_dropout_mode": "semeniuta"},
    "variational": {"recurrent_dropout": 0.3, "recurrent_dropout_mode": "variational"},
    "zoneout": {"zoneout": 0.2},
    "semeniuta+zoneout": {"recurrent_dropout": 0.3, "zoneout": 0.2},
    "variational+zoneout": {"recurrent_dropout": 0.3, "recurrent_dropout_mode": "variational",
                            "zoneout": 0.2},
}  # fmt: skip
NOISE_CELLS = [c for c in GPU_CELLS if c != "gru_reset_before"]


@pytest.mark.parametrize("persistent_mode", ["never", "auto"], indirect=True)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("option", list(NOISE_OPTIONS))
@pytest.mark.parametrize("cell", NOISE_CELLS)
def test_noise_against_cpu_kernels(cell, option, dtype_name, training, persistent_mode):
    """With the same seed and stream the GPU draws the CPU's masks: same outputs and gradients
    (the CPU kernels are checked against the reference and finite differences in test_noise.py);
    in inference no dropout and zoneout's expectation."""
    from rnnfast import ops

    kw = NOISE_OPTIONS[option]
    if GATES[cell] == 1 and kw.get("recurrent_dropout_mode", "semeniuta") == "semeniuta":
        if kw.get("recurrent_dropout"):
            pytest.skip("the RNN has no candidate to drop")
    rng = np.random.default_rng([11, CELLS.index(cell)])
    T, N, C, H = 9, 5, 6, 33
    dt = np.dtype(dtype_name)
    inputs = make_inputs(cell, T, N, C, H, dt, rng, True, True, "mixed")
    up = make_upstream(cell, T, N, H, dt, rng)
    opts = dict(kw, seed=1234, noise_stream=3, training=training)
    expected = run_forward(ops, cell, **inputs, **opts)
    actual = run_forward(ops, cell, **_to_gpu(inputs, dtype_name), **opts)
    for name, a, e in zip(("y", "h_n", "c_n"), actual[:3], expected[:3], strict=True):
        _compare(a, None if e is None else e.astype(np.float64), dtype_name, "output", name)
    if not training:
        return
    want = run_backward(ops, cell, expected[3], **up)
    got = run_backward(ops, cell, actual[3], **_to_gpu(up, dtype_name))
    assert set(got) == set(want)
    for k, e in want.items():
        _compare(got[k], None if e is None else e.astype(np.float64), dtype_name, "grad", k)


def test_noise_refusals_on_gpu():
    from rnnfast import cuda, ops

    _cupy()  # skips without CuPy
    rng = np.random.default_rng(0)
    inputs = _to_gpu(make_inputs("gru_reset_before", 3, 2, 4, 5, np.float32, rng), "float32")
    with pytest.raises(NotImplementedError, match="gru_reset_before"):
        run_forward(ops, "gru_reset_before", **inputs, zoneout=0.1, seed=1)
    inputs = _to_gpu(make_inputs("lstm", 3, 2, 4, 5, np.float32, rng), "float32")
    before = cuda.get_options()
    cuda.set_options(persistent="always")
    try:
        with pytest.raises(RuntimeError, match="variational"):
            run_forward(ops, "lstm", **inputs, recurrent_dropout=0.2,
                        recurrent_dropout_mode="variational", seed=1)  # fmt: skip
    finally:
        cuda.set_options(**before)
