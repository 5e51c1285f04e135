// GRU (gates r, z, n; r multiplies the recurrent product as in cuDNN and PyTorch), and the GRU
// with r applied to h before the product (Cho et al. 2014), which owns its step: the fused
// pointwise passes, over the shared driver.
#include <type_traits>

#include "cpu/recurrent.h"
#include "cpu/vecmath.h"

namespace rnnfast::cpu {
namespace {

struct Gru : DefaultStep {
  static constexpr CellKind kind = CellKind::gru;

  // With layer norm (csrc/cpu/layer_norm.h) each product is normalised before the pass, a barrier
  // for the row statistics: forward, the product, its block sums, a barrier, the normalised
  // products, the pass, a barrier; backward, the pass, the block sums of its gradients, a barrier,
  // the products' gradients, a barrier, the product into dh_{t-1}.
  template <class Cell, typename T>
  static void forward_step(const ForwardThread<T>& th, ForwardStep<T>& s) {
    if (!s.ln) return DefaultStep::forward_step<Cell, T>(th, s);
    (*th.product[0])(s.N, s.h_product, s.R, th.gh, th.width, Accumulate::no);
    s.gh = th.gh;
    run_pass<&ln_product_sums<3, T>>(th.isa, s);
    team_barrier(th.team);  // every block's sums
    run_pass<&ln_normalise_products<3, T>>(th.isa, s);
    ForwardStep<T> pass = s;
    pass.gx = s.ln->gx;
    run_pass<&Cell::template forward<T>>(th.isa, pass);
    after_pass(th.isa, s);
    team_barrier(th.team);  // h_t is complete
  }

  template <class Cell, typename T>
  static void backward_step(const BackwardThread<T>& th, const BackwardStep<T>& s) {
    if (!s.ln) return DefaultStep::backward_step<Cell, T>(th, s);
    run_pass<&Cell::template backward<T>>(th.isa, s);
    sum_bias_rows(th, s);
    run_pass<&ln_gradient_sums<3, T>>(th.isa, s);
    team_barrier(th.team);  // every block's sums
    run_pass<&ln_product_gradients<3, T>>(th.isa, s);
    team_barrier(th.team);  // every unit's gate gradients
    (*th.product[0])(s.N, s.dgh, 3 * s.H, s.dh_product + th.units.begin, s.R, Accumulate::yes);
  }

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
      const T* drop = s.drop ? s.drop + n * nu : nullptr;
      auto row = [&](auto save, auto dropout) RNNFAST_INLINE {
        constexpr bool D = decltype(dropout)::value;
#pragma omp simd
        for (int64_t u = 0; u < nu; ++u) {
          const int64_t j = j0 + u;
          const T hh_n = gh[2 * nu + u] + s.bhn[j];
          const GruPoint<T> p = gru_point_forward<T, Math<T>, D>(
              gx[u] + b[j], gx[nu + u] + b[H + j], gx[2 * nu + u] + b[2 * H + j], gh[u], gh[nu + u],
              hh_n, h_prev[j], D ? drop[u] : T(1));
          h[j] = p.h;
          if constexpr (decltype(save)::value) {
            gates[j] = p.r;
            gates[H + j] = p.z;
            gates[2 * H + j] = p.n;
            ghn[j] = hh_n;
          }
        }
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (gates)
        drop ? row(yes{}, yes{}) : row(yes{}, no{});
      else
        drop ? row(no{}, yes{}) : row(no{}, no{});
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
      const T* drop = s.drop ? s.drop + n * s.units.size() : nullptr;
      auto row = [&](auto dropout) RNNFAST_INLINE {
        constexpr bool D = decltype(dropout)::value;
#pragma omp simd
        for (int64_t j = s.units.begin; j < s.units.end; ++j) {
          const GruPointGrad<T> g =
              gru_point_backward<T, D>(gates[j], gates[H + j], gates[2 * H + j], ghn[j], h_prev[j],
                                       dh[j] + dy[j], D ? drop[j - s.units.begin] : T(1));
          dgx[j] = dgh[j] = g.da_r;
          dgx[H + j] = dgh[H + j] = g.da_z;
          dgx[2 * H + j] = g.dx_n;
          dgh[2 * H + j] = g.dhh_n;
          dh[j] = g.dh_prev;
        }
      };
      drop ? row(std::true_type{}) : row(std::false_type{});
    }
  }
};

// n = tanh(x W_in^T + b_in + (r * h_{t-1}) W_hn^T + b_hn): the candidate's product needs every
// unit's r, so a step is two products with a barrier between them. Forward: h_{t-1} onto the r
// and z columns, the gate pass (r, z, r * h_{t-1}), a barrier, r * h_{t-1} onto the n columns, the
// candidate pass, a barrier. Backward mirrors it. All biases are plain sums (folded into bx).
struct GruResetBefore : DefaultStep {
  static constexpr CellKind kind = CellKind::gru_reset_before;
  static constexpr bool kDefaultWeightGradients = false;  // W_hn's gradient reads r * h_{t-1}

  template <typename T>
  static void forward_products(const Dims& d, const ForwardIO<T>& io, const ForwardThread<T>& th,
                               StepProducts<T>& out) {
    const int64_t H = d.H, nu = th.units.size();
    out[0].emplace(io.w_hh + th.units.begin * H, H, 2 * nu, H, WeightsBy::row, OutputBlocks{nu, H},
                   d.T * d.N, io.bf16);
    out[1].emplace(io.w_hh + (2 * H + th.units.begin) * H, H, nu, H, WeightsBy::row, OutputBlocks{},
                   d.T * d.N, io.bf16);
  }

  template <typename T>
  static void backward_products(const Dims& d, const BackwardIO<T>& io, const BackwardThread<T>& th,
                                StepProducts<T>& out) {
    const int64_t H = d.H, nu = th.units.size();
    out[0].emplace(io.w_hh + th.units.begin, H, nu, 2 * H, WeightsBy::column, OutputBlocks{},
                   d.T * d.N, io.bf16);
    out[1].emplace(io.w_hh + 2 * H * H + th.units.begin, H, nu, H, WeightsBy::column,
                   OutputBlocks{}, d.T * d.N, io.bf16);
  }

  template <class Cell, typename T>
  static void forward_step(const ForwardThread<T>& th, ForwardStep<T>& s) {
    const int64_t nu = th.units.size();
    (*th.product[0])(s.N, s.h_product, s.H, th.gh, th.width, Accumulate::no);
    s.gh = th.gh;
    run_pass<&Cell::template gates_forward<T>>(th.isa, s);
    team_barrier(th.team);  // r * h_{t-1} is complete
    (*th.product[1])(s.N, s.rh, s.H, th.gh + 2 * nu, th.width, Accumulate::no);
    run_pass<&Cell::template candidate_forward<T>>(th.isa, s);
    after_pass(th.isa, s);
    team_barrier(th.team);  // h_t is complete
  }

  template <class Cell, typename T>
  static void backward_step(const BackwardThread<T>& th, const BackwardStep<T>& s) {
    const int64_t GH = 3 * s.H, nu = th.units.size();
    run_pass<&Cell::template candidate_backward<T>>(th.isa, s);
    team_barrier(th.team);  // every unit's da_n
    (*th.product[1])(s.N, s.dgx + 2 * s.H, GH, s.drh, nu, Accumulate::no);
    run_pass<&Cell::template gates_backward<T>>(th.isa, s);
    sum_bias_rows(th, s);
    team_barrier(th.team);  // every unit's da_r and da_z
    (*th.product[0])(s.N, s.dgx, GH, s.dh_product + th.units.begin, s.H, Accumulate::yes);
  }

  // W_hr and W_hz multiply h_{t-1}, W_hn multiplies r * h_{t-1}
  template <typename T>
  static void weight_gradients(const Dims& d, const BackwardIO<T>& io, const T* dgx, const T*,
                               const T* hs, const T*) {
    input_gradients(d, io, dgx);
    dw_hh_rows(d, io.bf16, dgx, hs, 0, 2 * d.H, io.dw_hh);
    dw_hh_rows(d, io.bf16, dgx, io.reserve + reserve_layout(d).rh, 2 * d.H, d.H, io.dw_hh);
  }

  // r, z and r * h_{t-1}; z waits in h_t's slot (this thread's units, read by no one else until
  // the step's last barrier) for the candidate pass, which overwrites it with h_t
  template <typename T>
  RNNFAST_PASS static void gates_forward(const ForwardStep<T>& s) {
    const int64_t H = s.H, GH = 3 * H, j0 = s.units.begin, nu = s.units.size();
    for (int64_t n = 0; n < s.N; ++n) {
      T* h = s.h + n * H;
      T* rh = s.rh + n * H;
      T* gates = s.gates ? s.gates + n * GH : nullptr;
      if (!s.valid(n)) {
        std::fill(h + j0, h + s.units.end, T(0));
        std::fill(rh + j0, rh + s.units.end, T(0));  // the reserve's rh feeds dW_hn: finite
        if (gates) zero_gate_rows<T>(3, H, s.units, gates);
        continue;
      }
      const T* gx = s.gx + n * 3 * nu;
      const T* gh = s.gh + n * 3 * nu;
      const T* b = s.bx;
      const T* h_in = s.h_product + n * H;  // h_{t-1}, or its variational-dropout copy
#pragma omp simd
      for (int64_t u = 0; u < nu; ++u) {
        const int64_t j = j0 + u;
        const T r = Math<T>::sigmoid(gx[u] + b[j] + gh[u]);
        const T z = Math<T>::sigmoid(gx[nu + u] + b[H + j] + gh[nu + u]);
        rh[j] = r * h_in[j];
        h[j] = z;
        if (gates) {
          gates[j] = r;
          gates[H + j] = z;
        }
      }
    }
  }

  template <typename T>
  RNNFAST_PASS static void candidate_forward(const ForwardStep<T>& s) {
    const int64_t H = s.H, GH = 3 * H, j0 = s.units.begin, nu = s.units.size();
    for (int64_t n = 0; n < s.N; ++n) {
      if (!s.valid(n)) continue;
      T* h = s.h + n * H;
      T* gates = s.gates ? s.gates + n * GH : nullptr;
      const T* gx = s.gx + n * 3 * nu;
      const T* gh = s.gh + n * 3 * nu;
      const T* b = s.bx;
      const T* h_prev = s.h_prev + n * H;
      const T* drop = s.drop ? s.drop + n * nu : nullptr;
      auto row = [&](auto dropout) RNNFAST_INLINE {
        constexpr bool D = decltype(dropout)::value;
#pragma omp simd
        for (int64_t u = 0; u < nu; ++u) {
          const int64_t j = j0 + u;
          const GruCandidate<T> p = gru_reset_before_candidate<T, Math<T>, D>(
              gx[2 * nu + u] + b[2 * H + j] + gh[2 * nu + u], h[j], h_prev[j], D ? drop[u] : T(1));
          h[j] = p.h;
          if (gates) gates[2 * H + j] = p.n;
        }
      };
      drop ? row(std::true_type{}) : row(std::false_type{});
    }
  }

  // da_z and da_n, and the part of dh_{t-1} through z; rows past their length pass dh on
  template <typename T>
  RNNFAST_PASS static void candidate_backward(const BackwardStep<T>& s) {
    const int64_t H = s.H, GH = 3 * H;
    for (int64_t n = 0; n < s.N; ++n) {
      T* dg = s.dgx + n * GH;
      if (!s.valid(n)) {
        zero_gate_rows<T>(3, H, s.units, dg);
        continue;
      }
      const T* gates = s.gates + n * GH;
      const T* h_prev = s.h_prev + n * H;
      const T* dy = s.dy + n * H;
      T* dh = s.dh + n * H;
      const T* drop = s.drop ? s.drop + n * s.units.size() : nullptr;
      auto row = [&](auto dropout) RNNFAST_INLINE {
        constexpr bool D = decltype(dropout)::value;
#pragma omp simd
        for (int64_t j = s.units.begin; j < s.units.end; ++j) {
          const GruResetBeforeGrad<T> g =
              gru_reset_before_backward<T, D>(gates[H + j], gates[2 * H + j], h_prev[j],
                                              dh[j] + dy[j], D ? drop[j - s.units.begin] : T(1));
          dg[H + j] = g.da_z;
          dg[2 * H + j] = g.da_n;
          dh[j] = g.dh_prev;
        }
      };
      drop ? row(std::true_type{}) : row(std::false_type{});
    }
  }

  // from this thread's columns of d(r * h_{t-1}) = da_n W_hn: da_r and the rest of dh_{t-1}
  template <typename T>
  RNNFAST_PASS static void gates_backward(const BackwardStep<T>& s) {
    const int64_t H = s.H, GH = 3 * H, j0 = s.units.begin, nu = s.units.size();
    for (int64_t n = 0; n < s.N; ++n) {
      if (!s.valid(n)) continue;
      T* dg = s.dgx + n * GH;
      const T* r = s.gates + n * GH;
      const T* h_in = s.h_product + n * H;  // what r multiplied, and where its gradient goes
      const T* drh = s.drh + n * nu;
      T* dh = s.dh_product + n * H;
#pragma omp simd
      for (int64_t u = 0; u < nu; ++u) {
        const int64_t j = j0 + u;
        const GruResetGateGrad<T> g = gru_reset_gate_backward(r[j], h_in[j], drh[u]);
        dg[j] = g.da_r;
        dh[j] += g.dh_prev;
      }
    }
  }
};

}  // namespace

RNNFAST_CPU_CELL(Gru)
RNNFAST_CPU_CELL(GruResetBefore)

}  // namespace rnnfast::cpu
