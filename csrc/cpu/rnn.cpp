// Vanilla RNN (tanh or relu): the fused pointwise forward and backward passes over the shared
// driver. The reserve is the h sequence alone: the derivative comes from h itself.
#include "cpu/recurrent.h"
#include "cpu/vecmath.h"

namespace rnnfast::cpu {
namespace {

template <bool Relu>
struct Rnn : DefaultStep {
  static constexpr CellKind kind = Relu ? CellKind::rnn_relu : CellKind::rnn_tanh;

  template <typename T>
  RNNFAST_PASS static void forward(const ForwardStep<T>& s) {
    const int64_t H = s.H, j0 = s.units.begin, nu = s.units.size();
    for (int64_t n = 0; n < s.N; ++n) {
      T* h = s.h + n * H;
      if (!s.valid(n)) {
        std::fill(h + j0, h + s.units.end, T(0));
        continue;
      }
      const T* gh = s.gh + n * nu;
      if (!s.gx) {  // the step's product took x_t too
#pragma omp simd
        for (int64_t u = 0; u < nu; ++u)
          h[j0 + u] = rnn_point_forward<T, Math<T>>(s.bx[j0 + u] + gh[u], Relu);
        continue;
      }
      const T* gx = s.gx + n * nu;
#pragma omp simd
      for (int64_t u = 0; u < nu; ++u)
        h[j0 + u] = rnn_point_forward<T, Math<T>>(gx[u] + s.bx[j0 + u] + gh[u], Relu);
    }
  }

  template <typename T>
  RNNFAST_PASS static void backward(const BackwardStep<T>& s) {
    const int64_t H = s.H;
    for (int64_t n = 0; n < s.N; ++n) {
      T* dg = s.dgx + n * H;
      if (!s.valid(n)) {
        zero_gate_rows<T>(1, H, s.units, dg);
        continue;
      }
      const T* h = s.h + n * H;
      const T* dy = s.dy + n * H;
      T* dh = s.dh + n * H;
#pragma omp simd
      for (int64_t j = s.units.begin; j < s.units.end; ++j) {
        dg[j] = rnn_point_backward(h[j], dh[j] + dy[j], Relu);
        dh[j] = T(0);
      }
    }
  }
};

}  // namespace

RNNFAST_CPU_CELL(Rnn<false>)
RNNFAST_CPU_CELL(Rnn<true>)

}  // namespace rnnfast::cpu
