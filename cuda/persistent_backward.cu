// The persistent backward recurrence: one cooperative launch runs steps T-1..0, each block holding
// the columns of w_hh of its hidden units (every gate row) in shared memory, so that it computes
// dh_{t-1} = da_h[t] w_hh for its own units and then their gate gradients, with no atomics.
#include "persistent.cuh"

namespace rnnfast::cuda {
namespace persistent {
namespace {

template <CellKind Kind, typename S, int NB>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(BwdPtrs<S, acc_t<S>> p, const S* __restrict__ w_hh, acc_t<S>* __restrict__ dh,
                    int U, int Rpad, int KS) {
  using A = acc_t<S>;
  constexpr int G = gate_count(Kind);
  RNNFAST_DYNAMIC_SHARED(smem);
  const int H = p.H, N = p.N, GH = G * H;
  const int j0 = blockIdx.x * U;
  const SmemLayout sl = smem_layout(Rpad, GH, NB, KS, sizeof(S), sizeof(A));
  S* w_s = reinterpret_cast<S*>(smem);             // local row u is column j0 + u of w_hh
  S* d_s = reinterpret_cast<S*>(smem + sl.tile);   // the batch tile of da_h[t+1]
  A* part = reinterpret_cast<A*>(smem + sl.part);  // partial sums per k-split warp

  for (int64_t e = threadIdx.x; e < int64_t(Rpad) * GH; e += kThreads) {
    const int u = static_cast<int>(e / GH), r = static_cast<int>(e % GH);
    w_s[e] = u < U && j0 + u < H ? w_hh[int64_t(r) * H + j0 + u] : from_acc<S>(A(0));
  }
  __syncthreads();

  cg::grid_group grid = cg::this_grid();
  // dh[i] carries, per (n, j) and owned by one thread, the gradient reaching h_t that does not
  // come through w_hh; the last pass (t = -1) adds da_h[0] w_hh to make dh0
  for (int t = p.T - 1; t >= -1; --t) {
    const bool rec = t + 1 < p.T;
    for (int n0 = 0; n0 < N; n0 += NB) {
      if (rec) {
        __syncthreads();  // the last tile's readers of d_s and part are done
        stage_tile<S, NB>(d_s, p.da_h + int64_t(t + 1) * N * GH, n0, N, GH);
        __syncthreads();
        tile_products<S, A, NB>(w_s, d_s, part, GH, Rpad, KS);
        __syncthreads();
      }
      for (int e = threadIdx.x; e < NB * U; e += kThreads) {
        const int nb = e / U, u = e % U, n = n0 + nb, j = j0 + u;
        if (n >= N || j >= H) continue;
        const int64_t i = int64_t(n) * H + j;
        const A in = dh[i] + (rec ? sum_part(part, nb, u, NB, Rpad, KS) : A(0));
        dh[i] = t >= 0 ? backward_point<Kind>(p, t, n, j, in) : in;
      }
    }
    // every block's da_h[t] must be written before any block reads it for step t-1
    if (t >= 0) grid.sync();
  }
}

template <CellKind Kind, typename S, int NB>
bool launch(const BwdPtrs<S, acc_t<S>>& p, const S* w_hh, acc_t<S>* dh, const Plan& plan,
            const DeviceFacts& f, cudaStream_t stream) {
  return launch_cooperative(backward_kernel<Kind, S, NB>, plan, f, stream,
                            "cudaLaunchCooperativeKernel (persistent backward)", p, w_hh, dh,
                            plan.U, plan.Rpad, plan.KS);
}

}  // namespace
}  // namespace persistent

template <CellKind Kind, typename S>
bool persistent_backward(const BwdPtrs<S, acc_t<S>>& p, const S* w_hh, acc_t<S>* dh,
                         cudaStream_t stream, bool require) {
  using namespace persistent;
  if constexpr (std::is_same_v<S, double>) {
    return refuse(require, "float64 has no persistent kernel", p.N, p.H);
  } else {
    if (p.T == 0) return true;  // nothing to run: dh and dc already hold dh_n and dc_n
    if (!require && p.N > kAutoMaxBatch) return false;
    const DeviceFacts f = device_facts();
    const int GH = gate_count(Kind) * p.H;
    const Plan plan = make_plan(1, GH, p.N, p.H, sizeof(S), sizeof(acc_t<S>), f);
    if (!plan.ok) return refuse(require, "w_hh does not fit in shared memory", p.N, p.H);
    bool ran = false;
    switch (plan.NB) {
      case 1:
        ran = launch<Kind, S, 1>(p, w_hh, dh, plan, f, stream);
        break;
      case 2:
        ran = launch<Kind, S, 2>(p, w_hh, dh, plan, f, stream);
        break;
      case 4:
        ran = launch<Kind, S, 4>(p, w_hh, dh, plan, f, stream);
        break;
      default:
        ran = launch<Kind, S, 8>(p, w_hh, dh, plan, f, stream);
    }
    return ran || refuse(require, "its blocks cannot all be resident at once", p.N, p.H);
  }
}

#define RNNFAST_PERSISTENT_BACKWARD(Kind)                                                        \
  template bool persistent_backward<Kind, float>(const BwdPtrs<float, float>&, const float*,     \
                                                 float*, cudaStream_t, bool);                    \
  template bool persistent_backward<Kind, double>(const BwdPtrs<double, double>&, const double*, \
                                                  double*, cudaStream_t, bool);                  \
  template bool persistent_backward<Kind, __half>(const BwdPtrs<__half, float>&, const __half*,  \
                                                  float*, cudaStream_t, bool);                   \
  template bool persistent_backward<Kind, __nv_bfloat16>(                                        \
      const BwdPtrs<__nv_bfloat16, float>&, const __nv_bfloat16*, float*, cudaStream_t, bool);

RNNFAST_CUDA_CELLS(RNNFAST_PERSISTENT_BACKWARD)

}  // namespace rnnfast::cuda
