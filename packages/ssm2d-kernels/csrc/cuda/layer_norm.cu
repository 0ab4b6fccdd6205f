// LayerNorm over the last dimension on CUDA (see ssm2d/layer_norm.h).
//
// Why. The models' norms run over the channels of channels-last maps: rows of 32 to 512 elements,
// hundreds of thousands of them. A block per row (PyTorch's vectorized kernel) keeps 8 of its 128
// threads busy at 64 bfloat16 channels; measured on an H200 at M2D-T's shapes: 173 us per norm
// where the bytes need ~10 (a third of the model's inference step).
//
// Here a row belongs to a group of LANES lanes of one warp, each holding up to CH 16-byte vectors
// of it in registers: a warp normalises 32 / LANES rows at once, every load is a full vector, the
// sums over a row are xor-shuffles inside the group, and x is read once. The backward recomputes
// x_hat from the saved mean and rstd; its dweight / dbias are summed per lane over the rows the
// lane visits, over the warp's groups by shuffles, over the block's warps in shared memory, and
// over the (at most kBwdMaxBlocks) blocks by a second kernel, in a fixed order: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "common.cuh"
#include "scan2d_common.cuh"
#include "ssm2d/layer_norm.h"

namespace ssm2d::cuda {
namespace {
using s2d::from_f;
using s2d::to_f;

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kMaxChunks = 8;
constexpr int64_t kFwdMaxBlocks = 4096;  // grid-stride beyond (every row count fits)
constexpr int64_t kBwdMaxBlocks = 512;   // bounds the backward's per-block partial sums

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements of one 16-byte vector

template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

// Row r of x (see LayerNormArgs).
template <typename T>
__device__ __forceinline__ const T* x_row(const LayerNormArgs& a, int64_t r) {
  return static_cast<const T*>(a.x) + (r / a.x_inner) * a.x_gs + (r % a.x_inner) * a.x_rs;
}

// Sum over the LANES lanes of this lane's group (groups are aligned runs of LANES lanes).
template <int LANES>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Loads chunk k of a row (vector q = k * LANES + lane of the group) as floats; zeros past the row.
template <typename T, int LANES, int CH>
__device__ __forceinline__ void load_row(const T* row, bool ok, int gl, int64_t nvec, float (&v)[CH][kVec<T>]) {
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int64_t q = static_cast<int64_t>(k) * LANES + gl;
    if (ok && q < nvec) {
      const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(row + q * kVec<T>);
#pragma unroll
      for (int i = 0; i < kVec<T>; ++i) v[k][i] = to_f(pk.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kVec<T>; ++i) v[k][i] = 0.f;
    }
  }
}

// Writes a row's chunks (those inside the row) as 16-byte vectors: element i of chunk k, column c,
// is value(k, i, c).
template <typename T, int LANES, int CH, typename F>
__device__ __forceinline__ void store_row(T* row, int gl, int64_t nvec, F&& value) {
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int64_t q = static_cast<int64_t>(k) * LANES + gl;
    if (q >= nvec) continue;
    Pack<T> out;
#pragma unroll
    for (int i = 0; i < kVec<T>; ++i) out.v[i] = from_f<T>(value(k, i, q * kVec<T> + i));
    *reinterpret_cast<Pack<T>*>(row + q * kVec<T>) = out;
  }
}

template <typename T, int LANES, int CH>
__global__ void __launch_bounds__(kThreads) ln_fwd_kernel(LayerNormArgs a, T* __restrict__ y, int64_t y_rs) {
  constexpr int V = kVec<T>, RPW = 32 / LANES;  // rows per warp at once
  const int lane = threadIdx.x & 31, gl = lane % LANES, grp = lane / LANES;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t nvec = a.cols / V;
  const float inv_c = 1.f / static_cast<float>(a.cols);
  // r0 depends on the warp only, so every lane of a warp runs the same iterations (the shuffles
  // need the whole warp); a group past the last row computes on zeros and stores nothing.
  for (int64_t r0 = warp * RPW; r0 < a.rows; r0 += warps * RPW) {
    const int64_t row = r0 + grp;
    const bool ok = row < a.rows;
    float v[CH][V];
    load_row<T, LANES, CH>(x_row<T>(a, ok ? row : 0), ok, gl, nvec, v);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < CH; ++k)
#pragma unroll
      for (int i = 0; i < V; ++i) s += v[k][i];
    const float mean = group_sum<LANES>(s) * inv_c;
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      if (static_cast<int64_t>(k) * LANES + gl >= nvec) continue;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float d = v[k][i] - mean;
        ss = fmaf(d, d, ss);
      }
    }
    const float rstd = rsqrtf(group_sum<LANES>(ss) * inv_c + a.eps);
    if (!ok) continue;
    if (gl == 0 && a.mean) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    store_row<T, LANES, CH>(y + row * y_rs, gl, nvec, [&](int k, int i, int64_t c) {
      const float w = a.weight ? __ldg(a.weight + c) : 1.f, b = a.bias ? __ldg(a.bias + c) : 0.f;
      return fmaf((v[k][i] - mean) * rstd, w, b);
    });
  }
}

// part: [block][2][cols] float32 (dweight then dbias), or null when neither is wanted.
template <typename T, int LANES, int CH>
__global__ void __launch_bounds__(kThreads) ln_bwd_kernel(LayerNormArgs a, const T* __restrict__ dy, int64_t dy_rs,
                                                          T* __restrict__ dx, int64_t dx_rs, float* __restrict__ part) {
  constexpr int V = kVec<T>, RPW = 32 / LANES;
  const int lane = threadIdx.x & 31, gl = lane % LANES, grp = lane / LANES, wib = threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + wib;
  const int64_t nvec = a.cols / V;
  const float inv_c = 1.f / static_cast<float>(a.cols);
  float acc_w[CH][V], acc_b[CH][V];
#pragma unroll
  for (int k = 0; k < CH; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) acc_w[k][i] = acc_b[k][i] = 0.f;
  for (int64_t r0 = warp * RPW; r0 < a.rows; r0 += warps * RPW) {
    const int64_t row = r0 + grp;
    const bool ok = row < a.rows;
    float xh[CH][V], g[CH][V];
    load_row<T, LANES, CH>(x_row<T>(a, ok ? row : 0), ok, gl, nvec, xh);
    load_row<T, LANES, CH>(dy + (ok ? row : 0) * dy_rs, ok, gl, nvec, g);  // dy for now
    const float mean = ok ? a.mean[row] : 0.f, rstd = ok ? a.rstd[row] : 0.f;
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int64_t q = static_cast<int64_t>(k) * LANES + gl;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float w = (a.weight && q < nvec) ? __ldg(a.weight + q * V + i) : 1.f;
        xh[k][i] = (xh[k][i] - mean) * rstd;
        acc_w[k][i] = fmaf(g[k][i], xh[k][i], acc_w[k][i]);  // zero past the row and for absent rows
        acc_b[k][i] += g[k][i];
        g[k][i] *= w;
        s1 += g[k][i];
        s2 = fmaf(g[k][i], xh[k][i], s2);
      }
    }
    s1 = group_sum<LANES>(s1) * inv_c;
    s2 = group_sum<LANES>(s2) * inv_c;
    if (!ok) continue;
    store_row<T, LANES, CH>(dx + row * dx_rs, gl, nvec,
                            [&](int k, int i, int64_t) { return rstd * (g[k][i] - fmaf(xh[k][i], s2, s1)); });
  }
  if (!part) return;
  // The warp's groups hold the same columns: sum them (fixed order), then the block's warps.
#pragma unroll
  for (int k = 0; k < CH; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i)
#pragma unroll
      for (int o = LANES; o < 32; o <<= 1) {
        acc_w[k][i] += __shfl_xor_sync(0xffffffffu, acc_w[k][i], o);
        acc_b[k][i] += __shfl_xor_sync(0xffffffffu, acc_b[k][i], o);
      }
  extern __shared__ float s_part[];  // [warp][2][cols]
  const int64_t C = a.cols;
  if (grp == 0) {
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int64_t q = static_cast<int64_t>(k) * LANES + gl;
      if (q >= nvec) continue;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        s_part[(wib * 2) * C + q * V + i] = acc_w[k][i];
        s_part[(wib * 2 + 1) * C + q * V + i] = acc_b[k][i];
      }
    }
  }
  __syncthreads();
  float* dst = part + static_cast<int64_t>(blockIdx.x) * 2 * C;
  for (int64_t c = threadIdx.x; c < 2 * C; c += kThreads) {
    const int64_t which = c / C, col = c % C;
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += s_part[(w * 2 + which) * C + col];
    dst[c] = t;
  }
}

// dweight, dbias = the blocks' partial sums added in block order.
__global__ void ln_bwd_reduce_kernel(const float* __restrict__ part, int64_t blocks, int64_t C, float* dweight,
                                     float* dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= 2 * C) return;
  float t = 0.f;
  for (int64_t b = 0; b < blocks; ++b) t += part[b * 2 * C + c];
  float* out = c < C ? dweight : dbias;
  if (out) out[c % C] = t;
}

struct Shape {
  int lanes = 4, chunks = 1;
};

int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Lanes per row: enough that a lane holds about two vectors (4 to 32); chunks: the vectors a lane
// holds, a power of two (the last ones masked).
Shape shape_for(int64_t nvec) {
  Shape s;
  s.lanes = static_cast<int>(std::min<int64_t>(32, std::max<int64_t>(4, pow2_ceil((nvec + 1) / 2))));
  s.chunks = static_cast<int>(pow2_ceil((nvec + s.lanes - 1) / s.lanes));
  return s;
}

int vec_of(DType t) { return 16 / dtype_size(t); }

int64_t rows_per_block(const Shape& s) { return static_cast<int64_t>(kWarps) * (32 / s.lanes); }

int64_t bwd_blocks(int64_t rows, const Shape& s) {
  return std::max<int64_t>(1, std::min(kBwdMaxBlocks, (rows + rows_per_block(s) - 1) / rows_per_block(s)));
}

void check_args(const LayerNormArgs& a, const char* what) {
  if (!a.device.is_cuda()) throw ArgumentError(std::string(what) + ": the LayerNorm kernels run on CUDA only");
  if (a.dtype == DType::kFloat64) throw ArgumentError(std::string(what) + ": x must be float32, float16 or bfloat16");
  const int v = vec_of(a.dtype);
  if (a.cols < 1 || a.cols % v || a.cols > layer_norm_max_cols(a.dtype))
    throw ArgumentError(std::string(what) + ": the normalized dim must be a multiple of " + std::to_string(v) +
                        " and at most " + std::to_string(layer_norm_max_cols(a.dtype)) + " for " +
                        dtype_name(a.dtype) + ", got " + std::to_string(a.cols));
  if (a.rows < 0 || a.x_inner < 1) throw ArgumentError(std::string(what) + ": rows must be >= 0 and x_inner >= 1");
  if (reinterpret_cast<std::uintptr_t>(a.x) % 16 || a.x_rs % v || a.x_gs % v)
    throw ArgumentError(std::string(what) + ": x's rows must start on 16-byte boundaries (strides multiples of " +
                        std::to_string(v) + ")");
}

template <typename T, int LANES, int CH>
void fwd_launch(const LayerNormArgs& a, void* y, int64_t y_rs, cudaStream_t stream) {
  const int64_t rpb = kWarps * (32 / LANES);
  const int64_t blocks = std::max<int64_t>(1, std::min(kFwdMaxBlocks, (a.rows + rpb - 1) / rpb));
  ln_fwd_kernel<T, LANES, CH><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, static_cast<T*>(y), y_rs);
  SSM2D_CUDA_CHECK_LAUNCH("ln_fwd_kernel");
}

template <typename T, int LANES, int CH>
void bwd_launch(const LayerNormArgs& a, const void* dy, int64_t dy_rs, void* dx, int64_t dx_rs, float* part,
                int64_t blocks, cudaStream_t stream) {
  auto kernel = ln_bwd_kernel<T, LANES, CH>;
  const size_t smem = part ? static_cast<size_t>(kWarps) * 2 * a.cols * sizeof(float) : 0;
  // Above the default 48 KiB only for the longest rows (> 768 columns); set per call, as the
  // attribute belongs to the current device.
  if (smem > 48 * 1024)
    SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(a, static_cast<const T*>(dy), dy_rs,
                                                                    static_cast<T*>(dx), dx_rs, part);
  SSM2D_CUDA_CHECK_LAUNCH("ln_bwd_kernel");
}

// Calls f.template operator()<LANES, CH>() for the shape of the row.
template <typename F>
void dispatch_shape(const Shape& s, F&& f) {
  switch (s.lanes * 16 + s.chunks) {
    case 4 * 16 + 1: return f.template operator()<4, 1>();
    case 4 * 16 + 2: return f.template operator()<4, 2>();
    case 8 * 16 + 2: return f.template operator()<8, 2>();
    case 16 * 16 + 2: return f.template operator()<16, 2>();
    case 32 * 16 + 2: return f.template operator()<32, 2>();
    case 32 * 16 + 4: return f.template operator()<32, 4>();
    case 32 * 16 + 8: return f.template operator()<32, 8>();
    default: throw ArgumentError("internal: no LayerNorm kernel for this row shape");
  }
}

template <typename T>
struct FwdCall {
  const LayerNormArgs& a;
  void* y;
  int64_t y_rs;
  cudaStream_t stream;
  template <int LANES, int CH>
  void operator()() const { fwd_launch<T, LANES, CH>(a, y, y_rs, stream); }
};

template <typename T>
struct BwdCall {
  const LayerNormArgs& a;
  const void* dy;
  int64_t dy_rs;
  void* dx;
  int64_t dx_rs;
  float* part;
  int64_t blocks;
  cudaStream_t stream;
  template <int LANES, int CH>
  void operator()() const { bwd_launch<T, LANES, CH>(a, dy, dy_rs, dx, dx_rs, part, blocks, stream); }
};

}  // namespace

int64_t layer_norm_max_cols(DType dtype) { return static_cast<int64_t>(32) * kMaxChunks * (16 / dtype_size(dtype)); }

int64_t layer_norm_backward_workspace_floats(int64_t rows, int64_t cols, DType dtype) {
  if (cols < 1 || dtype_size(dtype) == 0) return 0;
  const int64_t nvec = std::max<int64_t>(1, cols / vec_of(dtype));
  return bwd_blocks(rows, shape_for(nvec)) * 2 * cols;
}

void layer_norm_forward(const LayerNormArgs& a, void* y, int64_t y_rs) {
  check_args(a, "layer_norm_forward");
  if (a.rows == 0) return;
  DeviceGuard guard(a.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const Shape s = shape_for(a.cols / vec_of(a.dtype));
  switch (a.dtype) {
    case DType::kFloat32: dispatch_shape(s, FwdCall<float>{a, y, y_rs, stream}); break;
    case DType::kFloat16: dispatch_shape(s, FwdCall<__half>{a, y, y_rs, stream}); break;
    case DType::kBFloat16: dispatch_shape(s, FwdCall<__nv_bfloat16>{a, y, y_rs, stream}); break;
    default: break;
  }
}

void layer_norm_backward(const LayerNormArgs& a, const void* dy, int64_t dy_rs, void* dx, int64_t dx_rs,
                         float* dweight, float* dbias, float* workspace) {
  check_args(a, "layer_norm_backward");
  if (!a.mean || !a.rstd) throw ArgumentError("layer_norm_backward: the forward's mean and rstd are required");
  const bool sums = dweight || dbias;
  if (sums && !workspace)
    throw ArgumentError("layer_norm_backward: dweight / dbias need the workspace (layer_norm_backward_workspace_floats)");
  DeviceGuard guard(a.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const Shape s = shape_for(a.cols / vec_of(a.dtype));
  const int64_t blocks = bwd_blocks(a.rows, s);
  if (a.rows > 0) {
    float* part = sums ? workspace : nullptr;
    switch (a.dtype) {
      case DType::kFloat32: dispatch_shape(s, BwdCall<float>{a, dy, dy_rs, dx, dx_rs, part, blocks, stream}); break;
      case DType::kFloat16: dispatch_shape(s, BwdCall<__half>{a, dy, dy_rs, dx, dx_rs, part, blocks, stream}); break;
      case DType::kBFloat16:
        dispatch_shape(s, BwdCall<__nv_bfloat16>{a, dy, dy_rs, dx, dx_rs, part, blocks, stream});
        break;
      default: break;
    }
  }
  if (!sums) return;
  if (a.rows == 0) {  // no rows: the sums are zero
    if (dweight) SSM2D_CUDA_CHECK(cudaMemsetAsync(dweight, 0, a.cols * sizeof(float), stream));
    if (dbias) SSM2D_CUDA_CHECK(cudaMemsetAsync(dbias, 0, a.cols * sizeof(float), stream));
    return;
  }
  const int64_t threads = 2 * a.cols;
  ln_bwd_reduce_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(workspace, blocks, a.cols,
                                                                                         dweight, dbias);
  SSM2D_CUDA_CHECK_LAUNCH("ln_bwd_reduce_kernel");
}

}  // namespace ssm2d::cuda
