// The drivers every cell runs. Forward: each thread owns a slice of the hidden units; it projects
// a chunk of inputs onto its units' gates, then runs the cell's step for each t (by default:
// h_{t-1} times its units' w_hh rows, the cell's pointwise pass, one barrier; where it pays, x_t
// and h_{t-1} in one product instead, ForwardThread::stacks_input). Backward mirrors it
// and finishes with the weight gradients and dx as large GEMMs. A cell is a struct with its kind
// (its row of the cell table, rnnfast/cell.h), its two pointwise passes and, where the default step
// does not fit it, steps of its own; the drivers read the table, never the kind.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>

#include "cpu/blas.h"
#include "cpu/isa_dispatch.h"
#include "cpu/kernels.h"
#include "cpu/layer_norm.h"
#include "cpu/packed_gemm.h"
#include "cpu/parallel.h"
#include "cpu/scratch.h"

namespace rnnfast::cpu {

// Layer norm's part of one step of one thread (csrc/cpu/layer_norm.h); steps without it have none.
// The hat arrays are the reserve's slots of the step (null in an inference forward).
template <typename T>
struct LayerNormStep {
  const T* gamma_ih{};  // [G*H] the x product's gains
  const T* gamma_hh{};  // [G*H] the h product's
  const T* gamma_c{};   // [H] c's gain and bias, cells with c
  const T* beta_c{};
  LnPartials partials{};  // the team's block sums
  const T* x_hat{};       // [N, G*H] the normalised x product (normalised a chunk ahead)
  T* h_hat{};             // [N, G*H] the normalised h product: out in training, in for backward
  T* c_hat{};             // [N, H] cells with c
  T* rstd{};              // [N, 3] 1/sqrt(var + eps) of the x product, the h product and c
                          // (training; the x product's is written a chunk ahead)
  T* gates{};             // forward in inference: [N, G*H] the gates the pass after c's reads
  T* gx{};                // forward: [N, G*units] this thread's gained x product
  T* gh{};  // forward: [N, G*units] this thread's h product, normalised in place (ForwardStep::gh,
            // which the passes read as const)
  T* dgamma_hh{};  // backward: the gradients, summed by the threads that own the units
  T* dgamma_c{};
  T* dbeta_c{};
  T* dc_hat{};  // backward: [N, H] the gradient reaching c's normalised value, then c
};

// One thread's slice of one forward step.
template <typename T>
struct ForwardStep {
  int64_t N, H, R, t;        // R: the size of h (Dims::R)
  Range units{};             // the hidden units this thread owns
  const int32_t* lengths{};  // [N] or null
  // [N, G*units] this thread's input projection, without biases; null where the step's product
  // takes x_t itself (ForwardThread::stacks_input), so that gh holds both products
  const T* gx{};
  const T* x{};            // [N, C] x_t where the step's product takes it, else null
  const T* bx{};           // [G*H] b_ih plus the parts of b_hh that are plain sums: add to gx
  const T* gh{};           // [N, G*units] this thread's recurrent product, gate-major per row
  const T* bhn{};          // [H] GRU: b_hn, kept out of gx since r multiplies it; else null
  const T* h_prev{};       // [N, R] (R = H but with a projection, Dims::R)
  const T* c_prev{};       // [N, H] LSTM, else null
  const T* peephole{};     // [3, H] w_peephole (rows i, f, o), or null
  T* h{};                  // [N, R] out: zero where t >= length
  T* c{};                  // [N, H] out, LSTM: carried unchanged where t >= length
  T* gates{};              // [N, G*H] out, training only (else null)
  T* ghn{};                // [N, H] out, GRU training only (else null)
  T* rh{};                 // [N, H] out, reset_before: r * h_{t-1}, read by the whole team
  T* m{};                  // [N, H] out, with a projection: o * tanh(c), which W_hr projects to h
  const T* drop{};         // [N, units] candidate dropout's scale (0 or 1/(1-p)), or null
  const Noise* zoneout{};  // zoneout on h (after_pass), or null
  const uint8_t* taken{};  // [N, units] zoneout in training: 1 where h takes its new value
  // what the recurrent products multiply: h_{t-1}, or with variational dropout h_{t-1} * vscale
  const T* h_product{};          // [N, R]
  const T* vscale{};             // [N, R] variational dropout's scale (0 or 1/(1-p)), or null
  T* h_product_next{};           // [N, R] with vscale: out, this thread's columns of h_t * vscale
  const LayerNormStep<T>* ln{};  // or null
  bool valid(int64_t n) const { return !lengths || t < lengths[n]; }
};

// One thread's slice of one backward step.
template <typename T>
struct BackwardStep {
  int64_t N, H, R, t;  // R: the size of h (Dims::R)
  Range units{};
  const int32_t* lengths{};  // [N] or null
  const T* dy{};             // [N, R] (zeros where the caller gave none)
  const T* h_prev{};         // [N, R]
  const T* h{};              // [N, R]
  const T* c_prev{};         // [N, H] LSTM
  const T* c{};              // [N, H] LSTM
  const T* gates{};          // [N, G*H] post-activation gates (LSTM, GRU)
  const T* ghn{};            // [N, H] GRU
  const T* peephole{};       // [3, H] w_peephole, or null
  T* dpeephole{};    // [3, H] w_peephole's gradient, summed step by step (this thread's units)
  T* drh{};          // [N, units] reset_before: this thread's columns of d(r * h_{t-1})
  T* dh_seq{};       // [N, R] with a projection: h_t's total gradient, kept for dw_hr
  T* dm{};           // [N, H] with a projection: the gradient of o * tanh(c), read by the pass
  const T* zeros{};  // [N, max(R, H)] zeros
  T* dh{};   // [N, R] in: gradient reaching h_t from later steps; out: its path to h_{t-1} that
             // bypasses w_hh (the GEMM adds the rest)
  T* dc{};   // [N, H] LSTM: in dc_t, out dc_{t-1}
  T* dgx{};  // [N, G*H] out: gradient of the x-side pre-activations
  T* dgh{};  // [N, G*H] out: of the h-side products; the same buffer as dgx but for GRU
  const T* drop{};  // [N, units] candidate dropout's scale, as in the forward, or null
  // what the forward's products multiplied (h_prev, or h_prev * vscale: this thread's columns
  // are current), and where the gradient reaching it goes: dh, or apart to be scaled by vscale
  const T* h_product{};          // [N, R]
  T* dh_product{};               // [N, R]
  const LayerNormStep<T>* ln{};  // or null
  bool valid(int64_t n) const { return !lengths || t < lengths[n]; }
};

// Rows apart: where every thread's share of the batch fills a tile of the packed kernels and the
// layer's G*H x (C + R) weights (4 bytes each, 2 in bfloat16) take at most half of one core's L2
// (each core then keeps all of them, its rows' state beside them), the threads of a loop over steps
// split the batch and not the units, each running its rows' recurrence over every unit as a team
// of one: no barrier between steps and no h_t or dh crossing between cores. Each output's sum
// runs over k alone whatever the rows beside it, so the bits are those of the units split.
inline bool rows_apart_pays(int64_t N, int team, int64_t weight_bytes) {
  return team > 1 && cpu_has_packed_products() && N >= team * packed_tile_rows() &&
         2 * weight_bytes <= l2_cache_bytes();
}

// A step too small to share is not worth a barrier; otherwise each thread owns >= 16 units.
inline int recurrent_threads(const Dims& d) {
  if (d.N * d.GH() * d.H < 64 * 1024) return 1;
  return team_request(int(std::min<int64_t>(get_num_threads(), (d.H + 15) / 16)));
}

// A C++ exception must not leave an OpenMP region (it would terminate the process): a thread's
// setup (allocation, packing) runs through this, every thread then meets one barrier, and if any
// setup failed the whole team skips its work; the caller rethrows after the region.
class TeamSetup {
 public:
  template <class F>
  bool run(F&& setup) {
    try {
      setup();
    } catch (...) {
#pragma omp critical(rnnfast_team_setup)
      if (!error_) error_ = std::current_exception();
      failed_ = true;
    }
#pragma omp barrier
    return !failed_;
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

// sum[g*H + j] += the N rows of rows[n, g*H + j] ([N, G*H]), for this thread's units j.
template <typename T>
RNNFAST_PASS void add_gate_rows(int64_t N, int64_t G, int64_t H, Range units, const T* rows,
                                T* sum) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const T* row = rows + n * G * H + g * H;
      T* out = sum + g * H;
#pragma omp simd
      for (int64_t j = units.begin; j < units.end; ++j) out[j] += row[j];
    }
}

// Zeroes a padded row's gate gradients for this thread's units (G gates).
template <typename T>
void zero_gate_rows(int64_t G, int64_t H, Range units, T* row) {
  for (int64_t g = 0; g < G; ++g)
    std::fill(row + g * H + units.begin, row + g * H + units.end, T(0));
}

inline void team_barrier(int team) {
  if (team > 1) {
#pragma omp barrier
  }
}

// ---- recurrent dropout and zoneout (rnnfast/noise.h) ----------------------------------------

// One purpose's keep masks for a thread's rows and units, [rows, units] a step, drawn four steps
// at a time (one Philox evaluation per row and unit gives steps 4b .. 4b + 3, rnnfast/noise.h)
// as the steps reach a new block, forward or backward. Keyed by the batch row, so the masks are
// the same whichever thread draws them.
class StepMasks {
 public:
  StepMasks(const Noise& z, NoisePurpose purpose, uint32_t threshold, Range rows, Range units)
      : z_(z),
        purpose_(purpose),
        threshold_(threshold),
        rows_(rows),
        units_(units),
        isa_(cpu_isa()),
        data_(scratch<uint8_t>(4 * rows.size() * units.size())) {}
  const uint8_t* at(int64_t t) {
    if (t / 4 != block_) draw(t / 4);
    return data_.get() + (t % 4) * rows_.size() * units_.size();
  }

 private:
  void draw(int64_t block) {
    block_ = block;
    run_inline(isa_, [this, block]() RNNFAST_INLINE {
      keep_masks(z_.seed, z_.stream, purpose_, threshold_, block, rows_, units_, data_.get());
    });
  }
  // [4, rows, units]: steps 4 * block .. 4 * block + 3. The arguments are values and out is
  // restrict, so that the byte stores alias nothing the loop reads and it vectorises.
  RNNFAST_INLINE static void keep_masks(uint64_t seed, uint32_t stream, NoisePurpose purpose,
                                        uint32_t threshold, int64_t block, Range rows, Range units,
                                        uint8_t* __restrict out) {
    const int64_t nu = units.size(), NU = rows.size() * nu;
    for (int64_t n = 0; n < rows.size(); ++n) {
      uint8_t* o = out + n * nu;
#pragma omp simd
      for (int64_t u = 0; u < nu; ++u) {
        const Philox4 r =
            noise_draws(seed, stream, purpose, block, rows.begin + n, units.begin + u);
        o[u] = r.w[0] >= threshold;
        o[NU + u] = r.w[1] >= threshold;
        o[2 * NU + u] = r.w[2] >= threshold;
        o[3 * NU + u] = r.w[3] >= threshold;
      }
    }
  }
  const Noise& z_;
  NoisePurpose purpose_;
  uint32_t threshold_;
  Range rows_;
  Range units_;
  Isa isa_;
  Scratch<uint8_t> data_;
  int64_t block_ = -1;
};

// A step's candidate-dropout scales from its mask: 0 where dropped, 1/(1-p) where kept. Values
// and restrict pointers, and a product in place of a branch: written as `kept[k] ? scale : 0`
// through the lambda's references it compiled to a scalar loop branching on random bits (7% of
// an LSTM training step's samples at (64, 25, 128), bench/RESULTS.md, session 17).
template <typename T>
RNNFAST_INLINE inline void scales_of_mask(const uint8_t* __restrict kept, int64_t count, T scale,
                                          T* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) out[k] = T(kept[k]) * scale;
}

template <typename T>
void candidate_scales(Isa isa, const Noise& z, const uint8_t* kept, int64_t count, T* out) {
  const T scale = T(1) / (T(1) - T(z.candidate));
  run_inline(isa, [&]() RNNFAST_INLINE { scales_of_mask(kept, count, scale, out); });
}

// The scales of variational dropout, [N, R]: one mask per row for the whole sequence.
template <typename T>
RNNFAST_INLINE inline void variational_row(uint64_t seed, uint32_t stream, uint32_t threshold,
                                           int64_t n, int64_t R, T kept, T* __restrict out) {
#pragma omp simd
  for (int64_t j = 0; j < R; ++j)
    out[j] = noise_keeps(seed, stream, NoisePurpose::variational, threshold, 0, n, j) ? kept : T(0);
}

template <typename T>
void variational_scales(Isa isa, const Noise& z, int64_t N, int64_t R, T* out) {
  const T kept = T(1) / (T(1) - T(z.variational));
  run_inline(isa, [&]() RNNFAST_INLINE {
    for (int64_t n = 0; n < N; ++n)
      variational_row(z.seed, z.stream, z.variational_threshold, n, R, kept, out + n * R);
  });
}

// h * vscale for the columns `cols` of every row, where the next products read it
template <typename T>
void scale_columns(Isa isa, int64_t N, int64_t R, Range cols, const T* h, const T* vscale, T* out) {
  run_inline(isa, [&]() RNNFAST_INLINE {
    for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
      for (int64_t j = cols.begin; j < cols.end; ++j)
        out[n * R + j] = h[n * R + j] * vscale[n * R + j];
    }
  });
}

// Zoneout on the thread's units of h_t: where the unit is zoned out h_t = h_{t-1}, else the new
// value; in inference p h_{t-1} + (1-p) h_new. Rows past their length are left as the pass
// wrote them.
template <typename T>
RNNFAST_PASS void zoneout_units(const ForwardStep<T>& s) {
  const Noise& z = *s.zoneout;
  const T p = T(z.zoneout);
  for (int64_t n = 0; n < s.N; ++n) {
    if (!s.valid(n)) continue;
    const T* h_prev = s.h_prev + n * s.R;
    T* h = s.h + n * s.R;
    if (z.expectation) {
#pragma omp simd
      for (int64_t j = s.units.begin; j < s.units.end; ++j)
        h[j] = p * h_prev[j] + (T(1) - p) * h[j];
      continue;
    }
    const uint8_t* taken = s.taken + n * s.units.size();
#pragma omp simd
    for (int64_t u = 0; u < s.units.size(); ++u) {
      const int64_t j = s.units.begin + u;
      h[j] = taken[u] ? h[j] : h_prev[j];
    }
  }
}

// What every step runs on the thread's units after the cell's pass wrote h_t there, before the
// step's last barrier: zoneout, then, with variational dropout, the masked copy of h_t that the
// next step's products read.
template <typename T>
void after_pass(Isa isa, const ForwardStep<T>& s) {
  if (s.zoneout) run_pass<&zoneout_units<T>>(isa, s);
  if (s.vscale) scale_columns(isa, s.N, s.R, s.units, s.h, s.vscale, s.h_product_next);
}

// Backward of zoneout, before the cell's pass: h_t's gradient (dh + dy) goes to the new value
// where it was taken, else straight to h_{t-1} (`carry`, [N, units], added after the step). The
// pass then reads dh alone (its dy is zeros).
template <typename T>
void split_zoneout_gradient(Isa isa, const uint8_t* taken_all, const BackwardStep<T>& s,
                            const T* dy, T* carry) {
  const int64_t nu = s.units.size();
  run_inline(isa, [&]() RNNFAST_INLINE {
    for (int64_t n = 0; n < s.N; ++n) {
      T* dh = s.dh + n * s.R;
      T* out = carry + n * nu;
      if (!s.valid(n)) {  // a padded row passes dh through its pass untouched
        std::fill(out, out + nu, T(0));
        continue;
      }
      const T* dy_row = dy + n * s.R;
      const uint8_t* taken_row = taken_all + n * nu;
#pragma omp simd
      for (int64_t u = 0; u < nu; ++u) {
        const int64_t j = s.units.begin + u;
        const T total = dh[j] + dy_row[j];
        const bool taken = taken_row[u];
        dh[j] = taken ? total : T(0);
        out[u] = taken ? T(0) : total;
      }
    }
  });
}

template <typename T>
void add_zoneout_carry(Isa isa, const BackwardStep<T>& s, const T* carry) {
  const int64_t nu = s.units.size();
  run_inline(isa, [&]() RNNFAST_INLINE {
    for (int64_t n = 0; n < s.N; ++n) {
      T* dh = s.dh + n * s.R + s.units.begin;
#pragma omp simd
      for (int64_t u = 0; u < nu; ++u) dh[u] += carry[n * nu + u];
    }
  });
}

// ---- layer normalisation of the products (csrc/cpu/layer_norm.h) -------------------------------
// The x product is normalised a chunk of steps ahead (run_forward) and its backward follows the
// loop (ln_input_product_backward). The steps of a cell with layer_norm use these around its
// passes for the h product: forward, its block sums (a barrier) and the normalised, gained values
// of both products, which the cell's pass then reads in place of the raw products; backward,
// after the pass has written the gradients of those values to dgx and dgh, dgh's block sums (a
// barrier) and the gradient of the raw h product. dgx stays the gradient of the gained x side.

// Forward: each valid row's block sums of this thread's columns of the h product.
template <int64_t G, typename T>
RNNFAST_PASS void ln_product_sums(const ForwardStep<T>& s) {
  const LnPartials& p = s.ln->partials;
  const int64_t width = G * s.units.size();
  for (int64_t n = 0; n < s.N; ++n)
    if (s.valid(n))
      ln_block_sums(G, s.H, s.units, s.gh + n * width, s.units.size(), p.at(n, kLnH),
                    p.at(n, kLnH + 1));
}

// ln->gx[n, g*units + j] = x_hat[n, g*H + j] * gamma_ih[g*H + j] for the thread's units j
template <int64_t G, typename T>
RNNFAST_INLINE inline void ln_gain_x_product(const ForwardStep<T>& s, int64_t n) {
  const LayerNormStep<T>& ln = *s.ln;
  const int64_t nu = s.units.size(), ub = s.units.begin;
  for (int64_t g = 0; g < G; ++g) {
    const T* hat = ln.x_hat + n * G * s.H + g * s.H + ub;
    const T* gamma = ln.gamma_ih + g * s.H + ub;
    T* out = ln.gx + n * G * nu + g * nu;
#pragma omp simd
    for (int64_t u = 0; u < nu; ++u) out[u] = hat[u] * gamma[u];
  }
}

// Forward, after the barrier: ln->gx = x_hat * gamma_ih, and ln->gh = LN(gh) * gamma_hh in place,
// keeping h's normalised values and rstd in training.
template <int64_t G, typename T>
RNNFAST_PASS void ln_normalise_products(const ForwardStep<T>& s) {
  const LayerNormStep<T>& ln = *s.ln;
  const int64_t nu = s.units.size(), width = G * nu, GH = G * s.H, count = G * ln_blocks(s.H);
  const bool saving = ln.h_hat != nullptr;
  for (int64_t n = 0; n < s.N; ++n) {
    if (!s.valid(n)) continue;
    ln_gain_x_product<G>(s, n);
    const LnMoments mh =
        ln_moments(ln.partials.at(n, kLnH), ln.partials.at(n, kLnH + 1), count, GH);
    ln_normalise(G, s.H, s.units, mh, ln.gamma_hh, ln.gh + n * width, nu, ln.gh + n * width,
                 saving ? ln.h_hat + n * GH : nullptr);
    if (saving && s.units.begin == 0) ln.rstd[n * 3 + 1] = T(mh.rstd);  // one writer per row
  }
}

// Backward, once dgh holds the gradient of the gained h side: its gain's gradient and each valid
// row's block sums for the way back through the normalisation.
template <int64_t G, typename T>
RNNFAST_PASS void ln_gradient_sums(const BackwardStep<T>& s) {
  const LayerNormStep<T>& ln = *s.ln;
  const int64_t GH = G * s.H;
  for (int64_t n = 0; n < s.N; ++n) {
    if (!s.valid(n)) continue;
    const T* dh = s.dgh + n * GH;
    const T* h_hat = ln.h_hat + n * GH;
    ln_add_gain_gradient(G, s.H, s.units, dh, h_hat, ln.dgamma_hh);
    ln_backward_sums(G, s.H, s.units, ln.gamma_hh, h_hat, dh, ln.partials.at(n, kLnH),
                     ln.partials.at(n, kLnH + 1));
  }
}

// Backward, after the barrier: dgh becomes the gradient of the raw h product.
template <int64_t G, typename T>
RNNFAST_PASS void ln_product_gradients(const BackwardStep<T>& s) {
  const LayerNormStep<T>& ln = *s.ln;
  const int64_t GH = G * s.H, count = G * ln_blocks(s.H);
  const LnPartials& p = ln.partials;
  for (int64_t n = 0; n < s.N; ++n)
    if (s.valid(n))
      ln_backward_row(G, s.H, s.units, ln_row_sum(p.at(n, kLnH), count),
                      ln_row_sum(p.at(n, kLnH + 1), count), double(ln.rstd[n * 3 + 1]), ln.gamma_hh,
                      ln.h_hat + n * GH, s.dgh + n * GH);
}

constexpr int64_t kUnitAlign = 16;  // a thread's units start on a 64-byte boundary (float)
// rows of x per projection chunk: the thread's packed w_ih streams from L3 once per chunk (larger
// chunks measured faster, bench/RESULTS.md); and at most kProjectionSteps steps, so that the
// chunk's gates take O(N*H) memory at small batch too
constexpr int64_t kProjectionRows = 1024, kProjectionSteps = 64;

// ---- forward ----------------------------------------------------------------------------------

// A thread's step products, built once per call by its cell (DefaultStep::forward_products): the
// default step uses the first, a cell with a second product per step both.
template <typename T>
using StepProducts = std::optional<StepProduct<T>>[2];

// What one thread of the forward team holds for the whole call.
template <typename T>
struct ForwardThread {
  int team;            // threads in the team (the barrier's width)
  Range units{};       // the hidden units this thread owns
  Range state_cols{};  // with a projection: the columns of h it computes (of R)
  int64_t width{};     // G * units.size(): this thread's gate columns
  Isa isa{};           // which build of the pointwise passes runs
  // the step's product takes x_t too, w_ih stacked under w_hh (StepProduct::stacking_pays), in
  // place of the projection a chunk of steps ahead: cells whose passes only sum the two products
  bool stacks_input{};
  int64_t C{};                         // x's row length
  T* gh{};                             // [N, width] the step's recurrent products
  const StepProduct<T>* product[2]{};  // by default h_{t-1} [N, H] onto its gate columns of w_hh
};

// h [N, R] and c [N, H] before step 0: h0 and c0, or zeros (backward starts its dh and dc the
// same way).
template <typename T>
void initial_states(int64_t NR, int64_t NH, const T* h0, const T* c0, T* hs, T* cs) {
  if (h0)
    std::memcpy(hs, h0, sizeof(T) * NR);
  else
    std::fill(hs, hs + NR, T(0));
  if (cs) {
    if (c0)
      std::memcpy(cs, c0, sizeof(T) * NH);
    else
      std::fill(cs, cs + NH, T(0));
  }
}

// b_ih plus whichever parts of b_hh are plain sums ([G*H], added to the x side in the pointwise
// pass), and the candidate's b_hh apart where r multiplies it ([H], reset_after cells).
template <typename T>
void fold_biases(const CellInfo& cell, int64_t H, const T* b_ih, const T* b_hh, T* bx, T* bhn) {
  const int64_t GH = cell.gates * H, candidate = (cell.gates - 1) * H;  // the last gate
  for (int64_t k = 0; k < GH; ++k) {
    const T hh = b_hh ? b_hh[k] : T(0);
    const bool folded = !cell.reset_after || k < candidate;
    bx[k] = (b_ih ? b_ih[k] : T(0)) + (folded ? hh : T(0));
    if (!folded) bhn[k - candidate] = hh;
  }
}

template <class Cell, typename T>
void run_forward(const Dims& d, const ForwardIO<T>& io) {
  constexpr CellInfo cell = cell_info(Cell::kind);
  const int64_t N = d.N, H = d.H, G = cell.gates, GH = G * H, NH = N * H, R = d.R(), NR = N * R;
  const bool training = io.reserve != nullptr;
  const ReserveLayout layout = reserve_layout(d);
  T* hs = io.hs;
  // c lives in the reserve in training, else in two alternating slots
  auto c_ring = scratch<T>(cell.has_c && !training ? 2 * NH : 0);
  T* cs = cell.has_c ? (training ? io.reserve + layout.cs : c_ring.get()) : nullptr;
  auto c_slot = [&](int64_t t) { return cs + (training ? t : (t & 1)) * NH; };
  initial_states(NR, NH, io.h0, io.c0, hs, cs);

  auto bx = scratch<T>(GH);
  auto bhn = scratch<T>(cell.reset_after ? H : 0);
  fold_biases(cell, H, io.b_ih, io.b_hh, bx.get(), bhn.get());
  // r * h_{t-1} in inference, where no reserve keeps it
  auto rh_step = scratch<T>(cell.reset_before && !training ? NH : 0);
  auto m_step = scratch<T>(d.P && !training ? NH : 0);  // o * tanh(c), likewise

  // Each thread projects the inputs onto its own units' gates, through the same packed kernel as
  // the step product (w_ih packed once per call), a chunk of steps ahead of the recurrence: the
  // rows it needs stay in its own cache, and no barrier separates projection and recurrence.
  const int64_t chunk = std::clamp<int64_t>((kProjectionRows + N - 1) / N, 1,
                                            std::clamp<int64_t>(d.T, 1, kProjectionSteps));
  // the same choice whatever the team, so that each output's sums, and its bits, are too
  constexpr bool sums_products = !cell.reset_after && !cell.reset_before;
  const bool stacks_input = sums_products && !d.layer_norm && d.C > 0 &&
                            StepProduct<T>::stacking_pays(N, GH, R, d.C, io.bf16);
  const bool dropping = io.noise.candidate > 0 && !io.noise.expectation;
  const Noise* zoneout = io.noise.zoneout > 0 ? &io.noise : nullptr;
  // variational dropout: the products read h_{t-1} * vscale from two alternating slots (a thread
  // writes step t's while the others may still read step t-1's)
  const bool variational = io.noise.variational > 0 && !io.noise.expectation;
  auto vscale = scratch<T>(variational ? NR : 0);
  auto h_masked = scratch<T>(variational ? 2 * NR : 0);
  if (variational) variational_scales(cpu_isa(), io.noise, N, R, vscale.get());
  // layer norm: the team's block sums, in inference the gates that the pass after c's reads and
  // the chunk's x products as whole rows (in training they go to the reserve's ln_x)
  const bool ln = d.layer_norm;
  auto ln_partials = scratch<double>(ln ? N * kLnQuantities * G * ln_blocks(H) : 0);
  auto ln_gates = scratch<T>(ln && cell.has_c && !training ? N * GH : 0);
  auto x_chunk = scratch<T>(ln && !training ? chunk * N * GH : 0);
  // rows apart (rows_apart_pays): float32 without a projection (whose second product reduces
  // over the units); the input projection (and layer norm's of x) then goes a step at a time over
  // the thread's rows, and the noise masks are its rows' (they are keyed by the batch row)
  const bool rows_apart_may = std::is_same_v<T, float> && !d.P;
  const int64_t weight_bytes = GH * (d.C + R) * (io.bf16 ? 2 : int64_t(sizeof(T)));
  TeamSetup setup;
#pragma omp parallel num_threads(recurrent_threads(d))
  {
    const bool rows_apart = rows_apart_may && rows_apart_pays(N, team_size(), weight_bytes);
    const Range own_rows = rows_apart ? split(N, team_size(), thread_index()) : Range{0, N};
    const int64_t r0 = own_rows.begin, NT = own_rows.size();
    ForwardThread<T> th{rows_apart ? 1 : team_size()};
    th.units = rows_apart ? Range{0, H} : split(H, th.team, thread_index(), kUnitAlign);
    th.state_cols = rows_apart ? Range{0, R} : split(R, th.team, thread_index(), kUnitAlign);
    th.width = G * th.units.size();
    th.isa = cpu_isa();
    th.stacks_input = stacks_input;
    th.C = d.C;
    Scratch<T> gh(nullptr, release_scratch), gx(nullptr, release_scratch),
        drop(nullptr, release_scratch), ln_gx(nullptr, release_scratch);
    StepProducts<T> products;
    // x onto the thread's gate columns; with layer norm one product per gate, onto its columns of
    // whole rows
    std::optional<StepProduct<T>> projection[kMaxGates];
    std::optional<StepMasks> kept, taken;  // candidate dropout's, zoneout's (training)
    const bool ok = setup.run([&] {
      gh = scratch<T>(NT * th.width);
      if (dropping) {
        drop = scratch<T>(NT * th.units.size());
        kept.emplace(io.noise, NoisePurpose::candidate, io.noise.candidate_threshold, own_rows,
                     th.units);
      }
      if (zoneout && !io.noise.expectation)
        taken.emplace(io.noise, NoisePurpose::zoneout, io.noise.zoneout_threshold, own_rows,
                      th.units);
      if (variational)
        scale_columns(th.isa, NT, R, th.units, hs + r0 * R, vscale.get() + r0 * R,
                      h_masked.get() + r0 * R);
      Cell::template forward_products<T>(d, io, th, products);
      gx = scratch<T>(ln || stacks_input ? 0 : chunk * NT * th.width);
      ln_gx = scratch<T>(ln ? NT * th.width : 0);
      // this thread's outputs: the rows of all G gates of its units, G blocks of w_ih; T*N rows
      if (ln)
        for (int64_t g = 0; g < G; ++g)
          projection[g].emplace(io.w_ih + (g * H + th.units.begin) * d.C, d.C, th.units.size(), d.C,
                                WeightsBy::row, OutputBlocks{}, d.T * N, io.bf16);
      else if (!stacks_input)
        projection[0].emplace(io.w_ih + th.units.begin * d.C, d.C, th.width, d.C, WeightsBy::row,
                              OutputBlocks{th.units.size(), H}, d.T * N, io.bf16);
    });
    th.gh = gh.get();
    for (int k = 0; k < 2; ++k) th.product[k] = products[k] ? &*products[k] : nullptr;
    const LnPartials partials{ln_partials.get(), G * ln_blocks(H)};
    LayerNormStep<T> ln_step{io.ln.gamma_ih, io.ln.gamma_hh, io.ln.gamma_c, io.ln.beta_c,
                             ln ? LnPartials{partials.at(r0, 0), partials.width} : partials};
    ln_step.gates = ln_gates.get() + (ln && cell.has_c && !training ? r0 * GH : 0);
    ln_step.gx = ln_gx.get();
    ln_step.gh = th.gh;
    for (int64_t t0 = 0; ok && t0 < d.T; t0 += chunk) {
      const int64_t steps = std::min(chunk, d.T - t0), rows = steps * N;
      // the biases are added in the pointwise pass, which saves a pass over gx to preset them
      const T* x = io.x + t0 * N * d.C;
      T* x_rows =
          ln ? (training ? io.reserve + layout.ln_x + t0 * N * GH : x_chunk.get()) : nullptr;
      if (ln) {
        LnRows<T> mine{GH,
                       N,
                       t0,
                       Range{0, rows},
                       io.lengths,
                       x_rows,
                       training ? io.reserve + layout.ln_rstd + t0 * N * 3 : nullptr};
        if (rows_apart) {  // the thread's rows of each step, whole
          for (int64_t t = t0; t < t0 + steps; ++t) {
            const int64_t first = (t - t0) * N + r0;
            for (int64_t g = 0; g < G; ++g)
              (*projection[g])(NT, io.x + (t * N + r0) * d.C, d.C, x_rows + first * GH + g * H, GH,
                               Accumulate::no);
            mine.rows = Range{first, first + NT};
            run_pass<&ln_normalise_rows<T>>(th.isa, mine);
          }
        } else {
          for (int64_t g = 0; g < G; ++g)
            (*projection[g])(rows, x, d.C, x_rows + g * H + th.units.begin, GH, Accumulate::no);
          team_barrier(th.team);  // the chunk's rows are whole (the last step's readers are done)
          mine.rows = split(rows, th.team, thread_index());
          run_pass<&ln_normalise_rows<T>>(th.isa, mine);
          team_barrier(th.team);  // and normalised
        }
      } else if (!stacks_input) {
        if (rows_apart)
          for (int64_t t = t0; t < t0 + steps; ++t)
            (*projection[0])(NT, io.x + (t * N + r0) * d.C, d.C,
                             gx.get() + (t - t0) * NT * th.width, th.width, Accumulate::no);
        else
          (*projection[0])(rows, x, d.C, gx.get(), th.width, Accumulate::no);
      }
      for (int64_t t = t0; t < t0 + steps; ++t) {
        ForwardStep<T> s{NT, H, R, t, th.units, io.lengths ? io.lengths + r0 : nullptr};
        s.gx = ln || stacks_input ? nullptr : gx.get() + (t - t0) * NT * th.width;
        s.x = stacks_input ? io.x + (t * N + r0) * d.C : nullptr;
        s.bx = bx.get();
        s.bhn = bhn.get();
        s.h_prev = hs + t * NR + r0 * R;
        s.h = hs + (t + 1) * NR + r0 * R;
        if (cell.has_c) {
          s.c_prev = c_slot(t) + r0 * H;
          s.c = c_slot(t + 1) + r0 * H;
        }
        s.peephole = io.w_peephole;
        if (training) {
          s.gates = cell.saves_gates ? io.reserve + layout.gates + (t * N + r0) * GH : nullptr;
          s.ghn = cell.reset_after ? io.reserve + layout.ghn + t * NH + r0 * H : nullptr;
        }
        if (cell.reset_before)
          s.rh = (training ? io.reserve + layout.rh + t * NH : rh_step.get()) + r0 * H;
        if (d.P) s.m = training ? io.reserve + layout.m + (t + 1) * NH : m_step.get();
        if (dropping)
          candidate_scales(th.isa, io.noise, kept->at(t), NT * th.units.size(), drop.get());
        s.drop = drop.get();
        s.zoneout = zoneout;
        s.taken = taken ? taken->at(t) : nullptr;
        s.h_product = s.h_prev;
        if (variational) {
          s.vscale = vscale.get() + r0 * R;
          s.h_product = h_masked.get() + (t & 1) * NR + r0 * R;
          s.h_product_next = h_masked.get() + ((t + 1) & 1) * NR + r0 * R;
        }
        if (ln) {
          ln_step.x_hat = x_rows + ((t - t0) * N + r0) * GH;
          if (training) {
            ln_step.h_hat = io.reserve + layout.ln_h + (t * N + r0) * GH;
            ln_step.c_hat = cell.has_c ? io.reserve + layout.ln_c + t * NH + r0 * H : nullptr;
            ln_step.rstd = io.reserve + layout.ln_rstd + (t * N + r0) * 3;
          }
          s.ln = &ln_step;
        }
        Cell::template forward_step<Cell, T>(th, s);
      }
    }
  }
  setup.rethrow();

  // final states: each row's after its own last step
  for (int64_t n = 0; n < N; ++n) {
    const int64_t len = io.lengths ? io.lengths[n] : d.T;
    std::memcpy(io.h_n + n * R, hs + len * NR + n * R, sizeof(T) * R);
    if (cell.has_c) std::memcpy(io.c_n + n * H, c_slot(d.T) + n * H, sizeof(T) * H);
  }
}

// ---- backward ---------------------------------------------------------------------------------

// What one thread of the backward team holds for the whole call.
template <typename T>
struct BackwardThread {
  int team;
  Range units{};
  Range state_cols{};  // with a projection: the columns of dh_{t-1} it computes (of R)
  Isa isa{};
  int64_t gates{};                     // G
  const StepProduct<T>* product[2]{};  // by default dgh_t [N, G*H] onto its columns of dh_{t-1}
  T* db_x{};                           // [G*H] column sums of dgx, or null where no bias takes them
  T* db_h{};                           // [G*H] of dgh, reset_after cells with b_hh only, else null
};

// The bias gradients are the column sums of dgx (and, apart, of dgh), added up step by step by
// the thread that owns the units while the rows are still in cache; the order of the sums is
// fixed (t down, n up) whatever the thread count.
template <typename T>
void sum_bias_rows(const BackwardThread<T>& th, const BackwardStep<T>& s) {
  run_inline(th.isa, [&]() RNNFAST_INLINE {
    if (th.db_x) add_gate_rows<T>(s.N, th.gates, s.H, th.units, s.dgx, th.db_x);
    if (th.db_h) add_gate_rows<T>(s.N, th.gates, s.H, th.units, s.dgh, th.db_h);
  });
}

// The step every cell runs unless it defines its own `forward_step` or `backward_step` (static
// templates with these signatures, called in the same place; cells inherit this one). Forward: one
// recurrent product onto the thread's own gate columns, the cell's pointwise pass, one barrier.
// Backward mirrors it: the pass, the bias sums, one barrier, and dh_{t-1}[:, units] += dgh_t @
// w_hh[:, units] (rows past their length have dgh = 0). A cell whose step needs a second product
// or a reduction across units mid-step (the reset-before GRU, layer norm, a projection) writes its
// own steps in its file, from the same pieces.
// The products are built once per thread per call (forward_products, backward_products), and the
// weight gradients follow the loop (weight_gradients); a cell may replace any of these too.
struct DefaultStep {
  // whether weight_gradients is DefaultStep's (dw_ih = dgx^T x, dw_hh = dgh^T h_{t-1}, dx), which
  // the loop may then sum chunk by chunk itself (weight_gradients_in_loop)
  static constexpr bool kDefaultWeightGradients = true;

  // h_{t-1} [N, R] onto the thread's outputs, the rows of all G gates of its units: G blocks of
  // w_hh, with T*N rows through them in this call; with stacks_input [x_t, h_{t-1}] onto them,
  // w_ih's G blocks with w_hh's stacked under them
  template <typename T>
  static void forward_products(const Dims& d, const ForwardIO<T>& io, const ForwardThread<T>& th,
                               StepProducts<T>& out) {
    const int64_t R = d.R();
    if (th.stacks_input)
      out[0].emplace(io.w_ih + th.units.begin * d.C, d.C, th.width, d.C, WeightsBy::row,
                     OutputBlocks{th.units.size(), d.H}, d.T * d.N, io.bf16,
                     StackedWeights<T>{io.w_hh + th.units.begin * R, R, R});
    else
      out[0].emplace(io.w_hh + th.units.begin * R, R, th.width, R, WeightsBy::row,
                     OutputBlocks{th.units.size(), d.H}, d.T * d.N, io.bf16);
  }

  // product[0] of the step onto th.gh: h_{t-1} (as the products read it), or with stacks_input
  // x_t and h_{t-1}
  template <typename T>
  static void step_product(const ForwardThread<T>& th, const ForwardStep<T>& s) {
    if (th.stacks_input)
      (*th.product[0])(s.N, s.x, th.C, s.h_product, s.R, th.gh, th.width, Accumulate::no);
    else
      (*th.product[0])(s.N, s.h_product, s.R, th.gh, th.width, Accumulate::no);
  }

  // dgh_t [N, G*H] onto the thread's columns of dh_{t-1}
  template <typename T>
  static void backward_products(const Dims& d, const BackwardIO<T>& io, const BackwardThread<T>& th,
                                StepProducts<T>& out) {
    out[0].emplace(io.w_hh + th.units.begin, d.R(), th.units.size(), th.gates * d.H,
                   WeightsBy::column, OutputBlocks{}, d.T * d.N, io.bf16);
  }

  template <class Cell, typename T>
  static void forward_step(const ForwardThread<T>& th, ForwardStep<T>& s) {
    step_product(th, s);
    s.gh = th.gh;
    run_pass<&Cell::template forward<T>>(th.isa, s);
    after_pass(th.isa, s);
    team_barrier(th.team);  // h_t is complete when every thread has written its units
  }

  template <class Cell, typename T>
  static void backward_step(const BackwardThread<T>& th, const BackwardStep<T>& s) {
    run_pass<&Cell::template backward<T>>(th.isa, s);
    sum_bias_rows(th, s);
    team_barrier(th.team);                  // dgh_t is complete
    const int64_t ld_dgh = th.gates * s.H;  // dgh's rows are all G gates of all H units
    (*th.product[0])(s.N, s.dgh, ld_dgh, s.dh_product + th.units.begin, s.R, Accumulate::yes);
  }

  // dh_seq: [T, N, R] every step's total gradient of h, where the cell projects (else null)
  template <typename T>
  static void weight_gradients(const Dims& d, const BackwardIO<T>& io, const T* dgx, const T* dgh,
                               const T* hs, const T* dh_seq);
};

// x, or where a padded row (t >= lengths[n]) holds a NaN or infinity, a copy of x with the padded
// rows zeroed. Padded rows have zero gate gradients, but 0 * NaN in the dw_ih product would spread
// the padding, which is the caller's and never read, into every weight gradient; with finite
// padding the product is the same bit for bit, so only that case pays for the copy.
template <typename T>
const T* finite_padding(const Dims& d, const T* x, const int32_t* lengths, Scratch<T>& copy) {
  if (!lengths) return x;
  const int64_t N = d.N, C = d.C;
  auto padded = [&](int64_t t, int64_t n) { return t >= lengths[n]; };
  bool finite = true;
  for (int64_t t = 0; t < d.T && finite; ++t)
    for (int64_t n = 0; n < N && finite; ++n)
      if (padded(t, n)) {
        const T* row = x + (t * N + n) * C;
        T bad = T(0);
        for (int64_t k = 0; k < C; ++k) bad += row[k] - row[k];  // NaN for NaN or +-inf
        finite = bad == T(0);
      }
  if (finite) return x;
  copy = scratch<T>(d.T * N * C);
  for (int64_t t = 0; t < d.T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      T* out = copy.get() + (t * N + n) * C;
      if (padded(t, n))
        std::fill(out, out + C, T(0));
      else
        std::memcpy(out, x + (t * N + n) * C, sizeof(T) * C);
    }
  return copy.get();
}

// After the loop: the weight gradients and dx as large GEMMs over all T*N rows, C = op(A) op(B)
// on every thread, in bfloat16 where the forward's products were. dw_hh_rows: `rows` rows of
// dw_hh from row `first` on, dgh's columns of those rows times the sequence h [T*N, R];
// input_gradients: dw_ih and dx.
template <typename T>
void gradient_product(bool bf16, bool trans_a, int64_t M, int64_t N, int64_t K, const T* A,
                      int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>)
    if (bf16)
      return parallel_gemm_bf16(get_num_threads(), trans_a, false, M, N, K, A, lda, B, ldb, C, ldc);
  parallel_gemm<T>(get_num_threads(), trans_a, false, M, N, K, A, lda, B, ldb, T(0), C, ldc);
}

template <typename T>
void dw_hh_rows(const Dims& d, bool bf16, const T* dgh, const T* h, int64_t first, int64_t rows,
                T* dw_hh) {
  const int64_t GH = d.GH(), R = d.R();
  gradient_product<T>(bf16, true, rows, R, d.T * d.N, dgh + first, GH, h, R, dw_hh + first * R, R);
}

template <typename T>
void dx_product(const Dims& d, const BackwardIO<T>& io, const T* dgx) {
  const int64_t GH = d.GH(), TN = d.T * d.N;
  gradient_product<T>(io.bf16, false, TN, d.C, GH, dgx, GH, io.w_ih, d.C, io.dx, d.C);
}

template <typename T>
void input_gradients(const Dims& d, const BackwardIO<T>& io, const T* dgx) {
  const int64_t GH = d.GH(), TN = d.T * d.N;
  auto x_masked = scratch<T>(0);
  const T* x_rows = finite_padding(d, io.x, io.lengths, x_masked);
  gradient_product<T>(io.bf16, true, GH, d.C, TN, dgx, GH, x_rows, d.C, io.dw_ih, d.C);
  dx_product(d, io, dgx);
}

// Whether dw_ih and dw_hh are summed inside the backward loop, each thread over its own units'
// rows a chunk of steps at a time, from the columns of dG it has just written and that are still
// in its cache (after the loop they came from memory, at under half the FMA peak: bench/RESULTS.md,
// session 13): float32 on the packed tiles, a cell with DefaultStep's weight gradients, and nothing
// (layer norm's x side, a projection) changing what they read (variational dropout's masked h is
// made before the loop).
template <class Cell, typename T>
bool weight_gradients_in_loop(const Dims& d, const BackwardIO<T>& io) {
  // each chunk adds into the thread's rows of dw_ih and dw_hh: where all of them take more than
  // twice the L2 (LSTM H = 512: 8 MB), those re-reads cost what the sums save
  const int64_t gradient_bytes = d.GH() * (d.C + d.R()) * int64_t(sizeof(float));
  return std::is_same_v<T, float> && !io.bf16 && cpu_has_packed_products() &&
         Cell::kDefaultWeightGradients && !d.layer_norm && !d.P &&
         gradient_bytes <= 2 * l2_cache_bytes();
}

// Steps per chunk of those sums: a chunk's rows of dG take up to half the L2 (the thread's columns
// of them its share), and at least 64 rows. From the shape and the L2 alone, never the team: the
// chunks fix the order of the sums.
inline int64_t gradient_chunk_steps(const Dims& d) {
  const int64_t rows =
      std::max<int64_t>(64, l2_cache_bytes() / 2 / std::max<int64_t>(1, d.GH() * 4));
  return std::max<int64_t>(1, rows / std::max<int64_t>(1, d.N));
}

// What one thread's chunk multiplies: its columns of dgx times x into dw_ih, and of dgh times
// h_{t-1} into dw_hh; where dgh is dgx (the LSTM, the RNN) both from one transpose.
struct ChunkProducts {
  TransposedTarget targets[2]{};  // x into dw_ih, h_{t-1} into dw_hh (B from row 0)
  bool one_transpose = false;
  int64_t workspace = 0;
};

inline ChunkProducts chunk_products(const Dims& d, const BackwardIO<float>& io, Range units,
                                    const float* x_rows, const float* hs, bool dgh_is_dgx) {
  const int64_t R = d.R(), rows = units.size();
  ChunkProducts p{{{x_rows, d.C, d.C, io.dw_ih + units.begin * d.C, d.C},
                   {hs, R, R, io.dw_hh + units.begin * R, R}},
                  dgh_is_dgx};
  p.workspace = dgh_is_dgx ? transposed_workspace(rows, p.targets, 2)
                           : std::max(transposed_workspace(rows, p.targets, 1),
                                      transposed_workspace(rows, p.targets + 1, 1));
  return p;
}

// This thread's rows of dw_ih and dw_hh (its units in every gate) += the steps [t0, t1) of its
// columns of dgx and dgh times x and h_{t-1}
inline void chunk_weight_gradients(const Dims& d, const ChunkProducts& p, Range units,
                                   int64_t gates, const float* dgx, const float* dgh, int64_t t0,
                                   int64_t t1, float* workspace) {
  const int64_t GH = d.GH(), K = (t1 - t0) * d.N, rows = gates * units.size(), first = t0 * d.N;
  const OutputBlocks by_gate{units.size(), d.H};
  TransposedTarget at[2] = {p.targets[0], p.targets[1]};  // B from the chunk's first row
  for (TransposedTarget& t : at) t.B += first * t.ldb;
  const float* dgx_chunk = dgx + first * GH + units.begin;
  if (p.one_transpose)
    return multiply_transposed(rows, by_gate, K, dgx_chunk, GH, at, 2, workspace);
  multiply_transposed(rows, by_gate, K, dgx_chunk, GH, at, 1, workspace);
  multiply_transposed(rows, by_gate, K, dgh + first * GH + units.begin, GH, at + 1, 1, workspace);
}

template <typename T>
void DefaultStep::weight_gradients(const Dims& d, const BackwardIO<T>& io, const T* dgx,
                                   const T* dgh, const T* hs, const T*) {
  input_gradients(d, io, dgx);
  dw_hh_rows(d, io.bf16, dgh, hs, 0, d.GH(), io.dw_hh);
}

// Layer norm's x side after the loop, whole rows (csrc/cpu/layer_norm.h): gamma_ih's gradient
// from dgx, the gradients of the gained values, which then become the gradients of the raw x
// products for the weight gradients and dx.
template <typename T>
void ln_input_product_backward(const Dims& d, const BackwardIO<T>& io, const ReserveLayout& layout,
                               T* dgx) {
  const int64_t GH = d.GH(), TN = d.T * d.N;
  const Isa isa = cpu_isa();
  LnRows<T> all{GH, d.N, 0, {0, TN}, io.lengths, dgx, const_cast<T*>(io.reserve + layout.ln_rstd)};
  all.gamma = io.ln.gamma_ih;
  all.hat = io.reserve + layout.ln_x;
#pragma omp parallel num_threads(team_request(get_num_threads()))
  {
    LnRows<T> mine = all;
    if (io.dln.gamma_ih) {
      mine.cols = split(GH, team_size(), thread_index(), kUnitAlign);
      mine.dgamma = io.dln.gamma_ih;
      run_pass<&ln_gain_gradient_rows<T>>(isa, mine);
    }
#pragma omp barrier
    mine.rows = split(TN, team_size(), thread_index());
    run_pass<&ln_backward_rows<T>>(isa, mine);
  }
}

template <class Cell, typename T>
void run_backward(const Dims& d, const BackwardIO<T>& io) {
  constexpr CellInfo cell = cell_info(Cell::kind);
  const int64_t N = d.N, H = d.H, GH = cell.gates * H, NH = N * H, TN = d.T * N, R = d.R(),
                NR = N * R;
  const ReserveLayout layout = reserve_layout(d);
  const T* hs = io.reserve + layout.hs;

  auto dgx = scratch<T>(TN * GH);
  // the h side's gate gradients differ from the x side's where r multiplies the candidate's
  // product or layer norm normalises each product apart
  const bool ln = d.layer_norm, own_dgh = cell.reset_after || ln;
  auto dgh_own = scratch<T>(own_dgh ? TN * GH : 0);
  T* dgh = own_dgh ? dgh_own.get() : dgx.get();
  // the running gradients dh and dc (dh0 and dc0 at the end) start as dh_n and dc_n, or zeros
  initial_states(NR, NH, io.dh_n, io.dc_n, io.dh0, cell.has_c ? io.dc0 : nullptr);

  // dy where the caller gave none, and with a projection the pass's (its dy is in dm already)
  const bool dropping = io.noise.candidate > 0, zoneout = io.noise.zoneout > 0;
  // variational dropout: the products' input h_{t-1} * vscale (hs_product below), and their
  // gradient apart from dh, added to it scaled by vscale
  const bool variational = io.noise.variational > 0;
  auto vscale = scratch<T>(variational ? NR : 0);
  auto dh_masked = scratch<T>(variational ? NR : 0);
  if (variational) variational_scales(cpu_isa(), io.noise, N, R, vscale.get());
  const int64_t zero_count = io.dy && !d.P && !zoneout ? 0 : N * std::max(R, H);
  auto zeros = scratch<T>(zero_count);
  std::fill(zeros.get(), zeros.get() + zero_count, T(0));
  // with a projection: every step's total gradient of h (for dw_hr) and d(o * tanh(c))
  auto dh_seq = scratch<T>(d.P ? TN * R : 0);
  auto dm = scratch<T>(d.P ? NH : 0);

  const bool sum_db_x = io.db_ih || io.db_hh, sum_db_h = cell.reset_after && io.db_hh;
  auto db_sum = scratch<T>(sum_db_x ? (sum_db_h ? 2 : 1) * GH : 0);
  if (sum_db_x) std::fill(db_sum.get(), db_sum.get() + (sum_db_h ? 2 : 1) * GH, T(0));
  if (io.dw_peephole) std::fill(io.dw_peephole, io.dw_peephole + 3 * H, T(0));
  auto ln_partials = scratch<double>(ln ? N * kLnQuantities * cell.gates * ln_blocks(H) : 0);
  auto ln_dc_hat = scratch<T>(ln && cell.has_c ? NH : 0);
  // layer norm's gradients are summed step by step, like the peepholes'
  auto zero = [](T* g, int64_t n) {
    if (g) std::fill(g, g + n, T(0));
  };
  zero(io.dln.gamma_hh, GH);
  zero(io.dln.gamma_c, H);
  zero(io.dln.beta_c, H);
  // the normalised values and rstd of the forward, read (never written) by backward's steps
  T* ln_reserve = const_cast<T*>(io.reserve);

  const bool sums_in_loop = weight_gradients_in_loop<Cell, T>(d, io);
  const int64_t chunk_steps = gradient_chunk_steps(d);
  auto x_masked = scratch<T>(0);
  const T* x_rows = sums_in_loop ? finite_padding(d, io.x, io.lengths, x_masked) : nullptr;
  // what W_hh multiplied: h_{t-1}, or with variational dropout h_{t-1} * vscale
  auto hs_masked = scratch<T>(variational ? TN * R : 0);
  if (variational)
    for (int64_t t = 0; t < d.T; ++t)
      scale_columns(cpu_isa(), N, R, Range{0, R}, hs + t * NR, vscale.get(),
                    hs_masked.get() + t * NR);
  const T* hs_product = variational ? hs_masked.get() : hs;

  // rows apart (rows_apart_pays) as in the forward, but not with layer norm's gain gradients or
  // the peepholes' (each thread sums its units' over all the rows step by step)
  const bool rows_apart_may = std::is_same_v<T, float> && !ln && !d.P && !io.dw_peephole;
  const int64_t weight_bytes = GH * (d.C + R) * (io.bf16 ? 2 : int64_t(sizeof(T)));
  TeamSetup setup;
#pragma omp parallel num_threads(recurrent_threads(d))
  {
    const bool rows_apart = rows_apart_may && rows_apart_pays(N, team_size(), weight_bytes);
    const Range own_rows = rows_apart ? split(N, team_size(), thread_index()) : Range{0, N};
    const int64_t r0 = own_rows.begin, NT = own_rows.size();
    // the units whose rows of the weight gradients and entries of the bias gradients this thread
    // sums: its own units, or rows apart its share of them, a chunk of steps at a time after a
    // barrier (every row's dG of the chunk is written), in the same order (t down, n up)
    const Range sum_units = split(H, team_size(), thread_index(), kUnitAlign);
    BackwardThread<T> th{rows_apart ? 1 : team_size()};
    th.units = rows_apart ? Range{0, H} : sum_units;
    th.state_cols = rows_apart ? Range{0, R} : split(R, th.team, thread_index(), kUnitAlign);
    th.isa = cpu_isa();
    th.gates = cell.gates;
    th.db_x = sum_db_x && !rows_apart ? db_sum.get() : nullptr;
    th.db_h = sum_db_h && !rows_apart ? db_sum.get() + GH : nullptr;
    StepProducts<T> products;
    std::optional<StepMasks> kept, taken;  // candidate dropout's, zoneout's
    Scratch<T> drh(nullptr, release_scratch), drop(nullptr, release_scratch),
        carry(nullptr, release_scratch);
    Scratch<float> gradient_workspace(nullptr, release_scratch);
    ChunkProducts chunk;
    if constexpr (std::is_same_v<T, float>)
      if (sums_in_loop)
        chunk = chunk_products(d, io, sum_units, x_rows, hs_product, dgh == dgx.get());
    const bool ok = setup.run([&] {
      Cell::template backward_products<T>(d, io, th, products);
      if (sums_in_loop) gradient_workspace = scratch<float>(chunk.workspace);
      drh = scratch<T>(cell.reset_before ? N * th.units.size() : 0);
      if (dropping) {
        drop = scratch<T>(NT * th.units.size());
        kept.emplace(io.noise, NoisePurpose::candidate, io.noise.candidate_threshold, own_rows,
                     th.units);
      }
      if (zoneout) {
        carry = scratch<T>(NT * th.units.size());
        taken.emplace(io.noise, NoisePurpose::zoneout, io.noise.zoneout_threshold, own_rows,
                      th.units);
      }
    });
    for (int k = 0; k < 2; ++k) th.product[k] = products[k] ? &*products[k] : nullptr;
    LayerNormStep<T> ln_step{io.ln.gamma_ih,
                             io.ln.gamma_hh,
                             io.ln.gamma_c,
                             io.ln.beta_c,
                             {ln_partials.get(), cell.gates * ln_blocks(H)}};
    ln_step.dgamma_hh = io.dln.gamma_hh;
    ln_step.dgamma_c = io.dln.gamma_c;
    ln_step.dbeta_c = io.dln.beta_c;
    ln_step.dc_hat = ln_dc_hat.get();
    if constexpr (std::is_same_v<T, float>)
      if (ok && sums_in_loop)  // the chunks add to this thread's rows
        for (int64_t g = 0; g < cell.gates; ++g) {
          const int64_t w0 = g * H + sum_units.begin, w1 = g * H + sum_units.end;
          std::fill(io.dw_ih + w0 * d.C, io.dw_ih + w1 * d.C, 0.0f);
          std::fill(io.dw_hh + w0 * R, io.dw_hh + w1 * R, 0.0f);
        }
    for (int64_t t = d.T - 1; ok && t >= 0; --t) {
      BackwardStep<T> s{NT, H, R, t, th.units, io.lengths ? io.lengths + r0 : nullptr};
      s.dy = io.dy ? io.dy + t * NR + r0 * R : zeros.get();
      s.h_prev = hs + t * NR + r0 * R;
      s.h = hs + (t + 1) * NR + r0 * R;
      if (cell.has_c) {
        s.c_prev = io.reserve + layout.cs + t * NH + r0 * H;
        s.c = s.c_prev + NH;
      }
      if (cell.saves_gates) s.gates = io.reserve + layout.gates + (t * N + r0) * GH;
      if (cell.reset_after) s.ghn = io.reserve + layout.ghn + t * NH + r0 * H;
      s.peephole = io.w_peephole;
      s.dpeephole = io.dw_peephole;
      s.drh = drh.get();
      s.dh_seq = d.P ? dh_seq.get() + t * NR : nullptr;
      s.dm = dm.get();
      s.zeros = zeros.get();
      s.dh = io.dh0 + r0 * R;
      s.dc = cell.has_c ? io.dc0 + r0 * H : nullptr;
      s.dgx = dgx.get() + (t * N + r0) * GH;
      s.dgh = dgh + (t * N + r0) * GH;
      if (dropping)
        candidate_scales(th.isa, io.noise, kept->at(t), NT * th.units.size(), drop.get());
      s.drop = drop.get();
      if (zoneout) {
        split_zoneout_gradient(th.isa, taken->at(t), s, s.dy, carry.get());
        s.dy = zeros.get();
      }
      s.h_product = hs_product + t * NR + r0 * R;
      s.dh_product = s.dh;
      // the thread's rows of variational dropout's scales and of the products' input's gradient
      const T* vs = variational ? vscale.get() + r0 * R : nullptr;
      T* dhm = variational ? dh_masked.get() + r0 * R : nullptr;
      if (variational) {
        for (int64_t n = 0; n < NT; ++n)
          std::fill(dhm + n * R + th.units.begin, dhm + n * R + th.units.end, T(0));
        s.dh_product = dhm;
      }
      if (ln) {
        ln_step.x_hat = ln_reserve + layout.ln_x + t * N * GH;
        ln_step.h_hat = ln_reserve + layout.ln_h + t * N * GH;
        ln_step.c_hat = cell.has_c ? ln_reserve + layout.ln_c + t * NH : nullptr;
        ln_step.rstd = ln_reserve + layout.ln_rstd + t * N * 3;
        s.ln = &ln_step;
      }
      Cell::template backward_step<Cell, T>(th, s);
      if (zoneout) add_zoneout_carry(th.isa, s, carry.get());
      if (variational)  // dh_{t-1} += vscale * (the gradient reaching the products' input)
        run_inline(th.isa, [&]() RNNFAST_INLINE {
          for (int64_t n = 0; n < NT; ++n)
#pragma omp simd
            for (int64_t j = th.units.begin; j < th.units.end; ++j)
              s.dh[n * R + j] += vs[n * R + j] * dhm[n * R + j];
        });
      // a chunk is whole at its first step (chunks run from step T down, the one at 0 shorter)
      const int64_t past_chunk = (d.T - t) % chunk_steps;
      if (past_chunk != 0 && t != 0) continue;
      const int64_t chunk_end = t + (past_chunk == 0 ? chunk_steps : past_chunk);
      if (rows_apart) {
#pragma omp barrier
        if (sum_db_x)
          run_inline(th.isa, [&]() RNNFAST_INLINE {
            for (int64_t step = chunk_end - 1; step >= t; --step) {
              add_gate_rows<T>(N, cell.gates, H, sum_units, dgx.get() + step * N * GH,
                               db_sum.get());
              if (sum_db_h)
                add_gate_rows<T>(N, cell.gates, H, sum_units, dgh + step * N * GH,
                                 db_sum.get() + GH);
            }
          });
      }
      if constexpr (std::is_same_v<T, float>)
        if (sums_in_loop)
          chunk_weight_gradients(d, chunk, sum_units, cell.gates, dgx.get(), dgh, t, chunk_end,
                                 gradient_workspace.get());
    }
  }
  setup.rethrow();
  if (ln) ln_input_product_backward(d, io, layout, dgx.get());

  if (sums_in_loop)
    dx_product(d, io, dgx.get());
  else
    Cell::template weight_gradients<T>(d, io, dgx.get(), dgh, hs_product, dh_seq.get());
  if (io.db_ih) std::memcpy(io.db_ih, db_sum.get(), sizeof(T) * GH);
  if (io.db_hh) std::memcpy(io.db_hh, db_sum.get() + (sum_db_h ? GH : 0), sizeof(T) * GH);
}

// A cell's entry points (csrc/cpu/kernels.h), in its own file: RNNFAST_CPU_CELL(Lstm).
#define RNNFAST_CPU_CELL(Cell)                                                          \
  template <>                                                                           \
  void cell_forward<Cell::kind, float>(const Dims& d, const ForwardIO<float>& io) {     \
    run_forward<Cell, float>(d, io);                                                    \
  }                                                                                     \
  template <>                                                                           \
  void cell_forward<Cell::kind, double>(const Dims& d, const ForwardIO<double>& io) {   \
    run_forward<Cell, double>(d, io);                                                   \
  }                                                                                     \
  template <>                                                                           \
  void cell_backward<Cell::kind, float>(const Dims& d, const BackwardIO<float>& io) {   \
    run_backward<Cell, float>(d, io);                                                   \
  }                                                                                     \
  template <>                                                                           \
  void cell_backward<Cell::kind, double>(const Dims& d, const BackwardIO<double>& io) { \
    run_backward<Cell, double>(d, io);                                                  \
  }

}  // namespace rnnfast::cpu
