// Threading and BLAS plumbing for the CPU kernels: every parallel loop is an OpenMP team whose
// threads call a single-threaded BLAS on their own block, so no two thread pools fight.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "cpu/kernels.h"

#if defined(RNNFAST_WITH_OPENMP)
#include <omp.h>
#endif

namespace rnnfast::cpu {

struct Range {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

// Part k of `parts` of [0, n), in whole multiples of `align` (the last part takes the rest).
inline Range split(int64_t n, int parts, int k, int64_t align = 1) {
  const int64_t blocks = (n + align - 1) / align;
  const int64_t per = blocks / parts, extra = blocks % parts;
  const int64_t b0 = k * per + std::min<int64_t>(k, extra);
  const int64_t b1 = b0 + per + (k < extra ? 1 : 0);
  return {std::min(n, b0 * align), std::min(n, b1 * align)};
}

// This thread's index in its team, and the number of threads in that team. OpenMP may give a
// region fewer threads than its num_threads clause asks for (OMP_THREAD_LIMIT, OMP_DYNAMIC, a call
// from inside another parallel region), so inside a region work is split by team_size(), never by
// the request.
#if defined(RNNFAST_WITH_OPENMP)
inline int thread_index() { return omp_get_thread_num(); }
inline int team_size() { return omp_get_num_threads(); }
#else
inline int thread_index() { return 0; }
inline int team_size() { return 1; }
#endif

// Every parallel region asks for its threads through this: it caps the request at what the
// process may use (one thread in a child forked after a multi-threaded region: libgomp's thread
// pool does not survive fork, and a second team there would wait for threads that no longer exist)
// and records that a pool exists.
int team_request(int threads);

// Scratch memory for one call. Large buffers are 2 MiB-aligned and advised as huge pages (as
// NumPy does for its arrays), and go back to a bounded cache when freed: a training step at
// (N, T, H) = (32, 100, 1024) otherwise spends 5-8% of its time having the kernel fault in and
// zero the same 100 MB of scratch again on every call.
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

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C through the BLAS; any zero size is handled.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// The same product with the rows of C split across `threads` threads (one OpenMP team).
template <typename T>
void parallel_gemm(int threads, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                   const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace rnnfast::cpu
