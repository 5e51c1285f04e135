// The fused softmax cross-entropy of dense.h (three passes over a row: max, exp and sum, scale),
// the embedding's scatter-add and the fused Adam update, compiled for the CPU's widest vectors
// (isa_dispatch.h).
#include "cpu/dense.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/isa_dispatch.h"
#include "cpu/parallel.h"
#include "cpu/vecmath.h"

namespace rnnfast::cpu {

namespace {

RNNFAST_INLINE inline float exp_of(float x) { return exp_poly(x); }
RNNFAST_INLINE inline double exp_of(double x) { return std::exp(x); }

template <typename T>
struct XentRow {
  const T* x;  // [V]
  T* g;        // [V]
  int64_t V, target;
  double scale;
  double* loss;
};

template <typename T>
RNNFAST_PASS void xent_row(const XentRow<T>& r) {
  const T* x = r.x;
  T* g = r.g;
  T m = -std::numeric_limits<T>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < r.V; ++j) {
    m = x[j] > m ? x[j] : m;
    nan |= x[j] != x[j];
  }
  if (nan) m = std::numeric_limits<T>::quiet_NaN();  // the max skips NaN; the loss must not
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < r.V; ++j) {
    const T e = exp_of(x[j] - m);
    g[j] = e;
    sum += e;
  }
  *r.loss = double(m) + std::log(double(sum)) - double(x[r.target]);
  const T f = T(r.scale / double(sum));
#pragma omp simd
  for (int64_t j = 0; j < r.V; ++j) g[j] *= f;
  g[r.target] -= T(r.scale);
}

template <typename T>
struct AdamChunk {
  const AdamStep<T>* h;
  T *p, *m, *v, *max_v;
  const T* g;
  int64_t n;
};

template <typename T>
RNNFAST_PASS void adam_chunk(const AdamChunk<T>& c) {
  const AdamStep<T>& h = *c.h;
#pragma GCC ivdep
  for (int64_t i = 0; i < c.n; ++i) {
    T g = h.maximize ? -c.g[i] : c.g[i];
    const T p = c.p[i] * h.keep;
    g = g + h.weight_decay * p;
    const T m = c.m[i] + (g - c.m[i]) * h.one_minus_beta1;
    const T v = c.v[i] * h.beta2 + (g * h.one_minus_beta2) * g;
    T vd = v;
    if (c.max_v) {
      vd = c.max_v[i] > v ? c.max_v[i] : v;
      c.max_v[i] = vd;
    }
    const T denom = std::sqrt(vd) / h.bias2_sqrt + h.eps;
    c.p[i] = p - (m * h.step_size) / denom;
    c.m[i] = m;
    c.v[i] = v;
  }
}

}  // namespace

template <typename T>
void adam_update(int threads, int64_t n, const AdamStep<T>& h, T* p, const T* g, T* m, T* v,
                 T* max_v) {
  constexpr int64_t kChunk = 1 << 14;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (n < (int64_t(1) << 16)) threads = 1;  // a small parameter is not worth a team
  threads = team_request(threads);
  const Isa isa = cpu_isa();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t i = k * kChunk, len = std::min(kChunk, n - i);
    run_pass<&adam_chunk<T>>(
        isa, AdamChunk<T>{&h, p + i, m + i, v + i, max_v ? max_v + i : nullptr, g + i, len});
  }
}

template <typename T>
void embedding_backward(int threads, int64_t R, int64_t D, const int64_t* ids, const T* rows,
                        int64_t skip, T* grad) {
  // columns in blocks of a cache line, a block's rows summed by one thread
  constexpr int64_t kBlock = 64 / sizeof(T);
  const int64_t blocks = (D + kBlock - 1) / kBlock;
  if (R * D < (int64_t(1) << 16)) threads = 1;  // a small batch is not worth a team
  threads = team_request(int(std::min<int64_t>(threads, blocks)));
#pragma omp parallel num_threads(threads)
  {
    const Range mine = split(blocks, team_size(), thread_index());
    const int64_t j0 = mine.begin * kBlock, j1 = std::min(D, mine.end * kBlock);
    for (int64_t r = 0; r < R && j0 < j1; ++r) {
      if (ids[r] == skip) continue;
      const T* src = rows + r * D;
      T* dst = grad + ids[r] * D;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) dst[j] += src[j];
    }
  }
}

template <typename T>
void softmax_cross_entropy(int threads, int64_t R, int64_t V, const T* logits,
                           const int64_t* targets, const uint8_t* kept, const double* scale,
                           T* grad, double* losses) {
  if (R * V < (int64_t(1) << 15)) threads = 1;  // a small head is not worth a team
  threads = team_request(threads);
  const Isa isa = cpu_isa();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    T* g = grad + r * V;
    if (!kept[r]) {
      for (int64_t j = 0; j < V; ++j) g[j] = T(0);
      losses[r] = 0.0;
      continue;
    }
    run_pass<&xent_row<T>>(isa, XentRow<T>{logits + r * V, g, V, targets[r], scale[r], losses + r});
  }
}

template void softmax_cross_entropy<float>(int, int64_t, int64_t, const float*, const int64_t*,
                                           const uint8_t*, const double*, float*, double*);
template void softmax_cross_entropy<double>(int, int64_t, int64_t, const double*, const int64_t*,
                                            const uint8_t*, const double*, double*, double*);
template void embedding_backward<float>(int, int64_t, int64_t, const int64_t*, const float*,
                                        int64_t, float*);
template void embedding_backward<double>(int, int64_t, int64_t, const int64_t*, const double*,
                                         int64_t, double*);
template void adam_update<float>(int, int64_t, const AdamStep<float>&, float*, const float*, float*,
                                 float*, float*);
template void adam_update<double>(int, int64_t, const AdamStep<double>&, double*, const double*,
                                  double*, double*, double*);

}  // namespace rnnfast::cpu
