// Thread count, the BLAS bindings (scipy-openblas32, whose symbols carry a scipy_ prefix) and the
// row-split GEMM every large product goes through.
#include "cpu/parallel.h"

#include <cblas.h>
#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <climits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace rnnfast::cpu {

namespace {
std::atomic<int> g_threads{0};            // 0: OpenMP's default
std::atomic<bool> g_pool_started{false};  // a region of more than one thread has run
std::atomic<bool> g_forked_child{false};  // fork()ed after that: one thread from here on

// Registered once, when the extension loads.
const bool g_fork_handler = (pthread_atfork(nullptr, nullptr,
                                            [] {
                                              if (g_pool_started.load()) g_forked_child.store(true);
                                            }),
                             true);

// This OpenBLAS instance is ours alone (NumPy and SciPy bundle their own copies). It runs
// single-threaded: every parallel loop is an OpenMP team whose threads each call it on a block.
const bool g_serial_blas = (scipy_openblas_set_num_threads(1), true);

void check_blas_size(int64_t v) {
  if (v > INT_MAX)
    throw std::length_error("rnnfast: a matrix dimension exceeds the BLAS's 32-bit range");
}
// C = beta * C, for an empty inner dimension (the BLAS is not asked about K = 0)
template <typename T>
void scale(int64_t M, int64_t N, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
}
}  // namespace

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kCachedMin = size_t(1) << 20;  // smaller blocks are cheap for malloc itself

struct ScratchCache {
  std::mutex mutex;
  std::unordered_map<void*, size_t> live;      // large blocks handed out, with their sizes
  std::vector<std::pair<void*, size_t>> idle;  // freed large blocks, oldest first
  size_t idle_bytes = 0;
  size_t limit = initial_limit();

  static size_t initial_limit() {
    // RNNFAST_SCRATCH_CACHE_MB overrides the default of 1 GiB
    // (rnnfast/__init__.py refuses anything but digits before the extension loads)
    const char* v = std::getenv("RNNFAST_SCRATCH_CACHE_MB");
    if (!v || !*v) return size_t(1) << 30;
    char* end = nullptr;
    const unsigned long long mb = std::strtoull(v, &end, 10);
    if (*v == '-' || *end != '\0' || mb > (size_t(-1) >> 20)) return size_t(1) << 30;
    return size_t(mb) << 20;
  }
  void trim(size_t to) {  // with the mutex held
    while (idle_bytes > to && !idle.empty()) {
      idle_bytes -= idle.front().second;
      std::free(idle.front().first);
      idle.erase(idle.begin());
    }
  }
};
ScratchCache& cache() {
  static ScratchCache* c = new ScratchCache;  // never destroyed: frees may come during exit
  return *c;
}
}  // namespace

void* allocate_scratch(size_t bytes) {
  const size_t align = bytes >= 2 * kHugePage ? kHugePage : 64;
  const size_t size = (bytes + align - 1) / align * align;
  if (size < kCachedMin) {
    void* p = std::aligned_alloc(align, size);
    if (!p) throw std::bad_alloc();
    return p;
  }
  ScratchCache& c = cache();
  {
    // the smallest idle block that fits and wastes at most half of itself
    std::lock_guard<std::mutex> lock(c.mutex);
    auto best = c.idle.end();
    for (auto it = c.idle.begin(); it != c.idle.end(); ++it)
      if (it->second >= size && it->second <= 2 * size &&
          (best == c.idle.end() || it->second < best->second))
        best = it;
    if (best != c.idle.end()) {
      const auto [p, got] = *best;
      c.idle.erase(best);
      c.idle_bytes -= got;
      c.live.emplace(p, got);
      return p;
    }
  }
  void* p = std::aligned_alloc(align, size);
  if (!p) throw std::bad_alloc();
  if (align == kHugePage) madvise(p, size, MADV_HUGEPAGE);  // advice only: failure changes nothing
  std::lock_guard<std::mutex> lock(c.mutex);
  c.live.emplace(p, size);
  return p;
}

void release_scratch(void* p) {
  if (!p) return;
  ScratchCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const auto it = c.live.find(p);
  if (it == c.live.end()) return std::free(p);  // a small block
  const size_t size = it->second;
  c.live.erase(it);
  if (size > c.limit) return std::free(p);
  c.idle.emplace_back(p, size);
  c.idle_bytes += size;
  c.trim(c.limit);
}

void set_scratch_cache_limit(size_t bytes) {
  ScratchCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.limit = bytes;
  c.trim(bytes);
}

size_t scratch_cache_limit() {
  ScratchCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.limit;
}

size_t scratch_cache_bytes() {
  ScratchCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.idle_bytes;
}

int team_request(int threads) {
  if (g_forked_child.load()) return 1;
  if (threads > 1) g_pool_started.store(true);
  return std::max(1, threads);
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads needs n >= 1, got " + std::to_string(n));
  if (n > 1 && g_forked_child.load())
    throw std::runtime_error(
        "this process was forked after rnnfast ran a multi-threaded kernel, and OpenMP's threads "
        "do not survive fork: the kernels run on one thread here (start workers with the "
        "'spawn' or 'forkserver' method to use more)");
  // libgomp ends the whole process when it cannot start a team's threads; find out here, where
  // a failure is an exception, by starting n - 1 threads that wait for each other
  std::vector<std::thread> trial;
  std::atomic<bool> release{false};
  std::string failure;
  for (int i = 1; i < n && failure.empty(); ++i) {
    try {
      trial.emplace_back([&release] {
        while (!release.load()) std::this_thread::yield();
      });
    } catch (const std::system_error& e) {
      failure = e.what();
    }
  }
  release = true;
  for (auto& t : trial) t.join();
  if (!failure.empty())
    throw std::runtime_error("set_num_threads(" + std::to_string(n) + "): could not start " +
                             std::to_string(n) + " threads (" + failure + ")");
  g_threads = n;
}

int get_num_threads() {
  if (g_forked_child.load()) return 1;
  const int n = g_threads.load();
  if (n > 0) return n;
#if defined(RNNFAST_WITH_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                 int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return scale(M, N, beta, C, ldc);
  for (int64_t v : {M, N, K, lda, ldb, ldc}) check_blas_size(v);
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                    trans_b ? CblasTrans : CblasNoTrans, int(M), int(N), int(K), alpha, A,
                    int(std::max<int64_t>(lda, 1)), B, int(std::max<int64_t>(ldb, 1)), beta, C,
                    int(ldc));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
                  const double* A, int64_t lda, const double* B, int64_t ldb, double beta,
                  double* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return scale(M, N, beta, C, ldc);
  for (int64_t v : {M, N, K, lda, ldb, ldc}) check_blas_size(v);
  scipy_cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                    trans_b ? CblasTrans : CblasNoTrans, int(M), int(N), int(K), alpha, A,
                    int(std::max<int64_t>(lda, 1)), B, int(std::max<int64_t>(ldb, 1)), beta, C,
                    int(ldc));
}

template <typename T>
void parallel_gemm(int threads, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                   const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  // small products are not worth a team
  if (M * N * K < (int64_t(1) << 18)) threads = 1;
  threads = team_request(int(std::min<int64_t>(threads, std::max<int64_t>(M / 4, 1))));
#pragma omp parallel num_threads(threads)
  {
    const Range rows = split(M, team_size(), thread_index(), 4);
    // op(A)'s row r starts at A + r*lda untransposed, at column r of A transposed
    const T* a = trans_a ? A + rows.begin : A + rows.begin * lda;
    gemm<T>(trans_a, trans_b, rows.size(), N, K, T(1), a, lda, B, ldb, beta, C + rows.begin * ldc,
            ldc);
  }
}

#define RNNFAST_INSTANTIATE(T)                                                                  \
  template void parallel_gemm<T>(int, bool, bool, int64_t, int64_t, int64_t, const T*, int64_t, \
                                 const T*, int64_t, T, T*, int64_t);
RNNFAST_INSTANTIATE(float)
RNNFAST_INSTANTIATE(double)
#undef RNNFAST_INSTANTIATE

}  // namespace rnnfast::cpu
