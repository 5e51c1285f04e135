// Host emulation of the CUDA backend's launches, force-included (g++ -include) when
// cuda/emulate/run.py builds the .cu files as C++ to check the drivers and kernels on a machine
// without a GPU. Pointwise launches run their threads one after another; a cooperative launch
// runs every thread of every block as an OS thread, with real barriers for __syncthreads, the
// warp shuffles and the grid barrier. Not part of the package build.
#pragma once

#include <cuda_runtime.h>

#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define RNNFAST_EMULATE 1
#define __launch_bounds__(...)

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

// ---- cooperative launches --------------------------------------------------------------------
struct EmulatedBlock {
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> lanes;  // one slot per thread for the shuffles
  std::vector<unsigned char> smem;
  EmulatedBlock(unsigned threads, size_t smem_bytes)
      : block(threads), lanes(threads), smem(smem_bytes + 16) {
    for (unsigned w = 0; w < threads / 32; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(32));
  }
};
inline thread_local EmulatedBlock* emulated_block = nullptr;
inline thread_local std::barrier<>* emulated_grid = nullptr;

inline void __syncthreads() { emulated_block->block.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double* slots = emulated_block->lanes.data() + warp * 32;
  slots[lane] = static_cast<double>(v);
  emulated_block->warps[warp]->arrive_and_wait();
  const T r = static_cast<T>(slots[lane ^ lane_mask]);
  emulated_block->warps[warp]->arrive_and_wait();
  return r;
}

template <typename T>
T __ldcg(const T* p) {
  return *p;
}

namespace cooperative_groups {
struct grid_group {
  void sync() { emulated_grid->arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

#define RNNFAST_DYNAMIC_SHARED(name)                  \
  unsigned char* name = emulated_block->smem.data() + \
                        (16 - reinterpret_cast<uintptr_t>(emulated_block->smem.data()) % 16) % 16

template <typename... Args>
void emulate_cooperative(void (*kernel)(Args...), unsigned grid, unsigned threads, size_t smem,
                         Args... args) {
  std::barrier<> grid_barrier(grid * threads);
  std::vector<std::unique_ptr<EmulatedBlock>> blocks;
  for (unsigned b = 0; b < grid; ++b)
    blocks.push_back(std::make_unique<EmulatedBlock>(threads, smem));
  std::vector<std::thread> all;
  for (unsigned b = 0; b < grid; ++b)
    for (unsigned t = 0; t < threads; ++t)
      all.emplace_back([&, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        blockDim.x = threads;
        emulated_block = blocks[b].get();
        emulated_grid = &grid_barrier;
        kernel(args...);
      });
  for (auto& th : all) th.join();
}
