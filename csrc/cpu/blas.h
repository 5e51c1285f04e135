// The BLAS (scipy-openblas32, single-threaded: the kernels' OpenMP teams call it per block), and
// the row-split product that every large GEMM goes through.
#pragma once

#include <cstdint>

namespace rnnfast::cpu {

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C through the BLAS; any zero size is handled.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// The same product with the rows of C split across `threads` threads (one OpenMP team).
template <typename T>
void parallel_gemm(int threads, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                   const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace rnnfast::cpu
