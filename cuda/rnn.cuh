// The vanilla RNN (tanh or relu) on the GPU: its pointwise step, over the shared drivers
// (recurrence.cuh); the counterpart of csrc/cpu/rnn.cpp. Its derivative comes from h alone.
#pragma once

#include "recurrence.cuh"

namespace rnnfast::cuda {

template <bool Relu>
struct GpuRnn : DefaultGpuSteps {
  template <typename S, typename A>
  __device__ static A forward(const FwdPtrs<S, A>& p, int, int64_t, int j, const A* ax, const A* ah,
                              A*, bool, A) {
    return rnn_point_forward(ax[0] + ah[0] + bias_at<A>(p.b_ih, j) + bias_at<A>(p.b_hh, j), Relu);
  }

  template <typename S, typename A>
  __device__ static A backward(const BwdPtrs<S, A>& p, int t, int64_t i, int, const A*, A dh,
                               S* dax, S*, A) {
    const int64_t NH = int64_t(p.N) * p.H;
    dax[0] = from_acc<S>(rnn_point_backward(p.hs[(t + 1) * NH + i], dh, Relu));
    return A(0);
  }
};

template <>
struct GpuCell<CellKind::rnn_tanh> : GpuRnn<false> {};
template <>
struct GpuCell<CellKind::rnn_relu> : GpuRnn<true> {};

}  // namespace rnnfast::cuda
