"""The kernels stay right under the conditions a reliability audit found them wrong or fragile:
a smaller OpenMP team than asked for, a call from inside a user's parallel region, fork, thread
counts the system cannot start, NaN in the padding, misaligned arrays.

Each condition that needs a fresh process (an OpenMP environment variable, a resource limit, a
fork) runs in a subprocess with a timeout, so that a hang or an exit fails the test instead of
the suite.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import (
    CELLS,
    assert_close,
    assert_grads_close,
    make_inputs,
    make_upstream,
    run_backward,
    run_forward,
    tol,
)

import rnnfast
from rnnfast import ops, reference

TESTS = os.path.dirname(os.path.abspath(__file__))
# large enough that every driver and GEMM asks for a team of more than one thread
T, N, C, H = 9, 8, 16, 128


def _child_env(extra: dict | None = None) -> dict:
    """The environment for a child interpreter that imports the rnnfast this one imported."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(rnnfast.__file__)))
    path = os.pathsep.join([package_root, TESTS, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def _python(code: str, env: dict | None = None, timeout: float = 120, preexec_fn=None):
    """Runs code in a fresh interpreter; returns the completed process (output captured)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, cwd=TESTS, preexec_fn=preexec_fn,
        env=_child_env(env),
    )  # fmt: skip


def _check_against_reference(cell: str, dtype=np.float64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    inputs = make_inputs(cell, T, N, C, H, dtype, rng, lengths_kind="mixed")
    up = make_upstream(cell, T, N, H, dtype, rng)
    y, h_n, c_n, ctx = run_forward(ops, cell, **inputs)
    ry, rh_n, rc_n, rctx = run_forward(reference, cell, **inputs)
    assert_close(y, ry, **tol(dtype), name="y")
    assert_close(h_n, rh_n, **tol(dtype), name="h_n")
    assert_close(c_n, rc_n, **tol(dtype), name="c_n")
    grads = run_backward(ops, cell, ctx, **up)
    assert_grads_close(grads, run_backward(reference, cell, rctx, **up), dtype)


# ---- a smaller team than asked for ------------------------------------------------------------

SHORT_TEAMS = ["OMP_THREAD_LIMIT=1", "OMP_DYNAMIC=true", "OMP_MAX_ACTIVE_LEVELS=0"]


@pytest.mark.openmp
@pytest.mark.parametrize("setting", SHORT_TEAMS)
def test_short_team_matches_reference(setting):
    """Every cell, forward and backward, where OpenMP gives fewer threads than the kernels ask."""
    name, value = setting.split("=")
    code = """
        import numpy as np, rnnfast, test_reliability as t
        rnnfast.set_num_threads(4)
        for cell in t.CELLS:
            for dtype in (np.float64, np.float32):
                t._check_against_reference(cell, dtype)
        print("ok")
    """
    r = _python(code, {name: value})
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("setting", SHORT_TEAMS[:2])
def test_kernel_suite_under_short_team(setting):
    """The kernels' whole test module, rerun under OMP_THREAD_LIMIT=1 and OMP_DYNAMIC=true."""
    name, value = setting.split("=")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         os.path.join(TESTS, "test_ops.py")],
        capture_output=True, text=True, timeout=600, cwd=TESTS, env=_child_env({name: value}),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _libgomp():
    try:
        return ctypes.CDLL("libgomp.so.1")
    except OSError:
        pytest.skip("libgomp is not loadable here (rnnfast built without GNU OpenMP)")


@pytest.mark.openmp
def test_call_from_inside_a_user_parallel_region():
    """A user's OpenMP team (GOMP_parallel through ctypes) whose every thread calls the kernels:
    the kernels get one-thread teams there and must still compute every unit."""
    if not rnnfast.build_info()["openmp"]:
        pytest.skip("rnnfast built without OpenMP")
    gomp = _libgomp()
    rnnfast.set_num_threads(2)
    rng = np.random.default_rng(1)
    inputs = {c: make_inputs(c, T, N, C, H, np.float64, rng, lengths_kind="mixed") for c in CELLS}
    results, errors = {}, []

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def body(_):
        me = gomp.omp_get_thread_num()
        try:
            for cell in CELLS:
                results[(me, cell)] = run_forward(ops, cell, **inputs[cell], training=False)[0]
        except BaseException as e:  # an exception must not cross the C frames
            errors.append(e)

    gomp.omp_get_thread_num.restype = ctypes.c_int
    gomp.GOMP_parallel(body, None, ctypes.c_uint(2), ctypes.c_uint(0))
    assert not errors, errors
    assert {me for me, _ in results} == {0, 1}, "the user's region did not run two threads"
    for (_, cell), y in results.items():
        expected = run_forward(reference, cell, **inputs[cell], training=False)[0]
        assert_close(y, expected, **tol(np.float64), name=f"{cell} y")


# ---- fork ------------------------------------------------------------------------------------


@pytest.mark.openmp
def _child_forward(queue):
    try:
        rng = np.random.default_rng(2)
        inputs = make_inputs("lstm", T, N, C, H, np.float64, rng)
        y = run_forward(ops, "lstm", **inputs, training=False)[0]
        ry = run_forward(reference, "lstm", **inputs, training=False)[0]
        try:
            rnnfast.set_num_threads(2)
            refused = None
        except RuntimeError as e:
            refused = str(e)
        queue.put((float(np.abs(y - ry).max()), rnnfast.get_num_threads(), refused))
    except BaseException as e:
        queue.put(repr(e))


@pytest.mark.openmp
def test_fork_after_a_multithreaded_call():
    """A fork-started worker (multiprocessing's default on Linux before 3.14) runs the kernels on
    one thread instead of hanging in libgomp, and refuses a larger team with a clear error."""
    rnnfast.set_num_threads(2)
    _check_against_reference("lstm")  # the parent's thread pool now exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_forward, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the kernels")
    result = queue.get(timeout=5)
    assert isinstance(result, tuple), result
    err, threads, refused = result
    assert err < 1e-12 and threads == 1
    assert refused is not None and "fork" in refused
    assert rnnfast.get_num_threads() == 2  # the parent is unchanged


# ---- thread counts ---------------------------------------------------------------------------


@pytest.mark.openmp
def test_set_num_threads_that_cannot_start_raises():
    """libgomp ends the process when it cannot start a team; set_num_threads finds out first.
    The address space is capped at 3 GiB, so 1000 threads' default stacks cannot be mapped."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    # then a backward whose weight-gradient products (G*H = 4096 rows) ask for every thread
    code = """
        import numpy as np, rnnfast
        try:
            rnnfast.set_num_threads(1000)
        except RuntimeError as e:
            print("refused:", e)
        x = np.ones((1, 1, 1), np.float32)
        w_ih, w_hh = np.ones((4096, 1), np.float32), np.zeros((4096, 1024), np.float32)
        y, h_n, c_n, ctx = rnnfast.lstm_forward(x, w_ih, w_hh)
        rnnfast.lstm_backward(ctx, np.ones_like(y))
        print("ok", rnnfast.get_num_threads())
    """
    r = _python(code, preexec_fn=cap)
    if "refused" not in r.stdout and r.returncode == 0:
        pytest.skip("this machine started 1000 threads in 3 GiB (small default stacks)")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "could not start 1000 threads" in r.stdout
    assert "ok" in r.stdout


@pytest.mark.parametrize("bad", [0, -1, 1.7, "2", None, True])
def test_set_num_threads_rejects(bad):
    before = rnnfast.get_num_threads()
    with pytest.raises((TypeError, ValueError)):
        rnnfast.set_num_threads(bad)
    assert rnnfast.get_num_threads() == before


# ---- padding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("api", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_nonfinite_padding_never_reaches_the_results(api, cell, poison):
    """Padding is never read: NaN or inf there leaves outputs and every gradient as they are with
    zero padding (bit for bit in the kernels, whose product then multiplies the same zeros)."""
    rng = np.random.default_rng(3)
    inputs = make_inputs(cell, T, N, C, H, np.float32, rng, lengths_kind="mixed")
    up = make_upstream(cell, T, N, H, np.float32, rng)
    padded = np.arange(T)[:, None] >= inputs["lengths"][None, :]
    assert padded.any()
    clean = dict(inputs, x=np.where(padded[:, :, None], 0, inputs["x"]).astype(np.float32))
    dirty = dict(inputs, x=np.where(padded[:, :, None], poison, inputs["x"]).astype(np.float32))
    out_clean = run_forward(api, cell, **clean)
    out_dirty = run_forward(api, cell, **dirty)
    for a, b, name in zip(out_dirty[:3], out_clean[:3], ["y", "h_n", "c_n"], strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=name)
    g_dirty = run_backward(api, cell, out_dirty[3], **up)
    g_clean = run_backward(api, cell, out_clean[3], **up)
    for k, v in g_clean.items():
        if v is not None:
            assert np.isfinite(g_dirty[k]).all(), f"{k} has non-finite values"
            np.testing.assert_array_equal(g_dirty[k], v, err_msg=k)


# ---- alignment -------------------------------------------------------------------------------


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a that starts one byte past an aligned address."""
    buf = np.empty(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert out.flags.c_contiguous and not out.flags.aligned
    return out


@pytest.mark.parametrize("cell", CELLS)
def test_misaligned_inputs(cell):
    """ops takes misaligned arrays (an aligned copy goes to the kernels); the extension itself
    refuses them with an error that names the array."""
    rng = np.random.default_rng(4)
    inputs = make_inputs(cell, T, N, C, H, np.float32, rng, lengths_kind="mixed")
    odd = {k: _misaligned(v) if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
    up = make_upstream(cell, T, N, H, np.float32, rng)
    odd_up = {k: None if v is None else _misaligned(v) for k, v in up.items()}
    y, h_n, c_n, ctx = run_forward(ops, cell, **odd)
    ey, eh_n, ec_n, ectx = run_forward(ops, cell, **inputs)
    np.testing.assert_array_equal(y, ey)
    np.testing.assert_array_equal(h_n, eh_n)
    g, eg = run_backward(ops, cell, ctx, **odd_up), run_backward(ops, cell, ectx, **up)
    for k, v in eg.items():
        if v is not None:
            np.testing.assert_array_equal(g[k], v, err_msg=k)

    forward = getattr(rnnfast._C, f"{cell}_forward")
    x = _misaligned(inputs["x"])
    with pytest.raises(ValueError, match="x is not aligned"):
        forward(x, inputs["w_ih"], inputs["w_hh"], None, None, None, None, None, False)


def test_exp_of_nan_stays_nan():
    """The float32 polynomials' NaN path (it once converted NaN to an integer: undefined)."""
    x = np.full((3, 2, 4), np.nan, np.float32)
    w_ih = np.zeros((4 * 16, 4), np.float32)
    w_hh = np.zeros((4 * 16, 16), np.float32)
    y = ops.lstm_forward(x, w_ih, w_hh, b_ih=np.full(64, np.nan, np.float32), training=False)[0]
    assert np.isnan(y).all()


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "0x10"])
def test_scratch_cache_setting_that_cannot_be_used_is_an_error(value):
    """It meant an unbounded (-1) or disabled (abc) cache, silently."""
    r = _python("import rnnfast", {"RNNFAST_SCRATCH_CACHE_MB": value})
    assert r.returncode != 0 and "RNNFAST_SCRATCH_CACHE_MB must be a whole number" in r.stderr


def test_scratch_cache_setting_is_read():
    code = "import rnnfast; print(rnnfast._C.scratch_cache_limit())"
    r = _python(code, {"RNNFAST_SCRATCH_CACHE_MB": "7"})
    assert r.returncode == 0 and int(r.stdout) == 7 << 20, r.stderr


@pytest.mark.parametrize("bad", [-1, 1.5, "10", None])
def test_set_scratch_cache_limit_rejects(bad):
    with pytest.raises((TypeError, ValueError)):
        rnnfast.set_scratch_cache_limit(bad)


def test_a_serial_build_says_it_cannot_start_threads():
    """Without OpenMP the kernels run one thread, and set_num_threads(n > 1) says so instead of
    reporting n (with OpenMP, the tests above check the real teams)."""
    if rnnfast.build_info()["openmp"]:
        assert rnnfast.get_num_threads() >= 1
        return
    assert rnnfast.get_num_threads() == 1
    with pytest.raises(RuntimeError, match="built without OpenMP"):
        rnnfast.set_num_threads(2)
    rnnfast.set_num_threads(1)
