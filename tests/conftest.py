"""Shared test helpers: the one tolerance table, seeded inputs, calls by cell name, the cuda marker.

Every test that compares two implementations should take its tolerances from ``tol`` and its
inputs from ``make_inputs``, and run a cell by name through ``run_forward``/``run_backward``. The
cells and their properties come from rnnfast's one cell table (rnnfast.cells), so a new cell there
is parametrised into every test that takes ``CELLS``.

Import from here in a test module with ``from conftest import ...`` (pytest puts tests/ on the
path).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from rnnfast.cells import CELLS as _TABLE

# the cell kinds and their gate counts, from the table
CELLS = list(_TABLE)
GATES = {name: spec.gates for name, spec in _TABLE.items()}
HAS_C = {name: spec.has_c for name, spec in _TABLE.items()}
TORCH_CELLS = [name for name, spec in _TABLE.items() if spec.torch]  # torch.nn has them
GPU_CELLS = [name for name, spec in _TABLE.items() if spec.gpu]  # the CUDA backend has them
PERSISTENT_CELLS = [name for name, spec in _TABLE.items() if spec.gpu_persistent]
GRAD_NAMES = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh"]

# ---- the tolerance table ----------------------------------------------------------------------
# Keyed by the dtype under test; the expected values always come from the float64 reference.
# An element passes when |actual - expected| <= atol + rtol * |expected| (as numpy.isclose).
#   float64: the same arithmetic in another order (BLAS blocking, OpenMP reductions, libm tanh),
#            a few ulps per step that grow mildly over T; weight gradients sum over T*N rows.
#   float32: float32 rounding against float64 truth; weight gradients sum over T*N rows, so
#            they get a looser bound than outputs and state.
TOLERANCES = {
    np.dtype(np.float64): {
        "output": {"rtol": 1e-12, "atol": 1e-12},  # y, h_n, c_n
        "grad": {"rtol": 1e-10, "atol": 1e-11},  # dx, dh0, dc0, dw_*, db_*
    },
    np.dtype(np.float32): {
        "output": {"rtol": 1e-5, "atol": 1e-5},
        "grad": {"rtol": 1e-4, "atol": 1e-4},
    },
}


def tol(dtype, kind: str = "output") -> dict:
    """``{"rtol": ..., "atol": ...}`` for arrays of ``dtype``; kind is "output" or "grad"."""
    return dict(TOLERANCES[np.dtype(dtype)][kind])


def assert_close(actual, expected, rtol: float, atol: float, name: str = "array") -> None:
    """Assert |actual - expected| <= atol + rtol*|expected| elementwise (NaN equals only NaN).

    Compares in float64, so a float32 result can be checked against the float64 reference. On
    failure the message gives the shapes, the number of bad elements, the max absolute and max
    relative error and where the worst element is. ``None`` must meet ``None``.
    """
    if actual is None or expected is None:
        assert actual is None and expected is None, (
            f"{name}: one side is None (actual {type(actual).__name__}, "
            f"expected {type(expected).__name__})"
        )
        return
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    assert np.array_equal(nan_a, nan_e), (
        f"{name}: NaN in different places ({int(nan_a.sum())} in actual, {int(nan_e.sum())} "
        "expected)"
    )
    err = np.where(nan_e, 0.0, np.abs(a - e))
    bad = err > atol + rtol * np.abs(e)
    if bad.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(err == 0, 0.0, err / np.abs(e))
        worst = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements differ beyond rtol={rtol:g}, "
            f"atol={atol:g}; max abs err {err.max():.3e} at {tuple(map(int, worst))} "
            f"(actual {a[worst]:.17g}, expected {e[worst]:.17g}), max rel err {np.max(rel):.3e}"
        )


def assert_grads_close(actual: dict, expected: dict, dtype, names=GRAD_NAMES) -> None:
    """assert_close on every gradient present in ``expected`` (keys from GRAD_NAMES)."""
    assert set(actual) == set(expected), f"gradient keys {sorted(actual)} != {sorted(expected)}"
    for k in names:
        if k in expected:
            assert_close(actual[k], expected[k], **tol(dtype, "grad"), name=k)


# ---- inputs -----------------------------------------------------------------------------------
LENGTHS_KINDS = [None, "full", "mixed", "positive", "zero"]


def make_lengths(kind, T: int, N: int, rng: np.random.Generator):
    """Sequence lengths (int64, shape (N,)) or None.

    kind: None (no lengths argument), "full" (all T), "zero" (all 0), "mixed" (random in
    [0, T], containing both 0 and T when N >= 2), "positive" (random in [1, T], containing T and,
    when N >= 2 and T >= 1, 1; what torch's pack_padded_sequence accepts).
    """
    if kind is None:
        return None
    if kind == "full":
        return np.full(N, T, dtype=np.int64)
    if kind == "zero":
        return np.zeros(N, dtype=np.int64)
    if kind == "mixed":
        lengths = rng.integers(0, T + 1, size=N)
        fixed = [T, 0]
    elif kind == "positive":
        lengths = rng.integers(min(1, T), T + 1, size=N)
        fixed = [T, min(1, T)]
    else:
        raise ValueError(f"unknown lengths kind {kind!r}; one of {LENGTHS_KINDS}")
    picks = rng.permutation(N)[: min(N, 2)]
    lengths[picks] = fixed[: len(picks)]
    return lengths.astype(np.int64)


def make_inputs(cell: str, T: int, N: int, C: int, H: int, dtype, rng: np.random.Generator,
                with_state: bool = True, with_bias: bool = True,
                lengths_kind=None) -> dict:  # fmt: skip
    """Seeded forward inputs for ``cell``: a dict with keys x w_ih w_hh b_ih b_hh h0 c0 lengths.

    Values are drawn in float64 and then cast to ``dtype``, so the same rng state gives the same
    numbers in float32 and float64 (up to rounding). x and states are standard normal; weights and
    biases uniform in +-1/sqrt(H), as PyTorch initialises them. b_ih/b_hh are None without bias,
    h0 (and c0) None without state, c0 None for any cell but LSTM, lengths from ``make_lengths``.
    All keys are always present, so ``run_forward(api, cell, **inputs)`` works for every cell.
    """
    G = GATES[cell]
    k = 1.0 / np.sqrt(H)

    def draw(shape, scale=None):
        a = rng.standard_normal(shape) if scale is None else rng.uniform(-scale, scale, shape)
        return a.astype(dtype)

    inputs = {
        "x": draw((T, N, C)),
        "w_ih": draw((G * H, C), k),
        "w_hh": draw((G * H, H), k),
        "b_ih": draw((G * H,), k) if with_bias else None,
        "b_hh": draw((G * H,), k) if with_bias else None,
        "h0": draw((N, H)) if with_state else None,
        "c0": draw((N, H)) if with_state and _TABLE[cell].has_c else None,
    }
    inputs["lengths"] = make_lengths(lengths_kind, T, N, rng)
    return inputs


def make_upstream(cell: str, T: int, N: int, H: int, dtype, rng: np.random.Generator,
                  with_final: bool = True) -> dict:  # fmt: skip
    """Seeded upstream gradients: dict with dy (T, N, H), dh_n and dc_n (N, H).

    dh_n and dc_n are None without ``with_final``; dc_n is None for any cell but LSTM.
    """
    has_c = _TABLE[cell].has_c
    return {
        "dy": rng.standard_normal((T, N, H)).astype(dtype),
        "dh_n": rng.standard_normal((N, H)).astype(dtype) if with_final else None,
        "dc_n": rng.standard_normal((N, H)).astype(dtype) if with_final and has_c else None,
    }


def central_differences(loss, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """d loss() / d a by central differences, perturbing ``a`` in place one element at a time
    (each restored before the next)."""
    numeric = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        saved = a[i]
        a[i] = saved + eps
        plus = loss()
        a[i] = saved - eps
        minus = loss()
        a[i] = saved
        numeric[i] = (plus - minus) / (2 * eps)
    return numeric


def assert_grad_matches_differences(loss, a: np.ndarray, grad: np.ndarray, name: str,
                                    samples: int = 12, eps: float = 1e-6) -> None:  # fmt: skip
    """The analytic ``grad`` of ``loss()`` in ``a`` against central differences at about
    ``samples`` evenly spread elements (``a`` perturbed in place and restored), for parameters
    too large to difference whole."""
    for i in list(np.ndindex(a.shape))[:: max(1, a.size // samples)]:
        saved = a[i]
        a[i] = saved + eps
        plus = loss()
        a[i] = saved - eps
        minus = loss()
        a[i] = saved
        assert grad[i] == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-8), (name, i)


def cast(arrays: dict, dtype) -> dict:
    """A copy of a dict of arrays with every floating array cast to ``dtype`` (None, ints kept)."""
    return {
        k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
        for k, v in arrays.items()
    }


def noncontiguous(a: np.ndarray) -> np.ndarray:
    """A non-C-contiguous view with the same values as ``a`` (every other element of its last
    axis in a buffer twice as wide, the other half filled with NaN so a stride bug shows)."""
    a = np.asarray(a)
    buf = np.full(a.shape[:-1] + (2 * a.shape[-1],), np.nan, dtype=a.dtype)
    view = buf[..., ::2]
    view[...] = a
    assert not view.flags.c_contiguous or a.size <= 1
    return view


# ---- calling a cell by name -------------------------------------------------------------------


def run_forward(api, cell: str, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None,
                lengths=None, **options):  # fmt: skip
    """``api.forward(cell, ...)`` (api: rnnfast.ops, rnnfast.reference or anything with the same
    uniform pair): ``(y, h_n, c_n, ctx)`` for every cell, c_n None for a cell without a cell
    state. options (training, matmul_precision) go through as keywords."""
    return api.forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths=lengths, **options)


def run_backward(api, cell: str, ctx, dy, dh_n=None, dc_n=None) -> dict:
    """``api.backward`` of a forward of ``cell``: its gradient dict (dc0 only where the cell has
    a cell state)."""
    return api.backward(ctx, dy, dh_n, dc_n, cell=cell)


# ---- the cuda marker --------------------------------------------------------------------------


@functools.cache
def cuda_available() -> bool:
    """True when rnnfast imports and its ``cuda_available()`` says True (False when missing)."""
    try:
        import rnnfast
    except ImportError:
        return False
    probe = getattr(rnnfast, "cuda_available", None)
    try:
        return bool(probe()) if callable(probe) else False
    except Exception:
        return False


def pytest_configure(config):
    # also registered in pyproject.toml; repeated here so the marker is known wherever tests run
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU and the CUDA build")
    config.addinivalue_line("markers", "openmp: needs a build with OpenMP")


def pytest_runtest_setup(item):
    # tests marked @pytest.mark.cuda skip (never fail) where there is no GPU or no CUDA build
    if item.get_closest_marker("cuda") is not None and not cuda_available():
        pytest.skip("needs an NVIDIA GPU and rnnfast built with CUDA (rnnfast.cuda_available())")
    # a build without OpenMP (RNNFAST_OPENMP=OFF, or a compiler without it) runs one thread
    if item.get_closest_marker("openmp") is not None:
        import rnnfast

        if not rnnfast.build_info()["openmp"]:
            pytest.skip("needs rnnfast built with OpenMP (this build runs one kernel thread)")
