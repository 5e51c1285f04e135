// GRU (gates r, z, n; r multiplies the recurrent product, as cuDNN and PyTorch) on the GPU: its
// pointwise step, over the shared drivers (recurrence.cuh); the counterpart of csrc/cpu/gru.cpp.
#pragma once

#include "recurrence.cuh"

namespace rnnfast::cuda {

template <>
struct GpuCell<CellKind::gru> {
  template <typename S, typename A>
  __device__ static A forward(const FwdPtrs<S, A>& p, int t, int64_t i, int j, const A* ax,
                              const A* ah, A* gates, bool) {
    const int64_t H = p.H, NH = int64_t(p.N) * H;
    A x[3], hh[3];
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      x[g] = ax[g] + bias_at<A>(p.b_ih, g * H + j);
      hh[g] = ah[g] + bias_at<A>(p.b_hh, g * H + j);
    }
    const A h_prev = p.h_acc[t * p.h_stride + i];
    const GruPoint<A> q = gru_point_forward(x[0], x[1], x[2], hh[0], hh[1], hh[2], h_prev);
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
                               S* dax, S* dah) {
    const int64_t H = p.H, NH = int64_t(p.N) * H;
    const GruPointGrad<A> d =
        gru_point_backward(gt[0], gt[H], gt[2 * H], p.ghn[t * NH + i], p.hs[t * NH + i], dh);
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
