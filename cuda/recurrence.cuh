// The algorithm every cell shares on the GPU: one cuBLAS GEMM for the input projection of all
// T*N rows, then per step a recurrent GEMM and one fused pointwise kernel (or the persistent
// kernel for the whole recurrence); backward mirrors it and ends with three large GEMMs.
// Included by lstm.cu, gru.cu, rnn.cu (and persistent.cu for the pointwise functions).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace rnnfast::cuda {

constexpr int kPointThreads = 256;

// ---- pointers of one forward, shared by the stepped and the persistent kernels ----------------
// h_acc / c_acc: the A-precision h and c. With stride N*H they are sequences (the reserve's hs and
// cs, slot 0 the initial state); with stride 0 a single state updated in place (inference).
template <typename S, typename A>
struct FwdPtrs {
  const A* gx;             // [T, N, G*H] x W_ih^T, no bias
  const S* b_ih;           // [G*H] or null
  const S* b_hh;           // [G*H] or null
  const int32_t* lengths;  // [N] or null
  S* hseq;                 // [T+1, N, H]
  A* h_acc;                // see above
  int64_t h_stride;
  A* c_acc;  // LSTM only
  int64_t c_stride;
  A* gates;             // [T, N, G*H] or null (inference)
  A* ghn;               // [T, N, H] GRU training, else null
  const S* w_peephole;  // [3, H] rows i, f, o, or null
  S* rh;                // reset_before: r * h_{t-1} in S, what W_hn multiplies ([T, N, H] in
  int64_t rh_stride;    // the reserve with stride N*H, else one [N, H] slot with stride 0)
  S* h_n;               // [N, R]
  S* c_n;               // [N, H] LSTM
  int T, N, H;
  int R;                // the size of h: H, or P with a projection (hseq, h_acc, h_n)
  int64_t hseq_stride;  // between hseq's slots: N*R, or 0 where a cell writes one slot in place
  Noise noise;          // recurrent dropout and zoneout (rnnfast/noise.h), all zero for none
};

template <typename A, typename S>
__device__ __forceinline__ A bias_at(const S* b, int64_t k) {
  return b ? to_acc<A>(b[k]) : A(0);
}

// ---- recurrent dropout and zoneout: the CPU kernels' masks (rnnfast/noise.h), drawn in place ----
// What the candidate (LSTM g, GRU n) is scaled by at (t, n, j): 0 where dropped, 1/(1-p) where
// kept; 1 without dropout and in inference.
template <typename A>
__device__ __forceinline__ A candidate_scale(const Noise& z, int t, int n, int j) {
  if (!(z.candidate > 0) || z.expectation) return A(1);
  return noise_keeps(z.seed, z.stream, NoisePurpose::candidate, z.candidate_threshold, t, n, j)
             ? A(1) / (A(1) - A(z.candidate))
             : A(0);
}

// Whether zoneout's unit (t, n, j) takes its new value in training.
__device__ __forceinline__ bool zoneout_takes(const Noise& z, int t, int n, int j) {
  return noise_keeps(z.seed, z.stream, NoisePurpose::zoneout, z.zoneout_threshold, t, n, j);
}

// Variational dropout's scale of h's unit (n, j), the same at every step.
template <typename A>
__device__ __forceinline__ A variational_scale(const Noise& z, int n, int j) {
  return noise_keeps(z.seed, z.stream, NoisePurpose::variational, z.variational_threshold, 0, n, j)
             ? A(1) / (A(1) - A(z.variational))
             : A(0);
}

// Whether a call's products read h_{t-1} scaled by variational dropout's masks.
__host__ __device__ inline bool variational_on(const Noise& z) {
  return z.variational > 0 && !z.expectation;
}

// out = h * the variational scale of each (row % N, unit) for `count` elements of [rows, N, H]
template <typename S>
__global__ void variational_mask_kernel(int64_t count, int N, int H, Noise z,
                                        const S* __restrict__ h, S* __restrict__ out) {
  using A = acc_t<S>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int j = static_cast<int>(i % H), n = static_cast<int>((i / H) % N);
  out[i] = from_acc<S>(to_acc<A>(h[i]) * variational_scale<A>(z, n, j));
}

// dh [N, H] += the variational scale * d, the gradient reaching the products' masked input
template <typename A>
__global__ void variational_gradient_kernel(int N, int H, Noise z, const A* __restrict__ d,
                                            A* __restrict__ dh) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(N) * H) return;
  dh[i] += variational_scale<A>(z, static_cast<int>(i / H), static_cast<int>(i % H)) * d[i];
}

// A cell's pointwise math on the GPU, one (n, j) at a time: a specialisation per kind in the
// cell's own header (cuda/lstm.cuh, gru.cuh, rnn.cuh), the counterpart of its CPU struct
// (csrc/cpu/<cell>.cpp), listed in cuda/cells.cuh. A kind of the cell table without one does not
// compile. The drivers around it (padding, the products, h, the final states) are the same for all.
//   forward(p, t, i, j, ax, ah, gates, last) -> h_t: ax[G] and ah[G] the x and h sides of the
//     gates without biases; writes the cell's own state and what training keeps (gates: this
//     (n, j)'s column of the step's gates, null in inference); last: t is the row's last step
//   backward(p, t, i, j, gates, dh, dax, dah) -> the part of dh_{t-1} that does not pass through
//     W_hh; dh is the total gradient reaching h_t; writes the gate gradients dax (and dah where
//     reset_after keeps the h side apart) and updates the cell's own state gradient
template <CellKind Kind>
struct GpuCell;

// One (n, j) of step t. ah[g] is row n of h W_hh^T at gate g, unit j (no bias).
template <CellKind Kind, typename S, typename A>
__device__ __forceinline__ void forward_point(const FwdPtrs<S, A>& p, int t, int n, int j,
                                              const A* ah) {
  constexpr CellInfo cell = cell_info(Kind);
  constexpr int G = cell.gates;
  const int64_t H = p.H, NH = int64_t(p.N) * H, GH = G * H;
  const int64_t i = int64_t(n) * H + j;
  const int len = p.lengths ? p.lengths[n] : p.T;
  S* h_out = p.hseq + (t + 1) * p.hseq_stride + i;
  A* gates = p.gates ? p.gates + t * p.N * GH + n * GH + j : nullptr;
  if (t >= len) {
    // past its length a row outputs zero and carries its cell state unchanged
    *h_out = from_acc<S>(A(0));
    if (p.h_stride) p.h_acc[(t + 1) * p.h_stride + i] = A(0);
    if constexpr (cell.has_c) {
      if (p.c_stride) p.c_acc[(t + 1) * p.c_stride + i] = p.c_acc[t * p.c_stride + i];
    }
    if (gates) {
#pragma unroll
      for (int g = 0; g < G; ++g) gates[g * H] = A(0);
    }
    if (p.ghn) p.ghn[t * NH + i] = A(0);
    return;
  }
  const A* gx = p.gx + t * p.N * GH + n * GH + j;
  A ax[G];
#pragma unroll
  for (int g = 0; g < G; ++g) ax[g] = gx[g * H];
  A h = GpuCell<Kind>::forward(p, t, i, j, ax, ah, gates, t == len - 1,
                               candidate_scale<A>(p.noise, t, n, j));
  if (p.noise.zoneout > 0) {  // as the CPU's zoneout_units
    const A h_prev = p.h_acc[t * p.h_stride + i], keep = A(p.noise.zoneout);
    if (p.noise.expectation)
      h = keep * h_prev + (A(1) - keep) * h;
    else if (!zoneout_takes(p.noise, t, n, j))
      h = h_prev;
  }
  const S hs = from_acc<S>(h);
  *h_out = hs;
  p.h_acc[(t + 1) * p.h_stride + i] = h;
  if (t == len - 1) p.h_n[i] = hs;
}

template <CellKind Kind, typename S, typename A>
__global__ void forward_step_kernel(FwdPtrs<S, A> p, const A* __restrict__ gh, int t) {
  constexpr int G = gate_count(Kind);
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(p.N) * p.H) return;
  const int n = static_cast<int>(idx / p.H), j = static_cast<int>(idx % p.H);
  A ah[G];
#pragma unroll
  for (int g = 0; g < G; ++g) ah[g] = gh ? gh[int64_t(n) * G * p.H + g * p.H + j] : A(0);
  forward_point<Kind>(p, t, n, j, ah);
}

// slot 0 of every sequence, the in-place states, and h_n/c_n for rows of length 0: h [N, R], c
// [N, H] (launched over N * max(R, H))
template <typename S, typename A>
__global__ void forward_init_kernel(FwdPtrs<S, A> p, const S* __restrict__ h0,
                                    const S* __restrict__ c0) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < int64_t(p.N) * p.R) {
    const S hs = h0 ? h0[i] : from_acc<S>(A(0));
    p.hseq[i] = hs;
    p.h_acc[i] = h0 ? to_acc<A>(h0[i]) : A(0);
    p.h_n[i] = hs;
  }
  if (i < int64_t(p.N) * p.H && p.c_acc) {
    p.c_acc[i] = c0 ? to_acc<A>(c0[i]) : A(0);
    p.c_n[i] = c0 ? c0[i] : from_acc<S>(A(0));
  }
}

// ---- backward ------------------------------------------------------------------------------
template <typename S, typename A>
struct BwdPtrs {
  const S* dy;             // [T, N, H] or null
  const int32_t* lengths;  // [N] or null
  const A* hs;             // [T+1, N, H] reserve
  const A* cs;             // [T+1, N, H] reserve, LSTM
  const A* gates;          // [T, N, G*H] reserve
  const A* ghn;            // [T, N, H] reserve, GRU
  const S* w_peephole;     // [3, H] or null
  const S* rh;             // [T, N, H] reserve, reset_before: r * h_{t-1} (S values)
  const S* m;              // [T+1, N, H] reserve, with a projection: o * tanh(c) (S values)
  S* dh_seq;               // [T, N, P] workspace, with a projection: h_t's total gradient
  S* da_x;                 // [T, N, G*H] gradient of x W_ih^T + b_ih
  S* da_h;                 // [T, N, G*H] gradient of h W_hh^T + b_hh (== da_x but for GRU)
  A* dc;                   // [N, H] in place: dc_t in, dc_{t-1} out
  int T, N, H;
  Noise noise;  // the training forward's
};

// One (n, j) of step t. dh_in: the gradient reaching h_t from step t+1 (and dh_n), dy not
// included; returns the part of dh_{t-1} that does not pass through W_hh (da_h W_hh is added to
// it by the caller). Writes this step's gate gradients and updates the cell's state gradient.
template <CellKind Kind, typename S, typename A>
__device__ __forceinline__ A backward_point(const BwdPtrs<S, A>& p, int t, int n, int j, A dh_in) {
  constexpr CellInfo cell = cell_info(Kind);
  constexpr int G = cell.gates;
  const int64_t H = p.H, NH = int64_t(p.N) * H, GH = G * H;
  const int64_t i = int64_t(n) * H + j;
  const int len = p.lengths ? p.lengths[n] : p.T;
  const int64_t gofs = t * p.N * GH + n * GH + j;
  S* dax = p.da_x + gofs;
  S* dah = p.da_h + gofs;
  if (t >= len) {
    // a padded step: no gradient to its gates, and dh, dc pass through to the row's last step
#pragma unroll
    for (int g = 0; g < G; ++g) dax[g * H] = from_acc<S>(A(0));
    if constexpr (cell.reset_after) {
#pragma unroll
      for (int g = 0; g < G; ++g) dah[g * H] = from_acc<S>(A(0));
    }
    return dh_in;
  }
  A dh = dh_in + (p.dy ? to_acc<A>(p.dy[t * NH + i]) : A(0));
  // zoneout: where the unit kept h_{t-1}, h_t's gradient goes straight to it
  A carry = A(0);
  if (p.noise.zoneout > 0 && !zoneout_takes(p.noise, t, n, j)) {
    carry = dh;
    dh = A(0);
  }
  const A* gates = p.gates ? p.gates + gofs : nullptr;
  return GpuCell<Kind>::backward(p, t, i, j, gates, dh, dax, dah,
                                 candidate_scale<A>(p.noise, t, n, j)) +
         carry;
}

template <CellKind Kind, typename S, typename A>
__global__ void backward_step_kernel(BwdPtrs<S, A> p, const A* __restrict__ dh_in,
                                     A* __restrict__ dh_out, int t) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(p.N) * p.H) return;
  const int n = static_cast<int>(i / p.H), j = static_cast<int>(i % p.H);
  dh_out[i] = backward_point<Kind>(p, t, n, j, dh_in[i]);
}

// dh [N, R] and dc [N, H] (launched over N * max(R, H))
template <typename S, typename A>
__global__ void backward_init_kernel(int64_t NR, int64_t NH, const S* __restrict__ dh_n,
                                     const S* __restrict__ dc_n, A* __restrict__ dh,
                                     A* __restrict__ dc) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < NR) dh[i] = dh_n ? to_acc<A>(dh_n[i]) : A(0);
  if (i < NH && dc) dc[i] = dc_n ? to_acc<A>(dc_n[i]) : A(0);
}

template <typename S, typename A>
__global__ void backward_finish_kernel(int64_t NR, int64_t NH, const A* __restrict__ dh,
                                       const A* __restrict__ dc, S* __restrict__ dh0,
                                       S* __restrict__ dc0) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < NR) dh0[i] = from_acc<S>(dh[i]);
  if (i < NH && dc0) dc0[i] = from_acc<S>(dc[i]);
}

// dw_peephole [3, H]: row i sums da_i * c_{t-1}, row f da_f * c_{t-1} (zero when f = 1 - i),
// row o da_o * c_t over every step and row, a thread per (row, unit) in a fixed order
template <typename S, typename A>
__global__ void peephole_grad_kernel(BwdPtrs<S, A> p, int G, S* __restrict__ dw) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t H = p.H, NH = int64_t(p.N) * H, GH = G * H;
  if (idx >= 3 * H) return;
  const int row = static_cast<int>(idx / H), j = static_cast<int>(idx % H);
  const bool coupled = G == 3;
  if (coupled && row == 1) {
    dw[idx] = from_acc<S>(A(0));
    return;
  }
  const int gate = row == 2 ? G - 1 : row;  // o is the last gate block, i the first
  const int later = row == 2;               // o sees c_t, i and f see c_{t-1}
  A sum = 0;
  for (int t = 0; t < p.T; ++t)
    for (int n = 0; n < p.N; ++n)
      sum += to_acc<A>(p.da_x[t * p.N * GH + n * GH + gate * H + j]) *
             p.cs[(t + later) * NH + n * H + j];
  dw[idx] = from_acc<S>(sum);
}

template <typename S>
__global__ void fill_kernel(int64_t n, S* __restrict__ out, float v) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_acc<S>(v);
}

// out [T*N, C] = x with the rows past each sequence's length zeroed: padding is the caller's and
// never read, and 0 * NaN in the dw_ih product would spread a NaN there into every weight gradient
template <typename S>
__global__ void mask_padding_kernel(int64_t rows, int N, int C, const S* __restrict__ x,
                                    const int32_t* __restrict__ lengths, S* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * C) return;
  const int64_t row = i / C, t = row / N;
  const int n = int(row % N);
  out[i] = t < lengths[n] ? x[i] : from_acc<S>(0.f);
}

// ---- workspaces ------------------------------------------------------------------------------
struct FwdWorkspace {
  int64_t gx, gh, c_state, h_state, rh, m, h_n, h_masked, total;  // byte offsets
};

inline FwdWorkspace forward_workspace(const Dims& d, size_t acc, bool variational) {
  FwdWorkspace w{};
  w.gx = 0;
  w.gh = align_up(d.T * d.N * d.GH() * acc);
  w.c_state = w.gh + align_up(d.N * d.GH() * acc);
  w.h_state = w.c_state + align_up(d.N * d.H * acc);
  w.rh = w.h_state + align_up(d.N * d.H * acc);  // reset_before inference: one step's r * h
  w.m = w.rh + (cell_info(d.cell).reset_before ? align_up(d.N * d.H * acc) : 0);
  // with a projection: one step's o * tanh(c) in inference, and the pointwise pass's unused h_n
  w.h_n = w.m + (d.P ? align_up(d.N * d.H * acc) : 0);
  w.h_masked = w.h_n + (d.P ? align_up(d.N * d.H * acc) : 0);
  // variational dropout: h_{t-1} * its masks, what the step's product multiplies
  w.total = w.h_masked + (variational ? align_up(d.N * d.H * acc) : 0);
  return w;
}

struct BwdWorkspace {
  int64_t da_x, da_h, dh, dc, ones, drh, dh_seq, dm, dh_masked, hs_masked, total;
};

inline BwdWorkspace backward_workspace(const Dims& d, size_t st, size_t acc, bool variational) {
  BwdWorkspace w{};
  const int64_t da = align_up(d.T * d.N * d.GH() * st);
  w.da_x = 0;
  w.da_h = da;
  w.dh = w.da_h + (cell_info(d.cell).reset_after ? da : 0);
  w.dc = w.dh + 2 * align_up(d.N * d.H * acc);
  w.ones = w.dc + align_up(d.N * d.H * acc);
  w.drh = w.ones + align_up(d.T * d.N * st);  // reset_before: d(r * h_{t-1}) of one step
  w.dh_seq = w.drh + (cell_info(d.cell).reset_before ? align_up(d.N * d.H * acc) : 0);
  // with a projection: every step's gradient of h (for dW_hr), dm, and the pass's unused dh
  w.dm = w.dh_seq + (d.P ? align_up(d.T * d.N * d.P * st) : 0);
  w.dh_masked = w.dm + (d.P ? 2 * align_up(d.N * d.H * acc) : 0);
  // variational dropout: the gradient reaching a step's masked h, and the masked sequence for dW_hh
  w.hs_masked = w.dh_masked + (variational ? align_up(d.N * d.H * acc) : 0);
  w.total = w.hs_masked + (variational ? align_up(d.T * d.N * d.H * st) : 0);
  return w;
}

// ---- the persistent recurrence (persistent.cu) -------------------------------------------------
// Runs steps 0..T-1 of an initialised forward in one cooperative launch. Returns false (having
// launched nothing) where the weights do not fit on chip or the grid cannot be co-resident.
template <CellKind Kind, typename S>
bool persistent_forward(const FwdPtrs<S, acc_t<S>>& p, const S* w_hh, cudaStream_t stream,
                        bool require);
// Runs steps T-1..0 of a backward in one cooperative launch: dh (initialised with dh_n) ends as
// dh0 in A, dc as dc0, and the gate gradients da_x, da_h are all written. Returns false as above.
template <CellKind Kind, typename S>
bool persistent_backward(const BwdPtrs<S, acc_t<S>>& p, const S* w_hh, acc_t<S>* dh,
                         cudaStream_t stream, bool require);
bool persistent_fits_impl(const Dims& d, DType s);

// ---- the drivers ------------------------------------------------------------------------------

// The cuBLAS handle of the call's stream and the data and compute types of storage dtype S.
template <typename S>
struct Gemms {
  using A = acc_t<S>;
  cublas::Handle h;
  static constexpr cublas::DataType st = blas_type<S>(), at = blas_type<A>();
  cublas::ComputeType ct;
  A one = 1, zero = 0;
  explicit Gemms(const Options& opt)
      : h(cublas::handle_for(opt.stream)), ct(blas_compute<S>(opt.tf32)) {}
};

// Where a forward's pointwise kernels read and write: the reserve's parts in training, else the
// workspace's in-place states.
template <CellKind Kind, typename S>
FwdPtrs<S, acc_t<S>> forward_pointers(const Dims& d, const ForwardArgs& a, char* ws,
                                      const FwdWorkspace& wl) {
  using A = acc_t<S>;
  constexpr CellInfo cell = cell_info(Kind);
  const int64_t NH = d.N * d.H, NR = d.N * d.R();
  FwdPtrs<S, A> p{};
  p.gx = reinterpret_cast<const A*>(ws + wl.gx);
  p.R = static_cast<int>(d.R());
  p.hseq_stride = NR;
  p.b_ih = static_cast<const S*>(a.b_ih);
  p.b_hh = static_cast<const S*>(a.b_hh);
  p.lengths = a.lengths;
  p.w_peephole = static_cast<const S*>(a.w_peephole);
  p.hseq = static_cast<S*>(a.hseq);
  p.h_n = static_cast<S*>(a.h_n);
  p.c_n = static_cast<S*>(a.c_n);
  p.T = static_cast<int>(d.T);
  p.N = static_cast<int>(d.N);
  p.H = static_cast<int>(d.H);
  p.noise = a.noise;
  if (a.reserve) {
    const ReserveLayout r = reserve_layout(d);
    A* res = static_cast<A*>(a.reserve);
    p.h_acc = res + r.hs;  // may be hseq itself (S == A): both writes then agree
    p.h_stride = NR;
    if (cell.has_c) {
      p.c_acc = res + r.cs;
      p.c_stride = NH;
    }
    if (cell.saves_gates) p.gates = res + r.gates;
    if (cell.reset_after) p.ghn = res + r.ghn;
    if (cell.reset_before) {
      p.rh = reinterpret_cast<S*>(res + r.rh);  // S values in A's room
      p.rh_stride = NH;
    }
  } else {
    if (cell.reset_before) p.rh = reinterpret_cast<S*>(ws + wl.rh);
    if constexpr (std::is_same_v<S, A>) {
      p.h_acc = p.hseq;
      p.h_stride = NR;
    } else {
      p.h_acc = reinterpret_cast<A*>(ws + wl.h_state);
      p.h_stride = 0;
    }
    if (cell.has_c) {
      p.c_acc = reinterpret_cast<A*>(ws + wl.c_state);
      p.c_stride = 0;
    }
  }
  return p;
}

// The step loops every cell runs unless its GpuCell replaces them (the reset-before GRU, with a
// second product per step): per step the recurrent GEMM and the cell's pointwise kernel, or the
// persistent kernel for the whole recurrence; and dw_hh from h. A GpuCell inherits these.
struct DefaultGpuSteps {
  static constexpr bool persistent = true;  // the persistent kernels can run this cell

  template <CellKind Kind, typename S>
  static void forward_steps(const Dims& d, const ForwardArgs& a, const FwdPtrs<S, acc_t<S>>& p,
                            char* ws, const FwdWorkspace& wl, const Gemms<S>& g,
                            cudaStream_t stream) {
    const int T = static_cast<int>(d.T), N = static_cast<int>(d.N), H = static_cast<int>(d.H),
              GH = static_cast<int>(d.GH());
    const int64_t NH = int64_t(N) * H;
    auto* gh = reinterpret_cast<acc_t<S>*>(ws + wl.gh);
    auto* h_masked = reinterpret_cast<S*>(ws + wl.h_masked);
    for (int t = 0; t < T; ++t) {
      const bool zero_h = t == 0 && a.h0 == nullptr;  // h W_hh^T of a zero h0 is zero
      const S* h_in = p.hseq + t * NH;
      if (!zero_h && variational_on(p.noise)) {
        const auto mask = variational_mask_kernel<S>;
        RNNFAST_LAUNCH(mask, blocks_for(NH, kPointThreads), kPointThreads, stream, NH, N, H,
                       p.noise, h_in, h_masked);
        RNNFAST_CHECK_LAUNCH("variational_mask_kernel");
        h_in = h_masked;
      }
      if (!zero_h)
        cublas::gemm_rm(g.h, false, true, N, GH, H, &g.one, h_in, g.st, H, a.w_hh, g.st, H, &g.zero,
                        gh, g.at, GH, g.ct);
      const auto step = forward_step_kernel<Kind, S, acc_t<S>>;
      RNNFAST_LAUNCH(step, blocks_for(NH, kPointThreads), kPointThreads, stream, p,
                     zero_h ? nullptr : gh, t);
      RNNFAST_CHECK_LAUNCH("forward_step_kernel");
    }
  }

  // steps T-1..0 with dh[cur] holding dh_n; returns with dh[cur] holding dh0
  template <CellKind Kind, typename S>
  static void backward_steps(const Dims& d, const BackwardArgs& a, const BwdPtrs<S, acc_t<S>>& p,
                             acc_t<S>* const dh[2], int& cur, char* ws, const BwdWorkspace& wl,
                             const Gemms<S>& g, cudaStream_t stream) {
    const int N = static_cast<int>(d.N), H = static_cast<int>(d.H), GH = static_cast<int>(d.GH());
    const S* w_hh = static_cast<const S*>(a.w_hh);
    const bool variational = variational_on(p.noise);
    auto* dh_masked = reinterpret_cast<acc_t<S>*>(ws + wl.dh_masked);
    for (int t = static_cast<int>(d.T) - 1; t >= 0; --t) {
      const auto step = backward_step_kernel<Kind, S, acc_t<S>>;
      RNNFAST_LAUNCH(step, blocks_for(int64_t(N) * H, kPointThreads), kPointThreads, stream, p,
                     dh[cur], dh[1 - cur], t);
      RNNFAST_CHECK_LAUNCH("backward_step_kernel");
      // dh_{t-1} += da_h[t] [N, GH] W_hh [GH, H] (times the masks where the product read them)
      const S* da = p.da_h + t * N * int64_t(GH);
      if (!variational) {
        cublas::gemm_rm(g.h, false, false, N, H, GH, &g.one, da, g.st, GH, w_hh, g.st, H, &g.one,
                        dh[1 - cur], g.at, H, g.ct);
      } else {
        cublas::gemm_rm(g.h, false, false, N, H, GH, &g.one, da, g.st, GH, w_hh, g.st, H, &g.zero,
                        dh_masked, g.at, H, g.ct);
        const auto add = variational_gradient_kernel<acc_t<S>>;
        RNNFAST_LAUNCH(add, blocks_for(int64_t(N) * H, kPointThreads), kPointThreads, stream, N, H,
                       p.noise, dh_masked, dh[1 - cur]);
        RNNFAST_CHECK_LAUNCH("variational_gradient_kernel");
      }
      cur = 1 - cur;
    }
  }

  // dw_hh [GH, H] = da_h^T hseq[0:T]
  template <typename S>
  static void dw_hh(const Dims& d, const BackwardArgs& a, const BwdPtrs<S, acc_t<S>>& p,
                    const Gemms<S>& g) {
    const int H = static_cast<int>(d.H), GH = static_cast<int>(d.GH());
    cublas::gemm_rm(g.h, true, false, GH, H, static_cast<int>(d.T * d.N), &g.one, p.da_h, g.st, GH,
                    a.hseq, g.st, H, &g.zero, a.dw_hh, g.st, H, g.ct);
  }
};

// Where persistent is required but cannot run this call: what stops it, as an error.
template <CellKind Kind>
void refuse_persistent(const Dims& d, const Options& opt, bool variational) {
  if (opt.persistent != 1) return;
  const char* why = !GpuCell<Kind>::persistent ? "(its step has a second product)"
                    : d.P                      ? "with a projection"
                    : variational              ? "with variational dropout"
                                               : nullptr;
  if (why)
    throw std::runtime_error(std::string("the persistent recurrence cannot run the ") +
                             cell_info(Kind).name + " cell " + why);
}

// The cells and options the GPU's noise covers (the CPU has them all): no reset-before GRU.
template <CellKind Kind>
void check_gpu_noise(const Noise& z) {
  if (Kind == CellKind::gru_reset_before && (z.candidate > 0 || z.zoneout > 0 || z.variational > 0))
    throw std::runtime_error(
        "recurrent dropout and zoneout on the GPU do not cover the reset-before GRU (the CPU "
        "kernels do)");
}

template <CellKind Kind, typename S>
void forward_impl(const Dims& d, const ForwardArgs& a, const Options& opt) {
  check_gpu_noise<Kind>(a.noise);
  using A = acc_t<S>;
  const int T = static_cast<int>(d.T), N = static_cast<int>(d.N), C = static_cast<int>(d.C),
            H = static_cast<int>(d.H), GH = static_cast<int>(d.GH());
  const int64_t NH = int64_t(N) * H;
  auto stream = static_cast<cudaStream_t>(opt.stream);
  char* ws = static_cast<char*>(a.workspace);
  const FwdWorkspace wl = forward_workspace(d, sizeof(A), variational_on(a.noise));
  const FwdPtrs<S, A> p = forward_pointers<Kind, S>(d, a, ws, wl);

  const auto init = forward_init_kernel<S, A>;
  RNNFAST_LAUNCH(init, blocks_for(NH, kPointThreads), kPointThreads, stream, p,
                 static_cast<const S*>(a.h0), static_cast<const S*>(a.c0));  // R <= H
  RNNFAST_CHECK_LAUNCH("forward_init_kernel");
  if (T == 0) return;

  const Gemms<S> g(opt);
  // gx [T*N, GH] = x [T*N, C] W_ih^T, with W_ih stored [GH, C]
  cublas::gemm_rm(g.h, false, true, T * N, GH, C, &g.one, a.x, g.st, C, a.w_ih, g.st, C, &g.zero,
                  ws + wl.gx, g.at, GH, g.ct);

  const bool variational = variational_on(a.noise);
  if constexpr (GpuCell<Kind>::persistent) {
    if (d.P == 0 && !variational && opt.persistent != 0 &&
        persistent_forward<Kind, S>(p, static_cast<const S*>(a.w_hh), stream, opt.persistent == 1))
      return;
  }
  refuse_persistent<Kind>(d, opt, variational);
  GpuCell<Kind>::template forward_steps<Kind, S>(d, a, p, ws, wl, g, stream);
}

// Where a backward's pointwise kernels read (the reserve) and write (the workspace).
template <CellKind Kind, typename S>
BwdPtrs<S, acc_t<S>> backward_pointers(const Dims& d, const BackwardArgs& a, char* ws,
                                       const BwdWorkspace& wl) {
  using A = acc_t<S>;
  constexpr CellInfo cell = cell_info(Kind);
  const ReserveLayout r = reserve_layout(d);
  const A* res = static_cast<const A*>(a.reserve);
  BwdPtrs<S, A> p{};
  p.dy = static_cast<const S*>(a.dy);
  p.lengths = a.lengths;
  p.hs = res + r.hs;
  p.cs = cell.has_c ? res + r.cs : nullptr;
  p.gates = res + r.gates;
  p.ghn = cell.reset_after ? res + r.ghn : nullptr;
  p.rh = cell.reset_before ? reinterpret_cast<const S*>(res + r.rh) : nullptr;
  p.m = d.P ? reinterpret_cast<const S*>(res + r.m) : nullptr;
  p.dh_seq = d.P ? reinterpret_cast<S*>(ws + wl.dh_seq) : nullptr;
  p.w_peephole = static_cast<const S*>(a.w_peephole);
  p.da_x = reinterpret_cast<S*>(ws + wl.da_x);
  p.da_h = reinterpret_cast<S*>(ws + (cell.reset_after ? wl.da_h : wl.da_x));
  p.dc = cell.has_c ? reinterpret_cast<A*>(ws + wl.dc) : nullptr;
  p.noise = a.noise;
  p.T = static_cast<int>(d.T);
  p.N = static_cast<int>(d.N);
  p.H = static_cast<int>(d.H);
  return p;
}

// After the loop: dw_ih, dx, dw_hh and the bias gradients as large GEMMs over all T*N rows.
template <CellKind Kind, typename S>
void backward_weight_gradients(const Dims& d, const BackwardArgs& a, const BwdPtrs<S, acc_t<S>>& p,
                               char* ws, const BwdWorkspace& wl, const Gemms<S>& g,
                               cudaStream_t stream) {
  const int N = static_cast<int>(d.N), C = static_cast<int>(d.C), H = static_cast<int>(d.H),
            GH = static_cast<int>(d.GH());
  const int64_t TN = d.T * d.N;
  auto zero_fill = [&](void* ptr, int64_t count) {
    if (ptr) check_cuda(cudaMemsetAsync(ptr, 0, count * sizeof(S), stream), "cudaMemsetAsync");
  };
  if (TN == 0) {
    zero_fill(a.dw_ih, int64_t(GH) * C);
    zero_fill(a.dw_hh, int64_t(GH) * d.R());
    zero_fill(a.dw_hr, d.P * int64_t(H));
    zero_fill(a.db_ih, GH);
    zero_fill(a.db_hh, GH);
    zero_fill(a.dw_peephole, 3 * int64_t(H));
    return;
  }
  if (a.dw_peephole) {
    const auto peep = peephole_grad_kernel<S, acc_t<S>>;
    RNNFAST_LAUNCH(peep, blocks_for(3 * int64_t(H), kPointThreads), kPointThreads, stream, p,
                   static_cast<int>(d.G()), static_cast<S*>(a.dw_peephole));
    RNNFAST_CHECK_LAUNCH("peephole_grad_kernel");
  }
  const int tn = static_cast<int>(TN);
  // dw_ih [GH, C] = da_x^T x, with x's padded rows zeroed in dx (free until the dx product below)
  const void* x_rows = a.x;
  if (a.lengths) {
    const auto mask = mask_padding_kernel<S>;
    RNNFAST_LAUNCH(mask, blocks_for(TN * C, kPointThreads), kPointThreads, stream, TN, N, C,
                   static_cast<const S*>(a.x), a.lengths, static_cast<S*>(a.dx));
    RNNFAST_CHECK_LAUNCH("mask_padding_kernel");
    x_rows = a.dx;
  }
  cublas::gemm_rm(g.h, true, false, GH, C, tn, &g.one, p.da_x, g.st, GH, x_rows, g.st, C, &g.zero,
                  a.dw_ih, g.st, C, g.ct);
  // dx [TN, C] = da_x [TN, GH] W_ih [GH, C]
  cublas::gemm_rm(g.h, false, false, tn, C, GH, &g.one, p.da_x, g.st, GH, a.w_ih, g.st, C, &g.zero,
                  a.dx, g.st, C, g.ct);
  if (variational_on(p.noise)) {  // W_hh multiplied h_{t-1} times the masks
    BackwardArgs masked = a;
    S* hs = reinterpret_cast<S*>(ws + wl.hs_masked);
    const int64_t count = TN * H;
    const auto mask = variational_mask_kernel<S>;
    RNNFAST_LAUNCH(mask, blocks_for(count, kPointThreads), kPointThreads, stream, count, N, H,
                   p.noise, static_cast<const S*>(a.hseq), hs);
    RNNFAST_CHECK_LAUNCH("variational_mask_kernel");
    masked.hseq = hs;
    GpuCell<Kind>::template dw_hh<S>(d, masked, p, g);
  } else {
    GpuCell<Kind>::template dw_hh<S>(d, a, p, g);
  }
  if (a.db_ih || a.db_hh) {
    // bias gradients as GEMVs against a ones vector: deterministic, and on the tensor cores
    S* ones = reinterpret_cast<S*>(ws + wl.ones);
    const auto fill = fill_kernel<S>;
    RNNFAST_LAUNCH(fill, blocks_for(TN, kPointThreads), kPointThreads, stream, TN, ones, 1.f);
    RNNFAST_CHECK_LAUNCH("fill_kernel");
    if (a.db_ih)
      cublas::gemm_rm(g.h, true, false, GH, 1, tn, &g.one, p.da_x, g.st, GH, ones, g.st, 1, &g.zero,
                      a.db_ih, g.st, 1, g.ct);
    if (a.db_hh)
      cublas::gemm_rm(g.h, true, false, GH, 1, tn, &g.one, p.da_h, g.st, GH, ones, g.st, 1, &g.zero,
                      a.db_hh, g.st, 1, g.ct);
  }
}

template <CellKind Kind, typename S>
void backward_impl(const Dims& d, const BackwardArgs& a, const Options& opt) {
  using A = acc_t<S>;
  const int64_t NH = d.N * d.H, NR = d.N * d.R();
  auto stream = static_cast<cudaStream_t>(opt.stream);
  char* ws = static_cast<char*>(a.workspace);
  check_gpu_noise<Kind>(a.noise);
  const bool variational = variational_on(a.noise);
  const BwdWorkspace wl = backward_workspace(d, sizeof(S), sizeof(A), variational);
  const BwdPtrs<S, A> p = backward_pointers<Kind, S>(d, a, ws, wl);
  A* dh[2] = {reinterpret_cast<A*>(ws + wl.dh),
              reinterpret_cast<A*>(ws + wl.dh + align_up(NH * sizeof(A)))};

  const unsigned pb = blocks_for(NH, kPointThreads);
  const auto init = backward_init_kernel<S, A>;
  RNNFAST_LAUNCH(init, pb, kPointThreads, stream, NR, NH, static_cast<const S*>(a.dh_n),
                 static_cast<const S*>(a.dc_n), dh[0], p.dc);
  RNNFAST_CHECK_LAUNCH("backward_init_kernel");

  const Gemms<S> g(opt);
  int cur = 0;
  bool persistent = false;
  if constexpr (GpuCell<Kind>::persistent) {
    persistent = d.P == 0 && !variational && opt.persistent != 0 &&
                 persistent_backward<Kind, S>(p, static_cast<const S*>(a.w_hh), dh[0], stream,
                                              opt.persistent == 1);
  }
  refuse_persistent<Kind>(d, opt, variational);
  if (!persistent)
    GpuCell<Kind>::template backward_steps<Kind, S>(d, a, p, dh, cur, ws, wl, g, stream);
  const auto finish = backward_finish_kernel<S, A>;
  RNNFAST_LAUNCH(finish, pb, kPointThreads, stream, NR, NH, dh[cur], p.dc, static_cast<S*>(a.dh0),
                 static_cast<S*>(a.dc0));
  RNNFAST_CHECK_LAUNCH("backward_finish_kernel");

  backward_weight_gradients<Kind, S>(d, a, p, ws, wl, g, stream);
}

}  // namespace rnnfast::cuda
