// The CUDA backend's public contract: forward and backward through time for every cell on
// device buffers the caller allocates. Plain C++ (no CUDA types), so the bindings need no nvcc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "rnnfast/cell.h"
#include "rnnfast/noise.h"

namespace rnnfast::cuda {

// S, the storage dtype of every array the caller passes. The arithmetic, the cell state and the
// reserve use A: double for f64, float for the others (f16 and bf16 accumulate in float32).
enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

size_t storage_size(DType s);  // bytes of one S element
size_t acc_size(DType s);      // bytes of one A element

struct Options {
  void* stream = nullptr;  // cudaStream_t; every kernel and GEMM runs on it, in order
  bool tf32 = false;       // float32 GEMMs on TF32 tensor cores (about 1e-3 relative error)
  int persistent = -1;     // -1 the persistent recurrence where it fits, 0 never, 1 required
  int device = -1;         // made current before any work (-1: leave the current device)
};

// The reserve: ReserveLayout(dims) elements of A (hs, cs, gates, ghn back to back). For
// f32/f64 hs may be the caller's hseq itself (pass hseq == reserve): y is then a view of it.
size_t reserve_bytes(const Dims& d, DType s);
// Scratch for one call; contents need not survive between calls. variational: the call has
// variational recurrent dropout (Noise::variational > 0), whose masked copies of h take room.
size_t forward_workspace_bytes(const Dims& d, DType s, bool training, bool variational = false);
size_t backward_workspace_bytes(const Dims& d, DType s, bool variational = false);

// Every pointer is device memory of dtype S unless said otherwise; may-be-null as marked.
struct ForwardArgs {
  const void* x;           // [T, N, C]
  const void* w_ih;        // [G*H, C]
  const void* w_hh;        // [G*H, H]
  const void* b_ih;        // [G*H] or null
  const void* b_hh;        // [G*H] or null
  const void* h0;          // [N, H] or null (zeros)
  const void* c0;          // [N, H] or null (zeros); LSTM only
  const int32_t* lengths;  // [N] int32 in [0, T], or null (all T)
  void* hseq;              // [T+1, N, H] out: slot 0 = h0, slot t+1 = y[t] (0 past a length)
  void* h_n;               // [N, H] out: h after each row's last step
  void* c_n;               // [N, H] out, LSTM only (else null)
  void* reserve;           // reserve_bytes() of A, or null for inference
  void* workspace;         // forward_workspace_bytes()
  const void* w_peephole = nullptr;  // [3, H] rows i, f, o, or null; cells with peepholes only
  const void* w_hr = nullptr;        // [P, H] where Dims::P > 0; hseq, h0, h_n are then [.., N, P]
  // recurrent dropout and zoneout (rnnfast/noise.h; all zero: none), with expectation set in
  // inference; the masks are the CPU kernels' bit for bit. Not with a projection, nor for the
  // reset-before GRU; never on the persistent kernels.
  Noise noise{};
};

struct BackwardArgs {
  const void* x;                     // [T, N, C] the forward's input
  const void* w_ih;                  // [G*H, C]
  const void* w_hh;                  // [G*H, H]
  const int32_t* lengths;            // [N] or null, as in forward
  const void* reserve;               // the training forward's reserve (A)
  const void* hseq;                  // [T+1, N, H] the forward's hseq (S)
  const void* dy;                    // [T, N, H] or null (zeros)
  const void* dh_n;                  // [N, H] or null
  const void* dc_n;                  // [N, H] or null; LSTM only
  void* dx;                          // [T, N, C] out
  void* dh0;                         // [N, H] out
  void* dc0;                         // [N, H] out, LSTM only (else null)
  void* dw_ih;                       // [G*H, C] out
  void* dw_hh;                       // [G*H, H] out
  void* db_ih;                       // [G*H] out or null (no bias)
  void* db_hh;                       // [G*H] out or null
  void* workspace;                   // backward_workspace_bytes()
  const void* w_peephole = nullptr;  // [3, H] or null, as in the forward
  void* dw_peephole = nullptr;       // [3, H] out where w_peephole is given
  const void* w_hr = nullptr;        // [P, H] where Dims::P > 0 (dy, dh_n, dh0 [.., N, P])
  void* dw_hr = nullptr;             // [P, H] out, likewise
  Noise noise{};                     // the training forward's
};

// Both throw std::runtime_error (with the CUDA or cuBLAS error) on failure; the work is queued on
// opt.stream and may still be running when they return.
void forward(const Dims& d, DType s, const ForwardArgs& a, const Options& opt);
void backward(const Dims& d, DType s, const BackwardArgs& a, const Options& opt);

// Whether forward would take the persistent recurrence for these dims on the current device.
bool persistent_fits(const Dims& d, DType s);

// CUDA runtime version, the current device's name and compute capability, for build_info().
std::string runtime_summary();

}  // namespace rnnfast::cuda
