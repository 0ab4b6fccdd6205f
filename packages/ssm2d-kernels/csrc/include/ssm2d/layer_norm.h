// LayerNorm over the last (contiguous) dimension on CUDA, for the channels-last norms of the
// models built on the scans (M2D, VMamba): rows of 32 to 2048 elements, where a block per row (what
// PyTorch's kernel launches) leaves most of its threads idle.
//
// x (rows, cols) in float32 / float16 / bfloat16, its rows in groups of x_inner (row r at
// (r / x_inner) * x_gs + (r % x_inner) * x_rs elements: any view whose leading dims collapse to two,
// e.g. the q half of a (batch, L, 2, heads, head_dim) tensor), weight and bias float32 (cols) or
// absent; y in x's dtype. Mean and variance in float32, the variance exactly as the mean of
// (x - mean)^2 (two passes over registers, not E[x^2] - mean^2).
#pragma once

#include "ssm2d/ops.h"

namespace ssm2d {

struct LayerNormArgs {
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;  // x, y, dy, dx
  const void* x = nullptr;
  int64_t x_inner = 1;              // rows per group (>= 1)
  int64_t x_rs = 0, x_gs = 0;       // strides of x's rows within a group and of its groups, in elements
  const float* weight = nullptr;    // cols floats, or null (1)
  const float* bias = nullptr;      // cols floats, or null (0)
  float* mean = nullptr;            // rows floats saved by the forward (or null); read by the backward
  float* rstd = nullptr;            // rows floats: 1 / sqrt(var + eps)
  float eps = 1e-5f;
  Device device{};
  StreamHandle stream = 0;
};

namespace cuda {
// Columns per row the kernels take (each row lives in the registers of at most one warp).
int64_t layer_norm_max_cols(DType dtype);
// y (row stride y_rs, x's dtype) = (x - mean) * rstd * weight + bias.
void layer_norm_forward(const LayerNormArgs& a, void* y, int64_t y_rs);
// float32 scratch of the backward: per-block partial sums of dweight and dbias.
int64_t layer_norm_backward_workspace_floats(int64_t rows, int64_t cols, DType dtype);
// dx (row stride dx_rs, x's dtype) from dy (row stride dy_rs) and the forward's mean / rstd;
// dweight, dbias (cols float32 each, written; null: not wanted) summed over the rows in a fixed
// order (deterministic).
void layer_norm_backward(const LayerNormArgs& a, const void* dy, int64_t dy_rs, void* dx, int64_t dx_rs,
                         float* dweight, float* dbias, float* workspace);
}  // namespace cuda

}  // namespace ssm2d
