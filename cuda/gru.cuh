// GRU (gates r, z, n; r multiplies the recurrent product, as cuDNN and PyTorch) on the GPU: its
// pointwise step, over the shared drivers (recurrence.cuh); the counterpart of csrc/cpu/gru.cpp.
#pragma once

#include "recurrence.cuh"

namespace rnnfast::cuda {

template <>
struct GpuCell<CellKind::gru> : DefaultGpuSteps {
  template <typename S, typename A>
  __device__ static A forward(const FwdPtrs<S, A>& p, int t, int64_t i, int j, const A* ax,
                              const A* ah, A* gates, bool, A drop) {
    const int64_t H = p.H, NH = int64_t(p.N) * H;
    A x[3], hh[3];
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      x[g] = ax[g] + bias_at<A>(p.b_ih, g * H + j);
      hh[g] = ah[g] + bias_at<A>(p.b_hh, g * H + j);
    }
    const A h_prev = p.h_acc[t * p.h_stride + i];
    // the candidate's dropout scale always applied: 1 without dropout, the same bits as none
    const GruPoint<A> q =
        gru_point_forward<A, StdMath, true>(x[0], x[1], x[2], hh[0], hh[1], hh[2], h_prev, drop);
    if (gates) {
      gates[0] = q.r;
      gates[H] = q.z;
      gates[2 * H] = q.n;
    }
    if (p.ghn) p.ghn[t * NH + i] = hh[2];
    return q.h;
  }

  template <typename S, typename A>
  __device__ static A backward(const BwdPtrs<S, A>& p, int t, int64_t i, int, const A* gt, A dh,
                               S* dax, S* dah, A drop) {
    const int64_t H = p.H, NH = int64_t(p.N) * H;
    const GruPointGrad<A> d = gru_point_backward<A, true>(
        gt[0], gt[H], gt[2 * H], p.ghn[t * NH + i], p.hs[t * NH + i], dh, drop);
    const S dr = from_acc<S>(d.da_r), dz = from_acc<S>(d.da_z);
    dax[0] = dr;
    dax[H] = dz;
    dax[2 * H] = from_acc<S>(d.dx_n);
    dah[0] = dr;
    dah[H] = dz;
    dah[2 * H] = from_acc<S>(d.dhh_n);
    return d.dh_prev;
  }
};

}  // namespace rnnfast::cuda

namespace rnnfast::cuda {

// The GRU with r applied to h before the candidate's product (Cho et al. 2014), which owns its
// steps: forward, h_{t-1} W_h{r,z}^T, the gate kernel (r, z, r * h_{t-1}), (r * h_{t-1}) W_hn^T,
// the candidate kernel (n, h); backward mirrors it. No persistent kernel (two products a step).
// r * h_{t-1} is kept in S (it is a GEMM operand) and W_hn's gradient comes from it.

// gh [N, 3H]: columns [0, 2H) hold h_{t-1} W_h{r,z}^T in, z out; the candidate kernel reads z
template <typename S, typename A>
__global__ void gru_reset_before_gates_kernel(FwdPtrs<S, A> p, A* __restrict__ gh, int t) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t H = p.H, NH = int64_t(p.N) * H, GH = 3 * H;
  if (idx >= NH) return;
  const int n = static_cast<int>(idx / H), j = static_cast<int>(idx % H);
  S* rh = p.rh + t * p.rh_stride + idx;
  if (t >= (p.lengths ? p.lengths[n] : p.T)) {
    *rh = from_acc<S>(A(0));  // finite, for dW_hn; the candidate kernel writes the rest
    return;
  }
  const A* gx = p.gx + t * p.N * GH + n * GH + j;
  A* g = gh + n * GH + j;
  const A r = StdMath::sigmoid(gx[0] + bias_at<A>(p.b_ih, j) + g[0] + bias_at<A>(p.b_hh, j));
  const A z =
      StdMath::sigmoid(gx[H] + bias_at<A>(p.b_ih, H + j) + g[H] + bias_at<A>(p.b_hh, H + j));
  *rh = from_acc<S>(r * p.h_acc[t * p.h_stride + idx]);
  g[H] = z;
  if (p.gates) {
    A* gates = p.gates + t * p.N * GH + n * GH + j;
    gates[0] = r;
    gates[H] = z;
  }
}

// gh's columns [2H, 3H) hold (r * h_{t-1}) W_hn^T
template <typename S, typename A>
__global__ void gru_reset_before_candidate_kernel(FwdPtrs<S, A> p, const A* __restrict__ gh,
                                                  int t) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t H = p.H, NH = int64_t(p.N) * H, GH = 3 * H;
  if (idx >= NH) return;
  const int n = static_cast<int>(idx / H), j = static_cast<int>(idx % H);
  const int len = p.lengths ? p.lengths[n] : p.T;
  S* h_out = p.hseq + (t + 1) * NH + idx;
  A* gates = p.gates ? p.gates + t * p.N * GH + n * GH + j : nullptr;
  if (t >= len) {
    *h_out = from_acc<S>(A(0));
    if (p.h_stride) p.h_acc[(t + 1) * p.h_stride + idx] = A(0);
    if (gates) gates[0] = gates[H] = gates[2 * H] = A(0);
    return;
  }
  const A* g = gh + n * GH + j;
  const A a_n = p.gx[t * p.N * GH + n * GH + 2 * H + j] + bias_at<A>(p.b_ih, 2 * H + j) + g[2 * H] +
                bias_at<A>(p.b_hh, 2 * H + j);
  const GruCandidate<A> q = gru_reset_before_candidate(a_n, g[H], p.h_acc[t * p.h_stride + idx]);
  if (gates) gates[2 * H] = q.n;
  const S hs = from_acc<S>(q.h);
  *h_out = hs;
  p.h_acc[(t + 1) * p.h_stride + idx] = q.h;
  if (t == len - 1) p.h_n[idx] = hs;
}

// da_z, da_n and the part of dh_{t-1} through z; a padded row passes dh on
template <typename S, typename A>
__global__ void gru_reset_before_candidate_backward_kernel(BwdPtrs<S, A> p,
                                                           const A* __restrict__ dh_in,
                                                           A* __restrict__ dh_out, int t) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t H = p.H, NH = int64_t(p.N) * H, GH = 3 * H;
  if (idx >= NH) return;
  const int n = static_cast<int>(idx / H), j = static_cast<int>(idx % H);
  const int64_t gofs = t * p.N * GH + n * GH + j;
  S* dax = p.da_x + gofs;
  if (t >= (p.lengths ? p.lengths[n] : p.T)) {
    dax[0] = dax[H] = dax[2 * H] = from_acc<S>(A(0));
    dh_out[idx] = dh_in[idx];
    return;
  }
  const A dh = dh_in[idx] + (p.dy ? to_acc<A>(p.dy[t * NH + idx]) : A(0));
  const A* gates = p.gates + gofs;
  const GruResetBeforeGrad<A> d =
      gru_reset_before_backward(gates[H], gates[2 * H], p.hs[t * NH + idx], dh);
  dax[H] = from_acc<S>(d.da_z);
  dax[2 * H] = from_acc<S>(d.da_n);
  dh_out[idx] = d.dh_prev;
}

// from drh = d(r * h_{t-1}) = da_n W_hn: da_r, and what it adds to dh_{t-1}
template <typename S, typename A>
__global__ void gru_reset_before_gates_backward_kernel(BwdPtrs<S, A> p, const A* __restrict__ drh,
                                                       A* __restrict__ dh_out, int t) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t H = p.H, NH = int64_t(p.N) * H, GH = 3 * H;
  if (idx >= NH) return;
  const int n = static_cast<int>(idx / H), j = static_cast<int>(idx % H);
  if (t >= (p.lengths ? p.lengths[n] : p.T)) return;
  const int64_t gofs = t * p.N * GH + n * GH + j;
  const GruResetGateGrad<A> g =
      gru_reset_gate_backward(p.gates[gofs], p.hs[t * NH + idx], drh[idx]);
  p.da_x[gofs] = from_acc<S>(g.da_r);
  dh_out[idx] += g.dh_prev;
}

template <>
struct GpuCell<CellKind::gru_reset_before> : DefaultGpuSteps {
  static constexpr bool persistent = false;

  template <CellKind Kind, typename S>
  static void forward_steps(const Dims& d, const ForwardArgs& a, const FwdPtrs<S, acc_t<S>>& p,
                            char* ws, const FwdWorkspace& wl, const Gemms<S>& g,
                            cudaStream_t stream) {
    auto* gh = reinterpret_cast<acc_t<S>*>(ws + wl.gh);
    const int T = static_cast<int>(d.T), N = static_cast<int>(d.N), H = static_cast<int>(d.H);
    const int64_t NH = int64_t(N) * H;
    const S* w_hh = static_cast<const S*>(a.w_hh);
    const unsigned blocks = blocks_for(NH, kPointThreads);
    for (int t = 0; t < T; ++t) {
      // r and z: rows [0, 2H) of W_hh; gh's rows are 3H apart
      cublas::gemm_rm(g.h, false, true, N, 2 * H, H, &g.one, p.hseq + t * NH, g.st, H, w_hh, g.st,
                      H, &g.zero, gh, g.at, 3 * H, g.ct);
      const auto gates = gru_reset_before_gates_kernel<S, acc_t<S>>;
      RNNFAST_LAUNCH(gates, blocks, kPointThreads, stream, p, gh, t);
      RNNFAST_CHECK_LAUNCH("gru_reset_before_gates_kernel");
      cublas::gemm_rm(g.h, false, true, N, H, H, &g.one, p.rh + t * p.rh_stride, g.st, H,
                      w_hh + 2 * int64_t(H) * H, g.st, H, &g.zero, gh + 2 * H, g.at, 3 * H, g.ct);
      const auto candidate = gru_reset_before_candidate_kernel<S, acc_t<S>>;
      RNNFAST_LAUNCH(candidate, blocks, kPointThreads, stream, p, gh, t);
      RNNFAST_CHECK_LAUNCH("gru_reset_before_candidate_kernel");
    }
  }

  template <CellKind Kind, typename S>
  static void backward_steps(const Dims& d, const BackwardArgs& a, const BwdPtrs<S, acc_t<S>>& p,
                             acc_t<S>* const dh[2], int& cur, char* ws, const BwdWorkspace& wl,
                             const Gemms<S>& g, cudaStream_t stream) {
    auto* drh = reinterpret_cast<acc_t<S>*>(ws + wl.drh);
    const int N = static_cast<int>(d.N), H = static_cast<int>(d.H), GH = 3 * H;
    const int64_t NH = int64_t(N) * H;
    const S* w_hh = static_cast<const S*>(a.w_hh);
    const unsigned blocks = blocks_for(NH, kPointThreads);
    for (int t = static_cast<int>(d.T) - 1; t >= 0; --t) {
      const S* da = p.da_x + t * N * int64_t(GH);
      const auto candidate = gru_reset_before_candidate_backward_kernel<S, acc_t<S>>;
      RNNFAST_LAUNCH(candidate, blocks, kPointThreads, stream, p, dh[cur], dh[1 - cur], t);
      RNNFAST_CHECK_LAUNCH("gru_reset_before_candidate_backward_kernel");
      // drh [N, H] = da_n [N, H] W_hn [H, H]
      cublas::gemm_rm(g.h, false, false, N, H, H, &g.one, da + 2 * H, g.st, GH,
                      w_hh + 2 * int64_t(H) * H, g.st, H, &g.zero, drh, g.at, H, g.ct);
      const auto gates = gru_reset_before_gates_backward_kernel<S, acc_t<S>>;
      RNNFAST_LAUNCH(gates, blocks, kPointThreads, stream, p, drh, dh[1 - cur], t);
      RNNFAST_CHECK_LAUNCH("gru_reset_before_gates_backward_kernel");
      // dh_{t-1} += [da_r, da_z] [N, 2H] W_h{r,z} [2H, H]
      cublas::gemm_rm(g.h, false, false, N, H, 2 * H, &g.one, da, g.st, GH, w_hh, g.st, H, &g.one,
                      dh[1 - cur], g.at, H, g.ct);
      cur = 1 - cur;
    }
  }

  // W_h{r,z} multiply h_{t-1}, W_hn multiplies r * h_{t-1}
  template <typename S>
  static void dw_hh(const Dims& d, const BackwardArgs& a, const BwdPtrs<S, acc_t<S>>& p,
                    const Gemms<S>& g) {
    const int H = static_cast<int>(d.H), GH = 3 * H, tn = static_cast<int>(d.T * d.N);
    S* dw = static_cast<S*>(a.dw_hh);
    cublas::gemm_rm(g.h, true, false, 2 * H, H, tn, &g.one, p.da_x, g.st, GH, a.hseq, g.st, H,
                    &g.zero, dw, g.st, H, g.ct);
    cublas::gemm_rm(g.h, true, false, H, H, tn, &g.one, p.da_x + 2 * H, g.st, GH, p.rh, g.st, H,
                    &g.zero, dw + 2 * int64_t(H) * H, g.st, H, g.ct);
  }
};

}  // namespace rnnfast::cuda
