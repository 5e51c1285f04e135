"""The recurrent step product's micro-kernels alone (rnnfast._C.step_product) against NumPy: every
tile height (1-12 rows on AVX-512, 1-6 on AVX2, 16-row AMX tiles and their 2 x 2 blocks), panel
tails, odd K and K past one AMX tile, packed and through the BLAS, overwriting and accumulating."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rnnfast import _C, ops
from rnnfast.reference import _round_to_bfloat16

ROWS = [1, 2, 3, 5, 6, 7, 11, 12, 13, 16, 17, 24, 31, 33, 40, 64, 97]
SHAPES = [(15, 7), (16, 32), (33, 33), (48, 100), (70, 64), (129, 65)]  # (M, K)


def _expected(a, w, bf16):
    if bf16:
        a, w = _round_to_bfloat16(a), _round_to_bfloat16(w)
    exact = a.astype(np.float64) @ w.astype(np.float64).T
    # float32 sums over K: each within about K * 2^-24 of the sum of magnitudes
    bound = np.abs(a).astype(np.float64) @ np.abs(w).astype(np.float64).T
    return exact, 1e-6 + 2.0**-24 * a.shape[1] * bound


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("packed_rows", [1, 4096], ids=["as-called", "packed"])
@pytest.mark.parametrize("M, K", SHAPES)
def test_step_product_against_numpy(bf16, packed_rows, M, K):
    if bf16 and not ops.bfloat16_supported():
        pytest.skip("CPU lacks AVX512_BF16")
    rng = np.random.default_rng([M, K])
    w = rng.standard_normal((M, K)).astype(np.float32)
    for N in ROWS:
        a = rng.standard_normal((N, K)).astype(np.float32)
        exact, bound = _expected(a, w, bf16)
        out = np.full((N, M), np.nan, np.float32)
        got, seconds = _C.step_product(a, w, out, bf16=bf16, rows=packed_rows)
        assert got is out and seconds >= 0
        err = np.abs(got - exact)
        assert np.all(err <= bound), f"N={N}: worst {err.max()} over bound {bound[err > bound]}"
        base = rng.standard_normal((N, M)).astype(np.float32)
        out = base.copy()
        _C.step_product(a, w, out, bf16=bf16, rows=packed_rows, accumulate=True, repeats=1)
        assert np.all(np.abs(out - (exact + base)) <= bound + 1e-6), f"accumulate, N={N}"


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("packed_rows", [1, 4096], ids=["as-called", "packed"])
@pytest.mark.parametrize("K2", [1, 7, 64])
@pytest.mark.parametrize("M, K", SHAPES)
def test_stacked_step_product_against_numpy(bf16, packed_rows, K2, M, K):
    # the step product with x_t's weights stacked under h's (the LSTM's and RNN's step at larger
    # batch): a w^T + a2 w2^T in one sum, every tile height, odd K + K2 (a bfloat16 pair that
    # straddles the two operands) and K + K2 past one AMX tile
    if bf16 and not ops.bfloat16_supported():
        pytest.skip("CPU lacks AVX512_BF16")
    rng = np.random.default_rng([M, K, K2])
    w = rng.standard_normal((M, K)).astype(np.float32)
    w2 = rng.standard_normal((M, K2)).astype(np.float32)
    for N in ROWS:
        a = rng.standard_normal((N, K)).astype(np.float32)
        a2 = rng.standard_normal((N, K2)).astype(np.float32)
        exact, bound = _expected(np.hstack([a, a2]), np.hstack([w, w2]), bf16)
        out = np.full((N, M), np.nan, np.float32)
        _C.step_product(a, w, out, bf16=bf16, rows=packed_rows, a2=a2, w2=w2)
        err = np.abs(out - exact)
        assert np.all(err <= bound), f"N={N}: worst {err.max()} over bound {bound[err > bound]}"
        base = rng.standard_normal((N, M)).astype(np.float32)
        out = base.copy()
        _C.step_product(a, w, out, bf16=bf16, rows=packed_rows, accumulate=True, a2=a2, w2=w2)
        assert np.all(np.abs(out - (exact + base)) <= bound + 1e-6), f"accumulate, N={N}"


def test_step_product_bfloat16_rounds_both_operands():
    # not float32 in disguise: a value that bfloat16 cannot hold comes out rounded
    if not ops.bfloat16_supported():
        pytest.skip("CPU lacks AVX512_BF16")
    a = np.full((3, 40), 1 + 2.0**-12, np.float32)
    w = np.ones((20, 40), np.float32)
    out = np.empty((3, 20), np.float32)
    _C.step_product(a, w, out, bf16=True, rows=4096)
    assert np.all(out == 40.0)
    _C.step_product(a, w, out, bf16=False, rows=4096)
    assert np.all(out == np.float32(40 * (1 + 2.0**-12)))


def test_step_product_errors():
    a, w = np.zeros((3, 4), np.float32), np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="one number of columns"):
        _C.step_product(a, np.zeros((5, 3), np.float32), np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="out must have shape"):
        _C.step_product(a, w, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="repeats"):
        _C.step_product(a, w, np.zeros((3, 5), np.float32), repeats=0)
    with pytest.raises(TypeError, match="dtype"):
        _C.step_product(a.astype(np.float64), w, np.zeros((3, 5), np.float32))
    out = np.zeros((3, 5), np.float32)
    with pytest.raises(ValueError, match="a2 and w2 come together"):
        _C.step_product(a, w, out, a2=np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"must be \[3, K2\] and \[5, K2\]"):
        _C.step_product(a, w, out, a2=np.zeros((3, 2), np.float32), w2=np.zeros((5, 3), np.float32))


@pytest.mark.parametrize("trans_a, trans_b", list(itertools.product([False, True], repeat=2)))
def test_bfloat16_gemm_against_numpy(trans_a, trans_b):
    # rnnfast.ops.gemm's bfloat16 products (the training step's weight gradients and dx): one
    # operand in tiles, the other in panels, A^T B through C^T, with tails in every dimension
    if not ops.bfloat16_supported():
        pytest.skip("CPU lacks AVX512_BF16")
    rng = np.random.default_rng([trans_a, trans_b])
    for M, N, K in [(70, 300, 45), (5, 3, 1), (33, 17, 100), (130, 41, 523), (16, 16, 32)]:
        a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
        a_r, b_r = (_round_to_bfloat16(v).astype(np.float64) for v in (a, b))
        op_a, op_b = (a_r.T if trans_a else a_r), (b_r.T if trans_b else b_r)
        exact = op_a @ op_b
        bound = 1e-6 + 2.0**-24 * K * (np.abs(op_a) @ np.abs(op_b))
        got = ops.gemm(a, b, trans_a=trans_a, trans_b=trans_b, matmul_precision="bfloat16")
        assert got.dtype == np.float32 and got.shape == (M, N)
        err = np.abs(got - exact)
        assert np.all(err <= bound), f"{(M, N, K)}: worst {err.max()}"


def test_bfloat16_gemm_errors():
    a = np.zeros((3, 4), np.float32)
    if not ops.bfloat16_supported():
        with pytest.raises(RuntimeError, match="AVX512_BF16"):
            ops.gemm(a, a.T.copy(), matmul_precision="bfloat16")
        return
    with pytest.raises(TypeError, match="float32 inputs"):
        ops.gemm(a.astype(np.float64), a.T.astype(np.float64), matmul_precision="bfloat16")
    with pytest.raises(ValueError, match="no accumulate"):
        ops.gemm(a, a.T.copy(), out=np.zeros((3, 3), np.float32), accumulate=True,
                 matmul_precision="bfloat16")  # fmt: skip
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        ops.gemm(a, a.T.copy(), matmul_precision="half")
