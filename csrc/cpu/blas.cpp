// The BLAS bindings (scipy-openblas32, whose symbols carry a scipy_ prefix) and the row-split GEMM.
#include "cpu/blas.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <memory>
#include <stdexcept>
#include <type_traits>

#include "cpu/packed_gemm.h"
#include "cpu/parallel.h"

namespace rnnfast::cpu {

namespace {
// This OpenBLAS instance is ours alone (NumPy and SciPy bundle their own copies). It runs
// single-threaded: every parallel loop is an OpenMP team whose threads each call it on a block.
const bool g_serial_blas = (scipy_openblas_set_num_threads(1), true);

void check_blas_size(int64_t v) {
  if (v > INT_MAX)
    throw std::length_error("rnnfast: a matrix dimension exceeds the BLAS's 32-bit range");
}
// C = beta * C, for an empty inner dimension (the BLAS is not asked about K = 0)
template <typename T>
void scale(int64_t M, int64_t N, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
}

// the BLAS's single and double precision products, under one name
void cblas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, float alpha,
                const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc) {
  scipy_cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void cblas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, double alpha,
                const double* A, int lda, const double* B, int ldb, double beta, double* C,
                int ldc) {
  scipy_cblas_dgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return scale(M, N, beta, C, ldc);
  for (int64_t v : {M, N, K, lda, ldb, ldc}) check_blas_size(v);
  cblas_gemm(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, int(M),
             int(N), int(K), alpha, A, int(std::max<int64_t>(lda, 1)), B,
             int(std::max<int64_t>(ldb, 1)), beta, C, int(ldc));
}

template <typename T>
void parallel_gemm(int threads, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                   const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  // C goes in blocks whose sizes depend on the shape alone (at most 8, a multiple of 16 rows or
  // columns each), handed out whole to the threads: every thread count makes the same BLAS calls
  // and so gets the same bits (OpenBLAS picks kernels, and with them the order of its sums, by a
  // call's shape; a split by thread count made dw_hh differ between 1 and 2 threads). Blocks of
  // rows, except for a weight gradient A^T B with fewer rows than columns (a Linear head's, M =
  // its outputs): OpenBLAS runs a few rows by many columns poorly, so there blocks of at least
  // 128 columns (bench/RESULTS.md, session 14).
  const bool by_columns = trans_a && N > M;
  const int64_t split_dim = by_columns ? N : M;
  const int64_t block = by_columns ? std::max<int64_t>(128, (N + 127) / 128 * 16)
                                   : std::max<int64_t>(16, (M + 127) / 128 * 16);
  const int64_t blocks = (split_dim + block - 1) / block;
  if (M * N * K < (int64_t(1) << 18)) threads = 1;  // small products are not worth a team
  threads = team_request(int(std::min<int64_t>(threads, std::max<int64_t>(blocks, 1))));
  // Rows of A times a B whose packed panels stay in cache (the layers' Linear, dx of the
  // recurrent kernels) run through the step product's packed tiles, B packed once per thread:
  // OpenBLAS ran these at 40-60% of the FMA peak. beta is 0 or 1 there (overwrite or add).
  const bool packed = std::is_same_v<T, float> && !trans_a && M > 0 && N > 0 && K > 0 &&
                      (beta == T(0) || beta == T(1)) && cpu_has_packed_products() &&
                      N * K * int64_t(sizeof(T)) <= l2_cache_bytes() / 2 &&
                      StepProduct<T>::packing_pays(N, K, M);
  // packed before the team (nothing in it may throw); float32's multiply is safe to share
  std::unique_ptr<const StepProduct<T>> product;  // not std::optional: GCC 12 for aarch64
  // warned that its payload may be used uninitialized, wrongly, and the build has -Werror there
  if (packed)
    product = std::make_unique<const StepProduct<T>>(
        B, ldb, N, K, trans_b ? WeightsBy::row : WeightsBy::column, OutputBlocks{}, M);
#pragma omp parallel num_threads(threads)
  {
    const Range mine = split(blocks, team_size(), thread_index());
    for (int64_t b = mine.begin; b < mine.end; ++b) {
      const int64_t i0 = b * block, size = std::min(block, split_dim - i0);
      if (by_columns) {
        // op(B)'s column c starts at B + c untransposed, at row c of B transposed
        const T* bc = trans_b ? B + i0 * ldb : B + i0;
        gemm<T>(trans_a, trans_b, M, size, K, T(1), A, lda, bc, ldb, beta, C + i0, ldc);
        continue;
      }
      // op(A)'s row r starts at A + r*lda untransposed, at column r of A transposed
      const T* a = trans_a ? A + i0 : A + i0 * lda;
      if (product)
        (*product)(size, a, lda, C + i0 * ldc, ldc,
                   beta == T(0) ? Accumulate::no : Accumulate::yes);
      else
        gemm<T>(trans_a, trans_b, size, N, K, T(1), a, lda, B, ldb, beta, C + i0 * ldc, ldc);
    }
  }
}

#define RNNFAST_INSTANTIATE(T)                                                                  \
  template void gemm<T>(bool, bool, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*,  \
                        int64_t, T, T*, int64_t);                                               \
  template void parallel_gemm<T>(int, bool, bool, int64_t, int64_t, int64_t, const T*, int64_t, \
                                 const T*, int64_t, T, T*, int64_t);
RNNFAST_INSTANTIATE(float)
RNNFAST_INSTANTIATE(double)
#undef RNNFAST_INSTANTIATE

}  // namespace rnnfast::cpu
