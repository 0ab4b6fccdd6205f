// __nv_bfloat16 on the CPU for the kernels' to_f / from_f (see cuda_emu.h): the CPU kernels'
// conversions (ssm2d/half.h, round to nearest even).
#pragma once
#include <cstdint>

#include "cuda_emu.h"
#include "cuda_fp16.h"
#include "ssm2d/half.h"

struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) { return ssm2d::cpu::to_float(ssm2d::cpu::bfloat16_t{h.x}); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16{ssm2d::cpu::from_float_bf16(v).bits}; }
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
