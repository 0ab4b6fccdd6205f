// Depthwise 2D convolution on CUDA (the convolution in front of every 2D scan: 2DMamba's MIL layer,
// SS2D, M2D): y[b,c] = w[c] (*) x[b,c] + bias[c], a kh x kw kernel per channel (odd sizes up to 7),
// stride 1, zero padding (kh/2, kw/2) so that y has x's H x W (PyTorch's Conv2d(C, C, k,
// padding=k//2, groups=C), cross-correlation as PyTorch computes it).
//
// x, y, dx, dy: (batch, C, H, W) contiguous in float32 / float16 / bfloat16; weight (C, kh, kw) and
// bias (C) float32 (the caller converts); accumulation in float32. Why a kernel of our own: at MIL
// shapes (1 x 256 x 428 x 553, bfloat16) PyTorch's depthwise kernels take ~0.3 ms forward and
// ~1.6 ms backward where one pass over the bytes needs ~0.06 ms and ~0.1 ms.
#pragma once

#include "ssm2d/ops.h"

namespace ssm2d {

struct DwConv2dArgs {
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int kh = 3, kw = 3;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const float* weight = nullptr;  // (C, kh, kw)
  const float* bias = nullptr;    // (C) or null
  Device device{};
  StreamHandle stream = 0;
};

namespace cuda {
void dwconv2d_forward(const DwConv2dArgs& a, void* y);
// float32 scratch of the backward: per-tile partial sums of dweight and dbias.
int64_t dwconv2d_backward_workspace_floats(int64_t batch, int64_t channels, int64_t height, int64_t width, int kh,
                                           int kw);
// dx (null: not wanted); dweight (C, kh, kw) and dbias (C) in float32, written (null: not wanted),
// summed over batch and cells in a fixed order (deterministic).
void dwconv2d_backward(const DwConv2dArgs& a, const void* dy, void* dx, float* dweight, float* dbias, float* workspace);
}  // namespace cuda

}  // namespace ssm2d
