// The machinery the persistent recurrences share: a launch plan that cuts w_hh over the blocks,
// the shared-memory layout, and the per-step products of a weight slice with a batch tile.
// The blocks keep their slice of w_hh in shared memory for the whole launch and meet at a
// grid-wide barrier once per step: wins at small batch, where a GEMM launch per step is latency.
#pragma once

#if !defined(RNNFAST_EMULATE)
#include <cooperative_groups.h>
#endif

#include <mutex>
#include <string>
#include <unordered_map>

#include "cells.cuh"

namespace rnnfast::cuda::persistent {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowBlock = 4;       // weight rows per warp pass (register blocking with the tile)
constexpr int kAutoMaxBatch = 32;  // auto mode: above this the stepped cuBLAS path (to tune)

// the dynamic shared memory of a block (cuda/emulate/emulate.h gives each emulated block its own)
#ifndef RNNFAST_DYNAMIC_SHARED
#define RNNFAST_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// data written by other blocks during the launch: read from L2, never from a stale L1 line
template <typename S>
__device__ __forceinline__ S load_cg(const S* p) {
  if constexpr (sizeof(S) == 2) {
    const unsigned short u = __ldcg(reinterpret_cast<const unsigned short*>(p));
    S v;
    memcpy(&v, &u, 2);
    return v;
  } else {
    return __ldcg(p);
  }
}

// How a launch is cut: U hidden units per block, Rpad weight rows (the units' rows, padded to
// kRowBlock) of length K in shared memory, the batch in tiles of NB rows, K split over KS warps
// where rows are few.
struct Plan {
  bool ok = false;
  int blocks = 0, U = 0, Rpad = 0, K = 0, NB = 1, KS = 1;
  size_t smem = 0;
};

// shared-memory offsets in bytes: w [Rpad, K] S, then the tile [NB, K] S, then part [KS, NB, Rpad]
// A
struct SmemLayout {
  size_t tile, part, total;
};

__host__ __device__ inline SmemLayout smem_layout(int Rpad, int K, int NB, int KS, size_t s,
                                                  size_t a) {
  SmemLayout l;
  l.tile = (size_t(Rpad) * K * s + 15) / 16 * 16;
  l.part = (l.tile + size_t(NB) * K * s + 15) / 16 * 16;
  l.total = l.part + size_t(KS) * NB * Rpad * a;
  return l;
}

struct DeviceFacts {
  int sms = 0, smem_optin = 0;
};

inline DeviceFacts device_facts() {
  static std::mutex mu;
  static std::unordered_map<int, DeviceFacts> cache;
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceFacts f;
  check_cuda(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev), "attr");
  check_cuda(cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "attr");
  cache[dev] = f;
  return f;
}

// rows_per_unit weight rows of length K per hidden unit: forward G rows of w_hh (K = H),
// backward one column of w_hh (K = G*H)
inline Plan make_plan(int rows_per_unit, int K, int N, int H, size_t s_bytes, size_t a_bytes,
                      const DeviceFacts& f) {
  Plan p;
  p.NB = N >= 8 ? 8 : N >= 4 ? 4 : N >= 2 ? 2 : 1;
  p.U = (H + f.sms - 1) / f.sms;
  p.blocks = (H + p.U - 1) / p.U;
  p.K = K;
  p.Rpad = (rows_per_unit * p.U + kRowBlock - 1) / kRowBlock * kRowBlock;
  const int groups = p.Rpad / kRowBlock;
  p.KS = groups >= kWarps ? 1 : kWarps / groups;
  p.smem = smem_layout(p.Rpad, K, p.NB, p.KS, s_bytes, a_bytes).total;
  p.ok = p.smem + 1024 <= size_t(f.smem_optin);
  return p;
}

// V partial sums per lane reduced across the warp in V-1 shuffles (a recursive halving; a
// template so every index is a compile-time constant and v stays in registers): afterwards v[0]
// of lane l holds value l % V summed over the lanes that differ from l only below bit log2(V)
template <int Half, typename A, int V>
__device__ __forceinline__ void transpose_reduce(A (&v)[V], int lane) {
  if constexpr (Half >= 1) {
    const bool upper = lane & Half;
#pragma unroll
    for (int q = 0; q < Half; ++q) {
      const A send = upper ? v[q] : v[q + Half];
      const A keep = upper ? v[q + Half] : v[q];
      v[q] = keep + __shfl_xor_sync(0xffffffffu, send, Half);
    }
    transpose_reduce<Half / 2>(v, lane);
  }
}

// tile [NB, K] <- rows n0.. of src [N, K] (zero past N), through L2
template <typename S, int NB>
__device__ __forceinline__ void stage_tile(S* tile, const S* src, int n0, int N, int K) {
  for (int e = threadIdx.x; e < NB * K; e += kThreads) {
    const int nb = e / K;
    tile[e] = n0 + nb < N ? load_cg(src + int64_t(n0 + nb) * K + e % K) : from_acc<S>(0.f);
  }
}

// part[kp, nb, r] = sum over k in split kp of w[r, k] * tile[nb, k]; the caller sums over kp
template <typename S, typename A, int NB>
__device__ __forceinline__ void tile_products(const S* w, const S* tile, A* part, int K, int Rpad,
                                              int KS) {
  constexpr int V = kRowBlock * NB;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = Rpad / kRowBlock;
  for (int wi = warp; wi < groups * KS; wi += kWarps) {
    const int r0 = (wi % groups) * kRowBlock, kp = wi / groups;
    A v[V];
#pragma unroll
    for (int q = 0; q < V; ++q) v[q] = A(0);
    for (int k = kp * 32 + lane; k < K; k += 32 * KS) {
      A x[NB];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) x[nb] = to_acc<A>(tile[nb * K + k]);
#pragma unroll
      for (int rb = 0; rb < kRowBlock; ++rb) {
        const A wv = to_acc<A>(w[int64_t(r0 + rb) * K + k]);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) v[rb * NB + nb] += wv * x[nb];
      }
    }
    transpose_reduce<V / 2>(v, lane);
#pragma unroll
    for (int s = V; s < 32; s *= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], s);
    if (lane < V) part[(kp * NB + lane % NB) * Rpad + r0 + lane / NB] = v[0];
  }
}

template <typename A>
__device__ __forceinline__ A sum_part(const A* part, int nb, int r, int NB, int Rpad, int KS) {
  A s = A(0);
  for (int kp = 0; kp < KS; ++kp) s += part[(kp * NB + nb) * Rpad + r];
  return s;
}

// A cooperative launch of kernel(args...) with the plan's grid; false where its blocks can't all
// be resident at once (a grid barrier needs every block running).
template <typename... Args>
bool launch_cooperative(void (*kernel)(Args...), const Plan& plan, const DeviceFacts& f,
                        cudaStream_t stream, const char* name, Args... args) {
#if defined(RNNFAST_EMULATE)
  (void)f;
  (void)stream;
  (void)name;
  emulate_cooperative(kernel, plan.blocks, kThreads, plan.smem, args...);
#else
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(plan.smem)),
             "cudaFuncSetAttribute");
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (per_sm * f.sms < plan.blocks) return false;
  void* params[] = {&args...};
  check_cuda(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), plan.blocks,
                                         kThreads, params, plan.smem, stream),
             name);
#endif
  return true;
}

inline bool refuse(bool require, const char* why, int N, int H) {
  if (require)
    throw std::runtime_error(
        std::string("rnnfast CUDA: the persistent recurrence was required but ") + why +
        " (N=" + std::to_string(N) + ", H=" + std::to_string(H) + ")");
  return false;
}

}  // namespace rnnfast::cuda::persistent
