// Host-side entry points of the CUDA part. Declared with standard types only so that the
// pybind11 module (compiled by the host compiler) can call them without CUDA headers; built from
// csrc/cuda/*.cu, or from csrc/cuda_stub/no_cuda.cpp in a CPU-only build.
#pragma once

#include <string>
#include <vector>

namespace ssm2d::cuda {

// True when this build contains CUDA kernels.
bool compiled();
// CMake architecture list the kernels were built for ("" in a CPU-only build).
std::string compiled_architectures();
// cudaRuntimeGetVersion of the statically linked runtime (e.g. 13000), 0 without CUDA.
int runtime_version();
// cudaDriverGetVersion, 0 when no driver is present.
int driver_version();
// Number of usable CUDA devices; 0 on a machine without a GPU or driver, never an error.
int device_count();

// Device ordinal that owns a device pointer (from __cuda_array_interface__); throws for host memory.
int pointer_device(const void* ptr);

struct DeviceProperties {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;
  int multiprocessors = 0;
  long long total_memory = 0;
  int l2_cache_bytes = 0;
  int shared_memory_per_block_optin = 0;
};
DeviceProperties device_properties(int device);

// Runs a small kernel on `device` and checks its result on the host: proves that this wheel
// holds machine code (or PTX) the device can run. Throws std::runtime_error with the CUDA
// error string otherwise.
struct SelftestResult {
  bool ok = false;
  long long elements = 0;
  double max_abs_error = 0.0;
};
SelftestResult selftest(int device, long long elements);

}  // namespace ssm2d::cuda
