// Layer normalisation inside the recurrent step (Ba, Kiros and Hinton 2016; as Haste's
// LayerNormLSTM and LayerNormGRU): every row of each product (x W_ih^T and h W_hh^T, over all G*H
// gate columns) and the LSTM's c (over H) is normalised over its features with the mean and the
// biased variance, eps 1e-5 (torch.nn.functional.layer_norm), then scaled by its gain.
// The x product of every step is known before the recurrence: it is normalised a chunk of steps
// ahead, each row whole by one thread (ln_normalise_rows), and its backward runs after the loop
// the same way. The h product and c exist only mid-step, and a row's columns belong to several
// threads (each owns a slice of the units), so their statistics are sums over fixed blocks of
// kLnBlock units: the thread that owns a block writes its sums to a table the team shares, and
// after a barrier every thread adds up the row's blocks in the same order. Neither the blocks nor
// the whole-row lanes depend on the team, so neither do the bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"

namespace rnnfast::cpu {

constexpr double kLayerNormEps = 1e-5;
constexpr int64_t kLnBlock = 16;  // kUnitAlign: a thread's units are whole blocks (but the last)

inline int64_t ln_blocks(int64_t H) { return (H + kLnBlock - 1) / kLnBlock; }

// The team's table of block sums for one step, [N, kQuantities, G * blocks]. Forward: the h
// product's sum and sum of squares, c's; backward the matching sums of the gradients
// (LnQuantity). Quantities of c use the first `blocks` entries.
enum LnQuantity : int { kLnH = 0, kLnC = 2, kLnQuantities = 4 };

struct LnPartials {
  double* data;
  int64_t width;  // G * blocks
  double* at(int64_t n, int q) const { return data + (n * kLnQuantities + q) * width; }
};

// Sums in 8 fixed lanes of doubles (value j in lane j % 8, a GCC/Clang vector, which every build
// of the passes vectorises its own width), added up in a fixed tree: the same bits whichever thread
// owns the values.
using LnLanes = double __attribute__((vector_size(64)));
#if defined(__GNUC__) && !defined(__clang__)
// the helpers below are always inlined, so no LnLanes crosses a call: GCC's note that passing one
// by value depends on AVX-512 does not apply
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
struct LnSums {
  double a, b;
};

RNNFAST_INLINE inline double ln_lane_total(LnLanes l) {
  const LnLanes u = l + __builtin_shufflevector(l, l, 4, 5, 6, 7, 0, 1, 2, 3);
  const LnLanes v = u + __builtin_shufflevector(u, u, 2, 3, 0, 1, 0, 1, 2, 3);
  return v[0] + v[1];
}

// p[0..8) as doubles
template <typename T>
RNNFAST_INLINE inline LnLanes ln_lanes(const T* p) {
  if constexpr (std::is_same_v<T, double>) {
    LnLanes v;
    std::memcpy(&v, p, sizeof v);
    return v;
  } else {
    float __attribute__((vector_size(32))) f;
    std::memcpy(&f, p, sizeof f);
    return __builtin_convertvector(f, LnLanes);
  }
}

// the sum of v[0..n) and of its squares
template <typename T>
RNNFAST_INLINE inline LnSums ln_value_sums(const T* v, int64_t n) {
  LnLanes a{}, b{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const LnLanes x = ln_lanes(v + j);
    a += x;
    b += x * x;
  }
  for (int l = 0; j + l < n; ++l) {
    const double x = double(v[j + l]);
    a[l] += x;
    b[l] += x * x;
  }
  return {ln_lane_total(a), ln_lane_total(b)};
}

// with u = d * gamma: the sum of u[0..n) and of u * hat
template <typename T>
RNNFAST_INLINE inline LnSums ln_grad_sums(const T* d, const T* gamma, const T* hat, int64_t n) {
  LnLanes a{}, b{};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const LnLanes u = ln_lanes(d + j) * ln_lanes(gamma + j);
    a += u;
    b += u * ln_lanes(hat + j);
  }
  for (int l = 0; j + l < n; ++l) {
    const double u = double(d[j + l]) * double(gamma[j + l]);
    a[l] += u;
    b[l] += u * double(hat[j + l]);
  }
  return {ln_lane_total(a), ln_lane_total(b)};
}

// For each of G gates and each block b of the thread's units: sum[g * blocks + b] and sum_sq[...]
// of the row's values and their squares; gate g's unit j is at v[g * stride + j - units.begin].
template <typename T>
RNNFAST_INLINE inline void ln_block_sums(int64_t G, int64_t H, Range units, const T* v,
                                         int64_t stride, double* sum, double* sum_sq) {
  const int64_t blocks = ln_blocks(H);
  for (int64_t g = 0; g < G; ++g) {
    const T* vg = v + g * stride - units.begin;
    for (int64_t j0 = units.begin; j0 < units.end; j0 += kLnBlock) {
      const LnSums l = ln_value_sums(vg + j0, std::min(kLnBlock, units.end - j0));
      sum[g * blocks + j0 / kLnBlock] = l.a;
      sum_sq[g * blocks + j0 / kLnBlock] = l.b;
    }
  }
}

// The sum of a row's `count` block sums, in block order.
RNNFAST_INLINE inline double ln_row_sum(const double* blocks, int64_t count) {
  double s = 0;
  for (int64_t k = 0; k < count; ++k) s += blocks[k];
  return s;
}

// A row's mean and 1/sqrt(var + eps) over `features` values from the two sums of its `count`
// blocks, added in block order.
struct LnMoments {
  double mean, rstd;
};

RNNFAST_INLINE inline LnMoments ln_moments(const double* sum, const double* sum_sq, int64_t count,
                                           int64_t features) {
  const double s = ln_row_sum(sum, count), q = ln_row_sum(sum_sq, count);
  const double mean = s / double(features);
  const double var = std::max(q / double(features) - mean * mean, 0.0);
  return {mean, 1 / std::sqrt(var + kLayerNormEps)};
}

// ---- forward ----------------------------------------------------------------------------------

// In a thread's row of one product (gate g, unit j at v[g * stride + j - units.begin]):
// v_hat = (v - mean) * rstd, kept in `saved` ([G*H] full row, training) where given, and
// out = v_hat * gamma in the same layout as v.
template <typename T>
RNNFAST_INLINE inline void ln_normalise(int64_t G, int64_t H, Range units, LnMoments m,
                                        const T* gamma, const T* v, int64_t stride, T* out,
                                        T* saved) {
  const T mean = T(m.mean), rstd = T(m.rstd);
  for (int64_t g = 0; g < G; ++g) {
    const T* vg = v + g * stride - units.begin;
    T* og = out + g * stride - units.begin;
    const T* gg = gamma + g * H;
    T* sg = saved ? saved + g * H : nullptr;
#pragma omp simd
    for (int64_t j = units.begin; j < units.end; ++j) {
      const T hat = (vg[j] - mean) * rstd;
      if (sg) sg[j] = hat;
      og[j] = hat * gg[j];
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------

// Back through v_hat * gamma: from u = dout * gamma, dv = rstd * (u - mean(u) - v_hat *
// mean(u * v_hat)); here in place on a thread's columns of a full row [G*H] (dv over dout), with
// the row's sums of u and u * v_hat already known.
template <typename T>
RNNFAST_INLINE inline void ln_backward_row(int64_t G, int64_t H, Range units, double sum_u,
                                           double sum_u_hat, double rstd, const T* gamma,
                                           const T* hat, T* d) {
  const double F = double(G * H);
  const T mean_u = T(sum_u / F), mean_u_hat = T(sum_u_hat / F), r = T(rstd);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * H;
#pragma omp simd
    for (int64_t j = units.begin; j < units.end; ++j) {
      const T u = d[o + j] * gamma[o + j];
      d[o + j] = r * (u - mean_u - hat[o + j] * mean_u_hat);
    }
  }
}

// The block sums of u = dout * gamma and u * v_hat over a thread's columns of a full row.
template <typename T>
RNNFAST_INLINE inline void ln_backward_sums(int64_t G, int64_t H, Range units, const T* gamma,
                                            const T* hat, const T* dout, double* sum_u,
                                            double* sum_u_hat) {
  const int64_t blocks = ln_blocks(H);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j0 = units.begin; j0 < units.end; j0 += kLnBlock) {
      const int64_t o = g * H + j0;
      const LnSums l =
          ln_grad_sums(dout + o, gamma + o, hat + o, std::min(kLnBlock, units.end - j0));
      sum_u[g * blocks + j0 / kLnBlock] = l.a;
      sum_u_hat[g * blocks + j0 / kLnBlock] = l.b;
    }
}

// dgamma[k] += dout[k] * hat[k] over a thread's columns of a full row
template <typename T>
RNNFAST_INLINE inline void ln_add_gain_gradient(int64_t G, int64_t H, Range units, const T* dout,
                                                const T* hat, T* dgamma) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * H;
#pragma omp simd
    for (int64_t j = units.begin; j < units.end; ++j) dgamma[o + j] += dout[o + j] * hat[o + j];
  }
}

// ---- whole rows: the x product ------------------------------------------------------------------

// A thread's rows of a [rows, F] block of x products: step t0 + r / N, batch row r % N. Rows past
// their length are skipped (their products are never read, and x may hold anything there).
template <typename T>
struct LnRows {
  int64_t F, N, t0;
  Range rows;
  const int32_t* lengths;  // [N] or null
  T* v;                    // [rows, F]: forward the products, then their normalised values;
                           // backward the gradients of the gained values, then of the products
  T* rstd;                 // 1/sqrt(var + eps) of row r at rstd[3 * r] (training), or null
  const T* gamma{};        // backward: [F] the gains
  const T* hat{};          // backward: [rows, F] the normalised values
  Range cols{};            // gain gradient: the columns this thread sums
  T* dgamma{};             // gain gradient: [F] out
  bool valid(int64_t r) const { return !lengths || t0 + r / N < lengths[r % N]; }
};

// In place: each valid row v becomes (v - mean) * rstd.
template <typename T>
RNNFAST_PASS void ln_normalise_rows(const LnRows<T>& p) {
  for (int64_t r = p.rows.begin; r < p.rows.end; ++r) {
    if (!p.valid(r)) continue;
    T* v = p.v + r * p.F;
    const LnSums s = ln_value_sums(v, p.F);
    const double mean = s.a / double(p.F);
    const double var = std::max(s.b / double(p.F) - mean * mean, 0.0);
    const T m = T(mean), rstd = T(1 / std::sqrt(var + kLayerNormEps));
#pragma omp simd
    for (int64_t j = 0; j < p.F; ++j) v[j] = (v[j] - m) * rstd;
    if (p.rstd) p.rstd[3 * r] = rstd;
  }
}

// In place: each valid row's gradient of v_hat * gamma becomes the gradient of v,
// rstd * (u - mean(u) - v_hat * mean(u * v_hat)) with u = dout * gamma.
template <typename T>
RNNFAST_PASS void ln_backward_rows(const LnRows<T>& p) {
  for (int64_t r = p.rows.begin; r < p.rows.end; ++r) {
    if (!p.valid(r)) continue;
    T* d = p.v + r * p.F;
    const T* hat = p.hat + r * p.F;
    const T* gamma = p.gamma;
    const LnSums s = ln_grad_sums(d, gamma, hat, p.F);
    const T mean_u = T(s.a / double(p.F)), mean_u_hat = T(s.b / double(p.F));
    const T rstd = p.rstd[3 * r];
#pragma omp simd
    for (int64_t j = 0; j < p.F; ++j) {
      const T u = d[j] * gamma[j];
      d[j] = rstd * (u - mean_u - hat[j] * mean_u_hat);
    }
  }
}

// dgamma[k] = the sum over the valid rows of dout[r, k] * hat[r, k], for k in `cols` (all rows,
// in order, so the bits do not depend on who owns the columns).
template <typename T>
RNNFAST_PASS void ln_gain_gradient_rows(const LnRows<T>& p) {
  const Range cols = p.cols;
  T* dgamma = p.dgamma;
  std::fill(dgamma + cols.begin, dgamma + cols.end, T(0));
  for (int64_t r = p.rows.begin; r < p.rows.end; ++r) {
    if (!p.valid(r)) continue;
    const T* d = p.v + r * p.F;
    const T* hat = p.hat + r * p.F;
#pragma omp simd
    for (int64_t k = cols.begin; k < cols.end; ++k) dgamma[k] += d[k] * hat[k];
  }
}

}  // namespace rnnfast::cpu
