// Every cell's GPU step, a header per cell: a new cell is its header and one line in each list
// here (dispatch_cell, in cell.h, instantiates the drivers for every row of the cell table).
#pragma once

#include "gru.cuh"
#include "lstm.cuh"
#include "recurrence.cuh"
#include "rnn.cuh"

namespace rnnfast::cuda {

// X(kind) for every cell kind, for explicit instantiations (persistent_*.cu)
#define RNNFAST_CUDA_CELLS(X) \
  X(CellKind::lstm)           \
  X(CellKind::gru)            \
  X(CellKind::rnn_tanh)       \
  X(CellKind::rnn_relu)       \
  X(CellKind::lstm_cifg)

}  // namespace rnnfast::cuda
