// CPU-only build: the CUDA entry points exist and say there is no CUDA.
#include <stdexcept>

#include "ssm2d/cuda_api.h"

namespace ssm2d::cuda {

bool compiled() { return false; }
std::string compiled_architectures() { return ""; }
int runtime_version() { return 0; }
int driver_version() { return 0; }
int device_count() { return 0; }

DeviceProperties device_properties(int device) {
  throw std::runtime_error("ssm2d_kernels was built without CUDA; device " + std::to_string(device) +
                           " cannot be queried (rebuild with SSM2D_WITH_CUDA=ON)");
}

SelftestResult selftest(int, long long) {
  throw std::runtime_error("ssm2d_kernels was built without CUDA (rebuild with SSM2D_WITH_CUDA=ON)");
}

}  // namespace ssm2d::cuda
