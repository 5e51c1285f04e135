// Recurrent dropout and zoneout: which units a training step keeps, from a counter-based generator
// (Philox-4x32-10, Salmon et al. 2011) keyed by the call's seed and counted by the element's
// (unit, row, step / 4, stream and purpose), its four words serving steps 4b .. 4b + 3 (one
// evaluation draws four steps' masks). A mask is a pure function of those, so the CPU and the
// GPU, any thread count and the backward (which recomputes the masks instead of storing them) all
// see the same bits. Shared by the CPU and CUDA kernels and the bindings
// (rnnfast.ops.recurrent_masks).
#pragma once

#include <cstdint>

#include "rnnfast/cell.h"

namespace rnnfast {

struct Philox4 {
  uint32_t w[4];
};

// Philox-4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1): four 32-bit words.
RNNFAST_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                 uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round) {  // the key schedule: Weyl increments between rounds
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// What a mask is for: part of the counter, so that the masks of one call are independent.
enum class NoisePurpose : uint32_t {
  candidate = 1,    // recurrent dropout on the candidate (Semeniuta et al.), a fresh mask a step
  variational = 2,  // recurrent dropout on h_{t-1} into the product (Gal and Ghahramani)
  zoneout = 3,      // zoneout on h (Krueger et al.): 1 = take the new value
};

// A call's dropout and zoneout. Probabilities arrive with their keep thresholds: an element is
// kept (a zoneout unit takes its new value) when its 32-bit draw is >= the threshold,
// floor(p * 2^32) (rnnfast/_validate.py computes it, so every backend compares the same integers).
struct Noise {
  uint64_t seed = 0;
  uint32_t stream = 0;  // the layer and direction: 2 * layer + direction
  double candidate = 0, zoneout = 0, variational = 0;
  uint32_t candidate_threshold = 0, zoneout_threshold = 0, variational_threshold = 0;
  bool expectation = false;  // inference: no dropout, zoneout's expectation p h_{t-1} + (1-p) h
};

// The four draws of (unit, row) of `purpose` for steps 4 * block .. 4 * block + 3.
RNNFAST_HD Philox4 noise_draws(uint64_t seed, uint32_t stream, NoisePurpose purpose, int64_t block,
                               int64_t row, int64_t unit) {
  return philox4x32_10(uint32_t(unit), uint32_t(row), uint32_t(block),
                       (stream << 4) | uint32_t(purpose), uint32_t(seed), uint32_t(seed >> 32));
}

// Whether element (step, row, unit) of `purpose` is kept: its draw against the threshold.
RNNFAST_HD bool noise_keeps(uint64_t seed, uint32_t stream, NoisePurpose purpose,
                            uint32_t threshold, int64_t step, int64_t row, int64_t unit) {
  return noise_draws(seed, stream, purpose, step / 4, row, unit).w[step % 4] >= threshold;
}

}  // namespace rnnfast
