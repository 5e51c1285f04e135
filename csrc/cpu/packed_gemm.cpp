// The micro-kernels of the packed step product. AVX-512: a tile of R rows of A times two 16-wide
// panels of W, kept in 2R zmm accumulators over the whole K; AVX2 + FMA: R rows times one panel,
// in 2R ymm accumulators (its 16 registers hold no more). Either way each output is summed in one
// fixed order (bitwise reproducible) and W streams from cache once per row tile. In bfloat16 the
// panels hold pairs of k and each accumulator takes two products per lane (vdpbf16ps).
#include "cpu/packed_gemm.h"

#include "cpu/parallel.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>

namespace rnnfast::cpu {

namespace {
// $RNNFAST_ISA ("baseline", "avx2", "avx512" or "amx"; rnnfast/__init__.py checks the value)
const char* isa_cap() { return std::getenv("RNNFAST_ISA"); }
}  // namespace

Isa cpu_isa() {
  // $RNNFAST_ISA caps the choice, to test the narrower paths on any machine. AVX-512 here means
  // F, BW, VL and DQ: the tiles below are compiled for F, BW and VL, the pointwise passes
  // (recurrent.h) for DQ as well; every AVX-512 CPU but Xeon Phi has all four.
  static const Isa isa = [] {
    Isa cap = Isa::avx512;
    if (const char* v = isa_cap()) {
      if (std::strcmp(v, "baseline") == 0) cap = Isa::baseline;
      if (std::strcmp(v, "avx2") == 0) cap = Isa::avx2;
    }
    Isa has = Isa::baseline;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) has = Isa::avx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      has = Isa::avx512;
#endif
    return std::min(has, cap);
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__)
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (v > 0) return int64_t(v);
#endif
    return int64_t(1) << 20;  // where the C library does not say: 1 MiB, a common size
  }();
  return bytes;
}

bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && defined(__linux__)
  static const bool has = [] {
    const char* cap = isa_cap();
    if ((cap && std::strcmp(cap, "amx") != 0) || !cpu_has_avx512_bf16()) return false;
    unsigned a, b, c, d;
    constexpr unsigned kAmxBf16 = 1u << 22, kAmxTile = 1u << 24;  // CPUID.(7, 0):EDX
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) ||
        (d & (kAmxBf16 | kAmxTile)) != (kAmxBf16 | kAmxTile))
      return false;
    // Linux enables the 8 KiB tile state per process, on request; a kernel before 5.16 (or one
    // that refuses) answers with an error, and the tiles would fault
    constexpr long kGetPermission = 0x1022, kRequestPermission = 0x1023, kTileData = 18;
    unsigned long granted = 0;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0 &&
           syscall(SYS_arch_prctl, kGetPermission, &granted) == 0 && (granted >> kTileData & 1);
  }();
  return has;
#else
  return false;
#endif
}

#if defined(__x86_64__)
namespace {

constexpr int64_t kPanel = 16;  // floats in a zmm
// rows of A per tile: AVX-512's 2 * 12 accumulators + 2 panel loads + 1 broadcast fit in 32 zmm,
// AVX2's 2 * 6 + 2 + 1 in 16 ymm
constexpr int kMaxRows = 12, kMaxRowsAvx2 = 6;

// The tiles' target: the bfloat16 instantiations need AVX512_BF16; the float32 ones use only F,
// BW and VL instructions, since nothing in them asks for a bfloat16 one.
#define RNNFAST_AVX2_TARGET __attribute__((target("avx2,fma")))
#define RNNFAST_TILE_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Panel elements per k: a float32 panel holds one float per output and k; a bfloat16 one holds
// the pair (k, k + 1) per output, so its k counts pairs.
template <typename E>
constexpr int64_t kPerK = std::is_same_v<E, float> ? kPanel : 2 * kPanel;

// one k of an R x 2P tile: P panel loads, R broadcasts, R * P FMAs (in bfloat16, k is a pair)
template <typename E, int R, int P>
RNNFAST_TILE_TARGET __attribute__((always_inline)) inline void multiply_add_k(
    __m512 (&acc)[R][P], const E* A, int64_t lda, const E* panel, int64_t panel_stride, int64_t k) {
  if constexpr (std::is_same_v<E, float>) {
    __m512 b[P];
    for (int p = 0; p < P; ++p) b[p] = _mm512_load_ps(panel + p * panel_stride + k * kPanel);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(a, b[p], acc[r][p]);
    }
  } else {
    __m512bh b[P];
    for (int p = 0; p < P; ++p)
      b[p] = (__m512bh)_mm512_load_si512(panel + p * panel_stride + k * kPerK<E>);
    for (int r = 0; r < R; ++r) {
      int32_t pair;  // A's elements 2k and 2k + 1
      std::memcpy(&pair, A + r * lda + 2 * k, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a, b[p]);
    }
  }
}

// C[R, 16P] (+)= the accumulators, the last panel's columns masked
template <int R, int P>
RNNFAST_TILE_TARGET __attribute__((always_inline)) inline void store_tile(const __m512 (&acc)[R][P],
                                                                          float* C, int64_t ldc,
                                                                          __mmask16 last_mask,
                                                                          bool accumulate) {
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) {
      const __mmask16 m = p == P - 1 ? last_mask : __mmask16(0xFFFF);
      float* c = C + r * ldc + p * kPanel;
      __m512 v = acc[r][p];
      if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, c), v);
      _mm512_mask_storeu_ps(c, m, v);
    }
}

// Independent sums in flight to keep two FMA pipes busy: 2 x 4 cycles of latency in float32,
// 2 x 6 for vdpbf16ps.
template <typename E>
constexpr int kChains = std::is_same_v<E, float> ? 8 : 12;

// A second operand after the first along k (stacked weights): its rows lda apart, K k of them
// after the first operand's in the panels. K = 0: none. The tiles take it by reference with the
// pointer to their own first row apart (a struct by value goes through the stack, and reloading
// it there stalled on store forwarding: a tenth of a step's time).
template <typename E>
struct SecondRows {
  const E* A = nullptr;
  int64_t lda = 0, K = 0;
  const E* row(int64_t n) const { return A ? A + n * lda : nullptr; }
};

template <typename E, int R, int P, int S>
RNNFAST_TILE_TARGET __attribute__((always_inline)) inline void multiply_add_all_k(
    __m512 (&acc)[S][R][P], int64_t K, const E* A, int64_t lda, const E* panel,
    int64_t panel_stride) {
  int64_t k = 0;
  for (; k + S <= K; k += S)
    for (int s = 0; s < S; ++s) multiply_add_k<E, R, P>(acc[s], A, lda, panel, panel_stride, k + s);
  for (; k < K; ++k) multiply_add_k<E, R, P>(acc[0], A, lda, panel, panel_stride, k);
}

// S independent sums over interleaved k per output: with few rows (2R < kChains) one chain per
// output would leave the FMA units waiting on their latency. S depends on the rows alone, not on
// P: a thread's last panel runs alone (P = 1) or paired by where the team's split puts it, and
// with S following P the same output summed in another order (other bits for another thread
// count). K counts panel steps (pairs in bfloat16).
template <typename E, int R, int P,
          int S = (2 * R >= kChains<E> ? 1 : (4 * R >= kChains<E> ? 2 : 4))>
RNNFAST_TILE_TARGET void tile(int64_t K, const E* A, int64_t lda, const E* A2,
                              const SecondRows<E>& second, const E* panel, int64_t panel_stride,
                              float* C, int64_t ldc, __mmask16 last_mask, bool accumulate) {
  __m512 acc[S][R][P];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[s][r][p] = _mm512_setzero_ps();
  multiply_add_all_k<E, R, P, S>(acc, K, A, lda, panel, panel_stride);
  if (second.K)
    multiply_add_all_k<E, R, P, S>(acc, second.K, A2, second.lda, panel + K * kPerK<E>,
                                   panel_stride);
  for (int s = 1; s < S; ++s)
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) acc[0][r][p] = _mm512_add_ps(acc[0][r][p], acc[s][r][p]);
  store_tile<R, P>(acc[0], C, ldc, last_mask, accumulate);
}

// Rows of float32 rounded to bfloat16 (to nearest even), zero-padded to `width` (>= K) elements:
// out[r * ldo + k] for k < width.
RNNFAST_TILE_TARGET void round_rows_to_bf16(int64_t rows, int64_t K, const float* in, int64_t ld,
                                            uint16_t* out, int64_t ldo, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = in + r * ld;
    uint16_t* o = out + r * ldo;
    for (int64_t k = 0; k < width; k += kPanel) {
      const int64_t left = std::clamp<int64_t>(K - k, 0, kPanel);
      const __mmask16 m = left == kPanel ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __mmask16 store =
          width - k >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << (width - k)) - 1);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, a + k));
      _mm256_mask_storeu_epi16(o + k, store, (__m256i)v);
    }
  }
}

// The permutation of _mm512_cvtne2ps_pbh(hi, lo) into pairs: lane 2c takes lo's element c (k's
// output c), lane 2c + 1 hi's (k + 1's)
RNNFAST_TILE_TARGET inline __m512i pair_interleave() {
  alignas(64) uint16_t order[32];
  for (int c = 0; c < 16; ++c) {
    order[2 * c] = uint16_t(c);
    order[2 * c + 1] = uint16_t(16 + c);
  }
  return _mm512_load_si512(order);
}

// A float32 panel [K][16] as bfloat16 pairs [pairs][16][2], the k past K zero.
RNNFAST_TILE_TARGET void panel_to_bf16(const float* panel, int64_t K, int64_t pairs,
                                       uint16_t* out) {
  const __m512i idx = pair_interleave();
  for (int64_t k = 0; k < K; k += 2) {
    const __m512 lo = _mm512_load_ps(panel + k * kPanel);
    const __m512 hi = k + 1 < K ? _mm512_load_ps(panel + (k + 1) * kPanel) : _mm512_setzero_ps();
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo in 0-15, hi in 16-31
    _mm512_store_si512(out + k * kPanel, _mm512_permutexvar_epi16(idx, both));
  }
  std::fill(out + (K + 1) / 2 * 2 * kPanel, out + pairs * 2 * kPanel, uint16_t(0));
}

// Panels [first, end) of W's columns ([K, ldw], M of them) as bfloat16 pairs [pairs][16][2]
// each, panel p at out + p * pairs * 32, straight from W (the interleave of panel_to_bf16 on
// masked loads), a pair of W's rows at a time across all the panels
RNNFAST_TILE_TARGET void columns_to_bf16(const float* W, int64_t ldw, int64_t K, int64_t M,
                                         int64_t first, int64_t end, int64_t pairs, uint16_t* out) {
  const __m512i idx = pair_interleave();
  const int64_t panel_size = pairs * 2 * kPanel;
  for (int64_t k = 0; k < K; k += 2) {
    const float* lo_row = W + k * ldw;
    const float* hi_row = k + 1 < K ? lo_row + ldw : nullptr;
    for (int64_t p = first; p < end; ++p) {
      const int64_t outputs = std::min(kPanel, M - p * kPanel);
      const __mmask16 m = outputs >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << outputs) - 1);
      const __m512 lo = _mm512_maskz_loadu_ps(m, lo_row + p * kPanel);
      const __m512 hi =
          hi_row ? _mm512_maskz_loadu_ps(m, hi_row + p * kPanel) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      _mm512_store_si512(out + p * panel_size + k * kPanel, _mm512_permutexvar_epi16(idx, both));
    }
  }
  for (int64_t p = first; p < end; ++p)
    std::fill(out + p * panel_size + (K + 1) / 2 * 2 * kPanel, out + (p + 1) * panel_size,
              uint16_t(0));
}

// out[k * ldo + r] = in[r * ld + k] for r, k < 8
RNNFAST_AVX2_TARGET inline __attribute__((always_inline)) void transpose8x8(const float* in,
                                                                            int64_t ld, float* out,
                                                                            int64_t ldo) {
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

// out[c * ldo + r] = in[r * ld + c] for r < rows, c < cols: 8 x 8 register blocks (inlined: a call
// per block cost a third of the time), the edges element by element
RNNFAST_AVX2_TARGET void transpose_blocks(int64_t rows, int64_t cols, const float* in, int64_t ld,
                                          float* out, int64_t ldo) {
  for (int64_t r0 = 0; r0 < rows; r0 += 8)
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      const float* from = in + r0 * ld + c0;
      float* to = out + c0 * ldo + r0;
      if (r0 + 8 <= rows && c0 + 8 <= cols) {
        transpose8x8(from, ld, to, ldo);
        continue;
      }
      for (int64_t r = 0; r < std::min<int64_t>(8, rows - r0); ++r)
        for (int64_t c = 0; c < std::min<int64_t>(8, cols - c0); ++c)
          to[c * ldo + r] = from[r * ld + c];
    }
}

template <typename E>
using TileFn = void (*)(int64_t, const E*, int64_t, const E*, const SecondRows<E>&, const E*,
                        int64_t, float*, int64_t, __mmask16, bool);

// Kernel::of<R> for 1 <= rows <= kMaxRows (more take kMaxRows)
template <class Kernel>
auto for_rows(int rows) {
  switch (rows) {
    case 1:
      return Kernel::template of<1>;
    case 2:
      return Kernel::template of<2>;
    case 3:
      return Kernel::template of<3>;
    case 4:
      return Kernel::template of<4>;
    case 5:
      return Kernel::template of<5>;
    case 6:
      return Kernel::template of<6>;
    case 7:
      return Kernel::template of<7>;
    case 8:
      return Kernel::template of<8>;
    case 9:
      return Kernel::template of<9>;
    case 10:
      return Kernel::template of<10>;
    case 11:
      return Kernel::template of<11>;
    default:
      return Kernel::template of<12>;
  }
}

// one_chain: one sum per output whatever the rows (in k order, so that the bits do not depend on
// how a caller's rows fall into tiles), else as many as the rows need to hide the FMA latency
template <typename E, int P, bool one_chain>
struct PanelTiles {
  template <int R>
  static constexpr TileFn<E> of = one_chain ? tile<E, R, P, 1> : tile<E, R, P>;
};
template <typename E, int P, bool one_chain = false>
TileFn<E> tile_for_rows(int rows) {
  return for_rows<PanelTiles<E, P, one_chain>>(rows);
}

// N rows in tiles of at most kMaxRows, as even as possible (32 rows: 6 6 5 5 5 5, not 6 6 6 6 6 2:
// a thin last tile streams the panels for a fraction of the FMAs), visited in blocks of tiles
// whose rows of A stay in L2 while every panel passes over them. Rows of A take 4K bytes (float32
// rows of K, or K bfloat16 pairs). Without the blocks, a call of 1024 rows at K = 512 streamed
// all of A from L3 once per panel (bench/RESULTS.md).
// The blocks take an eighth of the L2 (128 KiB of the 1 MiB where this was measured).
struct RowTiles {
  int64_t N, count, per_block;
  RowTiles(int64_t N, int64_t K, int max_rows)
      : N(N),
        count((N + max_rows - 1) / max_rows),
        per_block(std::max<int64_t>(
            1, l2_cache_bytes() / 8 / (max_rows * 4 * std::max<int64_t>(K, 1)))) {}
  int rows(int64_t i) const { return int(N / count + (i < N % count ? 1 : 0)); }
  int64_t first_row(int64_t i) const { return i * (N / count) + std::min(i, N % count); }
  // calls f(first tile, end tile) for each block
  template <class F>
  void for_blocks(F&& f) const {
    for (int64_t b = 0; b < count; b += per_block) f(b, std::min(count, b + per_block));
  }
};

// C[N, M] (+)= A[N, K] (and the second operand's rows after it) times the panels, two at a time,
// panel_stride elements apart. K counts panel steps.
template <typename E, bool one_chain = false>
void multiply_panels(int64_t N, int64_t M, int64_t K, const E* A, int64_t lda, const E* panels,
                     int64_t panel_stride, float* C, int64_t ldc, bool accumulate,
                     const SecondRows<E>& second = {}) {
  const int64_t count = (M + kPanel - 1) / kPanel;
  const int64_t tail = M % kPanel;
  const RowTiles tiles(N, K + second.K, kMaxRows);
  tiles.for_blocks([&](int64_t first, int64_t end) {
    for (int64_t p0 = 0; p0 < count; p0 += 2) {
      const int P = int(std::min<int64_t>(2, count - p0));
      const __mmask16 last = (p0 + P == count && tail) ? __mmask16((1u << tail) - 1) : 0xFFFF;
      const E* panel = panels + p0 * panel_stride;
      for (int64_t i = first; i < end; ++i) {
        const int rows = tiles.rows(i);
        const int64_t n0 = tiles.first_row(i);
        const TileFn<E> f =
            P == 2 ? tile_for_rows<E, 2, one_chain>(rows) : tile_for_rows<E, 1, one_chain>(rows);
        f(K, A + n0 * lda, lda, second.row(n0), second, panel, panel_stride,
          C + n0 * ldc + p0 * kPanel, ldc, last, accumulate);
      }
    }
  });
}

// ---- AVX2 + FMA: one 16-wide panel (two ymm) times up to 6 rows
// ----------------------------------

// one k of an R x 16 tile: 2 panel loads, R broadcasts, 2R FMAs
template <int R>
RNNFAST_AVX2_TARGET __attribute__((always_inline)) inline void multiply_add_k_avx2(
    __m256 (&acc)[R][2], const float* A, int64_t lda, const float* panel, int64_t k) {
  const __m256 b0 = _mm256_load_ps(panel + k * kPanel), b1 = _mm256_load_ps(panel + k * kPanel + 8);
  for (int r = 0; r < R; ++r) {
    const __m256 a = _mm256_set1_ps(A[r * lda + k]);  // not _mm256_broadcast_ss: its pointer
    // argument made GCC keep the accumulators in memory, stored on every k
    acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
    acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
  }
}

// S interleaved sums per output as in tile() above, for FMA's 4 x 2 cycles of latency x pipes.
// A last panel of fewer than 16 outputs goes through a buffer: AVX2's masked stores are
// microcoded on AMD's cores.
template <int R, int S>
RNNFAST_AVX2_TARGET __attribute__((always_inline)) inline void multiply_add_all_k_avx2(
    __m256 (&acc)[S][R][2], int64_t K, const float* A, int64_t lda, const float* panel) {
  int64_t k = 0;
  for (; k + S <= K; k += S)
    for (int s = 0; s < S; ++s) multiply_add_k_avx2<R>(acc[s], A, lda, panel, k + s);
  for (; k < K; ++k) multiply_add_k_avx2<R>(acc[0], A, lda, panel, k);
}

template <int R, int S = (2 * R >= kChains<float> ? 1 : (4 * R >= kChains<float> ? 2 : 4))>
RNNFAST_AVX2_TARGET void tile_avx2(int64_t K, const float* A, int64_t lda, const float* A2,
                                   const SecondRows<float>& second, const float* panel, float* C,
                                   int64_t ldc, int64_t outputs, bool accumulate) {
  __m256 acc[S][R][2];
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) acc[s][r][0] = acc[s][r][1] = _mm256_setzero_ps();
  multiply_add_all_k_avx2<R, S>(acc, K, A, lda, panel);
  if (second.K) multiply_add_all_k_avx2<R, S>(acc, second.K, A2, second.lda, panel + K * kPanel);
  alignas(32) float partial[R][kPanel];
  const bool whole = outputs == kPanel;
  float* out = whole ? C : &partial[0][0];
  const int64_t ld = whole ? ldc : kPanel;
  if (!whole && accumulate)
    for (int r = 0; r < R; ++r) std::memcpy(partial[r], C + r * ldc, sizeof(float) * outputs);
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < 2; ++h) {
      __m256 v = acc[0][r][h];
      for (int s = 1; s < S; ++s) v = _mm256_add_ps(v, acc[s][r][h]);
      float* c = out + r * ld + 8 * h;
      if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(c), v);
      _mm256_storeu_ps(c, v);
    }
  }
  if (!whole)
    for (int r = 0; r < R; ++r) std::memcpy(C + r * ldc, partial[r], sizeof(float) * outputs);
}

using TileAvx2Fn = void (*)(int64_t, const float*, int64_t, const float*, const SecondRows<float>&,
                            const float*, float*, int64_t, int64_t, bool);

template <bool one_chain = false>
TileAvx2Fn tile_avx2_for_rows(int rows) {
  switch (rows) {
    case 1:
      return one_chain ? tile_avx2<1, 1> : tile_avx2<1>;
    case 2:
      return one_chain ? tile_avx2<2, 1> : tile_avx2<2>;
    case 3:
      return one_chain ? tile_avx2<3, 1> : tile_avx2<3>;
    case 4:
      return tile_avx2<4>;
    case 5:
      return tile_avx2<5>;
    default:
      return tile_avx2<6>;
  }
}

// C[N, M] (+)= A[N, K] (and the second operand's rows) times the panels, one at a time, in
// RowTiles (one_chain as PanelTiles)
template <bool one_chain = false>
void multiply_panels_avx2(int64_t N, int64_t M, int64_t K, const float* A, int64_t lda,
                          const float* panels, float* C, int64_t ldc, bool accumulate,
                          const SecondRows<float>& second = {}) {
  const int64_t count = (M + kPanel - 1) / kPanel, k_all = K + second.K;
  const RowTiles tiles(N, k_all, kMaxRowsAvx2);
  tiles.for_blocks([&](int64_t first, int64_t end) {
    for (int64_t p = 0; p < count; ++p) {
      const int64_t outputs = std::min(kPanel, M - p * kPanel);
      for (int64_t i = first; i < end; ++i) {
        const int64_t n0 = tiles.first_row(i);
        tile_avx2_for_rows<one_chain>(tiles.rows(i))(
            K, A + n0 * lda, lda, second.row(n0), second, panels + p * k_all * kPanel,
            C + n0 * ldc + p * kPanel, ldc, outputs, accumulate);
      }
    }
  });
}

// ---- AMX-BF16: 16 x 16 float32 tiles, each summing 16 x 32 bfloat16 rows of A times a 32 x 16
// block of a panel (16 pairs: a panel's layout is already the tiles' pair-interleaved one) ------

#define RNNFAST_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kTileRows = 16;   // rows of A (and C) per tile
constexpr int64_t kTilePairs = 16;  // pairs of k per tile: 32 bfloat16, 64 bytes a row

// the pairs of k a bfloat16 panel holds: K's, padded with zeros to whole tiles (whether or not
// the tiles run: the AVX-512 kernels skip the padding)
constexpr int64_t padded_pairs(int64_t K) {
  return ((K + 1) / 2 + kTilePairs - 1) / kTilePairs * kTilePairs;
}

// every tile 16 rows of 64 bytes (palette 1); the tile numbers are fixed in amx_block
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      bytes_per_row[t] = 64;
      rows[t] = kTileRows;
    }
  }
};

// GCC's tile intrinsics are asm statements that do not tell it they read or write memory: the
// barrier orders the stores of A before the tile loads, and the tile stores before their reads
inline void compiler_barrier() { __asm__ volatile("" ::: "memory"); }

// C rows [0, rows) x columns [0, columns) = a tile stored as 16 x 16 floats
RNNFAST_AMX_TARGET inline void store_tile(const float* tile, int64_t rows, int64_t columns,
                                          float* C, int64_t ldc) {
  const __mmask16 m = columns >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << columns) - 1);
  for (int64_t r = 0; r < rows; ++r)
    _mm512_mask_storeu_ps(C + r * ldc, m, _mm512_load_ps(tile + r * kPanel));
}

// a 16 x 16 tile of floats from C rows [0, rows) x columns [0, columns), zero past them
RNNFAST_AMX_TARGET inline void tile_from(const float* C, int64_t rows, int64_t columns, int64_t ldc,
                                         float* tile) {
  const __mmask16 m = columns >= kPanel ? __mmask16(0xFFFF) : __mmask16((1u << columns) - 1);
  for (int64_t r = 0; r < kTileRows; ++r)
    _mm512_store_ps(tile + r * kPanel,
                    r < rows ? _mm512_maskz_loadu_ps(m, C + r * ldc) : _mm512_setzero_ps());
}

// One block of C: RT (1 or 2) row tiles x P (1 or 2) panels, over all K. Tiles 0-3 sum C (row
// tile r, panel p in tile 2r + p), 4-5 hold A's row tiles, 6-7 the panels' k blocks. A is bfloat16
// rows lda elements apart, padded to whole tiles; rows and columns say how much of C is real.
template <int RT, int P>
RNNFAST_AMX_TARGET void amx_block(int64_t k_tiles, const uint16_t* A, int64_t lda,
                                  const uint16_t* panel, int64_t panel_stride, float* C,
                                  int64_t ldc, int64_t rows, int64_t columns, bool accumulate) {
  // a whole block loads and stores its C tiles in place (16 rows of 64 bytes, ldc apart); a block
  // at C's edge goes through a buffer, C's part loaded into it first where the block accumulates,
  // so that each output sums C and then the products alike, whole block or not (and its bits do
  // not depend on the rows and columns beside it)
  const bool whole = rows >= RT * kTileRows && columns >= P * kPanel;
  const int64_t c_bytes = ldc * int64_t(sizeof(float));
  float* c1 = C + kTileRows * ldc;
  alignas(64) float out[4][kTileRows * kPanel];
  auto rows_in = [&](int r) { return std::min<int64_t>(kTileRows, rows - r * kTileRows); };
  auto columns_in = [&](int p) { return std::min<int64_t>(kPanel, columns - p * kPanel); };
  if (whole && accumulate) {
    compiler_barrier();
    _tile_loadd(0, C, c_bytes);
    if constexpr (P == 2) _tile_loadd(1, C + kPanel, c_bytes);
    if constexpr (RT == 2) _tile_loadd(2, c1, c_bytes);
    if constexpr (RT == 2 && P == 2) _tile_loadd(3, c1 + kPanel, c_bytes);
  } else if (accumulate) {
    for (int r = 0; r < RT; ++r)
      for (int p = 0; p < P; ++p)
        tile_from(C + r * kTileRows * ldc + p * kPanel, rows_in(r), columns_in(p), ldc,
                  out[2 * r + p]);
    compiler_barrier();
    _tile_loadd(0, out[0], 64);
    if constexpr (P == 2) _tile_loadd(1, out[1], 64);
    if constexpr (RT == 2) _tile_loadd(2, out[2], 64);
    if constexpr (RT == 2 && P == 2) _tile_loadd(3, out[3], 64);
  } else {
    _tile_zero(0);
    if constexpr (P == 2) _tile_zero(1);
    if constexpr (RT == 2) _tile_zero(2);
    if constexpr (RT == 2 && P == 2) _tile_zero(3);
  }
  const int64_t a_bytes = lda * int64_t(sizeof(uint16_t));
  for (int64_t k = 0; k < k_tiles; ++k) {
    const uint16_t* a = A + k * 2 * kTilePairs;
    const uint16_t* b = panel + k * kTilePairs * 2 * kPanel;
    // each load as late as it can be, so that it overlaps the products before it
    _tile_loadd(4, a, a_bytes);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (P == 2) {
      _tile_loadd(7, b + panel_stride, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (RT == 2) {
      _tile_loadd(5, a + kTileRows * lda, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (P == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  if (whole) {
    _tile_stored(0, C, c_bytes);
    if constexpr (P == 2) _tile_stored(1, C + kPanel, c_bytes);
    if constexpr (RT == 2) _tile_stored(2, c1, c_bytes);
    if constexpr (RT == 2 && P == 2) _tile_stored(3, c1 + kPanel, c_bytes);
    compiler_barrier();
    return;
  }
  _tile_stored(0, out[0], 64);
  if constexpr (P == 2) _tile_stored(1, out[1], 64);
  if constexpr (RT == 2) _tile_stored(2, out[2], 64);
  if constexpr (RT == 2 && P == 2) _tile_stored(3, out[3], 64);
  compiler_barrier();
  for (int r = 0; r < RT; ++r)
    for (int p = 0; p < P; ++p)
      store_tile(out[2 * r + p], rows_in(r), columns_in(p), C + r * kTileRows * ldc + p * kPanel,
                 ldc);
}

using AmxBlockFn = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*,
                            int64_t, int64_t, int64_t, bool);

// C[N, M] (+)= A[N_pad, K] times the panels on the tiles, in 2 x 2 tiles of C: the panels in
// blocks that stay in half the L2 while every pair of row tiles passes over them, and within a
// block each row pair's A (2 x 16 rows of K) stays in L1 while the block's panels stream past.
// (Row tiles outer, each panel pair reused from L1 by the next row pair instead, streams A from L2
// once per panel pair: 5-15% slower over bench/tiles.py's shapes; software prefetch of the next
// panel rows into L1 cost another 10%.)
RNNFAST_AMX_TARGET void multiply_panels_amx(int64_t N, int64_t M, int64_t k_tiles,
                                            const uint16_t* A, int64_t lda, const uint16_t* panels,
                                            int64_t panel_stride, float* C, int64_t ldc,
                                            bool accumulate) {
  static const TileConfig config;
  compiler_barrier();
  _tile_loadconfig(&config);
  const int64_t row_tiles = (N + kTileRows - 1) / kTileRows;
  const int64_t panel_count = (M + kPanel - 1) / kPanel;
  const int64_t panel_bytes = panel_stride * int64_t(sizeof(uint16_t));
  const int64_t per_block = std::max<int64_t>(2, l2_cache_bytes() / 2 / panel_bytes / 2 * 2);
  constexpr AmxBlockFn blocks[2][2] = {{amx_block<1, 1>, amx_block<1, 2>},
                                       {amx_block<2, 1>, amx_block<2, 2>}};
  for (int64_t p0 = 0; p0 < panel_count; p0 += per_block) {
    const int64_t p1 = std::min(panel_count, p0 + per_block);
    for (int64_t r = 0; r < row_tiles; r += 2) {
      const int RT = int(std::min<int64_t>(2, row_tiles - r));
      for (int64_t p = p0; p < p1; p += 2) {
        const int P = int(std::min<int64_t>(2, p1 - p));
        const int64_t n0 = r * kTileRows, m0 = p * kPanel;
        blocks[RT - 1][P - 1](k_tiles, A + n0 * lda, lda, panels + p * panel_stride, panel_stride,
                              C + n0 * ldc + m0, ldc, N - n0, M - m0, accumulate);
      }
    }
  }
  _tile_release();  // the thread's 8 KiB of tile state need not be saved on a context switch
}

// The register-only peaks that bench/tiles.py reports the kernels against: `iterations` rounds of
// independent multiply-adds with no memory operand, FLOPs per second of the fastest of 5 runs
template <bool BF16>
RNNFAST_TILE_TARGET double peak_fma(int64_t iterations) {
  constexpr int kAcc = 24;  // chains: more than latency x pipes (4 x 2, or 6 x 2 for vdpbf16ps)
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 a = _mm512_set1_ps(1e-8f), b = _mm512_set1_ps(1.0f);
  for (int64_t it = 0; it < iterations; ++it)
#pragma GCC unroll 24  // whole, so that the chains stay in registers
    for (int i = 0; i < kAcc; ++i) {
      if constexpr (BF16)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)a, (__m512bh)b);
      else
        acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
    }
  __m512 sum = acc[0];
  for (int i = 1; i < kAcc; ++i) sum = _mm512_add_ps(sum, acc[i]);
  volatile float sink = _mm512_reduce_add_ps(sum);
  (void)sink;
  return double(iterations) * kAcc * 16 * 2 * (BF16 ? 2 : 1);
}

RNNFAST_AMX_TARGET double peak_amx(int64_t iterations) {
  static const TileConfig config;
  alignas(64) static const uint16_t zeros[kTileRows * 2 * kTilePairs] = {};
  compiler_barrier();
  _tile_loadconfig(&config);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_loadd(6, zeros, 64);
  _tile_loadd(7, zeros, 64);
  for (int64_t it = 0; it < iterations; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_release();
  return double(iterations) * 4 * kTileRows * kPanel * 2 * kTilePairs * 2;
}

}  // namespace

namespace {

// the row (or column) of W holding each output's weights, once per panel: blocks() divides,
// and a division per element (or per 8 x 8 block) dominated the packing time.
// Packing runs only where the products do (AVX2 and up): its transposes are AVX2 code.
RNNFAST_AVX2_TARGET void pack_panel(const float* W, int64_t ldw, int64_t M, int64_t K,
                                    bool outputs_are_rows, OutputBlocks blocks, int64_t p,
                                    float* panel) {
  const int64_t outputs = std::min(kPanel, M - p * kPanel);
  int64_t index[kPanel];
  for (int64_t c = 0; c < outputs; ++c) index[c] = blocks(p * kPanel + c);
  if (!outputs_are_rows) {  // each k's outputs lie side by side in W (in their blocks)
    const bool adjacent = index[outputs - 1] == index[0] + outputs - 1;
    for (int64_t k = 0; k < K; ++k) {
      float* out = panel + k * kPanel;
      if (adjacent && outputs == kPanel)  // a constant size: inlined, not a call to memcpy
        std::memcpy(out, W + k * ldw + index[0], sizeof(float) * kPanel);
      else if (adjacent)
        std::memcpy(out, W + k * ldw + index[0], sizeof(float) * outputs);
      else
        for (int64_t c = 0; c < outputs; ++c) out[c] = W[k * ldw + index[c]];
      std::fill(out + outputs, out + kPanel, 0.0f);
    }
    return;
  }
  // a transpose, in 8 x 8 register blocks where 8 outputs are 8 consecutive rows of W: element
  // by element it cost a visible share of a batch-1 call (bench/RESULTS.md)
  bool consecutive[kPanel / 8];
  for (int64_t c0 = 0; c0 < kPanel; c0 += 8)
    consecutive[c0 / 8] = c0 + 8 <= outputs && index[c0 + 7] == index[c0] + 7;
  for (int64_t k0 = 0; k0 < K; k0 += 8) {
    for (int64_t c0 = 0; c0 < kPanel; c0 += 8) {
      float* out = panel + k0 * kPanel + c0;
      if (consecutive[c0 / 8] && k0 + 8 <= K) {
        transpose8x8(W + index[c0] * ldw + k0, ldw, out, kPanel);
        continue;
      }
      for (int64_t c = 0; c < 8; ++c)
        for (int64_t k = 0; k < std::min<int64_t>(8, K - k0); ++k)
          out[k * kPanel + c] = c0 + c < outputs ? W[index[c0 + c] * ldw + k0 + k] : 0.0f;
    }
  }
}

// rows [0, n) of op(A) rounded to bfloat16 into out, ldo elements a row, zero past K: A's rows,
// or with `transposed` its columns (A is then [K, lda]), in blocks of 8 rows x 32 k read along
// A's rows (16 rows of op(A) at a time down all of K read 64 bytes from each row of A, a walk
// the prefetchers missed)
RNNFAST_TILE_TARGET void round_operand(bool transposed, int64_t n, int64_t K, const float* A,
                                       int64_t lda, uint16_t* out, int64_t ldo) {
  if (!transposed) return round_rows_to_bf16(n, K, A, lda, out, ldo, ldo);
  constexpr int64_t kStep = 32;
  alignas(64) float block[8][kStep];
  for (int64_t k0 = 0; k0 < K; k0 += kStep) {
    const int64_t kc = std::min(kStep, K - k0);
    const int64_t width = k0 + kStep >= K ? ldo - k0 : kStep;  // the last block zeroes the rest
    for (int64_t i0 = 0; i0 < n; i0 += 8) {
      const int64_t rows = std::min<int64_t>(8, n - i0);
      transpose_blocks(kc, rows, A + k0 * lda + i0, lda, &block[0][0], kStep);
      round_rows_to_bf16(rows, kc, &block[0][0], kStep, out + i0 * ldo + k0, ldo, width);
    }
  }
}

}  // namespace

int packed_tile_rows() { return cpu_has_avx512() ? kMaxRows : kMaxRowsAvx2; }

PackedPanels::PackedPanels(const float* W, int64_t ldw, int64_t M, int64_t K, bool outputs_are_rows,
                           OutputBlocks blocks, bool bf16, StackedWeights<float> stacked)
    : PackedPanels(Deferred{}, W, ldw, M, K, outputs_are_rows, blocks, bf16, stacked) {
  Scratch<float> staging = scratch<float>(bf16 ? staging_size() : 0);
  pack(0, panels_, staging.get());
}

PackedPanels::PackedPanels(Deferred, const float* W, int64_t ldw, int64_t M, int64_t K,
                           bool outputs_are_rows, OutputBlocks blocks, bool bf16,
                           StackedWeights<float> stacked)
    : W_(W),
      ldw_(ldw),
      M_(M),
      K_(K + stacked.K),
      panels_((M + kPanel - 1) / kPanel),
      outputs_are_rows_(outputs_are_rows),
      bf16_(bf16),
      amx_(bf16 && cpu_has_amx_bf16()),
      blocks_(blocks),
      stacked_(stacked),
      data_(scratch<float>(panels_ * (bf16 ? padded_pairs(K_) : K_) * kPanel)) {}

int64_t PackedPanels::staging_size() const { return K_ * kPanel; }

// bfloat16 panels pack in float32 (into staging) and round to pairs, two to each float's slot:
// half the bytes to stream per product
void PackedPanels::pack(int64_t first, int64_t end, float* staging) {
  const int64_t pairs = padded_pairs(K_);
  if (bf16_ && !outputs_are_rows_ && blocks_.size >= M_ && !stacked_.K && first < end) {
    // W's columns as they lie (no blocks): along W's rows, every panel a pair of k at a time (a
    // panel down all of K read 64 bytes from each row of W, a walk the prefetchers missed)
    auto* out = reinterpret_cast<uint16_t*>(data_.get());
    columns_to_bf16(W_, ldw_, K_, M_, first, end, pairs, out);
    return;
  }
  // W's k, then the stacked weights' (float32 straight into the panel, bfloat16 via staging)
  const int64_t K1 = K_ - stacked_.K;
  auto pack_both = [&](int64_t p, float* panel) {
    pack_panel(W_, ldw_, M_, K1, outputs_are_rows_, blocks_, p, panel);
    if (stacked_.K)
      pack_panel(stacked_.W, stacked_.ldw, M_, stacked_.K, outputs_are_rows_, blocks_, p,
                 panel + K1 * kPanel);
  };
  for (int64_t p = first; p < end; ++p) {
    if (!bf16_) {
      pack_both(p, data_.get() + p * K_ * kPanel);
      continue;
    }
    auto* out = reinterpret_cast<uint16_t*>(data_.get() + p * pairs * kPanel);
    pack_both(p, staging);
    panel_to_bf16(staging, K_, pairs, out);
  }
}

int64_t PackedPanels::rounded_width() const { return 2 * padded_pairs(K_); }
int64_t PackedPanels::rounded_rows(int64_t N) const {
  return amx_ ? (N + kTileRows - 1) / kTileRows * kTileRows : N;
}

void PackedPanels::multiply_rounded(int64_t N, const uint16_t* A, float* C, int64_t ldc,
                                    bool accumulate) const {
  const int64_t pairs = padded_pairs(K_), width = 2 * pairs;
  const auto* panels = reinterpret_cast<const uint16_t*>(data_.get());
  if (amx_)
    return multiply_panels_amx(N, M_, pairs / kTilePairs, A, width, panels, pairs * 2 * kPanel, C,
                               ldc, accumulate);
  multiply_panels<uint16_t>(N, M_, (K_ + 1) / 2, A, width, panels, pairs * 2 * kPanel, C, ldc,
                            accumulate);
}

void PackedPanels::multiply(int64_t N, const float* A, int64_t lda, float* C, int64_t ldc,
                            bool accumulate) const {
  if (stacked_.K) throw std::logic_error("rnnfast: a stacked product takes two operands");
  multiply_rows(N, A, lda, nullptr, 0, C, ldc, accumulate);
}

void PackedPanels::multiply_stacked(int64_t N, const float* A, int64_t lda, const float* A2,
                                    int64_t lda2, float* C, int64_t ldc, bool accumulate) const {
  if (!stacked_.K) throw std::logic_error("rnnfast: a product without stacked weights");
  multiply_rows(N, A, lda, A2, lda2, C, ldc, accumulate);
}

void PackedPanels::multiply_rows(int64_t N, const float* A, int64_t lda, const float* A2,
                                 int64_t lda2, float* C, int64_t ldc, bool accumulate) const {
  const int64_t K1 = K_ - stacked_.K;
  if (!bf16_) {
    const SecondRows<float> second{A2, lda2, stacked_.K};
    if (cpu_has_avx512())
      return multiply_panels<float>(N, M_, K1, A, lda, data_.get(), K_ * kPanel, C, ldc, accumulate,
                                    second);
    return multiply_panels_avx2(N, M_, K1, A, lda, data_.get(), C, ldc, accumulate, second);
  }
  // A rounded once per call, its rows padded to the panels' pairs (and on AMX to whole tiles of
  // rows, zero: the tiles multiply all 16); a second operand's rows follow A's in each row
  const int64_t width = rounded_width(), rows = rounded_rows(N);
  if (rows * width > a_capacity_) {
    a_bf16_ = scratch<uint16_t>(rows * width);
    a_capacity_ = rows * width;
  }
  uint16_t* a = a_bf16_.get();
  if (stacked_.K) {
    round_rows_to_bf16(N, K1, A, lda, a, width, K1);
    round_rows_to_bf16(N, stacked_.K, A2, lda2, a + K1, width, width - K1);
  } else {
    round_rows_to_bf16(N, K_, A, lda, a, width, width);
  }
  std::fill(a + N * width, a + rows * width, uint16_t(0));
  multiply_rounded(N, a, C, ldc, accumulate);
}

// k per block of the transposed products: the block's rows of B, packed, take a quarter of the
// L2 (from what the CPU reports and the shape, never the team: the blocks fix the order of sums)
namespace {
int64_t padded_width(int64_t N) { return (N + kPanel - 1) / kPanel * kPanel; }

// k per block: the block's packed rows of every B take a quarter of the L2 (from the shapes and the
// L2 alone, never the team: the blocks fix the order of the sums)
int64_t transposed_k_block(const TransposedTarget* targets, int count) {
  int64_t width = 0;
  for (int i = 0; i < count; ++i) width += padded_width(targets[i].N);
  return std::clamp<int64_t>(
      l2_cache_bytes() / 4 / (std::max<int64_t>(width, 1) * int64_t(sizeof(float))) / 16 * 16, 64,
      512);
}
}  // namespace

int64_t transposed_workspace(int64_t rows, const TransposedTarget* targets, int count) {
  int64_t width = 0;
  for (int i = 0; i < count; ++i) width += padded_width(targets[i].N);
  return transposed_k_block(targets, count) * (width + rows);
}

void multiply_transposed(int64_t M, OutputBlocks blocks, int64_t K, const float* A, int64_t lda,
                         const TransposedTarget* targets, int count, float* workspace) {
  if (M <= 0 || K <= 0) return;
  const int64_t kc = transposed_k_block(targets, count);
  const int64_t group = std::min(M, blocks.size);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kn = std::min(kc, K - k0);
    float* panels[kMaxTransposedTargets];
    float* next = workspace;
    for (int i = 0; i < count; ++i) {
      const TransposedTarget& t = targets[i];
      panels[i] = next;
      for (int64_t p = 0; p < padded_width(t.N) / kPanel; ++p)
        pack_panel(t.B + k0 * t.ldb, t.ldb, t.N, kn, false, {}, p, next + p * kn * kPanel);
      next += padded_width(t.N) * kn;
    }
    float* a_rows = next;
    for (int64_t m0 = 0; m0 < M; m0 += group) {
      const int64_t rows = std::min(group, M - m0), at = blocks(m0);
      // the group's rows of A^T, once for every target: a_rows[r * kn + k] = A[(k0 + k) * lda +
      // at + r]
      transpose_blocks(kn, rows, A + k0 * lda + at, lda, a_rows, kn);
      for (int i = 0; i < count; ++i) {
        const TransposedTarget& t = targets[i];
        float* c = t.C + at * t.ldc;
        if (cpu_has_avx512())
          multiply_panels<float, true>(rows, t.N, kn, a_rows, kn, panels[i], kn * kPanel, c, t.ldc,
                                       true);
        else
          multiply_panels_avx2<true>(rows, t.N, kn, a_rows, kn, panels[i], c, t.ldc, true);
      }
    }
  }
}

double register_peak_flops(const char* kind, int64_t iterations) {
  const std::string k = kind;
  if ((k == "avx512_bf16" && !cpu_has_avx512_bf16()) || (k == "amx_bf16" && !cpu_has_amx_bf16()) ||
      (k == "avx512_fma" && !cpu_has_avx512()))
    throw std::invalid_argument("this CPU has no " + k);
  if (k != "avx512_fma" && k != "avx512_bf16" && k != "amx_bf16")
    throw std::invalid_argument("kind must be avx512_fma, avx512_bf16 or amx_bf16, got " + k);
  double best = 0;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
    const double flops = k == "amx_bf16"      ? peak_amx(iterations)
                         : k == "avx512_bf16" ? peak_fma<true>(iterations)
                                              : peak_fma<false>(iterations);
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, flops / s);
  }
  return best;
}

void parallel_gemm_bf16(int threads, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                        const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                        int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
  // A^T op(B) (A K-major, as in the weight gradients): computed as C^T = op(B)^T A, op(B)^T's
  // rows as the rows of the tiles (B's columns, transposed while rounded, or with trans_b B's
  // rows), A's columns packed as the panels; C^T then transposed into C. Otherwise op(A)'s rows
  // are the tiles' and op(B)'s columns the panels'.
  const bool swap = trans_a;
  const int64_t rows = swap ? N : M, outputs = swap ? M : N;
  const float* tiles_of = swap ? B : A;
  const int64_t ld_tiles = swap ? ldb : lda;
  const bool tiles_transposed = swap ? !trans_b : false;  // op(B)^T's rows are B's columns
  PackedPanels panels(PackedPanels::Deferred{}, swap ? A : B, swap ? lda : ldb, outputs, K,
                      /*outputs_are_rows=*/swap ? false : trans_b, {}, true);
  const int64_t width = panels.rounded_width();
  threads = team_request(int(std::max<int64_t>(1, std::min<int64_t>(threads, (rows + 15) / 16))));
  // the buffers before the team starts, so that nothing in it throws: the tiles' operand rounded
  // (each thread's rows start on a whole tile, so its padding stays inside its own tiles) and
  // every thread's float32 staging rows
  Scratch<uint16_t> rounded =
      scratch<uint16_t>((rows + kTileRows - 1) / kTileRows * kTileRows * width);
  const int64_t staging_size = panels.staging_size();
  Scratch<float> staging = scratch<float>(threads * staging_size);
  Scratch<float> transposed = scratch<float>(swap ? rows * outputs : 0);
  float* out = swap ? transposed.get() : C;
  const int64_t ld_out = swap ? outputs : ldc;
#pragma omp parallel num_threads(threads)
  {
    const int team = std::min(team_size(), threads), me = thread_index();
    float* mine_staging = staging.get() + std::min(me, team - 1) * staging_size;
    if (me < team) {
      const Range packs = split(panels.panel_count(), team, me);
      panels.pack(packs.begin, packs.end, mine_staging);
    }
#pragma omp barrier
    if (me < team) {
      const Range mine = split(rows, team, me, kTileRows);
      if (mine.size() > 0) {
        uint16_t* a = rounded.get() + mine.begin * width;
        const int64_t padded = panels.rounded_rows(mine.size());
        const float* first =
            tiles_transposed ? tiles_of + mine.begin : tiles_of + mine.begin * ld_tiles;
        round_operand(tiles_transposed, mine.size(), K, first, ld_tiles, a, width);
        std::fill(a + mine.size() * width, a + padded * width, uint16_t(0));
        panels.multiply_rounded(mine.size(), a, out + mine.begin * ld_out, ld_out, false);
      }
    }
    if (swap) {
#pragma omp barrier
      if (me < team) {  // C[i, j] = C^T[j, i] for this thread's rows i of C
        const Range mine = split(M, team, me, 8);
        transpose_blocks(N, mine.size(), out + mine.begin, ld_out, C + mine.begin * ldc, ldc);
      }
    }
  }
}

#else  // no packed products off x86-64: StepProduct takes the BLAS (cpu_has_packed_products())

int packed_tile_rows() { return 1; }

PackedPanels::PackedPanels(const float*, int64_t, int64_t, int64_t, bool, OutputBlocks, bool,
                           StackedWeights<float>) {
  throw std::logic_error("rnnfast: packed products exist on x86-64 only");
}

void PackedPanels::multiply(int64_t, const float*, int64_t, float*, int64_t, bool) const {
  throw std::logic_error("rnnfast: packed products exist on x86-64 only");
}

void PackedPanels::multiply_stacked(int64_t, const float*, int64_t, const float*, int64_t, float*,
                                    int64_t, bool) const {
  throw std::logic_error("rnnfast: packed products exist on x86-64 only");
}

void parallel_gemm_bf16(int, bool, bool, int64_t, int64_t, int64_t, const float*, int64_t,
                        const float*, int64_t, float*, int64_t) {
  throw std::logic_error("rnnfast: bfloat16 products exist on x86-64 only");
}

int64_t transposed_workspace(int64_t, const TransposedTarget*, int) { return 0; }

void multiply_transposed(int64_t, OutputBlocks, int64_t, const float*, int64_t,
                         const TransposedTarget*, int, float*) {
  throw std::logic_error("rnnfast: packed products exist on x86-64 only");
}

double register_peak_flops(const char*, int64_t) {
  throw std::invalid_argument("the register peaks are measured on x86-64 only");
}

#endif

}  // namespace rnnfast::cpu
