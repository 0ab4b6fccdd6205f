// scan2d (2DMamba) on CUDA: lane = column, no serial walk over tiles.
//
// Forward. A warp owns one (batch, channel, column band of 32*CPL columns) and NS states, and walks
// the rows top to bottom; lane l owns the CPL consecutive columns l*CPL.. of the band. Per row and
// state:
//   * the horizontal recurrence G = a G + x across the band is one warp scan of affine maps
//     (band_scan: CPL-long local scans, 5 shuffle steps, a fix-up), entered by the G carry of the
//     bands to the left;
//   * the vertical recurrence h = a h + G is one FMA per column, h in a register (the lane owns the
//     column: no transpose, no shared tile);
//   * y += C h in registers.
// The NW = ceil(N / NS) warps of one (batch, channel, band) form a block and sum y over the states
// through shared memory in a fixed order (one barrier per row, double-buffered): y is deterministic.
// With one warp per (batch, channel, band) (N small) four of them share a block without barriers.
//
// Bands are independent after a small pre-pass (only when W > 32*CPL): for each (row, band), the sum
// of dt over the band (the band's decay is exp(A * sum dt)) and, per state, the G leaving it from a
// zero carry; the band-k warp folds the summaries of bands 0..k-1 into its carry (k FMAs per row and
// state). Nothing runs serially but each warp's walk down its rows, and every (batch, channel, band,
// state group) runs at once.
//
// Saved for the backward (`carries`): h at every kSegment-th row, N/kSegment of u's element count
// in float32 (none when H <= kSegment).
//
// Backward: the adjoint of SCANS.md section 1 from the bottom-right, per (batch, channel, state):
//   lamV[i,j] = dy C + a[i+1,j] lamV[i+1,j]     reverse vertical: one FMA per lane, lamV in a register
//   lamH[i,j] = lamV + a[i,j+1] lamH[i,j+1]     reverse horizontal: one reverse band scan per row
//   q = lamV*(h - G) + lamH*(G - x),  h - G = a h[i-1,j]
// with the same warps, bands and state groups as the forward. h is needed going upwards: each
// segment of kSegment rows is recomputed top-down from its saved h into shared memory, then walked
// bottom-up. The reverse band carries come from a pre-pass that walks each band bottom-up alone
// (lamV needs nothing from other bands) and stores the lamH-carry leaving it on the left from zero.
// dA, dD, ddelta_bias are summed per band in a fixed order, then over the bands by a small kernel;
// dB/dC sum over the channels of a group with float32 atomics or, deterministically, as per-channel
// partials the caller sums in order.
#include <algorithm>
#include <cstdlib>

#include "common.cuh"
#include "scan2d_common.cuh"
#include "ssm2d/scan2d.h"

namespace ssm2d::cuda {
namespace {

using namespace s2d;

constexpr int kSegment = kScan2dSegment;  // rows between saved h rows
constexpr int kSummaryRows = 4;           // rows per warp in the forward band pre-pass
constexpr int64_t kMaxGridY = 65535;

// Warps of one (batch, channel, band): 16 with one state per warp, else 8 (the register budget then
// stays at 255 per thread: 256 threads per block at most).
template <int NS> constexpr int kMaxWarps = NS == 1 ? 16 : 8;

// The launch geometry shared by the kernels of one call.
struct Plan {
  int64_t nb = 1;                  // column bands of 32*CPL
  int nw = 1;                      // warps per (batch, channel, band)
  int ipb = 1;                     // (batch, channel, band) items per block (nw == 1 only)
  int64_t d_begin = 0, d_end = 0;  // channels of this call
  int64_t n_begin = 0, n_end = 0;  // states of this pass
  bool first = true, last = true;  // several passes add per-cell partial sums in `acc`
  float* sumdt = nullptr;          // (batch, dim, H, nb): sum of dt over each band
  float* S = nullptr;              // (batch, dim, N, H, nb - 1): G leaving band m from zero
  float* Srev = nullptr;           // (batch, dim, N, H, nb - 1): lamH carry leaving band m+1 on the left
  float* acc = nullptr;            // per-cell partial sums between passes
  float* part = nullptr;           // backward: (batch, dim, nb, N + 2) per-band dA, dD, ddelta_bias
};

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- Band summaries -------------------------------------------------------------------------------

// Per (row, band): sum(dt) over the band (all bands) and, per state, the G leaving it from a zero
// carry (bands < nb - 1). One warp per (batch, channel, band, kSummaryRows rows), all states.
template <typename T, int CPL>
__global__ void __launch_bounds__(128) scan2d_summary_kernel(Scan2dProblem p, Plan L, int64_t b0) {
  constexpr int BW = 32 * CPL;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t H = p.height, W = p.width, N = p.dstate, nb = L.nb;
  const int64_t nrb = ceil_div(H, kSummaryRows);
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (wid >= (L.d_end - L.d_begin) * nb * nrb) return;
  const int64_t d = L.d_begin + wid / (nb * nrb), m = (wid / nrb) % nb, rb = wid % nrb, b = blockIdx.y + b0;
  const int64_t g = d / (p.dim / p.groups), j0 = m * BW + lane * CPL;
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float* A = static_cast<const float*>(p.A);
  const Plane<const T> u = plane<const T>(p.u, b, d, 0), delta = plane<const T>(p.delta, b, d, 0);
  float* sdt = L.sumdt + (b * p.dim + d) * H * nb;
  float* S = L.S + (b * p.dim + d) * N * H * (nb - 1);
  for (int64_t i = rb * kSummaryRows; i < min(H, rb * kSummaryRows + kSummaryRows); ++i) {
    float dt[CPL], dtu[CPL], tot = 0.f;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t j = min(j0 + k, W - 1);
      const float v = to_f(delta.at(i, j)) + bias;
      dt[k] = j0 + k < W ? (p.softplus ? softplus_f(v) : v) : 0.f;
      dtu[k] = dt[k] * to_f(u.at(i, j));
      tot += dt[k];
    }
    tot = warp_sum(tot);
    if (lane == 0) sdt[i * nb + m] = tot;
    if (m == nb - 1) continue;  // the last band's leaving G is never needed
    for (int64_t n = 0; n < N; ++n) {
      const float A2 = A[d * p.A_sd + n * p.A_sn] * kLog2e;
      const Plane<const T> Bn = plane<const T>(p.B, b, g, n);
      float a[CPL], x[CPL];
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        a[k] = exp2f(dt[k] * A2);
        x[k] = dtu[k] * to_f(Bn.at(i, j0 + k));
      }
      const float leave = band_total<CPL, false>(a, x, lane);
      if (lane == 0) S[(n * H + i) * (nb - 1) + m] = leave;
    }
  }
}

template <typename T, int CPL>
void launch_summaries(const Scan2dProblem& p, const Plan& L, cudaStream_t stream) {
  const int64_t warps = (L.d_end - L.d_begin) * L.nb * ceil_div(p.height, kSummaryRows);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
    dim3 grid(static_cast<unsigned>(ceil_div(warps, 4)), static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
    scan2d_summary_kernel<T, CPL><<<grid, 128, 0, stream>>>(p, L, b0);
    SSM2D_CUDA_CHECK_LAUNCH("scan2d_summary_kernel");
  }
}

// G entering band `band` at row i for state n: the summaries of bands 0..band-1 folded in order.
__device__ __forceinline__ float fold_left(const Plan& L, const float* sdt_row, const float* S_row, int64_t band,
                                           float A2) {
  float c = 0.f;
  for (int64_t m = 0; m < band; ++m) c = fmaf(exp2f(A2 * sdt_row[m]), c, S_row[m]);
  return c;
}

// The reverse carry entering band `band` from the right at row i: bands nb-1 .. band+1, in order.
__device__ __forceinline__ float fold_right(const Plan& L, const float* sdt_row, const float* Sr_row, int64_t band,
                                            float A2) {
  float c = 0.f;
  for (int64_t m = L.nb - 1; m > band; --m) c = fmaf(exp2f(A2 * sdt_row[m]), c, Sr_row[m - 1]);
  return c;
}

// ---- Forward --------------------------------------------------------------------------------------

// One row of a lane's inputs, raw, loaded a row ahead of their use (z only in the forward, for the
// gate; C only where y or lamV is computed).
template <typename T, int CPL, int NS, bool kWithC>
struct RowIn {
  T d[CPL], u[CPL], z[kWithC ? CPL : 1], B[NS][CPL], C[kWithC ? NS : 1][CPL];
};

// Rows ahead of the current one whose operands are asked into L2 (the register prefetch one row
// ahead then waits on L2, not on device memory).
constexpr int kL2Ahead = 4;
__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// B and C of the warp's NS consecutive states: state s of (i, j) at base + s*sn + i*si + j*sj, the
// states past the last active one (smax) clamped to it so that loads stay in range.
template <typename T, int CPL, int NS, bool kWithC>
__device__ __forceinline__ void load_row(RowIn<T, CPL, NS, kWithC>& r, int64_t i, int64_t j0, int64_t W,
                                         const Plane<const T>& delta, const Plane<const T>& u,
                                         const Plane<const T>& z, bool gated, const T* Bb, const T* Cb,
                                         const Grid& Bg, const Grid& Cg, int smax) {
#pragma unroll
  for (int k = 0; k < CPL; ++k) {
    const int64_t j = min(j0 + k, W - 1);  // clamped: columns beyond W are masked by the caller
    r.d[k] = delta.at(i, j);
    r.u[k] = u.at(i, j);
    if constexpr (kWithC) r.z[k] = gated ? z.at(i, j) : r.u[k];
    const int64_t offB = i * Bg.si + j * Bg.sj, offC = i * Cg.si + j * Cg.sj;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      r.B[s][k] = Bb[offB + (s < smax ? s : smax) * Bg.sn];
      if constexpr (kWithC) r.C[s][k] = Cb[offC + (s < smax ? s : smax) * Cg.sn];
    }
  }
}

// Asks L2 for row i of the lane's operands (its first column; the lanes together cover the band).
template <typename T, int NS, bool kWithC>
__device__ __forceinline__ void prefetch_row(int64_t i, int64_t j, const Plane<const T>& delta, const Plane<const T>& u,
                                             const Plane<const T>& z, bool gated, const T* Bb, const T* Cb,
                                             const Grid& Bg, const Grid& Cg, int smax) {
  prefetch_l2(&delta.at(i, j));
  prefetch_l2(&u.at(i, j));
  if (kWithC && gated) prefetch_l2(&z.at(i, j));
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (s > smax) break;
    prefetch_l2(Bb + s * Bg.sn + i * Bg.si + j * Bg.sj);
    if constexpr (kWithC) prefetch_l2(Cb + s * Cg.sn + i * Cg.si + j * Cg.sj);
  }
}

// The states of warp `wi` in this pass: n0 .. n0 + nact - 1.
struct WarpStates {
  int64_t n0;
  int nact;
};
template <int NS>
__device__ __forceinline__ WarpStates warp_states(const Plan& L, int wi) {
  const int64_t n0 = L.n_begin + wi * NS;
  return {n0, static_cast<int>(L.n_end - n0 < NS ? L.n_end - n0 : NS)};
}

// y of cell (i, j) summed over this pass's states: add earlier passes, then D*u and the gate.
template <typename T>
__device__ __forceinline__ void finish_y(const Scan2dProblem& p, const Scan2dForwardOutputs& o, const Plan& L,
                                         int64_t b, int64_t d, int64_t i, int64_t j, float y, float uv, float zv,
                                         float Dd) {
  if (!L.first || !L.last) {
    float* acc = L.acc + ((b * p.dim + d) * p.height + i) * p.width + j;
    if (!L.first) y += *acc;
    if (!L.last) {
      *acc = y;
      return;
    }
  }
  y = fmaf(Dd, uv, y);
  if (p.z.defined()) {
    plane<T>(o.out, b, d, 0).at(i, j) = from_f<T>(y * zv / (1.f + __expf(-zv)));
    if (o.y.defined()) plane<T>(o.y, b, d, 0).at(i, j) = from_f<T>(y);
  } else {
    plane<T>(o.out, b, d, 0).at(i, j) = from_f<T>(y);
  }
}

template <typename T, int CPL, int NS>
__global__ void __launch_bounds__(kMaxWarps<NS> * 32) scan2d_fwd_kernel(Scan2dProblem p, Scan2dForwardOutputs o,
                                                                      Plan L, int64_t b0) {
  extern __shared__ float s_part[];  // [2][nw][32*CPL] partial y of each warp (nw > 1)
  constexpr int BW = 32 * CPL;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * L.ipb + warp / L.nw;
  const int wi = warp % L.nw;
  const int64_t d = item / L.nb, band = item % L.nb, b = blockIdx.y + b0;
  if (d >= p.dim) return;  // only when several items share a block, which then has no barrier
  const int64_t H = p.height, W = p.width, N = p.dstate, g = d / (p.dim / p.groups), nb = L.nb;
  const int64_t j0 = band * BW + lane * CPL;
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float Dd = p.D ? static_cast<const float*>(p.D)[d] : 0.f;
  const float* A = static_cast<const float*>(p.A);
  const WarpStates st = warp_states<NS>(L, wi);
  float A2[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) A2[s] = s < st.nact ? A[d * p.A_sd + (st.n0 + s) * p.A_sn] * kLog2e : 0.f;
  const T* Bb = static_cast<const T*>(p.B.data) + b * p.B.sb + g * p.B.sc + st.n0 * p.B.sn;
  const T* Cb = static_cast<const T*>(p.C.data) + b * p.C.sb + g * p.C.sc + st.n0 * p.C.sn;
  const float* sdt = nb > 1 ? L.sumdt + (b * p.dim + d) * H * nb : nullptr;
  const float* S0 = nb > 1 ? L.S + ((b * p.dim + d) * N + st.n0) * H * (nb - 1) : nullptr;
  const Plane<const T> u = plane<const T>(p.u, b, d, 0), delta = plane<const T>(p.delta, b, d, 0);
  const bool gated = p.z.defined();
  const Plane<const T> z = gated ? plane<const T>(p.z, b, d, 0) : u;
  bool in[CPL];
#pragma unroll
  for (int k = 0; k < CPL; ++k) in[k] = j0 + k < W;
  const int64_t jp = min(j0, W - 1);
  const int64_t nseg1 = ceil_div(H, kSegment) - 1;  // saved rows per (batch, channel, state)
  float* ck = o.carries ? o.carries + ((b * p.dim + d) * N + st.n0) * nseg1 * W : nullptr;

  float h[NS][CPL];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int k = 0; k < CPL; ++k) h[s][k] = 0.f;

  for (int64_t r = 1; r <= kL2Ahead && r < H; ++r)
    prefetch_row<T, NS, true>(r, jp, delta, u, z, gated, Bb, Cb, p.B, p.C, st.nact - 1);
  RowIn<T, CPL, NS, true> nxt;
  load_row<T, CPL, NS, true>(nxt, 0, j0, W, delta, u, z, gated, Bb, Cb, p.B, p.C, st.nact - 1);
  for (int64_t i = 0; i < H; ++i) {
    const RowIn<T, CPL, NS, true> cur = nxt;
    if (i + 1 < H) load_row<T, CPL, NS, true>(nxt, i + 1, j0, W, delta, u, z, gated, Bb, Cb, p.B, p.C, st.nact - 1);
    if (i + 1 + kL2Ahead < H)
      prefetch_row<T, NS, true>(i + 1 + kL2Ahead, jp, delta, u, z, gated, Bb, Cb, p.B, p.C, st.nact - 1);
    float dt[CPL], dtu[CPL], uv[CPL], yp[CPL];
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const float v = to_f(cur.d[k]) + bias;
      dt[k] = in[k] ? (p.softplus ? softplus_f(v) : v) : 0.f;  // outside the grid: decay 1, input 0
      uv[k] = to_f(cur.u[k]);
      dtu[k] = dt[k] * uv[k];
      yp[k] = 0.f;
    }
    const bool save = ck && (i + 1) % kSegment == 0 && i + 1 < H;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      if (s >= st.nact) continue;  // warp-uniform
      const float cin = band > 0 ? fold_left(L, sdt + i * nb, S0 + (s * H + i) * (nb - 1), band, A2[s]) : 0.f;
      float a[CPL], x[CPL], e[CPL];
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        a[k] = exp2f(dt[k] * A2[s]);
        x[k] = dtu[k] * to_f(cur.B[s][k]);
      }
      band_scan<CPL, false>(a, x, cin, e, lane);
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        h[s][k] = fmaf(a[k], h[s][k], fmaf(a[k], e[k], x[k]));
        yp[k] = fmaf(to_f(cur.C[s][k]), h[s][k], yp[k]);
      }
      if (save) {
        float* row = ck + (s * nseg1 + (i + 1) / kSegment - 1) * W;
#pragma unroll
        for (int k = 0; k < CPL; ++k)
          if (in[k]) row[j0 + k] = h[s][k];
      }
    }
    // Over the team's warps (buffer [w][k][lane]: conflict-free), finished by warp 0, which holds
    // u and z of the band's columns.
    if (L.nw > 1) {
      float* buf = s_part + (i & 1) * L.nw * BW;
#pragma unroll
      for (int k = 0; k < CPL; ++k) buf[wi * BW + k * 32 + lane] = yp[k];
      __syncthreads();
      if (wi == 0) {
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          float y = 0.f;
          for (int w = 0; w < L.nw; ++w) y += buf[w * BW + k * 32 + lane];
          yp[k] = y;
        }
      }
    }
    if (wi == 0) {
#pragma unroll
      for (int k = 0; k < CPL; ++k)
        if (in[k]) finish_y<T>(p, o, L, b, d, i, j0 + k, yp[k], uv[k], to_f(cur.z[k]), Dd);
    }
  }
}

// ---- Backward -------------------------------------------------------------------------------------

// dy of a cell: dout, times silu(z) when gated.
template <typename T>
__device__ __forceinline__ float grad_y(const Scan2dProblem& p, const Scan2dBackwardArgs& ga, int64_t b, int64_t d,
                                        int64_t i, int64_t j, float go) {
  if (!p.z.defined()) return go;
  const float z = to_f(plane<const T>(p.z, b, d, 0).at(i, j));
  const float s = 1.f / (1.f + __expf(-z));
  return go * z * s;
}

// Reverse band pre-pass (nb > 1): per (row, band m >= 1) and state, the lamH carry leaving band m on
// the left from a zero carry. One warp per (batch, channel, band >= 1, NS states), bottom-up.
template <typename T, int CPL, int NS>
__global__ void __launch_bounds__(128) scan2d_rev_summary_kernel(Scan2dProblem p, Scan2dBackwardArgs ga, Plan L,
                                                                 int64_t b0) {
  constexpr int BW = 32 * CPL;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t H = p.height, W = p.width, N = p.dstate, nb = L.nb;
  const int64_t ngr = ceil_div(N, NS), channels = L.d_end - L.d_begin;
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (wid >= channels * (nb - 1) * ngr) return;
  const int64_t d = L.d_begin + wid / ((nb - 1) * ngr), m = 1 + (wid / ngr) % (nb - 1), gr = wid % ngr;
  const int64_t b = blockIdx.y + b0, g = d / (p.dim / p.groups), j0 = m * BW + lane * CPL;
  const int64_t n0 = gr * NS;
  const int nact = static_cast<int>(N - n0 < NS ? N - n0 : NS);
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float* A = static_cast<const float*>(p.A);
  float A2[NS], lamV[NS][CPL], a_below[NS][CPL];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    A2[s] = s < nact ? A[d * p.A_sd + (n0 + s) * p.A_sn] * kLog2e : 0.f;
#pragma unroll
    for (int k = 0; k < CPL; ++k) lamV[s][k] = a_below[s][k] = 0.f;
  }
  const Plane<const T> delta = plane<const T>(p.delta, b, d, 0), dout = plane<const T>(ga.dout, b, d, 0);
  const T* Cb = static_cast<const T*>(p.C.data) + b * p.C.sb + g * p.C.sc + n0 * p.C.sn;
  float* Sr = L.Srev + ((b * p.dim + d) * N + n0) * H * (nb - 1);
  for (int64_t i = H - 1; i >= 0; --i) {
    float dt[CPL], dy[CPL];
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int64_t j = min(j0 + k, W - 1);
      const bool in = j0 + k < W;
      const float v = to_f(delta.at(i, j)) + bias;
      dt[k] = in ? (p.softplus ? softplus_f(v) : v) : 0.f;
      dy[k] = in ? grad_y<T>(p, ga, b, d, i, j, to_f(dout.at(i, j))) : 0.f;
    }
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      if (s >= nact) continue;
      float a[CPL], x[CPL];
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int64_t j = min(j0 + k, W - 1);
        const float cv = to_f(Cb[s * p.C.sn + i * p.C.si + j * p.C.sj]);
        lamV[s][k] = fmaf(a_below[s][k], lamV[s][k], dy[k] * cv);
        a[k] = exp2f(dt[k] * A2[s]);
        a_below[s][k] = a[k];
        x[k] = a[k] * lamV[s][k];
      }
      const float leave = band_total<CPL, true>(a, x, lane);
      if (lane == 0) Sr[(s * H + i) * (nb - 1) + (m - 1)] = leave;
    }
  }
}

// One row of a lane's inputs to the bottom-up walk, raw, loaded a row ahead of their use.
template <typename T, int CPL, int NS>
struct RowInB {
  T d[CPL], u[CPL], go[CPL], z[CPL], y[CPL], B[NS][CPL], C[NS][CPL];
};

template <typename T, int CPL, int NS>
__device__ __forceinline__ void load_row_b(RowInB<T, CPL, NS>& r, int64_t i, int64_t j0, int64_t W,
                                           const Plane<const T>& delta, const Plane<const T>& u,
                                           const Plane<const T>& dout, const Plane<const T>& z,
                                           const Plane<const T>& y, bool gated, const T* Bb, const T* Cb,
                                           const Grid& Bg, const Grid& Cg, int smax) {
#pragma unroll
  for (int k = 0; k < CPL; ++k) {
    const int64_t j = min(j0 + k, W - 1);
    r.d[k] = delta.at(i, j);
    r.u[k] = u.at(i, j);
    r.go[k] = dout.at(i, j);
    r.z[k] = gated ? z.at(i, j) : r.go[k];
    r.y[k] = gated ? y.at(i, j) : r.go[k];
    const int64_t offB = i * Bg.si + j * Bg.sj, offC = i * Cg.si + j * Cg.sj;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      r.B[s][k] = Bb[offB + (s < smax ? s : smax) * Bg.sn];
      r.C[s][k] = Cb[offC + (s < smax ? s : smax) * Cg.sn];
    }
  }
}

template <typename T, int CPL, int NS, bool kDet>
__global__ void __launch_bounds__(kMaxWarps<NS> * 32) scan2d_bwd_kernel(Scan2dProblem p, Scan2dBackwardArgs ga,
                                                                      Plan L, int64_t b0) {
  // hbuf [kSegment + 1][nw * NS][BW]: h of the segment's rows (row 0: the row above the segment);
  // then red [2][nw][2][BW]: each warp's partial ddt and du of a row.
  extern __shared__ float smem[];
  constexpr int BW = 32 * CPL;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * L.ipb + warp / L.nw;
  const int wi = warp % L.nw;
  const int64_t channels = L.d_end - L.d_begin;
  const int64_t dl = item / L.nb, band = item % L.nb, b = blockIdx.y + b0;
  if (dl >= channels) return;  // only when several items share a block, which then has no barrier
  const int64_t d = L.d_begin + dl;
  const int64_t H = p.height, W = p.width, N = p.dstate, g = d / (p.dim / p.groups), nb = L.nb;
  const int64_t bc_c = kDet ? dl : g;
  const int64_t j0 = band * BW + lane * CPL;
  const int slots = L.nw * NS;
  float* hbuf = smem + (warp / L.nw) * (kSegment + 1) * slots * BW;  // this item's
  float* red = smem + L.ipb * (kSegment + 1) * slots * BW;
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float Dd = p.D ? static_cast<const float*>(p.D)[d] : 0.f;
  const float* A = static_cast<const float*>(p.A);
  const WarpStates st = warp_states<NS>(L, wi);
  float An[NS], A2[NS], dA_acc[NS];
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    An[s] = s < st.nact ? A[d * p.A_sd + (st.n0 + s) * p.A_sn] : 0.f;
    A2[s] = An[s] * kLog2e;
    dA_acc[s] = 0.f;
  }
  const T* Bb = static_cast<const T*>(p.B.data) + b * p.B.sb + g * p.B.sc + st.n0 * p.B.sn;
  const T* Cb = static_cast<const T*>(p.C.data) + b * p.C.sb + g * p.C.sc + st.n0 * p.C.sn;
  const float* sdt = nb > 1 ? L.sumdt + (b * p.dim + d) * H * nb : nullptr;
  const float* S0 = nb > 1 ? L.S + ((b * p.dim + d) * N + st.n0) * H * (nb - 1) : nullptr;
  const float* Sr0 = nb > 1 ? L.Srev + ((b * p.dim + d) * N + st.n0) * H * (nb - 1) : nullptr;
  const Plane<const T> u = plane<const T>(p.u, b, d, 0), delta = plane<const T>(p.delta, b, d, 0);
  const Plane<const T> dout = plane<const T>(ga.dout, b, d, 0);
  const bool gated = p.z.defined();
  const Plane<const T> z = gated ? plane<const T>(p.z, b, d, 0) : dout;
  const Plane<const T> yv = gated && ga.y.defined() ? plane<const T>(ga.y, b, d, 0) : dout;
  bool in[CPL];
#pragma unroll
  for (int k = 0; k < CPL; ++k) in[k] = j0 + k < W;
  const int64_t jp = min(j0, W - 1);
  const int64_t nseg = ceil_div(H, kSegment);
  const float* ck = ga.carries + ((b * p.dim + d) * N + st.n0) * (nseg - 1) * W;

  float lamV[NS][CPL], a_below[NS][CPL];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int k = 0; k < CPL; ++k) lamV[s][k] = a_below[s][k] = 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;  // over the cells this thread finishes

  for (int64_t seg = nseg - 1; seg >= 0; --seg) {
    const int64_t r0 = seg * kSegment, r1 = min(H, r0 + kSegment);
    // 1. h of the segment's rows, top-down, from the saved row above it.
    {
      float h[NS][CPL];
#pragma unroll
      for (int s = 0; s < NS; ++s)
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          h[s][k] = (seg > 0 && s < st.nact && in[k]) ? ck[(s * (nseg - 1) + seg - 1) * W + j0 + k] : 0.f;
          hbuf[(wi * NS + s) * BW + k * 32 + lane] = h[s][k];
        }
      RowIn<T, CPL, NS, false> nxt;
      load_row<T, CPL, NS, false>(nxt, r0, j0, W, delta, u, u, false, Bb, Cb, p.B, p.C, st.nact - 1);
      for (int64_t i = r0; i < r1; ++i) {
        const RowIn<T, CPL, NS, false> cur = nxt;
        if (i + 1 < r1) load_row<T, CPL, NS, false>(nxt, i + 1, j0, W, delta, u, u, false, Bb, Cb, p.B, p.C, st.nact - 1);
        float dt[CPL], dtu[CPL];
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          const float v = to_f(cur.d[k]) + bias;
          dt[k] = in[k] ? (p.softplus ? softplus_f(v) : v) : 0.f;
          dtu[k] = dt[k] * to_f(cur.u[k]);
        }
        float* hrow = hbuf + (i - r0 + 1) * slots * BW;
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          if (s >= st.nact) continue;
          const float cin = band > 0 ? fold_left(L, sdt + i * nb, S0 + (s * H + i) * (nb - 1), band, A2[s]) : 0.f;
          float a[CPL], x[CPL], e[CPL];
#pragma unroll
          for (int k = 0; k < CPL; ++k) {
            a[k] = exp2f(dt[k] * A2[s]);
            x[k] = dtu[k] * to_f(cur.B[s][k]);
          }
          band_scan<CPL, false>(a, x, cin, e, lane);
#pragma unroll
          for (int k = 0; k < CPL; ++k) {
            h[s][k] = fmaf(a[k], h[s][k], fmaf(a[k], e[k], x[k]));
            hrow[(wi * NS + s) * BW + k * 32 + lane] = h[s][k];
          }
        }
      }
    }
    __syncwarp();
    // 2. The segment's rows bottom-up.
    for (int64_t r = 1; r <= kL2Ahead && r1 - 1 - r >= 0; ++r)
      prefetch_row<T, NS, true>(r1 - 1 - r, jp, delta, u, dout, true, Bb, Cb, p.B, p.C, st.nact - 1);
    RowInB<T, CPL, NS> nxt;
    load_row_b<T, CPL, NS>(nxt, r1 - 1, j0, W, delta, u, dout, z, yv, gated, Bb, Cb, p.B, p.C, st.nact - 1);
    for (int64_t i = r1 - 1; i >= r0; --i) {
      const RowInB<T, CPL, NS> cur = nxt;
      if (i - 1 >= r0) load_row_b<T, CPL, NS>(nxt, i - 1, j0, W, delta, u, dout, z, yv, gated, Bb, Cb, p.B, p.C,
                                              st.nact - 1);
      if (i - 1 - kL2Ahead >= 0)
        prefetch_row<T, NS, true>(i - 1 - kL2Ahead, jp, delta, u, dout, true, Bb, Cb, p.B, p.C, st.nact - 1);
      float dt[CPL], uv[CPL], dy[CPL], sg[CPL], ddt_p[CPL], du_p[CPL];
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        sg[k] = to_f(cur.d[k]) + bias;
        dt[k] = in[k] ? (p.softplus ? softplus_f(sg[k]) : sg[k]) : 0.f;
        uv[k] = to_f(cur.u[k]);
        const float go = to_f(cur.go[k]);
        if (gated) {
          const float zv = to_f(cur.z[k]);
          dy[k] = in[k] ? go * zv / (1.f + __expf(-zv)) : 0.f;
        } else {
          dy[k] = in[k] ? go : 0.f;
        }
        ddt_p[k] = du_p[k] = 0.f;
      }
      const float* hrow = hbuf + (i - r0 + 1) * slots * BW;
      const float* harow = hrow - slots * BW;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        if (s >= st.nact) continue;
        const int64_t n = st.n0 + s;
        const float cR = band + 1 < nb ? fold_right(L, sdt + i * nb, Sr0 + (s * H + i) * (nb - 1), band, A2[s]) : 0.f;
        float a[CPL], xr[CPL], e[CPL];
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          lamV[s][k] = fmaf(a_below[s][k], lamV[s][k], dy[k] * to_f(cur.C[s][k]));
          a[k] = exp2f(dt[k] * A2[s]);
          a_below[s][k] = a[k];
          xr[k] = a[k] * lamV[s][k];
        }
        band_scan<CPL, true>(a, xr, cR, e, lane);
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          const float bv = in[k] ? to_f(cur.B[s][k]) : 0.f;
          const float lamH = lamV[s][k] + e[k];
          const float h = hrow[(wi * NS + s) * BW + k * 32 + lane];
          const float ah = a[k] * harow[(wi * NS + s) * BW + k * 32 + lane];  // a * h[i-1]
          const float x = dt[k] * bv * uv[k];
          const float q = fmaf(lamV[s][k], ah, lamH * (h - ah - x));
          dA_acc[s] = fmaf(q, dt[k], dA_acc[s]);
          ddt_p[k] = fmaf(q, An[s], fmaf(lamH * bv, uv[k], ddt_p[k]));
          du_p[k] = fmaf(lamH * bv, dt[k], du_p[k]);
          if (in[k]) {
            const int64_t j = j0 + k;
            if (ga.dB.defined()) {
              float* dst = &plane<float>(ga.dB, b, bc_c, n).at(i, j);
              if (kDet) *dst = lamH * dt[k] * uv[k];
              else atomicAdd(dst, lamH * dt[k] * uv[k]);
            }
            if (ga.dC.defined()) {
              float* dst = &plane<float>(ga.dC, b, bc_c, n).at(i, j);
              if (kDet) *dst = dy[k] * h;
              else atomicAdd(dst, dy[k] * h);
            }
          }
        }
      }
      // Per-cell sums over the states: this warp's in registers, the team's through shared memory
      // ([w][2][k][lane]), finished by warp 0, which holds the band's per-cell inputs.
      if (L.nw > 1) {
        float* buf = red + (i & 1) * L.nw * 2 * BW;
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          buf[(wi * 2) * BW + k * 32 + lane] = ddt_p[k];
          buf[(wi * 2 + 1) * BW + k * 32 + lane] = du_p[k];
        }
        __syncthreads();
        if (wi == 0) {
#pragma unroll
          for (int k = 0; k < CPL; ++k) {
            float t0 = 0.f, t1 = 0.f;
            for (int w = 0; w < L.nw; ++w) {
              t0 += buf[(w * 2) * BW + k * 32 + lane];
              t1 += buf[(w * 2 + 1) * BW + k * 32 + lane];
            }
            ddt_p[k] = t0;
            du_p[k] = t1;
          }
        }
      }
      if (wi == 0) {
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          if (!in[k]) continue;
          const int64_t j = j0 + k;
          float ddt = ddt_p[k], du = du_p[k];
          if (!L.first || !L.last) {
            float* acc = L.acc + (((b * channels + dl) * H + i) * W + j) * 2;
            if (!L.first) {
              ddt += acc[0];
              du += acc[1];
            }
            if (!L.last) {
              acc[0] = ddt;
              acc[1] = du;
              continue;
            }
          }
          du = fmaf(Dd, dy[k], du);
          // d softplus(v)/dv = sigmoid(v); the identity branch (v > 20) has slope 1 up to 2e-9.
          const float ddelta = p.softplus ? ddt / (1.f + __expf(-sg[k])) : ddt;
          dbias_acc += ddelta;
          dD_acc = fmaf(dy[k], uv[k], dD_acc);
          if (ga.du.defined()) plane<T>(ga.du, b, d, 0).at(i, j) = from_f<T>(du);
          if (ga.ddelta.defined()) plane<T>(ga.ddelta, b, d, 0).at(i, j) = from_f<T>(ddelta);
          if (ga.dz.defined()) {
            const float go = to_f(cur.go[k]), zv = to_f(cur.z[k]), y = to_f(cur.y[k]);
            const float sz = 1.f / (1.f + __expf(-zv));
            plane<T>(ga.dz, b, d, 0).at(i, j) = from_f<T>(go * y * sz * (1.f + zv * (1.f - sz)));
          }
        }
      }
    }
    if (L.nw > 1) __syncthreads();  // hbuf is rewritten by the next segment
    else __syncwarp();
  }
  // Per-band sums in a fixed order: lanes by shuffles, then (team) warps in index order.
  float* part = L.part + ((b * p.dim + d) * nb + band) * (N + 2);
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const float v = warp_sum(dA_acc[s]);
    if (s < st.nact && lane == 0) part[st.n0 + s] = v;
  }
  if (!L.last) return;
  dD_acc = warp_sum(dD_acc);
  dbias_acc = warp_sum(dbias_acc);
  if (L.nw == 1) {
    if (lane == 0) {
      part[N] = dD_acc;
      part[N + 1] = dbias_acc;
    }
    return;
  }
  __syncthreads();
  if (lane == 0) {
    red[2 * wi] = dD_acc;
    red[2 * wi + 1] = dbias_acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float s0 = 0.f, s1 = 0.f;
    for (int w = 0; w < L.nw; ++w) {
      s0 += red[2 * w];
      s1 += red[2 * w + 1];
    }
    part[N] = s0;
    part[N + 1] = s1;
  }
}

// Sums the per-band partials over the bands, in order, into the per-batch outputs.
__global__ void scan2d_bwd_reduce_kernel(Scan2dProblem p, Scan2dBackwardArgs ga, Plan L) {
  const int64_t N = p.dstate, channels = L.d_end - L.d_begin;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.batch * channels * (N + 2)) return;
  const int64_t b = t / (channels * (N + 2)), d = L.d_begin + (t / (N + 2)) % channels, k = t % (N + 2);
  const float* part = L.part + (b * p.dim + d) * L.nb * (N + 2) + k;
  float s = 0.f;
  for (int64_t m = 0; m < L.nb; ++m) s += part[m * (N + 2)];
  if (k < N) {
    if (ga.dA_part) static_cast<float*>(ga.dA_part)[(b * p.dim + d) * N + k] = s;
  } else if (k == N) {
    if (ga.dD_part) static_cast<float*>(ga.dD_part)[b * p.dim + d] = s;
  } else if (ga.ddelta_bias_part) {
    static_cast<float*>(ga.ddelta_bias_part)[b * p.dim + d] = s;
  }
}

// ---- Host -----------------------------------------------------------------------------------------

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

// States per warp: as many as keep enough warps in flight (a warp then shares its dt, u loads and
// its per-cell sums over more states).
int states_per_warp(int64_t items, int64_t N, const char* env) {
  if (N == 1) return 1;
  if (N == 2) return 2;
  const int forced = env_int(env, 0);
  if (forced == 1 || forced == 2 || forced == 4) return forced;
  const int64_t n = std::min<int64_t>(N, 32);
  const int64_t want = 132 * 32;  // warps: about half the resident slots of a 132-SM GPU
  if (items * ceil_div(n, 4) >= want) return 4;
  if (items * ceil_div(n, 2) >= want) return 2;
  return 1;
}

// Splits the states into passes of NS * kMaxWarps<NS> and sets the team shape of each.
template <int NS, typename F>
void for_each_pass(int64_t N, Plan L, F&& launch) {
  const int64_t per_pass = static_cast<int64_t>(NS) * kMaxWarps<NS>;
  for (int64_t n0 = 0; n0 < N; n0 += per_pass) {
    L.n_begin = n0;
    L.n_end = std::min(N, n0 + per_pass);
    L.first = n0 == 0;
    L.last = L.n_end == N;
    L.nw = static_cast<int>(ceil_div(L.n_end - n0, NS));
    L.ipb = L.nw == 1 ? 4 : 1;
    launch(L);
  }
}

template <typename T, int CPL, int NS>
void forward_ns(const Scan2dProblem& p, const Scan2dForwardOutputs& o, const Plan& L0, cudaStream_t stream) {
  for_each_pass<NS>(p.dstate, L0, [&](const Plan& L) {
    const size_t smem = L.nw > 1 ? 2 * static_cast<size_t>(L.nw) * 32 * CPL * sizeof(float) : 0;
    const unsigned blocks = static_cast<unsigned>(ceil_div(p.dim * L.nb, L.ipb));
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
      dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
      scan2d_fwd_kernel<T, CPL, NS><<<grid, L.ipb * L.nw * 32, smem, stream>>>(p, o, L, b0);
      SSM2D_CUDA_CHECK_LAUNCH("scan2d_fwd_kernel");
    }
  });
}

// Workspace layout of both directions: sumdt, S (and Srev in the backward), then the rest.
Plan band_plan(const Scan2dProblem& p, int cpl, float* ws, bool backward) {
  Plan L;
  L.nb = ceil_div(p.width, 32 * cpl);
  if (L.nb > 1) {
    const int64_t rows = p.batch * p.dim * p.height;
    L.sumdt = ws;
    ws += rows * L.nb;
    L.S = ws;
    ws += rows * p.dstate * (L.nb - 1);
    if (backward) {
      L.Srev = ws;
      ws += rows * p.dstate * (L.nb - 1);
    }
  }
  if (backward) {
    L.part = ws;
    ws += p.batch * p.dim * L.nb * (p.dstate + 2);
  }
  L.acc = ws;
  return L;
}

template <typename T, int CPL>
void forward_cpl(const Scan2dProblem& p, const Scan2dForwardOutputs& o, cudaStream_t stream) {
  Plan L = band_plan(p, CPL, o.workspace, false);
  L.d_begin = 0;
  L.d_end = p.dim;
  if (L.nb > 1) launch_summaries<T, CPL>(p, L, stream);  // before the passes, which read them
  switch (states_per_warp(p.batch * p.dim * L.nb, p.dstate, "SSM2D_SCAN2D_FWD_NS")) {
    case 1: forward_ns<T, CPL, 1>(p, o, L, stream); break;
    case 2: forward_ns<T, CPL, 2>(p, o, L, stream); break;
    default: forward_ns<T, CPL, 4>(p, o, L, stream); break;
  }
}

template <typename T>
void forward_t(const Scan2dProblem& p, const Scan2dForwardOutputs& o, cudaStream_t stream) {
  switch (scan2d_cols_per_lane(p.width)) {
    case 1: forward_cpl<T, 1>(p, o, stream); break;
    case 2: forward_cpl<T, 2>(p, o, stream); break;
    default: forward_cpl<T, 4>(p, o, stream); break;
  }
}

template <typename T, int CPL, int NS, bool Det>
void backward_ns(const Scan2dProblem& p, const Scan2dBackwardArgs& a, const Plan& L0, cudaStream_t stream) {
  const int64_t channels = L0.d_end - L0.d_begin;
  if (L0.nb > 1) {
    constexpr int RNS = NS;
    const int64_t warps = channels * (L0.nb - 1) * ceil_div(p.dstate, RNS);
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
      dim3 grid(static_cast<unsigned>(ceil_div(warps, 4)), static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
      scan2d_rev_summary_kernel<T, CPL, RNS><<<grid, 128, 0, stream>>>(p, a, L0, b0);
      SSM2D_CUDA_CHECK_LAUNCH("scan2d_rev_summary_kernel");
    }
  }
  for_each_pass<NS>(p.dstate, L0, [&](const Plan& L) {
    const int slots = L.nw * NS;
    const size_t smem = (static_cast<size_t>(L.ipb) * (kSegment + 1) * slots * 32 * CPL +
                         2 * static_cast<size_t>(L.nw) * 2 * 32 * CPL) * sizeof(float);
    auto kernel = scan2d_bwd_kernel<T, CPL, NS, Det>;
    SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const unsigned blocks = static_cast<unsigned>(ceil_div(channels * L.nb, L.ipb));
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
      dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
      kernel<<<grid, L.ipb * L.nw * 32, smem, stream>>>(p, a, L, b0);
      SSM2D_CUDA_CHECK_LAUNCH("scan2d_bwd_kernel");
    }
  });
  const int64_t threads = p.batch * channels * (p.dstate + 2);
  scan2d_bwd_reduce_kernel<<<static_cast<unsigned>(ceil_div(threads, 256)), 256, 0, stream>>>(p, a, L0);
  SSM2D_CUDA_CHECK_LAUNCH("scan2d_bwd_reduce_kernel");
}

template <typename T, int CPL, bool Det>
void backward_cpl(const Scan2dProblem& p, const Scan2dBackwardArgs& a, cudaStream_t stream) {
  Plan L = band_plan(p, CPL, a.workspace, true);
  L.d_begin = a.d_begin;
  L.d_end = a.d_end;
  if (L.nb > 1) launch_summaries<T, CPL>(p, L, stream);
  const int64_t items = p.batch * (a.d_end - a.d_begin) * L.nb;
  switch (states_per_warp(items, p.dstate, "SSM2D_SCAN2D_BWD_NS")) {
    case 1: backward_ns<T, CPL, 1, Det>(p, a, L, stream); break;
    case 2: backward_ns<T, CPL, 2, Det>(p, a, L, stream); break;
    default: backward_ns<T, CPL, 4, Det>(p, a, L, stream); break;
  }
}

template <typename T, bool Det>
void backward_t(const Scan2dProblem& p, const Scan2dBackwardArgs& a, cudaStream_t stream) {
  switch (scan2d_bwd_cols_per_lane(p.width, p.dstate)) {
    case 1: backward_cpl<T, 1, Det>(p, a, stream); break;
    case 2: backward_cpl<T, 2, Det>(p, a, stream); break;
    default: backward_cpl<T, 4, Det>(p, a, stream); break;
  }
}

void check_cuda_problem(const Scan2dProblem& p, const char* what) {
  if (p.dtype == DType::kFloat64 || p.param_dtype != DType::kFloat32)
    throw ArgumentError(std::string(what) + ": the CUDA kernel takes float32, float16 or bfloat16 inputs with "
                        "float32 A, D and delta_bias; float64 runs on the CPU kernel");
}

}  // namespace

void scan2d_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o) {
  check_cuda_problem(p, "scan2d_forward");
  if (scan2d_forward_workspace_floats(p.batch, p.dim, p.dstate, p.height, p.width) > 0 && !o.workspace)
    throw ArgumentError("scan2d_forward: workspace is required on CUDA (scan2d_forward_workspace_floats)");
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  switch (p.dtype) {
    case DType::kFloat32: forward_t<float>(p, o, stream); break;
    case DType::kFloat16: forward_t<__half>(p, o, stream); break;
    case DType::kBFloat16: forward_t<__nv_bfloat16>(p, o, stream); break;
    default: break;
  }
}

void scan2d_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& a_in) {
  check_cuda_problem(p, "scan2d_backward");
  Scan2dBackwardArgs a = a_in;
  if (a.d_end < 0) a.d_end = p.dim;
  if (!a.workspace || (!a.carries && scan2d_carry_floats(p.batch, p.dim, p.dstate, p.height, p.width) > 0))
    throw ArgumentError("scan2d_backward: carries and workspace are required on CUDA");
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  const bool det = a.deterministic;
  switch (p.dtype) {
    case DType::kFloat32: det ? backward_t<float, true>(p, a, stream) : backward_t<float, false>(p, a, stream); break;
    case DType::kFloat16: det ? backward_t<__half, true>(p, a, stream) : backward_t<__half, false>(p, a, stream); break;
    case DType::kBFloat16:
      det ? backward_t<__nv_bfloat16, true>(p, a, stream) : backward_t<__nv_bfloat16, false>(p, a, stream);
      break;
    default: break;
  }
}

}  // namespace ssm2d::cuda
