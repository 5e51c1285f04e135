// Shape conventions and the pointwise gate math of every cell, shared by the CPU and CUDA kernels.
// Everything here is per hidden unit and per batch row, so it compiles for host and device alike.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define RNNFAST_HD __host__ __device__ __forceinline__
#else
// always inlined: the passes' simd loops vectorise only with the point math inside them, and GCC's
// own heuristics stopped inlining it once the passes had enough compile-time variants
#define RNNFAST_HD __attribute__((always_inline)) inline
#endif

namespace rnnfast {

// Shape letters, fixed everywhere: T steps, N batch, C input size, H hidden, G gates.
// Layouts are time-major and row-major: x [T, N, C], y [T, N, H], gates [T, N, G*H] with gate g of
// unit j at column g*H + j, weights exactly as PyTorch lays them out (w_ih [G*H, C], w_hh [G*H,
// H]).
enum class CellKind : int {
  rnn_tanh = 0,
  rnn_relu = 1,
  lstm = 2,
  gru = 3,
  lstm_cifg = 4,         // LSTM with coupled input and forget gates, f = 1 - i: gates i, g, o
  gru_reset_before = 5,  // GRU with r applied to h before the candidate's recurrent product
};

// The cell table: one row per kind, all that the drivers, the reserve layout, the bindings and
// the CUDA code know about a cell besides its own pointwise math (rnnfast/cells.py is the Python
// side). Code outside a cell's own files reads these properties and never tests a kind.
struct CellInfo {
  CellKind kind;
  const char* name;  // as Python names it
  int gates;         // G: w_ih is [G*H, C]
  bool has_c;        // carries a cell state: c0, c_n, dc_n, dc0, and c in the reserve
  bool saves_gates;  // the reserve keeps the post-activation gates (else backward uses h alone)
  // the reset gate multiplies the candidate's recurrent product including b_hn (the GRU as cuDNN
  // and PyTorch define it): that product stays apart from the x side, in the reserve as ghn and
  // in backward as its own gradient
  bool reset_after;
  // r multiplies h_{t-1} before the candidate's recurrent product (Cho et al. 2014): the step has
  // a second product, r * h_{t-1} is kept in the reserve as rh, and W_hn's gradient comes from it
  bool reset_before;
  bool peephole;  // takes the optional w_peephole [3, H] (rows i, f, o: the gates see c)
  // takes the optional w_hr [P, H]: h is the projection (o * tanh(c)) W_hr^T of P < H values
  bool projection;
  // takes the optional layer normalisation (Ba et al. 2016, as Haste's LayerNormLSTM and
  // LayerNormGRU): gains on both products, and with a cell state a gain and bias on c
  bool layer_norm;
  bool gpu;  // the CUDA backend has kernels for it (the others raise there)
  // a candidate that recurrent dropout (Semeniuta et al.) drops: the LSTM's g, the GRU's n
  constexpr bool has_candidate() const { return gates > 1; }
};

inline constexpr CellInfo kCellTable[] = {
    // kind, name, gates, has_c, saves_gates, reset_after, reset_before, peephole, projection,
    // layer_norm, gpu
    {CellKind::rnn_tanh, "rnn_tanh", 1, false, false, false, false, false, false, false, true},
    {CellKind::rnn_relu, "rnn_relu", 1, false, false, false, false, false, false, false, true},
    {CellKind::lstm, "lstm", 4, true, true, false, false, true, true, true, true},
    {CellKind::gru, "gru", 3, false, true, true, false, false, false, true, true},
    {CellKind::lstm_cifg, "lstm_cifg", 3, true, true, false, false, true, true, true, true},
    {CellKind::gru_reset_before, "gru_reset_before", 3, false, true, false, true, false, false,
     false, true},
};

// The row of `kind`. An unknown kind throws: at compile time where the kind is a constant, else
// as std::invalid_argument; nothing falls back to another cell.
constexpr const CellInfo& cell_info(CellKind kind) {
  for (const CellInfo& c : kCellTable)
    if (c.kind == kind) return c;
  throw std::invalid_argument("rnnfast: unknown cell kind");
}

// The row named `name` ("lstm", ...), or std::invalid_argument naming the known cells.
inline const CellInfo& cell_info(std::string_view name) {
  std::string known;
  for (const CellInfo& c : kCellTable) {
    if (name == c.name) return c;
    known += std::string(known.empty() ? "" : ", ") + c.name;
  }
  throw std::invalid_argument("unknown cell '" + std::string(name) + "'; rnnfast has " + known);
}

constexpr int gate_count(CellKind cell) { return cell_info(cell).gates; }

// the most gates a cell of the table has: the size of per-gate arrays
constexpr int kMaxGates = [] {
  int most = 0;
  for (const CellInfo& c : kCellTable) most = c.gates > most ? c.gates : most;
  return most;
}();

// f(std::integral_constant<CellKind, kind>{}) for the table's row of `kind`, turning a run-time
// kind into the compile-time one kernels are instantiated for; throws for a kind the table lacks.
// Every row is instantiated (on the GPU every row marked gpu; the others throw there), so a row
// whose kernels are missing fails to compile or link.
template <bool GpuOnly, class F, size_t... I>
void dispatch_cell_rows(CellKind kind, F&& f, std::index_sequence<I...>) {
  bool found = false;
  (
      [&] {
        if constexpr (!GpuOnly || kCellTable[I].gpu)
          if (kCellTable[I].kind == kind) {
            f(std::integral_constant<CellKind, kCellTable[I].kind>{});
            found = true;
          }
      }(),
      ...);
  if (!found)
    throw std::invalid_argument(GpuOnly ? "rnnfast: this cell has no CUDA kernels yet"
                                        : "rnnfast: unknown cell kind");
}

constexpr size_t kCellRows = sizeof(kCellTable) / sizeof(kCellTable[0]);

template <class F>
void dispatch_cell(CellKind kind, F&& f) {
  dispatch_cell_rows<false>(kind, std::forward<F>(f), std::make_index_sequence<kCellRows>{});
}

// dispatch_cell over the rows the CUDA backend has
template <class F>
void dispatch_gpu_cell(CellKind kind, F&& f) {
  dispatch_cell_rows<true>(kind, std::forward<F>(f), std::make_index_sequence<kCellRows>{});
}

struct Dims {
  int64_t T, N, C, H;
  CellKind cell;
  int64_t P = 0;            // the projection's size (0 < P < H), or 0 without one
  bool layer_norm = false;  // the call normalises the products (and c): cells with layer_norm
  int64_t G() const { return gate_count(cell); }
  int64_t GH() const { return G() * H; }
  // R: the size of h, the recurrent state and the output (P with a projection, else H); w_hh is
  // [G*H, R], h0, h_n and each step of y [N, R], while c stays [N, H]
  int64_t R() const { return P ? P : H; }
};

// The reserve (what a training forward leaves for backward), in elements, laid out back to back:
// - hs [T+1, N, R]: slot 0 is h0, slot t+1 is h after step t (zero where t >= length); y = hs[1:]
// - cs [T+1, N, H], where has_c: c after each step (carried unchanged past a sequence's length)
// - gates [T, N, G*H], where saves_gates: post-activation gates (LSTM i f g o, GRU r z n); the
//   vanilla RNN's derivative comes from h itself
// - ghn [T, N, H], where reset_after: W_hn h + b_hn, the recurrent part of n that r multiplies
// - rh [T, N, H], where reset_before: r * h_{t-1}, what W_hn multiplies
// - m [T+1, N, H], with a projection: slot t+1 is step t's o * tanh(c), what W_hr projects (slot
//   0 unused, so that the slots line up with hs)
// - with layer norm (csrc/cpu/layer_norm.h): ln_x and ln_h [T, N, G*H] the normalised products
//   (before their gains), ln_c [T, N, H] where has_c the normalised c, and ln_rstd [T, N, 3] each
//   row's 1/sqrt(var + eps) of the x product, the h product and c
struct ReserveLayout {
  int64_t hs, cs, gates, ghn, rh, m, ln_x, ln_h, ln_c, ln_rstd, total;  // offsets, total size
};

inline ReserveLayout reserve_layout(const Dims& d) {
  const CellInfo& cell = cell_info(d.cell);
  const int64_t state = (d.T + 1) * d.N * d.H;
  ReserveLayout r{};
  r.hs = 0;
  r.cs = (d.T + 1) * d.N * d.R();
  r.gates = r.cs + (cell.has_c ? state : 0);
  r.ghn = r.gates + (cell.saves_gates ? d.T * d.N * d.GH() : 0);
  r.rh = r.ghn + (cell.reset_after ? d.T * d.N * d.H : 0);
  r.m = r.rh + (cell.reset_before ? d.T * d.N * d.H : 0);
  r.ln_x = r.m + (d.P ? (d.T + 1) * d.N * d.H : 0);
  const int64_t ln_gates = d.layer_norm ? d.T * d.N * d.GH() : 0;
  r.ln_h = r.ln_x + ln_gates;
  r.ln_c = r.ln_h + ln_gates;
  r.ln_rstd = r.ln_c + (d.layer_norm && cell.has_c ? d.T * d.N * d.H : 0);
  r.total = r.ln_rstd + (d.layer_norm ? d.T * d.N * 3 : 0);
  return r;
}

// The transcendental functions the cells use, as a policy so that a backend can swap in its
// own (the CPU's float path uses vectorisable polynomials, csrc/cpu/vecmath.h).
struct StdMath {
  template <typename T>
  static RNNFAST_HD T tanh(T a) {
    return std::tanh(a);
  }
  template <typename T>
  static RNNFAST_HD T sigmoid(T a) {
    return T(1) / (T(1) + std::exp(-a));
  }
};

// ---- LSTM: i, f, g, o -------------------------------------------------------------------------
// a_* are the full pre-activations (x W_ih^T + b_ih + h W_hh^T + b_hh).
template <typename T>
struct LstmPoint {
  T i, f, g, o, c, h;
};

// The LSTM's variants in one template, each flag a compile-time branch (the plain cell's arithmetic
// is exactly the flags-off path). Coupled: f = 1 - i (a_f unused). Peephole: p_i, p_f, p_o weigh
// c_{t-1} into i and f and c_t into o (p_f unused when coupled).
// Dropout: the candidate g enters c scaled by g_scale (recurrent dropout on the candidate,
// Semeniuta et al. 2016: 0 where dropped, 1/(1-p) where kept); the saved g stays unscaled.
template <typename T, class M, bool Coupled, bool Peephole, bool Dropout = false>
RNNFAST_HD LstmPoint<T> lstm_variant_point_forward(T a_i, T a_f, T a_g, T a_o, T c_prev, T p_i,
                                                   T p_f, T p_o, T g_scale = T(1)) {
  LstmPoint<T> p;
  // the peephole terms as explicit fused multiply-adds: the same bits in every build of the pass
  // (training and inference, where the compiler would otherwise contract them differently)
  if constexpr (Peephole) {
    a_i = std::fma(p_i, c_prev, a_i);
    if constexpr (!Coupled) a_f = std::fma(p_f, c_prev, a_f);
  }
  p.i = M::sigmoid(a_i);
  if constexpr (Coupled)
    p.f = T(1) - p.i;
  else
    p.f = M::sigmoid(a_f);
  p.g = M::tanh(a_g);
  // c as an explicit fused multiply-add too: left to the compiler, the training and inference
  // builds of the pass contracted it differently (different bits with a projection)
  p.c = std::fma(p.f, c_prev, p.i * (Dropout ? p.g * g_scale : p.g));
  if constexpr (Peephole) a_o = std::fma(p_o, p.c, a_o);
  p.o = M::sigmoid(a_o);
  p.h = p.o * M::tanh(p.c);
  return p;
}

template <typename T, class M = StdMath>
RNNFAST_HD LstmPoint<T> lstm_point_forward(T a_i, T a_f, T a_g, T a_o, T c_prev) {
  return lstm_variant_point_forward<T, M, false, false>(a_i, a_f, a_g, a_o, c_prev, T(0), T(0),
                                                        T(0));
}

template <typename T>
struct LstmPointGrad {
  T da_i, da_f, da_g, da_o, dc_prev;
};

// The gate gradients from dc, the total gradient reaching c_t (from c_{t+1} and through h_t):
// da_i, da_f, da_g and dc_{t-1}; da_o is the caller's. f is 1 - i when coupled (da_f is then 0).
template <typename T, bool Coupled, bool Peephole, bool Dropout = false>
RNNFAST_HD LstmPointGrad<T> lstm_state_backward(T i, T f, T g, T c_prev, T dc, T p_i, T p_f,
                                                T g_scale = T(1)) {
  LstmPointGrad<T> d;
  const T gs = Dropout ? g * g_scale : g;  // what entered c
  if constexpr (Coupled) {
    d.da_i = dc * (gs - c_prev) * i * (T(1) - i);
    d.da_f = T(0);
  } else {
    d.da_i = dc * gs * i * (T(1) - i);
    d.da_f = dc * c_prev * f * (T(1) - f);
  }
  if constexpr (Dropout)
    d.da_g = dc * i * g_scale * (T(1) - g * g);
  else
    d.da_g = dc * i * (T(1) - g * g);
  d.dc_prev = dc * f;
  if constexpr (Peephole) {
    d.dc_prev += d.da_i * p_i;
    if constexpr (!Coupled) d.dc_prev += d.da_f * p_f;
  }
  return d;
}

// dh and dc are the total gradients reaching h_t and c_t. The peephole weights' gradients are
// da_i * c_prev, da_f * c_prev and da_o * c.
template <typename T, class M, bool Coupled, bool Peephole, bool Dropout = false>
RNNFAST_HD LstmPointGrad<T> lstm_variant_point_backward(T i, T f, T g, T o, T c_prev, T c, T dh,
                                                        T dc, T p_i, T p_f, T p_o,
                                                        T g_scale = T(1)) {
  const T tc = M::tanh(c);
  const T da_o = dh * tc * o * (T(1) - o);
  dc += dh * o * (T(1) - tc * tc);
  if constexpr (Peephole) dc += da_o * p_o;
  LstmPointGrad<T> d =
      lstm_state_backward<T, Coupled, Peephole, Dropout>(i, f, g, c_prev, dc, p_i, p_f, g_scale);
  d.da_o = da_o;
  return d;
}

template <typename T, class M = StdMath>
RNNFAST_HD LstmPointGrad<T> lstm_point_backward(T i, T f, T g, T o, T c_prev, T c, T dh, T dc) {
  return lstm_variant_point_backward<T, M, false, false>(i, f, g, o, c_prev, c, dh, dc, T(0), T(0),
                                                         T(0));
}

// ---- GRU: r, z, n; the reset gate multiplies the recurrent product (cuDNN and PyTorch) ------
// x_* = x W_i*^T + b_i*, hh_* = h W_h*^T + b_h* (hh, not h: h_n is the final state elsewhere).
template <typename T>
struct GruPoint {
  T r, z, n, h;
};

// Dropout: the candidate n enters h scaled by n_scale (as the LSTM's g); the saved n is unscaled
template <typename T, class M = StdMath, bool Dropout = false>
RNNFAST_HD GruPoint<T> gru_point_forward(T x_r, T x_z, T x_n, T hh_r, T hh_z, T hh_n, T h_prev,
                                         T n_scale = T(1)) {
  GruPoint<T> p;
  p.r = M::sigmoid(x_r + hh_r);
  p.z = M::sigmoid(x_z + hh_z);
  p.n = M::tanh(x_n + p.r * hh_n);
  p.h = (T(1) - p.z) * (Dropout ? p.n * n_scale : p.n) + p.z * h_prev;
  return p;
}

template <typename T>
struct GruPointGrad {
  T da_r, da_z, dx_n, dhh_n, dh_prev;  // dx_n: to x_n; dhh_n: to hh_n (= dx_n * r)
};

template <typename T, bool Dropout = false>
RNNFAST_HD GruPointGrad<T> gru_point_backward(T r, T z, T n, T hh_n, T h_prev, T dh,
                                              T n_scale = T(1)) {
  GruPointGrad<T> d;
  const T dn = (Dropout ? dh * n_scale : dh) * (T(1) - z) * (T(1) - n * n);
  d.da_z = dh * (h_prev - (Dropout ? n * n_scale : n)) * z * (T(1) - z);
  d.da_r = dn * hh_n * r * (T(1) - r);
  d.dx_n = dn;
  d.dhh_n = dn * r;
  d.dh_prev = dh * z;
  return d;
}

// ---- GRU with the reset gate before the product (Cho et al. 2014) ---------------------------
// In two phases around the second product: r and z first (r * h_{t-1} is what W_hn multiplies),
// then n = tanh(x_n + (r * h_{t-1}) W_hn^T + b_hn) and h. Backward mirrors it: da_z and da_n,
// then, once d(r * h) = da_n W_hn is known, da_r and the rest of dh_{t-1}.
template <typename T>
struct GruCandidate {
  T n, h;
};

// a_n: the candidate's whole pre-activation, x and (r * h_{t-1}) sides with both biases
template <typename T, class M = StdMath, bool Dropout = false>
RNNFAST_HD GruCandidate<T> gru_reset_before_candidate(T a_n, T z, T h_prev, T n_scale = T(1)) {
  GruCandidate<T> p;
  p.n = M::tanh(a_n);
  p.h = (T(1) - z) * (Dropout ? p.n * n_scale : p.n) + z * h_prev;
  return p;
}

template <typename T>
struct GruResetBeforeGrad {
  T da_z, da_n, dh_prev;  // dh_prev: the part that bypasses both products (dh * z)
};

template <typename T, bool Dropout = false>
RNNFAST_HD GruResetBeforeGrad<T> gru_reset_before_backward(T z, T n, T h_prev, T dh,
                                                           T n_scale = T(1)) {
  GruResetBeforeGrad<T> d;
  d.da_n = (Dropout ? dh * n_scale : dh) * (T(1) - z) * (T(1) - n * n);
  d.da_z = dh * (h_prev - (Dropout ? n * n_scale : n)) * z * (T(1) - z);
  d.dh_prev = dh * z;
  return d;
}

// the second phase, from drh = d(r * h_{t-1}): da_r, and what it adds to dh_{t-1}
template <typename T>
struct GruResetGateGrad {
  T da_r, dh_prev;
};

template <typename T>
RNNFAST_HD GruResetGateGrad<T> gru_reset_gate_backward(T r, T h_prev, T drh) {
  return {drh * h_prev * r * (T(1) - r), drh * r};
}

// ---- vanilla RNN -------------------------------------------------------------------------------
template <typename T, class M = StdMath>
RNNFAST_HD T rnn_point_forward(T a, bool relu) {
  // a NaN pre-activation stays NaN, as in torch.relu
  return relu ? (a > T(0) || a != a ? a : T(0)) : M::tanh(a);
}

// derivative through the activation, from its output h
template <typename T>
RNNFAST_HD T rnn_point_backward(T h, T dh, bool relu) {
  return relu ? (h > T(0) || h != h ? dh : T(0)) : dh * (T(1) - h * h);
}

}  // namespace rnnfast
