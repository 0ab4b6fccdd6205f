// scan2d (2DMamba) on CUDA for N == 1 on grids of at most 64 x 64 cells, forward and backward: the
// lanes of a channel hold the whole recurrence of the channel.
//
// Why. At 2DVMamba's stages (N = 1, 56x56 down to 7x7 grids, B = 64, hundreds of channels) a block
// per (batch, channel, column band) with a lane per column pays a warp scan (shuffles) and barriers
// per row and leaves lanes idle on narrow grids. Here the P lanes l of a warp with l / P = c own
// channel d0 + c of one batch item (P = 1 up to 8 cells of short side, 2 up to 16, 4 up to 32, 8 up
// to 64):
//   * the grid is walked along its long side ("outer" steps t), the short side ("inner" cells k < K)
//     held in registers, WP consecutive cells per lane;
//   * one of the two recurrences runs along k inside the lanes (a chain of FMAs; with P > 1 each lane
//     runs its WP cells from 0, the lanes' affine summaries are joined by a log2(P)-step shuffle scan
//     and the chain is run again from the true entry), the other carries from step to step in a
//     register per cell: no barriers, no idle lanes;
//   * the per-channel operands of a step (K cells of each of the warp's 32 / P channels) are loaded
//     by the warp together, cell-contiguous (coalesced), and transposed through shared memory so that
//     each lane reads its own cells; outputs take the same way back.
// Rows-first on the grid walked by rows (mode R): G along k in the lanes, h carried from row to row.
// When the scanned grid's rows are the strided side (columns-first routes read in place) the walk
// goes along the memory's rows instead (mode C): the carry is then G, the in-lane chain is h.
// The channels of a warp share one group (G == 1 or channels per group a multiple of 32), so B and
// C of a step are loaded once per warp and broadcast by shuffles.
//
// Saved for the backward: the carry entering every kScan2dChanSegment-th step, per (batch, segment,
// k, channel): about u's element count / kScan2dChanSegment floats. The backward walks the segments
// bottom-up, recomputes a segment's carries from its saved one into shared memory, and runs the adjoint
// of SCANS.md section 1 step by step (the in-lane adjoint joined across lanes like the forward
// chain, in reverse); dB and dC are summed over the warp's channels in shared memory (fixed order)
// and added with one atomic per cell and warp, or written per channel in the deterministic mode.
// dA, dD and ddelta_bias leave as per-(batch, channel) sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>

#include "common.cuh"
#include "scan2d_chan.h"
#include "scan2d_common.cuh"
#include "ssm2d/scan2d.h"

namespace ssm2d::cuda {
namespace {
using namespace s2d;

constexpr int kWarps = 4;                 // warps (independent channel groups) per block
constexpr int kSeg = kScan2dChanSegment;  // steps between saved carries
constexpr int64_t kMaxGridY = 65535;
// Shared floats per warp of the backward: five step buffers [32 slots][WP + 1] (u, delta, z,
// dout / dB, dC) and the carries entering a segment's steps [kSeg][WP][32].
template <int WP> constexpr int kBwdWarpFloats = 5 * 32 * (WP + 1) + kSeg * WP * 32;

// The register layout of a warp: P lanes per channel (consecutive lanes), WP cells per lane, so a
// warp holds CW = 32 / P channels and KT = P * WP cells of the short side per step. Lane l is slot l
// of the warp's step buffers (WP cells each): channel l / P, cells (l % P) * WP .. + WP - 1.
template <int WP, int P>
struct Layout {
  static constexpr int KT = WP * P;
  static constexpr int CW = 32 / P;
  static_assert(32 % WP == 0 && 32 % P == 0 && (KT <= 32 || KT == 64), "chan layout");
};

// Element (t, k) of one operand of the walk: base + t*st + k*sk (mode C swaps the logical axes).
template <bool kCols>
__device__ __forceinline__ int64_t step_stride(const Grid& g) { return kCols ? g.sj : g.si; }
template <bool kCols>
__device__ __forceinline__ int64_t inner_stride(const Grid& g) { return kCols ? g.si : g.sj; }

// A lane's part in the warp's cooperative loads and stores of a step. Instruction m < WP covers the
// step tile's elements e = 32 m + lane (channel e / KT, cell e % KT: consecutive lanes take
// consecutive cells of a channel, coalesced); in the step buffer element e is slot e / WP, offset
// e % WP whatever P is. k, sub: the lane's cell and channel at m = 0; bit m of `valid` says the
// element's channel is in range and its cell < K. Computed once per kernel.
struct LanePart {
  int k, sub;
  unsigned valid;
};
template <int WP, int P>
__device__ __forceinline__ LanePart lane_part(int lane, int64_t c0, int64_t lo, int64_t hi, int K) {
  constexpr int KT = Layout<WP, P>::KT;
  LanePart lp{KT <= 32 ? lane % KT : lane, KT <= 32 ? lane / KT : 0, 0u};
#pragma unroll
  for (int m = 0; m < WP; ++m) {
    const int e = m * 32 + lane;
    const int64_t c = c0 + e / KT;
    if (e % KT < K && c >= lo && c < hi) lp.valid |= 1u << m;
  }
  return lp;
}
// Where the lane's first element (m = 0) of step t of grid g is.
template <typename T, bool kCols>
__device__ __forceinline__ T* step_ptr(const Grid& g, int64_t b, int64_t c0, int64_t t, const LanePart& lp) {
  return static_cast<T*>(g.data) + b * g.sb + t * step_stride<kCols>(g) +
         static_cast<int64_t>(lp.k) * inner_stride<kCols>(g) + (c0 + lp.sub) * g.sc;
}
// Byte steps from element m to m + 1: (32 / KT) channels on when KT <= 32; with KT == 64 the
// second half of the channel's cells (m even), then the next channel's first half (m odd).
template <typename T, int WP, int P, bool kCols>
__device__ __forceinline__ void elem_steps(const Grid& g, int64_t& even, int64_t& odd) {
  constexpr int KT = Layout<WP, P>::KT;
  if (KT <= 32) {
    even = odd = (32 / KT) * g.sc * static_cast<int64_t>(sizeof(T));
  } else {
    even = 32 * inner_stride<kCols>(g) * static_cast<int64_t>(sizeof(T));
    odd = g.sc * static_cast<int64_t>(sizeof(T)) - even;
  }
}

// One step of one per-channel operand for the warp's channels (0 where not valid).
template <typename T, int WP, int P>
struct StepLoad {
  T v[WP];
  template <bool kCols>
  __device__ __forceinline__ void load(const Grid& g, int64_t b, int64_t c0, int64_t t, const LanePart& lp) {
    const T* ptr = step_ptr<const T, kCols>(g, b, c0, t, lp);
    int64_t even, odd;
    elem_steps<T, WP, P, kCols>(g, even, odd);
#pragma unroll
    for (int m = 0; m < WP; ++m) {
      v[m] = (lp.valid >> m) & 1u ? *ptr : from_f<T>(0.f);
      // An opaque step: otherwise the offsets of all m are hoisted out of the step loop and held
      // in two registers each per operand.
      asm("add.s64 %0, %0, %1;" : "+l"(ptr) : "l"(m % 2 == 0 ? even : odd));
    }
  }
  // Into the warp's step buffer: element m at slot m * (32 / WP) + lane / WP, offset lane % WP.
  __device__ __forceinline__ void put(float* s, int lane) const {
#pragma unroll
    for (int m = 0; m < WP; ++m) s[(m * (32 / WP) + lane / WP) * (WP + 1) + lane % WP] = to_f(v[m]);
  }
};

// The reverse of StepLoad: writes the warp's step buffer s (slot pitch `pitch`) to grid g at step t,
// valid elements only.
template <typename T, int WP, int P, bool kCols>
__device__ __forceinline__ void store_step(const float* s, int pitch, const Grid& g, int64_t b, int64_t c0, int64_t t,
                                           const LanePart& lp, int lane) {
  T* ptr = step_ptr<T, kCols>(g, b, c0, t, lp);
  int64_t even, odd;
  elem_steps<T, WP, P, kCols>(g, even, odd);
#pragma unroll
  for (int m = 0; m < WP; ++m) {
    if ((lp.valid >> m) & 1u) *ptr = from_f<T>(s[(m * (32 / WP) + lane / WP) * pitch + lane % WP]);
    asm("add.s64 %0, %0, %1;" : "+l"(ptr) : "l"(m % 2 == 0 ? even : odd));  // as in StepLoad
  }
}

// B and C of one step of the warp's group, spread over the warp's registers and read by shuffles.
// KT <= 16: one register, B of cell c in lane c, C in lane KT + c. Otherwise KT / 32 registers for
// B and as many for C; register r of lane l holds cell (l / Q) * WP + r * Q + l % Q (Q = WP / NB), so
// that the lanes of one part (cells pi * WP ..) read cell pi * WP + kk from register kk / Q of lane
// pi * Q + kk % Q: one shuffle per value whatever P is.
template <int WP, int P>
struct StepBC {
  static constexpr int KT = Layout<WP, P>::KT;
  static constexpr int NB = KT <= 16 ? 1 : KT / 32;
  static constexpr int NR = KT <= 16 ? 1 : 2 * NB;
  static constexpr int Q = WP / NB;
  float r[NR];
  template <typename T, bool kCols>
  __device__ __forceinline__ void load(const Scan2dProblem& p, int64_t b, int64_t g, int64_t t, int K, int lane) {
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      bool isC;
      int cell;
      if (KT <= 16) {
        isC = lane >= KT;
        cell = lane % KT;
      } else {
        isC = j >= NB;
        cell = (lane / Q) * WP + (j % NB) * Q + lane % Q;
      }
      r[j] = 0.f;
      if ((KT > 16 || lane < 2 * KT) && cell < K) {
        const Grid& G = isC ? p.C : p.B;
        const T* base = static_cast<const T*>(G.data) + b * G.sb + g * G.sc;
        r[j] = to_f(base[t * step_stride<kCols>(G) + static_cast<int64_t>(cell) * inner_stride<kCols>(G)]);
      }
    }
  }
  // B and C of the lane's cell kk (pi: the lane's part).
  __device__ __forceinline__ float B(int kk, int pi) const {
    return KT <= 16 ? __shfl_sync(kFull, r[0], pi * WP + kk) : __shfl_sync(kFull, r[kk / Q], pi * Q + kk % Q);
  }
  __device__ __forceinline__ float C(int kk, int pi) const {
    return KT <= 16 ? __shfl_sync(kFull, r[0], KT + pi * WP + kk) : __shfl_sync(kFull, r[NB + kk / Q], pi * Q + kk % Q);
  }
};

// The chain entering a lane's first cell, from the (product of a, chain from 0) summaries of the
// parts before it in the channel's P lanes (an exclusive scan of affine maps; 0 for the first part).
template <int P>
__device__ __forceinline__ float chain_in(float A, float L, int pi) {
#pragma unroll
  for (int off = 1; off < P; off <<= 1) {
    const float Ap = __shfl_up_sync(kFull, A, off, P), Lp = __shfl_up_sync(kFull, L, off, P);
    if (pi >= off) {
      L = fmaf(A, Lp, L);
      A *= Ap;
    }
  }
  const float cin = __shfl_up_sync(kFull, L, 1, P);
  return pi == 0 ? 0.f : cin;
}
// The same from the parts after the lane's (the reverse chains of the backward).
template <int P>
__device__ __forceinline__ float chain_in_rev(float A, float L, int pi) {
#pragma unroll
  for (int off = 1; off < P; off <<= 1) {
    const float Ap = __shfl_down_sync(kFull, A, off, P), Lp = __shfl_down_sync(kFull, L, off, P);
    if (pi + off < P) {
      L = fmaf(A, Lp, L);
      A *= Ap;
    }
  }
  const float cin = __shfl_down_sync(kFull, L, 1, P);
  return pi == P - 1 ? 0.f : cin;
}

// Per-channel constants of a lane.
struct ChanConst {
  float bias, Dd, A, A2;
};
__device__ __forceinline__ ChanConst chan_const(const Scan2dProblem& p, int64_t d) {
  ChanConst c;
  c.bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  c.Dd = p.D ? static_cast<const float*>(p.D)[d] : 0.f;
  c.A = static_cast<const float*>(p.A)[d * p.A_sd];
  c.A2 = c.A * kLog2e;
  return c;
}

// The MUFU forms (about 2 ulp; softplus absolute error ~1e-7): the per-cell work is a handful of
// FMAs, and the accurate library calls (log1pf, IEEE division) would be most of the instructions.
__device__ __forceinline__ float lg2_fast(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLn2 = 0.6931471805599453f;
__device__ __forceinline__ float softplus_fast(float v) {
  return v > 20.f ? v : kLn2 * lg2_fast(1.f + fast_exp2(v * kLog2e));
}

__device__ __forceinline__ float dt_of(const Scan2dProblem& p, float delta, float bias) {
  const float v = delta + bias;
  return p.softplus ? softplus_fast(v) : v;
}

// The forward of one step in a lane's cells given the carry entering it, per cell kk: a[kk] and the
// in-lane chain ch[kk] (mode R: G, mode C: h) including what enters from the channel's earlier
// lanes; `carry` is updated in place (mode R: h, after the chain; mode C: G, before it); emit(kk, h)
// sees each cell's h. Returns the chain entering the lane's first cell. Cells past K have dt = 0
// (a = 1, x = 0) and come after the valid ones: they touch nothing valid.
template <int WP, int P, bool kCols, typename Emit>
__device__ __forceinline__ float step_cells(float (&a)[WP], float (&ch)[WP], float (&carry)[WP], const float* su,
                                            const float* sd, int lane, int pi, const Scan2dProblem& p,
                                            const ChanConst& cc, int K, const StepBC<WP, P>& bc, Emit&& emit) {
  auto cell_in = [&](int kk) {  // a and the chain's input at cell kk (mode C: after the carry's update)
    const float u = su[lane * (WP + 1) + kk];
    const float dt = pi * WP + kk < K ? dt_of(p, sd[lane * (WP + 1) + kk], cc.bias) : 0.f;
    a[kk] = fast_exp2(dt * cc.A2);
    const float x = dt * bc.B(kk, pi) * u;
    if (kCols) carry[kk] = fmaf(a[kk], carry[kk], x);
    return kCols ? carry[kk] : x;
  };
  auto advance = [&](int kk, float chain) {
    ch[kk] = chain;
    if (!kCols) carry[kk] = fmaf(a[kk], carry[kk], chain);
    emit(kk, kCols ? chain : carry[kk]);
  };
  if constexpr (P == 1) {  // one pass: nothing enters from other lanes
    float chain = 0.f;
#pragma unroll
    for (int kk = 0; kk < WP; ++kk) {
      const float v = cell_in(kk);
      chain = fmaf(a[kk], chain, v);
      advance(kk, chain);
    }
    return 0.f;
  } else {
    float v[WP], A = 1.f, L = 0.f;  // the lane's summary: product of a, chain from 0
#pragma unroll
    for (int kk = 0; kk < WP; ++kk) {
      v[kk] = cell_in(kk);
      L = fmaf(a[kk], L, v[kk]);
      A *= a[kk];
    }
    const float chain0 = chain_in<P>(A, L, pi);
    float chain = chain0;
#pragma unroll
    for (int kk = 0; kk < WP; ++kk) {
      chain = fmaf(a[kk], chain, v[kk]);
      advance(kk, chain);
    }
    return chain0;
  }
}

template <typename T, int WP, int P, bool kCols>
__global__ void __launch_bounds__(kWarps * 32, 4) scan2d_chan_fwd_kernel(Scan2dProblem p, Scan2dForwardOutputs o,
                                                                     int64_t b0) {
  constexpr int SW = WP + 1, CW = Layout<WP, P>::CW;
  __shared__ float smem[kWarps][3][32 * SW];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, pi = lane % P;
  const int64_t D = p.dim, c0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * CW, b = blockIdx.y + b0;
  if (c0 >= D) return;
  const int64_t d = min(c0 + lane / P, D - 1), g = c0 / (D / p.groups);
  const int64_t steps = kCols ? p.width : p.height;
  const int K = static_cast<int>(kCols ? p.height : p.width);
  const ChanConst cc = chan_const(p, d);
  const bool gated = p.z.defined();
  const LanePart lp = lane_part<WP, P>(lane, c0, 0, D, K);
  float* su = smem[warp][0];
  float* sd = smem[warp][1];
  float* sz = smem[warp][2];
  const int64_t nseg1 = (steps + kSeg - 1) / kSeg - 1;
  float carry[WP];
#pragma unroll
  for (int k = 0; k < WP; ++k) carry[k] = 0.f;
  // The operands of step t + 1 are loaded while step t is computed (one memory latency per step
  // hidden behind the arithmetic instead of added to it).
  StepLoad<T, WP, P> lu, ld, lz;
  StepBC<WP, P> bc_next;
  auto load_step = [&](int64_t t) {
    lu.template load<kCols>(p.u, b, c0, t, lp);
    ld.template load<kCols>(p.delta, b, c0, t, lp);
    if (gated) lz.template load<kCols>(p.z, b, c0, t, lp);
    bc_next.template load<T, kCols>(p, b, g, t, K, lane);
  };
  load_step(0);
  for (int64_t t = 0; t < steps; ++t) {
    const StepBC<WP, P> bc = bc_next;
    __syncwarp();  // the previous step's output reads of su are done
    lu.put(su, lane);
    ld.put(sd, lane);
    if (gated) lz.put(sz, lane);
    __syncwarp();
    if (t + 1 < steps) load_step(t + 1);
    // y over u in the buffer: a lane reads and writes only its own slot.
    float a[WP], ch[WP];
    step_cells<WP, P, kCols>(a, ch, carry, su, sd, lane, pi, p, cc, K, bc, [&](int kk, float h) {
      float y = fmaf(cc.Dd, su[lane * SW + kk], bc.C(kk, pi) * h);
      if (gated) {
        const float zv = sz[lane * SW + kk];
        y *= zv * sigmoid_f(zv);
      }
      su[lane * SW + kk] = y;
    });
    if (o.carries && (t + 1) % kSeg == 0 && t + 1 < steps && c0 + lane / P < D) {
      float* ck = o.carries + ((b * nseg1 + (t + 1) / kSeg - 1) * K) * D + d;
#pragma unroll
      for (int kk = 0; kk < WP; ++kk)
        if (pi * WP + kk < K) ck[(pi * WP + kk) * D] = carry[kk];
    }
    __syncwarp();
    store_step<T, WP, P, kCols>(su, SW, o.out, b, c0, t, lp, lane);
  }
}

// ---- Forward of small grids: whole channels in shared memory ---------------------------------------
//
// Why. On grids with both sides of at most 16 cells (2DVMamba's stages 3 and 4: 14x14, 7x7) a
// channel is at most 256 cells, and the walk above spends most of its instructions on moving the
// short side between layouts step by step (a transpose through shared memory per operand and step,
// shuffles for B and C) with one step of loads in flight. Here a block of 128 threads takes CB
// consecutive channels of one batch item (one group) whole:
//   1. every operand of the block (u, delta, z of CB channels, B and C of the group) is loaded at once,
//      consecutive threads on consecutive cells of a channel (coalesced in the (b, d, i, j) layout),
//      into shared memory: all of the block's loads in flight together;
//   2. thread (c, i) runs row i of channel c: dt, a, x and the horizontal chain G along j, leaving a
//      and G in shared memory;
//   3. thread (c, j) runs column j: h along i, y = C h + D u, the gate; y over G;
//   4. the block's outputs leave as the operands came (coalesced).
// L = 8 or 16 threads per channel (the longer side, rounded up), CB = 128 / L channels per block.
// Nothing is saved for the backward: it recomputes the block's channels whole (below).
constexpr int kTileThreads = 128;
constexpr int64_t kTileMaxSide = kScan2dChanTileSide;

// Shared-memory pitches: odd row and channel pitches, so that the threads of a warp walking rows
// (stride Wp) or the channels of a warp (stride CP) fall on different banks.
struct TilePitch {
  int Wp, HP, CP;
};
__host__ __device__ inline TilePitch tile_pitch(int H, int W) {
  TilePitch t;
  t.Wp = W | 1;
  t.HP = H * t.Wp;
  t.CP = t.HP | 1;
  return t;
}
template <int CB>
__host__ __device__ inline int tile_smem_floats(int H, int W) {
  const TilePitch t = tile_pitch(H, W);
  return 4 * CB * t.CP + 2 * t.HP;  // u, delta then G then y, a, z per channel; B, C
}

// The cells a thread loads and stores in the tile kernels: r = tid (and tid + 128 when L = 16) of
// each channel (HW <= L * L), their shared offsets within a channel and their grid coordinates.
template <int L>
struct TileCells {
  static constexpr int kCells = L * L / kTileThreads > 1 ? L * L / kTileThreads : 1;
  bool ok[kCells];
  int rr[kCells], i[kCells], j[kCells];
  __device__ TileCells(int tid, int H, int W, const TilePitch& tp) {
#pragma unroll
    for (int m = 0; m < kCells; ++m) {
      const int r = tid + m * kTileThreads;
      ok[m] = r < H * W;
      i[m] = ok[m] ? r / W : 0;
      j[m] = ok[m] ? r - i[m] * W : 0;
      rr[m] = i[m] * tp.Wp + j[m];
    }
  }
  __device__ int64_t off(const Grid& g, int m) const { return i[m] * g.si + j[m] * g.sj; }
};

// Row k of one channel (row pointers into the shared arrays): a and the horizontal chain G along j
// from u and delta (gr may be dr: G over delta). The first pass of both tile kernels.
__device__ __forceinline__ void tile_row_forward(const Scan2dProblem& p, const ChanConst& cc, int W, const float* ur,
                                                 const float* dr, float* gr, float* ar, const float* br) {
  float G = 0.f;
#pragma unroll
  for (int j = 0; j < kTileMaxSide; ++j) {
    if (j >= W) break;
    const float dt = dt_of(p, dr[j], cc.bias);
    const float a = fast_exp2(dt * cc.A2);
    G = fmaf(a, G, dt * br[j] * ur[j]);
    ar[j] = a;
    gr[j] = G;
  }
}

template <typename T, int L>
__global__ void __launch_bounds__(kTileThreads) scan2d_chan_tile_fwd_kernel(Scan2dProblem p, Scan2dForwardOutputs o,
                                                                           int64_t b0) {
  constexpr int CB = kTileThreads / L;
  extern __shared__ float tile[];
  const int tid = threadIdx.x;
  const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
  const TilePitch tp = tile_pitch(H, W);
  float* s_u = tile;
  float* s_g = s_u + CB * tp.CP;  // delta, then G, then y
  float* s_a = s_g + CB * tp.CP;
  float* s_z = s_a + CB * tp.CP;
  float* s_B = s_z + CB * tp.CP;
  float* s_C = s_B + tp.HP;
  const int64_t D = p.dim, d0 = static_cast<int64_t>(blockIdx.x) * CB, b = blockIdx.y + b0;
  const int64_t g = d0 / (D / p.groups);
  const int nc = static_cast<int>(min(static_cast<int64_t>(CB), D - d0));  // channels in range
  const bool gated = p.z.defined();

  // 1. Loads.
  const TileCells<L> tc(tid, H, W, tp);
  {
    const T* bu = static_cast<const T*>(p.u.data) + b * p.u.sb + d0 * p.u.sc;
    const T* bd = static_cast<const T*>(p.delta.data) + b * p.delta.sb + d0 * p.delta.sc;
    const T* bz = gated ? static_cast<const T*>(p.z.data) + b * p.z.sb + d0 * p.z.sc : nullptr;
    const T* bB = static_cast<const T*>(p.B.data) + b * p.B.sb + g * p.B.sc;
    const T* bC = static_cast<const T*>(p.C.data) + b * p.C.sb + g * p.C.sc;
    // One cell of every channel at a time: CB loads per operand in flight per thread, their
    // registers reused for the second cell.
#pragma unroll
    for (int m = 0; m < TileCells<L>::kCells; ++m) {
      if (!tc.ok[m]) continue;
      const int64_t ou = tc.off(p.u, m), od = tc.off(p.delta, m), oz = gated ? tc.off(p.z, m) : 0;
      T vu[CB], vd[CB], vz[CB];
#pragma unroll
      for (int c = 0; c < CB; ++c) {
        if (c >= nc) continue;
        vu[c] = bu[c * p.u.sc + ou];
        vd[c] = bd[c * p.delta.sc + od];
        if (gated) vz[c] = bz[c * p.z.sc + oz];
      }
      const T vb = bB[tc.off(p.B, m)], vc = bC[tc.off(p.C, m)];
      const int rr = tc.rr[m];
#pragma unroll
      for (int c = 0; c < CB; ++c) {
        if (c >= nc) continue;
        s_u[c * tp.CP + rr] = to_f(vu[c]);
        s_g[c * tp.CP + rr] = to_f(vd[c]);
        if (gated) s_z[c * tp.CP + rr] = to_f(vz[c]);
      }
      s_B[rr] = to_f(vb);
      s_C[rr] = to_f(vc);
    }
  }
  __syncthreads();

  const int c = tid / L, k = tid % L;
  const int64_t d = d0 + c;
  const bool live = c < nc;
  const ChanConst cc = chan_const(p, live ? d : d0);
  // 2. Row k of channel c: G along j (and a).
  if (live && k < H) {
    const int r0 = c * tp.CP + k * tp.Wp;
    tile_row_forward(p, cc, W, s_u + r0, s_g + r0, s_g + r0, s_a + r0, s_B + k * tp.Wp);
  }
  __syncthreads();
  // 3. Column k of channel c: h along i, y over G.
  if (live && k < W) {
    float* gc = s_g + c * tp.CP + k;
    const float* uc = s_u + c * tp.CP + k;
    const float* ac = s_a + c * tp.CP + k;
    const float* zc = s_z + c * tp.CP + k;
    const float* cb = s_C + k;
    float h = 0.f;
#pragma unroll
    for (int i = 0; i < kTileMaxSide; ++i) {
      if (i >= H) break;
      const int off = i * tp.Wp;
      h = fmaf(ac[off], h, gc[off]);
      float y = fmaf(cc.Dd, uc[off], cb[off] * h);
      if (gated) {
        const float zv = zc[off];
        y *= zv * sigmoid_f(zv);
      }
      gc[off] = y;
    }
  }
  __syncthreads();
  // 4. Stores.
  T* bo = static_cast<T*>(o.out.data) + b * o.out.sb + d0 * o.out.sc;
#pragma unroll
  for (int m = 0; m < TileCells<L>::kCells; ++m) {
    if (!tc.ok[m]) continue;
    T* out = bo + tc.off(o.out, m);
#pragma unroll
    for (int c2 = 0; c2 < CB; ++c2)
      if (c2 < nc) out[c2 * o.out.sc] = from_f<T>(s_g[c2 * tp.CP + tc.rr[m]]);
  }
}

// Backward of small grids, the tile forward's layout: the block recomputes its channels' forward
// whole (no carries), then runs the adjoint of SCANS.md section 1 backwards through the same passes:
//   1. loads: u, delta, z, dout of CB channels, B and C of the group;
//   2. rows (c, i): a and G along j;
//   3. columns (c, j): down, hp = a h[i-1,j] (= h - G); up, dy, lamV = dy C + a[i+1,j] lamV[i+1,j]
//      and dz (from y = C (hp + G) + D u);
//   4. rows (c, i), right to left: lamH = lamV + a[i,j+1] lamH[i,j+1], q = lamV hp + lamH a G[i,j-1],
//      du, ddelta, and each channel's dB, dC of the cell; dA, dD, ddelta_bias summed per channel;
//   5. dB and dC summed over the block's channels in channel order, one atomic per cell (or, in the
//      deterministic mode, per-channel partials); du, ddelta stored as the operands came.
// Shared memory: seven arrays per channel (u then du, delta then ddelta, z then lamV, dout then dy, a,
// G then dB, hp then dC) and B, C: at most 63 KB (16 x 16 cells, 8 channels).
template <int CB>
__host__ __device__ inline int tile_bwd_smem_floats(int H, int W) {
  const TilePitch t = tile_pitch(H, W);
  return 7 * CB * t.CP + 2 * t.HP;
}

template <typename T, int L, bool kDet>
__global__ void __launch_bounds__(kTileThreads) scan2d_chan_tile_bwd_kernel(Scan2dProblem p, Scan2dBackwardArgs ga,
                                                                           int64_t b0) {
  constexpr int CB = kTileThreads / L;
  extern __shared__ float tile[];
  const int tid = threadIdx.x;
  const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
  const TilePitch tp = tile_pitch(H, W);
  float* s_u = tile;               // u, then du
  float* s_d = s_u + CB * tp.CP;   // delta, then ddelta
  float* s_z = s_d + CB * tp.CP;   // z, then lamV
  float* s_o = s_z + CB * tp.CP;   // dout, then dy
  float* s_a = s_o + CB * tp.CP;   // a
  float* s_G = s_a + CB * tp.CP;   // G, then the channel's dB
  float* s_hp = s_G + CB * tp.CP;  // a h[i-1,j], then the channel's dC
  float* s_B = s_hp + CB * tp.CP;
  float* s_C = s_B + tp.HP;
  const int64_t D = p.dim, lo = ga.d_begin, hi = ga.d_end;
  // Blocks of CB channels aligned to CB (never across a group), clipped to this call's range.
  const int64_t d0 = (lo / CB + static_cast<int64_t>(blockIdx.x)) * CB, b = blockIdx.y + b0;
  const int64_t g = d0 / (D / p.groups);
  const bool gated = p.z.defined();
  auto in_range = [&](int c) { return d0 + c >= lo && d0 + c < hi; };

  const TileCells<L> tc(tid, H, W, tp);
  // 1. Loads.
  {
    const T* bu = static_cast<const T*>(p.u.data) + b * p.u.sb + d0 * p.u.sc;
    const T* bd = static_cast<const T*>(p.delta.data) + b * p.delta.sb + d0 * p.delta.sc;
    const T* bz = gated ? static_cast<const T*>(p.z.data) + b * p.z.sb + d0 * p.z.sc : nullptr;
    const T* bo = static_cast<const T*>(ga.dout.data) + b * ga.dout.sb + d0 * ga.dout.sc;
    const T* bB = static_cast<const T*>(p.B.data) + b * p.B.sb + g * p.B.sc;
    const T* bC = static_cast<const T*>(p.C.data) + b * p.C.sb + g * p.C.sc;
#pragma unroll
    for (int m = 0; m < TileCells<L>::kCells; ++m) {
      if (!tc.ok[m]) continue;
      const int64_t ou = tc.off(p.u, m), od = tc.off(p.delta, m), oz = gated ? tc.off(p.z, m) : 0,
                    oo = tc.off(ga.dout, m);
      const int rr = tc.rr[m];
      T vu[CB], vd[CB], vz[CB], vo[CB];
#pragma unroll
      for (int c = 0; c < CB; ++c) {
        if (!in_range(c)) continue;
        vu[c] = bu[c * p.u.sc + ou];
        vd[c] = bd[c * p.delta.sc + od];
        if (gated) vz[c] = bz[c * p.z.sc + oz];
        vo[c] = bo[c * ga.dout.sc + oo];
      }
      const T vb = bB[tc.off(p.B, m)], vc = bC[tc.off(p.C, m)];
#pragma unroll
      for (int c = 0; c < CB; ++c) {
        if (!in_range(c)) continue;
        s_u[c * tp.CP + rr] = to_f(vu[c]);
        s_d[c * tp.CP + rr] = to_f(vd[c]);
        s_z[c * tp.CP + rr] = gated ? to_f(vz[c]) : 0.f;
        s_o[c * tp.CP + rr] = to_f(vo[c]);
      }
      s_B[rr] = to_f(vb);
      s_C[rr] = to_f(vc);
    }
  }
  __syncthreads();

  const int c = tid / L, k = tid % L;
  const int64_t d = d0 + c;
  const bool live = in_range(c);
  const ChanConst cc = chan_const(p, live ? d : lo);
  const int ch = c * tp.CP;
  // 2. Row k: a and G (delta kept: step 4 reads it again).
  if (live && k < H) {
    const int r0 = ch + k * tp.Wp;
    tile_row_forward(p, cc, W, s_u + r0, s_d + r0, s_G + r0, s_a + r0, s_B + k * tp.Wp);
  }
  __syncthreads();
  // 3. Column k: hp down, then lamV, dy and dz up.
  if (live && k < W) {
    float h = 0.f;
#pragma unroll
    for (int i = 0; i < kTileMaxSide; ++i) {
      if (i >= H) break;
      const int x = ch + i * tp.Wp + k;
      const float hp = s_a[x] * h;
      h = hp + s_G[x];
      s_hp[x] = hp;
    }
    T* pdz = gated && ga.dz.defined() ? static_cast<T*>(ga.dz.data) + b * ga.dz.sb + d * ga.dz.sc + k * ga.dz.sj : nullptr;
    float lamV = 0.f, a_next = 0.f;
#pragma unroll
    for (int i = kTileMaxSide - 1; i >= 0; --i) {
      if (i >= H) continue;
      const int x = ch + i * tp.Wp + k;
      const float go = s_o[x], Cv = s_C[i * tp.Wp + k];
      float dy = go;
      if (gated) {
        const float zv = s_z[x], sig = sigmoid_f(zv);
        dy = go * zv * sig;
        if (pdz) {
          const float y = fmaf(cc.Dd, s_u[x], Cv * (s_hp[x] + s_G[x]));
          pdz[i * ga.dz.si] = from_f<T>(go * y * sig * (1.f + zv * (1.f - sig)));
        }
      }
      lamV = fmaf(a_next, lamV, dy * Cv);
      a_next = s_a[x];
      s_z[x] = lamV;
      s_o[x] = dy;
    }
  }
  __syncthreads();
  // 4. Row k, right to left.
  float dA = 0.f, dD = 0.f, dbias = 0.f;
  if (live && k < H) {
    const int r0 = ch + k * tp.Wp;
    float lamH = 0.f, a_next = 0.f;
#pragma unroll
    for (int j = kTileMaxSide - 1; j >= 0; --j) {
      if (j >= W) continue;
      const int x = r0 + j;
      const float a = s_a[x], lamV = s_z[x];
      lamH = fmaf(a_next, lamH, lamV);
      a_next = a;
      const float u = s_u[x], v = s_d[x] + cc.bias, Bv = s_B[k * tp.Wp + j];
      const float dt = p.softplus ? softplus_fast(v) : v;
      const float G = s_G[x], hp = s_hp[x], dy = s_o[x];
      const float gmx = j > 0 ? a * s_G[x - 1] : 0.f;  // G - x = a G[i,j-1], as hp = h - G
      const float q = fmaf(lamV, hp, lamH * gmx);
      const float ddt = fmaf(q, cc.A, lamH * Bv * u);
      s_u[x] = fmaf(lamH * Bv, dt, cc.Dd * dy);
      float dd = ddt;
      if (p.softplus) dd = v > 20.f ? ddt : ddt * sigmoid_f(v);
      s_d[x] = dd;
      s_G[x] = lamH * dt * u;  // G[i,j] was read above and (as G[i,j-1]) at j + 1
      s_hp[x] = dy * (hp + G);
      dA = fmaf(q, dt, dA);
      dD = fmaf(dy, u, dD);
      dbias += dd;
    }
  }
  // A channel's sums are spread over its L threads (consecutive lanes).
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) {
    dA += __shfl_xor_sync(kFull, dA, off);
    dD += __shfl_xor_sync(kFull, dD, off);
    dbias += __shfl_xor_sync(kFull, dbias, off);
  }
  if (live && k == 0) {
    if (ga.dA_part) static_cast<float*>(ga.dA_part)[b * D + d] = dA;
    if (ga.dD_part) static_cast<float*>(ga.dD_part)[b * D + d] = dD;
    if (ga.ddelta_bias_part) static_cast<float*>(ga.ddelta_bias_part)[b * D + d] = dbias;
  }
  __syncthreads();
  // 5. Stores.
#pragma unroll
  for (int m = 0; m < TileCells<L>::kCells; ++m) {
    if (!tc.ok[m]) continue;
    const int rr = tc.rr[m];
    if (ga.du.defined()) {
      T* base = static_cast<T*>(ga.du.data) + b * ga.du.sb + d0 * ga.du.sc + tc.off(ga.du, m);
#pragma unroll
      for (int c2 = 0; c2 < CB; ++c2)
        if (in_range(c2)) base[c2 * ga.du.sc] = from_f<T>(s_u[c2 * tp.CP + rr]);
    }
    if (ga.ddelta.defined()) {
      T* base = static_cast<T*>(ga.ddelta.data) + b * ga.ddelta.sb + d0 * ga.ddelta.sc + tc.off(ga.ddelta, m);
#pragma unroll
      for (int c2 = 0; c2 < CB; ++c2)
        if (in_range(c2)) base[c2 * ga.ddelta.sc] = from_f<T>(s_d[c2 * tp.CP + rr]);
    }
    if (kDet) {
      // Per-channel partials (b, d - d_begin, 0, i, j), float32.
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        const Grid& gg = w ? ga.dC : ga.dB;
        if (!gg.defined()) continue;
        const float* src = w ? s_hp : s_G;
        float* base = static_cast<float*>(gg.data) + b * gg.sb + (d0 - lo) * gg.sc + tc.off(gg, m);
#pragma unroll
        for (int c2 = 0; c2 < CB; ++c2)
          if (in_range(c2)) base[c2 * gg.sc] = src[c2 * tp.CP + rr];
      }
    } else {
      // The block's channels in channel order, one atomic per cell.
      float sB = 0.f, sC = 0.f;
#pragma unroll
      for (int c2 = 0; c2 < CB; ++c2) {
        if (!in_range(c2)) continue;
        sB += s_G[c2 * tp.CP + rr];
        sC += s_hp[c2 * tp.CP + rr];
      }
      if (ga.dB.defined())
        atomicAdd(static_cast<float*>(ga.dB.data) + b * ga.dB.sb + g * ga.dB.sc + tc.off(ga.dB, m), sB);
      if (ga.dC.defined())
        atomicAdd(static_cast<float*>(ga.dC.data) + b * ga.dC.sb + g * ga.dC.sc + tc.off(ga.dC, m), sC);
    }
  }
}

// Backward: the lanes of a channel as in the forward; segments of kSeg steps from the last.
// Per segment the carries entering its steps are recomputed into shared memory (cs) from the saved
// one, then the steps are walked in reverse:
//   mode R: lamV (adjoint of h) carried from step to step, lamH (adjoint of G) along k in the lanes;
//   mode C: lamH carried, lamV along k.
// Shared memory per warp (kBwdWarpFloats): five step buffers (u, delta, z, dout then dB, dC; u, delta,
// z take du, ddelta, dz) and the segment's carries.
template <typename T, int WP, int P, bool kCols, bool kDet>
__global__ void __launch_bounds__(kWarps * 32, 3) scan2d_chan_bwd_kernel(Scan2dProblem p, Scan2dBackwardArgs ga,
                                                                     int64_t b0) {
  constexpr int SW = WP + 1, CW = Layout<WP, P>::CW, KT = Layout<WP, P>::KT;
  extern __shared__ float dyn[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, pi = lane % P;
  const int64_t D = p.dim, b = blockIdx.y + b0;
  // Warps take CW-aligned channel blocks (never across a group), clipped to this call's range.
  const int64_t c0 = (ga.d_begin / CW + static_cast<int64_t>(blockIdx.x) * kWarps + warp) * CW;
  const int64_t lo = ga.d_begin, hi = ga.d_end;
  if (c0 >= hi) return;
  const bool active = c0 + lane / P >= lo && c0 + lane / P < hi;
  const int64_t d = min(max(c0 + lane / P, lo), hi - 1), g = c0 / (D / p.groups);
  const int64_t steps = kCols ? p.width : p.height;
  const int K = static_cast<int>(kCols ? p.height : p.width);
  const ChanConst cc = chan_const(p, d);
  const bool gated = p.z.defined();
  const LanePart lp = lane_part<WP, P>(lane, c0, lo, hi, K);
  float* su = dyn + warp * kBwdWarpFloats<WP>;
  float* sd = su + 32 * SW;
  float* sz = sd + 32 * SW;
  float* so = sz + 32 * SW;  // dout, then the dB of each cell
  float* sc = so + 32 * SW;  // the dC of each cell
  float* cs = sc + 32 * SW;  // the carries entering the segment's steps: [step][kk][lane]
  const int64_t nseg = (steps + kSeg - 1) / kSeg;
  float lamc[WP], ac[WP];  // the carried adjoint and the a of the step walked before (0: none)
#pragma unroll
  for (int k = 0; k < WP; ++k) lamc[k] = ac[k] = 0.f;
  float dA = 0.f, dD = 0.f, dbias = 0.f;
  // Per segment (from the last): entries e = 0 .. n-2 recompute the carries entering steps
  // t0+1 .. t0+n-1 from the saved one (into cs), entries e = n-1 .. 2n-2 walk steps t0+n-1 .. t0 back.
  // u and delta run one entry ahead (loaded while the entry before is computed); z and dout of a
  // walked step are loaded while its forward part is recomputed.
  StepLoad<T, WP, P> lu, ld;
  StepBC<WP, P> bc_next;
  auto load_ud = [&](int64_t t) {
    lu.template load<kCols>(p.u, b, c0, t, lp);
    ld.template load<kCols>(p.delta, b, c0, t, lp);
    bc_next.template load<T, kCols>(p, b, g, t, K, lane);
  };
  load_ud((nseg - 1) * kSeg);  // every segment's first entry is at its step t0
  for (int64_t seg = nseg - 1; seg >= 0; --seg) {
    const int64_t t0 = seg * kSeg;
    const int n = steps - t0 < kSeg ? static_cast<int>(steps - t0) : kSeg;
#pragma unroll
    for (int kk = 0; kk < WP; ++kk)
      cs[kk * 32 + lane] = seg > 0 && pi * WP + kk < K
                               ? ga.carries[((b * (nseg - 1) + seg - 1) * K + pi * WP + kk) * D + d] : 0.f;
#pragma unroll 1
    for (int e = 0; e <= 2 * (n - 1); ++e) {
      const bool rec = e < n - 1;
      const int s = rec ? e : 2 * (n - 1) - e;
      const int64_t t = t0 + s;
      const StepBC<WP, P> bc = bc_next;
      __syncwarp();  // the previous entry's output stores have read the buffers
      lu.put(su, lane);
      ld.put(sd, lane);
      StepLoad<T, WP, P> l0, l1;
      if (!rec) {
        if (gated) l0.template load<kCols>(p.z, b, c0, t, lp);
        l1.template load<kCols>(ga.dout, b, c0, t, lp);
      }
      __syncwarp();
      if (e < 2 * (n - 1)) {
        const int s1 = e + 1 < n - 1 ? e + 1 : 2 * (n - 1) - (e + 1);
        load_ud(t0 + s1);
      } else if (seg > 0) {
        load_ud((seg - 1) * kSeg);
      }
      // Forward of the step again: a and the in-lane chain ch (mode R: G, mode C: h) of every cell;
      // c: the carry entering the step, then (recompute entries) the one leaving it.
      float a[WP], ch[WP], c[WP];
#pragma unroll
      for (int kk = 0; kk < WP; ++kk) c[kk] = cs[(s * WP + kk) * 32 + lane];
      const float chain0 = step_cells<WP, P, kCols>(a, ch, c, su, sd, lane, pi, p, cc, K, bc, [](int, float) {});
      if (rec) {
#pragma unroll
        for (int kk = 0; kk < WP; ++kk) cs[((s + 1) * WP + kk) * 32 + lane] = c[kk];
        continue;
      }
      const float* cin = cs + s * WP * 32 + lane;  // carry entering this step, cell kk at cin[kk * 32]
      if (gated) l0.put(sz, lane);
      l1.put(so, lane);
      __syncwarp();
      // The in-lane adjoint runs along k in reverse: lam[kk] = an[kk] * lam[kk + 1] + w[kk], with
      // an the a of the next cell (0 past the last valid one) and w what enters at the cell (mode R:
      // lamV, mode C: dy * C). Across the channel's lanes it is joined like the forward chain.
      const float a_right = P > 1 ? __shfl_down_sync(kFull, a[0], 1, P) : 0.f;  // the next lane's first a
      struct CellIn {
        float w, an, dy, sig;
      };
      auto prep = [&](int kk) {
        CellIn ci;
        const int cell = pi * WP + kk;
        ci.an = cell + 1 >= K ? 0.f : kk + 1 < WP ? a[kk + 1 < WP ? kk + 1 : kk] : (pi + 1 < P ? a_right : 0.f);
        const float go = so[lane * SW + kk];
        ci.dy = go;
        ci.sig = 0.f;
        if (gated) {
          const float zv = sz[lane * SW + kk];
          ci.sig = sigmoid_f(zv);
          ci.dy = go * zv * ci.sig;
        }
        const float dyC = ci.dy * bc.C(kk, pi);
        ci.w = kCols ? dyC : fmaf(ac[kk], lamc[kk], dyC);
        return ci;
      };
      auto body = [&](int kk, float lamk, const CellIn& ci) {
        const int cell = pi * WP + kk;
        float lamV, lamH;
        if (kCols) {
          lamV = lamk;
          lamH = fmaf(ac[kk], lamc[kk], lamV);
          lamc[kk] = lamH;
        } else {
          lamV = ci.w;
          lamc[kk] = lamV;
          lamH = lamk;
        }
        const float dy = ci.dy;
        const float Bk = bc.B(kk, pi), Ck = bc.C(kk, pi);
        const float u = su[lane * SW + kk];
        const float v = sd[lane * SW + kk] + cc.bias;
        const float dt = cell < K ? (p.softplus ? softplus_fast(v) : v) : 0.f;  // as above, recomputed
        // h - G = a * (h before along the vertical), G - x = a * (G before along the horizontal):
        // the carried one from c, the in-lane one from the chain (for a lane's first cell, the chain
        // entering it).
        const float carried = a[kk] * cin[kk * 32], along = a[kk] * (kk > 0 ? ch[kk > 0 ? kk - 1 : 0] : chain0);
        const float h = kCols ? ch[kk] : ch[kk] + carried;
        const float hmG = kCols ? along : carried, gmx = kCols ? carried : along;
        const float q = fmaf(lamV, hmG, lamH * gmx);
        const float ddt = fmaf(q, cc.A, lamH * Bk * u);
        const float du = fmaf(lamH * Bk, dt, cc.Dd * dy);
        const float dBk = lamH * dt * u, dCk = dy * h;
        dA = fmaf(q, dt, dA);
        dD = fmaf(dy, u, dD);
        float dd = ddt;
        if (p.softplus) dd = v > 20.f ? ddt : ddt * sigmoid_f(v);
        if (cell < K) dbias += dd;
        su[lane * SW + kk] = du;
        sd[lane * SW + kk] = dd;
        if (gated) {
          const float zv = sz[lane * SW + kk];
          const float y = fmaf(cc.Dd, u, Ck * h);
          sz[lane * SW + kk] = so[lane * SW + kk] * y * ci.sig * (1.f + zv * (1.f - ci.sig));
        }
        so[lane * SW + kk] = dBk;
        sc[lane * SW + kk] = dCk;
      };
      if constexpr (P == 1) {  // one pass: nothing enters from other lanes
        float lamk = 0.f;
#pragma unroll
        for (int kk = WP - 1; kk >= 0; --kk) {
          const CellIn ci = prep(kk);
          lamk = fmaf(ci.an, lamk, ci.w);
          body(kk, lamk, ci);
        }
      } else {
        CellIn cells[WP];
        float Ar = 1.f, Lr = 0.f;  // the lane's summary of the reverse chain
#pragma unroll
        for (int kk = WP - 1; kk >= 0; --kk) {
          cells[kk] = prep(kk);
          Lr = fmaf(cells[kk].an, Lr, cells[kk].w);
          Ar *= cells[kk].an;
        }
        float lamk = chain_in_rev<P>(Ar, Lr, pi);
#pragma unroll
        for (int kk = WP - 1; kk >= 0; --kk) {
          lamk = fmaf(cells[kk].an, lamk, cells[kk].w);
          body(kk, lamk, cells[kk]);
        }
      }
#pragma unroll
      for (int k = 0; k < WP; ++k) ac[k] = a[k];
      __syncwarp();
      if (ga.du.defined()) store_step<T, WP, P, kCols>(su, SW, ga.du, b, c0, t, lp, lane);
      if (ga.ddelta.defined()) store_step<T, WP, P, kCols>(sd, SW, ga.ddelta, b, c0, t, lp, lane);
      if (gated && ga.dz.defined()) store_step<T, WP, P, kCols>(sz, SW, ga.dz, b, c0, t, lp, lane);
      if (kDet) {
        // Per-channel partials (b, d - d_begin, 0, i, j), float32.
        Grid gB = ga.dB, gC = ga.dC;
        if (gB.defined()) {
          gB.data = static_cast<float*>(gB.data) - lo * gB.sc;  // index by absolute channel
          store_step<float, WP, P, kCols>(so, SW, gB, b, c0, t, lp, lane);
        }
        if (gC.defined()) {
          gC.data = static_cast<float*>(gC.data) - lo * gC.sc;
          store_step<float, WP, P, kCols>(sc, SW, gC, b, c0, t, lp, lane);
        }
      } else {
        // Sum over the warp's channels in channel order, one atomic per cell: value v = 32 j + lane
        // is dB (v < KT) or dC of cell v % KT, so consecutive lanes add to consecutive cells.
#pragma unroll
        for (int j = 0; j < (2 * KT + 31) / 32; ++j) {
          const int v = j * 32 + lane, cell = v % KT;
          if (v >= 2 * KT || cell >= K) continue;
          const bool isC = v >= KT;
          const float* col = (isC ? sc : so) + (cell / WP) * SW + cell % WP;
          float part[4] = {0.f, 0.f, 0.f, 0.f};  // four chains in a fixed order: less latency, same result every call
#pragma unroll
          for (int i = 0; i < CW; ++i) part[i & 3] += col[i * P * SW];
          const float sum = (part[0] + part[1]) + (part[2] + part[3]);
          const Grid& gg = isC ? ga.dC : ga.dB;
          if (gg.defined()) {
            float* base = static_cast<float*>(gg.data) + b * gg.sb + g * gg.sc;
            atomicAdd(base + t * step_stride<kCols>(gg) + cell * inner_stride<kCols>(gg), sum);
          }
        }
      }
    }
  }
  // A channel's sums are spread over its P lanes.
#pragma unroll
  for (int off = P / 2; off > 0; off >>= 1) {
    dA += __shfl_xor_sync(kFull, dA, off);
    dD += __shfl_xor_sync(kFull, dD, off);
    dbias += __shfl_xor_sync(kFull, dbias, off);
  }
  if (active && pi == 0) {
    if (ga.dA_part) static_cast<float*>(ga.dA_part)[b * D + d] = dA;
    if (ga.dD_part) static_cast<float*>(ga.dD_part)[b * D + d] = dD;
    if (ga.ddelta_bias_part) static_cast<float*>(ga.ddelta_bias_part)[b * D + d] = dbias;
  }
}

// Mode C when the scanned grid's rows are the strided side (and its columns fit the lanes), or
// when only its columns are short.
bool chan_cols(const Scan2dProblem& p) {
  const bool rows = scan2d_chan_shape(p.height, p.width), cols = scan2d_chan_shape(p.width, p.height);
  if (rows != cols) return cols;
  return std::llabs(p.u.si) < std::llabs(p.u.sj);
}

// (cells per lane, lanes per channel) for the short side: 8 x 1, 8 x 2 (up to 16), 8 x 4 (up to 32), 8 x 8.
template <typename F>
void with_shape(const Scan2dProblem& p, F&& f) {
  using std::integral_constant;
  const bool cols = chan_cols(p);
  const int64_t K = cols ? p.height : p.width;
  auto go = [&](auto wp, auto lanes) {
    cols ? f(wp, lanes, std::true_type{}) : f(wp, lanes, std::false_type{});
  };
  if (K <= 8) go(integral_constant<int, 8>{}, integral_constant<int, 1>{});
  else if (K <= 16) go(integral_constant<int, 8>{}, integral_constant<int, 2>{});
  else if (K <= 32) go(integral_constant<int, 8>{}, integral_constant<int, 4>{});
  else go(integral_constant<int, 8>{}, integral_constant<int, 8>{});
}

// Both sides of at most 16 cells: the whole-channel kernels (tile_fwd, tile_bwd) instead of the walk.
bool chan_tile(const Scan2dProblem& p) { return scan2d_chan_tile(p.height, p.width); }

template <typename F>
void with_tile_lanes(const Scan2dProblem& p, F&& f) {
  if (std::max(p.height, p.width) <= 8) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

void tile_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o, cudaStream_t stream) {
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_tile_lanes(p, [&](auto lanes) {
      constexpr int L = decltype(lanes)::value, CB = kTileThreads / L;
      const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
      const size_t smem = static_cast<size_t>(tile_smem_floats<CB>(H, W)) * sizeof(float);  // <= 37 KB
      const unsigned blocks = static_cast<unsigned>((p.dim + CB - 1) / CB);
      for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
        dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
        scan2d_chan_tile_fwd_kernel<T, L><<<grid, kTileThreads, smem, stream>>>(p, o, b0);
        SSM2D_CUDA_CHECK_LAUNCH("scan2d_chan_tile_fwd_kernel");
      }
    });
  });
}

void tile_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& a, cudaStream_t stream) {
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_tile_lanes(p, [&](auto lanes) {
      constexpr int L = decltype(lanes)::value, CB = kTileThreads / L;
      const int H = static_cast<int>(p.height), W = static_cast<int>(p.width);
      const int smem = tile_bwd_smem_floats<CB>(H, W) * static_cast<int>(sizeof(float));  // <= 63 KB
      auto kernel = a.deterministic ? scan2d_chan_tile_bwd_kernel<T, L, true> : scan2d_chan_tile_bwd_kernel<T, L, false>;
      SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      const unsigned blocks = static_cast<unsigned>((a.d_end + CB - 1) / CB - a.d_begin / CB);
      for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
        dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
        kernel<<<grid, kTileThreads, smem, stream>>>(p, a, b0);
        SSM2D_CUDA_CHECK_LAUNCH("scan2d_chan_tile_bwd_kernel");
      }
    });
  });
}

}  // namespace

bool scan2d_chan_fit(const Scan2dProblem& p) {
  return scan2d_chan_fit(p.batch, p.dim, p.groups, p.dstate, p.height, p.width);
}

void scan2d_chan_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o) {
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  if (chan_tile(p)) return tile_forward(p, o, stream);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_shape(p, [&](auto wp, auto lanes, auto cols) {
      constexpr int WP = decltype(wp)::value, P = decltype(lanes)::value;
      constexpr bool C = decltype(cols)::value;
      constexpr int64_t per_block = Layout<WP, P>::CW * kWarps;
      const unsigned blocks = static_cast<unsigned>((p.dim + per_block - 1) / per_block);
      for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
        dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
        scan2d_chan_fwd_kernel<T, WP, P, C><<<grid, kWarps * 32, 0, stream>>>(p, o, b0);
        SSM2D_CUDA_CHECK_LAUNCH("scan2d_chan_fwd_kernel");
      }
    });
  });
}

void scan2d_chan_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& a) {
  if (!a.carries && scan2d_chan_carry_floats(p.batch, p.dim, p.height, p.width) > 0)
    throw ArgumentError("scan2d_backward: carries are required on CUDA");
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  if (chan_tile(p)) return tile_backward(p, a, stream);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_shape(p, [&](auto wp, auto lanes, auto cols) {
      constexpr int WP = decltype(wp)::value, P = decltype(lanes)::value;
      constexpr bool C = decltype(cols)::value;
      constexpr int64_t CW = Layout<WP, P>::CW;
      const int64_t warps = (a.d_end + CW - 1) / CW - a.d_begin / CW;
      const unsigned blocks = static_cast<unsigned>((warps + kWarps - 1) / kWarps);
      auto kernel = a.deterministic ? scan2d_chan_bwd_kernel<T, WP, P, C, true> : scan2d_chan_bwd_kernel<T, WP, P, C, false>;
      const int smem = kWarps * kBwdWarpFloats<WP> * static_cast<int>(sizeof(float));
      SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
        dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
        kernel<<<grid, kWarps * 32, smem, stream>>>(p, a, b0);
        SSM2D_CUDA_CHECK_LAUNCH("scan2d_chan_bwd_kernel");
      }
    });
  });
}

}  // namespace ssm2d::cuda
