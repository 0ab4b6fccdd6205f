// A small std::thread parallel-for for the CPU kernels.
//
// The CPU kernels are real code for CPU users and CI, not test stubs; they parallelise over
// independent (batch, channel, state) slices. std::thread keeps the wheel free of an OpenMP
// runtime that could clash with the one the caller's framework loads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ssm2d::cpu {

// Threads used by parallel_for: SSM2D_NUM_THREADS if set (>= 1), else set_num_threads(), else
// the hardware concurrency.
int get_num_threads();
void set_num_threads(int n);  // n <= 0 restores the default

// Calls f(begin_i, end_i) on contiguous chunks of [begin, end); at most get_num_threads() chunks,
// none smaller than `grain` items (so tiny problems stay on the calling thread). The first
// exception thrown by a chunk is rethrown on the calling thread after all chunks finish.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = std::max<int64_t>(1, n / grain);
  const int64_t chunks = std::min<int64_t>(get_num_threads(), max_chunks);
  if (chunks <= 1) {
    f(begin, end);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](int64_t c) {
    const int64_t lo = begin + n * c / chunks, hi = begin + n * (c + 1) / chunks;
    try {
      f(lo, hi);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(chunks - 1));
  for (int64_t c = 1; c < chunks; ++c) workers.emplace_back(run, c);
  run(0);
  for (auto& t : workers) t.join();
  if (error) std::rethrow_exception(error);
}

// Sums i*i for i in [0, n) with parallel_for and compares with the closed form
// (n-1) n (2n-1) / 6: checks the thread pool end to end. Returns the threads used.
struct CpuSelftest {
  bool ok = false;
  int threads = 0;
  int64_t elements = 0;
};
CpuSelftest selftest(int64_t elements);

}  // namespace ssm2d::cpu
