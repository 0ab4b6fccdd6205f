// scan2d (2DMamba) forward on CUDA for 8 <= N <= 16: a half-warp per (batch, channel), a lane per
// state, a block per 16-column strip of CB channels.
//
// Why. At MIL shapes (B = 1, D = 256, N = 16) a block per (batch, channel) walking 32x32 tiles has
// only 256 long serial chains; a band per warp with one state per warp repeats the per-cell work 16
// times. Here lane n of half-warp c owns state n of channel c over a strip of 16 columns, with h of
// those 16 columns in registers:
//   * the horizontal recurrence G = a G + x runs along the lane's 16 columns, entered by the G the
//     strip on the left leaves at that row (its block publishes it per row; see below);
//   * the vertical recurrence h = a h + G is one FMA per column in a register;
//   * y = sum_n C h is summed over the half-warp through shared memory (lane n writes its 16
//     products, lane j reads column j's 16), one read per column, no shuffles.
// The per-cell inputs (dt = softplus(delta + bias), dt*u) of a row are computed once per channel
// and cell and the B, C rows once per block (its channels share one group), staged in shared memory
// a step (kRows rows, interleaved) ahead: one barrier per step.
//
// Strips. Row i of strip k needs the G leaving strip k-1 at row i, and nothing else from other
// strips: strip k-1 never waits on strip k, so after a fill of one row per strip every strip runs
// at full speed. The block of strip k-1 writes its G carries of row i to the workspace and
// publishes the count of finished rows (a release store every kLag rows, after the row's barrier); the
// block of strip k waits for kLag rows at a time.
// Blocks take their strip from a ticket counter in strip order, so a block only ever waits on
// blocks that started before it: no deadlock, however many blocks are resident.
//
// Saved for the backward (the tiled backward of scan2d_tiled.cu): the tiled layout of carries, G
// entering every 32x32 tile's rows from the left and h entering its columns from the top.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "common.cuh"
#include "scan2d_common.cuh"
#include "scan2d_lanes.h"
#include "ssm2d/scan2d.h"

namespace ssm2d::cuda {
namespace {
using namespace s2d;

constexpr int kCols = 16;             // columns of a strip (h of each in a register)
constexpr int kStates = 16;           // lanes of a half-warp: the states of one channel
constexpr int kPitch = kCols + 4;     // shared row pitch: 16-byte aligned rows, banks shifted per row
constexpr int kYPitch = kCols * kPitch + 16;  // per channel: [column][state], the next channel's banks shifted by 16
constexpr int kTile = kScan2dTile;
// A strip trails the one on its left by kLag rows or more: it waits for (and reads the carries of)
// kLag rows at once, and the left strip publishes once per kLag rows, so the round trips through L2
// are paid once per kLag rows instead of per row, for a fill of kLag rows per strip.
constexpr int kLag = 4;
// Rows per step (one barrier each): their horizontal recurrences are independent, so the step
// interleaves them; divides kLag and 32. Two rows at two blocks per SM (at most 128 registers) when
// there are more blocks than SMs; four rows and one block per SM when every block has an SM of its
// own (more independent work per warp is then the only way to hide latency).

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// A read-only global load issued where it stands: the row loop loads the next row's operands at its
// top and uses them at its end, and a plain load tends to be scheduled next to its use (the loop
// then waits on memory once per row instead of never).
template <typename T> __device__ __forceinline__ float ld_early(const T* p);
template <> __device__ __forceinline__ float ld_early<float>(const float* p) {
  float v;
  asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
template <> __device__ __forceinline__ float ld_early<__half>(const __half* p) {
  unsigned short v;
  asm volatile("ld.global.nc.b16 %0, [%1];" : "=h"(v) : "l"(p));
  return __half2float(__ushort_as_half(v));
}
template <> __device__ __forceinline__ float ld_early<__nv_bfloat16>(const __nv_bfloat16* p) {
  unsigned short v;
  asm volatile("ld.global.nc.b16 %0, [%1];" : "=h"(v) : "l"(p));
  return __bfloat162float(__ushort_as_bfloat16(v));
}

// The strips of one call and their synchronisation (strips == 1: none).
struct LaneStrips {
  int64_t strips = 1;
  unsigned* flags = nullptr;  // [0]: ticket counter; [1 + item*strips + k]: rows strip k has finished
  float* handover = nullptr;  // [item][strip < strips-1][row][thread]: G leaving the strip on the right
};

// Shared floats of one staging buffer: dt and dt*u per channel, B and C per state.
template <int CB>
constexpr int kBufFloats = (2 * CB + 2 * kStates) * kPitch;

// kMinBlocks: blocks of 256 threads resident per SM (the register budget follows).
template <typename T, int CB, int kRows, int kMinBlocks>
__global__ void __launch_bounds__(CB * kStates, kMinBlocks * 16 / CB) scan2d_lanes_fwd_kernel(Scan2dProblem p, Scan2dForwardOutputs o,
                                                                        LaneStrips ls) {
  constexpr int kThreads = CB * kStates, kBC = kStates * kCols / kThreads;  // B (and C) values staged per thread
  constexpr int BUF = kBufFloats<CB>;
  extern __shared__ __align__(16) float smem[];
  float* s_y = smem + 2 * kRows * BUF;  // [row of the step][channel][column][state]
  const int tid = threadIdx.x, n = tid & 15, c = tid >> 4;
  const int64_t D = p.dim, N = p.dstate, H = p.height, W = p.width;
  const int64_t nCb = (D + CB - 1) / CB, items = p.batch * nCb;
  int64_t item = blockIdx.x, strip = 0;
  if (ls.strips > 1) {  // strip-major tickets: every block of strip k starts after those of strip k-1
    __shared__ unsigned s_ticket;
    if (tid == 0) s_ticket = atomicAdd(ls.flags, 1u);
    __syncthreads();
    strip = s_ticket / items;
    item = s_ticket % items;
  }
  const int64_t b = item / nCb, d0 = (item % nCb) * CB, d = d0 + c, g = d0 / (D / p.groups);
  const int64_t jb = strip * kCols;
  const int64_t Ws = min(static_cast<int64_t>(kCols), W - jb);
  const bool has_d = d < D, active = has_d && n < N;
  const bool has_left = strip > 0, has_right = strip + 1 < ls.strips;
  const unsigned* flag_left = has_left ? ls.flags + 1 + item * ls.strips + strip - 1 : nullptr;
  unsigned* flag_self = ls.flags + 1 + item * ls.strips + strip;
  const float* hand_left =
      has_left ? ls.handover + (item * (ls.strips - 1) + strip - 1) * H * kThreads + tid : nullptr;
  float* hand_self = has_right ? ls.handover + (item * (ls.strips - 1) + strip) * H * kThreads + tid : nullptr;
  const float A2 = active ? static_cast<const float*>(p.A)[d * p.A_sd + n * p.A_sn] * kLog2e : 0.f;

  // Staging roles: thread (c, j = n) loads the per-channel cell (d, row, jb + j), which is also the
  // cell whose y it finishes; B and C values x = tid + r*threads are (state x / 16, column x % 16).
  const bool cell = has_d && n < Ws;
  const int64_t jc = jb + (cell ? n : 0), dc = has_d ? d : 0;
  const T* pu = static_cast<const T*>(p.u.data) + b * p.u.sb + dc * p.u.sc + jc * p.u.sj;
  const T* pdl = static_cast<const T*>(p.delta.data) + b * p.delta.sb + dc * p.delta.sc + jc * p.delta.sj;
  const bool gated = p.z.defined();
  const T* pz = gated ? static_cast<const T*>(p.z.data) + b * p.z.sb + dc * p.z.sc + jc * p.z.sj : nullptr;
  T* pout = static_cast<T*>(o.out.data) + b * o.out.sb + dc * o.out.sc + jc * o.out.sj;
  T* py = (gated && o.y.defined()) ? static_cast<T*>(o.y.data) + b * o.y.sb + dc * o.y.sc + jc * o.y.sj : nullptr;
  const T* pB[kBC];
  const T* pC[kBC];
  bool okBC[kBC];
#pragma unroll
  for (int r = 0; r < kBC; ++r) {
    const int x = tid + r * kThreads, s = x >> 4, j = x & 15;
    okBC[r] = s < N && j < Ws;
    const int64_t ss = okBC[r] ? s : 0, jj = jb + (okBC[r] ? j : 0);
    pB[r] = static_cast<const T*>(p.B.data) + b * p.B.sb + g * p.B.sc + ss * p.B.sn + jj * p.B.sj;
    pC[r] = static_cast<const T*>(p.C.data) + b * p.C.sb + g * p.C.sc + ss * p.C.sn + jj * p.C.sj;
  }
  const float bias = (p.delta_bias && has_d) ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float Dd = (p.D && has_d) ? static_cast<const float*>(p.D)[d] : 0.f;

  // Registers of the next step's operands (kRows rows). Out-of-range cells, states and rows read a
  // cell in range and are zeroed when staged: no branch around the loads.
  float r_u[kRows], r_dl[kRows], r_z[kRows], r_b[kRows][kBC], r_c[kRows][kBC];
  auto load_rows = [&](int64_t i) {
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      const int64_t row = min(i + rr, H - 1);
      r_u[rr] = ld_early(pu + row * p.u.si);
      r_dl[rr] = ld_early(pdl + row * p.delta.si);
      r_z[rr] = gated ? ld_early(pz + row * p.z.si) : 0.f;
#pragma unroll
      for (int r = 0; r < kBC; ++r) {
        r_b[rr][r] = ld_early(pB[r] + row * p.B.si);
        r_c[rr][r] = ld_early(pC[r] + row * p.C.si);
      }
    }
  };
  // Cells outside the grid get dt = 0 (decay 1, input 0): carries pass through them unchanged.
  auto store_rows = [&](float* buf, int64_t i) {
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr, buf += BUF) {
      const bool ok = cell && i + rr < H;
      float dt = 0.f;
      if (ok) {
        const float v = r_dl[rr] + bias;
        dt = p.softplus ? softplus_f(v) : v;
      }
      buf[c * kPitch + n] = dt;
      buf[(CB + c) * kPitch + n] = ok ? dt * r_u[rr] : 0.f;
#pragma unroll
      for (int r = 0; r < kBC; ++r) {
        const int x = tid + r * kThreads, s = x >> 4, j = x & 15;
        const bool okr = okBC[r] && i + rr < H;
        buf[(2 * CB + s) * kPitch + j] = okr ? r_b[rr][r] : 0.f;
        buf[(2 * CB + kStates + s) * kPitch + j] = okr ? r_c[rr][r] : 0.f;
      }
    }
  };

  // Tiled carries (the backward's input), per (b, d, n): tile (ti, tj) at ((ti*nTj + tj)*64): [0, 32) G
  // entering its rows from the left, [32, 64) h entering its columns from the top.
  const int64_t nTi = (H + kTile - 1) / kTile, nTj = (W + kTile - 1) / kTile, tj = jb / kTile;
  float* carries = (o.carries && active) ? o.carries + ((b * D + d) * N + n) * nTi * nTj * 2 * kTile : nullptr;
  const bool tile_left_edge = (jb % kTile) == 0;
  const int hoff = kTile + static_cast<int>(jb % kTile);

  float h[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) h[j] = 0.f;
  // The last strip covers the first half of its tile only when the grid ends there: it also writes
  // the other half of that tile's h carries (the backward reads whole tiles).
  const int hcols = (tile_left_edge && jb + kCols >= W) ? kTile : kCols;
  if (carries) {  // nothing enters the first tile row from the top
    for (int j = 0; j < hcols; j += 4)
      *reinterpret_cast<float4*>(carries + tj * 2 * kTile + hoff + j) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float cur_u[kRows], cur_z[kRows];
  load_rows(0);
  store_rows(smem, 0);
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    cur_u[rr] = r_u[rr];
    cur_z[rr] = r_z[rr];
  }
  __syncthreads();
  float g_in[kLag];  // G entering the strip at rows i0 .. i0 + kLag - 1
  for (int64_t i0 = 0; i0 < H; i0 += kLag) {
    if (has_left) {  // one wait and one batch of loads per kLag rows
      const unsigned need = static_cast<unsigned>(min(i0 + kLag, H));
      for (int64_t spin = 0; ld_acquire(flag_left) < need; ++spin) {
        if (spin > (int64_t{1} << 32)) __trap();  // a lost predecessor: fail, never hang
        __nanosleep(64);
      }
#pragma unroll
      for (int r = 0; r < kLag; ++r) g_in[r] = i0 + r < H ? __ldcg(hand_left + (i0 + r) * kThreads) : 0.f;
    } else {
#pragma unroll
      for (int r = 0; r < kLag; ++r) g_in[r] = 0.f;
    }
    if (carries && tile_left_edge) {
      for (int r = 0; r < kLag && i0 + r < H; ++r)
        carries[(((i0 + r) / kTile) * nTj + tj) * 2 * kTile + ((i0 + r) % kTile)] = g_in[r];
    }
#pragma unroll
    for (int r0 = 0; r0 < kLag; r0 += kRows) {
      const int64_t i = i0 + r0;  // the step's first row
      if (i >= H) break;
      const float* buf = smem + ((i / kRows) & 1) * kRows * BUF;
      load_rows(i + kRows);
      float G[kRows];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) G[rr] = g_in[r0 + rr];
      // Column by column, the step's rows interleaved: their G chains are independent.
#pragma unroll
      for (int q = 0; q < kCols; q += 4) {
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr) {
          const float* rb = buf + rr * BUF;
          const float4 dt4 = *reinterpret_cast<const float4*>(rb + c * kPitch + q);
          const float4 du4 = *reinterpret_cast<const float4*>(rb + (CB + c) * kPitch + q);
          const float4 b4 = *reinterpret_cast<const float4*>(rb + (2 * CB + n) * kPitch + q);
          const float4 c4 = *reinterpret_cast<const float4*>(rb + (2 * CB + kStates + n) * kPitch + q);
          const float dt[4] = {dt4.x, dt4.y, dt4.z, dt4.w}, du[4] = {du4.x, du4.y, du4.z, du4.w};
          const float bb[4] = {b4.x, b4.y, b4.z, b4.w}, cc[4] = {c4.x, c4.y, c4.z, c4.w};
          float* yrow = s_y + (rr * CB + c) * kYPitch;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float a = fast_exp2(dt[k] * A2);
            G[rr] = fmaf(a, G[rr], du[k] * bb[k]);
            h[q + k] = fmaf(a, h[q + k], G[rr]);
            yrow[(q + k) * kPitch + n] = cc[k] * h[q + k];
          }
        }
      }
      if (has_right) {
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr)
          if (i + rr < H) __stcg(hand_self + (i + rr) * kThreads, G[rr]);
      }
      const int64_t last = i + kRows - 1;  // a tile row ends only at a step's last row (32 % kRows == 0)
      if (carries && (last + 1) % kTile == 0 && last + 1 < H) {  // h entering the next tile row from the top
        float* dst = carries + (((last + 1) / kTile) * nTj + tj) * 2 * kTile + hoff;
#pragma unroll
        for (int j = 0; j < kCols; j += 4)
          *reinterpret_cast<float4*>(dst + j) = make_float4(h[j], h[j + 1], h[j + 2], h[j + 3]);
        for (int j = kCols; j < hcols; j += 4) *reinterpret_cast<float4*>(dst + j) = make_float4(0.f, 0.f, 0.f, 0.f);
      }
      __syncwarp();
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        if (!cell || i + rr >= H) continue;
        // Column n of channel c: the sum over the states, in a fixed order.
        const float* ys = s_y + (rr * CB + c) * kYPitch + n * kPitch;
        float part[4];
#pragma unroll
        for (int s4 = 0; s4 < 4; ++s4) {
          const float4 v = *reinterpret_cast<const float4*>(ys + 4 * s4);
          part[s4] = (v.x + v.y) + (v.z + v.w);
        }
        const float y = fmaf(Dd, cur_u[rr], (part[0] + part[1]) + (part[2] + part[3]));
        const int64_t row = i + rr;
        if (gated) {
          const float zz = cur_z[rr];
          pout[row * o.out.si] = from_f<T>(__fdividef(y * zz, 1.f + __expf(-zz)));
          if (py) py[row * o.y.si] = from_f<T>(y);
        } else {
          pout[row * o.out.si] = from_f<T>(y);
        }
      }
      if (i + kRows < H) {
        store_rows(smem + (((i / kRows) + 1) & 1) * kRows * BUF, i + kRows);
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr) {
          cur_u[rr] = r_u[rr];
          cur_z[rr] = r_z[rr];
        }
      }
      __syncthreads();  // also: every thread's handover stores of the step precede the release below
      const int64_t done = min(i + kRows, H);
      if (has_right && tid == 0 && (done % kLag == 0 || done == H)) st_release(flag_self, static_cast<unsigned>(done));
    }
  }
  // Rows of the last tile row below the grid: nothing enters them (the backward reads every row).
  if (carries && tile_left_edge) {
    for (int64_t r = H; r < nTi * kTile; ++r) carries[((r / kTile) * nTj + tj) * 2 * kTile + (r % kTile)] = 0.f;
  }
}

constexpr int64_t kMaxBlocks = 0x7fffffff;
constexpr int64_t kOneWave = 132;  // blocks of 256 threads that a 132-SM GPU holds one per SM

int lanes_channels(const Scan2dProblem& p) {
  const int64_t per_group = p.dim / p.groups;
  return (p.groups == 1 || per_group % 16 == 0) ? 16 : 8;
}

int64_t lanes_items(const Scan2dProblem& p, int cb) { return p.batch * ((p.dim + cb - 1) / cb); }

template <typename T, int CB, int kRows, int kMinBlocks>
void forward_launch(const Scan2dProblem& p, const Scan2dForwardOutputs& o, cudaStream_t stream) {
  const int64_t items = lanes_items(p, CB), strips = (p.width + kCols - 1) / kCols;
  if (items * strips > kMaxBlocks) throw ArgumentError("scan2d_forward: too many (batch, channel, strip) blocks");
  LaneStrips ls;
  ls.strips = strips;
  if (strips > 1) {
    ls.flags = reinterpret_cast<unsigned*>(o.workspace);
    ls.handover = o.workspace + 1 + items * strips;
    SSM2D_CUDA_CHECK(cudaMemsetAsync(ls.flags, 0, (1 + items * strips) * sizeof(unsigned), stream));
  }
  const size_t smem = (2 * static_cast<size_t>(kBufFloats<CB>) + CB * kYPitch) * kRows * sizeof(float);
  auto kernel = scan2d_lanes_fwd_kernel<T, CB, kRows, kMinBlocks>;
  SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(items * strips), CB * kStates, smem, stream>>>(p, o, ls);
  SSM2D_CUDA_CHECK_LAUNCH("scan2d_lanes_fwd_kernel");
}

}  // namespace

bool scan2d_lanes_fit(const Scan2dProblem& p) {
  return p.dstate >= kScan2dTiledStates && p.dstate <= kScan2dLanesMaxStates &&
         (p.groups == 1 || (p.dim / p.groups) % 8 == 0);
}

void scan2d_lanes_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o) {
  if (p.width > kCols && !o.workspace)
    throw ArgumentError("scan2d_forward: workspace is required on CUDA (scan2d_forward_workspace_floats)");
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  const int cb = lanes_channels(p);
  const bool one_wave = lanes_items(p, cb) * ((p.width + kCols - 1) / kCols) <= kOneWave;
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (cb == 16)
      one_wave ? forward_launch<T, 16, 4, 1>(p, o, stream) : forward_launch<T, 16, 2, 2>(p, o, stream);
    else
      one_wave ? forward_launch<T, 8, 4, 1>(p, o, stream) : forward_launch<T, 8, 2, 2>(p, o, stream);
  });
}

}  // namespace ssm2d::cuda
