// Runtime queries and the self-test kernel of the CUDA build.
#include <cmath>
#include <vector>

#include "common.cuh"
#include "ssm2d/cuda_api.h"

#ifndef SSM2D_CUDA_ARCHS
#define SSM2D_CUDA_ARCHS ""
#endif

namespace ssm2d::cuda {

bool compiled() { return true; }
std::string compiled_architectures() { return SSM2D_CUDA_ARCHS; }

int runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int device_count() {
  // Without a driver the runtime answers cudaErrorInsufficientDriver (35), with a driver and no
  // GPU cudaErrorNoDevice: both mean zero usable devices. Clear the sticky error either way.
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

static void check_device_index(int device) {
  int n = device_count();
  if (device < 0 || device >= n)
    throw std::invalid_argument("device must be in [0, " + std::to_string(n) + "), got " + std::to_string(device));
}

int pointer_device(const void* ptr) {
  cudaPointerAttributes attr{};
  SSM2D_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw std::invalid_argument("the array's pointer is not CUDA device memory");
  return attr.device;
}

DeviceProperties device_properties(int device) {
  check_device_index(device);
  cudaDeviceProp p{};
  SSM2D_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceProperties out;
  out.index = device;
  out.name = p.name;
  out.major = p.major;
  out.minor = p.minor;
  out.multiprocessors = p.multiProcessorCount;
  out.total_memory = static_cast<long long>(p.totalGlobalMem);
  out.l2_cache_bytes = p.l2CacheSize;
  out.shared_memory_per_block_optin = static_cast<int>(p.sharedMemPerBlockOptin);
  return out;
}

namespace {

// y[i] = 3 x[i] - 1 with x[i] = (i mod 1013) / 7: non-trivial values, 64-bit index.
__global__ void selftest_kernel(float* __restrict__ y, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    float x = static_cast<float>(i % 1013) / 7.0f;
    y[i] = fmaf(3.0f, x, -1.0f);
  }
}

}  // namespace

SelftestResult selftest(int device, long long elements) {
  check_device_index(device);
  if (elements <= 0) throw std::invalid_argument("elements must be positive, got " + std::to_string(elements));
  DeviceGuard guard(device);
  cudaStream_t stream = nullptr;
  float* d_y = nullptr;
  SelftestResult r;
  r.elements = elements;
  try {
    SSM2D_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    SSM2D_CUDA_CHECK(cudaMalloc(&d_y, elements * sizeof(float)));
    // Poison first: an element the kernel failed to write shows up as a NaN error.
    SSM2D_CUDA_CHECK(cudaMemsetAsync(d_y, 0xFF, elements * sizeof(float), stream));
    int blocks = static_cast<int>(std::min<long long>((elements + 255) / 256, 65535));
    selftest_kernel<<<blocks, 256, 0, stream>>>(d_y, elements);
    SSM2D_CUDA_CHECK_LAUNCH("selftest_kernel");
    std::vector<float> y(static_cast<size_t>(elements));
    SSM2D_CUDA_CHECK(cudaMemcpyAsync(y.data(), d_y, elements * sizeof(float), cudaMemcpyDeviceToHost, stream));
    SSM2D_CUDA_CHECK(cudaStreamSynchronize(stream));
    double max_err = 0.0;
    for (long long i = 0; i < elements; ++i) {
      double expect = 3.0 * (static_cast<double>(i % 1013) / 7.0) - 1.0;
      double e = std::fabs(static_cast<double>(y[i]) - expect);
      if (!(e <= max_err)) max_err = std::isnan(e) ? INFINITY : e;
    }
    r.max_abs_error = max_err;
    r.ok = max_err < 1e-4;
  } catch (...) {
    if (d_y) cudaFree(d_y);
    if (stream) cudaStreamDestroy(stream);
    throw;
  }
  cudaFree(d_y);
  cudaStreamDestroy(stream);
  return r;
}

}  // namespace ssm2d::cuda
