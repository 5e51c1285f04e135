// The scratch allocator: large blocks come from (and return to) a bounded cache.
#include "cpu/scratch.h"

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace rnnfast::cpu {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
// Smaller blocks are cheap for malloc itself. From 128 KiB on glibc maps each block afresh (and
// raises that threshold only as far as the blocks it has seen freed), so that a call's workspace of
// a few hundred KiB was faulted in and zeroed again on every call: 5-7% of a GRU training step at
// (64, 25, 128), in the forward as much as in the backward (bench/RESULTS.md, session 13).
constexpr size_t kCachedMin = size_t(64) << 10;

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

}  // namespace rnnfast::cpu
