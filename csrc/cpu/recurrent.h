// The algorithm every cell shares. Forward: each thread owns a slice of the hidden units; it
// projects a chunk of inputs onto its units' gates, then per step multiplies h_{t-1} by its units'
// w_hh rows and applies the cell's pointwise math to them, one barrier per step. Backward mirrors
// it, and finishes with the weight gradients and dx as large GEMMs. A cell supplies only its two
// pointwise passes.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>

#include "cpu/packed_gemm.h"
#include "cpu/parallel.h"

namespace rnnfast::cpu {

// One thread's slice of one forward step.
template <typename T>
struct ForwardStep {
  int64_t N, H, t;
  Range units;             // the hidden units this thread owns
  const int32_t* lengths;  // [N] or null
  const T* gx;             // [N, G*units] this thread's input projection, without biases
  const T* bx;             // [G*H] b_ih plus the parts of b_hh that are plain sums: add to gx
  const T* gh;             // [N, G*units] this thread's recurrent product, gate-major per row
  const T* bhn;            // [H] GRU: b_hn, kept out of gx since r multiplies it; else null
  const T* h_prev;         // [N, H]
  const T* c_prev;         // [N, H] LSTM, else null
  T* h;                    // [N, H] out: zero where t >= length
  T* c;                    // [N, H] out, LSTM: carried unchanged where t >= length
  T* gates;                // [N, G*H] out, training only (else null)
  T* ghn;                  // [N, H] out, GRU training only (else null)
  bool valid(int64_t n) const { return !lengths || t < lengths[n]; }
};

// One thread's slice of one backward step.
template <typename T>
struct BackwardStep {
  int64_t N, H, t;
  Range units;
  const int32_t* lengths;  // [N] or null
  const T* dy;             // [N, H] (zeros where the caller gave none)
  const T* h_prev;         // [N, H]
  const T* h;              // [N, H]
  const T* c_prev;         // [N, H] LSTM
  const T* c;              // [N, H] LSTM
  const T* gates;          // [N, G*H] post-activation gates (LSTM, GRU)
  const T* ghn;            // [N, H] GRU
  T* dh;   // [N, H] in: gradient reaching h_t from later steps; out: its path to h_{t-1} that
           // bypasses w_hh (the GEMM adds the rest)
  T* dc;   // [N, H] LSTM: in dc_t, out dc_{t-1}
  T* dgx;  // [N, G*H] out: gradient of the x-side pre-activations
  T* dgh;  // [N, G*H] out: of the h-side products; the same buffer as dgx but for GRU
  bool valid(int64_t n) const { return !lengths || t < lengths[n]; }
};

// A cell's pointwise pass is inlined into two wrappers, one compiled for AVX-512: the passes'
// polynomial math vectorises twice as wide there (25-35% of an LSTM step at H = 128).
#define RNNFAST_INLINE __attribute__((always_inline))
#define RNNFAST_PASS RNNFAST_INLINE inline
#define RNNFAST_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))

template <class Cell, typename T>
RNNFAST_AVX512 void forward_pass_avx512(const ForwardStep<T>& s) {
  Cell::forward(s);
}
template <class Cell, typename T>
void forward_pass_baseline(const ForwardStep<T>& s) {
  Cell::forward(s);
}
template <class Cell, typename T>
RNNFAST_AVX512 void backward_pass_avx512(const BackwardStep<T>& s) {
  Cell::backward(s);
}
template <class Cell, typename T>
void backward_pass_baseline(const BackwardStep<T>& s) {
  Cell::backward(s);
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
void add_gate_rows(int64_t N, int64_t G, int64_t H, Range units, const T* rows, T* sum) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const T* row = rows + n * G * H + g * H;
      T* out = sum + g * H;
#pragma omp simd
      for (int64_t j = units.begin; j < units.end; ++j) out[j] += row[j];
    }
}

constexpr int64_t kUnitAlign = 16;  // a thread's units start on a 64-byte boundary (float)
// rows of x per projection chunk: the thread's packed w_ih streams from L3 once per chunk (256
// rows were 5-8% slower at (64, 25, 128) to (32, 100, 1024)); and at most kProjectionSteps
// steps, so that the chunk's gates take O(N*H) memory at small batch too
constexpr int64_t kProjectionRows = 1024, kProjectionSteps = 64;

template <class Cell, typename T>
void run_forward(const Dims& d, const ForwardIO<T>& io) {
  const int64_t N = d.N, H = d.H, G = d.G(), GH = d.GH(), NH = N * H;
  const bool training = io.reserve != nullptr, avx512 = cpu_has_avx512();
  const ReserveLayout lay = reserve_layout(d);
  T* hs = io.hs;
  // c lives in the reserve in training, else in two alternating slots
  auto cring = scratch<T>(Cell::has_c && !training ? 2 * NH : 0);
  T* cs = Cell::has_c ? (training ? io.reserve + lay.cs : cring.get()) : nullptr;
  auto c_slot = [&](int64_t t) { return cs + (training ? t : (t & 1)) * NH; };

  if (io.h0)
    std::memcpy(hs, io.h0, sizeof(T) * NH);
  else
    std::fill(hs, hs + NH, T(0));
  if (Cell::has_c) {
    if (io.c0)
      std::memcpy(cs, io.c0, sizeof(T) * NH);
    else
      std::fill(cs, cs + NH, T(0));
  }

  // biases: b_ih, plus whichever parts of b_hh are plain sums, go with the input projection
  auto bx = scratch<T>(GH);
  auto bhn = scratch<T>(Cell::is_gru ? H : 0);
  for (int64_t k = 0; k < GH; ++k) {
    const T hh = io.b_hh ? io.b_hh[k] : T(0);
    const bool folded = !Cell::is_gru || k < 2 * H;
    bx[k] = (io.b_ih ? io.b_ih[k] : T(0)) + (folded ? hh : T(0));
    if (!folded) bhn[k - 2 * H] = hh;
  }

  // Each thread projects the inputs onto its own units' gates, through the same packed kernel as
  // the step product (w_ih packed once per call), a chunk of steps ahead of the recurrence: the
  // rows it needs stay in its own cache, and no barrier separates projection and recurrence.
  const int nt = recurrent_threads(d);
  const int64_t chunk = std::clamp<int64_t>((kProjectionRows + N - 1) / N, 1,
                                            std::clamp<int64_t>(d.T, 1, kProjectionSteps));

  TeamSetup setup;
#pragma omp parallel num_threads(nt)
  {
    const int team = team_size();
    const Range units = split(H, team, thread_index(), kUnitAlign);
    const int64_t width = G * units.size();
    Scratch<T> gh(nullptr, release_scratch), gx(nullptr, release_scratch);
    std::optional<StepProduct<T>> product, projection;
    const bool ok = setup.run([&] {
      gh = scratch<T>(N * width);
      gx = scratch<T>(chunk * N * width);
      // this thread's outputs: the rows of all G gates of its units, G blocks of w_hh and w_ih
      const OutputBlocks gates_of_units{units.size(), H};
      // both put T*N rows through their weights in this call
      product.emplace(io.w_hh + units.begin * H, H, width, H, true, gates_of_units, d.T * N,
                      io.bf16);
      projection.emplace(io.w_ih + units.begin * d.C, d.C, width, d.C, true, gates_of_units,
                         d.T * N, io.bf16);
    });
    for (int64_t t0 = 0; ok && t0 < d.T; t0 += chunk) {
      const int64_t steps = std::min(chunk, d.T - t0);
      // the biases are added in the pointwise pass, which saves a pass over gx to preset them
      const int64_t rows = steps * N;
      (*projection)(rows, io.x + t0 * N * d.C, d.C, gx.get(), width, false);
      for (int64_t t = t0; t < t0 + steps; ++t) {
        ForwardStep<T> s{N, H, t, units, io.lengths};
        s.gx = gx.get() + (t - t0) * N * width;
        s.bx = bx.get();
        s.gh = gh.get();
        s.bhn = bhn.get();
        s.h_prev = hs + t * NH;
        s.h = hs + (t + 1) * NH;
        if (Cell::has_c) {
          s.c_prev = c_slot(t);
          s.c = c_slot(t + 1);
        }
        if (training) {
          s.gates = Cell::has_gates ? io.reserve + lay.gates + t * N * GH : nullptr;
          s.ghn = Cell::is_gru ? io.reserve + lay.ghn + t * NH : nullptr;
        }
        (*product)(N, s.h_prev, H, gh.get(), width, false);
        if (avx512)
          forward_pass_avx512<Cell, T>(s);
        else
          forward_pass_baseline<Cell, T>(s);
        if (team > 1) {  // h_t is complete when every thread has written its units
#pragma omp barrier
        }
      }
    }
  }

  setup.rethrow();

  for (int64_t n = 0; n < N; ++n) {
    const int64_t len = io.lengths ? io.lengths[n] : d.T;
    std::memcpy(io.h_n + n * H, hs + len * NH + n * H, sizeof(T) * H);
    if (Cell::has_c) std::memcpy(io.c_n + n * H, c_slot(d.T) + n * H, sizeof(T) * H);
  }
}

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

template <class Cell, typename T>
void run_backward(const Dims& d, const BackwardIO<T>& io) {
  const int64_t N = d.N, H = d.H, GH = d.GH(), NH = N * H, TN = d.T * N;
  const bool avx512 = cpu_has_avx512();
  const ReserveLayout lay = reserve_layout(d);
  const T* hs = io.reserve + lay.hs;

  auto dgx = scratch<T>(TN * GH);
  auto dgh_own = scratch<T>(Cell::is_gru ? TN * GH : 0);
  T* dgh = Cell::is_gru ? dgh_own.get() : dgx.get();

  if (io.dh_n)
    std::memcpy(io.dh0, io.dh_n, sizeof(T) * NH);
  else
    std::fill(io.dh0, io.dh0 + NH, T(0));
  if (Cell::has_c) {
    if (io.dc_n)
      std::memcpy(io.dc0, io.dc_n, sizeof(T) * NH);
    else
      std::fill(io.dc0, io.dc0 + NH, T(0));
  }

  auto zeros = scratch<T>(io.dy ? 0 : NH);
  if (!io.dy) std::fill(zeros.get(), zeros.get() + NH, T(0));

  // bias gradients: the column sums of dgx (and, for GRU, dgh), added up step by step by the
  // thread that owns the units while the rows are still in cache; the order of the sums is fixed
  // (t down, n up) whatever the thread count
  const bool db_x = io.db_ih || io.db_hh, db_h = Cell::is_gru && io.db_hh;
  auto db_sum = scratch<T>(db_x ? (db_h ? 2 : 1) * GH : 0);
  if (db_x) std::fill(db_sum.get(), db_sum.get() + (db_h ? 2 : 1) * GH, T(0));

  const int nt = recurrent_threads(d);
  TeamSetup setup;
#pragma omp parallel num_threads(nt)
  {
    const Range units = split(H, team_size(), thread_index(), kUnitAlign);
    std::optional<StepProduct<T>> product;
    const bool ok = setup.run([&] {
      product.emplace(io.w_hh + units.begin, H, units.size(), GH, false, OutputBlocks{}, TN);
    });
    for (int64_t t = d.T - 1; ok && t >= 0; --t) {
      BackwardStep<T> s{N, H, t, units, io.lengths};
      s.dy = io.dy ? io.dy + t * NH : zeros.get();
      s.h_prev = hs + t * NH;
      s.h = hs + (t + 1) * NH;
      if (Cell::has_c) {
        s.c_prev = io.reserve + lay.cs + t * NH;
        s.c = s.c_prev + NH;
      }
      if (Cell::has_gates) s.gates = io.reserve + lay.gates + t * N * GH;
      if (Cell::is_gru) s.ghn = io.reserve + lay.ghn + t * NH;
      s.dh = io.dh0;
      s.dc = io.dc0;
      s.dgx = dgx.get() + t * N * GH;
      s.dgh = dgh + t * N * GH;
      if (avx512)
        backward_pass_avx512<Cell, T>(s);
      else
        backward_pass_baseline<Cell, T>(s);
      if (db_x) add_gate_rows<T>(N, d.G(), H, units, s.dgx, db_sum.get());
      if (db_h) add_gate_rows<T>(N, d.G(), H, units, s.dgh, db_sum.get() + GH);
#pragma omp barrier
      // dh_{t-1}[:, units] += dgh_t @ w_hh[:, units]; rows past their length have dgh = 0
      (*product)(N, s.dgh, GH, io.dh0 + units.begin, H, true);
    }
  }

  setup.rethrow();

  const int threads = get_num_threads();
  auto x_masked = scratch<T>(0);
  const T* x_rows = finite_padding(d, io.x, io.lengths, x_masked);
  parallel_gemm<T>(threads, true, false, GH, d.C, TN, dgx.get(), GH, x_rows, d.C, T(0), io.dw_ih,
                   d.C);
  parallel_gemm<T>(threads, true, false, GH, H, TN, dgh, GH, hs, H, T(0), io.dw_hh, H);
  parallel_gemm<T>(threads, false, false, TN, d.C, GH, dgx.get(), GH, io.w_ih, d.C, T(0), io.dx,
                   d.C);
  if (io.db_ih) std::memcpy(io.db_ih, db_sum.get(), sizeof(T) * GH);
  if (io.db_hh) std::memcpy(io.db_hh, db_sum.get() + (db_h ? GH : 0), sizeof(T) * GH);
}

// Zeroes a padded row's gate gradients for this thread's units (G gates).
template <typename T>
void zero_gate_rows(int64_t G, int64_t H, Range units, T* row) {
  for (int64_t g = 0; g < G; ++g)
    std::fill(row + g * H + units.begin, row + g * H + units.end, T(0));
}

}  // namespace rnnfast::cpu
