// The few cuBLAS entry points the CUDA module uses, loaded with dlopen at run time.
// The build needs no cuBLAS headers or library (they come with the 440 MB nvidia-cublas wheel);
// where the real header is found, cublas_shim.cu checks these declarations against it.
#pragma once

#include <cstddef>
#include <string>

namespace rnnfast::cuda::cublas {

// ABI values, identical to cublas_api.h and library_types.h (checked where the header exists)
enum Status : int { kSuccess = 0 };
enum Operation : int { kOpN = 0, kOpT = 1 };
enum DataType : int { kR32F = 0, kR64F = 1, kR16F = 2, kR16BF = 14 };
enum ComputeType : int { kCompute32F = 68, kCompute32FFastTF32 = 77, kCompute64F = 70 };
enum GemmAlgo : int { kGemmDefault = -1 };

using Handle = struct cublasContext*;

// Loads libcublas from `path` (an absolute path, or a soname for the loader's search); empty
// tries "libcublas.so.13". Returns "" on success (or if already loaded), else the reason.
std::string load(const std::string& path);
bool loaded();
std::string loaded_path();

// The handle of the current device for the calling thread, bound to `stream` (created lazily,
// kept for the life of the process). Throws std::runtime_error if cuBLAS cannot be loaded.
Handle handle_for(void* stream);

// Row-major C[M, Nc] = alpha * op(A) op(B) + beta * C, with op(A) [M, K] and op(B) [K, Nc]:
// ta means A is stored [K, M], tb means B is stored [Nc, K]. alpha and beta point to float for
// the 32F compute types and to double for 64F. Throws on a cuBLAS error.
void gemm_rm(Handle h, bool ta, bool tb, int M, int Nc, int K, const void* alpha, const void* A,
             DataType at, int lda, const void* B, DataType bt, int ldb, const void* beta, void* C,
             DataType ct, int ldc, ComputeType compute);

}  // namespace rnnfast::cuda::cublas
