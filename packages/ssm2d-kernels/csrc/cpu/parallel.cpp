#include "ssm2d/parallel.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace ssm2d::cpu {

namespace {
std::atomic<int> g_num_threads{0};

int env_threads() {
  const char* s = std::getenv("SSM2D_NUM_THREADS");
  if (!s || !*s) return 0;
  char* endp = nullptr;
  long v = std::strtol(s, &endp, 10);
  if (*endp != '\0' || v < 1) return 0;  // ignored when malformed, like OMP_NUM_THREADS
  return static_cast<int>(std::min<long>(v, 1024));
}
}  // namespace

int get_num_threads() {
  if (int e = env_threads()) return e;
  if (int n = g_num_threads.load()) return n;
  unsigned hw = std::thread::hardware_concurrency();
  return hw ? static_cast<int>(hw) : 1;
}

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0); }

CpuSelftest selftest(int64_t elements) {
  if (elements <= 0 || elements > (int64_t{1} << 20) * 1024)
    throw std::invalid_argument("elements must be in [1, 2^30], got " + std::to_string(elements));
  unsigned __int128 total = 0;
  std::mutex total_mutex;
  std::atomic<int> used{0};
  parallel_for(0, elements, 1 << 16, [&](int64_t lo, int64_t hi) {
    unsigned __int128 s = 0;
    for (int64_t i = lo; i < hi; ++i) s += static_cast<unsigned __int128>(i) * static_cast<unsigned __int128>(i);
    std::lock_guard<std::mutex> lock(total_mutex);
    total += s;
    used.fetch_add(1);
  });
  const unsigned __int128 n = static_cast<unsigned __int128>(elements);
  const unsigned __int128 expect = (n - 1) * n * (2 * n - 1) / 6;
  CpuSelftest r;
  r.ok = total == expect;
  r.threads = used.load();
  r.elements = elements;
  return r;
}

}  // namespace ssm2d::cpu
