// cuBLAS through dlopen: one handle per (thread, device), GEMMs in row-major terms.
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <mutex>
#include <stdexcept>
#include <unordered_map>

#include "cublas_shim.h"

#if defined(RNNFAST_HAVE_CUBLAS_H)
#include <cublas_api.h>
// the shim's ABI values must be cuBLAS's own
static_assert(CUBLAS_STATUS_SUCCESS == 0 && CUBLAS_OP_N == 0 && CUBLAS_OP_T == 1);
static_assert(CUDA_R_32F == 0 && CUDA_R_64F == 1 && CUDA_R_16F == 2 && CUDA_R_16BF == 14);
static_assert(CUBLAS_COMPUTE_32F == 68 && CUBLAS_COMPUTE_32F_FAST_TF32 == 77 &&
              CUBLAS_COMPUTE_64F == 70 && CUBLAS_GEMM_DEFAULT == -1);
#endif

namespace rnnfast::cuda::cublas {
namespace {

using CreateFn = int (*)(Handle*);
using SetStreamFn = int (*)(Handle, cudaStream_t);
using GemmExFn = int (*)(Handle, int, int, int, int, int, const void*, const void*, int, int,
                         const void*, int, int, const void*, void*, int, int, int, int);
using StatusStringFn = const char* (*)(int);

struct Library {
  std::mutex mu;
  void* dl = nullptr;
  std::string path;
  CreateFn create = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  StatusStringFn status_string = nullptr;
};

Library& lib() {
  static Library l;
  return l;
}

#if defined(RNNFAST_HAVE_CUBLAS_H)
// the function types, checked against the header's prototypes (enums passed as int by value)
static_assert(sizeof(cublasOperation_t) == sizeof(int) && sizeof(cudaDataType) == sizeof(int) &&
              sizeof(cublasComputeType_t) == sizeof(int) &&
              sizeof(cublasGemmAlgo_t) == sizeof(int));
[[maybe_unused]] cublasStatus_t (*const check_create)(cublasHandle_t*) = &cublasCreate_v2;
[[maybe_unused]] cublasStatus_t (*const check_stream)(cublasHandle_t,
                                                      cudaStream_t) = &cublasSetStream_v2;
[[maybe_unused]] cublasStatus_t (*const check_gemm)(cublasHandle_t, cublasOperation_t,
                                                    cublasOperation_t, int, int, int, const void*,
                                                    const void*, cudaDataType, int, const void*,
                                                    cudaDataType, int, const void*, void*,
                                                    cudaDataType, int, cublasComputeType_t,
                                                    cublasGemmAlgo_t) = &cublasGemmEx;
#endif

}  // namespace

std::string load(const std::string& path) {
  Library& l = lib();
  std::lock_guard<std::mutex> lock(l.mu);
  if (l.dl) return "";
  const std::string p = path.empty() ? "libcublas.so.13" : path;
  void* dl = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!dl) {
    const char* e = dlerror();
    return "cannot load cuBLAS from " + p + ": " + (e ? e : "unknown error");
  }
  auto sym = [&](const char* name) {
    void* s = dlsym(dl, name);
    if (!s) throw std::runtime_error("cuBLAS at " + p + " lacks " + name);
    return s;
  };
  try {
    l.create = reinterpret_cast<CreateFn>(sym("cublasCreate_v2"));
    l.set_stream = reinterpret_cast<SetStreamFn>(sym("cublasSetStream_v2"));
    l.gemm_ex = reinterpret_cast<GemmExFn>(sym("cublasGemmEx"));
    l.status_string = reinterpret_cast<StatusStringFn>(sym("cublasGetStatusString"));
  } catch (const std::exception& e) {
    dlclose(dl);
    return e.what();
  }
  l.dl = dl;
  l.path = p;
  return "";
}

bool loaded() { return lib().dl != nullptr; }

std::string loaded_path() { return lib().path; }

static void check(int status, const char* what) {
  if (status != kSuccess) {
    const char* s = lib().status_string ? lib().status_string(status) : "?";
    throw std::runtime_error(std::string("rnnfast CUDA: ") + what + " failed: cuBLAS status " +
                             std::to_string(status) + " (" + s + ")");
  }
}

Handle handle_for(void* stream) {
  if (!loaded()) {
    const std::string err = load("");
    if (!err.empty())
      throw std::runtime_error("rnnfast CUDA: " + err +
                               " (pip install nvidia-cublas, or put CUDA 13's lib64 on the "
                               "library path)");
  }
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess)
    throw std::runtime_error("rnnfast CUDA: cudaGetDevice failed");
  // cuBLAS handles are not thread-safe to share while changing streams: one per thread
  thread_local std::unordered_map<int, Handle> handles;
  Handle& h = handles[device];
  if (!h) check(lib().create(&h), "cublasCreate");
  check(lib().set_stream(h, static_cast<cudaStream_t>(stream)), "cublasSetStream");
  return h;
}

void gemm_rm(Handle h, bool ta, bool tb, int M, int Nc, int K, const void* alpha, const void* A,
             DataType at, int lda, const void* B, DataType bt, int ldb, const void* beta, void* C,
             DataType ct, int ldc, ComputeType compute) {
  if (M == 0 || Nc == 0) return;
  // column-major cuBLAS sees the row-major C as C^T = op(B)^T op(A)^T
  check(lib().gemm_ex(h, tb ? kOpT : kOpN, ta ? kOpT : kOpN, Nc, M, K, alpha, B, bt, ldb, A, at,
                      lda, beta, C, ct, ldc, compute, kGemmDefault),
        "cublasGemmEx");
}

}  // namespace rnnfast::cuda::cublas
