// wavefront2d (Mamba2D M2D-SSM) on CUDA.
//
// Row i given row i-1 is a linear recurrence along the row:
//     h[i,j] = alpha_j h[i,j-1] + beta_j,  alpha_j = cL aL,  beta_j = cL vL + cT (aT h[i-1,j] + vT)
// (cL, cT = 1/2 in the interior, the border rules of SCANS.md otherwise). One block per (batch,
// channel); warp w owns state n0 + w; lane l owns the S consecutive columns [l*S, l*S + S) and
// keeps its part of the previous row in registers. Per row: each lane composes its S steps into one
// affine map, a 5-step shuffle scan composes the lanes' maps, and a second pass writes the row. So
// the grid is swept in H dependent row steps with the state on chip, one launch per pass, and the
// (batch, H, W, E, N) state never reaches global memory. C*h is reduced over the warps in a fixed
// order through shared memory.
//
// The backward sweeps rows upwards with the adjoint, a reverse recurrence along each row:
//     lam[i,j] = dy C + (cL aL)[i,j+1] lam[i,j+1] + (cT aT)[i+1,j] lam[i+1,j]
// It needs h of rows i and i-1: a first forward sweep stores every 32nd row (checkpoints), then
// each 32-row segment is recomputed from its checkpoint into scratch and walked bottom-up.
//
// Per-cell outputs (out; du, ddT, ddL) are float32 buffers that the kernels ADD into, so the
// caller can run the states in chunks of at most 16 (one warp each) and cast once at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "common.cuh"
#include "scan2d_common.cuh"
#include "ssm2d/wavefront2d.h"

namespace ssm2d::cuda {
namespace {

constexpr int kCheckpoint = 32;  // keep equal to CHECKPOINT in ssm2d_kernels/wavefront2d.py
constexpr int kMaxWarps = 16;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T> __device__ __forceinline__ float ld(const T* p);
template <> __device__ __forceinline__ float ld<float>(const float* p) { return *p; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// Staged loads: the value as stored (the dtype's bits), converted where it is used (to_f). A load
// converted at once (ld above) inside a branch makes the thread wait for it right there, one round
// trip per array and row; the staging below loads from an always-valid address without a branch and
// masks at the conversion, so a row's loads issue together and their latency overlaps the row's
// arithmetic.
using s2d::from_f;
using s2d::to_f;

struct Strided {
  const char* base;  // byte pointer of element (0, 0)
  int64_t si, sj;    // element strides
  template <typename T>
  __device__ __forceinline__ const T* at(int64_t i, int64_t j) const {
    return reinterpret_cast<const T*>(base) + i * si + j * sj;
  }
};

template <typename T>
__device__ __forceinline__ Strided plane_of(const Grid& g, int64_t b, int64_t c, int64_t n) {
  return {reinterpret_cast<const char*>(static_cast<const T*>(g.data) + b * g.sb + c * g.sc + n * g.sn), g.si, g.sj};
}

__device__ __forceinline__ float* fplane(const Grid& g, int64_t b, int64_t c, int64_t n, int64_t i, int64_t j) {
  return static_cast<float*>(g.data) + b * g.sb + c * g.sc + n * g.sn + i * g.si + j * g.sj;
}


__device__ __forceinline__ int padded(int64_t j) { return static_cast<int>(j + (j >> 5)); }

// Border rule. The origin takes its left input; in a transposed call (origin_top) the physical
// left is the scanned top.
__device__ __forceinline__ void coefficients(int64_t i, int64_t j, bool origin_top, float& cL, float& cT) {
  if (i == 0 && j == 0 && origin_top) { cL = 0.f; cT = 1.f; }
  else if (i == 0) { cL = 1.f; cT = 0.f; }
  else if (j == 0) { cL = 0.f; cT = 1.f; }
  else { cL = 0.5f; cT = 0.5f; }
}

// Shared-memory rows are indexed padded(j) = j + j/32 and have a pitch of 1 mod 32 words: a lane
// walking its S consecutive columns and a thread per column both hit distinct banks.
__host__ __device__ __forceinline__ int row_pitch(int64_t W) {
  const int64_t p = W + ((W - 1) >> 5) + 1;
  return static_cast<int>(((p + 31) / 32) * 32 + 1);
}

constexpr int kBatch = 8;  // loads a thread issues before its first shared-memory store

// Stages row i of u, dT, dL (converted to float). Loads go out in batches so their latencies
// overlap instead of alternating with the stores.
template <typename T>
__device__ void stage_row(const Strided& u, const Strided& dT, const Strided& dL, int64_t i, int64_t W, float* s_u,
                          float* s_dT, float* s_dL) {
  const int stride = blockDim.x;
  for (int j0 = threadIdx.x; j0 < W; j0 += kBatch * stride) {
    float vu[kBatch], vt[kBatch], vl[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int j = j0 + k * stride;
      if (j < W) {
        vu[k] = ld<T>(u.at<T>(i, j));
        vt[k] = ld<T>(dT.at<T>(i, j));
        vl[k] = ld<T>(dL.at<T>(i, j));
      }
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int j = j0 + k * stride;
      if (j < W) {
        const int pj = padded(j);
        s_u[pj] = vu[k];
        s_dT[pj] = vt[k];
        s_dL[pj] = vl[k];
      }
    }
  }
}

// Stages row i of a (b, H, W, [G,] N) operand for the block's NW states, as [state][padded column]:
// consecutive threads take consecutive states of one cell, so the global reads are coalesced.
// NW is a power of two (lg = log2 NW); only the first `count` states exist.
template <typename T>
__device__ void stage_states(const Grid& g, int64_t b, int64_t grp, int64_t n0, int lg, int count, int64_t i,
                             int64_t W, int Wp, float* dst) {
  const T* base = static_cast<const T*>(g.data) + b * g.sb + grp * g.sc + n0 * g.sn + i * g.si;
  const int total = static_cast<int>(W) << lg;  // W <= 2048, NW <= 16: 32-bit index math
  const int stride = blockDim.x;
  for (int x0 = threadIdx.x; x0 < total; x0 += kBatch * stride) {
    float v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int x = x0 + k * stride, j = x >> lg, w = x & ((1 << lg) - 1);
      if (x < total && w < count) v[k] = ld<T>(base + w * g.sn + static_cast<int64_t>(j) * g.sj);
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int x = x0 + k * stride, j = x >> lg, w = x & ((1 << lg) - 1);
      if (x < total && w < count) dst[w * Wp + padded(j)] = v[k];
    }
  }
}

// Per-cell outputs of state chunk z > 0 go to float32 scratch laid out (b, e, i, j) contiguous.
__device__ __forceinline__ float* cell_out(const Grid& g, float* scratch, int64_t z, int64_t b, int64_t e, int64_t i,
                                           int64_t j, const Wave2dProblem& p) {
  if (z == 0) return fplane(g, b, e, 0, i, j);
  const int64_t cells = p.batch * p.dim * p.height * p.width;
  return scratch + (z - 1) * cells + ((b * p.dim + e) * p.height + i) * p.width + j;
}

// out += sum over chunks z >= 1 of their scratch, in chunk order (deterministic).
__global__ void add_chunks_kernel(Wave2dProblem p, Grid out, const float* scratch, int64_t chunks) {
  const int64_t cells = p.batch * p.dim * p.height * p.width;
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < cells;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = x % p.width, i = (x / p.width) % p.height, e = (x / (p.width * p.height)) % p.dim,
                  b = x / (p.width * p.height * p.dim);
    float s = 0.f;
    for (int64_t z = 1; z < chunks; ++z) s += scratch[(z - 1) * cells + x];
    *fplane(out, b, e, 0, i, j) += s;
  }
}

// Asks L2 for row i of the block's inputs, so the next row's staging waits on L2, not memory.
template <typename T>
__device__ __forceinline__ void prefetch_row(const Strided& x, int64_t i, int64_t W) {
  for (int64_t j = threadIdx.x * 16; j < W; j += static_cast<int64_t>(blockDim.x) * 16)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(x.at<T>(i, j)));
}

// One forward row for this lane's S columns: hrow holds row i-1 on entry and row i on return.
// s_BT / s_BL point at this warp's staged state row.
template <int S>
__device__ __forceinline__ void forward_row(int64_t i, int64_t W, bool origin_top, int lane, float AT2, float AL2,
                                            const float* s_BT, const float* s_BL, const float* s_u, const float* s_dT,
                                            const float* s_dL, float (&hrow)[S]) {
  float alpha[S], beta[S];
  float A = 1.f, B = 0.f;
#pragma unroll
  for (int k = 0; k < S; ++k) {
    const int64_t j = static_cast<int64_t>(lane) * S + k;
    alpha[k] = 1.f;
    beta[k] = 0.f;
    if (j < W) {
      const int pj = padded(j);
      const float uu = s_u[pj], t = s_dT[pj], l = s_dL[pj];
      float cL, cT;
      coefficients(i, j, origin_top, cL, cT);
      const float aL = fast_exp2(l * AL2), aT = fast_exp2(t * AT2);
      alpha[k] = cL * aL;
      beta[k] = cL * (l * s_BL[pj] * uu) + cT * fmaf(aT, hrow[k], t * s_BT[pj] * uu);
    }
    B = fmaf(alpha[k], B, beta[k]);
    A *= alpha[k];
  }
  // Compose the lanes' affine maps left to right; lane l needs the composite of lanes < l applied to 0.
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float Ap = __shfl_up_sync(0xffffffffu, A, off), Bp = __shfl_up_sync(0xffffffffu, B, off);
    if (lane >= off) {
      B = fmaf(A, Bp, B);
      A *= Ap;
    }
  }
  float h = __shfl_up_sync(0xffffffffu, B, 1);
  if (lane == 0) h = 0.f;
#pragma unroll
  for (int k = 0; k < S; ++k) {
    h = fmaf(alpha[k], h, beta[k]);
    hrow[k] = h;
  }
}

// Short rows (S = 4) fit 64 registers: two 16-warp blocks per SM for the many small grids of a batch.
template <typename T, int S>
__global__ void __launch_bounds__(kMaxWarps * 32, S <= 4 ? 2 : 1) wave_fwd_kernel(Wave2dProblem p, Grid out, int64_t b0) {
  extern __shared__ float smem[];
  const int NW = blockDim.x >> 5, lg = __ffs(NW) - 1, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t e = blockIdx.x, b = blockIdx.y + b0, H = p.height, W = p.width, z = blockIdx.z;
  const int64_t n0 = z * NW, n = n0 + warp;
  const int count = static_cast<int>(min(static_cast<int64_t>(NW), p.dstate - n0));  // states of this chunk
  const bool active = warp < count;
  const int64_t g = e / (p.dim / p.groups);
  const int Wp = row_pitch(W);
  float *s_u = smem, *s_dT = s_u + Wp, *s_dL = s_dT + Wp;
  float *s_BT = s_dL + Wp, *s_BL = s_BT + NW * Wp, *s_C = s_BL + NW * Wp;  // [state][column]
  const Strided u = plane_of<T>(p.u, b, e, 0), dT = plane_of<T>(p.dT, b, e, 0), dL = plane_of<T>(p.dL, b, e, 0);
  const float AT2 = active ? static_cast<const float*>(p.AT)[e * p.A_sd + n * p.A_sn] * kLog2e : 0.f;
  const float AL2 = active ? static_cast<const float*>(p.AL)[e * p.AL_sd + n * p.AL_sn] * kLog2e : 0.f;
  const float Dd = (p.D && z == 0) ? static_cast<const float*>(p.D)[e] : 0.f;
  float hrow[S];
#pragma unroll
  for (int k = 0; k < S; ++k) hrow[k] = 0.f;

  for (int64_t i = 0; i < H; ++i) {
    stage_row<T>(u, dT, dL, i, W, s_u, s_dT, s_dL);
    stage_states<T>(p.BT, b, g, n0, lg, count, i, W, Wp, s_BT);
    stage_states<T>(p.BL, b, g, n0, lg, count, i, W, Wp, s_BL);
    stage_states<T>(p.C, b, g, n0, lg, count, i, W, Wp, s_C);
    __syncthreads();
    if (i + 1 < H) {
      if (warp == 0) prefetch_row<T>(u, i + 1, W);
      if (warp == 1 % NW) prefetch_row<T>(dT, i + 1, W);
      if (warp == 2 % NW) prefetch_row<T>(dL, i + 1, W);
    }
    if (active) {
      forward_row<S>(i, W, p.origin_top, lane, AT2, AL2, s_BT + warp * Wp, s_BL + warp * Wp, s_u, s_dT, s_dL, hrow);
      float* yw = s_C + warp * Wp;  // C*h replaces this warp's C
#pragma unroll
      for (int k = 0; k < S; ++k) {
        const int64_t j = static_cast<int64_t>(lane) * S + k;
        if (j < W) yw[padded(j)] *= hrow[k];
      }
    }
    __syncthreads();
    for (int j0 = threadIdx.x; j0 < W; j0 += kBatch * blockDim.x) {  // batched read-modify-writes
      float old[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int j = j0 + k * blockDim.x;
        old[k] = j < W ? *cell_out(out, p.workspace, z, b, e, i, j, p) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int j = j0 + k * blockDim.x;
        if (j >= W) continue;
        const int pj = padded(j);
        float y = Dd * s_u[pj];
        for (int w = 0; w < count; ++w) y += s_C[w * Wp + pj];
        *cell_out(out, p.workspace, z, b, e, i, j, p) = old[k] + y;
      }
    }
    __syncthreads();
  }
}

template <typename T, int S, bool kDeterministic>
__global__ void __launch_bounds__(kMaxWarps * 32, S <= 4 ? 2 : 1) wave_bwd_kernel(Wave2dProblem p, Wave2dBackwardArgs ga, int64_t b0) {
  extern __shared__ float smem[];
  const int NW = blockDim.x >> 5, lg = __ffs(NW) - 1, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t e = ga.e_begin + blockIdx.x, b = blockIdx.y + b0, H = p.height, W = p.width, z = blockIdx.z;
  const int64_t n0 = z * NW, n = n0 + warp;
  const int count = static_cast<int>(min(static_cast<int64_t>(NW), p.dstate - n0));
  const bool active = warp < count;
  const int64_t g = e / (p.dim / p.groups), bc_c = kDeterministic ? e - ga.e_begin : g;
  const int Wp = row_pitch(W);
  float *s_u = smem, *s_dT = s_u + Wp, *s_dL = s_dT + Wp, *s_dy = s_dL + Wp;
  float *s_BT = s_dy + Wp, *s_BL = s_BT + NW * Wp, *s_C = s_BL + NW * Wp;  // [state][column]
  float *w_BT = s_BT + warp * Wp, *w_BL = s_BL + warp * Wp, *w_C = s_C + warp * Wp;
  const Strided u = plane_of<T>(p.u, b, e, 0), dT = plane_of<T>(p.dT, b, e, 0), dL = plane_of<T>(p.dL, b, e, 0);
  const Strided dout = plane_of<T>(ga.dout, b, e, 0);
  const float AT = active ? static_cast<const float*>(p.AT)[e * p.A_sd + n * p.A_sn] : 0.f;
  const float AL = active ? static_cast<const float*>(p.AL)[e * p.AL_sd + n * p.AL_sn] : 0.f;
  const float AT2 = AT * kLog2e, AL2 = AL * kLog2e;
  const float Dd = (p.D && z == 0) ? static_cast<const float*>(p.D)[e] : 0.f;
  const int64_t nseg = (H + kCheckpoint - 1) / kCheckpoint;
  // Scratch: per-cell partials of chunks z >= 1 (du, ddT, ddL), then per (b, e, n) the checkpoint
  // rows (slot s = h of row s*K - 1) and one segment.
  const int64_t cells = p.batch * p.dim * H * W, zs = (p.dstate + NW - 1) / NW - 1;
  float* part = ga.workspace;  // 3 * zs * cells
  float* ck = ga.workspace + 3 * zs * cells + ((b * p.dim + e) * p.dstate + min(n, p.dstate - 1)) *
                                                   (nseg + kCheckpoint) * W;
  float* seg = ck + nseg * W;

  auto stage_forward_inputs = [&](int64_t i) {
    stage_row<T>(u, dT, dL, i, W, s_u, s_dT, s_dL);
    stage_states<T>(p.BT, b, g, n0, lg, count, i, W, Wp, s_BT);
    stage_states<T>(p.BL, b, g, n0, lg, count, i, W, Wp, s_BL);
    __syncthreads();
  };

  // 1. Forward sweep keeping only the checkpoint rows.
  float hrow[S];
#pragma unroll
  for (int k = 0; k < S; ++k) hrow[k] = 0.f;
  for (int64_t i = 0; i + 1 < H; ++i) {  // the last row is never a checkpoint
    stage_forward_inputs(i);
    if (active) forward_row<S>(i, W, p.origin_top, lane, AT2, AL2, w_BT, w_BL, s_u, s_dT, s_dL, hrow);
    if (active && (i + 1) % kCheckpoint == 0)
#pragma unroll
      for (int k = 0; k < S; ++k) {
        const int64_t j = static_cast<int64_t>(lane) * S + k;
        if (j < W) ck[((i + 1) / kCheckpoint) * W + j] = hrow[k];
      }
    __syncthreads();
  }

  float down[S];  // (cT aT lam) of the row below, per column
#pragma unroll
  for (int k = 0; k < S; ++k) down[k] = 0.f;
  float dAT_acc = 0.f, dAL_acc = 0.f, dD_acc = 0.f;

  for (int64_t sgi = nseg - 1; sgi >= 0; --sgi) {
    const int64_t r0 = sgi * kCheckpoint, r1 = min(H, r0 + kCheckpoint);
    // 2. Recompute the segment's rows from its checkpoint.
#pragma unroll
    for (int k = 0; k < S; ++k) {
      const int64_t j = static_cast<int64_t>(lane) * S + k;
      hrow[k] = (sgi > 0 && j < W) ? ck[sgi * W + j] : 0.f;
    }
    for (int64_t i = r0; i < r1; ++i) {
      stage_forward_inputs(i);
      if (active) {
        forward_row<S>(i, W, p.origin_top, lane, AT2, AL2, w_BT, w_BL, s_u, s_dT, s_dL, hrow);
#pragma unroll
        for (int k = 0; k < S; ++k) {
          const int64_t j = static_cast<int64_t>(lane) * S + k;
          if (j < W) seg[(i - r0) * W + j] = hrow[k];
        }
      }
      __syncthreads();
    }
    // 3. The adjoint, bottom-up through the segment.
    for (int64_t i = r1 - 1; i >= r0; --i) {
      for (int j0 = threadIdx.x; j0 < W; j0 += kBatch * blockDim.x) {
        float v[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k)
          if (j0 + k * static_cast<int>(blockDim.x) < W) v[k] = ld<T>(dout.at<T>(i, j0 + k * blockDim.x));
#pragma unroll
        for (int k = 0; k < kBatch; ++k)
          if (j0 + k * static_cast<int>(blockDim.x) < W) s_dy[padded(j0 + k * blockDim.x)] = v[k];
      }
      stage_row<T>(u, dT, dL, i, W, s_u, s_dT, s_dL);
      stage_states<T>(p.BT, b, g, n0, lg, count, i, W, Wp, s_BT);
      stage_states<T>(p.BL, b, g, n0, lg, count, i, W, Wp, s_BL);
      stage_states<T>(p.C, b, g, n0, lg, count, i, W, Wp, s_C);
      __syncthreads();
      if (i > 0) {
        if (warp == 0) prefetch_row<T>(dout, i - 1, W);
        if (warp == 1 % NW) prefetch_row<T>(u, i - 1, W);
      }
      if (active) {
      const float* hcur = seg + (i - r0) * W;
      const float* hup = i == r0 ? (sgi > 0 ? ck + sgi * W : nullptr) : seg + (i - 1 - r0) * W;
      // Reverse recurrence along the row: lam_j = beta_j + c_j lam_{j+1}, c_j = (cL aL) at j + 1.
      float coef[S], beta[S];
      float gL0 = 0.f;  // (cL aL) of this lane's first column, passed to the lane on the left
#pragma unroll
      for (int k = 0; k < S; ++k) {
        const int64_t j = static_cast<int64_t>(lane) * S + k;
        float gL = 0.f;
        beta[k] = 0.f;
        if (j < W) {
          const int pj = padded(j);
          float cL, cT;
          coefficients(i, j, p.origin_top, cL, cT);
          gL = cL * fast_exp2(s_dL[pj] * AL2);
          beta[k] = fmaf(s_dy[pj], w_C[pj], down[k]);
        }
        if (k == 0) gL0 = gL;
        else coef[k - 1] = gL;
      }
      coef[S - 1] = __shfl_down_sync(0xffffffffu, gL0, 1);
      if (lane == 31) coef[S - 1] = 0.f;
      float A = 1.f, B = 0.f;  // lam at this lane's first column = A * lam_right + B
#pragma unroll
      for (int k = S - 1; k >= 0; --k) {
        B = fmaf(coef[k], B, beta[k]);
        A *= coef[k];
      }
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float An = __shfl_down_sync(0xffffffffu, A, off), Bn = __shfl_down_sync(0xffffffffu, B, off);
        if (lane + off < 32) {
          B = fmaf(A, Bn, B);
          A *= An;
        }
      }
      float lam = __shfl_down_sync(0xffffffffu, B, 1);
      if (lane == 31) lam = 0.f;
      const int64_t last = static_cast<int64_t>(lane) * S + S - 1;
      float hleft = __shfl_up_sync(0xffffffffu, last < W ? hcur[last] : 0.f, 1);  // h[i, lane*S - 1]
      if (lane == 0) hleft = 0.f;
#pragma unroll
      for (int k = S - 1; k >= 0; --k) {
        lam = fmaf(coef[k], lam, beta[k]);
        const int64_t j = static_cast<int64_t>(lane) * S + k;
        if (j >= W) {
          down[k] = 0.f;
          continue;
        }
        const int pj = padded(j);
        float cL, cT;
        coefficients(i, j, p.origin_top, cL, cT);
        const float uu = s_u[pj], t = s_dT[pj], l = s_dL[pj], dy = s_dy[pj];
        const float h = hcur[j];
        const float hl = k > 0 ? hcur[j - 1] : hleft;
        const float ht = hup ? hup[j] : 0.f;
        const float aT = fast_exp2(t * AT2), aL = fast_exp2(l * AL2);
        const float bt = w_BT[pj], bl = w_BL[pj];
        const float wL = cL * lam, wT = cT * lam;
        const float qL = wL * aL * hl, qT = wT * aT * ht;  // a * dL/da
        dAL_acc = fmaf(qL, l, dAL_acc);
        dAT_acc = fmaf(qT, t, dAT_acc);
        down[k] = aT * wT;
        if (ga.dBL.defined()) {
          float* dst = fplane(ga.dBL, b, bc_c, n, i, j);
          if (kDeterministic) *dst = wL * l * uu; else atomicAdd(dst, wL * l * uu);
        }
        if (ga.dBT.defined()) {
          float* dst = fplane(ga.dBT, b, bc_c, n, i, j);
          if (kDeterministic) *dst = wT * t * uu; else atomicAdd(dst, wT * t * uu);
        }
        if (ga.dC.defined()) {
          float* dst = fplane(ga.dC, b, bc_c, n, i, j);
          if (kDeterministic) *dst = dy * h; else atomicAdd(dst, dy * h);
        }
        // Per-cell contributions replace this warp's staged inputs, which are no longer needed.
        w_BT[pj] = fmaf(wL * bl, l, wT * bt * t);   // du
        w_BL[pj] = fmaf(qT, AT, wT * bt * uu);      // ddT
        w_C[pj] = fmaf(qL, AL, wL * bl * uu);       // ddL
      }
      }
      if (warp == 0 && z == 0 && p.D)
        for (int64_t j = lane; j < W; j += 32) dD_acc = fmaf(s_dy[padded(j)], s_u[padded(j)], dD_acc);
      __syncthreads();
      // Sums over the states (warps in index order); D * dy goes with the first state chunk's D.
      for (int64_t j = threadIdx.x; j < W; j += blockDim.x) {
        const int pj = padded(j);
        float du = Dd * s_dy[pj], ddt = 0.f, ddl = 0.f;
        for (int w = 0; w < count; ++w) {
          du += s_BT[w * Wp + pj];
          ddt += s_BL[w * Wp + pj];
          ddl += s_C[w * Wp + pj];
        }
        if (ga.du.defined()) *cell_out(ga.du, part, z, b, e, i, j, p) += du;
        if (ga.ddT.defined()) *cell_out(ga.ddT, part + zs * cells, z, b, e, i, j, p) += ddt;
        if (ga.ddL.defined()) *cell_out(ga.ddL, part + 2 * zs * cells, z, b, e, i, j, p) += ddl;
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    dAT_acc += __shfl_xor_sync(0xffffffffu, dAT_acc, off);
    dAL_acc += __shfl_xor_sync(0xffffffffu, dAL_acc, off);
    dD_acc += __shfl_xor_sync(0xffffffffu, dD_acc, off);
  }
  if (lane == 0 && active) {
    if (ga.dAT_part) static_cast<float*>(ga.dAT_part)[(b * p.dim + e) * p.dstate + n] = dAT_acc;
    if (ga.dAL_part) static_cast<float*>(ga.dAL_part)[(b * p.dim + e) * p.dstate + n] = dAL_acc;
    if (warp == 0 && z == 0 && p.D && ga.dD_part) static_cast<float*>(ga.dD_part)[b * p.dim + e] = dD_acc;
  }
}

constexpr int64_t kMaxGridY = 65535;

// Sums over the 16 lanes of a half-warp for 4 columns at once: v[k] is this lane's value at column k;
// returns the total of column n >> 2 (n = lane % 16; the 4 lanes n, n^1, n^2, n^3 get the same).
// 5 shuffles for 4 columns instead of 16: the first two steps exchange halves of the columns.
__device__ __forceinline__ float half_warp_sum4(const float (&v)[4], int n) {
  const bool hi8 = n & 8, hi4 = n & 4;
  float k0 = hi8 ? v[2] : v[0], k1 = hi8 ? v[3] : v[1];
  k0 += __shfl_xor_sync(0xffffffffu, hi8 ? v[0] : v[2], 8);
  k1 += __shfl_xor_sync(0xffffffffu, hi8 ? v[1] : v[3], 8);
  float k = hi4 ? k1 : k0;
  k += __shfl_xor_sync(0xffffffffu, hi4 ? k0 : k1, 4);
  k += __shfl_xor_sync(0xffffffffu, k, 2);
  k += __shfl_xor_sync(0xffffffffu, k, 1);
  return k;
}

// Asks L1 for a line this thread will read-modify-write at the end of the row step.
__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Asks L2 for row i of a lane block's staged inputs (u, dT, dL of channels e0.., BT, BL of group g,
// and C and `dout` when given), so the double-buffered staging of that row waits on L2 rather than
// on memory. One thread per column asks (threads with tid % 16 == 0 of each PER slice): a column's
// 16 channels / states lie in one line in the channels-last layout (a hint only; other layouts stay
// correct).
template <typename T, int PER, int kThreads>
__device__ __forceinline__ void prefetch_row_l2(const Wave2dProblem& p, const Grid* dout, bool with_c, int64_t b,
                                                int64_t e0, int64_t g, int64_t i, int64_t jb, int64_t W) {
  auto at = [&](const Grid& a, int64_t c, int64_t j) {
    return static_cast<const T*>(a.data) + b * a.sb + c * a.sc + i * a.si + j * a.sj;
  };
#pragma unroll
  for (int r = 0; r < PER; ++r) {
    const int x = threadIdx.x + r * kThreads, j = x >> 4;
    if ((x & 15) != 0 || j >= W) continue;
    const int64_t jg = jb + j;
    prefetch_l2(at(p.u, e0, jg));
    prefetch_l2(at(p.dT, e0, jg));
    prefetch_l2(at(p.dL, e0, jg));
    prefetch_l2(at(p.BT, g, jg));
    prefetch_l2(at(p.BL, g, jg));
    if (with_c) prefetch_l2(at(p.C, g, jg));
    if (dout) prefetch_l2(at(*dout, e0, jg));
  }
}

// ---- Short rows (W <= 64, N <= 16): the model shapes (M2D stages 1-2 are 56x56 and 28x28). ----
// The general kernel above spends its time on per-row block phases that a 56-wide row cannot fill.
// Here a half-warp runs one (batch, channel) and a lane one state, walking the grid in raster order
// with its whole previous row in registers: no shuffle scan, no reduction over warps, one barrier
// per row. A block of 256 threads takes 16 channels of one batch item, so it stages each row of
// u, dT, dL (16 adjacent channels: coalesced in the channels-last layout) and of BT, BL, C (shared
// by all 16 channels, which must lie in one group) once, double-buffered: row i+1 is loaded into
// registers while row i is scanned. y = sum_n C h is reduced over the half-warp, 4 columns at once.
//
// Column strips. The same kernel runs rows longer than 64 cells, or batches with too few blocks to
// fill the GPU, as strips of WMAX columns pipelined across blocks: the block of strip k runs row i
// once the block of strip k-1 has published h at its last column for row i (a flag per strip, the
// carries in the workspace), so strip k trails strip k-1 by about one row: H + strips row steps in
// all. Blocks take their strip from a ticket counter in strip order, so a block only ever waits on
// blocks that started before it (no deadlock, however many blocks are resident). With `out`
// undefined the kernel only publishes the strips' carries (the strip backward's first pass).
constexpr int kSmallChannels = 16;
constexpr int kSmallThreads = 256;
constexpr int kSmallArrays = 8;  // dT, dL, dT*u, dL*u, D*u (per channel); BT, BL, C (per state)

__host__ __device__ __forceinline__ int small_pitch(int wmax) { return wmax + 4; }  // 16-byte rows, banks shifted

// Rows per segment K: the scratch holds ceil(H/K) checkpoint rows plus K segment rows, least near
// K = sqrt(H); the recompute work does not depend on K. 8 up to 128 rows (the layer shapes), then
// the power of two with 2 K^2 >= H (16 at 256 and 512 rows, 32 at 1024, 64 at 4096).
__host__ __device__ __forceinline__ int segment_rows(int64_t H) {
  int k = 8;
  while (k < 256 && 2 * static_cast<int64_t>(k) * k < H) k *= 2;
  return k;
}


// Rows a backward block's scratch holds: ceil(H/K) checkpoint slots (slot s: h of row s*K - 1) and K
// segment rows.
__host__ __device__ __forceinline__ int64_t small_bwd_rows(int64_t H) {
  const int k = segment_rows(H);
  return (H + k - 1) / k + k;
}

// The strips of one forward call and their synchronisation (strips == 1: whole rows, none).
struct StripSync {
  int64_t strips = 1;
  unsigned* flags = nullptr;  // [0]: ticket counter; [1 + item*strips + k]: rows strip k has published
  float* carry = nullptr;     // [item][strip < strips-1][row][256 lanes]: h at the strip's last column
  int publish = 1;            // rows between publications (a fence and a flag store)
  int lookahead = 0;          // rows ahead whose inputs are asked into L2 (0: none)
  // Channels [e_begin, e_end) (e_end < 0: to E). Blocks, flags and carries count the range's
  // 16-channel blocks from its start: the backward's recompute of one chunk of channels.
  int64_t e_begin = 0, e_end = -1;
  // The strip backward's recompute pass: its blocks' scratch (float4 [item][strip][small_bwd_rows(H)]
  // [WMAX/4][256 lanes]), where the pass leaves the checkpoints the backward would otherwise sweep
  // for; null in a forward.
  float* checkpoints = nullptr;
};


// kRecompute: the strip backward's recompute pass (a channel range, checkpoints; no output). A
// template flag so that the forward's own instances carry none of it (registers, branches).
template <typename T, int WMAX, bool kRecompute>
__global__ void __launch_bounds__(kSmallThreads, 2)
    wave_fwd_small_kernel(Wave2dProblem p, Grid out, int64_t b0, StripSync ss, bool out_in_dtype) {
  constexpr int WP = WMAX + 4, ROWS = kSmallChannels * WP, BUF = kSmallArrays * ROWS;
  constexpr int PER = (kSmallChannels * WMAX + kSmallThreads - 1) / kSmallThreads;  // staged values per thread
  extern __shared__ __align__(16) float smem[];
  float* s_y = smem + 2 * BUF;  // [2][channel][column]
  const int tid = threadIdx.x, lane = tid & 31, n = lane & 15, c = tid >> 4;
  const int64_t e_begin = kRecompute ? ss.e_begin : 0;
  const int64_t H = p.height, E = kRecompute && ss.e_end >= 0 ? ss.e_end : p.dim, N = p.dstate;  // E: the range's end
  const int64_t nEb = (E - e_begin + kSmallChannels - 1) / kSmallChannels;
  int64_t eb = blockIdx.x, b = blockIdx.y + b0, strip = 0;
  if (ss.strips > 1) {  // strip-major tickets: every block of strip k starts after those of strip k-1
    __shared__ unsigned s_ticket;
    if (tid == 0) s_ticket = atomicAdd(ss.flags, 1u);
    __syncthreads();
    const int64_t t = s_ticket, items = p.batch * nEb;
    strip = t / items;
    b = (t % items) / nEb;
    eb = t % nEb;
  }
  const int64_t item = b * nEb + eb, jb = strip * WMAX;  // jb: the strip's first column
  const int64_t W = min(static_cast<int64_t>(WMAX), p.width - jb);  // columns of this strip
  const int64_t e0 = e_begin + eb * kSmallChannels;
  const bool has_left = strip > 0, has_right = strip + 1 < ss.strips;
  const unsigned* flag_left = has_left ? ss.flags + 1 + item * ss.strips + strip - 1 : nullptr;
  unsigned* flag_self = ss.flags + 1 + item * ss.strips + strip;
  const float* carry_left = has_left ? ss.carry + ((item * (ss.strips - 1) + strip - 1) * H) * kSmallThreads + tid
                                     : nullptr;
  float* carry_self = has_right ? ss.carry + ((item * (ss.strips - 1) + strip) * H) * kSmallThreads + tid : nullptr;
  const int64_t e = e0 + c;
  const bool has_e = e < E, active = has_e && n < N;
  const int64_t g = e0 / (p.dim / p.groups);
  const float AT2 = active ? static_cast<const float*>(p.AT)[e * p.A_sd + n * p.A_sn] * kLog2e : 0.f;
  const float AL2 = active ? static_cast<const float*>(p.AL)[e * p.AL_sd + n * p.AL_sn] * kLog2e : 0.f;

  // Staging: thread t handles (column j, index k) pairs x = t + r*256 with k = x % 16 (a channel for
  // u/dT/dL, a state for BT/BL/C) and j = x / 16, so 16 adjacent channels / states are read together.
  // Out-of-range pairs read element 0 of their array and are zeroed at the store (see to_f).
  T r_u[PER], r_t[PER], r_l[PER], r_bt[PER], r_bl[PER], r_c[PER];
  // With one staged pair per thread (strips of at most 16 columns: the B = 1 grids), the row-invariant
  // part of each address is computed once here and a row adds i * si to it (the generic form below
  // redoes the whole 64-bit sum on every row: ~60 64-bit multiplies per row step in the PTX). A masked
  // pair keeps pointing at element 0 (its row index is 0).
  const int k1 = tid & 15, j1 = tid >> 4;
  const bool okc1 = PER == 1 && j1 < W && e0 + k1 < E, oks1 = PER == 1 && j1 < W && k1 < N;
  const int64_t jg1 = jb + j1, ek1 = e0 + k1;
  const T* const pu1 = static_cast<const T*>(p.u.data) + (okc1 ? b * p.u.sb + ek1 * p.u.sc + jg1 * p.u.sj : 0);
  const T* const pt1 = static_cast<const T*>(p.dT.data) + (okc1 ? b * p.dT.sb + ek1 * p.dT.sc + jg1 * p.dT.sj : 0);
  const T* const pl1 = static_cast<const T*>(p.dL.data) + (okc1 ? b * p.dL.sb + ek1 * p.dL.sc + jg1 * p.dL.sj : 0);
  const T* const pbt1 = static_cast<const T*>(p.BT.data) + (oks1 ? b * p.BT.sb + g * p.BT.sc + k1 * p.BT.sn + jg1 * p.BT.sj : 0);
  const T* const pbl1 = static_cast<const T*>(p.BL.data) + (oks1 ? b * p.BL.sb + g * p.BL.sc + k1 * p.BL.sn + jg1 * p.BL.sj : 0);
  const T* const pc1 = static_cast<const T*>(p.C.data) + (oks1 ? b * p.C.sb + g * p.C.sc + k1 * p.C.sn + jg1 * p.C.sj : 0);
  const int64_t po1 = out.defined() && okc1 ? b * out.sb + ek1 * out.sc + jg1 * out.sj : 0;  // out's element
  auto load_row = [&](int64_t i) {
    if constexpr (PER == 1) {
      const int64_t ic = okc1 ? i : 0, is = oks1 ? i : 0;
      r_u[0] = pu1[ic * p.u.si];
      r_t[0] = pt1[ic * p.dT.si];
      r_l[0] = pl1[ic * p.dL.si];
      r_bt[0] = pbt1[is * p.BT.si];
      r_bl[0] = pbl1[is * p.BL.si];
      r_c[0] = pc1[is * p.C.si];
    } else {
#pragma unroll
      for (int r = 0; r < PER; ++r) {
        const int x = tid + r * kSmallThreads, k = x & 15, j = x >> 4;
        const int64_t ek = e0 + k;
        const bool okc = j < W && ek < E, oks = j < W && k < N;
        const int64_t jg = jb + j;
        r_u[r] = static_cast<const T*>(p.u.data)[okc ? b * p.u.sb + ek * p.u.sc + i * p.u.si + jg * p.u.sj : 0];
        r_t[r] = static_cast<const T*>(p.dT.data)[okc ? b * p.dT.sb + ek * p.dT.sc + i * p.dT.si + jg * p.dT.sj : 0];
        r_l[r] = static_cast<const T*>(p.dL.data)[okc ? b * p.dL.sb + ek * p.dL.sc + i * p.dL.si + jg * p.dL.sj : 0];
        r_bt[r] = static_cast<const T*>(p.BT.data)[oks ? b * p.BT.sb + g * p.BT.sc + k * p.BT.sn + i * p.BT.si + jg * p.BT.sj : 0];
        r_bl[r] = static_cast<const T*>(p.BL.data)[oks ? b * p.BL.sb + g * p.BL.sc + k * p.BL.sn + i * p.BL.si + jg * p.BL.sj : 0];
        r_c[r] = static_cast<const T*>(p.C.data)[oks ? b * p.C.sb + g * p.C.sc + k * p.C.sn + i * p.C.si + jg * p.C.sj : 0];
      }
    }
  };
  // A thread stages the same channel (tid % 16) in every row: its D is read once.
  const float Dk = (p.D && e0 + (tid & 15) < E) ? static_cast<const float*>(p.D)[e0 + (tid & 15)] : 0.f;
  auto store_row = [&](float* buf) {
#pragma unroll
    for (int r = 0; r < PER; ++r) {
      const int x = tid + r * kSmallThreads, k = x & 15, j = x >> 4;
      if (j >= WMAX) continue;
      const bool okc = j < W && e0 + k < E, oks = j < W && k < N;
      const float u = okc ? to_f(r_u[r]) : 0.f, t = okc ? to_f(r_t[r]) : 0.f, l = okc ? to_f(r_l[r]) : 0.f;
      const int at = k * WP + j;
      buf[0 * ROWS + at] = t;
      buf[1 * ROWS + at] = l;
      buf[2 * ROWS + at] = t * u;
      buf[3 * ROWS + at] = l * u;
      buf[4 * ROWS + at] = Dk * u;
      buf[5 * ROWS + at] = oks ? to_f(r_bt[r]) : 0.f;
      buf[6 * ROWS + at] = oks ? to_f(r_bl[r]) : 0.f;
      buf[7 * ROWS + at] = oks ? to_f(r_c[r]) : 0.f;
    }
  };

  auto prefetch_inputs = [&](int64_t i) {
    if constexpr (PER == 1) {  // the lanes of channel / state 0 ask for their column's lines
      if (k1 == 0 && okc1) {
        prefetch_l2(pu1 + i * p.u.si);
        prefetch_l2(pt1 + i * p.dT.si);
        prefetch_l2(pl1 + i * p.dL.si);
        prefetch_l2(pbt1 + i * p.BT.si);
        prefetch_l2(pbl1 + i * p.BL.si);
        prefetch_l2(pc1 + i * p.C.si);
      }
    } else {
      prefetch_row_l2<T, PER, kSmallThreads>(p, nullptr, true, b, e0, g, i, jb, W);
    }
  };

  const int K = segment_rows(H), lgK = __ffs(K) - 1;
  const int64_t W4 = (W + 3) / 4;
  float hrow[WMAX];
#pragma unroll
  for (int j = 0; j < WMAX; ++j) hrow[j] = 0.f;
  for (int64_t i = 1; i < min(H, static_cast<int64_t>(ss.lookahead)); ++i) prefetch_inputs(i);
  load_row(0);
  store_row(smem);
  __syncthreads();
  unsigned avail = 0;        // rows of the left strip known to be published
  bool next_ready = false;   // hl_next holds the next row's carry
  float hl_next = 0.f;
  for (int64_t i = 0; i < H; ++i) {
    const float* buf = smem + (i & 1) * BUF;
    float* ybuf = s_y + (i & 1) * ROWS;
    if (i + 1 < H) load_row(i + 1);
    // Border rule of SCANS.md: first row left only, first column top only, else the average.
    const float cLr = i == 0 ? 1.f : 0.5f, cTr = i == 0 ? 0.f : 0.5f;
    const bool origin_top = i == 0 && p.origin_top;
    float o_prev[PER];  // out's row i (a float32 accumulator), read now and added to after the row
    if constexpr (PER == 1) {
      if (out.defined() && !out_in_dtype) o_prev[0] = static_cast<const float*>(out.data)[po1 + (okc1 ? i * out.si : 0)];
    } else if (out.defined() && !out_in_dtype) {
#pragma unroll
      for (int r = 0; r < PER; ++r) {
        const int x = tid + r * kSmallThreads, k = x & 15, j = x >> 4;
        const bool ok = j < W && e0 + k < E;
        o_prev[r] = *(ok ? fplane(out, b, e0 + k, 0, i, jb + j) : static_cast<const float*>(out.data));
      }
    }
    if (ss.lookahead > 0 && i + ss.lookahead < H) prefetch_inputs(i + ss.lookahead);
    float hl = 0.f;  // h left of the strip's first column
    if (has_left) {
      if (next_ready) {
        hl = hl_next;
      } else {
        for (int64_t spin = 0; avail <= static_cast<unsigned>(i); ++spin) {
          if (spin > 0) __nanosleep(32);
          if (spin > (int64_t{1} << 32)) __trap();  // a lost predecessor: fail, never hang
          avail = ld_acquire(flag_left);
        }
        hl = __ldcg(carry_left + i * kSmallThreads);
      }
      // The next row's carry, when already published, is read now: its latency hides behind this row.
      next_ready = i + 1 < static_cast<int64_t>(avail);
      if (next_ready) hl_next = __ldcg(carry_left + (i + 1) * kSmallThreads);
    }
#pragma unroll
    for (int j0 = 0; j0 < WMAX; j0 += 4) {
      float t[4], l[4], tu[4], lu[4], bt[4], bl[4], cc[4], yv[4];
      *reinterpret_cast<float4*>(t) = *reinterpret_cast<const float4*>(buf + 0 * ROWS + c * WP + j0);
      *reinterpret_cast<float4*>(l) = *reinterpret_cast<const float4*>(buf + 1 * ROWS + c * WP + j0);
      *reinterpret_cast<float4*>(tu) = *reinterpret_cast<const float4*>(buf + 2 * ROWS + c * WP + j0);
      *reinterpret_cast<float4*>(lu) = *reinterpret_cast<const float4*>(buf + 3 * ROWS + c * WP + j0);
      *reinterpret_cast<float4*>(bt) = *reinterpret_cast<const float4*>(buf + 5 * ROWS + n * WP + j0);
      *reinterpret_cast<float4*>(bl) = *reinterpret_cast<const float4*>(buf + 6 * ROWS + n * WP + j0);
      *reinterpret_cast<float4*>(cc) = *reinterpret_cast<const float4*>(buf + 7 * ROWS + n * WP + j0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int j = j0 + k;
        float cL = cLr, cT = cTr;
        if (j == 0 && !has_left) {
          cL = origin_top ? 0.f : (i == 0 ? 1.f : 0.f);
          cT = origin_top ? 1.f : (i == 0 ? 0.f : 1.f);
        }
        const float aL = fast_exp2(l[k] * AL2), aT = fast_exp2(t[k] * AT2);
        const float h = cL * fmaf(aL, hl, lu[k] * bl[k]) + cT * fmaf(aT, hrow[j], tu[k] * bt[k]);
        hrow[j] = h;
        hl = h;
        yv[k] = active ? cc[k] * h : 0.f;
      }
      const float y = half_warp_sum4(yv, n);
      if ((n & 3) == 0) {
        const int j = j0 + (n >> 2);
        ybuf[c * WP + j] = y + buf[4 * ROWS + c * WP + j];
      }
    }
    // h at the strip's last column, for the strip on the right; made visible every `publish` rows:
    // the fence waits for this thread's outstanding stores, so it is paid once per batch of rows.
    // h of every K-th row, for the backward that runs next (slot (i + 1) / K, as its own sweep would).
    if (kRecompute && ((i + 1) & (K - 1)) == 0 && i + 1 < H) {
      float4* slot = reinterpret_cast<float4*>(ss.checkpoints) +
                     ((item * ss.strips + strip) * small_bwd_rows(H) * (WMAX / 4) + ((i + 1) >> lgK) * W4) *
                         kSmallThreads + tid;
#pragma unroll
      for (int g4 = 0; g4 < WMAX / 4; ++g4)
        if (4 * g4 < W) slot[g4 * kSmallThreads] = make_float4(hrow[4 * g4], hrow[4 * g4 + 1], hrow[4 * g4 + 2], hrow[4 * g4 + 3]);
    }
    const bool publish = has_right && ((i + 1) % ss.publish == 0 || i + 1 == H);
    if (has_right) {
      carry_self[i * kSmallThreads] = hrow[WMAX - 1];
      if (publish) __threadfence();
    }
    if (i + 1 < H) store_row(smem + ((i + 1) & 1) * BUF);
    __syncthreads();
    if (publish && tid == 0) st_release(flag_self, static_cast<unsigned>(i + 1));
    // y of row i into out (in T: written; in float32: added), 16 adjacent channels per column together.
    if constexpr (PER == 1) {
      if (out.defined() && okc1) {
        const int64_t o = po1 + i * out.si;
        const float y = ybuf[k1 * WP + j1];
        if (out_in_dtype) static_cast<T*>(out.data)[o] = from_f<T>(y);
        else static_cast<float*>(out.data)[o] = o_prev[0] + y;
      }
    } else {
#pragma unroll
      for (int r = 0; r < PER; ++r) {
        const int x = tid + r * kSmallThreads, k = x & 15, j = x >> 4;
        const int64_t ek = e0 + k;
        if (!out.defined() || j >= W || ek >= E) continue;
        if (out_in_dtype)
          static_cast<T*>(out.data)[b * out.sb + ek * out.sc + i * out.si + (jb + j) * out.sj] = from_f<T>(ybuf[k * WP + j]);
        else
          *fplane(out, b, ek, 0, i, jb + j) = o_prev[r] + ybuf[k * WP + j];
      }
    }
  }
}

// ---- Short rows, backward: the adjoint with the forward's lanes (a half-warp per channel, a lane
// per state, 16 channels per block), walking the grid bottom-up, each row right to left. ----
// h is recomputed in segments of K = segment_rows(H) rows: a first sweep keeps h of every segment's last
// row (checkpoints), then per segment (bottom segment first) its rows are recomputed into scratch
// and the adjoint walks them upwards. The adjoint's coupling to the row below (cT aT lam per column)
// and the recomputed row stay in registers. Per cell, the sums over states (du, ddT, ddL) are
// xor-shuffles within the half-warp; the sums over the block's 16 channels (dBT, dBL, dC) go
// through shared memory, one global atomic (or, deterministic, one store of the block's partial)
// per (cell, state) and block. Two barriers per row.
// Scratch per block: float4 [ceil(H/K) checkpoint slots + K segment rows][ceil(W/4)][256 lanes],
// i.e. batch * ceil(E/16) * 256 * (ceil(H/K) + K) * 4 ceil(W/4) floats (N/16 * 256/N of that is
// padding for N < 16): about (ceil(H/K) + K) / H times the (batch, H, W, E, 16) state, 2 / sqrt(H)
// at most (8 / 56 at the 56x56 layer shape, 64 / 1024 at 1024x1024).
//
// Column strips (rows longer than 64 cells, or too few blocks): the same kernel runs a strip of
// WMAX columns per block, pipelined from the right. The adjoint couples a strip to its right
// neighbour only through lam's left-going term (cL aL lam at the neighbour's first column, one value
// per lane and row), which the right strip publishes row by row, bottom-up, with a flag; the left
// strip reads it before its row. Blocks take tickets right strip first, so a block only ever waits
// on a block that started before it. The recompute of h needs h left of the strip on every row: a
// first launch runs the forward's strip pipeline without output and leaves those carries in the
// workspace, and the blocks' checkpoints in their scratch (so the adjoint launch does not sweep the
// grid for them again). dAT, dAL, dD are summed per strip and reduced over the strips in a fixed
// order.
//
// The strips of one backward call (flags null: whole rows, launched per batch; none of these).
// Items count the call's (batch, 16-channel block) pairs from its first channel.
struct StripBwd {
  int64_t strips = 1;
  unsigned* flags = nullptr;      // [0]: ticket counter; [1 + item*strips + k]: rows strip k has published (bottom-up)
  const float* hcarry = nullptr;  // [item][strip < strips-1][row][256 lanes]: h at the strip's last column
  // cL aL lam at strip k+1's first column, written by strip k+1 over the h carry of the same row
  // and boundary (hcarry's storage): that block is the h carry's only reader and has read row i's
  // for the last time before it writes row i's lam.
  float* lcarry = nullptr;
  float* parts = nullptr;         // [item][strip][dAT, dAL, dD][256 lanes]
  float* scratch = nullptr;       // [item][strip]: the block's checkpoints and segment rows
  int publish = 1;                // rows between publications of lam's carries (and every segment's top)
  int lookahead = 0;              // rows ahead whose inputs are asked into L2 (0: none)
  bool checkpoints_ready = false; // the recompute pass left the checkpoints in scratch (StripSync)
};
constexpr int kSmallBwdArrays = 7;  // dT, dL, u, dy (per channel); BT, BL, C (per state)


template <int WMAX>
constexpr size_t small_bwd_smem_floats() {
  return 2 * kSmallBwdArrays * kSmallChannels * (WMAX + 4) + 3 * kSmallChannels * (WMAX + 4) +
         (kSmallThreads / 32) * 3 * WMAX * 16;
}

template <typename T, int WMAX, bool kDet>
__global__ void __launch_bounds__(kSmallThreads, WMAX <= 32 ? 2 : 1)
    wave_bwd_small_kernel(Wave2dProblem p, Wave2dBackwardArgs ga, int64_t b0, StripBwd sb) {
  constexpr int WP = WMAX + 4, ROWS = kSmallChannels * WP, BUF = kSmallBwdArrays * ROWS;
  constexpr int PER = (kSmallChannels * WMAX + kSmallThreads - 1) / kSmallThreads;
  constexpr int G4 = WMAX / 4, NWARP = kSmallThreads / 32;
  const int K = segment_rows(p.height), lgK = __ffs(K) - 1;  // a power of two: masks and shifts below
  extern __shared__ __align__(16) float smem[];
  float* s_dx = smem + 2 * BUF;       // [du, ddT, ddL][channel][column]: sums over states
  float* s_dB = s_dx + 3 * ROWS;      // [warp][dBT, dBL, dC][column][state]: sums over a warp's 2 channels
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n = lane & 15, c = tid >> 4;
  const int64_t E = p.dim, N = p.dstate, H = p.height;
  const int64_t nEb = (E + kSmallChannels - 1) / kSmallChannels;                       // forward items per batch
  const int64_t nEr = (ga.e_end - ga.e_begin + kSmallChannels - 1) / kSmallChannels;  // this call's
  const bool strip_mode = sb.flags != nullptr;  // launched by bwd_strip_launch (any number of strips)
  int64_t eb = blockIdx.x, b = blockIdx.y + b0, strip = 0;
  if (strip_mode) {  // tickets right strip first: the block of strip k starts after those of strip k+1
    __shared__ unsigned s_ticket;
    if (tid == 0) s_ticket = atomicAdd(sb.flags, 1u);
    __syncthreads();
    const int64_t t = s_ticket, items = p.batch * nEr;
    strip = sb.strips - 1 - t / items;
    b = (t % items) / nEr;
    eb = t % nEr;
  }
  const int64_t e0 = ga.e_begin + eb * kSmallChannels;
  const int64_t item = b * nEr + eb, item_f = b * nEb + e0 / kSmallChannels;
  const int64_t jb = strip * WMAX;  // the strip's first column
  const int64_t W = min(static_cast<int64_t>(WMAX), p.width - jb);
  const bool has_left = strip > 0, has_right = strip + 1 < sb.strips;
  const int64_t bounds = sb.strips - 1;
  const float* hcarry_left = has_left ? sb.hcarry + ((item * bounds + strip - 1) * H) * kSmallThreads + tid : nullptr;
  const float* lcarry_right = has_right ? sb.lcarry + ((item * bounds + strip) * H) * kSmallThreads + tid : nullptr;
  float* lcarry_self = has_left ? sb.lcarry + ((item * bounds + strip - 1) * H) * kSmallThreads + tid : nullptr;
  const unsigned* flag_right = has_right ? sb.flags + 1 + item * sb.strips + strip + 1 : nullptr;
  unsigned* flag_self = has_left ? sb.flags + 1 + item * sb.strips + strip : nullptr;
  const int64_t e = e0 + c, e_hi = ga.e_end;
  const bool has_e = e < e_hi, active = has_e && n < N;
  const int64_t g = e0 / (E / p.groups);
  const float AT = active ? static_cast<const float*>(p.AT)[e * p.A_sd + n * p.A_sn] : 0.f;
  const float AL = active ? static_cast<const float*>(p.AL)[e * p.AL_sd + n * p.AL_sn] : 0.f;
  const float AT2 = AT * kLog2e, AL2 = AL * kLog2e;
  const int64_t W4 = (W + 3) / 4, nck = (H + K - 1) / K;
  // A block's scratch: whole rows as before; a strip's block has room for WMAX columns.
  float4* ck = strip_mode
                   ? reinterpret_cast<float4*>(sb.scratch) +
                         (item * sb.strips + strip) * small_bwd_rows(H) * (WMAX / 4) * kSmallThreads
                   : reinterpret_cast<float4*>(ga.workspace) + item_f * small_bwd_rows(H) * W4 * kSmallThreads;
  float4* seg = ck + nck * W4 * kSmallThreads;
  auto row_of = [&](float4* base, int64_t r) { return base + r * W4 * kSmallThreads + tid; };
  // The write-out of a row gives a thread the same channel (tid % 16) in every row: D read once.
  const float Dk = (p.D && e0 + (tid & 15) < e_hi) ? static_cast<const float*>(p.D)[e0 + (tid & 15)] : 0.f;

  // Staging, as in the forward: thread t takes (column j, index k) pairs with k = x % 16 (a channel
  // or a state), so 16 adjacent channels / states are read together.
  // Loaded as stored, from element 0 for out-of-range pairs, masked at the store (see to_f).
  T r_t[PER], r_l[PER], r_u[PER], r_y[PER], r_bt[PER], r_bl[PER], r_c[PER];
  auto load_row = [&](int64_t i, bool adjoint) {
#pragma unroll
    for (int r = 0; r < PER; ++r) {
      const int x = tid + r * kSmallThreads, k = x & 15, j = x >> 4;
      const int64_t ek = e0 + k, jg = jb + j;
      const bool okc = j < W && ek < e_hi, oks = j < W && k < N;
      r_t[r] = static_cast<const T*>(p.dT.data)[okc ? b * p.dT.sb + ek * p.dT.sc + i * p.dT.si + jg * p.dT.sj : 0];
      r_l[r] = static_cast<const T*>(p.dL.data)[okc ? b * p.dL.sb + ek * p.dL.sc + i * p.dL.si + jg * p.dL.sj : 0];
      r_u[r] = static_cast<const T*>(p.u.data)[okc ? b * p.u.sb + ek * p.u.sc + i * p.u.si + jg * p.u.sj : 0];
      r_bt[r] = static_cast<const T*>(p.BT.data)[oks ? b * p.BT.sb + g * p.BT.sc + k * p.BT.sn + i * p.BT.si + jg * p.BT.sj : 0];
      r_bl[r] = static_cast<const T*>(p.BL.data)[oks ? b * p.BL.sb + g * p.BL.sc + k * p.BL.sn + i * p.BL.si + jg * p.BL.sj : 0];
      if (adjoint) {
        r_y[r] = static_cast<const T*>(ga.dout.data)[okc ? b * ga.dout.sb + ek * ga.dout.sc + i * ga.dout.si + jg * ga.dout.sj : 0];
        r_c[r] = static_cast<const T*>(p.C.data)[oks ? b * p.C.sb + g * p.C.sc + k * p.C.sn + i * p.C.si + jg * p.C.sj : 0];
      }
    }
  };
  auto store_row = [&](float* buf, bool adjoint) {
#pragma unroll
    for (int r = 0; r < PER; ++r) {
      const int x = tid + r * kSmallThreads, k = x & 15, j = x >> 4, at = k * WP + j;
      if (j >= WMAX) continue;  // 8-column strips: 256 threads cover 16 columns, the row has WMAX + 4
      const bool okc = j < W && e0 + k < e_hi, oks = j < W && k < N;
      buf[0 * ROWS + at] = okc ? to_f(r_t[r]) : 0.f;
      buf[1 * ROWS + at] = okc ? to_f(r_l[r]) : 0.f;
      buf[2 * ROWS + at] = okc ? to_f(r_u[r]) : 0.f;
      buf[4 * ROWS + at] = oks ? to_f(r_bt[r]) : 0.f;
      buf[5 * ROWS + at] = oks ? to_f(r_bl[r]) : 0.f;
      if (adjoint) {
        buf[3 * ROWS + at] = okc ? to_f(r_y[r]) : 0.f;
        buf[6 * ROWS + at] = oks ? to_f(r_c[r]) : 0.f;
      }
    }
  };
  auto prefetch_inputs = [&](int64_t i, bool adjoint) {
    prefetch_row_l2<T, PER, kSmallThreads>(p, adjoint ? &ga.dout : nullptr, adjoint, b, e0, g, i, jb, W);
  };

  // One forward row from the staged inputs: hrow holds row i-1 on entry and row i on return; the
  // row also goes to `hout` (one float4 per 4 columns) when given.
  float hrow[WMAX];
  auto forward_row = [&](int64_t i, const float* buf, float4* hout, float hl) {  // hl: h left of the strip
#pragma unroll
    for (int g4 = 0; g4 < G4; ++g4) {
      const int j0 = 4 * g4;
      float t[4], l[4], uu[4], bt[4], bl[4], hv[4];
      *reinterpret_cast<float4*>(t) = *reinterpret_cast<const float4*>(buf + 0 * ROWS + c * WP + j0);
      *reinterpret_cast<float4*>(l) = *reinterpret_cast<const float4*>(buf + 1 * ROWS + c * WP + j0);
      *reinterpret_cast<float4*>(uu) = *reinterpret_cast<const float4*>(buf + 2 * ROWS + c * WP + j0);
      *reinterpret_cast<float4*>(bt) = *reinterpret_cast<const float4*>(buf + 4 * ROWS + n * WP + j0);
      *reinterpret_cast<float4*>(bl) = *reinterpret_cast<const float4*>(buf + 5 * ROWS + n * WP + j0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float cL, cT;
        coefficients(i, jb + j0 + k, p.origin_top, cL, cT);
        const float aL = fast_exp2(l[k] * AL2), aT = fast_exp2(t[k] * AT2);
        const float h = cL * fmaf(aL, hl, l[k] * uu[k] * bl[k]) + cT * fmaf(aT, hrow[j0 + k], t[k] * uu[k] * bt[k]);
        hrow[j0 + k] = h;
        hl = h;
        hv[k] = h;
      }
      if (hout && j0 < W) hout[g4 * kSmallThreads] = make_float4(hv[0], hv[1], hv[2], hv[3]);
    }
  };
  // Sweeps rows [r0, r1) forward with the 1-barrier double-buffered staging; `out(i)` says where
  // row i goes (nullptr: nowhere). With `adjoint`, the rows' dout and C are asked into L2 too (the
  // segment's adjoint walk reads them next). h left of the strip is read a row ahead.
  auto sweep = [&](int64_t r0, int64_t r1, auto out, bool adjoint) {
    const int64_t la = sb.lookahead;
    for (int64_t i = r0 + 1; la > 0 && i < min(r1, r0 + la); ++i) prefetch_inputs(i, adjoint);
    load_row(r0, false);
    store_row(smem, false);
    float hl = has_left ? __ldcg(hcarry_left + r0 * kSmallThreads) : 0.f;
    __syncthreads();
    for (int64_t i = r0; i < r1; ++i) {
      const float* cur = smem + ((i - r0) & 1) * BUF;
      if (la > 0 && i + la < r1) prefetch_inputs(i + la, adjoint);
      if (i + 1 < r1) load_row(i + 1, false);
      const float hl_next = has_left && i + 1 < r1 ? __ldcg(hcarry_left + (i + 1) * kSmallThreads) : 0.f;
      forward_row(i, cur, out(i), hl);
      hl = hl_next;
      if (i + 1 < r1) store_row(smem + ((i + 1 - r0) & 1) * BUF, false);
      __syncthreads();
    }
  };

  // 1. Checkpoints: slot s holds h of row s*K - 1.
#pragma unroll
  for (int j = 0; j < WMAX; ++j) hrow[j] = 0.f;
  if (nck > 1 && !sb.checkpoints_ready)
    sweep(0, (nck - 1) * K, [&](int64_t i) { return ((i + 1) & (K - 1)) == 0 ? row_of(ck, (i + 1) >> lgK) : nullptr; },
          false);

  float down[WMAX];  // cT aT lam of the row below, per column
#pragma unroll
  for (int j = 0; j < WMAX; ++j) down[j] = 0.f;
  float dAT = 0.f, dAL = 0.f, dD = 0.f;
  const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);
  unsigned avail = 0;       // rows (from the bottom) the right strip is known to have published
  bool next_ready = false;  // lam_next holds the next row's carry from the right
  float lam_next = 0.f;

  for (int64_t s = nck - 1; s >= 0; --s) {
    const int64_t r0 = s * K, r1 = min(H, r0 + K);
    // 2. Recompute the segment's rows into scratch.
#pragma unroll
    for (int g4 = 0; g4 < G4; ++g4) {
      const float4 v = (s > 0 && 4 * g4 < W) ? *(row_of(ck, s) + g4 * kSmallThreads) : zero4;
      hrow[4 * g4] = v.x;
      hrow[4 * g4 + 1] = v.y;
      hrow[4 * g4 + 2] = v.z;
      hrow[4 * g4 + 3] = v.w;
    }
    sweep(r0, r1, [&](int64_t i) { return row_of(seg, i - r0); }, true);

    // 3. The adjoint, bottom-up through the segment.
    load_row(r1 - 1, true);
    store_row(smem, true);
    float hleft = has_left ? __ldcg(hcarry_left + (r1 - 1) * kSmallThreads) : 0.f;  // h left of the strip
    __syncthreads();
    for (int64_t i = r1 - 1; i >= r0; --i) {
      const float* cur = smem + ((r1 - 1 - i) & 1) * BUF;
      if (i > r0) load_row(i - 1, true);
      const float4* hc_row = row_of(seg, i - r0);
      const float4* hu_row = i > r0 ? row_of(seg, i - 1 - r0) : (s > 0 ? row_of(ck, s) : nullptr);
#pragma unroll
      for (int r = 0; r < PER && !ga.cells_in_dtype; ++r) {  // the accumulators' row i is read back after the row
        const int x = tid + r * kSmallThreads, k = x & 15, j = x >> 4;
        if (j < W && e0 + k < e_hi) {
          if (ga.du.defined()) prefetch_l1(fplane(ga.du, b, e0 + k, 0, i, jb + j));
          if (ga.ddT.defined()) prefetch_l1(fplane(ga.ddT, b, e0 + k, 0, i, jb + j));
          if (ga.ddL.defined()) prefetch_l1(fplane(ga.ddL, b, e0 + k, 0, i, jb + j));
        }
      }
      if (i - 2 >= r0)  // h of row i - 2, the next row's upper neighbour
        for (int64_t g4 = 0; g4 < W4; ++g4) prefetch_l1(row_of(seg, i - 2 - r0) + g4 * kSmallThreads);
      float lam = 0.f, coefR = 0.f;  // lam at the column to the right, and its (cL aL)
      if (has_right) {  // the right strip's cL aL lam at its first column, once it has run row i
        if (next_ready) {
          lam = lam_next;
        } else {
          for (int64_t spin = 0; avail < static_cast<unsigned>(H - i); ++spin) {
            if (spin > 0) __nanosleep(32);
            if (spin > (int64_t{1} << 32)) __trap();  // a lost neighbour: fail, never hang
            avail = ld_acquire(flag_right);
          }
          lam = __ldcg(lcarry_right + i * kSmallThreads);
        }
        // Row i - 1's carry, when already published, is read now: its latency hides behind this row.
        next_ready = i > r0 && static_cast<unsigned>(H - i + 1) <= avail;
        if (next_ready) lam_next = __ldcg(lcarry_right + (i - 1) * kSmallThreads);
        coefR = 1.f;
      }
      const float hleft_next = has_left && i > r0 ? __ldcg(hcarry_left + (i - 1) * kSmallThreads) : 0.f;
      float4 hnext = zero4;          // h of the group to the left
#pragma unroll
      for (int g4 = G4 - 1; g4 >= 0; --g4) {
        const int j0 = 4 * g4;
        if (j0 >= W) continue;
        const float4 hc4 = j0 + 4 >= W ? hc_row[g4 * kSmallThreads] : hnext;
        hnext = g4 > 0 ? hc_row[(g4 - 1) * kSmallThreads] : make_float4(0.f, 0.f, 0.f, hleft);
        const float4 hu4 = hu_row ? hu_row[g4 * kSmallThreads] : zero4;
        const float hc[4] = {hc4.x, hc4.y, hc4.z, hc4.w}, hu[4] = {hu4.x, hu4.y, hu4.z, hu4.w};
        float t[4], l[4], uu[4], dy[4], bt[4], bl[4], cc[4];
        *reinterpret_cast<float4*>(t) = *reinterpret_cast<const float4*>(cur + 0 * ROWS + c * WP + j0);
        *reinterpret_cast<float4*>(l) = *reinterpret_cast<const float4*>(cur + 1 * ROWS + c * WP + j0);
        *reinterpret_cast<float4*>(uu) = *reinterpret_cast<const float4*>(cur + 2 * ROWS + c * WP + j0);
        *reinterpret_cast<float4*>(dy) = *reinterpret_cast<const float4*>(cur + 3 * ROWS + c * WP + j0);
        *reinterpret_cast<float4*>(bt) = *reinterpret_cast<const float4*>(cur + 4 * ROWS + n * WP + j0);
        *reinterpret_cast<float4*>(bl) = *reinterpret_cast<const float4*>(cur + 5 * ROWS + n * WP + j0);
        *reinterpret_cast<float4*>(cc) = *reinterpret_cast<const float4*>(cur + 6 * ROWS + n * WP + j0);
        float du4[4], dt4[4], dl4[4];
#pragma unroll
        for (int k = 3; k >= 0; --k) {
          const int j = j0 + k;
          const bool valid = j < W;
          float cL, cT;
          coefficients(i, jb + j, p.origin_top, cL, cT);
          const float aL = fast_exp2(l[k] * AL2), aT = fast_exp2(t[k] * AT2);
          lam = valid ? fmaf(coefR, lam, fmaf(dy[k], cc[k], down[j])) : 0.f;
          coefR = valid ? cL * aL : 0.f;
          const float wL = cL * lam, wT = cT * lam;
          const float hl = k > 0 ? hc[k - 1] : hnext.w;
          const float qL = wL * aL * hl, qT = wT * aT * hu[k];  // a * dL/da
          dAL = fmaf(qL, l[k], dAL);
          dAT = fmaf(qT, t[k], dAT);
          down[j] = aT * wT;
          du4[k] = fmaf(wL * bl[k], l[k], wT * bt[k] * t[k]);
          dt4[k] = fmaf(qT, AT, wT * bt[k] * uu[k]);
          dl4[k] = fmaf(qL, AL, wL * bl[k] * uu[k]);
          float dbt = wT * t[k] * uu[k], dbl = wL * l[k] * uu[k], dc = dy[k] * hc[k];
          dbt += __shfl_xor_sync(0xffffffffu, dbt, 16);
          dbl += __shfl_xor_sync(0xffffffffu, dbl, 16);
          dc += __shfl_xor_sync(0xffffffffu, dc, 16);
          if (lane < 16) {
            float* d = s_dB + (warp * 3 * WMAX + j) * 16 + lane;
            d[0] = dbt;
            d[WMAX * 16] = dbl;
            d[2 * WMAX * 16] = dc;
          }
          if (n == 0) dD = fmaf(dy[k], uu[k], dD);
        }
        const float du = half_warp_sum4(du4, n), ddt = half_warp_sum4(dt4, n), ddl = half_warp_sum4(dl4, n);
        if ((n & 3) == 0) {
          const int j = j0 + (n >> 2);
          s_dx[0 * ROWS + c * WP + j] = du;
          s_dx[1 * ROWS + c * WP + j] = ddt;
          s_dx[2 * ROWS + c * WP + j] = ddl;
        }
      }
      hleft = hleft_next;
      // cL aL lam at the strip's first column, for the strip on the left: published every `publish`
      // rows and at the segment's top row (the next segment's recompute would delay it).
      const bool publish = has_left && ((H - i) % sb.publish == 0 || i == r0);
      if (has_left) {
        lcarry_self[i * kSmallThreads] = coefR * lam;
        if (publish) __threadfence();
      }
      __syncthreads();
      if (publish && tid == 0) st_release(flag_self, static_cast<unsigned>(H - i));
      // Row i's sums: per cell and channel (du += D dy too), per cell and state over the 16 channels.
#pragma unroll
      for (int r = 0; r < PER; ++r) {
        const int x = tid + r * kSmallThreads, k = x & 15, j = x >> 4;
        if (j >= W) continue;
        const int64_t ek = e0 + k;
        if (ek < e_hi) {
          const int at = k * WP + j;
          const float v[3] = {fmaf(Dk, cur[3 * ROWS + at], s_dx[0 * ROWS + at]), s_dx[1 * ROWS + at], s_dx[2 * ROWS + at]};
          const Grid* dst[3] = {&ga.du, &ga.ddT, &ga.ddL};
#pragma unroll
          for (int q = 0; q < 3; ++q) {
            if (!dst[q]->defined()) continue;
            const Grid& d = *dst[q];
            const int64_t off = b * d.sb + ek * d.sc + i * d.si + (jb + j) * d.sj;
            if (ga.cells_in_dtype) static_cast<T*>(d.data)[off] = from_f<T>(v[q]);  // this thread's cell alone
            else static_cast<float*>(d.data)[off] += v[q];
          }
        }
        if (k < N) {
          float sum[3] = {0.f, 0.f, 0.f};
#pragma unroll
          for (int w = 0; w < NWARP; ++w)
#pragma unroll
            for (int q = 0; q < 3; ++q) sum[q] += s_dB[((w * 3 + q) * WMAX + j) * 16 + k];
          const int64_t bc = kDet ? e0 - ga.e_begin : g;
          const Grid* dst[3] = {&ga.dBT, &ga.dBL, &ga.dC};
#pragma unroll
          for (int q = 0; q < 3; ++q) {
            if (!dst[q]->defined()) continue;
            float* o = fplane(*dst[q], b, bc, k, i, jb + j);
            if (kDet) *o = sum[q]; else atomicAdd(o, sum[q]);
          }
        }
      }
      if (i > r0) store_row(smem + ((r1 - i) & 1) * BUF, true);
      __syncthreads();
    }
  }
  if (strip_mode) {  // per strip; strip_parts_kernel sums them
    float* part = sb.parts + (item * sb.strips + strip) * 3 * kSmallThreads + tid;
    part[0] = dAT;
    part[kSmallThreads] = dAL;
    part[2 * kSmallThreads] = dD;
    return;
  }
  if (active) {
    if (ga.dAT_part) static_cast<float*>(ga.dAT_part)[(b * E + e) * N + n] = dAT;
    if (ga.dAL_part) static_cast<float*>(ga.dAL_part)[(b * E + e) * N + n] = dAL;
  }
  if (has_e && n == 0 && p.D && ga.dD_part) static_cast<float*>(ga.dD_part)[b * E + e] = dD;
}

// dAT, dAL (per batch, channel, state) and dD (per batch, channel) of a strip backward: the strips'
// sums added in strip order (deterministic). One thread per (batch, channel of the call, state < 16).
__global__ void strip_parts_kernel(Wave2dProblem p, Wave2dBackwardArgs ga, StripBwd sb) {
  const int64_t Er = ga.e_end - ga.e_begin, nEr = (Er + kSmallChannels - 1) / kSmallChannels;
  const int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (x >= p.batch * Er * 16) return;
  const int n = static_cast<int>(x & 15);
  const int64_t er = (x >> 4) % Er, b = (x >> 4) / Er, e = ga.e_begin + er;
  const int64_t item = b * nEr + er / kSmallChannels;
  const int lane = static_cast<int>(er % kSmallChannels) * 16 + n;
  float s[3] = {0.f, 0.f, 0.f};
  for (int64_t k = 0; k < sb.strips; ++k) {
    const float* part = sb.parts + (item * sb.strips + k) * 3 * kSmallThreads + lane;
#pragma unroll
    for (int q = 0; q < 3; ++q) s[q] += part[q * kSmallThreads];
  }
  const int64_t E = p.dim, N = p.dstate;
  if (n < N) {
    if (ga.dAT_part) static_cast<float*>(ga.dAT_part)[(b * E + e) * N + n] = s[0];
    if (ga.dAL_part) static_cast<float*>(ga.dAL_part)[(b * E + e) * N + n] = s[1];
  }
  if (n == 0 && p.D && ga.dD_part) static_cast<float*>(ga.dD_part)[b * E + e] = s[2];
}

// The strip pipelines' hand-over: rows between publications (each costs a fence and a release
// store on the producer's critical path) and rows of L2 look-ahead for the next rows' inputs.
// Measured on the H100 (bf16, N = 16, strips of 16 columns, fwd / fwd+bwd ms): publishing every row without look-ahead
// 1.36 / 6.24 at 256x256 and 0.99 / 6.45 at B=64 56x56; every 2 rows, 2 ahead 1.18 / 5.51 and
// 0.86 / 5.93; every 4 or 8 rows was slower again (the consumer waits longer for a row); strips of
// 32 or 64 columns 1.6x / 3x slower than 16 (fewer blocks in the pipeline). With the branch-free
// staging (ae37e5d), 4 rows ahead beat 2 in two calls: 256x256 0.79 / 3.37 vs 0.80-0.81 / 3.43,
// 512x512 1.55 / 7.70 vs 1.57 / 7.78, 28x28 layer fwd+bwd 1.80 vs 1.88.
// SSM2D_WAVE_STRIP_TUNE="publish,lookahead[,width]" overrides them (read once; for measurements).
struct StripTuning {
  int publish = 2, lookahead = 4, width = 0;  // width: strip width when strips run (0: the plan's)
};
const StripTuning& strip_tuning() {
  static const StripTuning t = [] {
    StripTuning r;
    if (const char* s = std::getenv("SSM2D_WAVE_STRIP_TUNE")) {
      int a = 0, b = 0, w = 0;
      const int got = std::sscanf(s, "%d,%d,%d", &a, &b, &w);
      if (got >= 2 && a >= 1 && b >= 0) r = {a, b, (w == 8 || w == 16 || w == 32 || w == 64) ? w : 0};
    }
    return r;
  }();
  return t;
}

// A launch's StripSync / StripBwd with the hand-over settings filled in (whole rows use only the
// look-ahead; the strip fields are set by the strip launches).
template <typename S>
S tuned() {
  S s;
  s.publish = strip_tuning().publish;
  s.lookahead = strip_tuning().lookahead;
  return s;
}

// A block walks its 16 channels' grid serially, so the short-row kernel needs enough blocks to fill
// the GPU: at batch 1 x 64 channels (4 blocks) the general kernel's 64 blocks are faster (measured
// on the H100: 0.6 vs 0.9 ms at 64x64); from batch x channels/16 >= 16 blocks on it wins.
constexpr int64_t kSmallMinBlocks = 16;

bool small_rows_fit(const Wave2dProblem& p) {
  const int64_t blocks = p.batch * ((p.dim + kSmallChannels - 1) / kSmallChannels);
  return p.width <= 64 && p.dstate <= 16 && blocks >= kSmallMinBlocks &&
         (p.groups == 1 || (p.dim / p.groups) % kSmallChannels == 0);
}

// The backward's e ranges (deterministic calls run the channels in chunks) must start on a block.
void check_small_range(const Wave2dBackwardArgs& a, int64_t E) {
  if (a.e_begin % kSmallChannels || ((a.e_end - a.e_begin) % kSmallChannels && a.e_end != E))
    throw ArgumentError("wavefront2d_backward: with rows of at most 64 cells, e_begin and e_end must be multiples of " +
                        std::to_string(kSmallChannels) + " (or e_end = E), got " + std::to_string(a.e_begin) +
                        ", " + std::to_string(a.e_end));
}

int64_t small_bwd_workspace_floats(const Wave2dProblem& p) {
  const int64_t blocks = p.batch * ((p.dim + kSmallChannels - 1) / kSmallChannels);
  return blocks * small_bwd_rows(p.height) * ((p.width + 3) / 4) * 4 * kSmallThreads;
}

template <typename T, int WMAX, bool Det>
void bwd_small_launch(const Wave2dProblem& p, const Wave2dBackwardArgs& a, cudaStream_t stream) {
  const size_t smem = small_bwd_smem_floats<WMAX>() * sizeof(float);
  auto kernel = wave_bwd_small_kernel<T, WMAX, Det>;
  SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const unsigned ch_blocks = static_cast<unsigned>((a.e_end - a.e_begin + kSmallChannels - 1) / kSmallChannels);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
    dim3 grid(ch_blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
    kernel<<<grid, kSmallThreads, smem, stream>>>(p, a, b0, tuned<StripBwd>());
    SSM2D_CUDA_CHECK_LAUNCH("wave_bwd_small_kernel");
  }
}

template <typename T, bool Det>
void bwd_small_t(const Wave2dProblem& p, const Wave2dBackwardArgs& a, cudaStream_t s) {
  check_small_range(a, p.dim);
  if (p.width <= 16) bwd_small_launch<T, 16, Det>(p, a, s);
  else if (p.width <= 32) bwd_small_launch<T, 32, Det>(p, a, s);
  else bwd_small_launch<T, 64, Det>(p, a, s);
}

// The forward's lanes (a half-warp per channel, a lane per state) fit N <= 16 with each block's 16
// channels in one group. Whole rows when they have at most 64 cells and the batch has enough blocks;
// else strips of 64 or 32 columns, the widest that still gives kStripBlocks blocks, else 16 when
// that gives half as many, else 8. A block's row step costs ~0.2 us per column of the strip on top of
// ~1.5 us (H100, bf16, N = 16: 4.3 / 7.1 / 14 us per step for 16 / 32 / 64 columns at 256x256, B=1,
// E=64), and with fewer blocks than SMs nothing hides it: narrower strips on small batches, wider
// ones where the blocks already fill the GPU twice over.
constexpr int64_t kStripBlocks = 264;  // two blocks per SM of a 132-SM GPU

bool lanes_fit(const Wave2dProblem& p) {
  return p.dstate <= 16 && (p.groups == 1 || (p.dim / p.groups) % kSmallChannels == 0);
}

struct StripPlan {
  int wmax = 64;
  int64_t strips = 1;
  int64_t chunk = 0;  // backward: 16-channel blocks per launch (the call's channels in chunks of this many)
};

// (batch, 16-channel block) items of `channels` channels.
int64_t items_of(const Wave2dProblem& p, int64_t channels) {
  return p.batch * ((channels + kSmallChannels - 1) / kSmallChannels);
}

// The widest strips that give kStripBlocks blocks for `items` (see kStripBlocks), else 16 columns
// when that gives half as many, else 8 (backward only).
StripPlan strip_width_for(const Wave2dProblem& p, int64_t items, bool backward) {
  if (const int w = strip_tuning().width) return {w, (p.width + w - 1) / w};
  for (int sw : {64, 32})
    if (items * ((p.width + sw - 1) / sw) >= kStripBlocks) return {sw, (p.width + sw - 1) / sw};
  if (!backward || items * ((p.width + 15) / 16) >= kStripBlocks / 2) return {16, (p.width + 15) / 16};
  return {8, (p.width + 7) / 8};
}

// The forward stops at 16 columns: 8-column strips measured no faster there (H100: 256^2 0.825 vs
// 0.807 ms, 512^2 1.863 vs 1.697), while the backward, with twice the work per row step, gains from
// the doubled block count (256^2 fwd+bwd 3.45 vs 4.12 ms). The backward's recompute pass uses the
// backward's plan (its carries sit at the backward's strip edges).
StripPlan strip_plan(const Wave2dProblem& p, bool backward) {
  if (small_rows_fit(p)) return {p.width <= 16 ? 16 : p.width <= 32 ? 32 : 64, 1};
  return strip_width_for(p, items_of(p, p.dim), backward);
}

// Flags (a ticket counter, then one per (item, strip)) and carries, in floats of the workspace.
int64_t strip_flag_floats(int64_t items, const StripPlan& sp) { return 1 + items * sp.strips; }
int64_t strip_workspace_floats(int64_t items, int64_t height, const StripPlan& sp) {
  if (sp.strips == 1) return 0;
  return strip_flag_floats(items, sp) + items * (sp.strips - 1) * height * kSmallThreads;
}

// A forward over channels [e_begin, e_end) (e_end < 0: all); its flags and carries at the front of
// p.workspace, counted for that range's items.
template <typename T, int WMAX, bool kRecompute = false>
void fwd_small_launch(const Wave2dProblem& p, const Grid& out, const StripPlan& sp, cudaStream_t stream,
                      bool out_in_dtype = false, int64_t e_begin = 0, int64_t e_end = -1,
                      float* checkpoints = nullptr) {
  const size_t smem = (2 * kSmallArrays + 2) * static_cast<size_t>(kSmallChannels * small_pitch(WMAX)) * sizeof(float);
  auto kernel = wave_fwd_small_kernel<T, WMAX, kRecompute>;
  SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (e_end < 0) e_end = p.dim;
  const int64_t ch_blocks = (e_end - e_begin + kSmallChannels - 1) / kSmallChannels;
  const int64_t items = p.batch * ch_blocks;
  StripSync ss = tuned<StripSync>();
  ss.e_begin = e_begin;
  ss.e_end = e_end;
  ss.checkpoints = checkpoints;
  if (sp.strips > 1) {
    ss.strips = sp.strips;
    ss.flags = reinterpret_cast<unsigned*>(p.workspace);
    ss.carry = p.workspace + strip_flag_floats(items, sp);
    SSM2D_CUDA_CHECK(cudaMemsetAsync(ss.flags, 0, strip_flag_floats(items, sp) * sizeof(float), stream));
    const int64_t blocks = items * sp.strips;
    if (blocks > 0x7fffffff) throw ArgumentError("wavefront2d_forward: too many (batch, channel, strip) blocks");
    kernel<<<static_cast<unsigned>(blocks), kSmallThreads, smem, stream>>>(p, out, 0, ss, out_in_dtype);
    SSM2D_CUDA_CHECK_LAUNCH("wave_fwd_small_kernel");
    return;
  }
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
    dim3 grid(static_cast<unsigned>(ch_blocks), static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
    kernel<<<grid, kSmallThreads, smem, stream>>>(p, out, b0, ss, out_in_dtype);
    SSM2D_CUDA_CHECK_LAUNCH("wave_fwd_small_kernel");
  }
}

template <typename T>
void fwd_small_t(const Wave2dProblem& p, const Grid& out, cudaStream_t s, bool out_in_dtype) {
  const StripPlan sp = strip_plan(p, false);
  if (sp.wmax == 8) fwd_small_launch<T, 8>(p, out, sp, s, out_in_dtype);
  else if (sp.wmax == 16) fwd_small_launch<T, 16>(p, out, sp, s, out_in_dtype);
  else if (sp.wmax == 32) fwd_small_launch<T, 32>(p, out, sp, s, out_in_dtype);
  else fwd_small_launch<T, 64>(p, out, sp, s, out_in_dtype);
}

// The strip backward's workspace for one launch over `items` items, in floats: first the recompute
// pass's strip flags and h carries (where fwd_small_launch puts them; the adjoint's lam carries
// overwrite the h carries in place, see StripBwd), then the backward's flags, the per-strip
// dAT/dAL/dD sums and the blocks' scratch (float4-aligned).
struct StripBwdLayout {
  int64_t hcarry, flags, parts, scratch, total;
};

StripBwdLayout strip_bwd_layout(const Wave2dProblem& p, const StripPlan& sp, int64_t items) {
  const int64_t S = sp.strips;
  StripBwdLayout L;
  L.hcarry = strip_flag_floats(items, sp);
  L.flags = strip_workspace_floats(items, p.height, sp);
  L.parts = L.flags + 1 + items * S;
  L.scratch = (L.parts + items * S * 3 * kSmallThreads + 3) / 4 * 4;
  L.total = L.scratch + items * S * small_bwd_rows(p.height) * sp.wmax * kSmallThreads;
  return L;
}

// The strip backward's workspace is bounded: when all channels at once would need more than this,
// the channels run in chunks of whole 16-channel blocks, one launch pair each, with strips of at
// least 16 columns (8-column strips double the carries). 1024x1024, B = 1, E = 64: 508 MiB in one
// launch, 254 MiB in two chunks of 32 channels; that keeps the whole backward under 1 GiB beyond
// its inputs (out, du, ddT, ddL and dBT, dBL, dC included).
constexpr int64_t kBwdWorkspaceBudget = int64_t{256} << 20;  // bytes

// SSM2D_WAVE_BWD_BUDGET (bytes) overrides it, read once: for tests of the chunked path at small sizes.
int64_t bwd_workspace_budget() {
  static const int64_t budget = [] {
    long long v = 0;
    const char* s = std::getenv("SSM2D_WAVE_BWD_BUDGET");
    return s && std::sscanf(s, "%lld", &v) == 1 && v > 0 ? static_cast<int64_t>(v) : kBwdWorkspaceBudget;
  }();
  return budget;
}

StripPlan bwd_strip_plan(const Wave2dProblem& p) {
  const int64_t blocks = (p.dim + kSmallChannels - 1) / kSmallChannels;
  auto bytes = [&](const StripPlan& sp) { return strip_bwd_layout(p, sp, p.batch * sp.chunk).total * 4; };
  StripPlan sp = strip_plan(p, true);
  sp.chunk = blocks;
  if (bytes(sp) <= bwd_workspace_budget() || strip_tuning().width) return sp;
  for (int64_t k = 2, prev = blocks; k <= blocks; ++k) {  // k chunks of about blocks / k blocks each
    const int64_t c = (blocks + k - 1) / k;
    if (c == prev) continue;
    prev = c;
    StripPlan t = strip_width_for(p, p.batch * c, true);
    if (t.wmax == 8) t = {16, (p.width + 15) / 16};
    t.chunk = c;
    sp = t;  // the last (one block per launch) when none fits: the smallest of these
    if (bytes(t) <= bwd_workspace_budget()) break;
  }
  return sp;
}

template <typename T, int WMAX, bool Det>
void bwd_strip_launch(const Wave2dProblem& p, const Wave2dBackwardArgs& a, const StripPlan& sp, cudaStream_t stream) {
  const size_t smem = small_bwd_smem_floats<WMAX>() * sizeof(float);
  auto kernel = wave_bwd_small_kernel<T, WMAX, Det>;
  SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  // The call's channels in chunks of sp.chunk blocks, one after another in the same workspace.
  for (int64_t cb = a.e_begin; cb < a.e_end; cb += sp.chunk * kSmallChannels) {
    Wave2dBackwardArgs ac = a;
    ac.e_begin = cb;
    ac.e_end = std::min(a.e_end, cb + sp.chunk * kSmallChannels);
    if (Det && cb > a.e_begin) {  // per-channel partials: indexed from the caller's first channel
      for (Grid* g : {&ac.dBT, &ac.dBL, &ac.dC})
        if (g->defined()) g->data = static_cast<float*>(g->data) + (cb - a.e_begin) * g->sc;
    }
    const int64_t items = items_of(p, ac.e_end - ac.e_begin);
    const StripBwdLayout L = strip_bwd_layout(p, sp, items);
    // 1. h at each strip's last column on every row: the forward's strip pipeline, no output; it
    // leaves the backward's checkpoints too (the adjoint launch then starts at the bottom segment).
    Wave2dProblem pf = p;
    pf.workspace = a.workspace;
    if (sp.strips > 1)
      fwd_small_launch<T, WMAX, true>(pf, Grid{}, sp, stream, false, ac.e_begin, ac.e_end, a.workspace + L.scratch);
    // 2. The adjoint, strips pipelined from the right.
    StripBwd sb = tuned<StripBwd>();
    sb.strips = sp.strips;
    sb.flags = reinterpret_cast<unsigned*>(a.workspace + L.flags);
    sb.hcarry = a.workspace + L.hcarry;
    sb.lcarry = a.workspace + L.hcarry;  // in place of the h carries (see StripBwd)
    sb.parts = a.workspace + L.parts;
    sb.scratch = a.workspace + L.scratch;
    sb.checkpoints_ready = sp.strips > 1;
    const int64_t blocks = items * sp.strips;
    if (blocks > 0x7fffffff) throw ArgumentError("wavefront2d_backward: too many (batch, channel, strip) blocks");
    SSM2D_CUDA_CHECK(cudaMemsetAsync(sb.flags, 0, (1 + blocks) * sizeof(unsigned), stream));
    kernel<<<static_cast<unsigned>(blocks), kSmallThreads, smem, stream>>>(p, ac, 0, sb);
    SSM2D_CUDA_CHECK_LAUNCH("wave_bwd_small_kernel");
    // 3. dAT, dAL, dD: the strips' sums.
    const int64_t threads = p.batch * (ac.e_end - ac.e_begin) * 16;
    strip_parts_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(p, ac, sb);
    SSM2D_CUDA_CHECK_LAUNCH("strip_parts_kernel");
  }
}

template <typename T, bool Det>
void bwd_strip_t(const Wave2dProblem& p, const Wave2dBackwardArgs& a, cudaStream_t s) {
  check_small_range(a, p.dim);
  const StripPlan sp = bwd_strip_plan(p);
  if (sp.wmax == 8) bwd_strip_launch<T, 8, Det>(p, a, sp, s);
  else if (sp.wmax == 16) bwd_strip_launch<T, 16, Det>(p, a, sp, s);
  else if (sp.wmax == 32) bwd_strip_launch<T, 32, Det>(p, a, sp, s);
  else bwd_strip_launch<T, 64, Det>(p, a, sp, s);
}


int segment_for(int64_t W) {
  if (W <= 32 * 4) return 4;
  if (W <= 32 * 16) return 16;
  if (W <= 32 * 32) return 32;
  return 64;
}

int64_t chunks_of(const Wave2dProblem& p) { return (p.dstate + p.states_per_block - 1) / p.states_per_block; }
int64_t cells_of(const Wave2dProblem& p) { return p.batch * p.dim * p.height * p.width; }

void check_problem(const Wave2dProblem& p, const char* what) {
  if (p.dtype == DType::kFloat64 || p.param_dtype != DType::kFloat32)
    throw ArgumentError(std::string(what) + ": the CUDA kernel takes float32, float16 or bfloat16 inputs with "
                        "float32 AT, AL and D; float64 runs on the CPU kernel");
  // The lanes (N <= 16) run rows of any length as column strips; the general kernel holds a row in
  // registers.
  if (p.width > kWave2dMaxWidth && !lanes_fit(p))
    throw ArgumentError(std::string(what) + ": with N > 16 (or a block's 16 channels in two groups) the CUDA "
                        "kernel scans rows of at most " + std::to_string(kWave2dMaxWidth) +
                        " cells (the caller transposes longer ones)");
  const int64_t spb = p.states_per_block;
  if (spb < 1 || (spb & (spb - 1)) || spb > wavefront2d_max_states(p.width))
    throw ArgumentError(std::string(what) + ": states_per_block must be a power of two <= " +
                        std::to_string(wavefront2d_max_states(p.width)) + " at W=" + std::to_string(p.width) +
                        ", got " + std::to_string(spb));

}

void add_chunks(const Wave2dProblem& p, const Grid& out, const float* scratch, cudaStream_t stream) {
  if (!out.defined() || chunks_of(p) <= 1) return;
  const int64_t blocks = std::min<int64_t>((cells_of(p) + 255) / 256, 65535);
  add_chunks_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p, out, scratch, chunks_of(p));
  SSM2D_CUDA_CHECK_LAUNCH("add_chunks_kernel");
}

template <typename T, int S>
void fwd_launch(const Wave2dProblem& p, const Grid& out, cudaStream_t stream) {
  const int nw = static_cast<int>(p.states_per_block);
  const size_t smem = (3 + 3 * nw) * static_cast<size_t>(row_pitch(p.width)) * sizeof(float);
  auto kernel = wave_fwd_kernel<T, S>;
  SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (chunks_of(p) > 1)
    SSM2D_CUDA_CHECK(cudaMemsetAsync(p.workspace, 0, (chunks_of(p) - 1) * cells_of(p) * sizeof(float), stream));
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
    dim3 grid(static_cast<unsigned>(p.dim), static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)),
              static_cast<unsigned>(chunks_of(p)));
    kernel<<<grid, nw * 32, smem, stream>>>(p, out, b0);
    SSM2D_CUDA_CHECK_LAUNCH("wave_fwd_kernel");
  }
  add_chunks(p, out, p.workspace, stream);
}

template <typename T, int S, bool Det>
void bwd_launch(const Wave2dProblem& p, const Wave2dBackwardArgs& a, cudaStream_t stream) {
  const int nw = static_cast<int>(p.states_per_block);
  const size_t smem = (4 + 3 * nw) * static_cast<size_t>(row_pitch(p.width)) * sizeof(float);
  auto kernel = wave_bwd_kernel<T, S, Det>;
  SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const int64_t zs = chunks_of(p) - 1, cells = cells_of(p);
  if (zs > 0) SSM2D_CUDA_CHECK(cudaMemsetAsync(a.workspace, 0, 3 * zs * cells * sizeof(float), stream));
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
    dim3 grid(static_cast<unsigned>(a.e_end - a.e_begin), static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)),
              static_cast<unsigned>(chunks_of(p)));
    kernel<<<grid, nw * 32, smem, stream>>>(p, a, b0);
    SSM2D_CUDA_CHECK_LAUNCH("wave_bwd_kernel");
  }
  add_chunks(p, a.du, a.workspace, stream);
  add_chunks(p, a.ddT, a.workspace + zs * cells, stream);
  add_chunks(p, a.ddL, a.workspace + 2 * zs * cells, stream);
}

template <typename T>
void fwd_t(const Wave2dProblem& p, const Grid& out, cudaStream_t s, bool out_in_dtype) {
  if (lanes_fit(p)) return fwd_small_t<T>(p, out, s, out_in_dtype);
  switch (segment_for(p.width)) {
    case 4: fwd_launch<T, 4>(p, out, s); break;
    case 16: fwd_launch<T, 16>(p, out, s); break;
    case 32: fwd_launch<T, 32>(p, out, s); break;
    default: fwd_launch<T, 64>(p, out, s); break;
  }
}

template <typename T, bool Det>
void bwd_t(const Wave2dProblem& p, const Wave2dBackwardArgs& a, cudaStream_t s) {
  if (small_rows_fit(p)) return bwd_small_t<T, Det>(p, a, s);
  if (lanes_fit(p)) return bwd_strip_t<T, Det>(p, a, s);
  switch (segment_for(p.width)) {
    case 4: bwd_launch<T, 4, Det>(p, a, s); break;
    case 16: bwd_launch<T, 16, Det>(p, a, s); break;
    case 32: bwd_launch<T, 32, Det>(p, a, s); break;
    default: bwd_launch<T, 64, Det>(p, a, s); break;
  }
}

}  // namespace

int wavefront2d_max_states(int64_t width) {
  // Shared memory holds 4 rows plus 3 rows per state (the backward's need; the forward's is smaller).
  const int64_t row = static_cast<int64_t>(row_pitch(width)) * 4;
  const int64_t budget = 227 * 1024;
  const int64_t fit = (budget - 4 * row) / (3 * row);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxWarps, fit)));
}

int64_t wavefront2d_forward_workspace_floats(const Wave2dProblem& p) {
  if (lanes_fit(p)) return strip_workspace_floats(items_of(p, p.dim), p.height, strip_plan(p, false));
  return p.states_per_block > 0 ? (chunks_of(p) - 1) * cells_of(p) : 0;
}

int64_t wavefront2d_backward_workspace_floats(const Wave2dProblem& p) {
  if (small_rows_fit(p)) return small_bwd_workspace_floats(p);
  if (lanes_fit(p)) {
    const StripPlan sp = bwd_strip_plan(p);
    return strip_bwd_layout(p, sp, p.batch * sp.chunk).total;
  }
  const int64_t parts = p.states_per_block > 0 ? 3 * (chunks_of(p) - 1) * cells_of(p) : 0;
  return parts + p.batch * p.dim * p.dstate * ((p.height + kCheckpoint - 1) / kCheckpoint + kCheckpoint) * p.width;
}

int64_t wavefront2d_workspace_floats(int64_t batch, int64_t dim, int64_t dstate, int64_t groups, int64_t height,
                                     int64_t width, int64_t states_per_block, bool backward) {
  Wave2dProblem p;
  p.batch = batch; p.dim = dim; p.dstate = dstate; p.groups = groups; p.height = height; p.width = width;
  p.states_per_block = states_per_block;
  return backward ? wavefront2d_backward_workspace_floats(p) : wavefront2d_forward_workspace_floats(p);
}

namespace {
void forward_impl(const Wave2dProblem& p, const Grid& out, bool out_in_dtype, const char* what) {
  check_problem(p, what);
  if (wavefront2d_forward_workspace_floats(p) > 0 && !p.workspace)
    throw ArgumentError(std::string(what) + ": the float32 workspace (wavefront2d_workspace_floats) is required here");
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  switch (p.dtype) {
    case DType::kFloat32: fwd_t<float>(p, out, stream, out_in_dtype); break;
    case DType::kFloat16: fwd_t<__half>(p, out, stream, out_in_dtype); break;
    case DType::kBFloat16: fwd_t<__nv_bfloat16>(p, out, stream, out_in_dtype); break;
    default: break;
  }
}
}  // namespace

void wavefront2d_forward(const Wave2dProblem& p, const Grid& out) { forward_impl(p, out, false, "wavefront2d_forward"); }

void wavefront2d_forward_dtype(const Wave2dProblem& p, const Grid& out) {
  if (!lanes_fit(p))
    throw ArgumentError("wavefront2d_forward_dtype: only the lane kernels (N <= 16, each 16-channel block in one "
                        "group) write the output in the inputs' dtype; use wavefront2d_forward");
  forward_impl(p, out, true, "wavefront2d_forward_dtype");
}

void wavefront2d_backward(const Wave2dProblem& p, const Wave2dBackwardArgs& a_in) {
  check_problem(p, "wavefront2d_backward");
  if (a_in.cells_in_dtype && !lanes_fit(p))
    throw ArgumentError("wavefront2d_backward: du, ddT, ddL in the inputs' dtype (cells_in_dtype) need the lane "
                        "kernels (N <= 16, each 16-channel block in one group)");
  if (!a_in.workspace) throw ArgumentError("wavefront2d_backward: workspace is required on CUDA");
  Wave2dBackwardArgs a = a_in;
  if (a.e_end < 0) a.e_end = p.dim;
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  const bool det = a.deterministic;
  switch (p.dtype) {
    case DType::kFloat32: det ? bwd_t<float, true>(p, a, stream) : bwd_t<float, false>(p, a, stream); break;
    case DType::kFloat16: det ? bwd_t<__half, true>(p, a, stream) : bwd_t<__half, false>(p, a, stream); break;
    case DType::kBFloat16:
      det ? bwd_t<__nv_bfloat16, true>(p, a, stream) : bwd_t<__nv_bfloat16, false>(p, a, stream);
      break;
    default: break;
  }
}

}  // namespace ssm2d::cuda
