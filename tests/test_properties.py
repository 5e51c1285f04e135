"""Property and fuzz tests (hypothesis): the kernels against the reference over drawn shapes,
lengths, states and thread counts, and the public API over drawn garbage, which must either work
or raise TypeError or ValueError naming the problem, never anything else and never crash.

These found nothing in the reliability audit; they stay so that they keep finding nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    CELLS,
    GATES,
    HAS_C,
    assert_close,
    assert_grads_close,
    make_upstream,
    run_backward,
    run_forward,
    tol,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rnnfast  # noqa: E402
from rnnfast import clip, ops, optim, reference, sequences  # noqa: E402

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@st.composite
def problems(draw):
    cell = draw(st.sampled_from(CELLS))
    T, N = draw(st.integers(0, 6)), draw(st.integers(1, 5))
    C, H = draw(st.integers(1, 9)), draw(st.sampled_from([1, 3, 16, 17, 40]))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    k = 1 / np.sqrt(H)
    inputs = {
        "x": rng.standard_normal((T, N, C)).astype(dtype),
        "w_ih": rng.uniform(-k, k, (G * H, C)).astype(dtype),
        "w_hh": rng.uniform(-k, k, (G * H, H)).astype(dtype),
        "b_ih": rng.uniform(-k, k, G * H).astype(dtype) if draw(st.booleans()) else None,
        "b_hh": rng.uniform(-k, k, G * H).astype(dtype) if draw(st.booleans()) else None,
        "h0": rng.standard_normal((N, H)).astype(dtype) if draw(st.booleans()) else None,
        "c0": None,
        "lengths": rng.integers(0, T + 1, N) if draw(st.booleans()) else None,
    }
    if HAS_C[cell] and draw(st.booleans()):
        inputs["c0"] = rng.standard_normal((N, H)).astype(dtype)
    threads = draw(st.sampled_from([1, 2, 3]))
    return cell, inputs, rng, threads


@pytest.mark.openmp
@PROPERTY
@given(problems())
def test_kernels_match_the_reference(problem):
    cell, inputs, rng, threads = problem
    x = inputs["x"]
    T, N, _ = x.shape
    H = inputs["w_hh"].shape[1]
    dtype = x.dtype
    before = rnnfast.get_num_threads()
    rnnfast.set_num_threads(threads)
    try:
        y, h_n, c_n, ctx = run_forward(ops, cell, **inputs)
        up = make_upstream(cell, T, N, H, dtype, rng)
        grads = run_backward(ops, cell, ctx, **up)
    finally:
        rnnfast.set_num_threads(before)
    f64 = {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
           for k, v in inputs.items()}  # fmt: skip
    ry, rh_n, rc_n, rctx = run_forward(reference, cell, **f64)
    assert_close(y, ry, **tol(dtype), name="y")
    assert_close(h_n, rh_n, **tol(dtype), name="h_n")
    assert_close(c_n, rc_n, **tol(dtype), name="c_n")
    up64 = {k: None if v is None else v.astype(np.float64) for k, v in up.items()}
    assert_grads_close(grads, run_backward(reference, cell, rctx, **up64), dtype)


# ---- fuzz ------------------------------------------------------------------------------------

DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.bool_, np.complex64, object]


@st.composite
def junk(draw):
    """An argument a confused caller might pass: arrays of any small shape and dtype, scalars,
    strings, lists, None."""
    kind = draw(st.sampled_from(["array", "array", "array", "scalar", "str", "list", "none"]))
    if kind == "array":
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
        dtype = draw(st.sampled_from(DTYPES))
        a = np.zeros(shape, dtype=dtype)
        if a.dtype.kind == "f" and a.size and draw(st.booleans()):
            a.flat[0] = draw(st.sampled_from([np.nan, np.inf, -1e4]))
        if a.ndim >= 2 and draw(st.booleans()):
            a = a.T  # not contiguous
        return a
    if kind == "scalar":
        return draw(st.sampled_from([0, -1, 1.5, np.nan, True]))
    if kind == "str":
        return "lstm"
    if kind == "list":
        return [[1.0, 2.0], [3.0]]
    return None


@st.composite
def near_valid(draw):
    """A forward call that is valid but for one or two arguments replaced by junk."""
    cell = draw(st.sampled_from(CELLS))
    G, T, N, C, H = GATES[cell], 3, 2, 4, 5
    args = {
        "x": np.ones((T, N, C), np.float32),
        "w_ih": np.ones((G * H, C), np.float32),
        "w_hh": np.ones((G * H, H), np.float32),
        "b_ih": None,
        "b_hh": None,
        "h0": None,
        "c0": None,
        "lengths": None,
    }
    names = [k for k in args if k != "c0" or HAS_C[cell]]
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True)):
        args[name] = draw(junk())
    return cell, args


@FUZZ
@given(near_valid())
def test_forward_and_backward_take_anything(call):
    cell, args = call
    try:
        y, h_n, c_n, ctx = run_forward(ops, cell, **args)
    except (TypeError, ValueError):
        return
    assert y.shape[:2] == np.shape(args["x"])[:2]
    try:
        run_backward(ops, cell, ctx, np.ones_like(y))
    except (TypeError, ValueError):
        pass


@FUZZ
@given(st.sampled_from(CELLS), junk(), junk(), junk())
def test_backward_takes_anything(cell, ctx, dy, dh_n):
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        run_backward(ops, cell, ctx, dy, dh_n)
    x = np.ones((2, 1, 3), np.float32)
    G = GATES[cell]
    w_ih, w_hh = np.ones((G * 4, 3), np.float32), np.ones((G * 4, 4), np.float32)
    good = run_forward(ops, cell, x, w_ih, w_hh)
    try:
        run_backward(ops, cell, good[3], dy, dh_n)
    except (TypeError, ValueError):
        pass


@FUZZ
@given(st.lists(junk(), min_size=0, max_size=4), junk(), st.booleans())
def test_pad_sequences_takes_anything(seqs, padding_value, batch_first):
    try:
        padded, lengths = sequences.pad_sequences(seqs, batch_first, padding_value)
    except (TypeError, ValueError):
        return
    assert lengths.shape == (len(seqs),)


@FUZZ
@given(st.dictionaries(st.sampled_from(["w", "b", "z"]), junk(), max_size=3), junk())
def test_clip_and_optimizer_take_anything(grads, max_norm):
    params = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    opt = optim.Adam(params)
    before = {k: v.copy() for k, v in params.items()}
    try:
        opt.step(grads)
    except (TypeError, ValueError, KeyError):
        for k in params:  # a refused step changes nothing
            np.testing.assert_array_equal(params[k], before[k])
    try:
        clip.clip_grad_norm_(grads, max_norm)
    except (TypeError, ValueError):
        pass
