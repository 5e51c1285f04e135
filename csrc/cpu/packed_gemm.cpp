// The AVX-512 micro-kernel of the packed step product: a tile of R rows of A times two 16-wide
// panels of W, kept in 2R zmm accumulators over the whole K, so each output is summed in one
// fixed order (bitwise reproducible) and W streams from cache once per row tile.
#include "cpu/packed_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace rnnfast::cpu {

bool cpu_has_avx512() {
  // RNNFAST_NO_AVX512=1 takes the BLAS path, to test it on machines that have AVX-512
  static const bool has = [] {
    const char* off = std::getenv("RNNFAST_NO_AVX512");
    if (off && *off && *off != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return has;
}

namespace {

constexpr int64_t kPanel = 16;  // floats in a zmm
constexpr int kMaxRows = 6;     // 2 * 6 accumulators + 2 panel loads + 1 broadcast fit in 32 zmm

// one k of an R x 2P tile: P panel loads, R broadcasts, R * P FMAs
template <int R, int P>
__attribute__((target("avx512f"), always_inline)) inline void fma_k(__m512 (&acc)[R][P],
                                                                    const float* A, int64_t lda,
                                                                    const float* panel,
                                                                    int64_t panel_stride,
                                                                    int64_t k) {
  __m512 b[P];
  for (int p = 0; p < P; ++p) b[p] = _mm512_load_ps(panel + p * panel_stride + k * kPanel);
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(A[r * lda + k]);
    for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(a, b[p], acc[r][p]);
  }
}

// S independent sums over interleaved k per output: with few rows (R * P < 8) one chain per
// output would leave the FMA units waiting on their 4-cycle latency
template <int R, int P, int S = (R * P >= 8 ? 1 : (R * P >= 4 ? 2 : 4))>
__attribute__((target("avx512f"))) void tile(int64_t K, const float* A, int64_t lda,
                                             const float* panel, int64_t panel_stride, float* C,
                                             int64_t ldc, __mmask16 last_mask, bool accumulate) {
  __m512 acc[S][R][P];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[s][r][p] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + S <= K; k += S)
    for (int s = 0; s < S; ++s) fma_k<R, P>(acc[s], A, lda, panel, panel_stride, k + s);
  for (; k < K; ++k) fma_k<R, P>(acc[0], A, lda, panel, panel_stride, k);
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < P; ++p) {
      __m512 v = acc[0][r][p];
      for (int s = 1; s < S; ++s) v = _mm512_add_ps(v, acc[s][r][p]);
      const __mmask16 m = p == P - 1 ? last_mask : __mmask16(0xFFFF);
      float* c = C + r * ldc + p * kPanel;
      if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c), v);
      _mm512_mask_storeu_ps(c, m, v);
    }
  }
}

// out[k * ldo + r] = in[r * ld + k] for r, k < 8
void transpose8x8(const float* in, int64_t ld, float* out, int64_t ldo) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * ld);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // rows i, i+1 interleaved: columns 0 1 | 4 5
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // columns 2 3 | 6 7
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));  // rows i..i+3: col 0 | 4
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));      // col 1 | 5
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));  // col 2 | 6
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));  // col 3 | 7
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t,
                        __mmask16, bool);

template <int P>
TileFn tile_for_rows(int rows) {
  switch (rows) {
    case 1:
      return tile<1, P>;
    case 2:
      return tile<2, P>;
    case 3:
      return tile<3, P>;
    case 4:
      return tile<4, P>;
    case 5:
      return tile<5, P>;
    default:
      return tile<6, P>;
  }
}

}  // namespace

PackedPanels::PackedPanels(const float* W, int64_t ldw, int64_t M, int64_t K, bool outputs_are_rows,
                           OutputBlocks blocks)
    : M_(M),
      K_(K),
      panels_((M + kPanel - 1) / kPanel),
      data_(scratch<float>(panels_ * K * kPanel)) {
  for (int64_t p = 0; p < panels_; ++p) {
    float* panel = data_.get() + p * K * kPanel;
    const int64_t outputs = std::min(kPanel, M - p * kPanel);
    if (!outputs_are_rows) {   // each k's outputs lie side by side in W (in their blocks)
      int64_t column[kPanel];  // once per panel: blocks() divides
      for (int64_t c = 0; c < outputs; ++c) column[c] = blocks(p * kPanel + c);
      const bool adjacent = column[outputs - 1] == column[0] + outputs - 1;
      for (int64_t k = 0; k < K; ++k) {
        float* out = panel + k * kPanel;
        if (adjacent)
          std::memcpy(out, W + k * ldw + column[0], sizeof(float) * outputs);
        else
          for (int64_t c = 0; c < outputs; ++c) out[c] = W[k * ldw + column[c]];
        std::fill(out + outputs, out + kPanel, 0.0f);
      }
      continue;
    }
    // a transpose, in 8 x 8 register blocks: element by element it took 45 us for a 512 x 256
    // w_hh, 6% of an LSTM call at batch 1
    for (int64_t k0 = 0; k0 < K; k0 += 8) {
      for (int64_t c0 = 0; c0 < kPanel; c0 += 8) {
        const int64_t j0 = p * kPanel + c0;
        float* out = panel + k0 * kPanel + c0;
        // 8 outputs in one block are 8 consecutive rows of W
        if (c0 + 8 <= outputs && k0 + 8 <= K && blocks(j0 + 7) == blocks(j0) + 7) {
          transpose8x8(W + blocks(j0) * ldw + k0, ldw, out, kPanel);
          continue;
        }
        for (int64_t c = 0; c < 8; ++c)
          for (int64_t k = 0; k < std::min<int64_t>(8, K - k0); ++k)
            out[k * kPanel + c] = c0 + c < outputs ? W[blocks(j0 + c) * ldw + k0 + k] : 0.0f;
      }
    }
  }
}

void PackedPanels::multiply(int64_t N, const float* A, int64_t lda, float* C, int64_t ldc,
                            bool accumulate) const {
  const int64_t panel_stride = K_ * kPanel;
  const int64_t tail = M_ % kPanel;
  for (int64_t p0 = 0; p0 < panels_; p0 += 2) {
    const int P = int(std::min<int64_t>(2, panels_ - p0));
    const __mmask16 last = (p0 + P == panels_ && tail) ? __mmask16((1u << tail) - 1) : 0xFFFF;
    const float* panel = data_.get() + p0 * panel_stride;
    // row tiles as even as possible (32 rows: 6 6 5 5 5 5, not 6 6 6 6 6 2): a thin last tile
    // streams the panels for a fraction of the FMAs
    const int64_t tiles = (N + kMaxRows - 1) / kMaxRows;
    for (int64_t i = 0, n0 = 0; i < tiles; ++i) {
      const int rows = int(N / tiles + (i < N % tiles ? 1 : 0));
      const TileFn f = P == 2 ? tile_for_rows<2>(rows) : tile_for_rows<1>(rows);
      f(K_, A + n0 * lda, lda, panel, panel_stride, C + n0 * ldc + p0 * kPanel, ldc, last,
        accumulate);
      n0 += rows;
    }
  }
}

}  // namespace rnnfast::cpu
