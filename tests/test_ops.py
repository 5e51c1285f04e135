"""The fused CPU kernels (rnnfast.ops) against the float64 NumPy reference, and their contract.

The grid covers every cell, both dtypes and awkward sizes (T in 1, 7, 33; N in 1, 3, 16; every
pair of C and H in 1, 5, 64, 65, 128), with random lengths that include 0 and T; the focused tests
below cover initial states, biases, lengths kinds, non-contiguous inputs, inference mode,
bitwise reproducibility and bad input.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    CELLS,
    GATES,
    GRAD_NAMES,
    assert_close,
    assert_grads_close,
    cast,
    make_inputs,
    make_upstream,
    noncontiguous,
    run_backward,
    run_forward,
    tol,
)

import rnnfast
from rnnfast import ops, reference

DTYPES = [np.float32, np.float64]
_TS, _NS, _SIZES = (1, 7, 33), (1, 3, 16), (1, 5, 64, 65, 128)
# every (C, H) pair once, with T and N cycling so every value of each appears with many others
SHAPES = [
    (_TS[i % 3], _NS[(i // 3) % 3], C, H)
    for i, (C, H) in enumerate(itertools.product(_SIZES, _SIZES))
]


@functools.cache
def _case(cell, T, N, C, H, with_state, with_bias, lengths_kind, seed=0):
    """float64 inputs and upstream gradients, with the reference's outputs and gradients."""
    rng = np.random.default_rng([seed, T, N, C, H, CELLS.index(cell)])
    inputs = make_inputs(cell, T, N, C, H, np.float64, rng, with_state, with_bias, lengths_kind)
    up = make_upstream(cell, T, N, H, np.float64, rng)
    y, h_n, c_n, ctx = run_forward(reference, cell, **inputs)
    grads = run_backward(reference, cell, ctx, **up)
    return inputs, up, (y, h_n, c_n), grads


def _check(cell, dtype, case, transform=lambda a: a):
    inputs, up, expected, expected_grads = case
    args = {k: transform(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
            for k, v in cast(inputs, dtype).items()}  # fmt: skip
    y, h_n, c_n, ctx = run_forward(ops, cell, **args)
    for name, a, e in zip(("y", "h_n", "c_n"), (y, h_n, c_n), expected, strict=True):
        if a is not None:
            assert a.dtype == dtype, f"{name} dtype {a.dtype} != {np.dtype(dtype)}"
        assert_close(a, e, **tol(dtype), name=name)
    grads = run_backward(ops, cell, ctx, **{k: transform(v) if v is not None else None
                                          for k, v in cast(up, dtype).items()})  # fmt: skip
    assert_grads_close(grads, expected_grads, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}N{}C{}H{}".format(*s))
@pytest.mark.parametrize("cell", CELLS)
def test_grid_against_reference(cell, shape, dtype):
    with_state = sum(shape) % 2 == 0  # half the grid with initial states, half without
    _check(cell, dtype, _case(cell, *shape, with_state, True, "mixed"))


@pytest.mark.parametrize("lengths_kind", [None, "full", "zero", "mixed"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("cell", CELLS)
def test_states_biases_lengths(cell, with_state, with_bias, lengths_kind):
    # 40 units over 16 rows: large enough for the threaded recurrent path, units split unevenly
    _check(cell, np.float64, _case(cell, 9, 16, 13, 40, with_state, with_bias, lengths_kind))


@pytest.mark.parametrize("cell", CELLS)
def test_threaded_recurrence_uneven_split(cell):
    # 16 * 4*150 * 150 multiply-adds per step: two threads, 150 units split 80 / 70
    _check(cell, np.float64, _case(cell, 5, 16, 7, 150, True, True, "mixed"))


@pytest.mark.parametrize("steps, batch", [(1, 3), (6, 16)], ids=["blas", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_short_and_long_calls_in_float32(cell, steps, batch):
    # a call that puts fewer than 16 rows through the products runs them on the weights as they
    # lie (packing would cost more); one that puts more packs them: both threaded, both exact
    _check(cell, np.float32, _case(cell, steps, batch, 9, 150, True, True, "mixed"))


@pytest.mark.parametrize("cell", CELLS)
def test_packed_product_in_row_blocks(cell):
    # 96 rows of x at C = 700 pass the packed projection in two blocks of tiles (a block's rows
    # of x stay in L2 while every panel passes over them)
    _check(cell, np.float32, _case(cell, 6, 16, 700, 40, True, True, "mixed"))


def _same_bits_on_one_and_two_threads(cell, case):
    """Training and inference forward, and the backward, on two threads then one: the same bits
    (and the training forward's y that of inference)."""
    inputs = cast(case[0], np.float32)
    runs = []
    before = rnnfast.get_num_threads()
    try:
        for threads in (2, 1):
            rnnfast.set_num_threads(threads)
            y, h_n, _, ctx = run_forward(ops, cell, **inputs)
            y_inference = run_forward(ops, cell, **inputs, training=False)[0]
            runs.append(
                (y, h_n, y_inference, run_backward(ops, cell, ctx, **cast(case[1], np.float32)))
            )
    finally:
        rnnfast.set_num_threads(before)
    (y2, h2, i2, g2), (y1, h1, i1, g1) = runs
    assert np.array_equal(y1, y2) and np.array_equal(h1, h2) and np.array_equal(i1, i2)
    assert np.array_equal(y2, i2), "training and inference steps differ"
    for name, g in g2.items():
        assert (g is None and g1[name] is None) or np.array_equal(g, g1[name]), name


@pytest.mark.parametrize("lengths_kind", [None, "mixed"])
@pytest.mark.parametrize("cell", CELLS)
def test_step_with_the_input_stacked(cell, lengths_kind):
    # at 24 rows and small weights the LSTM's and RNN's step takes x_t in its own product (w_ih
    # stacked under w_hh, build_info()["step_input_stacked"]; the GRUs keep the projection):
    # exact against the reference, training and inference alike, and the same bits on one thread
    # as on two (every team makes the same choice)
    case = _case(cell, 7, 24, 33, 70, True, True, lengths_kind)
    _check(cell, np.float32, case)
    _same_bits_on_one_and_two_threads(cell, case)


@pytest.mark.parametrize("lengths_kind", [None, "zero", "mixed"])
@pytest.mark.parametrize("cell", CELLS)
def test_rows_apart(cell, lengths_kind):
    # at 25 rows (13 and 12 a thread) and small weights two threads split the batch rather than
    # the units (build_info()["rows_apart"]): exact against the reference over 110 steps, which
    # the backward's bias and weight sums take in chunks (a barrier before each), and the same
    # bits on one thread as on two
    case = _case(cell, 110, 25, 20, 100, True, True, lengths_kind)
    _check(cell, np.float32, case)
    _same_bits_on_one_and_two_threads(cell, case)


@pytest.mark.parametrize("H", [18, 300], ids=["H18", "H300"])
@pytest.mark.parametrize("cell", CELLS)
def test_float32_weight_gradients_in_chunks(cell, H):
    # float32 sums dw_ih and dw_hh inside the backward loop, each thread its own units, a chunk of
    # steps at a time (at H = 300 the chunks hold up to half the L2 of dG: several per call; at
    # H = 18 the units split 16 / 2): exact against the reference, and the same bits on one thread
    case = _case(cell, 40, 9, 33, H, True, True, "mixed")
    _check(cell, np.float32, case)
    inputs, up, *_ = case
    inputs, up = cast(inputs, np.float32), cast(up, np.float32)

    def gradients():
        *_, ctx = run_forward(ops, cell, **inputs)
        return run_backward(ops, cell, ctx, **up)

    two = gradients()
    before = rnnfast.get_num_threads()
    try:
        rnnfast.set_num_threads(1)
        one = gradients()
    finally:
        rnnfast.set_num_threads(before)
    for name, g in two.items():
        assert (g is None and one[name] is None) or np.array_equal(g, one[name]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cell", CELLS)
def test_noncontiguous_inputs(cell, dtype):
    _check(cell, dtype, _case(cell, 7, 3, 5, 65, True, True, "mixed"), transform=noncontiguous)


@pytest.mark.parametrize("cell", CELLS)
def test_inference_matches_training_and_keeps_no_reserve(cell):
    inputs, *_ = _case(cell, 7, 3, 5, 64, True, True, "mixed")
    y, h_n, c_n, ctx = run_forward(ops, cell, **inputs, training=True)
    yi, hi, ci, ctx_i = run_forward(ops, cell, **inputs, training=False)
    assert ctx.training and not ctx_i.training and ctx_i.reserve is None
    np.testing.assert_array_equal(yi, y)
    np.testing.assert_array_equal(hi, h_n)
    if c_n is not None:
        np.testing.assert_array_equal(ci, c_n)
    assert yi.flags.writeable and not y.flags.writeable
    with pytest.raises(RuntimeError, match="training=True"):
        run_backward(ops, cell, ctx_i, dy=np.ones_like(y))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cell", CELLS)
def test_bitwise_reproducible(cell, dtype):
    inputs, up, *_ = _case(cell, 20, 16, 33, 129, True, True, "mixed")
    inputs, up = cast(inputs, dtype), cast(up, dtype)
    runs = []
    for _ in range(3):
        y, h_n, c_n, ctx = run_forward(ops, cell, **inputs)
        grads = run_backward(ops, cell, ctx, **up)
        runs.append([y.copy(), h_n, c_n] + [grads.get(k) for k in GRAD_NAMES])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_scratch_cache_reuse_is_bitwise_identical(cell):
    """Reused (dirty) cached scratch gives exactly what fresh memory gives; the cache obeys its
    limit and empty_cache."""
    inputs, up, *_ = _case(cell, 20, 16, 33, 1024, True, True, "mixed")
    inputs, up = cast(inputs, np.float32), cast(up, np.float32)
    limit = rnnfast._C.scratch_cache_limit()

    def step():  # copies: the kernels' own arrays go back to the cache on return
        y, h_n, c_n, ctx = run_forward(ops, cell, **inputs)
        grads = run_backward(ops, cell, ctx, **up)
        out = [y, h_n, c_n] + [grads.get(k) for k in GRAD_NAMES]
        return [None if a is None else np.array(a) for a in out]

    try:
        rnnfast.set_scratch_cache_limit(0)
        fresh = step()
        assert rnnfast.scratch_cache_bytes() == 0
        rnnfast.set_scratch_cache_limit(1 << 30)
        step()
        held = rnnfast.scratch_cache_bytes()
        assert held >= 20 * 16 * GATES[cell] * 1024 * 4  # at least the input projection
        reused = step()
        assert rnnfast.scratch_cache_bytes() == held  # the same blocks went round again
        rnnfast.empty_cache()
        assert rnnfast.scratch_cache_bytes() == 0
    finally:
        rnnfast.set_scratch_cache_limit(limit)
    for a, b in zip(fresh, reused, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
    with pytest.raises(ValueError, match="nbytes"):
        rnnfast.set_scratch_cache_limit(-1)


@pytest.mark.parametrize("cell", CELLS)
def test_returned_arrays_survive_later_calls(cell):
    """Outputs and gradients live in cached blocks: one still held must never be handed out
    again, and one dropped is reused only after NumPy frees it."""
    inputs, up, *_ = _case(cell, 20, 16, 33, 256, True, True, "mixed")
    inputs, up = cast(inputs, np.float32), cast(up, np.float32)
    y, h_n, c_n, ctx = run_forward(ops, cell, **inputs)
    grads = run_backward(ops, cell, ctx, **up)
    kept = [y, h_n, c_n, ctx.reserve] + [grads.get(k) for k in GRAD_NAMES]
    saved = [None if a is None else a.copy() for a in kept]
    other = {k: (None if v is None or k == "lengths" else v * 0.5) for k, v in inputs.items()}
    other["lengths"] = inputs["lengths"]
    for _ in range(3):
        y2, *_, ctx2 = run_forward(ops, cell, **other)
        run_backward(ops, cell, ctx2, **up)
        del y2, ctx2
    for a, b in zip(kept, saved, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_inputs_never_modified(cell):
    inputs, up, *_ = _case(cell, 7, 3, 5, 64, True, True, "mixed")
    before = {k: v.copy() for k, v in {**inputs, **up}.items() if v is not None}
    y, h_n, c_n, ctx = run_forward(ops, cell, **inputs)
    run_backward(ops, cell, ctx, **up)
    for k, v in {**inputs, **up}.items():
        if v is not None:
            np.testing.assert_array_equal(v, before[k], err_msg=k)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_twice_gives_the_same(cell):
    inputs, up, *_ = _case(cell, 7, 3, 5, 64, True, True, "mixed")
    *_, ctx = run_forward(ops, cell, **inputs)
    g1 = run_backward(ops, cell, ctx, **up)
    g2 = run_backward(ops, cell, ctx, **up)
    for k in g1:
        assert (g1[k] is None and g2[k] is None) or np.array_equal(g1[k], g2[k]), k


@pytest.mark.parametrize("cell", CELLS)
def test_nan_propagates(cell):
    inputs, up, *_ = _case(cell, 5, 3, 4, 8, True, True, None)
    x = inputs["x"].copy()
    x[2, 1, 0] = np.nan
    y, h_n, c_n, ctx = run_forward(ops, cell, **{**inputs, "x": x})
    assert np.isnan(y[2:, 1]).any() and not np.isnan(y[:, [0, 2]]).any()
    assert np.isnan(h_n[1]).any()
    grads = run_backward(ops, cell, ctx, **up)
    assert np.isnan(grads["dw_ih"]).any()
    if ops.bfloat16_supported():  # rounding to bfloat16 keeps NaN a NaN
        args = cast({**inputs, "x": x}, np.float32)
        y, h_n, _, _ = run_forward(ops, cell, **args, training=False, matmul_precision="bfloat16")
        assert np.isnan(y[2:, 1]).any() and not np.isnan(y[:, [0, 2]]).any()
        assert np.isnan(h_n[1]).any()


def test_zero_steps_returns_initial_state():
    rng = np.random.default_rng(0)
    inputs = make_inputs("lstm", 0, 3, 4, 5, np.float64, rng)
    y, h_n, c_n, ctx = ops.lstm_forward(**{k: v for k, v in inputs.items() if k != "lengths"})
    assert y.shape == (0, 3, 5)
    np.testing.assert_array_equal(h_n, inputs["h0"])
    np.testing.assert_array_equal(c_n, inputs["c0"])
    grads = ops.lstm_backward(ctx, np.zeros((0, 3, 5)), dh_n=np.ones((3, 5)))
    np.testing.assert_array_equal(grads["dh0"], np.ones((3, 5)))
    np.testing.assert_array_equal(grads["dw_hh"], 0)


# ---- bad input --------------------------------------------------------------------------------


@pytest.fixture
def lstm_args():
    rng = np.random.default_rng(0)
    a = make_inputs("lstm", 4, 3, 5, 6, np.float32, rng)
    a.pop("lengths")
    return a


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"x": np.zeros((4, 3), np.float32)}, ValueError, "3-D"),
        ({"x": np.zeros((4, 0, 5), np.float32)}, ValueError, "empty batch"),
        ({"x": np.zeros((4, 3, 5), np.int64)}, TypeError, "float32 or float64"),
        ({"x": np.zeros((4, 3, 7), np.float32)}, ValueError, r"w_ih must have shape \(24, 7\)"),
        ({"w_hh": np.zeros((24, 5), np.float32)}, ValueError, "w_hh must have shape"),
        ({"w_ih": np.zeros((24, 5), np.float64)}, TypeError, "mixing dtypes"),
        ({"b_ih": np.zeros(23, np.float32)}, ValueError, "b_ih must have shape"),
        ({"h0": np.zeros((3, 7), np.float32)}, ValueError, "h0 must have shape"),
        ({"c0": np.zeros((2, 6), np.float32)}, ValueError, "c0 must have shape"),
        ({"lengths": np.array([1, 2])}, ValueError, "lengths must have shape"),
        ({"lengths": np.array([1, -1, 2])}, ValueError, ">= 0"),
        ({"lengths": np.array([1, 5, 2])}, ValueError, "<= T = 4"),
        ({"lengths": np.array([1.0, 2.0, 3.0])}, TypeError, "integer"),
    ],
)
def test_bad_forward_input_raises(lstm_args, change, error, match):
    with pytest.raises(error, match=match):
        ops.lstm_forward(**{**lstm_args, **change})


def test_bad_backward_input_raises(lstm_args):
    *_, ctx = ops.lstm_forward(**lstm_args)
    with pytest.raises(ValueError, match="dy must have shape"):
        ops.lstm_backward(ctx, np.zeros((4, 3, 5), np.float32))
    with pytest.raises(TypeError, match="mixing dtypes"):
        ops.lstm_backward(ctx, np.zeros((4, 3, 6), np.float64))
    with pytest.raises(TypeError, match="context"):
        ops.lstm_backward(None, np.zeros((4, 3, 6), np.float32))
    with pytest.raises(TypeError, match="context"):
        ops.gru_backward(ctx, np.zeros((4, 3, 6), np.float32))


def test_gate_count_mismatch_names_the_cell():
    rng = np.random.default_rng(0)
    a = make_inputs("gru", 4, 3, 5, 6, np.float64, rng)  # 3 gates, given to an LSTM
    with pytest.raises(ValueError, match=r"w_hh must have shape \(4\*H, H\) for lstm"):
        ops.lstm_forward(a["x"], a["w_ih"], a["w_hh"])


def test_bad_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity"):
        ops.rnn_forward(np.zeros((1, 1, 1)), np.zeros((1, 1)), np.zeros((1, 1)),
                        nonlinearity="sigmoid")  # fmt: skip


def test_private_module_rejects_wrong_layout_instead_of_crashing():
    # the bindings re-check what the Python layer already checks; a direct call cannot crash
    from rnnfast import _C

    x = np.zeros((2, 3, 4), np.float32)
    w_ih, w_hh = np.zeros((8, 4), np.float32), np.zeros((8, 2), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.lstm_forward(x, w_ih[:, ::-1], w_hh, None, None, None, None, None, True)
    with pytest.raises(TypeError, match="dtype"):
        _C.lstm_forward(x, w_ih.astype(np.float64), w_hh, None, None, None, None, None, True)
    with pytest.raises(ValueError, match="outside"):
        _C.lstm_forward(x, w_ih, w_hh, None, None, None, None, np.array([9, 0, 0], np.int32), True)
    with pytest.raises(ValueError, match="reserve must have shape"):
        _C.lstm_backward(x, w_ih, w_hh, False, False, None, np.zeros(3, np.float32),
                         None, None, None)  # fmt: skip


@pytest.mark.parametrize(
    "isa, kernel",
    [("avx2", "avx2 packed (float32), BLAS (float64)"), ("baseline", "BLAS")],
    ids=["avx2", "baseline"],
)
def test_paths_without_avx512_match(tmp_path, isa, kernel):
    # machines without AVX-512 run the recurrent products through the AVX2 tile and the AVX2
    # build of the pointwise passes (or, without AVX2 and FMA, and off x86, the BLAS and the
    # baseline build), and refuse bfloat16 with a clear error; RNNFAST_ISA forces those paths
    if isa != "baseline" and rnnfast.build_info()["arch"] != "x86_64":
        pytest.skip(f"no {isa} off x86-64 (this is {rnnfast.build_info()['arch']})")
    script = tmp_path / "fallback.py"
    script.write_text(
        "import numpy as np, rnnfast\n"
        f"assert rnnfast.build_info()['recurrent_kernel'] == {kernel!r}, rnnfast.build_info()\n"
        f"assert rnnfast.build_info()['isa'] == {isa!r}, rnnfast.build_info()\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((6, 5, 7)).astype(np.float32)\n"
        "w_ih = rng.standard_normal((4 * 70, 7)).astype(np.float32) * 0.1\n"
        "w_hh = rng.standard_normal((4 * 70, 70)).astype(np.float32) * 0.1\n"
        "y, h, c, ctx = rnnfast.lstm_forward(x, w_ih, w_hh, lengths=np.array([6, 0, 3, 6, 1]))\n"
        "g = rnnfast.lstm_backward(ctx, np.ones_like(y))\n"
        # 13 rows: on AVX2 (6-row tiles) the step's product takes x_t too, w_ih stacked, and
        # two threads take 7 and 6 rows each (rows apart)
        "x13 = rng.standard_normal((6, 13, 7)).astype(np.float32)\n"
        "y13 = rnnfast.lstm_forward(x13, w_ih, w_hh, training=False)[0]\n"
        "ctx13 = rnnfast.lstm_forward(x13, w_ih, w_hh)[3]\n"
        "g13 = rnnfast.lstm_backward(ctx13, np.ones_like(y13))\n"
        "np.savez(r'%s', y=y, dx=g['dx'], dw_hh=g['dw_hh'], x13=x13, y13=y13, dx13=g13['dx'],\n"
        "         dw_hh13=g13['dw_hh'], dw_ih13=g13['dw_ih'])\n" % (tmp_path / "out.npz")
    )
    # bfloat16 needs AVX-512
    script.write_text(
        script.read_text() + "assert not rnnfast.bfloat16_supported()\n"
        "try:\n"
        "    rnnfast.lstm_forward(x, w_ih, w_hh, training=False, matmul_precision='bfloat16')\n"
        "except RuntimeError as e:\n"
        "    assert 'AVX512_BF16' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('bfloat16 ran without AVX-512')\n"
    )
    import os
    import subprocess
    import sys

    env = {**os.environ, "RNNFAST_ISA": isa}
    out = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = np.load(tmp_path / "out.npz")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 7))
    w_ih = rng.standard_normal((4 * 70, 7)).astype(np.float32).astype(np.float64) * 0.1
    w_hh = rng.standard_normal((4 * 70, 70)).astype(np.float32).astype(np.float64) * 0.1
    x = x.astype(np.float32).astype(np.float64)
    y, _, _, ctx = reference.lstm_forward(x, w_ih, w_hh, lengths=np.array([6, 0, 3, 6, 1]))
    g = reference.lstm_backward(ctx, np.ones_like(y))
    assert_close(got["y"], y, **tol(np.float32), name="y")
    assert_close(got["dx"], g["dx"], **tol(np.float32, "grad"), name="dx")
    assert_close(got["dw_hh"], g["dw_hh"], **tol(np.float32, "grad"), name="dw_hh")
    y13, _, _, ctx13 = reference.lstm_forward(got["x13"].astype(np.float64), w_ih, w_hh)
    assert_close(got["y13"], y13, **tol(np.float32), name="y, 13 rows")
    g13 = reference.lstm_backward(ctx13, np.ones_like(y13))
    for name in ("dx", "dw_hh", "dw_ih"):
        assert_close(got[name + "13"], g13[name], **tol(np.float32, "grad"),
                     name=f"{name}, 13 rows")  # fmt: skip


# ---- the opt-in bfloat16 products -------------------------------------------------------------

needs_bf16 = pytest.mark.skipif(not ops.bfloat16_supported(), reason="CPU lacks AVX512_BF16")


@needs_bf16
@pytest.mark.parametrize(
    "shape", [(4, 3, 7, 129), (3, 5, 64, 33), (2, 16, 128, 64), (5, 37, 300, 70)]
)
@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_matches_the_rounded_reference(cell, shape):
    # the reference rounds the same operands to bfloat16 and computes in float64: the kernel's
    # only other error is its float32 sums (a flip of one rounding of h can add ~1e-4 later on)
    T, N, C, H = shape
    rng = np.random.default_rng([T, N, C, H, CELLS.index(cell)])
    inputs = cast(make_inputs(cell, T, N, C, H, np.float64, rng, True, True, "mixed"), np.float32)
    wide = cast(inputs, np.float64)
    y, h_n, c_n, _ = run_forward(ops, cell, **inputs, training=False, matmul_precision="bfloat16")
    y_bf, h_bf, c_bf, _ = run_forward(reference, cell, **wide, training=False,
                                      matmul_precision="bfloat16")  # fmt: skip
    assert_close(y[0], y_bf[0], rtol=1e-5, atol=1e-6, name="y[0]")
    for name, a, e in zip(("y", "h_n", "c_n"), (y, h_n, c_n), (y_bf, h_bf, c_bf), strict=True):
        assert_close(a, e, rtol=1e-4, atol=1e-4 * T, name=name)
    # and it is not float32 in disguise: it is further from the exact result than float32 is
    y_exact = run_forward(reference, cell, **wide, training=False)[0]
    y32 = run_forward(ops, cell, **inputs, training=False)[0]
    assert np.abs(y - y_exact).max() > 10 * np.abs(y32 - y_exact).max()
    assert_close(y, y_exact, rtol=0, atol=3e-2, name="y vs float64")


@needs_bf16
@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_bitwise_reproducible(cell):
    rng = np.random.default_rng(7)
    inputs = cast(make_inputs(cell, 9, 5, 48, 80, np.float64, rng), np.float32)
    runs = [run_forward(ops, cell, **inputs, training=False, matmul_precision="bfloat16")[:3]
            for _ in range(3)]  # fmt: skip
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return []


@needs_bf16
def test_bfloat16_runs_on_amx_where_the_cpu_has_it(tmp_path):
    # Linux lists amx_bf16 and amx_tile where the CPU has them and the kernel enabled them: the
    # products must then run on the tiles (unless RNNFAST_ISA caps them); RNNFAST_ISA=avx512
    # runs the AVX512_BF16 kernel, which must agree with the tiles' results to float32 sums
    info = rnnfast.build_info()
    flags = _cpu_flags()
    if "RNNFAST_ISA" not in os.environ and sys.platform == "linux":
        assert info["cpu_amx_bf16"] == ("amx_bf16" in flags and "amx_tile" in flags), info
    if not info["cpu_amx_bf16"]:
        pytest.skip("this CPU (or this setting of RNNFAST_ISA) runs bfloat16 without AMX")
    assert "AMX" in info["recurrent_kernel"]
    rng = np.random.default_rng(11)
    inputs = cast(make_inputs("lstm", 6, 40, 96, 100, np.float64, rng, True, True), np.float32)
    np.savez(tmp_path / "in.npz", **{k: v for k, v in inputs.items() if v is not None})
    script = tmp_path / "avx512.py"
    script.write_text(
        "import numpy as np, rnnfast\n"
        "assert not rnnfast.build_info()['cpu_amx_bf16']\n"
        f"a = dict(np.load(r'{tmp_path / 'in.npz'}'))\n"
        "y, h, c, _ = rnnfast.lstm_forward(**a, training=False, matmul_precision='bfloat16')\n"
        f"np.savez(r'{tmp_path / 'out.npz'}', y=y)\n"
    )
    env = {**os.environ, "RNNFAST_ISA": "avx512"}
    out = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    y_avx512 = np.load(tmp_path / "out.npz")["y"]
    y_amx = run_forward(ops, "lstm", **inputs, training=False, matmul_precision="bfloat16")[0]
    y_bf = run_forward(reference, "lstm", **cast(inputs, np.float64), training=False,
                       matmul_precision="bfloat16")[0]  # fmt: skip
    for name, y in (("AMX", y_amx), ("AVX512_BF16", y_avx512)):
        assert_close(y, y_bf, rtol=1e-4, atol=6e-4, name=name)
    assert_close(y_amx, y_avx512, rtol=1e-4, atol=6e-4, name="AMX vs AVX512_BF16")


@needs_bf16
@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_training_gradients(cell):
    # the training step's products in bfloat16 (forward, the step's dh, dx and the weight
    # gradients): every gradient within bfloat16's error of the exact float64 one, not float32 in
    # disguise, and the same bits for any thread count
    T, N, C, H = 5, 37, 70, 100
    rng = np.random.default_rng([CELLS.index(cell), 5])
    inputs = make_inputs(cell, T, N, C, H, np.float64, rng, True, True, "mixed")
    narrow = cast(inputs, np.float32)
    dy = rng.standard_normal((T, N, H))
    y_e, _, _, ctx_e = run_forward(reference, cell, **inputs)
    exact = reference.backward(ctx_e, dy)

    def step(precision):
        y, _, _, ctx = run_forward(ops, cell, **narrow, matmul_precision=precision)
        return y, ops.backward(ctx, dy.astype(np.float32))

    y16, g16 = step("bfloat16")
    _, g32 = step("float32")
    # 1e-3 to 3e-3 here, but the ReLU recurrence, which nothing saturates, grows its roundings
    # along the sequence (5e-2 at these weights)
    tolerance = 1e-1 if cell == "rnn_relu" else 1e-2
    assert_close(y16, y_e, rtol=0, atol=3e-2, name="y")
    for name, e in exact.items():
        if e is None:
            continue
        scale = np.linalg.norm(e)
        err16, err32 = np.linalg.norm(g16[name] - e), np.linalg.norm(g32[name] - e)
        assert err16 <= tolerance * scale, f"{name}: relative error {err16 / scale:.2e}"
        if name.startswith(("dx", "dw_")):  # every product's operands were rounded
            assert err16 > 10 * err32, f"{name} is no further from exact than float32's"
    before = rnnfast.get_num_threads()
    try:
        rnnfast.set_num_threads(1)
        y1, g1 = step("bfloat16")
    finally:
        rnnfast.set_num_threads(before)
    assert np.array_equal(y1, y16)
    for name, g in g16.items():
        assert (g is None and g1[name] is None) or np.array_equal(g, g1[name]), name


@pytest.mark.parametrize(
    "dtype, options, error, match",
    [
        (np.float32, {"matmul_precision": "fp16"}, ValueError, "matmul_precision must be one of"),
        (np.float64, {"matmul_precision": "bfloat16", "training": False}, TypeError,
         "takes float32 inputs"),
    ],
)  # fmt: skip
def test_bfloat16_bad_usage_raises(lstm_args, dtype, options, error, match):
    with pytest.raises(error, match=match):
        ops.lstm_forward(**cast(lstm_args, dtype), **options)


def test_bfloat16_on_gpu_arrays_says_cpu_only(lstm_args):
    class FakeGpuArray:  # routes to the CUDA path, which has no bfloat16 products
        __cuda_array_interface__ = {}

    with pytest.raises(NotImplementedError, match="CPU kernels only"):
        ops.lstm_forward(FakeGpuArray(), lstm_args["w_ih"], lstm_args["w_hh"], training=False,
                         matmul_precision="bfloat16")  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([False, True], repeat=2)))
def test_gemm_against_numpy(dtype, trans_a, trans_b):
    rng = np.random.default_rng(3)
    M, N, K = 70, 300, 45
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
    expected = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    got = ops.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * 10)
    out = np.ones((M, N), dtype)
    assert ops.gemm(a, b, trans_a=trans_a, trans_b=trans_b, out=out, accumulate=True) is out
    np.testing.assert_allclose(out, expected + 1, rtol=rtol, atol=rtol * 10)
    before = rnnfast.get_num_threads()
    try:
        rnnfast.set_num_threads(1)
        one = ops.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    finally:
        rnnfast.set_num_threads(before)
    np.testing.assert_array_equal(one, got)


def test_products_and_layer_outputs_come_from_the_scratch_cache():
    """ops.gemm's output and a layer's y go back to the scratch cache when freed and come out of
    it the next time (fresh pages each step were faulted in and zeroed by the OS), writable and
    apart from the reserve that backward reads."""
    rng = np.random.default_rng(8)
    a = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((200, 256)).astype(np.float32)
    limit = rnnfast._C.scratch_cache_limit()
    try:
        rnnfast.empty_cache()
        out = ops.gemm(a, b)
        with_out = rnnfast.scratch_cache_bytes()  # the product's own workspace, returned
        del out
        assert rnnfast.scratch_cache_bytes() >= with_out + 300 * 256 * 4
        out = ops.gemm(a, b)  # the same blocks again
        assert rnnfast.scratch_cache_bytes() == with_out
        np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-4)
        layer = rnnfast.LSTM(8, 64, seed=0)
        x = rng.standard_normal((40, 30, 8)).astype(np.float32)
        y, _ = layer(x)
        assert y.flags.writeable and y.flags.c_contiguous
        before = y.copy()
        y[...] = np.nan  # the user's copy: backward still reads the reserve
        dx, _ = layer.backward(np.ones_like(y))
        assert np.isfinite(dx).all()
        y2, _ = layer(x)
        np.testing.assert_array_equal(y2, before)
        with pytest.raises(ValueError, match="negative"):
            rnnfast._C.empty((2, -1), np.dtype(np.float32))
    finally:
        rnnfast.set_scratch_cache_limit(limit)


def test_gemm_errors():
    a = np.ones((3, 4))
    with pytest.raises(ValueError, match="op\\(a\\) is 3 x 4 but op\\(b\\) is 3 x 2"):
        ops.gemm(a, np.ones((3, 2)))
    with pytest.raises(TypeError, match="one dtype"):
        ops.gemm(a, np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.gemm(a.astype(int), np.ones((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        ops.gemm(np.ones(4), np.ones((4, 2)))
    with pytest.raises(ValueError, match="needs out"):
        ops.gemm(a, np.ones((4, 2)), accumulate=True)
    with pytest.raises(ValueError, match="shape \\(3, 2\\)"):
        ops.gemm(a, np.ones((4, 2)), out=np.ones((2, 3)))
    with pytest.raises(ValueError, match="overlaps"):
        buf = np.ones((4, 4))
        ops.gemm(buf, buf.copy(), out=buf)
    assert ops.gemm(np.ones((0, 4)), np.ones((4, 2))).shape == (0, 2)
    np.testing.assert_array_equal(ops.gemm(np.ones((3, 0)), np.ones((0, 2))), np.zeros((3, 2)))
