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

  bool defined() const { return data != nullptr; }
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

}  // namespace ssm2d
