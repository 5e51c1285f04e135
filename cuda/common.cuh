// Pieces every CUDA file shares: error checks, the storage/accumulate type pairs, conversions,
// and the cuBLAS type of each dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "cublas_shim.h"
#include "rnnfast_cuda.h"

namespace rnnfast::cuda {

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("rnnfast CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// after every launch: a bad configuration shows here, not at the next synchronisation
#define RNNFAST_CHECK_LAUNCH(name) ::rnnfast::cuda::check_cuda(cudaGetLastError(), name)

// every pointwise launch goes through here (kernel: a __global__ function or a pointer to one),
// so that a host build can replace it to check the drivers and kernels on the CPU
#ifndef RNNFAST_LAUNCH
#define RNNFAST_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

// A, the arithmetic and cell-state type of a storage type S
template <typename S>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename S>
using acc_t = typename AccOf<S>::type;

template <typename S>
constexpr cublas::DataType blas_type() {
  if constexpr (std::is_same_v<S, double>) return cublas::kR64F;
  if constexpr (std::is_same_v<S, __half>) return cublas::kR16F;
  if constexpr (std::is_same_v<S, __nv_bfloat16>) return cublas::kR16BF;
  return cublas::kR32F;
}

template <typename S>
cublas::ComputeType blas_compute(bool tf32) {
  if constexpr (std::is_same_v<S, double>) return cublas::kCompute64F;
  if constexpr (std::is_same_v<S, float>)
    return tf32 ? cublas::kCompute32FFastTF32 : cublas::kCompute32F;
  return cublas::kCompute32F;
}

template <typename A, typename S>
__device__ __forceinline__ A to_acc(S v) {
  if constexpr (std::is_same_v<S, __half>) return static_cast<A>(__half2float(v));
  if constexpr (std::is_same_v<S, __nv_bfloat16>) return static_cast<A>(__bfloat162float(v));
  if constexpr (!std::is_same_v<S, __half> && !std::is_same_v<S, __nv_bfloat16>)
    return static_cast<A>(v);
}

template <typename S, typename A>
__device__ __forceinline__ S from_acc(A v) {
  if constexpr (std::is_same_v<S, __half>) return __float2half_rn(static_cast<float>(v));
  if constexpr (std::is_same_v<S, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  if constexpr (!std::is_same_v<S, __half> && !std::is_same_v<S, __nv_bfloat16>)
    return static_cast<S>(v);
}

// calls f(S{}) with the storage type of s
template <typename F>
void dispatch_dtype(DType s, F&& f) {
  switch (s) {
    case DType::f32:
      return f(float{});
    case DType::f64:
      return f(double{});
    case DType::f16:
      return f(__half{});
    case DType::bf16:
      return f(__nv_bfloat16{});
  }
  throw std::runtime_error("rnnfast CUDA: unknown dtype " + std::to_string(static_cast<int>(s)));
}

inline int64_t align_up(int64_t bytes) { return (bytes + 255) / 256 * 256; }

inline unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

}  // namespace rnnfast::cuda
