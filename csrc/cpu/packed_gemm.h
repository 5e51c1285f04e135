// The recurrent product of one step, C[N, M] (+)= A[N, K] op(W), with W packed once per call and
// reused for all T steps. A BLAS re-packs W on every call, and its small-M kernels run far below
// peak; for float32 on AVX-512 this AVX-512 micro-kernel takes over, elsewhere the BLAS does.
#pragma once

#include <cstdint>
#include <memory>

#include "cpu/parallel.h"

namespace rnnfast::cpu {

bool cpu_has_avx512();

// W packed into 16-wide column panels, K-major: panel p holds outputs [16p, 16p + 16), zero past M.
class PackedPanels {
 public:
  // outputs_are_rows: output j's weights are row j of W ([M, ldw], so C = A W^T); otherwise they
  // are column j ([K, ldw], so C = A W).
  PackedPanels(const float* W, int64_t ldw, int64_t M, int64_t K, bool outputs_are_rows);
  // C[N, M] = A[N, K] op(W), or += with accumulate; A rows lda apart, C rows ldc apart
  void multiply(int64_t N, const float* A, int64_t lda, float* C, int64_t ldc,
                bool accumulate) const;

 private:
  int64_t M_, K_, panels_;
  Scratch<float> data_;
};

// The step product through the packed AVX-512 kernel where it applies, else through the BLAS
// on W as it lies. Built once per thread per call.
template <typename T>
class StepProduct {
 public:
  StepProduct(const T* W, int64_t ldw, int64_t M, int64_t K, bool outputs_are_rows)
      : W_(W), ldw_(ldw), M_(M), K_(K), rows_(outputs_are_rows) {}
  void operator()(int64_t N, const T* A, int64_t lda, T* C, int64_t ldc, bool accumulate) const {
    gemm<T>(false, rows_, N, M_, K_, T(1), A, lda, W_, ldw_, accumulate ? T(1) : T(0), C, ldc);
  }

 private:
  const T* W_;
  int64_t ldw_, M_, K_;
  bool rows_;
};

template <>
class StepProduct<float> {
 public:
  StepProduct(const float* W, int64_t ldw, int64_t M, int64_t K, bool outputs_are_rows)
      : W_(W), ldw_(ldw), M_(M), K_(K), rows_(outputs_are_rows) {
    if (cpu_has_avx512() && M > 0 && K > 0)
      packed_ = std::make_unique<PackedPanels>(W, ldw, M, K, outputs_are_rows);
  }
  void operator()(int64_t N, const float* A, int64_t lda, float* C, int64_t ldc,
                  bool accumulate) const {
    if (packed_) return packed_->multiply(N, A, lda, C, ldc, accumulate);
    gemm<float>(false, rows_, N, M_, K_, 1.0f, A, lda, W_, ldw_, accumulate ? 1.0f : 0.0f, C, ldc);
  }

 private:
  const float* W_;
  int64_t ldw_, M_, K_;
  bool rows_;
  std::unique_ptr<PackedPanels> packed_;
};

}  // namespace rnnfast::cpu
