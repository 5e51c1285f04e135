// The CPU kernels' public contract: one forward and one backward per cell, over caller-owned
// buffers. Knows nothing of Python; the bindings check shapes and allocate before calling in.
#pragma once

#include <cstdint>

#include "rnnfast/cell.h"
#include "rnnfast/noise.h"

namespace rnnfast::cpu {

// Layer normalisation's parameters where Dims::layer_norm (cells with layer_norm): the gains of
// the two products [G*H] and, for a cell with c, c's gain and bias [H].
template <typename T>
struct LayerNormWeights {
  const T* gamma_ih = nullptr;
  const T* gamma_hh = nullptr;
  const T* gamma_c = nullptr;
  const T* beta_c = nullptr;
};

// and their gradients (out, the same shapes)
template <typename T>
struct LayerNormGrads {
  T* gamma_ih = nullptr;
  T* gamma_hh = nullptr;
  T* gamma_c = nullptr;
  T* beta_c = nullptr;
};

// All arrays are C-contiguous, of one dtype T (float or double), and must not alias each other.
// Optional inputs may be null: biases (no bias), h0/c0 (zero), lengths (every sequence runs T
// steps). R is the size of h: H, or P with a projection (Dims::R()).
template <typename T>
struct ForwardIO {
  const T* x;              // [T, N, C]
  const T* w_ih;           // [G*H, C]
  const T* w_hh;           // [G*H, R]
  const T* b_ih;           // [G*H] or null
  const T* b_hh;           // [G*H] or null
  const T* h0;             // [N, R] or null
  const T* c0;             // [N, H] or null; LSTM only
  const T* w_peephole;     // [3, H] rows i, f, o, or null; cells whose row has peephole only
  const T* w_hr;           // [P, H] the projection where Dims::P > 0 (cells with projection)
  const int32_t* lengths;  // [N], each in [0, T], or null
  T* hs;              // [T+1, N, R] out: slot 0 = h0, y = hs[1:]; the reserve's start in training
  T* h_n;             // [N, R] out: h after each sequence's own last step
  T* c_n;             // [N, H] out, LSTM only (else null)
  T* reserve;         // [reserve_layout(dims).total] out, or null for inference; hs points into it
  bool bf16 = false;  // the products in bfloat16, sums in float32: float32 only
  Noise noise;        // recurrent dropout and zoneout (rnnfast/noise.h); none by default
  LayerNormWeights<T> ln;  // where Dims::layer_norm
};

template <typename T>
struct BackwardIO {
  const T* x;              // [T, N, C]
  const T* w_ih;           // [G*H, C]
  const T* w_hh;           // [G*H, R]
  const T* w_peephole;     // [3, H] or null, as in the forward
  const T* w_hr;           // [P, H] or null, as in the forward
  const int32_t* lengths;  // [N] or null
  const T* reserve;        // [reserve_layout(dims).total] from the training forward
  const T* dy;             // [T, N, R] or null (zero)
  const T* dh_n;           // [N, R] or null (zero)
  const T* dc_n;           // [N, H] or null (zero); LSTM only
  T* dx;                   // [T, N, C] out
  T* dh0;                  // [N, R] out
  T* dc0;                  // [N, H] out, LSTM only (else null)
  T* dw_ih;                // [G*H, C] out
  T* dw_hh;                // [G*H, R] out
  T* db_ih;                // [G*H] out, or null where the forward had no b_ih
  T* db_hh;                // [G*H] out, or null where the forward had no b_hh
  T* dw_peephole;          // [3, H] out where w_peephole is given (row f zero when coupled)
  T* dw_hr;                // [P, H] out where w_hr is given
  bool bf16 = false;       // the products in bfloat16 (sums float32), as in the forward
  Noise noise;             // as in the forward: backward draws the same masks again
  LayerNormWeights<T> ln;  // as in the forward, where Dims::layer_norm
  LayerNormGrads<T> dln;   // out where Dims::layer_norm
};

// A cell's forward and backward through time, for T = float and double: specialised in the
// cell's own file (csrc/cpu/<cell>.cpp) by RNNFAST_CPU_CELL, and declared here, a line per kind.
template <CellKind Kind, typename T>
void cell_forward(const Dims& d, const ForwardIO<T>& io);
template <CellKind Kind, typename T>
void cell_backward(const Dims& d, const BackwardIO<T>& io);

#define RNNFAST_DECLARE_CPU_CELL(Kind)                                         \
  template <>                                                                  \
  void cell_forward<Kind, float>(const Dims& d, const ForwardIO<float>& io);   \
  template <>                                                                  \
  void cell_forward<Kind, double>(const Dims& d, const ForwardIO<double>& io); \
  template <>                                                                  \
  void cell_backward<Kind, float>(const Dims& d, const BackwardIO<float>& io); \
  template <>                                                                  \
  void cell_backward<Kind, double>(const Dims& d, const BackwardIO<double>& io);

RNNFAST_DECLARE_CPU_CELL(CellKind::lstm)
RNNFAST_DECLARE_CPU_CELL(CellKind::gru)
RNNFAST_DECLARE_CPU_CELL(CellKind::rnn_tanh)
RNNFAST_DECLARE_CPU_CELL(CellKind::rnn_relu)
RNNFAST_DECLARE_CPU_CELL(CellKind::lstm_cifg)
RNNFAST_DECLARE_CPU_CELL(CellKind::gru_reset_before)

}  // namespace rnnfast::cpu
