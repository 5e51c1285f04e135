// GRU (gates r, z, n; r multiplies the recurrent product as in cuDNN and PyTorch): the fused
// pointwise forward and backward passes, over the shared driver.
#include <type_traits>

#include "cpu/recurrent.h"
#include "cpu/vecmath.h"

namespace rnnfast::cpu {
namespace {

struct Gru : DefaultStep {
  static constexpr CellKind kind = CellKind::gru;

  template <typename T>
  RNNFAST_PASS static void forward(const ForwardStep<T>& s) {
    const int64_t H = s.H, GH = 3 * H, j0 = s.units.begin, nu = s.units.size();
    for (int64_t n = 0; n < s.N; ++n) {
      T* h = s.h + n * H;
      T* gates = s.gates ? s.gates + n * GH : nullptr;
      T* ghn = s.ghn ? s.ghn + n * H : nullptr;
      if (!s.valid(n)) {
        std::fill(h + j0, h + s.units.end, T(0));
        if (gates) zero_gate_rows<T>(3, H, s.units, gates);
        if (ghn) std::fill(ghn + j0, ghn + s.units.end, T(0));
        continue;
      }
      const T* gx = s.gx + n * 3 * nu;
      const T* gh = s.gh + n * 3 * nu;
      const T* b = s.bx;
      const T* h_prev = s.h_prev + n * H;
      // one simd loop with the gate stores for training, one without for inference
      auto row = [&](auto save) RNNFAST_INLINE {
#pragma omp simd
        for (int64_t u = 0; u < nu; ++u) {
          const int64_t j = j0 + u;
          const T hh_n = gh[2 * nu + u] + s.bhn[j];
          const GruPoint<T> p = gru_point_forward<T, Math<T>>(gx[u] + b[j], gx[nu + u] + b[H + j],
                                                              gx[2 * nu + u] + b[2 * H + j], gh[u],
                                                              gh[nu + u], hh_n, h_prev[j]);
          h[j] = p.h;
          if constexpr (decltype(save)::value) {
            gates[j] = p.r;
            gates[H + j] = p.z;
            gates[2 * H + j] = p.n;
            ghn[j] = hh_n;
          }
        }
      };
      if (gates)
        row(std::true_type{});
      else
        row(std::false_type{});
    }
  }

  template <typename T>
  RNNFAST_PASS static void backward(const BackwardStep<T>& s) {
    const int64_t H = s.H, GH = 3 * H;
    for (int64_t n = 0; n < s.N; ++n) {
      T* dgx = s.dgx + n * GH;
      T* dgh = s.dgh + n * GH;
      if (!s.valid(n)) {
        zero_gate_rows<T>(3, H, s.units, dgx);
        zero_gate_rows<T>(3, H, s.units, dgh);
        continue;
      }
      const T* gates = s.gates + n * GH;
      const T* ghn = s.ghn + n * H;
      const T* h_prev = s.h_prev + n * H;
      const T* dy = s.dy + n * H;
      T* dh = s.dh + n * H;
#pragma omp simd
      for (int64_t j = s.units.begin; j < s.units.end; ++j) {
        const GruPointGrad<T> g = gru_point_backward(gates[j], gates[H + j], gates[2 * H + j],
                                                     ghn[j], h_prev[j], dh[j] + dy[j]);
        dgx[j] = dgh[j] = g.da_r;
        dgx[H + j] = dgh[H + j] = g.da_z;
        dgx[2 * H + j] = g.dx_n;
        dgh[2 * H + j] = g.dhh_n;
        dh[j] = g.dh_prev;
      }
    }
  }
};

}  // namespace

RNNFAST_CPU_CELL(Gru)

}  // namespace rnnfast::cpu
