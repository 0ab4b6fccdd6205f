// Depthwise 2D convolution on CUDA (see ssm2d/dwconv2d.h).
//
// A block per (plane, tile of kTileH x kTileW cells): the tile's input with its halo is staged in
// shared memory in float32 (zeros outside the plane), and each thread computes kRowsPer cells of one
// column, reading each staged row once for all its cells (the k x k weights in registers). The
// backward stages dy and x over the same halo: dx is the same correlation with the kernel turned by
// 180 degrees; dweight[p][q] = sum dy[i,j] x[i+p-ph, j+q-pw] and dbias = sum dy are summed per
// thread, then per block (warp shuffles, then the warps in order), written per (channel, batch,
// tile), and added over batch and tiles in that order by a second kernel: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "common.cuh"
#include "scan2d_common.cuh"
#include "ssm2d/dwconv2d.h"

namespace ssm2d::cuda {
namespace {
using s2d::from_f;
using s2d::to_f;

constexpr int kTileW = 64, kTileH = 16, kThreads = 256;
constexpr int kRowsPer = kTileH * kTileW / kThreads;  // cells per thread, one column: 4
constexpr unsigned kMaxGridY = 65535;

int64_t tiles_of(int64_t height, int64_t width) {
  return ((height + kTileH - 1) / kTileH) * ((width + kTileW - 1) / kTileW);
}

// Stages rows i0 - PH .. i0 + kTileH - 1 + PH, columns j0 - PW .. j0 + kTileW - 1 + PW of a plane
// into s (pitch kTileW + 2 PW), zeros outside the plane. Every thread takes every kThreads-th
// element of the flat tile: its index arithmetic is most of the forward's instructions (Nsight
// Compute), but a warp per staged row (fewer instructions, uneven rows per warp) measured slower in
// the backward (results/2026-12-06-h100-mil-step-models-9a1635d/dwconv-staging-attempt).
template <typename T, int PH, int PW>
__device__ __forceinline__ void stage(float* s, const T* plane, int64_t H, int64_t W, int64_t i0, int64_t j0) {
  constexpr int SW = kTileW + 2 * PW, SH = kTileH + 2 * PH;
  for (int idx = threadIdx.x; idx < SH * SW; idx += kThreads) {
    const int r = idx / SW, c = idx % SW;
    const int64_t i = i0 + r - PH, j = j0 + c - PW;
    s[idx] = (i >= 0 && i < H && j >= 0 && j < W) ? to_f(plane[i * W + j]) : 0.f;
  }
}

// Calls f(o, p, q, v) for every tap (p, q) of the kernel and cell o < kRowsPer of the thread's
// column, v being the staged value at (row0 + o + p, col + q): each staged row is read once (K
// values) and used by every cell it reaches. The forward's sum and the weight gradient's are both
// this walk.
template <int K, typename F>
__device__ __forceinline__ void for_taps(const float* s, int SW, int row0, int col, F&& f) {
#pragma unroll
  for (int r = 0; r < kRowsPer + K - 1; ++r) {
    float v[K];
#pragma unroll
    for (int q = 0; q < K; ++q) v[q] = s[(row0 + r) * SW + col + q];
#pragma unroll
    for (int o = 0; o < kRowsPer; ++o) {
      const int p = r - o;
      if (p < 0 || p >= K) continue;
#pragma unroll
      for (int q = 0; q < K; ++q) f(o, p, q, v[q]);
    }
  }
}

// acc[o] += sum_{p,q} w[p][q] s[(row0 + o + p) * SW + col + q], o < kRowsPer.
template <int K>
__device__ __forceinline__ void correlate(float (&acc)[kRowsPer], const float (&w)[K][K], const float* s, int SW,
                                          int row0, int col) {
  for_taps<K>(s, SW, row0, col, [&](int o, int p, int q, float v) { acc[o] = fmaf(w[p][q], v, acc[o]); });
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) dwconv2d_fwd_kernel(DwConv2dArgs a, T* __restrict__ y, int64_t plane0) {
  constexpr int P = K / 2, SW = kTileW + 2 * P;
  __shared__ float s[(kTileH + 2 * P) * SW];
  const int64_t plane = plane0 + blockIdx.y, c = plane % a.channels, H = a.height, W = a.width;
  const int64_t tiles_w = (W + kTileW - 1) / kTileW;
  const int64_t i0 = (blockIdx.x / tiles_w) * kTileH, j0 = (blockIdx.x % tiles_w) * kTileW;
  const T* x = static_cast<const T*>(a.x) + plane * H * W;
  stage<T, P, P>(s, x, H, W, i0, j0);
  float w[K][K];
#pragma unroll
  for (int p = 0; p < K; ++p)
#pragma unroll
    for (int q = 0; q < K; ++q) w[p][q] = a.weight[(c * K + p) * K + q];
  const float bias = a.bias ? a.bias[c] : 0.f;
  __syncthreads();
  const int col = threadIdx.x % kTileW, row0 = (threadIdx.x / kTileW) * kRowsPer;
  float acc[kRowsPer];
#pragma unroll
  for (int o = 0; o < kRowsPer; ++o) acc[o] = bias;
  correlate<K>(acc, w, s, SW, row0, col);
  const int64_t j = j0 + col;
  if (j >= W) return;
  T* out = y + plane * H * W;
#pragma unroll
  for (int o = 0; o < kRowsPer; ++o) {
    const int64_t i = i0 + row0 + o;
    if (i < H) out[i * W + j] = from_f<T>(acc[o]);
  }
}

// part: [channel][batch][tile][K*K + 1] (dweight, then dbias), or null when neither is wanted.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads) dwconv2d_bwd_kernel(DwConv2dArgs a, const T* __restrict__ dy,
                                                                T* __restrict__ dx, float* __restrict__ part,
                                                                int64_t plane0) {
  constexpr int P = K / 2, SW = kTileW + 2 * P, SH = kTileH + 2 * P;
  __shared__ float s_dy[SH * SW];
  __shared__ float s_x[SH * SW];
  __shared__ float s_red[kThreads / 32][K * K + 1];
  const int64_t plane = plane0 + blockIdx.y, c = plane % a.channels, b = plane / a.channels;
  const int64_t H = a.height, W = a.width;
  const int64_t tiles_w = (W + kTileW - 1) / kTileW;
  const int64_t i0 = (blockIdx.x / tiles_w) * kTileH, j0 = (blockIdx.x % tiles_w) * kTileW;
  stage<T, P, P>(s_dy, dy + plane * H * W, H, W, i0, j0);
  if (part) stage<T, P, P>(s_x, static_cast<const T*>(a.x) + plane * H * W, H, W, i0, j0);
  __syncthreads();
  const int col = threadIdx.x % kTileW, row0 = (threadIdx.x / kTileW) * kRowsPer;
  if (dx) {
    float wf[K][K];  // the kernel turned by 180 degrees
#pragma unroll
    for (int p = 0; p < K; ++p)
#pragma unroll
      for (int q = 0; q < K; ++q) wf[p][q] = a.weight[(c * K + (K - 1 - p)) * K + (K - 1 - q)];
    float acc[kRowsPer];
#pragma unroll
    for (int o = 0; o < kRowsPer; ++o) acc[o] = 0.f;
    correlate<K>(acc, wf, s_dy, SW, row0, col);
    const int64_t j = j0 + col;
    if (j < W) {
      T* out = dx + plane * H * W;
#pragma unroll
      for (int o = 0; o < kRowsPer; ++o) {
        const int64_t i = i0 + row0 + o;
        if (i < H) out[i * W + j] = from_f<T>(acc[o]);
      }
    }
  }
  if (!part) return;
  // dy of the thread's cells (zero outside the plane: staged so), then its share of each sum.
  float g[kRowsPer], db = 0.f;
#pragma unroll
  for (int o = 0; o < kRowsPer; ++o) {
    g[o] = s_dy[(row0 + o + P) * SW + col + P];
    db += g[o];
  }
  float dw[K][K];
#pragma unroll
  for (int p = 0; p < K; ++p)
#pragma unroll
    for (int q = 0; q < K; ++q) dw[p][q] = 0.f;
  for_taps<K>(s_x, SW, row0, col, [&](int o, int p, int q, float v) { dw[p][q] = fmaf(g[o], v, dw[p][q]); });
  // Per warp (shuffles), then the warps in order: K*K + 1 sums, one barrier.
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
#pragma unroll
  for (int p = 0; p < K; ++p)
#pragma unroll
    for (int q = 0; q < K; ++q) {
      float v = dw[p][q];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) s_red[warp][p * K + q] = v;
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) db += __shfl_xor_sync(0xffffffffu, db, o);
  if (lane == 0) s_red[warp][K * K] = db;
  __syncthreads();
  if (threadIdx.x <= K * K) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) t += s_red[w][threadIdx.x];
    part[((c * a.batch + b) * gridDim.x + blockIdx.x) * (K * K + 1) + threadIdx.x] = t;
  }
}

// dweight (C, K, K) and dbias (C): the partials of each channel added over batch and tiles in order.
__global__ void dwconv2d_reduce_kernel(const float* __restrict__ part, int64_t channels, int64_t per_channel, int kk,
                                       float* dweight, float* dbias) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= channels * (kk + 1)) return;
  const int64_t c = t / (kk + 1);
  const int k = static_cast<int>(t % (kk + 1));
  float* dst = k < kk ? (dweight ? dweight + c * kk + k : nullptr) : (dbias ? dbias + c : nullptr);
  if (!dst) return;
  const float* src = part + c * per_channel * (kk + 1) + k;
  float s = 0.f;
  for (int64_t m = 0; m < per_channel; ++m) s += src[m * (kk + 1)];
  *dst = s;
}

void check_args(const DwConv2dArgs& a, const char* what) {
  const std::string w(what);
  if (!a.device.is_cuda()) throw ArgumentError(w + ": the depthwise convolution kernels run on CUDA only");
  if (a.dtype == DType::kFloat64) throw ArgumentError(w + ": x must be float32, float16 or bfloat16");
  if (a.batch < 0 || a.channels < 1 || a.height < 1 || a.width < 1)
    throw ArgumentError(w + ": batch >= 0 and channels, height, width >= 1 are required");
  if (a.kh != a.kw || (a.kh != 3 && a.kh != 5 && a.kh != 7))
    throw ArgumentError(w + ": the kernel must be 3x3, 5x5 or 7x7, got " + std::to_string(a.kh) + "x" +
                        std::to_string(a.kw));
  if (!a.x || !a.weight) throw ArgumentError(w + ": x and weight are required");
  if (a.height * a.width > (int64_t{1} << 40) || tiles_of(a.height, a.width) > 0x7fffffff)
    throw ArgumentError(w + ": the plane is too large");
}

template <typename F>
void for_plane_chunks(int64_t planes, F&& launch) {
  for (int64_t p0 = 0; p0 < planes; p0 += kMaxGridY) launch(p0, static_cast<unsigned>(std::min<int64_t>(kMaxGridY, planes - p0)));
}

template <typename T, int K>
void fwd_t(const DwConv2dArgs& a, void* y, cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>(tiles_of(a.height, a.width));
  for_plane_chunks(a.batch * a.channels, [&](int64_t p0, unsigned n) {
    dwconv2d_fwd_kernel<T, K><<<dim3(tiles, n), kThreads, 0, stream>>>(a, static_cast<T*>(y), p0);
    SSM2D_CUDA_CHECK_LAUNCH("dwconv2d_fwd_kernel");
  });
}

template <typename T, int K>
void bwd_t(const DwConv2dArgs& a, const void* dy, void* dx, float* part, cudaStream_t stream) {
  const auto tiles = static_cast<unsigned>(tiles_of(a.height, a.width));
  for_plane_chunks(a.batch * a.channels, [&](int64_t p0, unsigned n) {
    dwconv2d_bwd_kernel<T, K><<<dim3(tiles, n), kThreads, 0, stream>>>(a, static_cast<const T*>(dy), static_cast<T*>(dx),
                                                                       part, p0);
    SSM2D_CUDA_CHECK_LAUNCH("dwconv2d_bwd_kernel");
  });
}

template <template <typename, int> class Launch, typename... Args>
void dispatch(const DwConv2dArgs& a, Args&&... args) {
  auto by_k = [&](auto tag) {
    using T = decltype(tag);
    switch (a.kh) {
      case 3: Launch<T, 3>::run(a, args...); break;
      case 5: Launch<T, 5>::run(a, args...); break;
      default: Launch<T, 7>::run(a, args...); break;
    }
  };
  switch (a.dtype) {
    case DType::kFloat32: by_k(float{}); break;
    case DType::kFloat16: by_k(__half{}); break;
    case DType::kBFloat16: by_k(__nv_bfloat16{}); break;
    default: break;
  }
}

template <typename T, int K>
struct Fwd {
  static void run(const DwConv2dArgs& a, void* y, cudaStream_t s) { fwd_t<T, K>(a, y, s); }
};
template <typename T, int K>
struct Bwd {
  static void run(const DwConv2dArgs& a, const void* dy, void* dx, float* part, cudaStream_t s) {
    bwd_t<T, K>(a, dy, dx, part, s);
  }
};

}  // namespace

void dwconv2d_forward(const DwConv2dArgs& a, void* y) {
  check_args(a, "dwconv2d_forward");
  if (!y) throw ArgumentError("dwconv2d_forward: y is required");
  if (a.batch == 0) return;
  DeviceGuard guard(a.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  dispatch<Fwd>(a, y, stream);
}

int64_t dwconv2d_backward_workspace_floats(int64_t batch, int64_t channels, int64_t height, int64_t width, int kh,
                                           int kw) {
  return channels * batch * tiles_of(height, width) * (static_cast<int64_t>(kh) * kw + 1);
}

void dwconv2d_backward(const DwConv2dArgs& a, const void* dy, void* dx, float* dweight, float* dbias, float* workspace) {
  check_args(a, "dwconv2d_backward");
  if (!dy) throw ArgumentError("dwconv2d_backward: dy is required");
  const bool sums = dweight || dbias;
  if (sums && !workspace)
    throw ArgumentError("dwconv2d_backward: dweight / dbias need the workspace (dwconv2d_backward_workspace_floats)");
  DeviceGuard guard(a.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int kk = a.kh * a.kw;
  if (a.batch == 0) {  // nothing to add: the sums are zero
    if (dweight) SSM2D_CUDA_CHECK(cudaMemsetAsync(dweight, 0, a.channels * kk * sizeof(float), stream));
    if (dbias) SSM2D_CUDA_CHECK(cudaMemsetAsync(dbias, 0, a.channels * sizeof(float), stream));
    return;
  }
  if (!dx && !sums) return;
  float* part = sums ? workspace : nullptr;
  dispatch<Bwd>(a, dy, dx, part, stream);
  if (!sums) return;
  const int64_t threads = a.channels * (kk + 1);
  dwconv2d_reduce_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(
      workspace, a.channels, a.batch * tiles_of(a.height, a.width), kk, dweight, dbias);
  SSM2D_CUDA_CHECK_LAUNCH("dwconv2d_reduce_kernel");
}

}  // namespace ssm2d::cuda
