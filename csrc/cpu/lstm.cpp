// LSTM (gates i, f, g, o): the fused pointwise forward and backward passes, over the shared driver.
#include <type_traits>

#include "cpu/recurrent.h"
#include "cpu/vecmath.h"

namespace rnnfast::cpu {
namespace {

struct Lstm : DefaultStep {
  static constexpr CellKind kind = CellKind::lstm;

  template <typename T>
  RNNFAST_PASS static void forward(const ForwardStep<T>& s) {
    const int64_t H = s.H, GH = 4 * H, j0 = s.units.begin, nu = s.units.size();
    for (int64_t n = 0; n < s.N; ++n) {
      const T* c_prev = s.c_prev + n * H;
      T* h = s.h + n * H;
      T* c = s.c + n * H;
      T* gates = s.gates ? s.gates + n * GH : nullptr;
      if (!s.valid(n)) {
        for (int64_t j = j0; j < s.units.end; ++j) {
          h[j] = T(0);
          c[j] = c_prev[j];
        }
        if (gates) zero_gate_rows<T>(4, H, s.units, gates);
        continue;
      }
      const T* gx = s.gx + n * 4 * nu;
      const T* gh = s.gh + n * 4 * nu;
      const T* b = s.bx;
      // one simd loop with the gate stores for training, one without for inference
      auto row = [&](auto save) RNNFAST_INLINE {
#pragma omp simd
        for (int64_t u = 0; u < nu; ++u) {
          const int64_t j = j0 + u;
          const LstmPoint<T> p = lstm_point_forward<T, Math<T>>(
              gx[u] + b[j] + gh[u], gx[nu + u] + b[H + j] + gh[nu + u],
              gx[2 * nu + u] + b[2 * H + j] + gh[2 * nu + u],
              gx[3 * nu + u] + b[3 * H + j] + gh[3 * nu + u], c_prev[j]);
          c[j] = p.c;
          h[j] = p.h;
          if constexpr (decltype(save)::value) {
            gates[j] = p.i;
            gates[H + j] = p.f;
            gates[2 * H + j] = p.g;
            gates[3 * H + j] = p.o;
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
    const int64_t H = s.H, GH = 4 * H;
    for (int64_t n = 0; n < s.N; ++n) {
      T* dg = s.dgx + n * GH;
      if (!s.valid(n)) {
        zero_gate_rows<T>(4, H, s.units, dg);
        continue;
      }
      const T* gates = s.gates + n * GH;
      const T* c_prev = s.c_prev + n * H;
      const T* c = s.c + n * H;
      const T* dy = s.dy + n * H;
      T* dh = s.dh + n * H;
      T* dc = s.dc + n * H;
#pragma omp simd
      for (int64_t j = s.units.begin; j < s.units.end; ++j) {
        const LstmPointGrad<T> g = lstm_point_backward<T, Math<T>>(
            gates[j], gates[H + j], gates[2 * H + j], gates[3 * H + j], c_prev[j], c[j],
            dh[j] + dy[j], dc[j]);
        dg[j] = g.da_i;
        dg[H + j] = g.da_f;
        dg[2 * H + j] = g.da_g;
        dg[3 * H + j] = g.da_o;
        dc[j] = g.dc_prev;
        dh[j] = T(0);  // h_{t-1} reaches h_t only through w_hh
      }
    }
  }
};

}  // namespace

RNNFAST_CPU_CELL(Lstm)

}  // namespace rnnfast::cpu
