// The kernels' scratch memory and the bounded cache it returns to.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace rnnfast::cpu {

// Scratch memory for one call. Large buffers are 2 MiB-aligned and advised as huge pages (as
// NumPy does for its arrays), and go back to a bounded cache when freed: otherwise a training
// step at a large shape has the kernel fault in and zero the same scratch again on every call
// (bench/RESULTS.md has the figures).
void* allocate_scratch(size_t bytes);
void release_scratch(void* p);
template <typename T>
using Scratch = std::unique_ptr<T[], void (*)(void*)>;
template <typename T>
Scratch<T> scratch(int64_t n) {
  return Scratch<T>(static_cast<T*>(allocate_scratch(sizeof(T) * size_t(std::max<int64_t>(n, 1)))),
                    release_scratch);
}
// The cache's bound in bytes (0 turns it off and empties it), and what it holds now.
void set_scratch_cache_limit(size_t bytes);
size_t scratch_cache_limit();
size_t scratch_cache_bytes();

}  // namespace rnnfast::cpu
