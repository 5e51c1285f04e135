// The persistent forward recurrence: one cooperative launch runs steps 0..T-1, each block holding
// all G gate rows of w_hh for its hidden units in shared memory.
#include "persistent.cuh"

namespace rnnfast::cuda {
namespace persistent {
namespace {

template <CellKind Kind, typename S, int NB>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(FwdPtrs<S, acc_t<S>> p, const S* __restrict__ w_hh, int U, int Rpad, int KS) {
  using A = acc_t<S>;
  constexpr int G = gate_count(Kind);
  RNNFAST_DYNAMIC_SHARED(smem);
  const int H = p.H, N = p.N;
  const int j0 = blockIdx.x * U, R = G * U;
  const SmemLayout sl = smem_layout(Rpad, H, NB, KS, sizeof(S), sizeof(A));
  S* w_s = reinterpret_cast<S*>(smem);             // local row g*U + u is w_hh row g*H + j0 + u
  S* h_s = reinterpret_cast<S*>(smem + sl.tile);   // the batch tile of h_{t-1}
  A* part = reinterpret_cast<A*>(smem + sl.part);  // partial sums per k-split warp

  for (int64_t e = threadIdx.x; e < int64_t(Rpad) * H; e += kThreads) {
    const int r = static_cast<int>(e / H), k = static_cast<int>(e % H);
    const int g = r / U, u = r % U;
    w_s[e] = r < R && j0 + u < H ? w_hh[(int64_t(g) * H + j0 + u) * H + k] : from_acc<S>(A(0));
  }

  cg::grid_group grid = cg::this_grid();
  const int64_t NH = int64_t(N) * H;
  for (int t = 0; t < p.T; ++t) {
    for (int n0 = 0; n0 < N; n0 += NB) {
      __syncthreads();  // the last tile's readers of h_s and part are done (and w_s is loaded)
      stage_tile<S, NB>(h_s, p.hseq + t * NH, n0, N, H);
      __syncthreads();
      tile_products<S, A, NB>(w_s, h_s, part, H, Rpad, KS);
      __syncthreads();
      for (int e = threadIdx.x; e < NB * U; e += kThreads) {
        const int nb = e / U, u = e % U, n = n0 + nb, j = j0 + u;
        if (n >= N || j >= H) continue;
        A ah[G];
#pragma unroll
        for (int g = 0; g < G; ++g) ah[g] = sum_part(part, nb, g * U + u, NB, Rpad, KS);
        forward_point<Kind>(p, t, n, j, ah);
      }
    }
    // every block's h_t must be written before any block reads it for step t+1
    if (t + 1 < p.T) grid.sync();
  }
}

template <CellKind Kind, typename S, int NB>
bool launch(const FwdPtrs<S, acc_t<S>>& p, const S* w_hh, const Plan& plan, const DeviceFacts& f,
            cudaStream_t stream) {
  return launch_cooperative(forward_kernel<Kind, S, NB>, plan, f, stream,
                            "cudaLaunchCooperativeKernel (persistent forward)", p, w_hh, plan.U,
                            plan.Rpad, plan.KS);
}

}  // namespace
}  // namespace persistent

bool persistent_fits_impl(const Dims& d, DType s) {
  if (s == DType::f64) return false;
  bool runs = false;  // a cell with a second product per step has no persistent kernel
  dispatch_gpu_cell(d.cell, [&](auto kind) { runs = GpuCell<decltype(kind)::value>::persistent; });
  if (!runs) return false;
  const int H = static_cast<int>(d.H);
  return persistent::make_plan(static_cast<int>(d.G()), H, static_cast<int>(d.N), H,
                               storage_size(s), acc_size(s), persistent::device_facts())
      .ok;
}

template <CellKind Kind, typename S>
bool persistent_forward(const FwdPtrs<S, acc_t<S>>& p, const S* w_hh, cudaStream_t stream,
                        bool require) {
  using namespace persistent;
  if constexpr (std::is_same_v<S, double>) {
    return refuse(require, "float64 has no persistent kernel", p.N, p.H);
  } else {
    if (!require && p.N > kAutoMaxBatch) return false;
    const DeviceFacts f = device_facts();
    const Plan plan = make_plan(gate_count(Kind), p.H, p.N, p.H, sizeof(S), sizeof(acc_t<S>), f);
    if (!plan.ok) return refuse(require, "w_hh does not fit in shared memory", p.N, p.H);
    bool ran = false;
    switch (plan.NB) {
      case 1:
        ran = launch<Kind, S, 1>(p, w_hh, plan, f, stream);
        break;
      case 2:
        ran = launch<Kind, S, 2>(p, w_hh, plan, f, stream);
        break;
      case 4:
        ran = launch<Kind, S, 4>(p, w_hh, plan, f, stream);
        break;
      default:
        ran = launch<Kind, S, 8>(p, w_hh, plan, f, stream);
    }
    return ran || refuse(require, "its blocks cannot all be resident at once", p.N, p.H);
  }
}

#define RNNFAST_PERSISTENT_FORWARD(Kind)                                                        \
  template bool persistent_forward<Kind, float>(const FwdPtrs<float, float>&, const float*,     \
                                                cudaStream_t, bool);                            \
  template bool persistent_forward<Kind, double>(const FwdPtrs<double, double>&, const double*, \
                                                 cudaStream_t, bool);                           \
  template bool persistent_forward<Kind, __half>(const FwdPtrs<__half, float>&, const __half*,  \
                                                 cudaStream_t, bool);                           \
  template bool persistent_forward<Kind, __nv_bfloat16>(const FwdPtrs<__nv_bfloat16, float>&,   \
                                                        const __nv_bfloat16*, cudaStream_t, bool);

RNNFAST_CUDA_CELLS(RNNFAST_PERSISTENT_FORWARD)

}  // namespace rnnfast::cuda
