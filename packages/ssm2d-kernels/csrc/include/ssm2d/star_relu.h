// StarReLU (MetaFormer's activation, used by Mamba2D's local path) on CUDA: y = s * relu(x)^2 + b
// with learnable scalars s, b, in one pass instead of PyTorch's three (relu, square, a broadcast
// multiply-add that runs unvectorized).
//
// x, y (dx, dy): n elements of one dense array in float32 / float16 / bfloat16, 16-byte aligned;
// scale and bias: one float32 each, read on the device (no host synchronisation).
#pragma once

#include "ssm2d/ops.h"

namespace ssm2d {

struct StarReluArgs {
  int64_t n = 0;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
  Device device{};
  StreamHandle stream = 0;
};

namespace cuda {
void star_relu_forward(const StarReluArgs& a, void* y);
// float32 scratch of the backward: per-block partial sums of dscale and dbias.
int64_t star_relu_backward_workspace_floats(int64_t n, DType dtype);
// dx = dy * 2 s relu(x); dscale = sum dy relu(x)^2 and dbias = sum dy (one float32 each, written;
// null: not wanted), summed in a fixed order (deterministic).
void star_relu_backward(const StarReluArgs& a, const void* dy, void* dx, float* dscale, float* dbias, float* workspace);
}  // namespace cuda

}  // namespace ssm2d
