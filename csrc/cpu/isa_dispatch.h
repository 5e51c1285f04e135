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

// run_inline(isa, f): f() inlined into the build for `isa`, for code that is not a pass of one
// step (f is a lambda marked RNNFAST_INLINE, each its own instantiation).
template <class F>
void inline_baseline(const F& f) {
  f();
}
#if defined(__x86_64__)
template <class F>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"))) void inline_avx512(const F& f) {
  f();
}
template <class F>
__attribute__((target("avx2,fma"))) void inline_avx2(const F& f) {
  f();
}
#endif
template <class F>
inline void run_inline(Isa isa, const F& f) {
#if defined(__x86_64__)
  if (isa == Isa::avx512) return inline_avx512(f);
  if (isa == Isa::avx2) return inline_avx2(f);
#endif
  (void)isa;
  inline_baseline(f);
}

template <auto Pass, class Step>
inline void run_pass(Isa isa, const Step& s) {
  run_inline(isa, [&s]() RNNFAST_INLINE { Pass(s); });
}

}  // namespace rnnfast::cpu
