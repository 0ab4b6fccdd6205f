// __half on the CPU for the kernels' to_f / from_f (see cuda_emu.h): the CPU kernels' conversions
// (ssm2d/half.h, round to nearest even).
#pragma once
#include <cstdint>

#include "cuda_emu.h"
#include "ssm2d/half.h"

struct __half {
  uint16_t x;
};
inline float __half2float(__half h) { return ssm2d::cpu::to_float(ssm2d::cpu::half_t{h.x}); }
inline __half __float2half_rn(float v) { return __half{ssm2d::cpu::from_float_half(v).bits}; }
inline __half __float2half(float v) { return __float2half_rn(v); }
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
