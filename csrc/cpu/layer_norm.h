// Layer normalisation inside the recurrent step (Ba, Kiros and Hinton 2016; as Haste's
// LayerNormLSTM and LayerNormGRU): every row of each product (x W_ih^T and h W_hh^T, over all G*H
// gate columns) and the LSTM's c (over H) is normalised over its features with the mean and the
// biased variance, eps 1e-5 (torch.nn.functional.layer_norm), then scaled by its gain.
// A row's columns belong to several threads (each owns a slice of the units), so its statistics
// are sums over fixed blocks of kLnBlock units: the thread that owns a block writes its sums to a
// table the team shares, and after a barrier every thread adds up the row's blocks in the same
// order. The blocks do not depend on the team, so neither do the bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/parallel.h"

namespace rnnfast::cpu {

constexpr double kLayerNormEps = 1e-5;
constexpr int64_t kLnBlock = 16;  // kUnitAlign: a thread's units are whole blocks (but the last)

inline int64_t ln_blocks(int64_t H) { return (H + kLnBlock - 1) / kLnBlock; }

// The team's table of block sums for one step, [N, kQuantities, G * blocks]. Forward: the x
// product's sum and sum of squares, the h product's, c's; backward the matching sums of the
// gradients (LnQuantity). Quantities of c use the first `blocks` entries.
enum LnQuantity : int { kLnX = 0, kLnH = 2, kLnC = 4, kLnQuantities = 6 };

struct LnPartials {
  double* data;
  int64_t width;  // G * blocks
  double* at(int64_t n, int q) const { return data + (n * kLnQuantities + q) * width; }
};

// For each of G gates and each block b of the thread's units: sum[g * blocks + b] and sum_sq[...]
// of the row's values and their squares; gate g's unit j is at v[g * stride + j - units.begin].
template <typename T>
void ln_block_sums(int64_t G, int64_t H, Range units, const T* v, int64_t stride, double* sum,
                   double* sum_sq) {
  const int64_t blocks = ln_blocks(H);
  for (int64_t g = 0; g < G; ++g) {
    const T* vg = v + g * stride - units.begin;
    for (int64_t j0 = units.begin; j0 < units.end; j0 += kLnBlock) {
      const int64_t j1 = std::min(j0 + kLnBlock, units.end);
      double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
      for (int64_t j = j0; j < j1; ++j) {
        const double x = double(vg[j]);
        s += x;
        q += x * x;
      }
      sum[g * blocks + j0 / kLnBlock] = s;
      sum_sq[g * blocks + j0 / kLnBlock] = q;
    }
  }
}

// The sum of a row's `count` block sums, in block order.
inline double ln_row_sum(const double* blocks, int64_t count) {
  double s = 0;
  for (int64_t k = 0; k < count; ++k) s += blocks[k];
  return s;
}

// A row's mean and 1/sqrt(var + eps) over `features` values from the two sums of its `count`
// blocks, added in block order.
struct LnMoments {
  double mean, rstd;
};

inline LnMoments ln_moments(const double* sum, const double* sum_sq, int64_t count,
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
void ln_normalise(int64_t G, int64_t H, Range units, LnMoments m, const T* gamma, const T* v,
                  int64_t stride, T* out, T* saved) {
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
void ln_backward_row(int64_t G, int64_t H, Range units, double sum_u, double sum_u_hat, double rstd,
                     const T* gamma, const T* hat, T* d) {
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
void ln_backward_sums(int64_t G, int64_t H, Range units, const T* gamma, const T* hat,
                      const T* dout, double* sum_u, double* sum_u_hat) {
  const int64_t blocks = ln_blocks(H);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j0 = units.begin; j0 < units.end; j0 += kLnBlock) {
      const int64_t j1 = std::min(j0 + kLnBlock, units.end), o = g * H;
      double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
      for (int64_t j = j0; j < j1; ++j) {
        const double u = double(dout[o + j]) * double(gamma[o + j]);
        s += u;
        q += u * double(hat[o + j]);
      }
      sum_u[g * blocks + j0 / kLnBlock] = s;
      sum_u_hat[g * blocks + j0 / kLnBlock] = q;
    }
}

// dgamma[k] += dout[k] * hat[k] over a thread's columns of a full row
template <typename T>
void ln_add_gain_gradient(int64_t G, int64_t H, Range units, const T* dout, const T* hat,
                          T* dgamma) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t o = g * H;
#pragma omp simd
    for (int64_t j = units.begin; j < units.end; ++j) dgamma[o + j] += dout[o + j] * hat[o + j];
  }
}

}  // namespace rnnfast::cpu
