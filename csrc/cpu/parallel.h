// Threads for the CPU kernels: every parallel loop is an OpenMP team (whose threads call the
// single-threaded BLAS, blas.h, on their own block, so no two thread pools fight), sized by what
// OpenMP really gave it.
#pragma once

#include <algorithm>
#include <cstdint>

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

// Threads the kernels use; defaults to OpenMP's default (one per core). set_num_threads throws
// std::runtime_error where the system cannot start n threads, or in a forked child (see above).
void set_num_threads(int n);
int get_num_threads();

}  // namespace rnnfast::cpu
