// LSTM (gates i, f, g, o) and its coupled-gate variant (CIFG: f = 1 - i, gates i, g, o), each with
// optional peepholes: the fused pointwise forward and backward passes, over the shared driver.
#include <type_traits>

#include "cpu/recurrent.h"
#include "cpu/vecmath.h"

namespace rnnfast::cpu {
namespace {

template <bool Coupled>
struct Lstm : DefaultStep {
  static constexpr CellKind kind = Coupled ? CellKind::lstm_cifg : CellKind::lstm;
  // gate blocks: i, f, g, o, or i, g, o when f is 1 - i
  static constexpr int64_t G = Coupled ? 3 : 4, kG = Coupled ? 1 : 2, kO = Coupled ? 2 : 3;

  template <typename T>
  RNNFAST_PASS static void forward(const ForwardStep<T>& s) {
    const int64_t H = s.H, GH = G * H, j0 = s.units.begin, nu = s.units.size();
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
        if (gates) zero_gate_rows<T>(G, H, s.units, gates);
        continue;
      }
      const T* gx = s.gx + n * G * nu;
      const T* gh = s.gh + n * G * nu;
      const T* b = s.bx;
      const T* peep = s.peephole;
      // one simd loop per (gate stores for training, peepholes): each is a compile-time branch
      auto row = [&](auto save, auto peephole) RNNFAST_INLINE {
#pragma omp simd
        for (int64_t u = 0; u < nu; ++u) {
          const int64_t j = j0 + u;
          const T a_f = Coupled ? T(0) : gx[nu + u] + b[H + j] + gh[nu + u];
          T p_i = T(0), p_f = T(0), p_o = T(0);
          if constexpr (decltype(peephole)::value) {
            p_i = peep[j];
            p_f = peep[H + j];
            p_o = peep[2 * H + j];
          }
          const LstmPoint<T> p =
              lstm_variant_point_forward<T, Math<T>, Coupled, decltype(peephole)::value>(
                  gx[u] + b[j] + gh[u], a_f, gx[kG * nu + u] + b[kG * H + j] + gh[kG * nu + u],
                  gx[kO * nu + u] + b[kO * H + j] + gh[kO * nu + u], c_prev[j], p_i, p_f, p_o);
          c[j] = p.c;
          h[j] = p.h;
          if constexpr (decltype(save)::value) {
            gates[j] = p.i;
            if constexpr (!Coupled) gates[H + j] = p.f;
            gates[kG * H + j] = p.g;
            gates[kO * H + j] = p.o;
          }
        }
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (gates)
        peep ? row(yes{}, yes{}) : row(yes{}, no{});
      else
        peep ? row(no{}, yes{}) : row(no{}, no{});
    }
  }

  template <typename T>
  RNNFAST_PASS static void backward(const BackwardStep<T>& s) {
    const int64_t H = s.H, GH = G * H;
    const T* peep = s.peephole;
    T* dpeep = s.dpeephole;
    for (int64_t n = 0; n < s.N; ++n) {
      T* dg = s.dgx + n * GH;
      if (!s.valid(n)) {
        zero_gate_rows<T>(G, H, s.units, dg);
        continue;
      }
      const T* gates = s.gates + n * GH;
      const T* c_prev = s.c_prev + n * H;
      const T* c = s.c + n * H;
      const T* dy = s.dy + n * H;
      T* dh = s.dh + n * H;
      T* dc = s.dc + n * H;
      // the peephole weights' gradients are summed here, row by row, by the thread that owns
      // the units: a fixed order whatever the thread count
      auto row = [&](auto peephole) RNNFAST_INLINE {
        constexpr bool P = decltype(peephole)::value;
#pragma omp simd
        for (int64_t j = s.units.begin; j < s.units.end; ++j) {
          const T i = gates[j], f = Coupled ? T(1) - i : gates[H + j];
          const LstmPointGrad<T> g = lstm_variant_point_backward<T, Math<T>, Coupled, P>(
              i, f, gates[kG * H + j], gates[kO * H + j], c_prev[j], c[j], dh[j] + dy[j], dc[j],
              P ? peep[j] : T(0), P ? peep[H + j] : T(0), P ? peep[2 * H + j] : T(0));
          dg[j] = g.da_i;
          if constexpr (!Coupled) dg[H + j] = g.da_f;
          dg[kG * H + j] = g.da_g;
          dg[kO * H + j] = g.da_o;
          dc[j] = g.dc_prev;
          dh[j] = T(0);  // h_{t-1} reaches h_t only through w_hh
          if constexpr (P) {
            dpeep[j] += g.da_i * c_prev[j];
            if constexpr (!Coupled) dpeep[H + j] += g.da_f * c_prev[j];
            dpeep[2 * H + j] += g.da_o * c[j];
          }
        }
      };
      if (peep)
        row(std::true_type{});
      else
        row(std::false_type{});
    }
  }
};

}  // namespace

RNNFAST_CPU_CELL(Lstm<false>)
RNNFAST_CPU_CELL(Lstm<true>)

}  // namespace rnnfast::cpu
