// The persistent forward recurrence: one cooperative launch runs all T steps, each block keeping
// its slice of w_hh in shared memory, the blocks meeting at a grid-wide barrier once per step.
// Wins at small batch, where a GEMM launch per step is all latency.
#include <cooperative_groups.h>

#include <mutex>
#include <unordered_map>

#include "recurrence.cuh"

namespace cg = cooperative_groups;

namespace rnnfast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowBlock = 4;  // w_hh rows per warp pass (register blocking with the batch tile)
constexpr int kAutoMaxBatch = 32;  // auto mode: above this the stepped cuBLAS path wins (to tune)

// h is written by other blocks during the launch: read it from L2, never from a stale L1 line
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

// How a launch is cut: U hidden units per block, all G gates of each (R = G*U rows of w_hh, padded
// to Rpad), the batch in tiles of NB rows, k split over KS warps where rows are few.
struct Plan {
  bool ok = false;
  int blocks = 0, U = 0, Rpad = 0, NB = 1, KS = 1;
  size_t smem = 0;
};

// shared-memory offsets in bytes: w_s [Rpad, H] S, h_s [NB, H] S, part [KS, NB, Rpad] A
struct SmemLayout {
  size_t h, part, total;
};

__host__ __device__ inline SmemLayout smem_layout(int Rpad, int H, int NB, int KS, size_t s,
                                                  size_t a) {
  SmemLayout l;
  l.h = (size_t(Rpad) * H * s + 15) / 16 * 16;
  l.part = (l.h + size_t(NB) * H * s + 15) / 16 * 16;
  l.total = l.part + size_t(KS) * NB * Rpad * a;
  return l;
}

struct DeviceFacts {
  int sms = 0, smem_optin = 0;
};

DeviceFacts device_facts() {
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

Plan make_plan(int G, int N, int H, size_t s_bytes, size_t a_bytes, const DeviceFacts& f) {
  Plan p;
  p.NB = N >= 8 ? 8 : N >= 4 ? 4 : N >= 2 ? 2 : 1;
  p.U = (H + f.sms - 1) / f.sms;
  p.blocks = (H + p.U - 1) / p.U;
  p.Rpad = (G * p.U + kRowBlock - 1) / kRowBlock * kRowBlock;
  const int groups = p.Rpad / kRowBlock;
  p.KS = groups >= kWarps ? 1 : kWarps / groups;
  p.smem = smem_layout(p.Rpad, H, p.NB, p.KS, s_bytes, a_bytes).total;
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

template <CellKind K, typename S, int NB>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_kernel(FwdPtrs<S, acc_t<S>> p, const S* __restrict__ w_hh, int U, int Rpad,
                              int KS) {
  using A = acc_t<S>;
  constexpr int G = gate_count(K);
  constexpr int V = kRowBlock * NB;  // partial sums per lane, reduced across the warp at once
  extern __shared__ __align__(16) unsigned char smem[];
  const int H = p.H, N = p.N;
  const int j0 = blockIdx.x * U, R = G * U;
  const SmemLayout sl = smem_layout(Rpad, H, NB, KS, sizeof(S), sizeof(A));
  S* w_s = reinterpret_cast<S*>(smem);             // local row g*U + u is w_hh row g*H + j0 + u
  S* h_s = reinterpret_cast<S*>(smem + sl.h);      // the batch tile of h_{t-1}
  A* part = reinterpret_cast<A*>(smem + sl.part);  // partial sums per k-split warp

  for (int64_t e = threadIdx.x; e < int64_t(Rpad) * H; e += kThreads) {
    const int r = static_cast<int>(e / H), k = static_cast<int>(e % H);
    const int g = r / U, u = r % U;
    w_s[e] = r < R && j0 + u < H ? w_hh[(int64_t(g) * H + j0 + u) * H + k] : from_acc<S>(A(0));
  }

  cg::grid_group grid = cg::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = Rpad / kRowBlock;
  const int64_t NH = int64_t(N) * H;
  for (int t = 0; t < p.T; ++t) {
    const S* h_prev = p.hseq + t * NH;
    for (int n0 = 0; n0 < N; n0 += NB) {
      __syncthreads();  // the last tile's readers of h_s and part are done
      for (int e = threadIdx.x; e < NB * H; e += kThreads) {
        const int nb = e / H;
        h_s[e] = n0 + nb < N ? load_cg(h_prev + int64_t(n0 + nb) * H + e % H) : from_acc<S>(A(0));
      }
      __syncthreads();
      for (int wi = warp; wi < groups * KS; wi += kWarps) {
        const int r0 = (wi % groups) * kRowBlock, kp = wi / groups;
        A v[V];
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = A(0);
        for (int k = kp * 32 + lane; k < H; k += 32 * KS) {
          A hv[NB];
#pragma unroll
          for (int nb = 0; nb < NB; ++nb) hv[nb] = to_acc<A>(h_s[nb * H + k]);
#pragma unroll
          for (int rb = 0; rb < kRowBlock; ++rb) {
            const A w = to_acc<A>(w_s[(r0 + rb) * H + k]);
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) v[rb * NB + nb] += w * hv[nb];
          }
        }
        transpose_reduce<V / 2>(v, lane);
#pragma unroll
        for (int s = V; s < 32; s *= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], s);
        if (lane < V) part[(kp * NB + lane % NB) * Rpad + r0 + lane / NB] = v[0];
      }
      __syncthreads();
      for (int e = threadIdx.x; e < NB * U; e += kThreads) {
        const int nb = e / U, u = e % U, n = n0 + nb, j = j0 + u;
        if (n >= N || j >= H) continue;
        A ah[G];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          A s = A(0);
          for (int kp = 0; kp < KS; ++kp) s += part[(kp * NB + nb) * Rpad + g * U + u];
          ah[g] = s;
        }
        forward_point<K>(p, t, n, j, ah);
      }
    }
    // every block's h_t must be written before any block reads it for step t+1
    if (t + 1 < p.T) grid.sync();
  }
}

template <CellKind K, typename S, int NB>
bool launch(const FwdPtrs<S, acc_t<S>>& p, const S* w_hh, const Plan& plan, const DeviceFacts& f,
            cudaStream_t stream) {
  auto kernel = persistent_forward_kernel<K, S, NB>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(plan.smem)),
             "cudaFuncSetAttribute");
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  if (per_sm * f.sms < plan.blocks) return false;  // a grid barrier needs every block resident
  FwdPtrs<S, acc_t<S>> args = p;
  int U = plan.U, Rpad = plan.Rpad, KS = plan.KS;
  void* params[] = {&args, &w_hh, &U, &Rpad, &KS};
  check_cuda(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), plan.blocks,
                                         kThreads, params, plan.smem, stream),
             "cudaLaunchCooperativeKernel (persistent forward)");
  return true;
}

}  // namespace

bool persistent_fits_impl(const Dims& d, DType s) {
  if (s == DType::f64) return false;
  const DeviceFacts f = device_facts();
  return make_plan(static_cast<int>(d.G()), static_cast<int>(d.N), static_cast<int>(d.H),
                   storage_size(s), acc_size(s), f)
      .ok;
}

template <CellKind K, typename S>
bool persistent_forward(const FwdPtrs<S, acc_t<S>>& p, const S* w_hh, cudaStream_t stream,
                        bool require) {
  auto refuse = [&](const char* why) {
    if (require)
      throw std::runtime_error(std::string("rnnfast CUDA: the persistent recurrence was required "
                                           "but ") +
                               why + " (N=" + std::to_string(p.N) + ", H=" + std::to_string(p.H) +
                               ")");
    return false;
  };
  if constexpr (std::is_same_v<S, double>) {
    return refuse("float64 has no persistent kernel");
  } else {
    if (!require && p.N > kAutoMaxBatch) return false;
    const DeviceFacts f = device_facts();
    const Plan plan = make_plan(gate_count(K), p.N, p.H, sizeof(S), sizeof(acc_t<S>), f);
    if (!plan.ok) return refuse("w_hh does not fit in shared memory");
    bool ran = false;
    switch (plan.NB) {
      case 1:
        ran = launch<K, S, 1>(p, w_hh, plan, f, stream);
        break;
      case 2:
        ran = launch<K, S, 2>(p, w_hh, plan, f, stream);
        break;
      case 4:
        ran = launch<K, S, 4>(p, w_hh, plan, f, stream);
        break;
      default:
        ran = launch<K, S, 8>(p, w_hh, plan, f, stream);
    }
    return ran || refuse("its blocks cannot all be resident at once");
  }
}

#define RNNFAST_PERSISTENT(K)                                                                \
  template bool persistent_forward<K, float>(const FwdPtrs<float, float>&, const float*,     \
                                             cudaStream_t, bool);                            \
  template bool persistent_forward<K, double>(const FwdPtrs<double, double>&, const double*, \
                                              cudaStream_t, bool);                           \
  template bool persistent_forward<K, __half>(const FwdPtrs<__half, float>&, const __half*,  \
                                              cudaStream_t, bool);                           \
  template bool persistent_forward<K, __nv_bfloat16>(const FwdPtrs<__nv_bfloat16, float>&,   \
                                                     const __nv_bfloat16*, cudaStream_t, bool);

RNNFAST_PERSISTENT(CellKind::lstm)
RNNFAST_PERSISTENT(CellKind::gru)
RNNFAST_PERSISTENT(CellKind::rnn_tanh)
RNNFAST_PERSISTENT(CellKind::rnn_relu)

}  // namespace rnnfast::cuda
