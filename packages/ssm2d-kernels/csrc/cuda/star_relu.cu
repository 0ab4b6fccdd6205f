// StarReLU on CUDA (see ssm2d/star_relu.h): one read of x and one write of y in 16-byte vectors; the
// backward's two scalar sums per thread, then per block (shuffles, shared memory), then over the
// (at most kMaxBlocks) blocks by a second kernel in block order: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "common.cuh"
#include "scan2d_common.cuh"
#include "ssm2d/star_relu.h"

namespace ssm2d::cuda {
namespace {
using s2d::from_f;
using s2d::to_f;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

int64_t blocks_for(int64_t n, int vec) {
  const int64_t vecs = (n + vec - 1) / vec;
  return std::max<int64_t>(1, std::min(kMaxBlocks, (vecs + kThreads - 1) / kThreads));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) star_relu_fwd_kernel(StarReluArgs a, T* __restrict__ y) {
  constexpr int V = kVec<T>;
  const float s = *a.scale, b = *a.bias;
  const T* x = static_cast<const T*>(a.x);
  const int64_t nv = a.n / V, stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nv; q += stride) {
    const Pack<T> in = reinterpret_cast<const Pack<T>*>(x)[q];
    Pack<T> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float r = fmaxf(to_f(in.v[i]), 0.f);
      out.v[i] = from_f<T>(fmaf(s * r, r, b));
    }
    reinterpret_cast<Pack<T>*>(y)[q] = out;
  }
  // the tail (n not a multiple of the vector): block 0
  if (blockIdx.x == 0)
    for (int64_t k = nv * V + threadIdx.x; k < a.n; k += kThreads) {
      const float r = fmaxf(to_f(x[k]), 0.f);
      y[k] = from_f<T>(fmaf(s * r, r, b));
    }
}

__device__ __forceinline__ float block_sum(float v, float* s_red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  __syncthreads();  // s_red may still be read by a previous call
  if (lane == 0) s_red[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) t += s_red[w];  // every thread: the same fixed order
  return t;
}

// part: [block][2] (dscale, dbias), or null when neither sum is wanted.
template <typename T>
__global__ void __launch_bounds__(kThreads) star_relu_bwd_kernel(StarReluArgs a, const T* __restrict__ dy,
                                                                 T* __restrict__ dx, float* __restrict__ part) {
  constexpr int V = kVec<T>;
  __shared__ float s_red[kThreads / 32];
  const float s2 = 2.f * *a.scale;
  const T* x = static_cast<const T*>(a.x);
  const int64_t nv = a.n / V, stride = static_cast<int64_t>(gridDim.x) * kThreads;
  float ds = 0.f, db = 0.f;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nv; q += stride) {
    const Pack<T> xi = reinterpret_cast<const Pack<T>*>(x)[q];
    const Pack<T> gi = reinterpret_cast<const Pack<T>*>(dy)[q];
    Pack<T> out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float r = fmaxf(to_f(xi.v[i]), 0.f), g = to_f(gi.v[i]);
      out.v[i] = from_f<T>(g * s2 * r);
      ds = fmaf(g * r, r, ds);
      db += g;
    }
    reinterpret_cast<Pack<T>*>(dx)[q] = out;
  }
  if (blockIdx.x == 0)
    for (int64_t k = nv * V + threadIdx.x; k < a.n; k += kThreads) {
      const float r = fmaxf(to_f(x[k]), 0.f), g = to_f(dy[k]);
      dx[k] = from_f<T>(g * s2 * r);
      ds = fmaf(g * r, r, ds);
      db += g;
    }
  if (!part) return;
  ds = block_sum(ds, s_red);
  db = block_sum(db, s_red);
  if (threadIdx.x == 0) {
    part[2 * blockIdx.x] = ds;
    part[2 * blockIdx.x + 1] = db;
  }
}

__global__ void star_relu_reduce_kernel(const float* __restrict__ part, int64_t blocks, float* dscale, float* dbias) {
  const int which = threadIdx.x;  // 0: dscale, 1: dbias
  if (which > 1) return;
  float t = 0.f;
  for (int64_t b = 0; b < blocks; ++b) t += part[2 * b + which];
  float* out = which == 0 ? dscale : dbias;
  if (out) *out = t;
}

void check_args(const StarReluArgs& a, const char* what) {
  if (!a.device.is_cuda()) throw ArgumentError(std::string(what) + ": the StarReLU kernels run on CUDA only");
  if (a.dtype == DType::kFloat64) throw ArgumentError(std::string(what) + ": x must be float32, float16 or bfloat16");
  if (!a.scale || !a.bias) throw ArgumentError(std::string(what) + ": scale and bias (one float32 each) are required");
  if (a.n < 0) throw ArgumentError(std::string(what) + ": n must be >= 0");
  if (reinterpret_cast<std::uintptr_t>(a.x) % 16)
    throw ArgumentError(std::string(what) + ": x must start on a 16-byte boundary");
}

template <typename T>
void fwd_t(const StarReluArgs& a, void* y, cudaStream_t stream) {
  star_relu_fwd_kernel<T><<<static_cast<unsigned>(blocks_for(a.n, kVec<T>)), kThreads, 0, stream>>>(a, static_cast<T*>(y));
  SSM2D_CUDA_CHECK_LAUNCH("star_relu_fwd_kernel");
}

template <typename T>
void bwd_t(const StarReluArgs& a, const void* dy, void* dx, float* part, int64_t blocks, cudaStream_t stream) {
  star_relu_bwd_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, static_cast<const T*>(dy),
                                                                               static_cast<T*>(dx), part);
  SSM2D_CUDA_CHECK_LAUNCH("star_relu_bwd_kernel");
}

}  // namespace

void star_relu_forward(const StarReluArgs& a, void* y) {
  check_args(a, "star_relu_forward");
  if (reinterpret_cast<std::uintptr_t>(y) % 16) throw ArgumentError("star_relu_forward: y must start on a 16-byte boundary");
  if (a.n == 0) return;
  DeviceGuard guard(a.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case DType::kFloat32: fwd_t<float>(a, y, stream); break;
    case DType::kFloat16: fwd_t<__half>(a, y, stream); break;
    case DType::kBFloat16: fwd_t<__nv_bfloat16>(a, y, stream); break;
    default: break;
  }
}

int64_t star_relu_backward_workspace_floats(int64_t n, DType dtype) {
  const int size = dtype_size(dtype);
  return size ? 2 * blocks_for(n, 16 / size) : 0;
}

void star_relu_backward(const StarReluArgs& a, const void* dy, void* dx, float* dscale, float* dbias, float* workspace) {
  check_args(a, "star_relu_backward");
  if (reinterpret_cast<std::uintptr_t>(dy) % 16 || reinterpret_cast<std::uintptr_t>(dx) % 16)
    throw ArgumentError("star_relu_backward: dy and dx must start on 16-byte boundaries");
  const bool sums = dscale || dbias;
  if (sums && !workspace)
    throw ArgumentError("star_relu_backward: dscale / dbias need the workspace (star_relu_backward_workspace_floats)");
  DeviceGuard guard(a.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int64_t blocks = blocks_for(a.n, 16 / dtype_size(a.dtype));
  float* part = sums ? workspace : nullptr;
  switch (a.dtype) {
    case DType::kFloat32: bwd_t<float>(a, dy, dx, part, blocks, stream); break;
    case DType::kFloat16: bwd_t<__half>(a, dy, dx, part, blocks, stream); break;
    case DType::kBFloat16: bwd_t<__nv_bfloat16>(a, dy, dx, part, blocks, stream); break;
    default: break;
  }
  if (!sums) return;
  star_relu_reduce_kernel<<<1, 32, 0, stream>>>(workspace, blocks, dscale, dbias);
  SSM2D_CUDA_CHECK_LAUNCH("star_relu_reduce_kernel");
}

}  // namespace ssm2d::cuda
