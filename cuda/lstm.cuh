// LSTM (gates i, f, g, o) on the GPU: its pointwise step, over the shared drivers
// (recurrence.cuh); the counterpart of csrc/cpu/lstm.cpp.
#pragma once

#include "recurrence.cuh"

namespace rnnfast::cuda {

template <>
struct GpuCell<CellKind::lstm> {
  template <typename S, typename A>
  __device__ static A forward(const FwdPtrs<S, A>& p, int t, int64_t i, int j, const A* ax,
                              const A* ah, A* gates, bool last) {
    const int64_t H = p.H;
    A a[4];
#pragma unroll
    for (int g = 0; g < 4; ++g)
      a[g] = ax[g] + (ah[g] + bias_at<A>(p.b_ih, g * H + j) + bias_at<A>(p.b_hh, g * H + j));
    const A c_prev = p.c_acc[t * p.c_stride + i];
    const LstmPoint<A> q = lstm_point_forward(a[0], a[1], a[2], a[3], c_prev);
    p.c_acc[(t + 1) * p.c_stride + i] = q.c;
    if (gates) {
      gates[0] = q.i;
      gates[H] = q.f;
      gates[2 * H] = q.g;
      gates[3 * H] = q.o;
    }
    if (last) p.c_n[i] = from_acc<S>(q.c);
    return q.h;
  }

  template <typename S, typename A>
  __device__ static A backward(const BwdPtrs<S, A>& p, int t, int64_t i, int, const A* gt, A dh,
                               S* dax, S*) {
    const int64_t H = p.H, NH = int64_t(p.N) * H;
    const LstmPointGrad<A> d = lstm_point_backward(
        gt[0], gt[H], gt[2 * H], gt[3 * H], p.cs[t * NH + i], p.cs[(t + 1) * NH + i], dh, p.dc[i]);
    dax[0] = from_acc<S>(d.da_i);
    dax[H] = from_acc<S>(d.da_f);
    dax[2 * H] = from_acc<S>(d.da_g);
    dax[3 * H] = from_acc<S>(d.da_o);
    p.dc[i] = d.dc_prev;
    return A(0);  // h_{t-1} reaches h_t only through W_hh
  }
};

}  // namespace rnnfast::cuda
