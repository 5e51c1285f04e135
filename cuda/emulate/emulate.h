// Host emulation of the CUDA backend's pointwise launches, force-included (g++ -include) when
// cuda/emulate/run.py builds lstm.cu, gru.cu, rnn.cu and dispatch.cu as C++ to check the drivers
// and kernels on a machine without a GPU. Not part of the package build.
#pragma once

#include <cuda_runtime.h>

#include <cstring>

struct EmulatedDim3 {
  unsigned x = 0, y = 1, z = 1;
};
inline thread_local EmulatedDim3 threadIdx, blockIdx, blockDim;

// every thread of every block, one after another: right for kernels without barriers
#define RNNFAST_LAUNCH(kernel, grid, block, stream, ...) \
  do {                                                   \
    (void)(stream);                                      \
    const unsigned grid_ = (grid), block_ = (block);     \
    blockDim.x = block_;                                 \
    for (unsigned b_ = 0; b_ < grid_; ++b_)              \
      for (unsigned t_ = 0; t_ < block_; ++t_) {         \
        blockIdx.x = b_;                                 \
        threadIdx.x = t_;                                \
        kernel(__VA_ARGS__);                             \
      }                                                  \
  } while (0)
