// Error checks, the current-device guard and the device primitives shared by every CUDA source.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ssm2d::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
                           "): " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

#define SSM2D_CUDA_CHECK(expr)                                                           \
  do {                                                                                   \
    cudaError_t _ssm2d_err = (expr);                                                     \
    if (_ssm2d_err != cudaSuccess) ::ssm2d::cuda::throw_cuda_error(_ssm2d_err, #expr, __FILE__, __LINE__); \
  } while (0)

// Checks the launch that was just issued (configuration errors surface here, not at sync).
#define SSM2D_CUDA_CHECK_LAUNCH(name) SSM2D_CUDA_CHECK(cudaPeekAtLastError())

// Makes `device` current for the scope and restores the previous device after, so that a
// call never leaves the caller's thread on another GPU.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SSM2D_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) SSM2D_CUDA_CHECK(cudaSetDevice(device));
    changed_ = device != previous_;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// ---- Device primitives ------------------------------------------------------------------------

// 2^x with the MUFU unit alone (relative error ~2^-22: far below float32 accumulation error here).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1/x with the MUFU unit alone (rcp.approx.ftz, ~1 ulp). __fdividef and 1.f / x add a range check
// (a compare and two predicated FMULs, or a division subroutine) for |x| > 2^126, where this gives 0
// as __fdividef does.
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The hand-over flags between blocks of a pipelined kernel: a consumer's acquire load sees every
// store the producer made before its release store (GPU scope).
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

}  // namespace ssm2d::cuda
