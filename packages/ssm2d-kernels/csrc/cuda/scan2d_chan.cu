// scan2d (2DMamba) on CUDA for N == 1 on narrow grids (one side <= 16), forward and backward: a
// lane per (batch, channel), the whole recurrence of the channel in the lane.
//
// Why. At 2DVMamba's later stages (N = 1, 14x14 and 7x7 grids, B = 64, hundreds of channels) a warp
// per (batch, channel) with a lane per column leaves most lanes idle (14 or 7 of 32) and pays a warp
// scan (shuffles) per row for 14 cells. Here lane l of a warp owns channel d0 + l of one batch item:
//   * the grid is walked along its long side ("outer" steps t), the short side ("inner" k < K <= 16)
//     held in registers;
//   * one of the two recurrences runs along k inside the lane (a chain of K FMAs), the other carries
//     from step to step in a register per k: no shuffles, no barriers, no idle lanes;
//   * the per-channel operands of a step (K cells of each of the warp's 32 channels) are loaded by the
//     warp together, cell-contiguous (coalesced), and transposed through shared memory so that each
//     lane reads its own channel's cells; outputs take the same way back.
// Rows-first on the grid walked by rows (mode R): G along k in the lane, h carried from row to row.
// When the scanned grid's rows are the short, strided side (columns-first routes read in place) the
// walk goes along the memory's rows instead (mode C): the carry is then G, the in-lane chain is h.
// The 32 channels of a warp share one group (G == 1 or channels per group a multiple of 32), so B and
// C of a step are loaded once per warp and broadcast by shuffles.
//
// Saved for the backward: the carry entering every kScan2dChanSegment-th step, per (batch, segment,
// k, channel): about u's element count / kScan2dChanSegment floats. The backward walks the segments
// bottom-up, recomputes a segment's carries from its saved one into shared memory, and runs the adjoint
// of SCANS.md section 1 step by step; dB and dC are summed over the warp's 32 channels in shared
// memory (fixed order) and added with one atomic per cell and warp, or written per channel in the
// deterministic mode. dA, dD and ddelta_bias leave as per-(batch, channel) sums.
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
// Shared floats per warp of the backward: five step buffers [32 channels][WP + 1] (u, delta, z,
// dout / dB, dC) and the carries entering a segment's steps [kSeg][WP][32].
template <int WP> constexpr int kBwdWarpFloats = 5 * 32 * (WP + 1) + kSeg * WP * 32;

// Element (t, k) of one operand of the walk: base + t*st + k*sk (mode C swaps the logical axes).
template <bool kCols>
__device__ __forceinline__ int64_t step_stride(const Grid& g) { return kCols ? g.sj : g.si; }
template <bool kCols>
__device__ __forceinline__ int64_t inner_stride(const Grid& g) { return kCols ? g.si : g.sj; }

// A lane's part in the warp's cooperative loads and stores of a step: cell k of channels
// c0 + m*(32/WP) + sub for m < WP (consecutive lanes take consecutive cells of a channel, so one
// instruction covers 32/WP channels' rows), where bit m of `valid` says the channel is in range and
// k < K. Computed once per kernel.
struct LanePart {
  int k, sub;
  unsigned valid;
};
template <int WP>
__device__ __forceinline__ LanePart lane_part(int lane, int64_t c0, int64_t lo, int64_t hi, int K) {
  constexpr int kIpi = 32 / WP;
  LanePart lp{lane % WP, lane / WP, 0u};
#pragma unroll
  for (int m = 0; m < WP; ++m) {
    const int64_t c = c0 + m * kIpi + lp.sub;
    if (lp.k < K && c >= lo && c < hi) lp.valid |= 1u << m;
  }
  return lp;
}
// Where the lane's first element (m = 0) of step t of grid g is; element m is m*(32/WP)*sc further.
template <typename T, bool kCols>
__device__ __forceinline__ T* step_ptr(const Grid& g, int64_t b, int64_t c0, int64_t t, const LanePart& lp) {
  return static_cast<T*>(g.data) + b * g.sb + t * step_stride<kCols>(g) +
         static_cast<int64_t>(lp.k) * inner_stride<kCols>(g) + (c0 + lp.sub) * g.sc;
}

// One step of one per-channel operand for the warp's 32 channels (0 where not valid).
template <typename T, int WP>
struct StepLoad {
  T v[WP];
  template <bool kCols>
  __device__ __forceinline__ void load(const Grid& g, int64_t b, int64_t c0, int64_t t, const LanePart& lp) {
    constexpr int kIpi = 32 / WP;
    const T* ptr = step_ptr<const T, kCols>(g, b, c0, t, lp);
    const int64_t next = kIpi * g.sc;
#pragma unroll
    for (int m = 0; m < WP; ++m) {
      v[m] = (lp.valid >> m) & 1u ? *ptr : from_f<T>(0.f);
      // An opaque step: otherwise the 16 offsets m * next are hoisted out of the step loop and held
      // in 32 registers per operand.
      asm("add.s64 %0, %0, %1;" : "+l"(ptr) : "l"(next * static_cast<int64_t>(sizeof(T))));
    }
  }
  // Into the warp's transposed buffer: channel slot img at s[img * (WP + 1) + k].
  __device__ __forceinline__ void put(float* s, const LanePart& lp) const {
    constexpr int kIpi = 32 / WP;
#pragma unroll
    for (int m = 0; m < WP; ++m) s[(m * kIpi + lp.sub) * (WP + 1) + lp.k] = to_f(v[m]);
  }
};

// The reverse of StepLoad: writes the warp's transposed buffer s (channel slot img at
// s[img * pitch + k]) to grid g at step t, valid elements only.
template <typename T, int WP, bool kCols>
__device__ __forceinline__ void store_step(const float* s, int pitch, const Grid& g, int64_t b, int64_t c0, int64_t t,
                                           const LanePart& lp) {
  constexpr int kIpi = 32 / WP;
  T* ptr = step_ptr<T, kCols>(g, b, c0, t, lp);
  const int64_t next = kIpi * g.sc;
#pragma unroll
  for (int m = 0; m < WP; ++m) {
    if ((lp.valid >> m) & 1u) *ptr = from_f<T>(s[(m * kIpi + lp.sub) * pitch + lp.k]);
    asm("add.s64 %0, %0, %1;" : "+l"(ptr) : "l"(next * static_cast<int64_t>(sizeof(T))));  // as in StepLoad
  }
}

// B (lanes 0..WP-1) and C (lanes WP..2WP-1) of one step of the warp's group; read by shuffles.
template <typename T, int WP, bool kCols>
__device__ __forceinline__ float load_bc(const Scan2dProblem& p, int64_t b, int64_t g, int64_t t, int K, int lane,
                                         bool withC) {
  const int k = lane % WP;
  const bool isC = lane >= WP;
  if (k >= K || lane >= 2 * WP || (isC && !withC)) return 0.f;
  const Grid& G = isC ? p.C : p.B;
  const T* base = static_cast<const T*>(G.data) + b * G.sb + g * G.sc;
  return to_f(base[t * step_stride<kCols>(G) + static_cast<int64_t>(k) * inner_stride<kCols>(G)]);
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
__device__ __forceinline__ float ex2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float lg2_fast(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
constexpr float kLn2 = 0.6931471805599453f;
__device__ __forceinline__ float softplus_fast(float v) {
  return v > 20.f ? v : kLn2 * lg2_fast(1.f + ex2_fast(v * kLog2e));
}
__device__ __forceinline__ float sigmoid_fast(float v) { return __fdividef(1.f, 1.f + ex2_fast(-v * kLog2e)); }

__device__ __forceinline__ float dt_of(const Scan2dProblem& p, float delta, float bias) {
  const float v = delta + bias;
  return p.softplus ? softplus_fast(v) : v;
}

// One forward step of a lane given the carry entering it (updated in place): mode R carries h
// (G runs along k), mode C carries G (h runs along k). emit(k, u, h) sees each cell's h.
// Cells k >= K have dt = 0 (a = 1, x = 0) and come after the valid ones: they touch nothing valid.
template <int WP, bool kCols, typename Emit>
__device__ __forceinline__ void step_forward(float (&carry)[WP], const float* su, const float* sd, int lane,
                                             const Scan2dProblem& p, const ChanConst& cc, int K, float bcB,
                                             Emit&& emit) {
  float chain = 0.f;
#pragma unroll
  for (int k = 0; k < WP; ++k) {
    const float u = su[lane * (WP + 1) + k];
    const float dt = k < K ? dt_of(p, sd[lane * (WP + 1) + k], cc.bias) : 0.f;
    const float a = ex2_fast(dt * cc.A2);
    const float x = dt * __shfl_sync(kFull, bcB, k) * u;
    if (kCols) {
      carry[k] = fmaf(a, carry[k], x);
      chain = fmaf(a, chain, carry[k]);
      emit(k, u, chain);
    } else {
      chain = fmaf(a, chain, x);
      carry[k] = fmaf(a, carry[k], chain);
      emit(k, u, carry[k]);
    }
  }
}

template <typename T, int WP, bool kCols>
__global__ void __launch_bounds__(kWarps * 32, 4) scan2d_chan_fwd_kernel(Scan2dProblem p, Scan2dForwardOutputs o,
                                                                     int64_t b0) {
  constexpr int SW = WP + 1;
  __shared__ float smem[kWarps][3][32 * SW];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t D = p.dim, c0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * 32, b = blockIdx.y + b0;
  if (c0 >= D) return;
  const int64_t d = min(c0 + lane, D - 1), g = c0 / (D / p.groups);
  const int64_t steps = kCols ? p.width : p.height;
  const int K = static_cast<int>(kCols ? p.height : p.width);
  const ChanConst cc = chan_const(p, d);
  const bool gated = p.z.defined();
  const LanePart lp = lane_part<WP>(lane, c0, 0, D, K);
  float* su = smem[warp][0];
  float* sd = smem[warp][1];
  float* sz = smem[warp][2];
  const int64_t nseg1 = (steps + kSeg - 1) / kSeg - 1;
  float carry[WP];
#pragma unroll
  for (int k = 0; k < WP; ++k) carry[k] = 0.f;
  // The operands of step t + 1 are loaded while step t is computed (one memory latency per step
  // hidden behind the arithmetic instead of added to it).
  StepLoad<T, WP> lu, ld, lz;
  auto load_step = [&](int64_t t) {
    lu.template load<kCols>(p.u, b, c0, t, lp);
    ld.template load<kCols>(p.delta, b, c0, t, lp);
    if (gated) lz.template load<kCols>(p.z, b, c0, t, lp);
    return load_bc<T, WP, kCols>(p, b, g, t, K, lane, true);
  };
  float bc_next = load_step(0);
  for (int64_t t = 0; t < steps; ++t) {
    const float bc = bc_next;
    __syncwarp();  // the previous step's output reads of su are done
    lu.put(su, lp);
    ld.put(sd, lp);
    if (gated) lz.put(sz, lp);
    __syncwarp();
    if (t + 1 < steps) bc_next = load_step(t + 1);
    // y over u in the buffer: a lane reads and writes only its own channel's slots.
    auto emit = [&](int k, float u, float h) {
      float y = fmaf(cc.Dd, u, __shfl_sync(kFull, bc, WP + k) * h);
      if (gated) {
        const float zv = sz[lane * SW + k];
        y *= zv * sigmoid_fast(zv);
      }
      su[lane * SW + k] = y;
    };
    step_forward<WP, kCols>(carry, su, sd, lane, p, cc, K, bc, emit);
    if (o.carries && (t + 1) % kSeg == 0 && t + 1 < steps && c0 + lane < D) {
      float* ck = o.carries + ((b * nseg1 + (t + 1) / kSeg - 1) * K) * D + d;
#pragma unroll
      for (int k = 0; k < WP; ++k)
        if (k < K) ck[k * D] = carry[k];
    }
    __syncwarp();
    store_step<T, WP, kCols>(su, SW, o.out, b, c0, t, lp);
  }
}

// Backward: one lane per (batch, channel) as in the forward; segments of kSeg steps from the last.
// Per segment the carries entering its steps are recomputed into shared memory (cs) from the saved
// one, then the steps are walked in reverse:
//   mode R: lamV (adjoint of h) carried from step to step, lamH (adjoint of G) along k in the lane;
//   mode C: lamH carried, lamV along k.
// Shared memory per warp (kBwdWarpFloats): five step buffers (u, delta, z, dout then dB, dC; u, delta,
// z take du, ddelta, dz) and the segment's carries.
template <typename T, int WP, bool kCols, bool kDet>
__global__ void __launch_bounds__(kWarps * 32, 3) scan2d_chan_bwd_kernel(Scan2dProblem p, Scan2dBackwardArgs ga,
                                                                     int64_t b0) {
  constexpr int SW = WP + 1;
  extern __shared__ float dyn[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t D = p.dim, b = blockIdx.y + b0;
  // Warps take 32-aligned channel blocks (never across a group), clipped to this call's range.
  const int64_t c0 = (ga.d_begin / 32 + static_cast<int64_t>(blockIdx.x) * kWarps + warp) * 32;
  const int64_t lo = ga.d_begin, hi = ga.d_end;
  if (c0 >= hi) return;
  const bool active = c0 + lane >= lo && c0 + lane < hi;
  const int64_t d = min(max(c0 + lane, lo), hi - 1), g = c0 / (D / p.groups);
  const int64_t steps = kCols ? p.width : p.height;
  const int K = static_cast<int>(kCols ? p.height : p.width);
  const ChanConst cc = chan_const(p, d);
  const bool gated = p.z.defined();
  const LanePart lp = lane_part<WP>(lane, c0, lo, hi, K);
  float* su = dyn + warp * kBwdWarpFloats<WP>;
  float* sd = su + 32 * SW;
  float* sz = sd + 32 * SW;
  float* so = sz + 32 * SW;  // dout, then the dB of each cell
  float* sc = so + 32 * SW;  // the dC of each cell
  float* cs = sc + 32 * SW;  // the carries entering the segment's steps: [step][k][lane]
  const int64_t nseg = (steps + kSeg - 1) / kSeg;
  float lamc[WP], ac[WP];  // the carried adjoint and the a of the step walked before (0: none)
#pragma unroll
  for (int k = 0; k < WP; ++k) lamc[k] = ac[k] = 0.f;
  float dA = 0.f, dD = 0.f, dbias = 0.f;
  // Per segment (from the last): entries e = 0 .. n-2 recompute the carries entering steps
  // t0+1 .. t0+n-1 from the saved one (into cs), entries e = n-1 .. 2n-2 walk steps t0+n-1 .. t0 back.
  // u and delta run one entry ahead (loaded while the entry before is computed); z and dout of a
  // walked step are loaded while its forward part is recomputed.
  StepLoad<T, WP> lu, ld;
  auto load_ud = [&](int64_t t) {
    lu.template load<kCols>(p.u, b, c0, t, lp);
    ld.template load<kCols>(p.delta, b, c0, t, lp);
    return load_bc<T, WP, kCols>(p, b, g, t, K, lane, true);
  };
  float bc_next = load_ud((nseg - 1) * kSeg);  // every segment's first entry is at its step t0
  for (int64_t seg = nseg - 1; seg >= 0; --seg) {
    const int64_t t0 = seg * kSeg;
    const int n = steps - t0 < kSeg ? static_cast<int>(steps - t0) : kSeg;
#pragma unroll
    for (int k = 0; k < WP; ++k)
      cs[k * 32 + lane] = seg > 0 && k < K ? ga.carries[((b * (nseg - 1) + seg - 1) * K + k) * D + d] : 0.f;
#pragma unroll 1
    for (int e = 0; e <= 2 * (n - 1); ++e) {
      const bool rec = e < n - 1;
      const int s = rec ? e : 2 * (n - 1) - e;
      const int64_t t = t0 + s;
      const float bc = bc_next;
      __syncwarp();  // the previous entry's output stores have read the buffers
      lu.put(su, lp);
      ld.put(sd, lp);
      StepLoad<T, WP> l0, l1;
      if (!rec) {
        if (gated) l0.template load<kCols>(p.z, b, c0, t, lp);
        l1.template load<kCols>(ga.dout, b, c0, t, lp);
      }
      __syncwarp();
      if (e < 2 * (n - 1)) {
        const int s1 = e + 1 < n - 1 ? e + 1 : 2 * (n - 1) - (e + 1);
        bc_next = load_ud(t0 + s1);
      } else if (seg > 0) {
        bc_next = load_ud((seg - 1) * kSeg);
      }
      if (rec) {
        float c[WP];
#pragma unroll
        for (int k = 0; k < WP; ++k) c[k] = cs[(s * WP + k) * 32 + lane];
        step_forward<WP, kCols>(c, su, sd, lane, p, cc, K, bc, [](int, float, float) {});
#pragma unroll
        for (int k = 0; k < WP; ++k) cs[((s + 1) * WP + k) * 32 + lane] = c[k];
        continue;
      }
      const float* cin = cs + s * WP * 32 + lane;  // carry entering this step, k at cin[k * 32]
    // Forward of the step again: a, x, G and h of every k.
      // ch: the in-lane chain (mode R: G, mode C: h), as the forward computed it.
      float a[WP], ch[WP];
      {
        float chain = 0.f;
#pragma unroll
        for (int k = 0; k < WP; ++k) {
          const float u = su[lane * SW + k];
          const float dt = k < K ? dt_of(p, sd[lane * SW + k], cc.bias) : 0.f;
          a[k] = ex2_fast(dt * cc.A2);
          const float x = dt * __shfl_sync(kFull, bc, k) * u;
          chain = fmaf(a[k], chain, kCols ? fmaf(a[k], cin[k * 32], x) : x);
          ch[k] = chain;
        }
      }
      if (gated) l0.put(sz, lp);
      l1.put(so, lp);
      __syncwarp();
      // Reverse: k from the last valid cell down; padded cells have dout = 0 and lam = 0.
      float lamk = 0.f;  // the in-lane adjoint entering from k + 1
#pragma unroll
      for (int k = WP - 1; k >= 0; --k) {
        const float anext = k + 1 < WP && k + 1 < K ? a[k + 1] : 0.f;
        const float go = so[lane * SW + k];
        float dy = go, zv = 0.f, sig = 0.f;
        if (gated) {
          zv = sz[lane * SW + k];
          sig = sigmoid_fast(zv);
          dy = go * zv * sig;
        }
        const float Bk = __shfl_sync(kFull, bc, k), Ck = __shfl_sync(kFull, bc, WP + k);
        float lamV, lamH;
        if (kCols) {
          lamV = fmaf(anext, lamk, dy * Ck);
          lamk = lamV;
          lamH = fmaf(ac[k], lamc[k], lamV);
          lamc[k] = lamH;
        } else {
          lamV = fmaf(ac[k], lamc[k], dy * Ck);
          lamc[k] = lamV;
          lamH = fmaf(anext, lamk, lamV);
          lamk = lamH;
        }
        const float u = su[lane * SW + k];
        const float v = sd[lane * SW + k] + cc.bias;
        const float dt = k < K ? (p.softplus ? softplus_fast(v) : v) : 0.f;  // as above, recomputed
        // h - G = a * (h before along the vertical), G - x = a * (G before along the horizontal):
        // the carried one from c, the in-lane one from the chain.
        const float carried = a[k] * cin[k * 32], along = k > 0 ? a[k] * ch[k - 1] : 0.f;
        const float h = kCols ? ch[k] : ch[k] + carried;
        const float hmG = kCols ? along : carried, gmx = kCols ? carried : along;
        const float q = fmaf(lamV, hmG, lamH * gmx);
        const float ddt = fmaf(q, cc.A, lamH * Bk * u);
        const float du = fmaf(lamH * Bk, dt, cc.Dd * dy);
        const float dBk = lamH * dt * u, dCk = dy * h;
        dA = fmaf(q, dt, dA);
        dD = fmaf(dy, u, dD);
        float dd = ddt;
        if (p.softplus) dd = v > 20.f ? ddt : ddt * sigmoid_fast(v);
        if (k < K) dbias += dd;
        su[lane * SW + k] = du;
        sd[lane * SW + k] = dd;
        if (gated) {
          const float y = fmaf(cc.Dd, u, Ck * h);
          sz[lane * SW + k] = go * y * sig * (1.f + zv * (1.f - sig));
        }
        so[lane * SW + k] = dBk;
        sc[lane * SW + k] = dCk;
      }
#pragma unroll
      for (int k = 0; k < WP; ++k) ac[k] = a[k];
      __syncwarp();
      if (ga.du.defined()) store_step<T, WP, kCols>(su, SW, ga.du, b, c0, t, lp);
      if (ga.ddelta.defined()) store_step<T, WP, kCols>(sd, SW, ga.ddelta, b, c0, t, lp);
      if (gated && ga.dz.defined()) store_step<T, WP, kCols>(sz, SW, ga.dz, b, c0, t, lp);
      if (kDet) {
        // Per-channel partials (b, d - d_begin, 0, i, j), float32.
        Grid gB = ga.dB, gC = ga.dC;
        if (gB.defined()) {
          gB.data = static_cast<float*>(gB.data) - lo * gB.sc;  // index by absolute channel
          store_step<float, WP, kCols>(so, SW, gB, b, c0, t, lp);
        }
        if (gC.defined()) {
          gC.data = static_cast<float*>(gC.data) - lo * gC.sc;
          store_step<float, WP, kCols>(sc, SW, gC, b, c0, t, lp);
        }
      } else if (lane < 2 * WP && lane % WP < K) {
        // Sum over the warp's channels in channel order, one atomic per cell.
        const bool isC = lane >= WP;
        const float* col = (isC ? sc : so) + lane % WP;
        float part[4] = {0.f, 0.f, 0.f, 0.f};  // four chains in a fixed order: less latency, same result every call
#pragma unroll
        for (int i = 0; i < 32; ++i) part[i & 3] += col[i * SW];
        const float sum = (part[0] + part[1]) + (part[2] + part[3]);
        const Grid& gg = isC ? ga.dC : ga.dB;
        if (gg.defined()) {
          const int64_t k = lane % WP;
          float* base = static_cast<float*>(gg.data) + b * gg.sb + g * gg.sc;
          atomicAdd(base + t * step_stride<kCols>(gg) + k * inner_stride<kCols>(gg), sum);
        }
      }
    }
  }
  if (active) {
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

template <typename F>
void with_shape(const Scan2dProblem& p, F&& f) {
  const bool cols = chan_cols(p);
  const int64_t K = cols ? p.height : p.width;
  if (K <= 8) cols ? f(std::integral_constant<int, 8>{}, std::true_type{}) : f(std::integral_constant<int, 8>{}, std::false_type{});
  else cols ? f(std::integral_constant<int, 16>{}, std::true_type{}) : f(std::integral_constant<int, 16>{}, std::false_type{});
}

}  // namespace

bool scan2d_chan_fit(const Scan2dProblem& p) {
  return scan2d_chan_fit(p.batch, p.dim, p.groups, p.dstate, p.height, p.width);
}

void scan2d_chan_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o) {
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  const unsigned blocks = static_cast<unsigned>((p.dim + 32 * kWarps - 1) / (32 * kWarps));
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_shape(p, [&](auto wp, auto cols) {
      for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
        dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
        constexpr int WP = decltype(wp)::value;
        constexpr bool C = decltype(cols)::value;
        scan2d_chan_fwd_kernel<T, WP, C><<<grid, kWarps * 32, 0, stream>>>(p, o, b0);
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
  const int64_t warps = (a.d_end + 31) / 32 - a.d_begin / 32;
  const unsigned blocks = static_cast<unsigned>((warps + kWarps - 1) / kWarps);
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    with_shape(p, [&](auto wp, auto cols) {
      constexpr int WP = decltype(wp)::value;
      constexpr bool C = decltype(cols)::value;
      auto kernel = a.deterministic ? scan2d_chan_bwd_kernel<T, WP, C, true> : scan2d_chan_bwd_kernel<T, WP, C, false>;
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
