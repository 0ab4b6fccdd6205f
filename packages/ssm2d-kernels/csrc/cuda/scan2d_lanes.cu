// scan2d (2DMamba) on CUDA for 8 <= N <= 16, forward and backward: a half-warp per (batch,
// channel), a lane per state, a block per 16-column strip of CB channels.
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
// at full speed. The block of strip k-1 writes its G carries of row i to the carries and
// publishes the count of finished rows (a release store every kLag rows, after the row's barrier); the
// block of strip k waits for kLag rows at a time.
// Blocks take their strip from a ticket counter in strip order, so a block only ever waits on
// blocks that started before it: no deadlock, however many blocks are resident.
//
// Saved for the backward (below): the G entering every strip at every row (the hand-over itself,
// written into the carries) and h after every 16th row; the pre-gate y is not saved (the backward
// rebuilds it). Layout in ssm2d/scan2d.h (scan2d_lanes_carry_floats).
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

// Four consecutive staged floats (16-byte aligned) into registers: one shared-memory load.
__device__ __forceinline__ void load4(float (&v)[4], const float* src) {
  const float4 q = *reinterpret_cast<const float4*>(src);
  v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}

// The strips of one call and their synchronisation (strips == 1: none).
struct LaneStrips {
  int64_t strips = 1;
  unsigned* flags = nullptr;  // [0]: ticket counter; [1 + item*strips + k]: rows strip k has finished
  float* gin = nullptr;       // [b][strip k >= 1][row][channel][16]: G entering strip k (lanes carry layout)
  float* ckpt = nullptr;      // [b][strip][segment >= 1][channel][16][16]: h after each 16th row; null: none
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
  // Carries in the lanes layout: thread (c, n) of a block is (channel d, state n), so a block's row of
  // G carries is 256 (128) consecutive floats.
  const int64_t gin_row = D * kStates, S = ls.strips;
  const float* hand_left = has_left && has_d ? ls.gin + (b * (S - 1) + strip - 1) * H * gin_row + d * kStates + n : nullptr;
  float* hand_self = has_right && has_d ? ls.gin + (b * (S - 1) + strip) * H * gin_row + d * kStates + n : nullptr;
  const int64_t nseg = (H + kScan2dLanesSegment - 1) / kScan2dLanesSegment;
  float* ckpt = (ls.ckpt && has_d) ? ls.ckpt + ((b * S + strip) * (nseg - 1) * D + d) * 256 + n * 16 : nullptr;
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

  float h[kCols];
#pragma unroll
  for (int j = 0; j < kCols; ++j) h[j] = 0.f;
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
      for (int r = 0; r < kLag; ++r) g_in[r] = (hand_left && i0 + r < H) ? __ldcg(hand_left + (i0 + r) * gin_row) : 0.f;
    } else {
#pragma unroll
      for (int r = 0; r < kLag; ++r) g_in[r] = 0.f;
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
      // Column by column, the step's rows interleaved: their G chains are independent. The staged
      // operands of kGroup rows are read before any of their products is written: the compiler
      // keeps shared reads behind earlier shared writes (s_y and the stage are one array to it),
      // and an FMUL then waits for a read issued just before it (9% of the one-block forward's
      // stall samples, H100). All of a step's rows where one block has the SM and its registers;
      // one at a time at two blocks per SM (128 registers).
      constexpr int kGroup = kMinBlocks == 1 ? kRows : 1;
#pragma unroll
      for (int q = 0; q < kCols; q += 4) {
#pragma unroll
        for (int r1 = 0; r1 < kRows; r1 += kGroup) {
          float dt[kGroup][4], du[kGroup][4], bb[kGroup][4], cc[kGroup][4];
#pragma unroll
          for (int k1 = 0; k1 < kGroup; ++k1) {
            const float* rb = buf + (r1 + k1) * BUF;
            load4(dt[k1], rb + c * kPitch + q);
            load4(du[k1], rb + (CB + c) * kPitch + q);
            load4(bb[k1], rb + (2 * CB + n) * kPitch + q);
            load4(cc[k1], rb + (2 * CB + kStates + n) * kPitch + q);
          }
#pragma unroll
          for (int k1 = 0; k1 < kGroup; ++k1) {
            const int rr = r1 + k1;
            float* yrow = s_y + (rr * CB + c) * kYPitch;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const float a = fast_exp2(dt[k1][k] * A2);
              G[rr] = fmaf(a, G[rr], du[k1][k] * bb[k1][k]);
              h[q + k] = fmaf(a, h[q + k], G[rr]);
              yrow[(q + k) * kPitch + n] = cc[k1][k] * h[q + k];
            }
          }
        }
      }
      if (hand_self) {
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr)
          if (i + rr < H) __stcg(hand_self + (i + rr) * gin_row, G[rr]);
      }
      // h after a segment's last row (a step's last row: kRows divides the segment) for the backward.
      const int64_t last = i + kRows - 1;
      if (ckpt && (last + 1) % kScan2dLanesSegment == 0 && last + 1 < H) {
        float* dst = ckpt + ((last + 1) / kScan2dLanesSegment - 1) * D * 256;
#pragma unroll
        for (int j = 0; j < kCols; j += 4)
          *reinterpret_cast<float4*>(dst + j) = make_float4(h[j], h[j + 1], h[j + 2], h[j + 3]);
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
          pout[row * o.out.si] = from_f<T>(y * zz * sigmoid_f(zz));
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
    // Saving: the G carries go straight into the carries (the backward reads them); else scratch.
    ls.gin = o.carries ? o.carries : o.workspace + 1 + items * strips;
    SSM2D_CUDA_CHECK(cudaMemsetAsync(ls.flags, 0, (1 + items * strips) * sizeof(unsigned), stream));
  }
  if (o.carries) ls.ckpt = o.carries + scan2d_lanes_gin_floats(p.batch, p.dim, p.height, p.width);
  const size_t smem = (2 * static_cast<size_t>(kBufFloats<CB>) + CB * kYPitch) * kRows * sizeof(float);
  auto kernel = scan2d_lanes_fwd_kernel<T, CB, kRows, kMinBlocks>;
  SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(items * strips), CB * kStates, smem, stream>>>(p, o, ls);
  SSM2D_CUDA_CHECK_LAUNCH("scan2d_lanes_fwd_kernel");
}


// ---- Backward ---------------------------------------------------------------------------------------
//
// The adjoint of SCANS.md section 1 with the forward's lanes: a half-warp per (batch, channel), a lane
// per state, a block per 16-column strip of CB channels, walking the grid bottom-up, each row right to
// left:
//   lamV[i,j] = dy C + a[i+1,j] lamV[i+1,j]     one FMA per column, a[i+1] lamV[i+1] kept in registers
//   lamH[i,j] = lamV + a[i,j+1] lamH[i,j+1]     along the lane's 16 columns, entered by a*lamH of the
//                                               strip on the right (its block publishes it per row)
//   q = lamV (h - G) + lamH (G - x)
// G of a row is rebuilt from the G carry the forward saved at the strip's left edge; h going upwards
// from the forward's h after every 16th row: each half of a 16-row segment (the lower one first) is
// recomputed top-down from the segment's saved row into a per-block scratch (8 rows x 16 columns per
// lane, read back from L2), then walked bottom-up. Sums
// over the states (ddt, du and the pre-gate y for dz) go through shared memory as in the forward;
// dB, dC sum the block's channels (one group) in shared memory before one atomic per (cell, state),
// or, deterministically, are written per channel. Strips are chained right to left exactly as the
// forward chains them left to right (tickets in reverse strip order, a release per kLag rows).
// dA, dD, ddelta_bias leave as per-(batch, strip) sums, added over the strips in order by a small
// kernel.
struct LaneBwd {
  int64_t strips = 1;
  unsigned* flags = nullptr;   // [0]: tickets; [1 + item*strips + k]: rows (from the bottom) strip k has finished
  const float* gin = nullptr;  // the forward's G carries (lanes layout)
  const float* ckpt = nullptr; // the forward's h after every 16th row
  float* hand = nullptr;       // [b][strip k >= 1][row][channel][16]: a*lamH leaving strip k on the left
  float* seg = nullptr;        // [item*strips + strip][8 rows][thread][16]: h of the half segment being walked
  float* part = nullptr;       // [b][strip][channel][18]: dA of the 16 states, dD, ddelta_bias
};

constexpr int kSeg = static_cast<int>(kScan2dLanesSegment);
// Rows of h a block keeps at once: a segment is walked in two halves (the lower one first), each
// recomputed from the segment's saved row, so the scratch holds half a segment.
constexpr int kHalf = kSeg / 2;
constexpr int kPart = kStates + 2;

template <int CB>
constexpr int kBwdBufFloats = (4 * CB + 2 * kStates) * kPitch;  // dt, dt*u, u, dy per channel; B, C per state
template <int CB>
constexpr size_t kBwdSmemFloats = 2 * kBwdBufFloats<CB> + 3 * CB * kYPitch + 2 * CB * kStates * kPitch;

// kLean: 8-channel blocks at kLeanBlocks per SM (168 registers, 16 bytes spilled; see lanes_lean):
// the row's decays are recomputed where the adjoint uses them instead of kept from the G pass, and
// the h row is read at the row's start instead of a row ahead (the 12 warps are to hide that read).
constexpr int kLeanBlocks = 3;
template <typename T, int CB, bool kDet, bool kLean>
__global__ void __launch_bounds__(CB * kStates, kLean ? kLeanBlocks : 1) scan2d_lanes_bwd_kernel(Scan2dProblem p, Scan2dBackwardArgs ga,
                                                                                       LaneBwd lb) {
  static_assert(!kLean || (CB == 8 && !kDet), "the lean instance: 8-channel blocks, atomic dB / dC");
  constexpr int kThreads = CB * kStates, kBC = kStates * kCols / kThreads;
  constexpr int BUF = kBwdBufFloats<CB>;
  extern __shared__ __align__(16) float smem[];
  float* s_red = smem + 2 * BUF;               // [3][CB][column][state]: q*A, lamH*B, C*h
  float* s_bc = s_red + 3 * CB * kYPitch;      // [2][CB][state][column]: dB, dC of each channel
  const int tid = threadIdx.x, n = tid & 15, c = tid >> 4;
  const int64_t D = p.dim, N = p.dstate, H = p.height, W = p.width, S = lb.strips;
  const int64_t cb0 = ga.d_begin / CB, nCb = (ga.d_end + CB - 1) / CB - cb0, items = p.batch * nCb;
  int64_t item = blockIdx.x, strip = S - 1;
  if (S > 1) {  // tickets in reverse strip order: every block of strip k starts after those of strip k+1
    __shared__ unsigned s_ticket;
    if (tid == 0) s_ticket = atomicAdd(lb.flags, 1u);
    __syncthreads();
    strip = S - 1 - static_cast<int64_t>(s_ticket) / items;
    item = s_ticket % items;
  }
  const int64_t b = item / nCb, d0 = (cb0 + item % nCb) * CB, d = d0 + c, g = d0 / (D / p.groups);
  const int64_t jb = strip * kCols, Ws = min(static_cast<int64_t>(kCols), W - jb);
  const bool has_d = d >= ga.d_begin && d < ga.d_end, active = has_d && n < N;
  const bool has_right = strip + 1 < S;
  const unsigned* flag_right = has_right ? lb.flags + 1 + item * S + strip + 1 : nullptr;
  unsigned* flag_self = lb.flags + 1 + item * S + strip;
  const int64_t row_stride = D * kStates;
  const int64_t lane_off = (has_d ? d : 0) * kStates + n;
  const float* gin = (strip > 0 && has_d) ? lb.gin + (b * (S - 1) + strip - 1) * H * row_stride + lane_off : nullptr;
  const float* hand_right = (has_right && has_d) ? lb.hand + (b * (S - 1) + strip) * H * row_stride + lane_off : nullptr;
  float* hand_self = (strip > 0 && has_d) ? lb.hand + (b * (S - 1) + strip - 1) * H * row_stride + lane_off : nullptr;
  const int64_t nseg = (H + kSeg - 1) / kSeg;
  const float* ckpt = has_d ? lb.ckpt + ((b * S + strip) * (nseg - 1) * D + d) * 256 + n * 16 : nullptr;
  float* seg = lb.seg + (item * S + strip) * kHalf * kThreads * 16 + tid * 16;
  const float An = active ? static_cast<const float*>(p.A)[d * p.A_sd + n * p.A_sn] : 0.f, A2 = An * kLog2e;
  const int64_t bc_c = kDet ? d - ga.d_begin : g;

  const bool cell = has_d && n < Ws, gated = p.z.defined();
  const int64_t jc = jb + (cell ? n : 0), dc = has_d ? d : 0;
  const T* pu = static_cast<const T*>(p.u.data) + b * p.u.sb + dc * p.u.sc + jc * p.u.sj;
  const T* pdl = static_cast<const T*>(p.delta.data) + b * p.delta.sb + dc * p.delta.sc + jc * p.delta.sj;
  const T* pz = gated ? static_cast<const T*>(p.z.data) + b * p.z.sb + dc * p.z.sc + jc * p.z.sj : nullptr;
  const T* pdo = static_cast<const T*>(ga.dout.data) + b * ga.dout.sb + dc * ga.dout.sc + jc * ga.dout.sj;
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

  // A row's operands of this thread in registers (loaded a row or two ahead), and the finished
  // cell's own values.
  struct RowOps {
    float u = 0.f, dl = 0.f, z = 0.f, dout = 0.f, b[kBC], c[kBC];
    float gc = 0.f;  // the G carry entering the row (the recompute's; the adjoint loads its own)
  };
  RowOps ra, rb;  // ra: the next row's operands; rb: the one after (the recompute's second row ahead)
  float cu = 0.f, cdt = 0.f, csl = 1.f, cdy = 0.f, cdo = 0.f, cz = 0.f;  // csl: d dt / d delta
  auto load_ops = [&](RowOps& r, int64_t i) {
    r.u = ld_early(pu + i * p.u.si);
    r.dl = ld_early(pdl + i * p.delta.si);
    r.dout = ld_early(pdo + i * ga.dout.si);
    if (gated) r.z = ld_early(pz + i * p.z.si);
#pragma unroll
    for (int k = 0; k < kBC; ++k) {
      r.b[k] = ld_early(pB[k] + i * p.B.si);
      r.c[k] = ld_early(pC[k] + i * p.C.si);
    }
  };
  // Asks L2 for row i's operands of this thread (the segment above, while this one is recomputed: its
  // first pass otherwise waits on device memory at every row).
  auto prefetch_row = [&](int64_t i) {
    prefetch_l2(pu + i * p.u.si);
    prefetch_l2(pdl + i * p.delta.si);
    prefetch_l2(pdo + i * ga.dout.si);
    if (gated) prefetch_l2(pz + i * p.z.si);
#pragma unroll
    for (int r = 0; r < kBC; ++r) {
      prefetch_l2(pB[r] + i * p.B.si);
      prefetch_l2(pC[r] + i * p.C.si);
    }
  };
  // Stages the loaded row (cells outside the grid: dt = 0, u = dy = 0) and keeps the cell's values.
  auto store_row = [&](const RowOps& ops, float* buf) {
    float dt = 0.f, dy = 0.f, sl = 1.f;
    if (cell) {
      const float v = ops.dl + bias;
      dt = v;
      if (p.softplus) {
        float t;
        dt = softplus_t(v, t);
        sl = softplus_slope(v, t);
      }
      dy = gated ? ops.dout * (ops.z * sigmoid_f(ops.z)) : ops.dout;
    }
    const float u = cell ? ops.u : 0.f;
    buf[c * kPitch + n] = dt;
    buf[(CB + c) * kPitch + n] = dt * u;
    buf[(2 * CB + c) * kPitch + n] = u;
    buf[(3 * CB + c) * kPitch + n] = dy;
#pragma unroll
    for (int r = 0; r < kBC; ++r) {
      const int x = tid + r * kThreads, s = x >> 4, j = x & 15;
      buf[(4 * CB + s) * kPitch + j] = okBC[r] ? ops.b[r] : 0.f;
      buf[(4 * CB + kStates + s) * kPitch + j] = okBC[r] ? ops.c[r] : 0.f;
    }
    cu = u;
    cdt = dt;
    csl = sl;
    cdy = dy;
    cdo = cell ? ops.dout : 0.f;
    cz = ops.z;
  };

  float w[kCols];  // a[i+1,j] lamV[i+1,j]: what lamV of the row above receives from below
#pragma unroll
  for (int j = 0; j < kCols; ++j) w[j] = 0.f;
  float dA_acc = 0.f, dD_acc = 0.f, dbias_acc = 0.f;
  unsigned avail = 0;  // rows (from the bottom) the strip on the right is known to have finished

  for (int64_t part_idx = 2 * nseg - 1; part_idx >= 0; --part_idx) {
    const int64_t sidx = part_idx / 2, r0 = sidx * kSeg, h0 = r0 + (part_idx % 2) * kHalf;
    const int64_t h1 = min(h0 + kHalf, H);
    if (h0 >= H) continue;  // the last segment may have no lower half
    // 1. Top-down from the segment's saved row: h of rows h0 .. h1-1 into the block's scratch.
    {
      float h[kCols];
      if (sidx > 0 && ckpt) {
        const float* src = ckpt + (sidx - 1) * D * 256;
#pragma unroll
        for (int j = 0; j < kCols; j += 4) {
          const float4 v = __ldcg(reinterpret_cast<const float4*>(src + j));
          h[j] = v.x;
          h[j + 1] = v.y;
          h[j + 2] = v.z;
          h[j + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kCols; ++j) h[j] = 0.f;
      }
      // A row's operands and its G carry (the strip on the left's, saved by the forward).
      auto load_rec = [&](RowOps& r, int64_t i) {
        load_ops(r, i);
        if (gin) r.gc = ld_early(gin + i * row_stride);
      };
      load_rec(ra, r0);
      store_row(ra, smem);
      float G_row = ra.gc;  // the G carry entering the row being recomputed
      // Rows r0 + 1 and r0 + 2 in flight: a recompute row is too short to hide the latency of the
      // loads it issues for the next one (or of its G carry), so each row's loads are issued two
      // rows before their use.
      if (r0 + 1 < h1) load_rec(ra, r0 + 1);
      if (r0 + 2 < h1) load_rec(rb, r0 + 2);
      __syncthreads();
      // Row i, its successor's operands in `nxt` (staged at the end, then refilled with row i + 3).
      // Called with ra and rb in turn, so that no register copy waits on a load in flight.
      auto recompute_row = [&](int64_t i, RowOps& nxt) {
        const float* buf = smem + ((i - r0) & 1) * BUF;
        if (i >= kSeg) prefetch_row(i - kSeg);
        float G = G_row;
#pragma unroll
        for (int q = 0; q < kCols; q += 4) {
          float dt[4], du[4], bb[4];
          load4(dt, buf + c * kPitch + q);
          load4(du, buf + (CB + c) * kPitch + q);
          load4(bb, buf + (4 * CB + n) * kPitch + q);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float a = fast_exp2(dt[k] * A2);
            G = fmaf(a, G, du[k] * bb[k]);
            h[q + k] = fmaf(a, h[q + k], G);
          }
        }
        if (i >= h0) {
          float* dst = seg + (i - h0) * kThreads * 16;
#pragma unroll
          for (int j = 0; j < kCols; j += 4)
            __stcg(reinterpret_cast<float4*>(dst + j), make_float4(h[j], h[j + 1], h[j + 2], h[j + 3]));
        }
        if (i + 1 < h1) {
          store_row(nxt, smem + ((i + 1 - r0) & 1) * BUF);
          G_row = nxt.gc;
          if (i + 3 < h1) load_rec(nxt, i + 3);
        }
        __syncthreads();
      };
      for (int64_t i = r0; i < h1; i += 2) {
        recompute_row(i, ra);
        if (i + 1 < h1) recompute_row(i + 1, rb);
      }
    }
    // 2. Bottom-up: the adjoint of rows h1-1 .. h0.
    load_ops(ra, h1 - 1);
    store_row(ra, smem);
    __syncthreads();
    // This block's h row and the G carry, a row ahead (both L2 reads).
    auto load_h = [&](int64_t i, float4 (&v)[kCols / 4]) {
      const float* src = seg + (i - h0) * kThreads * 16;
#pragma unroll
      for (int q = 0; q < kCols / 4; ++q) v[q] = __ldcg(reinterpret_cast<const float4*>(src + 4 * q));
    };
    float4 h_next[kCols / 4];
    if constexpr (!kLean) load_h(h1 - 1, h_next);
    float G_next = gin ? __ldcg(gin + (h1 - 1) * row_stride) : 0.f;
    for (int64_t i = h1 - 1; i >= h0; --i) {
      const float* buf = smem + ((h1 - 1 - i) & 1) * BUF;
      if (i > h0) load_ops(ra, i - 1);
      const int64_t m = H - 1 - i;  // rows finished below this one
      if (has_right && avail <= static_cast<unsigned>(m)) {
        const unsigned need = static_cast<unsigned>(min(m + kLag, H));
        for (int64_t spin = 0; (avail = ld_acquire(flag_right)) < need; ++spin) {
          if (spin > (int64_t{1} << 32)) __trap();  // a lost predecessor: fail, never hang
          __nanosleep(64);
        }
      }
      float cH = hand_right ? __ldcg(hand_right + i * row_stride) : 0.f;
      float G = G_next;
      float hr[kCols], av[kCols], Gc[kCols];
      if constexpr (kLean) load_h(i, h_next);
#pragma unroll
      for (int q = 0; q < kCols / 4; ++q) {
        hr[4 * q] = h_next[q].x;
        hr[4 * q + 1] = h_next[q].y;
        hr[4 * q + 2] = h_next[q].z;
        hr[4 * q + 3] = h_next[q].w;
      }
      if (i > h0) {
        if constexpr (!kLean) load_h(i - 1, h_next);
        if (gin) G_next = __ldcg(gin + (i - 1) * row_stride);
      }
      const float* bdt = buf + c * kPitch;
      const float* bdu = buf + (CB + c) * kPitch;
      const float* bdy = buf + (3 * CB + c) * kPitch;
      const float* bB = buf + (4 * CB + n) * kPitch;
      const float* bC = buf + (4 * CB + kStates + n) * kPitch;
      // The staged operands are read 4 columns at a time (one 16-byte load each: a quarter of the
      // shared-memory instructions of scalar reads, and no bank conflicts between states n and n+8).
#pragma unroll
      for (int q = 0; q < kCols; q += 4) {  // G of the row, left to right, from the saved carry
        float dt[4], du[4], bb[4];
        load4(dt, bdt + q);
        load4(du, bdu + q);
        load4(bb, bB + q);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float a = fast_exp2(dt[k] * A2);
          if constexpr (!kLean) av[q + k] = a;
          G = fmaf(a, G, du[k] * bb[k]);
          Gc[q + k] = G;
        }
      }
      float* red0 = s_red + c * kYPitch + n;
      float* red1 = red0 + CB * kYPitch;
      float* red2 = red1 + CB * kYPitch;
      float* sdb = s_bc + (c * kStates + n) * kPitch;
      float* sdc = sdb + CB * kStates * kPitch;
#pragma unroll
      for (int q = kCols - 4; q >= 0; q -= 4) {
        float dt[4], du[4], dy[4], bb[4], cc[4];
        load4(dt, bdt + q);
        load4(du, bdu + q);
        load4(dy, bdy + q);
        load4(bb, bB + q);
        load4(cc, bC + q);
        float dbv[4], dcv[4];
#pragma unroll
        for (int k = 3; k >= 0; --k) {
          const int j = q + k;
          const float bj = bb[k], cj = cc[k], dyj = dy[k], dtj = dt[k], duj = du[k];
          const float lamV = fmaf(dyj, cj, w[j]);
          const float lamH = lamV + cH;
          const float qv = fmaf(lamV, hr[j] - Gc[j], lamH * (Gc[j] - duj * bj));
          dA_acc = fmaf(qv, dtj, dA_acc);
          red0[j * kPitch] = qv * An;
          red1[j * kPitch] = lamH * bj;
          red2[j * kPitch] = cj * hr[j];
          dbv[k] = lamH * duj;
          dcv[k] = dyj * hr[j];
          if constexpr (kDet) {
            if (active && j < Ws) {
              if (ga.dB.defined()) plane<float>(ga.dB, b, bc_c, n).at(i, jb + j) = dbv[k];
              if (ga.dC.defined()) plane<float>(ga.dC, b, bc_c, n).at(i, jb + j) = dcv[k];
            }
          }
          const float aj = kLean ? fast_exp2(dtj * A2) : av[j];
          w[j] = aj * lamV;
          cH = aj * lamH;
        }
        if constexpr (!kDet) {
          *reinterpret_cast<float4*>(sdb + q) = make_float4(dbv[0], dbv[1], dbv[2], dbv[3]);
          *reinterpret_cast<float4*>(sdc + q) = make_float4(dcv[0], dcv[1], dcv[2], dcv[3]);
        }
      }
      if (hand_self) __stcg(hand_self + i * row_stride, cH);
      __syncthreads();
      if (cell) {  // column n of channel c: sums over the states, in a fixed order
        const float* r0p = s_red + c * kYPitch + n * kPitch;
        float sq = 0.f, sw = 0.f, yp = 0.f;
#pragma unroll
        for (int s4 = 0; s4 < kStates; s4 += 4) {
          const float4 a0 = *reinterpret_cast<const float4*>(r0p + s4);
          const float4 a1 = *reinterpret_cast<const float4*>(r0p + CB * kYPitch + s4);
          const float4 a2 = *reinterpret_cast<const float4*>(r0p + 2 * CB * kYPitch + s4);
          sq += (a0.x + a0.y) + (a0.z + a0.w);
          sw += (a1.x + a1.y) + (a1.z + a1.w);
          yp += (a2.x + a2.y) + (a2.z + a2.w);
        }
        const float ddt = fmaf(cu, sw, sq);
        const float du = fmaf(cdt, sw, Dd * cdy);
        const float ddelta = ddt * csl;
        dbias_acc += ddelta;
        dD_acc = fmaf(cdy, cu, dD_acc);
        if (ga.du.defined()) plane<T>(ga.du, b, d, 0).at(i, jb + n) = from_f<T>(du);
        if (ga.ddelta.defined()) plane<T>(ga.ddelta, b, d, 0).at(i, jb + n) = from_f<T>(ddelta);
        if (gated && ga.dz.defined()) {
          const float y = fmaf(Dd, cu, yp), sg = sigmoid_f(cz);
          plane<T>(ga.dz, b, d, 0).at(i, jb + n) = from_f<T>(cdo * y * sg * (1.f + cz * (1.f - sg)));
        }
      }
      if constexpr (!kDet) {  // dB, dC: the block's channels (one group) summed in order, one atomic
#pragma unroll
        for (int r = 0; r < kBC; ++r) {
          const int x = tid + r * kThreads, s = x >> 4, j = x & 15;
          if (s >= N || j >= Ws) continue;
          float sb = 0.f, sc = 0.f;
#pragma unroll
          for (int cc = 0; cc < CB; ++cc) {
            sb += s_bc[(cc * kStates + s) * kPitch + j];
            sc += s_bc[((CB + cc) * kStates + s) * kPitch + j];
          }
          if (ga.dB.defined()) atomicAdd(&plane<float>(ga.dB, b, g, s).at(i, jb + j), sb);
          if (ga.dC.defined()) atomicAdd(&plane<float>(ga.dC, b, g, s).at(i, jb + j), sc);
        }
      }
      if (i > h0) store_row(ra, smem + ((h1 - i) & 1) * BUF);
      __syncthreads();  // also: every thread's handover store of row i precedes the release below
      const int64_t done = H - i;
      if (strip > 0 && tid == 0 && (done % kLag == 0 || i == 0)) st_release(flag_self, static_cast<unsigned>(done));
    }
  }
  float* part = lb.part + ((b * S + strip) * D + (has_d ? d : 0)) * kPart;
  if (active) part[n] = dA_acc;
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) {  // over the half-warp: the channel's 16 columns
    dD_acc += __shfl_xor_sync(0xffffffffu, dD_acc, off);
    dbias_acc += __shfl_xor_sync(0xffffffffu, dbias_acc, off);
  }
  if (has_d && n == 0) {
    part[kStates] = dD_acc;
    part[kStates + 1] = dbias_acc;
  }
}

// dA, dD, ddelta_bias of each (batch, channel): the strips' sums added in strip order.
__global__ void scan2d_lanes_bwd_reduce_kernel(Scan2dProblem p, Scan2dBackwardArgs ga, const float* part, int64_t S) {
  const int64_t chans = ga.d_end - ga.d_begin;
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= p.batch * chans * kPart) return;
  const int k = static_cast<int>(t % kPart);
  const int64_t d = ga.d_begin + (t / kPart) % chans, b = t / (kPart * chans);
  if (k < kStates && k >= p.dstate) return;
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) sum += part[((b * S + s) * p.dim + d) * kPart + k];
  if (k < kStates) {
    if (ga.dA_part) static_cast<float*>(ga.dA_part)[(b * p.dim + d) * p.dstate + k] = sum;
  } else if (k == kStates) {
    if (ga.dD_part) static_cast<float*>(ga.dD_part)[b * p.dim + d] = sum;
  } else if (ga.ddelta_bias_part) {
    static_cast<float*>(ga.ddelta_bias_part)[b * p.dim + d] = sum;
  }
}

// Whether the (non-deterministic) backward runs the lean 8-channel instance: from two full waves of
// its blocks at kLeanBlocks per SM (12 warps), instead of one 16-channel block per SM (8 warps, 230
// registers, 118 KB of shared memory). H100, bf16: 428 x 553 (2.8 waves) 9.88 -> 7.72 ms, 489x415
// (2.1 waves) 10.09 -> 8.64 ms; with a lone short second wave (200x200: 416 blocks for 396 places)
// it was slower, 1.70 -> 2.03 ms.
bool lanes_lean(const Scan2dProblem& p, const Scan2dBackwardArgs& a) {
  const int64_t blocks = p.batch * ((a.d_end - a.d_begin + 7) / 8) * ((p.width + kCols - 1) / kCols);
  return blocks >= 2 * kLeanBlocks * kOneWave;
}

template <typename T, int CB, bool kDet, bool kLean>
void backward_launch(const Scan2dProblem& p, const Scan2dBackwardArgs& a, cudaStream_t stream) {
  const int64_t cb0 = a.d_begin / CB, nCb = (a.d_end + CB - 1) / CB - cb0, items = p.batch * nCb;
  const int64_t S = (p.width + kCols - 1) / kCols;
  if (items * S > kMaxBlocks) throw ArgumentError("scan2d_backward: too many (batch, channel, strip) blocks");
  LaneBwd lb;
  lb.strips = S;
  // Hand-over and segment scratch first (16-byte aligned for float4), the flags last.
  float* ws = a.workspace;
  lb.hand = ws;
  ws += scan2d_lanes_gin_floats(p.batch, p.dim, p.height, p.width);
  lb.seg = ws;
  ws += items * S * kHalf * CB * kStates * 16;
  lb.part = ws;
  ws += p.batch * S * p.dim * kPart;
  lb.flags = reinterpret_cast<unsigned*>(ws);
  lb.gin = a.carries;
  lb.ckpt = a.carries + scan2d_lanes_gin_floats(p.batch, p.dim, p.height, p.width);
  SSM2D_CUDA_CHECK(cudaMemsetAsync(lb.flags, 0, (1 + items * S) * sizeof(unsigned), stream));
  const size_t smem = kBwdSmemFloats<CB> * sizeof(float);
  auto kernel = scan2d_lanes_bwd_kernel<T, CB, kDet, kLean>;
  SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<static_cast<unsigned>(items * S), CB * kStates, smem, stream>>>(p, a, lb);
  SSM2D_CUDA_CHECK_LAUNCH("scan2d_lanes_bwd_kernel");
  if (a.dA_part || a.dD_part || a.ddelta_bias_part) {
    const int64_t threads = p.batch * (a.d_end - a.d_begin) * kPart;
    scan2d_lanes_bwd_reduce_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(p, a, lb.part, S);
    SSM2D_CUDA_CHECK_LAUNCH("scan2d_lanes_bwd_reduce_kernel");
  }
}

}  // namespace

bool scan2d_lanes_fit(const Scan2dProblem& p) { return scan2d_lanes_fit(p.dim, p.groups, p.dstate); }

void scan2d_lanes_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& a) {
  if (!a.workspace || !a.carries) throw ArgumentError("scan2d_backward: carries and workspace are required on CUDA");
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  const int cb = lanes_channels(p);
  const bool lean = lanes_lean(p, a);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.deterministic) cb == 16 ? backward_launch<T, 16, true, false>(p, a, stream) : backward_launch<T, 8, true, false>(p, a, stream);
    else if (lean) backward_launch<T, 8, false, true>(p, a, stream);
    else cb == 16 ? backward_launch<T, 16, false, false>(p, a, stream) : backward_launch<T, 8, false, false>(p, a, stream);
  });
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
