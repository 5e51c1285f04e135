// LSTM (gates i, f, g, o) and the coupled-gate LSTM (CIFG: f = 1 - i, gates i, g, o), each with
// optional peepholes, on the GPU: their pointwise step, over the shared drivers
// (recurrence.cuh); the counterpart of csrc/cpu/lstm.cpp.
#pragma once

#include "recurrence.cuh"

namespace rnnfast::cuda {

template <bool Coupled>
struct GpuLstm : DefaultGpuSteps {
  // gate blocks: i, f, g, o, or i, g, o when f is 1 - i
  static constexpr int G = Coupled ? 3 : 4, kG = Coupled ? 1 : 2, kO = Coupled ? 2 : 3;

  template <typename S, typename A>
  __device__ static A forward(const FwdPtrs<S, A>& p, int t, int64_t i, int j, const A* ax,
                              const A* ah, A* gates, bool last) {
    const int64_t H = p.H;
    A a[G];
#pragma unroll
    for (int g = 0; g < G; ++g)
      a[g] = ax[g] + (ah[g] + bias_at<A>(p.b_ih, g * H + j) + bias_at<A>(p.b_hh, g * H + j));
    const A c_prev = p.c_acc[t * p.c_stride + i];
    const A a_f = Coupled ? A(0) : a[1];
    const LstmPoint<A> q =
        p.w_peephole ? lstm_variant_point_forward<A, StdMath, Coupled, true>(
                           a[0], a_f, a[kG], a[kO], c_prev, to_acc<A>(p.w_peephole[j]),
                           to_acc<A>(p.w_peephole[H + j]), to_acc<A>(p.w_peephole[2 * H + j]))
                     : lstm_variant_point_forward<A, StdMath, Coupled, false>(
                           a[0], a_f, a[kG], a[kO], c_prev, A(0), A(0), A(0));
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
                               S* dax, S*) {
    const int64_t H = p.H, NH = int64_t(p.N) * H;
    const A in = gt[0], f = Coupled ? A(1) - in : gt[H];
    const A c_prev = p.cs[t * NH + i], c = p.cs[(t + 1) * NH + i];
    const LstmPointGrad<A> d =
        p.w_peephole
            ? lstm_variant_point_backward<A, StdMath, Coupled, true>(
                  in, f, gt[kG * H], gt[kO * H], c_prev, c, dh, p.dc[i], to_acc<A>(p.w_peephole[j]),
                  to_acc<A>(p.w_peephole[H + j]), to_acc<A>(p.w_peephole[2 * H + j]))
            : lstm_variant_point_backward<A, StdMath, Coupled, false>(
                  in, f, gt[kG * H], gt[kO * H], c_prev, c, dh, p.dc[i], A(0), A(0), A(0));
    dax[0] = from_acc<S>(d.da_i);
    if (!Coupled) dax[H] = from_acc<S>(d.da_f);
    dax[kG * H] = from_acc<S>(d.da_g);
    dax[kO * H] = from_acc<S>(d.da_o);
    p.dc[i] = d.dc_prev;
    return A(0);  // h_{t-1} reaches h_t only through W_hh
  }
};

template <>
struct GpuCell<CellKind::lstm> : GpuLstm<false> {};
template <>
struct GpuCell<CellKind::lstm_cifg> : GpuLstm<true> {};

}  // namespace rnnfast::cuda
