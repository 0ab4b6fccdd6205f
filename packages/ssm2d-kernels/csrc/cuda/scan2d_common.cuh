// Device helpers shared by the scan2d forward (scan2d_fwd.cu) and backward (scan2d.cu) kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "ssm2d/ops.h"

namespace ssm2d::cuda::s2d {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The CUDA kernels take float32, float16 or bfloat16 grids with float32 parameters.
inline void check_cuda_dtypes(const Scan2dProblem& p, const char* what) {
  if (p.dtype == DType::kFloat64 || p.param_dtype != DType::kFloat32)
    throw ArgumentError(std::string(what) + ": the CUDA kernel takes float32, float16 or bfloat16 inputs with "
                        "float32 A, D and delta_bias; float64 runs on the CPU kernel");
}

// Calls f(T{}) with T the element type of `t` (float, __half, __nv_bfloat16); the CUDA kernels take
// no other (float64 is refused before this point).
template <typename F>
inline void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: break;
  }
}

// A grid operand of one (batch, channel or group, state): element (i, j) at base + i*si + j*sj.
template <typename T>
struct Plane {
  T* base;
  int64_t si, sj;
  __device__ __forceinline__ T& at(int64_t i, int64_t j) const { return base[i * si + j * sj]; }
};
template <typename T>
__device__ __forceinline__ Plane<T> plane(const Grid& g, int64_t b, int64_t c, int64_t n) {
  return {static_cast<T*>(g.data) + b * g.sb + c * g.sc + n * g.sn, g.si, g.sj};
}

// Asks L2 for the line holding ptr (a later load then waits on L2, not on device memory).
__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// softplus(v) = max(v, 0) + log1p(t), t = exp(-|v|) in (0, 1], and log1p(t) = 2 atanh(s) with
// s = t / (2 + t) in (0, 1/3]: atanh's odd series to s^13 (the rest is below 2^-26 of it). Why: the
// library log1pf is ~50 instructions, most of a 1D row's per-cell work; this is 16, without branches,
// and as accurate as log1pf(__expf(v)) was (both are bound by the rounding of the exponent: about
// 1e-6 relative at v = -20, within 7 ulp for |v| < 5). t is returned for the slope below.
__device__ __forceinline__ float softplus_t(float v, float& t) {
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(-fabsf(v) * kLog2e));
  const float s = t * fast_rcp(2.f + t), z = s * s, s2 = s + s;
  float q = 1.f / 13.f;
  q = fmaf(q, z, 1.f / 11.f);
  q = fmaf(q, z, 1.f / 9.f);
  q = fmaf(q, z, 1.f / 7.f);
  q = fmaf(q, z, 1.f / 5.f);
  q = fmaf(q, z, 1.f / 3.f);
  return fmaxf(v, 0.f) + fmaf(s2 * z, q, s2);
}
__device__ __forceinline__ float softplus_f(float v) {
  float t;
  return softplus_t(v, t);
}
// d softplus(v) / dv = sigmoid(v), from softplus_t's t (no cancellation on either side).
__device__ __forceinline__ float softplus_slope(float v, float t) { return (v >= 0.f ? 1.f : t) * fast_rcp(1.f + t); }

// The gate's sigmoid(z) = 1 / (1 + 2^(-z log2 e)), one EX2 and one RCP with no range handling: for
// z < -88 the exponential is inf and the result 0, as the library's __expf / __fdividef give.
__device__ __forceinline__ float sigmoid_f(float z) { return fast_rcp(1.f + fast_exp2(-z * kLog2e)); }

// Scan of affine maps c -> a*c + x over one band of 32*CPL columns held by a warp, lane l owning the
// CPL consecutive columns l*CPL .. l*CPL+CPL-1 (kRev: the scan runs from the right, as the reverse
// recurrences of the backward do). `cin` enters the band (same value on every lane); e[k] receives
// the value ENTERING column k (the exclusive scan). Returns the value leaving the band, on every lane.
// Cost per lane: 2*CPL FMAs locally, 12 shuffles across the warp, CPL FMAs to fix up.
template <int CPL, bool kRev>
__device__ __forceinline__ float band_scan(const float (&a)[CPL], const float (&x)[CPL], float cin, float (&e)[CPL],
                                           int lane) {
  float P = 1.f, X = 0.f, pl[CPL], xl[CPL];
#pragma unroll
  for (int t = 0; t < CPL; ++t) {
    const int k = kRev ? CPL - 1 - t : t;
    pl[k] = P;
    xl[k] = X;
    X = fmaf(a[k], X, x[k]);
    P *= a[k];
  }
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {  // inclusive scan of the lanes' maps, in scan order
    const float Pp = kRev ? __shfl_down_sync(kFull, P, off) : __shfl_up_sync(kFull, P, off);
    const float Xp = kRev ? __shfl_down_sync(kFull, X, off) : __shfl_up_sync(kFull, X, off);
    if (kRev ? lane + off < 32 : lane >= off) {
      X = fmaf(P, Xp, X);
      P *= Pp;
    }
  }
  float Pe = kRev ? __shfl_down_sync(kFull, P, 1) : __shfl_up_sync(kFull, P, 1);
  float Xe = kRev ? __shfl_down_sync(kFull, X, 1) : __shfl_up_sync(kFull, X, 1);
  if (kRev ? lane == 31 : lane == 0) {
    Pe = 1.f;
    Xe = 0.f;
  }
  const float cl = fmaf(Pe, cin, Xe);  // value entering the lane's first column in scan order
#pragma unroll
  for (int k = 0; k < CPL; ++k) e[k] = fmaf(pl[k], cl, xl[k]);
  return __shfl_sync(kFull, fmaf(P, cin, X), kRev ? 0 : 31);
}

// The band's composed map applied to zero (what leaves the band when nothing enters), on lane 0
// (kRev: leaving on the left). A tree over lanes: 10 shuffles.
template <int CPL, bool kRev>
__device__ __forceinline__ float band_total(const float (&a)[CPL], const float (&x)[CPL], int lane) {
  float P = 1.f, X = 0.f;
#pragma unroll
  for (int t = 0; t < CPL; ++t) {
    const int k = kRev ? CPL - 1 - t : t;
    X = fmaf(a[k], X, x[k]);
    P *= a[k];
  }
  // Lane l composes its segment with the one starting `off` lanes later in scan order.
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float Pn = kRev ? __shfl_up_sync(kFull, P, off) : __shfl_down_sync(kFull, P, off);
    const float Xn = kRev ? __shfl_up_sync(kFull, X, off) : __shfl_down_sync(kFull, X, off);
    if (kRev ? lane >= off : lane + off < 32) {
      X = fmaf(Pn, X, Xn);
      P *= Pn;
    }
  }
  return __shfl_sync(kFull, X, kRev ? 31 : 0);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

}  // namespace ssm2d::cuda::s2d
