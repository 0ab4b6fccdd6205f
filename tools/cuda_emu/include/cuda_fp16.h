// __half on the CPU (round to nearest even), for the kernels' to_f / from_f (see cuda_emu.h).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_emu.h"

struct __half {
  uint16_t x;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
