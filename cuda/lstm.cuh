// LSTM (gates i, f, g, o) and the coupled-gate LSTM (CIFG: f = 1 - i, gates i, g, o), each with
// optional peepholes and an optional projection (LSTMP), on the GPU: their pointwise step and the
// projected step loops, over the shared drivers (recurrence.cuh); the counterpart of
// csrc/cpu/lstm.cpp.
#pragma once

#include "recurrence.cuh"

namespace rnnfast::cuda {

template <bool Coupled>
struct GpuLstm : DefaultGpuSteps {
  // gate blocks: i, f, g, o, or i, g, o when f is 1 - i
  static constexpr int G = Coupled ? 3 : 4, kG = Coupled ? 1 : 2, kO = Coupled ? 2 : 3;

  template <typename S, typename A>
  __device__ static A forward(const FwdPtrs<S, A>& p, int t, int64_t i, int j, const A* ax,
                              const A* ah, A* gates, bool last, A drop) {
    const int64_t H = p.H;
    A a[G];
#pragma unroll
    for (int g = 0; g < G; ++g)
      a[g] = ax[g] + (ah[g] + bias_at<A>(p.b_ih, g * H + j) + bias_at<A>(p.b_hh, g * H + j));
    const A c_prev = p.c_acc[t * p.c_stride + i];
    const A a_f = Coupled ? A(0) : a[1];
    // the candidate's dropout scale always applied: 1 without dropout, the same bits as none
    const LstmPoint<A> q =
        p.w_peephole ? lstm_variant_point_forward<A, StdMath, Coupled, true, true>(
                           a[0], a_f, a[kG], a[kO], c_prev, to_acc<A>(p.w_peephole[j]),
                           to_acc<A>(p.w_peephole[H + j]), to_acc<A>(p.w_peephole[2 * H + j]), drop)
                     : lstm_variant_point_forward<A, StdMath, Coupled, false, true>(
                           a[0], a_f, a[kG], a[kO], c_prev, A(0), A(0), A(0), drop);
    p.c_acc[(t + 1) * p.c_stride + i] = q.c;
    if (gates) {
      gates[0] = q.i;
      if (!Coupled) gates[H] = q.f;
      gates[kG * H] = q.g;
      gates[kO * H] = q.o;
    }
    if (last) p.c_n[i] = from_acc<S>(q.c);
    return q.h;
  }

  template <typename S, typename A>
  __device__ static A backward(const BwdPtrs<S, A>& p, int t, int64_t i, int j, const A* gt, A dh,
                               S* dax, S*, A drop) {
    const int64_t H = p.H, NH = int64_t(p.N) * H;
    const A in = gt[0], f = Coupled ? A(1) - in : gt[H];
    const A c_prev = p.cs[t * NH + i], c = p.cs[(t + 1) * NH + i];
    const LstmPointGrad<A> d =
        p.w_peephole
            ? lstm_variant_point_backward<A, StdMath, Coupled, true, true>(
                  in, f, gt[kG * H], gt[kO * H], c_prev, c, dh, p.dc[i], to_acc<A>(p.w_peephole[j]),
                  to_acc<A>(p.w_peephole[H + j]), to_acc<A>(p.w_peephole[2 * H + j]), drop)
            : lstm_variant_point_backward<A, StdMath, Coupled, false, true>(
                  in, f, gt[kG * H], gt[kO * H], c_prev, c, dh, p.dc[i], A(0), A(0), A(0), drop);
    dax[0] = from_acc<S>(d.da_i);
    if (!Coupled) dax[H] = from_acc<S>(d.da_f);
    dax[kG * H] = from_acc<S>(d.da_g);
    dax[kO * H] = from_acc<S>(d.da_o);
    p.dc[i] = d.dc_prev;
    return A(0);  // h_{t-1} reaches h_t only through W_hh
  }
};

// With a projection, per step: gh = h_{t-1} W_hh^T (K = P), the pointwise kernel writing m = o *
// tanh(c) where h would go, h_t = m W_hr^T into hseq; then h_n gathered from each row's last
// slot. Backward: h_t's total gradient (kept for dW_hr), dm = dh W_hr, the pointwise kernel with
// dm as its dh, dh_{t-1} = da_h W_hh. A padded row's m is zero, so its h is; its dh passes on.

// h_n [N, P] = hseq[lengths[n]][n]
template <typename S>
__global__ void gather_final_kernel(int T, int N, int P, const int32_t* __restrict__ lengths,
                                    const S* __restrict__ hseq, S* __restrict__ h_n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(N) * P) return;
  const int n = static_cast<int>(i / P);
  h_n[i] = hseq[int64_t(lengths ? lengths[n] : T) * N * P + i];
}

// dh_seq[t] = dh + dy[t] and dh restarts at zero for a row in its length; a padded row keeps dh
template <typename S, typename A>
__global__ void projection_grad_kernel(BwdPtrs<S, A> p, int P, const A* __restrict__ dh,
                                       A* __restrict__ dh_next, int t) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t NP = int64_t(p.N) * P;
  if (i >= NP) return;
  const int n = static_cast<int>(i / P);
  const bool valid = t < (p.lengths ? p.lengths[n] : p.T);
  const A total = dh[i] + (valid && p.dy ? to_acc<A>(p.dy[t * NP + i]) : A(0));
  p.dh_seq[t * NP + i] = from_acc<S>(valid ? total : A(0));
  dh_next[i] = valid ? A(0) : dh[i];
}

template <bool Coupled>
struct GpuLstmSteps : GpuLstm<Coupled> {
  template <CellKind Kind, typename S>
  static void forward_steps(const Dims& d, const ForwardArgs& a, const FwdPtrs<S, acc_t<S>>& p,
                            char* ws, const FwdWorkspace& wl, const Gemms<S>& g,
                            cudaStream_t stream) {
    if (!d.P) return DefaultGpuSteps::forward_steps<Kind, S>(d, a, p, ws, wl, g, stream);
    using A = acc_t<S>;
    const int T = static_cast<int>(d.T), N = static_cast<int>(d.N), H = static_cast<int>(d.H),
              P = static_cast<int>(d.P), GH = static_cast<int>(d.GH());
    const int64_t NH = int64_t(N) * H, NP = int64_t(N) * P;
    auto* gh = reinterpret_cast<A*>(ws + wl.gh);
    // the pointwise kernel's view: its h is m (a [T+1, N, H] sequence in training, else one slot)
    FwdPtrs<S, A> pm = p;
    pm.hseq = a.reserve ? reinterpret_cast<S*>(static_cast<A*>(a.reserve) + reserve_layout(d).m)
                        : reinterpret_cast<S*>(ws + wl.m);
    pm.hseq_stride = a.reserve ? NH : 0;
    pm.h_acc = reinterpret_cast<A*>(ws + wl.h_state);
    pm.h_stride = 0;
    pm.h_n = reinterpret_cast<S*>(ws + wl.h_n);
    pm.R = H;
    for (int t = 0; t < T; ++t) {
      cublas::gemm_rm(g.h, false, true, N, GH, P, &g.one, p.hseq + t * NP, g.st, P, a.w_hh, g.st, P,
                      &g.zero, gh, g.at, GH, g.ct);
      const auto step = forward_step_kernel<Kind, S, A>;
      RNNFAST_LAUNCH(step, blocks_for(NH, kPointThreads), kPointThreads, stream, pm, gh, t);
      RNNFAST_CHECK_LAUNCH("forward_step_kernel");
      cublas::gemm_rm(g.h, false, true, N, P, H, &g.one, pm.hseq + (t + 1) * pm.hseq_stride, g.st,
                      H, a.w_hr, g.st, H, &g.zero, p.hseq + (t + 1) * NP, g.st, P, g.ct);
    }
    const auto gather = gather_final_kernel<S>;
    RNNFAST_LAUNCH(gather, blocks_for(NP, kPointThreads), kPointThreads, stream, T, N, P, p.lengths,
                   p.hseq, p.h_n);
    RNNFAST_CHECK_LAUNCH("gather_final_kernel");
  }

  template <CellKind Kind, typename S>
  static void backward_steps(const Dims& d, const BackwardArgs& a, const BwdPtrs<S, acc_t<S>>& p,
                             acc_t<S>* const dh[2], int& cur, char* ws, const BwdWorkspace& wl,
                             const Gemms<S>& g, cudaStream_t stream) {
    if (!d.P) return DefaultGpuSteps::backward_steps<Kind, S>(d, a, p, dh, cur, ws, wl, g, stream);
    using A = acc_t<S>;
    const int N = static_cast<int>(d.N), H = static_cast<int>(d.H), P = static_cast<int>(d.P),
              GH = static_cast<int>(d.GH());
    const int64_t NH = int64_t(N) * H, NP = int64_t(N) * P;
    auto* dm = reinterpret_cast<A*>(ws + wl.dm);
    auto* unused = reinterpret_cast<A*>(ws + wl.dm + align_up(NH * sizeof(A)));
    BwdPtrs<S, A> pm = p;
    pm.dy = nullptr;  // dy is in dh_seq, and from there in dm
    const S* w_hh = static_cast<const S*>(a.w_hh);
    for (int t = static_cast<int>(d.T) - 1; t >= 0; --t) {
      const auto total = projection_grad_kernel<S, A>;
      RNNFAST_LAUNCH(total, blocks_for(NP, kPointThreads), kPointThreads, stream, p, P, dh[cur],
                     dh[1 - cur], t);
      RNNFAST_CHECK_LAUNCH("projection_grad_kernel");
      // dm [N, H] = dh_seq[t] [N, P] W_hr [P, H]
      cublas::gemm_rm(g.h, false, false, N, H, P, &g.one, p.dh_seq + t * NP, g.st, P, a.w_hr, g.st,
                      H, &g.zero, dm, g.at, H, g.ct);
      const auto step = backward_step_kernel<Kind, S, A>;
      RNNFAST_LAUNCH(step, blocks_for(NH, kPointThreads), kPointThreads, stream, pm, dm, unused, t);
      RNNFAST_CHECK_LAUNCH("backward_step_kernel");
      // dh_{t-1} [N, P] += da_h[t] [N, GH] W_hh [GH, P]
      cublas::gemm_rm(g.h, false, false, N, P, GH, &g.one, p.da_h + t * N * int64_t(GH), g.st, GH,
                      w_hh, g.st, P, &g.one, dh[1 - cur], g.at, P, g.ct);
      cur = 1 - cur;
    }
  }

  // dW_hh [GH, P] = da_h^T hseq[0:T], and dW_hr [P, H] = dh_seq^T m
  template <typename S>
  static void dw_hh(const Dims& d, const BackwardArgs& a, const BwdPtrs<S, acc_t<S>>& p,
                    const Gemms<S>& g) {
    if (!d.P) return DefaultGpuSteps::dw_hh<S>(d, a, p, g);
    const int H = static_cast<int>(d.H), P = static_cast<int>(d.P), GH = static_cast<int>(d.GH()),
              tn = static_cast<int>(d.T * d.N);
    cublas::gemm_rm(g.h, true, false, GH, P, tn, &g.one, p.da_h, g.st, GH, a.hseq, g.st, P, &g.zero,
                    a.dw_hh, g.st, P, g.ct);
    cublas::gemm_rm(g.h, true, false, P, H, tn, &g.one, p.dh_seq, g.st, P, p.m + d.N * d.H, g.st, H,
                    &g.zero, a.dw_hr, g.st, H, g.ct);
  }
};

template <>
struct GpuCell<CellKind::lstm> : GpuLstmSteps<false> {};
template <>
struct GpuCell<CellKind::lstm_cifg> : GpuLstmSteps<true> {};

}  // namespace rnnfast::cuda
