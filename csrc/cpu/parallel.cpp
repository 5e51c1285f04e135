// The kernels' thread count, what fork does to it, and the check that the threads can start.
#include "cpu/parallel.h"

#include <pthread.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
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

}  // namespace

int team_request(int threads) {
  if (g_forked_child.load()) return 1;
  if (threads > 1) g_pool_started.store(true);
  return std::max(1, threads);
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads needs n >= 1, got " + std::to_string(n));
#if !defined(RNNFAST_WITH_OPENMP)
  if (n > 1)
    throw std::runtime_error(
        "set_num_threads(" + std::to_string(n) +
        "): this rnnfast was built without OpenMP and runs its kernels on one thread; rebuild "
        "with a compiler that has OpenMP (gcc, or clang with libomp) for more");
#endif
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

}  // namespace rnnfast::cpu
