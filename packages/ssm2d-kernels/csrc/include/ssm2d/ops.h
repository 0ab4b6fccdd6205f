// Shared descriptions of what crosses the boundary into the kernels.
//
// The kernels never see a framework tensor. A caller (ssm2d-nn for torch, or anyone holding a
// device pointer) describes each array with a TensorView: a raw pointer, a dtype, a shape and
// strides in elements. CPU and CUDA implementations of every op take the same descriptor
// structs, so the Python binding validates arguments once and dispatches to either.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

// Small accessors are usable in device code when the header is compiled by nvcc.
#if defined(__CUDACC__)
#define SSM2D_HD __host__ __device__
#else
#define SSM2D_HD
#endif

namespace ssm2d {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
  }
  return 0;
}

// Where an array lives: device < 0 is host memory, otherwise a CUDA device ordinal.
struct Device {
  int index = -1;
  bool is_cuda() const { return index >= 0; }
};

// A strided view of a caller-owned array. Shapes and strides are 64-bit: tensors beyond 2^31
// elements occur (whole-slide grids) and every offset computed from them must stay 64-bit.
constexpr int kMaxDims = 6;
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device{};
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> stride{};  // in elements, not bytes

  SSM2D_HD bool defined() const { return data != nullptr; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
};

// An opaque CUDA stream handle (cudaStream_t) as an integer, so host-only code need not include
// CUDA headers. 0 is the legacy default stream and is only used when the caller passes it.
using StreamHandle = std::uintptr_t;

// Raised for bad arguments; the Python binding turns it into ValueError with this message.
class ArgumentError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// ---- scan2d (2DMamba): see the package docs / SCANS.md section 1 ---------------------------------
//
// Every operand on the H x W grid is described in the scan's LOGICAL frame: rows first from the
// top-left. The caller maps the requested origin (flips) and order (transpose) onto the pointer and
// strides (negative strides allowed), so kernels never copy or flip anything.

// A grid operand: element (b, c, n, i, j) lives at data + b*sb + c*sc + n*sn + i*si + j*sj
// (c = channel for u-like operands, group for B/C; n = state, unused for u-like operands).
struct Grid {
  void* data = nullptr;
  int64_t sb = 0, sc = 0, sn = 0, si = 0, sj = 0;
  SSM2D_HD bool defined() const { return data != nullptr; }
};

struct Scan2dProblem {
  int64_t batch = 0, dim = 0, dstate = 0, groups = 1, height = 0, width = 0;  // logical H x W
  DType dtype = DType::kFloat32;        // u, delta, z, B, C and the grid outputs
  DType param_dtype = DType::kFloat32;  // A, D, delta_bias (float64 only with float64 inputs)
  bool softplus = false;
  Grid u, delta, z, B, C;               // z may be undefined
  const void* A = nullptr;              // (dim, dstate), strides A_sd, A_sn
  int64_t A_sd = 0, A_sn = 0;
  const void* D = nullptr;              // (dim,) contiguous or null
  const void* delta_bias = nullptr;     // (dim,) contiguous or null
  Device device{};
  StreamHandle stream = 0;
};

// Forward outputs. `y` (pre-gate output, dtype of u) is written only when defined and z is given:
// the backward of the gate needs it. `carries` (CUDA only) receives the per-tile carries the
// backward recomputes from: float32, scan2d_carry_floats() elements; null when no backward follows.
// `workspace` (CUDA): float32 scratch of scan2d_forward_workspace_floats() elements (may be null
// when that is zero).
struct Scan2dForwardOutputs {
  Grid out;
  Grid y;
  float* carries = nullptr;
  float* workspace = nullptr;
};

// Backward: `dout` in, then the gradients. du, ddelta, dz are grids of the input dtype. dB, dC are
// grids (b, g, n, i, j) of the accumulation type (float32; float64 for float64 inputs) that the
// kernel ADDS into (zero them first). With `deterministic` on CUDA they are instead per-channel
// partials (b, d - d_begin, n, i, j) for the channels [d_begin, d_end) of this call, which the
// caller sums over each group's channels in a fixed order. dA_part (batch, dim, dstate), dD_part
// and ddelta_bias_part (batch, dim), contiguous, of the accumulation type, receive per-batch
// partial sums the caller reduces over the batch. Null pointers / undefined grids: not wanted.
struct Scan2dBackwardArgs {
  Grid dout;
  Grid y;                    // pre-gate output saved by the forward (needed when z is given)
  const float* carries = nullptr;
  Grid du, ddelta, dz, dB, dC;
  void* dA_part = nullptr;
  void* dD_part = nullptr;
  void* ddelta_bias_part = nullptr;
  bool deterministic = false;
  int64_t d_begin = 0, d_end = -1;
  // CUDA: float32 scratch of scan2d_backward_workspace_floats() elements for the reverse carries
  // (batch * dim * N * (H + W)); contents on entry do not matter.
  float* workspace = nullptr;  // channel range of this call (CUDA deterministic chunks); -1: all
};

// ---- wavefront2d (Mamba2D M2D-SSM): SCANS.md section 2 ------------------------------------------
//
// Channels-last operands are described with the same Grid: u, dT, dL, out are (b, c = channel e,
// -, i, j); BT, BL, C are (b, c = group, n, i, j). The logical frame is rows first from the
// top-left; the caller maps origins onto strides. Transposing the grid while exchanging the T and L
// operands gives the same recurrence except at the origin, which takes its (physical) left input:
// a transposed call sets origin_top, so a long physical row can be scanned as a column.
struct Wave2dProblem {
  int64_t batch = 0, dim = 0, dstate = 0, groups = 1, height = 0, width = 0;  // logical H x W
  DType dtype = DType::kFloat32;
  DType param_dtype = DType::kFloat32;
  Grid u, dT, dL, BT, BL, C;
  const void* AT = nullptr;  // (dim, dstate) strides A_sd, A_sn (same for AL)
  const void* AL = nullptr;
  int64_t A_sd = 0, A_sn = 0;
  int64_t AL_sd = 0, AL_sn = 0;
  const void* D = nullptr;  // (dim,) contiguous or null
  bool origin_top = false;  // the origin cell takes the top input (a transposed call), else the left
  // CUDA: states per block (a power of two, one warp each); blocks of the other state chunks run
  // side by side and add their per-cell outputs through float32 scratch in the workspace.
  int64_t states_per_block = 0;
  float* workspace = nullptr;  // forward scratch (CUDA): (chunks - 1) * batch * H * W * E floats
  Device device{};
  StreamHandle stream = 0;
};

// wavefront2d's per-cell outputs (out; du, ddT, ddL) are grids of the accumulation type (float32;
// float64 for float64 inputs on the CPU) that the kernels ADD into, so states can run in chunks;
// on CUDA, where the lane kernels run (N <= 16, each 16-channel block in one group), they may instead be in the
// inputs' dtype and written once (cuda::wavefront2d_forward_dtype; `cells_in_dtype` below).
// Backward of wavefront2d: dBT, dBL, dC grids of the accumulation type that are also ADDED into (per-channel partials (b, e - e_begin, n, i, j) with
// `deterministic` on CUDA); dAT_part, dAL_part (batch, dim, dstate) and dD_part (batch, dim) are
// per-batch partial sums. `workspace` (CUDA): wavefront2d_backward_workspace_floats() floats.
struct Wave2dBackwardArgs {
  Grid dout;
  Grid du, ddT, ddL, dBT, dBL, dC;
  void* dAT_part = nullptr;
  void* dAL_part = nullptr;
  void* dD_part = nullptr;
  bool deterministic = false;
  int64_t e_begin = 0, e_end = -1;
  float* workspace = nullptr;
  bool cells_in_dtype = false;  // du, ddT, ddL in p.dtype, written (CUDA lane kernels only)
};

}  // namespace ssm2d
