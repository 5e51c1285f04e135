// LSTM (gates i, f, g, o) and its coupled-gate variant (CIFG: f = 1 - i, gates i, g, o), each with
// optional peepholes and an optional projection (LSTMP: h = (o * tanh(c)) W_hr^T, P < H values):
// the fused pointwise forward and backward passes, and the projected step, over the shared driver.
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

  // With a projection the step has a second product: the pass writes m = o * tanh(c) for the
  // thread's units, a barrier, then each thread projects m onto its own columns of h (of P), a
  // barrier. Backward: h_t's total gradient for its columns, a barrier, dm = dh W_hr for its
  // units, the pass, a barrier, dh_{t-1} for its columns.
  template <typename T>
  static void forward_products(const Dims& d, const ForwardIO<T>& io, const ForwardThread<T>& th,
                               StepProducts<T>& out) {
    DefaultStep::forward_products(d, io, th, out);
    if (d.P)
      out[1].emplace(io.w_hr + th.state_cols.begin * d.H, d.H, th.state_cols.size(), d.H,
                     WeightsBy::row, OutputBlocks{}, d.T * d.N, io.bf16);
  }

  template <typename T>
  static void backward_products(const Dims& d, const BackwardIO<T>& io, const BackwardThread<T>& th,
                                StepProducts<T>& out) {
    if (!d.P) return DefaultStep::backward_products(d, io, th, out);
    out[0].emplace(io.w_hh + th.state_cols.begin, d.P, th.state_cols.size(), G * d.H,
                   WeightsBy::column, OutputBlocks{}, d.T * d.N, io.bf16);
    out[1].emplace(io.w_hr + th.units.begin, d.H, th.units.size(), d.P, WeightsBy::column,
                   OutputBlocks{}, d.T * d.N, io.bf16);
  }

  // With layer norm (csrc/cpu/layer_norm.h; not with a projection): forward, the product, the
  // block sums of both products, a barrier, the pass over the normalised products (the gates and
  // c), c's block sums, a barrier, h = o * tanh(LN(c) * gamma_c + beta_c), a barrier. Backward:
  // the way back from h to LN(c) and its block sums, a barrier, the rest of the pass and the
  // products' block sums, a barrier, the products' gradients, a barrier, the product.
  template <class Cell, typename T>
  static void layer_norm_forward_step(const ForwardThread<T>& th, ForwardStep<T>& s) {
    const LayerNormStep<T>& ln = *s.ln;
    (*th.product[0])(s.N, s.h_product, s.R, th.gh, th.width, Accumulate::no);
    s.gh = th.gh;
    run_pass<&ln_product_sums<G, T>>(th.isa, s);
    team_barrier(th.team);  // every block's sums of the products
    run_pass<&ln_normalise_products<G, T>>(th.isa, s);
    ForwardStep<T> pass = s;
    pass.gx = ln.gx;
    if (!pass.gates) pass.gates = ln.gates;
    run_pass<&Cell::template forward<T>>(th.isa, pass);  // its h is replaced below
    run_pass<&Cell::template layer_norm_state_sums<T>>(th.isa, pass);
    team_barrier(th.team);  // every block's sums of c
    run_pass<&Cell::template layer_norm_output<T>>(th.isa, pass);
    after_pass(th.isa, s);
    team_barrier(th.team);  // h_t is complete
  }

  // each valid row's block sums of the thread's units of c
  template <typename T>
  RNNFAST_PASS static void layer_norm_state_sums(const ForwardStep<T>& s) {
    const LnPartials& p = s.ln->partials;
    for (int64_t n = 0; n < s.N; ++n)
      if (s.valid(n))
        ln_block_sums(1, s.H, s.units, s.c + n * s.H + s.units.begin, 0, p.at(n, kLnC),
                      p.at(n, kLnC + 1));
  }

  // h = o * tanh(LN(c) * gamma_c + beta_c) for the valid rows (the pass wrote the padded ones)
  template <typename T>
  RNNFAST_PASS static void layer_norm_output(const ForwardStep<T>& s) {
    const LayerNormStep<T>& ln = *s.ln;
    const int64_t H = s.H, blocks = ln_blocks(H);
    for (int64_t n = 0; n < s.N; ++n) {
      if (!s.valid(n)) continue;
      const LnMoments m =
          ln_moments(ln.partials.at(n, kLnC), ln.partials.at(n, kLnC + 1), blocks, H);
      const T mean = T(m.mean), rstd = T(m.rstd);
      const T* c = s.c + n * H;
      const T* o = s.gates + n * G * H + kO * H;
      T* h = s.h + n * H;
      T* c_hat = ln.c_hat ? ln.c_hat + n * H : nullptr;
      auto row = [&](auto save) RNNFAST_INLINE {
#pragma omp simd
        for (int64_t j = s.units.begin; j < s.units.end; ++j) {
          const T hat = (c[j] - mean) * rstd;
          if constexpr (decltype(save)::value) c_hat[j] = hat;
          h[j] = o[j] * Math<T>::tanh(hat * ln.gamma_c[j] + ln.beta_c[j]);
        }
      };
      c_hat ? row(std::true_type{}) : row(std::false_type{});
      if (ln.rstd && s.units.begin == 0) ln.rstd[n * 3 + 2] = rstd;
    }
  }

  template <class Cell, typename T>
  static void layer_norm_backward_step(const BackwardThread<T>& th, const BackwardStep<T>& s) {
    run_pass<&Cell::template layer_norm_output_backward<T>>(th.isa, s);
    team_barrier(th.team);  // every block's sums of the gradient of LN(c)
    run_pass<&Cell::template layer_norm_state_backward<T>>(th.isa, s);
    sum_bias_rows(th, s);
    run_pass<&ln_gradient_sums<G, T>>(th.isa, s);
    team_barrier(th.team);  // every block's sums of the products' gradients
    run_pass<&ln_product_gradients<G, T>>(th.isa, s);
    team_barrier(th.team);  // every unit's gate gradients
    (*th.product[0])(s.N, s.dgh, G* s.H, s.dh_product + th.units.begin, s.R, Accumulate::yes);
  }

  // From h_t's gradient: da_o (into dgx), the gradient reaching LN(c) * gamma_c + beta_c (the
  // gain's and bias's gradients from it), and its block sums for the way back to c.
  template <typename T>
  RNNFAST_PASS static void layer_norm_output_backward(const BackwardStep<T>& s) {
    const LayerNormStep<T>& ln = *s.ln;
    const int64_t H = s.H, GH = G * H;
    for (int64_t n = 0; n < s.N; ++n) {
      T* dg = s.dgx + n * GH;
      if (!s.valid(n)) {
        zero_gate_rows<T>(G, H, s.units, dg);
        zero_gate_rows<T>(G, H, s.units, s.dgh + n * GH);
        continue;
      }
      const T* o = s.gates + n * GH + kO * H;
      const T* c_hat = ln.c_hat + n * H;
      const T* dy = s.dy + n * H;
      T* dh = s.dh + n * H;
      T* dc_hat = ln.dc_hat + n * H;
#pragma omp simd
      for (int64_t j = s.units.begin; j < s.units.end; ++j) {
        const T tc = Math<T>::tanh(c_hat[j] * ln.gamma_c[j] + ln.beta_c[j]);
        const T dht = dh[j] + dy[j];
        const T d_out = dht * o[j] * (T(1) - tc * tc);  // reaching LN(c) * gamma_c + beta_c
        dg[kO * H + j] = dht * tc * o[j] * (T(1) - o[j]);
        dc_hat[j] = d_out;
        ln.dgamma_c[j] += d_out * c_hat[j];
        ln.dbeta_c[j] += d_out;
        dh[j] = T(0);  // h_{t-1} reaches h_t only through w_hh
      }
      ln_backward_sums(1, H, s.units, ln.gamma_c, c_hat, dc_hat, ln.partials.at(n, kLnC),
                       ln.partials.at(n, kLnC + 1));
    }
  }

  // After the barrier: c's total gradient (from c_{t+1}, through LN(c), and with peepholes
  // through o), the other gates' gradients, dc_{t-1}; dgh takes the same gate gradients as dgx.
  template <typename T>
  RNNFAST_PASS static void layer_norm_state_backward(const BackwardStep<T>& s) {
    const LayerNormStep<T>& ln = *s.ln;
    const int64_t H = s.H, GH = G * H, blocks = ln_blocks(H);
    const T* peep = s.peephole;
    T* dpeep = s.dpeephole;
    for (int64_t n = 0; n < s.N; ++n) {
      if (!s.valid(n)) continue;
      const LnPartials& p = ln.partials;
      T* dc_ln = ln.dc_hat + n * H;
      ln_backward_row(1, H, s.units, ln_row_sum(p.at(n, kLnC), blocks),
                      ln_row_sum(p.at(n, kLnC + 1), blocks), double(ln.rstd[n * 3 + 2]), ln.gamma_c,
                      ln.c_hat + n * H, dc_ln);
      const T* gates = s.gates + n * GH;
      const T* c_prev = s.c_prev + n * H;
      const T* c = s.c + n * H;
      T* dc = s.dc + n * H;
      T* dg = s.dgx + n * GH;
      T* dgh = s.dgh + n * GH;
      const T* drop = s.drop ? s.drop + n * s.units.size() : nullptr;
      auto row = [&](auto peephole, auto dropout) RNNFAST_INLINE {
        constexpr bool P = decltype(peephole)::value, D = decltype(dropout)::value;
#pragma omp simd
        for (int64_t j = s.units.begin; j < s.units.end; ++j) {
          const T i = gates[j], f = Coupled ? T(1) - i : gates[H + j];
          const T da_o = dg[kO * H + j];
          T dct = dc[j] + dc_ln[j];
          if constexpr (P) dct += da_o * peep[2 * H + j];
          const LstmPointGrad<T> g = lstm_state_backward<T, Coupled, P, D>(
              i, f, gates[kG * H + j], c_prev[j], dct, P ? peep[j] : T(0), P ? peep[H + j] : T(0),
              D ? drop[j - s.units.begin] : T(1));
          dg[j] = dgh[j] = g.da_i;
          if constexpr (!Coupled) dg[H + j] = dgh[H + j] = g.da_f;
          dg[kG * H + j] = dgh[kG * H + j] = g.da_g;
          dgh[kO * H + j] = da_o;
          dc[j] = g.dc_prev;
          if constexpr (P) {
            dpeep[j] += g.da_i * c_prev[j];
            if constexpr (!Coupled) dpeep[H + j] += g.da_f * c_prev[j];
            dpeep[2 * H + j] += da_o * c[j];
          }
        }
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (peep)
        drop ? row(yes{}, yes{}) : row(yes{}, no{});
      else
        drop ? row(no{}, yes{}) : row(no{}, no{});
    }
  }

  template <class Cell, typename T>
  static void forward_step(const ForwardThread<T>& th, ForwardStep<T>& s) {
    if (s.ln) return layer_norm_forward_step<Cell, T>(th, s);
    if (!th.product[1]) return DefaultStep::forward_step<Cell, T>(th, s);
    step_product(th, s);
    ForwardStep<T> pass = s;
    pass.gh = th.gh;
    pass.h = s.m;  // zero past a row's length, so that its h is too
    run_pass<&Cell::template forward<T>>(th.isa, pass);
    team_barrier(th.team);  // m is complete
    (*th.product[1])(s.N, s.m, s.H, s.h + th.state_cols.begin, s.R, Accumulate::no);
    team_barrier(th.team);  // h_t is complete
  }

  template <class Cell, typename T>
  static void backward_step(const BackwardThread<T>& th, const BackwardStep<T>& s) {
    if (s.ln) return layer_norm_backward_step<Cell, T>(th, s);
    if (!th.product[1]) return DefaultStep::backward_step<Cell, T>(th, s);
    const int64_t R = s.R;
    // h_t's total gradient for a row in its length (kept for dw_hr; dh then restarts at zero
    // for the product into dh_{t-1}); a padded row keeps its dh and adds nothing
    for (int64_t n = 0; n < s.N; ++n) {
      T* dh = s.dh + n * R;
      T* total = s.dh_seq + n * R;
      const T* dy = s.dy + n * R;
      const bool valid = s.valid(n);
      for (int64_t j = th.state_cols.begin; j < th.state_cols.end; ++j) {
        total[j] = valid ? dh[j] + dy[j] : T(0);
        if (valid) dh[j] = T(0);
      }
    }
    team_barrier(th.team);  // h_t's gradient is complete
    (*th.product[1])(s.N, s.dh_seq, R, s.dm + th.units.begin, s.H, Accumulate::no);
    BackwardStep<T> pass = s;
    pass.dh = s.dm;
    pass.dy = s.zeros;
    run_pass<&Cell::template backward<T>>(th.isa, pass);
    sum_bias_rows(th, pass);
    team_barrier(th.team);  // every unit's gate gradients
    (*th.product[0])(s.N, s.dgh, G* s.H, s.dh_product + th.state_cols.begin, R, Accumulate::yes);
  }

  // and dw_hr = sum over steps of h_t's gradient times m_t
  template <typename T>
  static void weight_gradients(const Dims& d, const BackwardIO<T>& io, const T* dgx, const T* dgh,
                               const T* hs, const T* dh_seq) {
    DefaultStep::weight_gradients(d, io, dgx, dgh, hs, dh_seq);
    if (d.P)
      gradient_product<T>(io.bf16, true, d.P, d.H, d.T * d.N, dh_seq, d.P,
                          io.reserve + reserve_layout(d).m + d.N * d.H, d.H, io.dw_hr, d.H);
  }

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
      // gx is null where the step's product took x_t too (gh then holds both)
      const T* gx = s.gx ? s.gx + n * G * nu : nullptr;
      const T* gh = s.gh + n * G * nu;
      const T* b = s.bx;
      const T* peep = s.peephole;
      // one simd loop per (gate stores for training, peepholes, dropout, a separate x product):
      // each is a compile-time branch
      const T* drop = s.drop ? s.drop + n * nu : nullptr;
      auto row = [&](auto save, auto peephole, auto dropout, auto x_apart) RNNFAST_INLINE {
        constexpr bool D = decltype(dropout)::value;
        // gate g's pre-activation at unit u (j = j0 + u)
        auto pre = [&](int64_t g, int64_t u, int64_t j) RNNFAST_INLINE {
          if constexpr (decltype(x_apart)::value)
            return gx[g * nu + u] + b[g * H + j] + gh[g * nu + u];
          else
            return b[g * H + j] + gh[g * nu + u];
        };
#pragma omp simd
        for (int64_t u = 0; u < nu; ++u) {
          const int64_t j = j0 + u;
          const T a_f = Coupled ? T(0) : pre(1, u, j);
          T p_i = T(0), p_f = T(0), p_o = T(0);
          if constexpr (decltype(peephole)::value) {
            p_i = peep[j];
            p_f = peep[H + j];
            p_o = peep[2 * H + j];
          }
          const LstmPoint<T> p =
              lstm_variant_point_forward<T, Math<T>, Coupled, decltype(peephole)::value, D>(
                  pre(0, u, j), a_f, pre(kG, u, j), pre(kO, u, j), c_prev[j], p_i, p_f, p_o,
                  D ? drop[u] : T(1));
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
      auto rows = [&](auto save, auto peephole) RNNFAST_INLINE {
        if (drop)
          gx ? row(save, peephole, yes{}, yes{}) : row(save, peephole, yes{}, no{});
        else
          gx ? row(save, peephole, no{}, yes{}) : row(save, peephole, no{}, no{});
      };
      if (gates)
        peep ? rows(yes{}, yes{}) : rows(yes{}, no{});
      else
        peep ? rows(no{}, yes{}) : rows(no{}, no{});
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
      const T* drop = s.drop ? s.drop + n * s.units.size() : nullptr;
      auto row = [&](auto peephole, auto dropout) RNNFAST_INLINE {
        constexpr bool P = decltype(peephole)::value, D = decltype(dropout)::value;
#pragma omp simd
        for (int64_t j = s.units.begin; j < s.units.end; ++j) {
          const T i = gates[j], f = Coupled ? T(1) - i : gates[H + j];
          const LstmPointGrad<T> g = lstm_variant_point_backward<T, Math<T>, Coupled, P, D>(
              i, f, gates[kG * H + j], gates[kO * H + j], c_prev[j], c[j], dh[j] + dy[j], dc[j],
              P ? peep[j] : T(0), P ? peep[H + j] : T(0), P ? peep[2 * H + j] : T(0),
              D ? drop[j - s.units.begin] : T(1));
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
      using yes = std::true_type;
      using no = std::false_type;
      if (peep)
        drop ? row(yes{}, yes{}) : row(yes{}, no{});
      else
        drop ? row(no{}, yes{}) : row(no{}, no{});
    }
  }
};

}  // namespace

RNNFAST_CPU_CELL(Lstm<false>)
RNNFAST_CPU_CELL(Lstm<true>)

}  // namespace rnnfast::cpu
