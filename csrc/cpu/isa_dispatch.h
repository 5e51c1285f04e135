// Run-time choice of instruction set for the pointwise passes: a pass is inlined into three
// wrappers compiled for AVX-512, AVX2 + FMA and the architecture's baseline, and cpu_isa()
// (packed_gemm.h) picks one per call.
#pragma once

#include "cpu/packed_gemm.h"

namespace rnnfast::cpu {

// A pass is inlined into three wrappers, for AVX-512, AVX2 + FMA and the
// architecture's baseline (what the library is compiled for), picked by cpu_isa(): the passes'
// polynomial math vectorises twice as wide on AVX-512 as on AVX2 (a quarter to a third of an
// LSTM step at H = 128, bench/RESULTS.md). Pass is a static function of one argument, e.g. a cell's
// &Cell::template forward<T>.
#define RNNFAST_INLINE __attribute__((always_inline))
#define RNNFAST_PASS RNNFAST_INLINE inline

template <auto Pass, class Step>
void pass_baseline(const Step& s) {
  Pass(s);
}
#if defined(__x86_64__)
template <auto Pass, class Step>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"))) void pass_avx512(const Step& s) {
  Pass(s);
}
template <auto Pass, class Step>
__attribute__((target("avx2,fma"))) void pass_avx2(const Step& s) {
  Pass(s);
}
#endif
template <auto Pass, class Step>
inline void run_pass(Isa isa, const Step& s) {
#if defined(__x86_64__)
  if (isa == Isa::avx512) return pass_avx512<Pass>(s);
  if (isa == Isa::avx2) return pass_avx2<Pass>(s);
#endif
  (void)isa;
  pass_baseline<Pass>(s);
}

}  // namespace rnnfast::cpu
