// A CPU emulation of the CUDA execution model, for running the project's kernels without a GPU.
//
// Every CUDA thread of a block is an OS thread: __syncthreads is a barrier over the block's
// threads, a warp shuffle an exchange through the warp's slots between two barriers over its
// lanes, shared memory a per-block allocation filled with NaN bytes (0xFF) so that a read before
// any write shows up in the results. Blocks run in waves of CUDA_EMU_BLOCKS (default 1) at a time:
// kernels whose blocks wait on each other (hand-over flags) need every such block in one wave.
// Built with AddressSanitizer (tools/cuda_emu/emu.py) an out-of-bounds global access stops the run
// with the offending line, the way compute-sanitizer's memcheck would on a GPU.
//
// This checks what a kernel computes, never how fast: warps do not run in lockstep (code that
// relies on implicit warp synchrony without __syncwarp is not modelled, nor is the memory model
// beyond the fences and atomics it names), and timing says nothing about a GPU.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emu {

struct AlignedDelete {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
using SharedBytes = std::unique_ptr<unsigned char[], AlignedDelete>;

struct Block {
  dim3 idx;
  std::unique_ptr<std::barrier<>> bar;                  // __syncthreads
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;  // shuffles, __syncwarp
  std::vector<std::array<uint64_t, 32>> slots;          // a warp's shuffle exchange
  std::vector<unsigned char> dynamic_smem;
  std::mutex m;
  std::map<std::pair<int, size_t>, SharedBytes> statics;  // __shared__ arrays
};

struct Thread {
  dim3 tid;
  Block* blk = nullptr;
  int warp = 0, lane = 0, linear = 0;
};

inline thread_local Thread t_ctx;
inline dim3 g_grid, g_block;

inline int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s && *s ? std::atoi(s) : fallback;
}

// ---- shared memory ----------------------------------------------------------------------------

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(t_ctx.blk->dynamic_smem.data());
}

// A `__shared__ T name[...]` declaration: one NaN-filled instance per block and declaration site.
template <typename A>
A& shared_static(int site) {
  Block* b = t_ctx.blk;
  std::lock_guard<std::mutex> lock(b->m);
  auto key = std::make_pair(site, typeid(A).hash_code());
  auto it = b->statics.find(key);
  if (it == b->statics.end()) {
    SharedBytes mem(new (std::align_val_t(64)) unsigned char[sizeof(A)]);
    std::memset(mem.get(), 0xFF, sizeof(A));
    it = b->statics.emplace(key, std::move(mem)).first;
  }
  return *reinterpret_cast<A*>(it->second.get());
}

// ---- synchronisation --------------------------------------------------------------------------

inline void syncthreads() { t_ctx.blk->bar->arrive_and_wait(); }
inline void syncwarp() { t_ctx.blk->warp_bar[t_ctx.warp]->arrive_and_wait(); }

template <typename T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  Block* b = t_ctx.blk;
  auto& slots = b->slots[t_ctx.warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[t_ctx.lane] = bits;
  b->warp_bar[t_ctx.warp]->arrive_and_wait();
  const uint64_t got = slots[src];
  b->warp_bar[t_ctx.warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

inline int warp_lanes() {
  const int threads = static_cast<int>(g_block.x * g_block.y * g_block.z);
  return std::min(32, threads - t_ctx.warp * 32);
}

template <typename T>
T shfl(T v, int src, int width) {
  const int lane = t_ctx.lane, base = lane & ~(width - 1);
  int s = base + (src & (width - 1));
  if (s >= warp_lanes()) s = lane;
  return exchange(v, s);
}
template <typename T>
T shfl_up(T v, unsigned delta, int width) {
  const int lane = t_ctx.lane;
  const int s = (lane & (width - 1)) < static_cast<int>(delta) ? lane : lane - static_cast<int>(delta);
  return exchange(v, s);
}
template <typename T>
T shfl_down(T v, unsigned delta, int width) {
  const int lane = t_ctx.lane;
  int s = (lane & (width - 1)) + static_cast<int>(delta) >= width ? lane : lane + static_cast<int>(delta);
  if (s >= warp_lanes()) s = lane;
  return exchange(v, s);
}
template <typename T>
T shfl_xor(T v, int mask, int width) {
  const int lane = t_ctx.lane;
  int s = lane ^ mask;
  if ((s & ~(width - 1)) != (lane & ~(width - 1)) || s >= warp_lanes()) s = lane;
  return exchange(v, s);
}

// ---- memory access helpers --------------------------------------------------------------------

template <typename P, typename I>
P add_bytes(P p, I bytes) {
  if constexpr (std::is_pointer_v<P>)
    return reinterpret_cast<P>(reinterpret_cast<uintptr_t>(p) + static_cast<intptr_t>(bytes));
  else
    return p + static_cast<P>(bytes);
}

inline unsigned ld_acquire(const void* p) {
  // A waiting thread gives its core away: on two cores thousands of threads share them.
  const unsigned v = __atomic_load_n(static_cast<const unsigned*>(p), __ATOMIC_ACQUIRE);
  std::this_thread::yield();
  return v;
}
inline void st_release(void* p, unsigned v) { __atomic_store_n(static_cast<unsigned*>(p), v, __ATOMIC_RELEASE); }

// ---- launch -----------------------------------------------------------------------------------

// Where a launch was written (CUDA_EMU_TRACE=1 prints each launch with it).
struct Site {
  const char* file;
  int line;
  const char* callee;
};

template <typename... P, typename... A>
void launch(Site site, dim3 grid, dim3 block, size_t smem, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads < 1 || threads > 1024) throw std::runtime_error("cuda_emu: block of " + std::to_string(threads) + " threads");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("cuda_emu: grid.y or grid.z above 65535");
  g_grid = grid;
  g_block = block;
  const long long nblocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  // Blocks per wave: CUDA_EMU_BLOCKS, within CUDA_EMU_MAX_THREADS OS threads at once (default 4096).
  const long long wave =
      std::max(1, std::min(env_int("CUDA_EMU_BLOCKS", 1), env_int("CUDA_EMU_MAX_THREADS", 4096) / threads));
  const int warps = (threads + 31) / 32;
  if (env_int("CUDA_EMU_TRACE", 0))
    std::fprintf(stderr, "[cuda_emu] %s:%d %s grid (%u, %u, %u) block (%u, %u, %u) smem %zu\n", site.file, site.line,
                 site.callee, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
  for (long long first = 0; first < nblocks; first += wave) {
    const long long last = std::min(nblocks, first + wave);
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<std::thread> pool;
    for (long long lin = first; lin < last; ++lin) {
      auto blk = std::make_unique<Block>();
      blk->idx = dim3(static_cast<unsigned>(lin % grid.x), static_cast<unsigned>((lin / grid.x) % grid.y),
                      static_cast<unsigned>(lin / (static_cast<long long>(grid.x) * grid.y)));
      blk->bar = std::make_unique<std::barrier<>>(threads);
      for (int w = 0; w < warps; ++w) blk->warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
      blk->slots.resize(warps);
      blk->dynamic_smem.assign(smem, 0xFF);
      blocks.push_back(std::move(blk));
    }
    for (auto& bp : blocks) {
      Block* b = bp.get();
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([b, t, &params, kernel, block] {
          t_ctx.blk = b;
          t_ctx.linear = t;
          t_ctx.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          t_ctx.warp = t / 32;
          t_ctx.lane = t % 32;
          std::apply(kernel, params);
          // A finished thread no longer counts at the barriers of the others (as on the GPU).
          b->warp_bar[t_ctx.warp]->arrive_and_drop();
          b->bar->arrive_and_drop();
        });
      }
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace cuda_emu

// ---- the CUDA names -----------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define threadIdx (::cuda_emu::t_ctx.tid)
#define blockIdx (::cuda_emu::t_ctx.blk->idx)
#define blockDim (::cuda_emu::g_block)
#define gridDim (::cuda_emu::g_grid)
#define warpSize 32
#define __shared__ CUDA_EMU_UNTRANSFORMED_SHARED_DECLARATION

inline void __syncthreads() { cuda_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_emu::syncwarp(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "cuda_emu: __trap() in block (%u, %u, %u) thread %d\n", blockIdx.x, blockIdx.y, blockIdx.z,
               cuda_emu::t_ctx.linear);
  std::abort();
}

template <typename T> T __shfl_sync(unsigned, T v, int src, int width = 32) { return cuda_emu::shfl(v, src, width); }
template <typename T> T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) { return cuda_emu::shfl_up(v, d, width); }
template <typename T> T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) { return cuda_emu::shfl_down(v, d, width); }
template <typename T> T __shfl_xor_sync(unsigned, T v, int m, int width = 32) { return cuda_emu::shfl_xor(v, m, width); }

template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldcg(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }
template <typename T> void __stcg(T* p, T v) { *p = v; }
template <typename T> void __stcs(T* p, T v) { *p = v; }

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline unsigned atomicExch(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).exchange(v); }
inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
  std::atomic_ref<unsigned>(*p).compare_exchange_strong(cmp, v);
  return cmp;
}
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int cur = a.load();
  while (cur < v && !a.compare_exchange_weak(cur, v)) {}
  return cur;
}

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return std::fmin(1.0f, std::fmax(0.0f, x)); }

// CUDA's min / max take mixed integer types (the wider wins).
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
