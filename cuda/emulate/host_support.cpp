// What the emulated build links instead of the CUDA runtime and cuBLAS: host memory for device
// memory, a naive GEMM in double, and a device of $RNNFAST_EMULATE_SMS multiprocessors (2, to
// keep the threads few) with 8 MB of shared memory a block.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "recurrence.cuh"

extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  const char* sms = std::getenv("RNNFAST_EMULATE_SMS");
  *v = attr == cudaDevAttrMultiProcessorCount            ? (sms ? std::atoi(sms) : 2)
       : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 8 << 20
                                                         : 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof(*p));
  std::strcpy(p->name, "host emulation");
  p->major = 9;
  return cudaSuccess;
}
}

namespace rnnfast::cuda {
namespace cublas {

std::string load(const std::string&) { return ""; }
bool loaded() { return true; }
std::string loaded_path() { return "host emulation"; }
Handle handle_for(void*) { return nullptr; }

static double get(const void* p, DataType t, int64_t i) {
  switch (t) {
    case kR32F:
      return static_cast<const float*>(p)[i];
    case kR64F:
      return static_cast<const double*>(p)[i];
    case kR16F:
      return __half2float(static_cast<const __half*>(p)[i]);
    case kR16BF:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  throw std::runtime_error("emulated GEMM: unknown type");
}

static void put(void* p, DataType t, int64_t i, double v) {
  switch (t) {
    case kR32F:
      static_cast<float*>(p)[i] = static_cast<float>(v);
      return;
    case kR64F:
      static_cast<double*>(p)[i] = v;
      return;
    case kR16F:
      static_cast<__half*>(p)[i] = __float2half_rn(static_cast<float>(v));
      return;
    case kR16BF:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(static_cast<float>(v));
      return;
  }
}

void gemm_rm(Handle, bool ta, bool tb, int M, int Nc, int K, const void* alpha, const void* A,
             DataType at, int lda, const void* B, DataType bt, int ldb, const void* beta, void* C,
             DataType ct, int ldc, ComputeType compute) {
  if (M == 0 || Nc == 0) return;
  const bool dbl = compute == kCompute64F;
  if ((at == kR64F) != dbl || bt != at) throw std::runtime_error("emulated GEMM: type mismatch");
  const double al = dbl ? *static_cast<const double*>(alpha) : *static_cast<const float*>(alpha);
  const double be = dbl ? *static_cast<const double*>(beta) : *static_cast<const float*>(beta);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < Nc; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k)
        s += get(A, at, ta ? int64_t(k) * lda + m : int64_t(m) * lda + k) *
             get(B, bt, tb ? int64_t(n) * ldb + k : int64_t(k) * ldb + n);
      const double c = be != 0 ? get(C, ct, int64_t(m) * ldc + n) : 0;  // beta 0 ignores C
      put(C, ct, int64_t(m) * ldc + n, al * s + be * c);
    }
}

}  // namespace cublas

}  // namespace rnnfast::cuda
