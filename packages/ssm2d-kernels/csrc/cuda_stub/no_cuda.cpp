// CPU-only build: the CUDA entry points exist and say there is no CUDA.
#include <stdexcept>

#include "ssm2d/cuda_api.h"
#include "ssm2d/dwconv2d.h"
#include "ssm2d/layer_norm.h"
#include "ssm2d/star_relu.h"
#include "ssm2d/scan2d.h"
#include "ssm2d/wavefront2d.h"

namespace ssm2d::cuda {

bool compiled() { return false; }
std::string compiled_architectures() { return ""; }
int runtime_version() { return 0; }
int driver_version() { return 0; }
int device_count() { return 0; }

int pointer_device(const void*) {
  throw std::runtime_error("ssm2d_kernels was built without CUDA; it cannot take CUDA device pointers");
}

DeviceProperties device_properties(int device) {
  throw std::runtime_error("ssm2d_kernels was built without CUDA; device " + std::to_string(device) +
                           " cannot be queried (rebuild with SSM2D_WITH_CUDA=ON)");
}

SelftestResult selftest(int, long long) {
  throw std::runtime_error("ssm2d_kernels was built without CUDA (rebuild with SSM2D_WITH_CUDA=ON)");
}

namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string(what) + ": ssm2d_kernels was built without CUDA (rebuild with SSM2D_WITH_CUDA=ON)");
}
}  // namespace

void scan2d_forward(const Scan2dProblem&, const Scan2dForwardOutputs&) { no_cuda("scan2d_forward"); }
void scan2d_backward(const Scan2dProblem&, const Scan2dBackwardArgs&) { no_cuda("scan2d_backward"); }

int64_t wavefront2d_forward_workspace_floats(const Wave2dProblem&) { return 0; }
int64_t wavefront2d_backward_workspace_floats(const Wave2dProblem&) { return 0; }
int64_t wavefront2d_workspace_floats(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool) { return 0; }
int wavefront2d_max_states(int64_t) { return 0; }
void wavefront2d_forward(const Wave2dProblem&, const Grid&) { no_cuda("wavefront2d_forward"); }
void wavefront2d_forward_dtype(const Wave2dProblem&, const Grid&) { no_cuda("wavefront2d_forward_dtype"); }
void wavefront2d_backward(const Wave2dProblem&, const Wave2dBackwardArgs&) { no_cuda("wavefront2d_backward"); }

int64_t layer_norm_max_cols(DType) { return 0; }
int64_t layer_norm_backward_workspace_floats(int64_t, int64_t, DType) { return 0; }
void layer_norm_forward(const LayerNormArgs&, void*, int64_t) { no_cuda("layer_norm_forward"); }
void layer_norm_backward(const LayerNormArgs&, const void*, int64_t, void*, int64_t, float*, float*, float*) {
  no_cuda("layer_norm_backward");
}

void star_relu_forward(const StarReluArgs&, void*) { no_cuda("star_relu_forward"); }
int64_t star_relu_backward_workspace_floats(int64_t, DType) { return 0; }
void star_relu_backward(const StarReluArgs&, const void*, void*, float*, float*, float*) { no_cuda("star_relu_backward"); }

void dwconv2d_forward(const DwConv2dArgs&, void*) { no_cuda("dwconv2d_forward"); }
int64_t dwconv2d_backward_workspace_floats(int64_t, int64_t, int64_t, int64_t, int, int) { return 0; }
void dwconv2d_backward(const DwConv2dArgs&, const void*, void*, float*, float*, float*) { no_cuda("dwconv2d_backward"); }

}  // namespace ssm2d::cuda
