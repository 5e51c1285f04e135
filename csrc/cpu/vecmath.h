// Branch-free float32 exp, tanh and sigmoid that the compiler vectorises inside `omp simd` loops
// (libm's scalar calls cost more than the recurrent GEMM at small batch). Cephes' minimax
// polynomials: about 2 ulp from libm over the whole range; NaN stays NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "rnnfast/cell.h"

namespace rnnfast::cpu {

// Always inlined: a call inside a pass's simd loop stops its vectorisation, and with enough
// instantiations of the passes (each cell's compile-time flags) GCC's inliner stopped inlining
// these on its own (the LSTM's inference pass ran scalar, 2.5x slower at (64, 25, 128)).
#define RNNFAST_MATH __attribute__((always_inline)) inline

RNNFAST_MATH float exp_poly(float x) {
  // exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2], ln2 split in two (Cody-Waite)
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  // 2^n built from n's bits, n in [-126, 128]: adding 1.5 * 2^23 puts n in the low mantissa
  // bits. No float-to-int conversion, which would be undefined for NaN (e carries the NaN)
  const float shifted = n + 12582912.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

RNNFAST_MATH float tanh_poly(float x) {
  const float a = std::fabs(x);
  // small |x|: odd polynomial, no cancellation; else 1 - 2 / (exp(2|x|) + 1)
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = x + x * z * p;
  const float large = std::copysign(1.0f - 2.0f / (exp_poly(2.0f * a) + 1.0f), x);
  return a < 0.625f ? small : large;
}

struct PolyMath {
  static RNNFAST_MATH float tanh(float a) { return tanh_poly(a); }
  static RNNFAST_MATH float sigmoid(float a) { return 1.0f / (1.0f + exp_poly(-a)); }
};

// float takes the polynomials; double keeps libm (it is the checking precision)
template <typename T>
struct MathFor {
  using type = StdMath;
};
template <>
struct MathFor<float> {
  using type = PolyMath;
};
template <typename T>
using Math = typename MathFor<T>::type;

}  // namespace rnnfast::cpu
