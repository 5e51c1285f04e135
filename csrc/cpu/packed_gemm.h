// The recurrent product of one step, C[N, M] (+)= A[N, K] op(W), with W packed once per call and
// reused for all T steps. A BLAS re-packs W on every call, and its small-M kernels run far below
// peak; for float32 on AVX-512 or AVX2 + FMA our micro-kernels take over, elsewhere the BLAS does.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <type_traits>

#include "cpu/blas.h"
#include "cpu/scratch.h"

namespace rnnfast::cpu {

// The instruction sets the kernels pick at run time: the library is compiled for its
// architecture's baseline (x86-64, aarch64), and the hot code has AVX2 + FMA and AVX-512 builds.
enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };
// the widest the CPU has, capped by $RNNFAST_ISA ("baseline", "avx2", "avx512"), read once
Isa cpu_isa();
const char* isa_name(Isa isa);
inline bool cpu_has_avx512() { return cpu_isa() == Isa::avx512; }
// AVX512_BF16 (vdpbf16ps), for the opt-in bfloat16 products
bool cpu_has_avx512_bf16();
// AMX-BF16 tiles for those products: the CPU has them, Linux granted the process their state
// (arch_prctl ARCH_REQ_XCOMP_PERM, asked once), and $RNNFAST_ISA is unset or "amx"
bool cpu_has_amx_bf16();
// the L2 cache of one core as the C library reports it (1 MiB where it does not): the AMX
// product's panel blocks take half of it
int64_t l2_cache_bytes();
// whether float32 step products run packed: AVX-512, or AVX2 with FMA
inline bool cpu_has_packed_products() { return cpu_isa() >= Isa::avx2; }
// the most rows of A one packed float32 tile takes (its accumulators fill the vector registers)
int packed_tile_rows();

// Whether output j's weights are row j of W ([M, ldw], so C = A W^T) or column j ([K, ldw], so
// C = A W), and whether a product adds to C or overwrites it: named at every call site.
enum class WeightsBy : bool { column = false, row = true };
enum class Accumulate : bool { no = false, yes = true };

// Where output j's weights lie in W: outputs come in blocks of `size`, block b starting b * stride
// rows (or columns) into W, so that a thread can take all G gates of its units straight from
// w_hh. The default is one block: output j is row (column) j.
struct OutputBlocks {
  int64_t size = INT64_MAX, stride = 0;
  int64_t operator()(int64_t j) const { return j / size * stride + j % size; }
};

// A second weight matrix stacked after W along k (the same outputs, layout and blocks), so that
// one product sums two operands: the step product [x_t, h_{t-1}] [W_ih; W_hh]^T in one call, at
// the step's K = C + H instead of a separate projection at K = C (bench/RESULTS.md, session 15).
template <typename T>
struct StackedWeights {
  const T* W = nullptr;
  int64_t ldw = 0, K = 0;  // K = 0: nothing stacked
};

// W packed into 16-wide column panels, K-major: panel p holds outputs [16p, 16p + 16), zero past M.
class PackedPanels {
 public:
  // outputs_are_rows: output j's weights are row j of W ([M, ldw], so C = A W^T); otherwise they
  // are column j ([K, ldw], so C = A W). bf16: W is kept rounded to bfloat16 and A is rounded
  // likewise on each multiply, the sums stay float32 (the caller has checked
  // cpu_has_avx512_bf16(): StepProduct does).
  // stacked: panels of K + stacked.K k, the stacked weights' after W's (then multiply_stacked).
  PackedPanels(const float* W, int64_t ldw, int64_t M, int64_t K, bool outputs_are_rows,
               OutputBlocks blocks = {}, bool bf16 = false, StackedWeights<float> stacked = {});
  // C[N, M] = A[N, K] op(W), or += with accumulate; A rows lda apart, C rows ldc apart. Not safe
  // to call from two threads at once (bfloat16 rounds A into a buffer of the object's own).
  void multiply(int64_t N, const float* A, int64_t lda, float* C, int64_t ldc,
                bool accumulate) const;
  // with stacked weights: C (+)= A[N, K] op(W) + A2[N, stacked.K] op(stacked.W), one sum per
  // output in k order (A's k, then A2's)
  void multiply_stacked(int64_t N, const float* A, int64_t lda, const float* A2, int64_t lda2,
                        float* C, int64_t ldc, bool accumulate) const;

  // For a team that packs W together and rounds its own rows of A (parallel_gemm_bf16): the
  // object allocates, pack(first, end) fills panels [first, end) (bfloat16 through staging, a
  // buffer of staging_size() floats), and multiply_rounded takes A already in bfloat16:
  // rounded_rows(N) rows of rounded_width() elements, zero past K and past row N.
  struct Deferred {};
  PackedPanels(Deferred, const float* W, int64_t ldw, int64_t M, int64_t K, bool outputs_are_rows,
               OutputBlocks blocks, bool bf16, StackedWeights<float> stacked = {});
  int64_t panel_count() const { return panels_; }
  int64_t staging_size() const;
  void pack(int64_t first, int64_t end, float* staging);
  int64_t rounded_width() const;
  int64_t rounded_rows(int64_t N) const;
  void multiply_rounded(int64_t N, const uint16_t* A, float* C, int64_t ldc, bool accumulate) const;

 private:
  void multiply_rows(int64_t N, const float* A, int64_t lda, const float* A2, int64_t lda2,
                     float* C, int64_t ldc, bool accumulate) const;
  const float* W_;
  int64_t ldw_, M_, K_, panels_;  // K_: W's k and the stacked weights' together
  bool outputs_are_rows_, bf16_, amx_;
  OutputBlocks blocks_;
  StackedWeights<float> stacked_;
  // float32 panels [K][16], or bfloat16 ones [pairs][16][2], pairs padded with zeros to a whole
  // AMX tile (16 pairs)
  Scratch<float> data_{nullptr, release_scratch};
  mutable Scratch<uint16_t> a_bf16_{nullptr, release_scratch};
  mutable int64_t a_capacity_ = 0;
};

// C[M, N] = op(A) op(B), both operands rounded to bfloat16 and the sums float32, on AMX tiles where
// the CPU has them (else AVX512_BF16, which the caller has checked), on a team of `threads`: the
// large products after the loop of a bfloat16 training step, and rnnfast.ops.gemm's.
void parallel_gemm_bf16(int threads, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                        const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                        int64_t ldc);

// C += A^T B for A [K, ...] and each target's B [K, N], row-major float32, on this thread,
// through the packed tiles (cpu_has_packed_products() only): the weight gradients dG^T x and
// dG^T h, summed chunk by chunk inside the backward loop by the thread that wrote those columns of
// dG. Row m of A^T is A's column blocks(m) and goes to row blocks(m) of each C: M rows in groups
// of blocks.size (a thread's units in each gate), each group's columns of A transposed once for
// all targets. Each output is one sum in k order, in blocks of k that depend on the targets'
// widths and the L2 size alone, so the bits do not depend on how a team splits the rows.
// workspace: transposed_workspace(rows of a group, targets, count) floats.
struct TransposedTarget {
  const float* B;
  int64_t ldb, N;
  float* C;
  int64_t ldc;
};
constexpr int kMaxTransposedTargets = 2;
int64_t transposed_workspace(int64_t rows, const TransposedTarget* targets, int count);
void multiply_transposed(int64_t M, OutputBlocks blocks, int64_t K, const float* A, int64_t lda,
                         const TransposedTarget* targets, int count, float* workspace);

// FLOPs per second on this core of a register-only loop of `iterations` rounds of independent
// multiply-adds, the fastest of 5: kind "avx512_fma" (float32), "avx512_bf16" (vdpbf16ps) or
// "amx_bf16" (tdpbf16ps); std::invalid_argument for a kind the CPU lacks. For bench/tiles.py.
double register_peak_flops(const char* kind, int64_t iterations);

// The step product through the packed kernels where they apply (float32) and pay, else
// through the BLAS on W as it lies, one call per output block. Built once per thread per call.
template <typename T>
class StepProduct {
 public:
  // Whether packing W pays for `rows` rows through the product in one call. Packing costs about
  // as much as 16 rows through the BLAS while the packed W fits in half the L2 (512 KiB on the
  // 1 MiB L2 where this was measured), and proportionally more beyond that, where each step
  // streams W from L3 whatever its layout (the measured crossovers are in bench/RESULTS.md,
  // "Figures behind code comments").
  static bool packing_pays(int64_t M, int64_t K, int64_t rows) {
    const int64_t half_l2 = l2_cache_bytes() / 2;
    const int64_t l2_shares = std::max<int64_t>(1, M * K * int64_t(sizeof(float)) / half_l2);
    return rows >= 16 * l2_shares;
  }
  // Whether a step of N rows should take the input's product too, stacked under the recurrent
  // one (StackedWeights): where the step's rows fill a tile of the packed kernels, so that every
  // weight loaded serves a whole tile's multiply-adds, and the whole layer's packed weights, M
  // outputs of K + stacked_K (bfloat16: half the bytes), fit in one core's L2, so that any
  // team's shares do too: every team then makes the same choice (the same sums, the same bits).
  // Elsewhere the step would stream w_ih from L3 at every step: slower than the projection a
  // chunk of steps at a time (bench/RESULTS.md, session 15).
  static bool stacking_pays(int64_t N, int64_t M, int64_t K, int64_t stacked_K, bool bf16) {
    if (!std::is_same_v<T, float> || !cpu_has_packed_products()) return false;
    const int64_t bytes = M * (K + stacked_K) * (bf16 ? 2 : int64_t(sizeof(float)));
    return N >= packed_tile_rows() && bytes <= l2_cache_bytes();
  }
  // bf16: the products in bfloat16 (float32 only, on AVX512_BF16, always packed; else throws).
  // stacked: a second operand's weights after W's (then the call with two operands), packed
  // with W where W is, else a second BLAS call per product.
  StepProduct(const T* W, int64_t ldw, int64_t M, int64_t K, WeightsBy weights, OutputBlocks blocks,
              int64_t rows, bool bf16 = false, StackedWeights<T> stacked = {})
      : W_(W),
        ldw_(ldw),
        M_(M),
        K_(K),
        outputs_are_rows_(weights == WeightsBy::row),
        blocks_(blocks),
        stacked_(stacked) {
    if (bf16 && !(std::is_same_v<T, float> && cpu_has_avx512_bf16()))
      throw std::invalid_argument("bfloat16 products need float32 and a CPU with AVX512_BF16");
    if constexpr (std::is_same_v<T, float>)
      if (M > 0 && K + stacked.K > 0 &&
          (bf16 || (cpu_has_packed_products() && packing_pays(M, K + stacked.K, rows))))
        packed_ =
            std::make_unique<PackedPanels>(W, ldw, M, K, outputs_are_rows_, blocks, bf16, stacked);
  }
  // C (+)= A op(W) + A2 op(stacked W), for a product with stacked weights
  void operator()(int64_t N, const T* A, int64_t lda, const T* A2, int64_t lda2, T* C, int64_t ldc,
                  Accumulate add) const {
    if constexpr (std::is_same_v<T, float>)
      if (packed_)
        return packed_->multiply_stacked(N, A, lda, A2, lda2, C, ldc, add == Accumulate::yes);
    blas_product(W_, ldw_, K_, N, A, lda, C, ldc, add);
    blas_product(stacked_.W, stacked_.ldw, stacked_.K, N, A2, lda2, C, ldc, Accumulate::yes);
  }
  void operator()(int64_t N, const T* A, int64_t lda, T* C, int64_t ldc, Accumulate add) const {
    if constexpr (std::is_same_v<T, float>)
      if (packed_) return packed_->multiply(N, A, lda, C, ldc, add == Accumulate::yes);
    blas_product(W_, ldw_, K_, N, A, lda, C, ldc, add);
  }

 private:
  void blas_product(const T* W, int64_t ldw, int64_t K, int64_t N, const T* A, int64_t lda, T* C,
                    int64_t ldc, Accumulate add) const {
    const bool accumulate = add == Accumulate::yes;
    // float64 goes through the BLAS in calls of kDoubleColumns outputs: OpenBLAS picks its
    // kernels, and with them the order of its sums, by a call's shape, and a thread's share of
    // the outputs (so the shape) depends on the team; outputs start on multiples of 16 in every
    // team (a thread's units do), so each output sees the same call shapes and bits in any team.
    // float32 keeps whole blocks (this path is its few-rows case, where calls cost the most).
    constexpr int64_t kDoubleColumns = 16;
    const int64_t size = std::min(M_, blocks_.size);
    const int64_t chunk = std::is_same_v<T, double> ? std::min(size, kDoubleColumns) : size;
    for (int64_t b = 0; b < M_; b += size)
      for (int64_t j = b; j < std::min(M_, b + size); j += chunk) {
        const T* w = W + (outputs_are_rows_ ? blocks_(j) * ldw : blocks_(j));
        gemm<T>(false, outputs_are_rows_, N, std::min({chunk, M_ - j, b + size - j}), K, T(1), A,
                lda, w, ldw, accumulate ? T(1) : T(0), C + j, ldc);
      }
  }

  const T* W_;
  int64_t ldw_, M_, K_;
  bool outputs_are_rows_;
  OutputBlocks blocks_;
  StackedWeights<T> stacked_;
  std::unique_ptr<PackedPanels> packed_;  // float32 on AVX-512 or AVX2 + FMA only
};

}  // namespace rnnfast::cpu
