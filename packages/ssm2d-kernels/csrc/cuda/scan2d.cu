// scan2d (2DMamba) on CUDA: lane = column, no serial walk over tiles.
//
// Forward. One block per (batch, channel, column band of 32*CPL columns); its NW warps hold NS
// states each and walk the rows top to bottom, lane l owning the CPL consecutive columns l*CPL.. of
// the band. Per row the block stages the state-independent inputs (dt = softplus(delta + bias),
// dt*u, u, z) of the band in shared memory once, coalesced; then per state each warp runs
//   * the horizontal recurrence G = a G + x across the band as one warp scan of affine maps
//     (band_scan: CPL-long local scans, 5 shuffle steps, a fix-up), entered by the G carry of the
//     bands to the left;
//   * the vertical recurrence h = a h + G, one FMA per column with h in a register (the lane owns
//     the column: no transpose, no shared tile);
//   * y += C h in registers;
// and the warps' partial y meet in shared memory, summed in warp order by warp 0 (deterministic):
// one barrier per row, the next row staged while this one is scanned.
//
// Bands are independent after a small pre-pass (only when W > 32*CPL): for each (row, band) the sum
// of dt over the band (its decay is exp(A * sum dt)) and, per state, the G leaving it from a zero
// carry; the band-k warps fold the summaries of bands 0..k-1 into their carry (k FMAs per row and
// state). Nothing runs serially but each block's walk down its rows.
//
// Saved for the backward (`carries`): h at every kSegment-th row, N/kSegment of u's element count
// in float32 (none when H <= kSegment). The pre-gate output is not saved: the backward rebuilds it.
//
// Backward: the adjoint of SCANS.md section 1 from the bottom-right, per (batch, channel, state):
//   lamV[i,j] = dy C + a[i+1,j] lamV[i+1,j]     reverse vertical: one FMA per lane, lamV in a register
//   lamH[i,j] = lamV + a[i,j+1] lamH[i,j+1]     reverse horizontal: one reverse band scan per row
//   q = lamV*(h - G) + lamH*(G - x),  h - G = a h[i-1,j]
// with the same blocks, bands and warps as the forward. h is needed going upwards: each segment of
// kSegment rows is recomputed top-down from its saved row into shared memory, then walked
// bottom-up. The reverse band carries come from a pre-pass that walks each band bottom-up alone
// (lamV needs nothing from other bands) and stores the lamH carry leaving it on the left from zero.
// dA, dD, ddelta_bias are summed per band in a fixed order, then over the bands by a small kernel;
// dB/dC sum over the channels of a group with float32 atomics or, deterministically, as per-channel
// partials the caller sums in order.
#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"
#include "scan2d_chan.h"
#include "scan2d_common.cuh"
#include "scan2d_lanes.h"
#include "scan2d_tiled.h"
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
  int nw = 1;                      // warps per (batch, channel, band): one block
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
        a[k] = fast_exp2(dt[k] * A2);
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
  for (int64_t m = 0; m < band; ++m) c = fmaf(fast_exp2(A2 * sdt_row[m]), c, S_row[m]);
  return c;
}

// The reverse carry entering band `band` from the right at row i: bands nb-1 .. band+1, in order.
__device__ __forceinline__ float fold_right(const Plan& L, const float* sdt_row, const float* Sr_row, int64_t band,
                                            float A2) {
  float c = 0.f;
  for (int64_t m = L.nb - 1; m > band; --m) c = fmaf(fast_exp2(A2 * sdt_row[m]), c, Sr_row[m - 1]);
  return c;
}

// ---- Forward --------------------------------------------------------------------------------------

// Rows ahead of the current one whose operands are asked into L2 (the register prefetch one row
// ahead then waits on L2, not on device memory).
constexpr int kL2Ahead = 4;

// B (and C) of one row for a lane's CPL columns and the warp's NS consecutive states, raw, loaded a
// row ahead of their use. State s of (i, j) is at base + s*sn + i*si + j*sj; states past the last
// active one (smax) are clamped to it so that loads stay in range.
template <typename T, int CPL, int NS, bool kWithC>
struct RowBC {
  T B[NS][CPL], C[kWithC ? NS : 1][CPL];
};
template <typename T, int CPL, int NS, bool kWithC>
__device__ __forceinline__ void load_bc(RowBC<T, CPL, NS, kWithC>& r, int64_t i, int64_t j0, int64_t W, const T* Bb,
                                        const T* Cb, const Grid& Bg, const Grid& Cg, int smax) {
#pragma unroll
  for (int k = 0; k < CPL; ++k) {
    const int64_t j = min(j0 + k, W - 1);  // clamped: columns beyond W are masked by the caller
    const int64_t offB = i * Bg.si + j * Bg.sj, offC = i * Cg.si + j * Cg.sj;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      r.B[s][k] = Bb[offB + (s < smax ? s : smax) * Bg.sn];
      if constexpr (kWithC) r.C[s][k] = Cb[offC + (s < smax ? s : smax) * Cg.sn];
    }
  }
}
template <typename T, int NS, bool kWithC>
__device__ __forceinline__ void prefetch_bc(int64_t i, int64_t j, const T* Bb, const T* Cb, const Grid& Bg,
                                            const Grid& Cg, int smax) {
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    if (s > smax) break;
    prefetch_l2(Bb + s * Bg.sn + i * Bg.si + j * Bg.sj);
    if constexpr (kWithC) prefetch_l2(Cb + s * Cg.sn + i * Cg.si + j * Cg.sj);
  }
}

// The per-cell inputs of a row (state-independent), loaded once per (batch, channel, band) by all
// threads of the block together (thread t: columns t, t + threads, ...; coalesced) and handed to
// the warps through shared memory. Q raw operands per column, loaded a row ahead.
template <typename T, int CPL, int Q>
struct Stager {
  T raw[CPL][Q];
  int t, threads;
  int64_t jb, W;
  __device__ __forceinline__ Stager(int t_, int threads_, int64_t jb_, int64_t W_) : t(t_), threads(threads_), jb(jb_), W(W_) {}
  // ops[q]: the planes to read (operand q of column c at row i).
  __device__ __forceinline__ void load(int64_t i, const Plane<const T> (&ops)[Q]) {
#pragma unroll
    for (int r = 0; r < CPL; ++r) {
      const int c = t + r * threads;
      if (c < 32 * CPL) {
        const int64_t j = min(jb + c, W - 1);
#pragma unroll
        for (int q = 0; q < Q; ++q) raw[r][q] = ops[q].at(i, j);
      }
    }
  }
  __device__ __forceinline__ void prefetch(int64_t i, const Plane<const T> (&ops)[Q]) const {
#pragma unroll
    for (int r = 0; r < CPL; ++r) {
      const int c = t + r * threads;
      if (c < 32 * CPL) {
        const int64_t j = min(jb + c, W - 1);
#pragma unroll
        for (int q = 0; q < Q; ++q) prefetch_l2(&ops[q].at(i, j));
      }
    }
  }
};

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

template <int CPL>
__device__ __forceinline__ void lds_cols(float (&v)[CPL], const float* p) {  // CPL consecutive floats
  if constexpr (CPL == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
  } else if constexpr (CPL == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    v[0] = t.x; v[1] = t.y;
  } else {
    v[0] = p[0];
  }
}

// Rows a warp handles per step: their loads are issued together, a group ahead, so one memory latency
// is paid per group instead of per row, and the block meets at one barrier per group.
template <int CPL, int NS> constexpr int kRows = NS * CPL >= 16 ? 1 : NS * CPL >= 4 ? 2 : 4;

// N >= 2. One block per (batch, channel, band): NW >= 2 warps of NS states each. Per group of R rows
// the block stages dt, dt*u, u, z of the band in shared memory once (the next group's, while this
// one is scanned; a ring of 3 so that warp 0 can still read a group after the barrier), each warp
// scans its states row by row and leaves its y partials in shared memory, one barrier, and warp 0
// sums the partials in warp order and writes the rows.
// Shared memory: (3*4 + 2*NW) * R * 32*CPL floats.
template <typename T, int CPL, int NS>
__global__ void __launch_bounds__(kMaxWarps<NS> * 32) scan2d_fwd_kernel(Scan2dProblem p, Scan2dForwardOutputs o,
                                                                      Plan L, int64_t b0) {
  extern __shared__ float smem[];
  constexpr int BW = 32 * CPL, R = kRows<CPL, NS>, MS = (R * CPL + 1) / 2;  // MS: staged cells per thread
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5, threads = L.nw * 32;
  float* stage = smem;                  // [3][R][4][BW]: dt, dt*u, u, z
  float* part = smem + 3 * R * 4 * BW;  // [2][R][nw][CPL][32]
  const int64_t d = blockIdx.x / L.nb, band = blockIdx.x % L.nb, b = blockIdx.y + b0;
  const int64_t H = p.height, W = p.width, N = p.dstate, g = d / (p.dim / p.groups), nb = L.nb;
  const int64_t jb = band * BW, j0 = jb + lane * CPL, jp = min(j0, W - 1);
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
  const bool gated = p.z.defined();
  const Plane<const T> pd = plane<const T>(p.delta, b, d, 0), pu = plane<const T>(p.u, b, d, 0);
  const Plane<const T> pz = gated ? plane<const T>(p.z, b, d, 0) : pu;
  bool in[CPL];
#pragma unroll
  for (int k = 0; k < CPL; ++k) in[k] = j0 + k < W;
  const int64_t nseg1 = ceil_div(H, kSegment) - 1;  // saved rows per (batch, channel, state)
  float* ck = o.carries ? o.carries + ((b * p.dim + d) * N + st.n0) * nseg1 * W : nullptr;

  // Staging: cell e = t + m*threads of a group is (row e / BW, column e % BW).
  T raw[MS][3];
  auto load_raw = [&](int64_t g0) {
#pragma unroll
    for (int m = 0; m < MS; ++m) {
      const int e = threadIdx.x + m * threads;
      const int64_t i = g0 + e / BW;
      if (e < R * BW && i < H) {
        const int64_t j = min(jb + e % BW, W - 1);
        raw[m][0] = pd.at(i, j);
        raw[m][1] = pu.at(i, j);
        raw[m][2] = pz.at(i, j);
      }
    }
  };
  auto put = [&](int64_t g0) {  // the raw group into its ring slot
    float* sb = stage + ((g0 / R) % 3) * R * 4 * BW;
#pragma unroll
    for (int m = 0; m < MS; ++m) {
      const int e = threadIdx.x + m * threads;
      if (e >= R * BW) continue;
      const int r = e / BW, c = e % BW;
      const bool inc = jb + c < W && g0 + r < H;
      const float v = to_f(raw[m][0]) + bias, uu = to_f(raw[m][1]);
      const float dt = inc ? (p.softplus ? softplus_f(v) : v) : 0.f;  // outside: decay 1, input 0
      float* row = sb + r * 4 * BW;
      row[c] = dt;
      row[BW + c] = dt * uu;
      row[2 * BW + c] = uu;
      row[3 * BW + c] = to_f(raw[m][2]);
    }
  };
  auto prefetch_group = [&](int64_t g0) {
    for (int r = 0; r < R && g0 + r < H; ++r) {
      const int64_t i = g0 + r, j = min(jb + (threadIdx.x % BW), W - 1);
      if (threadIdx.x < BW) {
        prefetch_l2(&pd.at(i, j));
        prefetch_l2(&pu.at(i, j));
        if (gated) prefetch_l2(&pz.at(i, j));
      }
      prefetch_bc<T, NS, true>(i, jp, Bb, Cb, p.B, p.C, st.nact - 1);
    }
  };
  RowBC<T, CPL, NS, true> cur[R], nxt[R];
  auto load_group = [&](RowBC<T, CPL, NS, true> (&dst)[R], int64_t g0) {
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (g0 + r < H) load_bc<T, CPL, NS, true>(dst[r], g0 + r, j0, W, Bb, Cb, p.B, p.C, st.nact - 1);
  };

  load_raw(0);
  load_group(nxt, 0);
  put(0);
  if (R < H) load_raw(R);
  for (int64_t g0 = R; g0 < H && g0 < R * (1 + kL2Ahead); g0 += R) prefetch_group(g0);
  float h[NS][CPL];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int k = 0; k < CPL; ++k) h[s][k] = 0.f;
  __syncthreads();

  for (int64_t g0 = 0; g0 < H; g0 += R) {
    const int64_t gi = g0 / R;
#pragma unroll
    for (int r = 0; r < R; ++r) cur[r] = nxt[r];
    if (g0 + R < H) load_group(nxt, g0 + R);
    if (g0 + R * (1 + kL2Ahead) < H) prefetch_group(g0 + R * (1 + kL2Ahead));
    const float* sg = stage + (gi % 3) * R * 4 * BW;
    float* pb = part + (gi & 1) * R * L.nw * BW;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = g0 + r;
      if (i >= H) break;
      float dt[CPL], dtu[CPL], yp[CPL];
      lds_cols<CPL>(dt, sg + r * 4 * BW + lane * CPL);
      lds_cols<CPL>(dtu, sg + r * 4 * BW + BW + lane * CPL);
#pragma unroll
      for (int k = 0; k < CPL; ++k) yp[k] = 0.f;
      const bool save = ck && (i + 1) % kSegment == 0 && i + 1 < H;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        if (s >= st.nact) continue;  // warp-uniform
        const float cin = band > 0 ? fold_left(L, sdt + i * nb, S0 + (s * H + i) * (nb - 1), band, A2[s]) : 0.f;
        float a[CPL], x[CPL], e[CPL];
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          a[k] = fast_exp2(dt[k] * A2[s]);
          x[k] = dtu[k] * to_f(cur[r].B[s][k]);
        }
        band_scan<CPL, false>(a, x, cin, e, lane);
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          h[s][k] = fmaf(a[k], h[s][k], fmaf(a[k], e[k], x[k]));
          yp[k] = fmaf(to_f(cur[r].C[s][k]), h[s][k], yp[k]);
        }
        if (save) {
          float* row = ck + (s * nseg1 + (i + 1) / kSegment - 1) * W;
#pragma unroll
          for (int k = 0; k < CPL; ++k)
            if (in[k]) row[j0 + k] = h[s][k];
        }
      }
#pragma unroll
      for (int k = 0; k < CPL; ++k) pb[((r * L.nw + wi) * CPL + k) * 32 + lane] = yp[k];
    }
    if (g0 + R < H) {
      put(g0 + R);
      if (g0 + 2 * R < H) load_raw(g0 + 2 * R);
    }
    __syncthreads();
    if (wi == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t i = g0 + r;
        if (i >= H) break;
        float uv[CPL], zv[CPL];
        lds_cols<CPL>(uv, sg + r * 4 * BW + 2 * BW + lane * CPL);
        lds_cols<CPL>(zv, sg + r * 4 * BW + 3 * BW + lane * CPL);
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          if (!in[k]) continue;
          float y = 0.f;
          for (int w = 0; w < L.nw; ++w) y += pb[((r * L.nw + w) * CPL + k) * 32 + lane];
          const int64_t j = j0 + k;
          if (!L.first || !L.last) {
            float* acc = L.acc + ((b * p.dim + d) * H + i) * W + j;
            if (!L.first) y += *acc;
            if (!L.last) {
              *acc = y;
              continue;
            }
          }
          y = fmaf(Dd, uv[k], y);
          if (gated) y *= zv[k] * sigmoid_f(zv[k]);
          plane<T>(o.out, b, d, 0).at(i, j) = from_f<T>(y);
        }
      }
    }
  }
}

// N == 1: a warp per (batch, channel, band) needs no partner, so it loads its own cells (no staging,
// no barrier), kSoloRows rows a group ahead; four independent warps share a block.
constexpr int kSoloRows = 4;
template <typename T, int CPL>
struct SoloRow {
  T d[CPL], u[CPL], z[CPL], B[CPL], C[CPL];
};

template <typename T, int CPL>
__global__ void __launch_bounds__(128) scan2d_fwd_solo_kernel(Scan2dProblem p, Scan2dForwardOutputs o, Plan L,
                                                             int64_t b0) {
  constexpr int BW = 32 * CPL, R = kSoloRows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (item >= p.dim * L.nb) return;
  const int64_t d = item / L.nb, band = item % L.nb, b = blockIdx.y + b0;
  const int64_t H = p.height, W = p.width, g = d / (p.dim / p.groups), nb = L.nb;
  const int64_t j0 = band * BW + lane * CPL, jp = min(j0, W - 1);
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float Dd = p.D ? static_cast<const float*>(p.D)[d] : 0.f;
  const float A2 = static_cast<const float*>(p.A)[d * p.A_sd] * kLog2e;
  const bool gated = p.z.defined();
  const Plane<const T> pd = plane<const T>(p.delta, b, d, 0), pu = plane<const T>(p.u, b, d, 0);
  const Plane<const T> pz = gated ? plane<const T>(p.z, b, d, 0) : pu;
  const Plane<const T> pB = plane<const T>(p.B, b, g, 0), pC = plane<const T>(p.C, b, g, 0);
  const Plane<T> out = plane<T>(o.out, b, d, 0);
  const float* sdt = nb > 1 ? L.sumdt + (b * p.dim + d) * H * nb : nullptr;
  const float* S0 = nb > 1 ? L.S + (b * p.dim + d) * H * (nb - 1) : nullptr;
  const int64_t nseg1 = ceil_div(H, kSegment) - 1;
  float* ck = o.carries ? o.carries + (b * p.dim + d) * nseg1 * W : nullptr;
  bool in[CPL];
#pragma unroll
  for (int k = 0; k < CPL; ++k) in[k] = j0 + k < W;
  SoloRow<T, CPL> cur[R], nxt[R];
  auto load_group = [&](int64_t g0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = g0 + r;
      if (i >= H) break;
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const int64_t j = min(j0 + k, W - 1);
        nxt[r].d[k] = pd.at(i, j);
        nxt[r].u[k] = pu.at(i, j);
        nxt[r].z[k] = pz.at(i, j);
        nxt[r].B[k] = pB.at(i, j);
        nxt[r].C[k] = pC.at(i, j);
      }
    }
  };
  auto prefetch_group = [&](int64_t g0) {
    for (int r = 0; r < R && g0 + r < H; ++r) {
      prefetch_l2(&pd.at(g0 + r, jp));
      prefetch_l2(&pu.at(g0 + r, jp));
      if (gated) prefetch_l2(&pz.at(g0 + r, jp));
      prefetch_l2(&pB.at(g0 + r, jp));
      prefetch_l2(&pC.at(g0 + r, jp));
    }
  };
  load_group(0);
  for (int64_t g0 = R; g0 < H && g0 < R * (1 + kL2Ahead); g0 += R) prefetch_group(g0);
  float h[CPL];
#pragma unroll
  for (int k = 0; k < CPL; ++k) h[k] = 0.f;
  for (int64_t g0 = 0; g0 < H; g0 += R) {
#pragma unroll
    for (int r = 0; r < R; ++r) cur[r] = nxt[r];
    if (g0 + R < H) load_group(g0 + R);
    if (g0 + R * (1 + kL2Ahead) < H) prefetch_group(g0 + R * (1 + kL2Ahead));
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = g0 + r;
      if (i >= H) break;
      const float cin = band > 0 ? fold_left(L, sdt + i * nb, S0 + i * (nb - 1), band, A2) : 0.f;
      float a[CPL], x[CPL], e[CPL], dt[CPL];
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const float v = to_f(cur[r].d[k]) + bias;
        dt[k] = in[k] ? (p.softplus ? softplus_f(v) : v) : 0.f;
        a[k] = fast_exp2(dt[k] * A2);
        x[k] = dt[k] * to_f(cur[r].u[k]) * to_f(cur[r].B[k]);
      }
      band_scan<CPL, false>(a, x, cin, e, lane);
      const bool save = ck && (i + 1) % kSegment == 0 && i + 1 < H;
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        h[k] = fmaf(a[k], h[k], fmaf(a[k], e[k], x[k]));
        if (!in[k]) continue;
        if (save) ck[((i + 1) / kSegment - 1) * W + j0 + k] = h[k];
        float y = fmaf(Dd, to_f(cur[r].u[k]), to_f(cur[r].C[k]) * h[k]);
        if (gated) {
          const float zv = to_f(cur[r].z[k]);
          y *= zv * sigmoid_f(zv);
        }
        out.at(i, j0 + k) = from_f<T>(y);
      }
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
  const float s = sigmoid_f(z);
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
        a[k] = fast_exp2(dt[k] * A2[s]);
        a_below[s][k] = a[k];
        x[k] = a[k] * lamV[s][k];
      }
      const float leave = band_total<CPL, true>(a, x, lane);
      if (lane == 0) Sr[(s * H + i) * (nb - 1) + (m - 1)] = leave;
    }
  }
}

// One block per (batch, channel, band): NW warps of NS states each, as in the forward. Per segment
// of kSegment rows: (1) top-down, h of every row into shared memory (G by the forward band scan),
// the block staging dt, dt*u per row; (2) bottom-up, the block stages dt, u, dy and the gate factor
// of each row, each warp runs lamV, the reverse band scan for lamH and its states' gradients, and
// leaves its partial ddt, du and C*h (the pre-gate y, for dz) in shared memory; one barrier; warp 0
// sums them in warp order and writes du, ddelta, dz. Two barriers per row. dt of the segment's rows
// is computed once (step 1) and kept for step 2.
// Shared memory: ((kSegment+1)*NW*NS + 2*4 + 2*3*NW + kSegment) x 32*CPL floats.
template <typename T, int CPL, int NS, bool kDet>
__global__ void __launch_bounds__(kMaxWarps<NS> * 32) scan2d_bwd_kernel(Scan2dProblem p, Scan2dBackwardArgs ga,
                                                                      Plan L, int64_t b0) {
  extern __shared__ float smem[];
  constexpr int BW = 32 * CPL;
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5, threads = L.nw * 32, slots = L.nw * NS;
  float* hbuf = smem;                                // [kSegment+1][slots][CPL][32]
  float* stage = hbuf + (kSegment + 1) * slots * BW;  // [2][4][BW]
  float* part = stage + 2 * 4 * BW;                   // [2][nw][3][CPL][32]
  float* dtc = part + 2 * L.nw * 3 * BW;              // [kSegment][BW]: dt of the segment's rows
  const int64_t channels = L.d_end - L.d_begin;
  const int64_t dl = blockIdx.x / L.nb, band = blockIdx.x % L.nb, b = blockIdx.y + b0, d = L.d_begin + dl;
  const int64_t H = p.height, W = p.width, N = p.dstate, g = d / (p.dim / p.groups), nb = L.nb;
  const int64_t bc_c = kDet ? dl : g;
  const int64_t jb = band * BW, j0 = jb + lane * CPL, jp = min(j0, W - 1);
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
  const bool gated = p.z.defined();
  const Plane<const T> u = plane<const T>(p.u, b, d, 0), delta = plane<const T>(p.delta, b, d, 0);
  const Plane<const T> dout = plane<const T>(ga.dout, b, d, 0);
  const Plane<const T> ops_up[2] = {delta, u};
  const Plane<const T> ops_dn[3] = {u, dout, gated ? plane<const T>(p.z, b, d, 0) : dout};
  bool in[CPL];
#pragma unroll
  for (int k = 0; k < CPL; ++k) in[k] = j0 + k < W;
  const int64_t nseg = ceil_div(H, kSegment);
  const float* ck = ga.carries + ((b * p.dim + d) * N + st.n0) * (nseg - 1) * W;
  auto hidx = [&](int64_t r, int s, int k) { return ((r * slots + wi * NS + s) * CPL + k) * 32 + lane; };

  float lamV[NS][CPL], a_below[NS][CPL];
#pragma unroll
  for (int s = 0; s < NS; ++s)
#pragma unroll
    for (int k = 0; k < CPL; ++k) lamV[s][k] = a_below[s][k] = 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;  // warp 0: over the cells it finishes

  Stager<T, CPL, 2> sgu(threadIdx.x, threads, jb, W);
  Stager<T, CPL, 3> sgd(threadIdx.x, threads, jb, W);
  // dB, dC of this (batch, channel or group) and the warp's first state; state s at + s*sn.
  float* dBb = ga.dB.defined() ? static_cast<float*>(ga.dB.data) + b * ga.dB.sb + bc_c * ga.dB.sc + st.n0 * ga.dB.sn
                               : nullptr;
  float* dCb = ga.dC.defined() ? static_cast<float*>(ga.dC.data) + b * ga.dC.sb + bc_c * ga.dC.sc + st.n0 * ga.dC.sn
                               : nullptr;
  auto put_up = [&](int buf, int64_t rr) {  // dt, dt*u of row r0 + rr; dt kept for step 2
    float* sb = stage + buf * 4 * BW;
#pragma unroll
    for (int r = 0; r < CPL; ++r) {
      const int c = threadIdx.x + r * threads;
      if (c >= BW) continue;
      const float v = to_f(sgu.raw[r][0]) + bias;
      const float dt = jb + c < W ? (p.softplus ? softplus_f(v) : v) : 0.f;
      sb[c] = dt;
      sb[BW + c] = dt * to_f(sgu.raw[r][1]);
      dtc[rr * BW + c] = dt;
    }
  };
  auto put_dn = [&](int buf, int64_t rr) {  // dt, u, dy, and dout * d silu(z)/dz (dz = y times it)
    float* sb = stage + buf * 4 * BW;
#pragma unroll
    for (int r = 0; r < CPL; ++r) {
      const int c = threadIdx.x + r * threads;
      if (c >= BW) continue;
      const bool inc = jb + c < W;
      const float go = to_f(sgd.raw[r][1]);
      float dy = go, gz = 0.f;
      if (gated) {
        const float zv = to_f(sgd.raw[r][2]), sz = sigmoid_f(zv);
        dy = go * zv * sz;
        gz = go * sz * (1.f + zv * (1.f - sz));
      }
      sb[c] = dtc[rr * BW + c];
      sb[BW + c] = to_f(sgd.raw[r][0]);
      sb[2 * BW + c] = inc ? dy : 0.f;
      sb[3 * BW + c] = gz;
    }
  };

  for (int64_t seg = nseg - 1; seg >= 0; --seg) {
    const int64_t r0 = seg * kSegment, r1 = min(H, r0 + kSegment);
    // 1. h of the segment's rows, top-down, from the saved row above it (zero above the grid).
    {
      float h[NS][CPL];
#pragma unroll
      for (int s = 0; s < NS; ++s)
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          h[s][k] = (seg > 0 && s < st.nact && in[k]) ? ck[(s * (nseg - 1) + seg - 1) * W + j0 + k] : 0.f;
          hbuf[hidx(0, s, k)] = h[s][k];
        }
      sgu.load(r0, ops_up);
      __syncthreads();  // the previous segment's readers of stage are done
      put_up(0, 0);
      if (r0 + 1 < r1) sgu.load(r0 + 1, ops_up);
      RowBC<T, CPL, NS, false> nxt;
      load_bc<T, CPL, NS, false>(nxt, r0, j0, W, Bb, Cb, p.B, p.C, st.nact - 1);
      __syncthreads();
      for (int64_t i = r0; i < r1; ++i) {
        const RowBC<T, CPL, NS, false> cur = nxt;
        if (i + 1 < r1) load_bc<T, CPL, NS, false>(nxt, i + 1, j0, W, Bb, Cb, p.B, p.C, st.nact - 1);
        float dt[CPL], dtu[CPL];
        const float* sb = stage + ((i - r0) & 1) * 4 * BW + lane * CPL;
        lds_cols<CPL>(dt, sb);
        lds_cols<CPL>(dtu, sb + BW);
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          if (s >= st.nact) continue;
          const float cin = band > 0 ? fold_left(L, sdt + i * nb, S0 + (s * H + i) * (nb - 1), band, A2[s]) : 0.f;
          float a[CPL], x[CPL], e[CPL];
#pragma unroll
          for (int k = 0; k < CPL; ++k) {
            a[k] = fast_exp2(dt[k] * A2[s]);
            x[k] = dtu[k] * to_f(cur.B[s][k]);
          }
          band_scan<CPL, false>(a, x, cin, e, lane);
#pragma unroll
          for (int k = 0; k < CPL; ++k) {
            h[s][k] = fmaf(a[k], h[s][k], fmaf(a[k], e[k], x[k]));
            hbuf[hidx(i - r0 + 1, s, k)] = h[s][k];
          }
        }
        if (i + 1 < r1) {
          put_up((i + 1 - r0) & 1, i + 1 - r0);
          if (i + 2 < r1) sgu.load(i + 2, ops_up);
        }
        __syncthreads();
      }
    }
    // 2. The segment's rows bottom-up.
    for (int64_t r = 1; r <= kL2Ahead && r1 - 1 - r >= 0; ++r) {
      sgd.prefetch(r1 - 1 - r, ops_dn);
      prefetch_bc<T, NS, true>(r1 - 1 - r, jp, Bb, Cb, p.B, p.C, st.nact - 1);
    }
    sgd.load(r1 - 1, ops_dn);
    put_dn(0, r1 - 1 - r0);
    if (r1 - 2 >= r0) sgd.load(r1 - 2, ops_dn);
    RowBC<T, CPL, NS, true> nxt;
    load_bc<T, CPL, NS, true>(nxt, r1 - 1, j0, W, Bb, Cb, p.B, p.C, st.nact - 1);
    __syncthreads();
    for (int64_t i = r1 - 1; i >= r0; --i) {
      const int buf = (r1 - 1 - i) & 1;
      const RowBC<T, CPL, NS, true> cur = nxt;
      if (i - 1 >= r0) load_bc<T, CPL, NS, true>(nxt, i - 1, j0, W, Bb, Cb, p.B, p.C, st.nact - 1);
      if (i - 1 - kL2Ahead >= 0) {
        sgd.prefetch(i - 1 - kL2Ahead, ops_dn);
        prefetch_bc<T, NS, true>(i - 1 - kL2Ahead, jp, Bb, Cb, p.B, p.C, st.nact - 1);
      }
      float dt[CPL], uv[CPL], dy[CPL], gz[CPL], ddt_p[CPL], du_p[CPL], yc_p[CPL];
      {
        const float* sb = stage + buf * 4 * BW + lane * CPL;
        lds_cols<CPL>(dt, sb);
        lds_cols<CPL>(uv, sb + BW);
        lds_cols<CPL>(dy, sb + 2 * BW);
        lds_cols<CPL>(gz, sb + 3 * BW);
      }
#pragma unroll
      for (int k = 0; k < CPL; ++k) ddt_p[k] = du_p[k] = yc_p[k] = 0.f;
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        if (s >= st.nact) continue;
        const float cR = band + 1 < nb ? fold_right(L, sdt + i * nb, Sr0 + (s * H + i) * (nb - 1), band, A2[s]) : 0.f;
        float a[CPL], xr[CPL], e[CPL];
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          lamV[s][k] = fmaf(a_below[s][k], lamV[s][k], dy[k] * to_f(cur.C[s][k]));
          a[k] = fast_exp2(dt[k] * A2[s]);
          a_below[s][k] = a[k];
          xr[k] = a[k] * lamV[s][k];
        }
        band_scan<CPL, true>(a, xr, cR, e, lane);
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          const float bv = in[k] ? to_f(cur.B[s][k]) : 0.f, cv = in[k] ? to_f(cur.C[s][k]) : 0.f;
          const float lamH = lamV[s][k] + e[k];
          const float h = hbuf[hidx(i - r0 + 1, s, k)];
          const float ah = a[k] * hbuf[hidx(i - r0, s, k)];  // a * h[i-1]
          // x rounded as step 1 rounds it, so that G - x is exact where it is 0 (a 1 x 1 grid: dA = 0).
          // __fmul_rn: a plain product here is contracted into the subtraction below (an FMA keeps
          // the product unrounded and leaves its rounding error, ~1e-8 of x, in q).
          const float x = __fmul_rn(dt[k] * uv[k], bv);
          const float q = fmaf(lamV[s][k], ah, lamH * (h - ah - x));
          dA_acc[s] = fmaf(q, dt[k], dA_acc[s]);
          ddt_p[k] = fmaf(q, An[s], fmaf(lamH * bv, uv[k], ddt_p[k]));
          du_p[k] = fmaf(lamH * bv, dt[k], du_p[k]);
          yc_p[k] = fmaf(cv, h, yc_p[k]);
          if (in[k]) {
            const int64_t j = j0 + k;
            if (dBb) {
              float* dst = dBb + s * ga.dB.sn + i * ga.dB.si + j * ga.dB.sj;
              if (kDet) *dst = lamH * dt[k] * uv[k];
              else atomicAdd(dst, lamH * dt[k] * uv[k]);
            }
            if (dCb) {
              float* dst = dCb + s * ga.dC.sn + i * ga.dC.si + j * ga.dC.sj;
              if (kDet) *dst = dy[k] * h;
              else atomicAdd(dst, dy[k] * h);
            }
          }
        }
      }
      float* pb = part + buf * L.nw * 3 * BW;
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        pb[((wi * 3 + 0) * CPL + k) * 32 + lane] = ddt_p[k];
        pb[((wi * 3 + 1) * CPL + k) * 32 + lane] = du_p[k];
        pb[((wi * 3 + 2) * CPL + k) * 32 + lane] = yc_p[k];
      }
      if (i - 1 >= r0) {
        put_dn(buf ^ 1, i - 1 - r0);
        if (i - 2 >= r0) sgd.load(i - 2, ops_dn);
      }
      __syncthreads();
      if (wi == 0) {
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          if (!in[k]) continue;
          float ddt = 0.f, du = 0.f, yc = 0.f;
          for (int w = 0; w < L.nw; ++w) {
            ddt += pb[((w * 3 + 0) * CPL + k) * 32 + lane];
            du += pb[((w * 3 + 1) * CPL + k) * 32 + lane];
            yc += pb[((w * 3 + 2) * CPL + k) * 32 + lane];
          }
          const int64_t j = j0 + k;
          if (!L.first || !L.last) {
            float* acc = L.acc + (((b * channels + dl) * H + i) * W + j) * 3;
            if (!L.first) {
              ddt += acc[0];
              du += acc[1];
              yc += acc[2];
            }
            if (!L.last) {
              acc[0] = ddt;
              acc[1] = du;
              acc[2] = yc;
              continue;
            }
          }
          du = fmaf(Dd, dy[k], du);
          // d softplus(v)/dv = sigmoid(v) = 1 - exp(-softplus(v)); ~1 in the identity branch (v > 20).
          const float ddelta = p.softplus ? ddt * -expm1f(-dt[k]) : ddt;
          dbias_acc += ddelta;
          dD_acc = fmaf(dy[k], uv[k], dD_acc);
          if (ga.du.defined()) plane<T>(ga.du, b, d, 0).at(i, j) = from_f<T>(du);
          if (ga.ddelta.defined()) plane<T>(ga.ddelta, b, d, 0).at(i, j) = from_f<T>(ddelta);
          if (ga.dz.defined()) plane<T>(ga.dz, b, d, 0).at(i, j) = from_f<T>(fmaf(Dd, uv[k], yc) * gz[k]);
        }
      }
    }
  }
  // Per-band sums in a fixed order: lanes by shuffles; dA per warp (its states), dD and ddelta_bias
  // from warp 0 (which finished every cell).
  float* pt = L.part + ((b * p.dim + d) * nb + band) * (N + 2);
#pragma unroll
  for (int s = 0; s < NS; ++s) {
    const float v = warp_sum(dA_acc[s]);
    if (s < st.nact && lane == 0) pt[st.n0 + s] = v;
  }
  if (L.last && wi == 0) {
    dD_acc = warp_sum(dD_acc);
    dbias_acc = warp_sum(dbias_acc);
    if (lane == 0) {
      pt[N] = dD_acc;
      pt[N + 1] = dbias_acc;
    }
  }
}

// N == 1 and H == 1 (VMamba's 1D routes), backward: 8 lanes per channel, a warp per 4 channels of
// one batch. The channel's lanes walk its row right to left a super-chunk of kScan2dRowChunk = 32
// columns at a time, 4 columns per lane, each lane's columns in sequence: no block barrier and
// only 8-lane scans. Per super-chunk: the h entering it is the carry the forward saved there; each
// lane's map of h over its columns, an 8-lane scan, then the lane's h rebuilt in registers (pass 1);
// each lane's adjoint map, an 8-lane scan from the carry entering on the right, then lam and every
// gradient of its columns (pass 2). When the warp's 4 channels share a group, their dB and dC meet
// in a reduce-scatter over the lanes (2 rounds), then one atomic per column per 4 channels. A lane
// reads its 4 columns of a row as one vector (16 bytes of float32, 8 of 16-bit types) where every
// operand's row has stride +1 or -1 and is aligned (kVec), and the L2 is asked for the super-chunk
// two ahead.
//
// Why 4 columns a lane: with 8 (4 lanes per channel) the kernel needed 168 registers, 3 blocks of 4
// warps per SM, and measured latency-bound on an H100 (Nsight Compute: 35% of issue slots busy,
// 0.45 eligible warps per scheduler); 4 columns fit 128 registers without spills in the vector
// instances: 4 blocks, 16 warps per SM, and twice the warps in the launch.
constexpr int kRowChunk = 4;  // columns per lane
constexpr int kRowSeg = static_cast<int>(kScan2dRowChunk) / kRowChunk;  // lanes per channel (8)
constexpr int kRowChans = 32 / kRowSeg;    // channels per warp
constexpr int kRowBwdWarps = 4;

// 32-bit words of one lane's chunk of a row as one vector: 16 bytes of float32, 8 of 16-bit types.
template <typename T>
constexpr int kRowWords = kRowChunk * static_cast<int>(sizeof(T)) / 4;

// Bits of a vector's elements: element e of its 32-bit words (16-bit types two to a word).
template <typename T, int NW>
__device__ __forceinline__ float vec_elem(const uint32_t (&w)[NW], int e) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w[e]);
  } else {
    const unsigned short bits = static_cast<unsigned short>(e & 1 ? w[e >> 1] >> 16 : w[e >> 1] & 0xffffu);
    if constexpr (std::is_same_v<T, __half>) return __half2float(__ushort_as_half(bits));
    else return __bfloat162float(__ushort_as_bfloat16(bits));
  }
}
template <typename T>
__device__ __forceinline__ uint32_t vec_word(const float* v) {  // v[0] (and v[1]) as one word
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(v[0]);
  } else if constexpr (std::is_same_v<T, __half>) {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v[0]))) |
           static_cast<uint32_t>(__half_as_ushort(__float2half_rn(v[1]))) << 16;
  } else {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v[0]))) |
           static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v[1]))) << 16;
  }
}

// The 1D row kernels' instances take the direction of their rows' columns in memory as kDir: +1 or
// -1 when every row operand (and output) has that column stride and aligned chunks (the vector
// instances: a chunk is one 16- or 8-byte vector), 0 for any strides (element by element). A
// compile-time stride leaves a chunk's first address and its element order without per-chunk
// selects: the 16-bit row backward is issue-bound, and those selects were 7% of its instructions.
template <typename T, int kDir>
__device__ __forceinline__ Plane<T> row_plane(const Grid& g, int64_t b, int64_t c) {
  Plane<T> r = plane<T>(g, b, c, 0);
  if constexpr (kDir != 0) r.sj = kDir;  // the host checked that g.sj == kDir
  return r;
}

// The raw words of a lane's full chunk of a row (columns j0 .. j0 + kRowChunk - 1; vector rows, sj
// +1 or -1, a compile-time constant there).
template <typename T>
__device__ __forceinline__ void load_words(uint32_t (&w)[kRowWords<T>], const T* row, int64_t sj, int64_t j0) {
  const T* first = sj > 0 ? row + j0 : row - j0 - (kRowChunk - 1);
  if constexpr (kRowWords<T> == 4) {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(first));
    w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
  } else {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(first));
    w[0] = q.x, w[1] = q.y;
  }
}
// v[k] = column k of the chunk whose words load_words read.
template <typename T>
__device__ __forceinline__ void decode_words(float (&v)[kRowChunk], const uint32_t (&w)[kRowWords<T>], int64_t sj) {
#pragma unroll
  for (int k = 0; k < kRowChunk; ++k) {  // memory element k is column k (reversed for sj < 0)
    const float x = vec_elem<T>(w, k);
    if (sj > 0) v[k] = x; else v[kRowChunk - 1 - k] = x;
  }
}

// v[k] = column j0 + k of a row (element j at row[j * sj]) as float32; columns past n repeat the
// last valid one. kVec: sj is +1 or -1 and the chunk's vectors are aligned (host-checked).
template <typename T, bool kVec>
__device__ __forceinline__ void load_chunk(float (&v)[kRowChunk], const T* row, int64_t sj, int64_t j0, int n) {
  if (kVec && n == kRowChunk) {
    uint32_t w[kRowWords<T>];
    load_words<T>(w, row, sj, j0);
    decode_words<T>(v, w, sj);
    return;
  }
#pragma unroll
  for (int k = 0; k < kRowChunk; ++k) v[k] = to_f(row[(j0 + (k < n ? k : n - 1)) * sj]);
}

// Columns j0 .. j0 + n - 1 of a row from v (float32, rounded to T).
template <typename T, bool kVec>
__device__ __forceinline__ void store_chunk(T* row, int64_t sj, int64_t j0, int n, const float (&v)[kRowChunk]) {
  if (kVec && n == kRowChunk) {
    const bool fwd = sj > 0;
    float m[kRowChunk];  // memory order
#pragma unroll
    for (int k = 0; k < kRowChunk; ++k) m[k] = fwd ? v[k] : v[kRowChunk - 1 - k];
    T* first = fwd ? row + j0 : row - j0 - (kRowChunk - 1);
    constexpr int kWordElems = sizeof(T) == 4 ? 1 : 2;
    if constexpr (kRowWords<T> == 4) {
      *reinterpret_cast<uint4*>(first) = make_uint4(vec_word<T>(m), vec_word<T>(m + kWordElems),
                                                    vec_word<T>(m + 2 * kWordElems), vec_word<T>(m + 3 * kWordElems));
    } else {
      *reinterpret_cast<uint2*>(first) = make_uint2(vec_word<T>(m), vec_word<T>(m + kWordElems));
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kRowChunk; ++k)
    if (k < n) row[(j0 + k) * sj] = from_f<T>(v[k]);
}

// One round of a reduce-scatter over the warp: lanes differing in lane bit LB exchange half of their
// 2 * S values (S shuffles and adds); after it v[i], i < S, holds the pair's sum of value
// i + S * (lane has bit LB).
template <int S, int LB, int NV>
__device__ __forceinline__ void reduce_scatter_round(float (&v)[NV], int lane) {
  static_assert(2 * S <= NV, "a round exchanges 2 * S values");
  const bool up = lane & LB;
#pragma unroll
  for (int i = 0; i < S; ++i) {
    const float send = up ? v[i] : v[i + S];
    const float keep = up ? v[i + S] : v[i];
    v[i] = keep + __shfl_xor_sync(kFull, send, LB);
  }
}

// The operands of a lane's CPL columns of band m of a 1-row grid (N == 1); columns past the end read
// the last one (in range; their results are not used).
template <typename T, int CPL>
__device__ __forceinline__ void load_row_band(SoloRow<T, CPL>& r, const Plane<const T>& pd, const Plane<const T>& pu,
                                              const Plane<const T>& pz, const Plane<const T>& pB,
                                              const Plane<const T>& pC, int64_t m, int lane, int64_t W) {
#pragma unroll
  for (int k = 0; k < CPL; ++k) {
    const int64_t j = min(m * 32 * CPL + lane * CPL + k, W - 1);
    r.d[k] = pd.at(0, j);
    r.u[k] = pu.at(0, j);
    r.z[k] = pz.at(0, j);
    r.B[k] = pB.at(0, j);
    r.C[k] = pC.at(0, j);
  }
}

// N == 1 and H == 1 (VMamba's 1D routes): a warp walks its whole row band after band, the carry
// handed from band to band in a register: no band summaries, and every (batch, channel) in flight.
// kDir != 0 (CPL == kRowChunk, every row operand and the output with column stride kDir and aligned,
// as the backward's): a lane reads each operand of its 4 columns as one vector (8 bytes of 16-bit types, 16
// of float32) a band ahead, and writes its 4 outputs as one; the last band's partial chunks are read
// and written element by element.
template <typename T, int CPL, int kDir>
__global__ void __launch_bounds__(128) scan2d_fwd_row_kernel(Scan2dProblem p, Scan2dForwardOutputs o, Plan L,
                                                            int64_t b0) {
  constexpr bool kVec = kDir != 0;
  static_assert(!kVec || CPL == kRowChunk, "vector rows are the backward's chunks");
  constexpr int BW = 32 * CPL;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * 4 + warp, b = blockIdx.y + b0;
  if (d >= p.dim) return;
  const int64_t W = p.width, g = d / (p.dim / p.groups);
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float Dd = p.D ? static_cast<const float*>(p.D)[d] : 0.f;
  const float A2 = static_cast<const float*>(p.A)[d * p.A_sd] * kLog2e;
  const bool gated = p.z.defined();
  const Plane<const T> pd = row_plane<const T, kDir>(p.delta, b, d), pu = row_plane<const T, kDir>(p.u, b, d);
  const Plane<const T> pz = gated ? row_plane<const T, kDir>(p.z, b, d) : pu;
  const Plane<const T> pB = row_plane<const T, kDir>(p.B, b, g), pC = row_plane<const T, kDir>(p.C, b, g);
  const Plane<T> out = row_plane<T, kDir>(o.out, b, d);
  struct Words {  // a full chunk's raw vectors (kVec)
    uint32_t d[kRowWords<T>], u[kRowWords<T>], z[kRowWords<T>], B[kRowWords<T>], C[kRowWords<T>];
  };
  SoloRow<T, CPL> cur, nxt;  // !kVec: the band's elements, a band ahead
  Words wcur, wnxt;          // kVec: its raw vectors, a band ahead
  bool full_cur = false, full_nxt = false;
  auto load_band = [&](int64_t m) {
    if constexpr (kVec) {
      const int64_t j0 = m * BW + lane * CPL;
      full_nxt = j0 + CPL <= W;
      if (full_nxt) {
        load_words<T>(wnxt.d, pd.base, pd.sj, j0);
        load_words<T>(wnxt.u, pu.base, pu.sj, j0);
        if (gated) load_words<T>(wnxt.z, pz.base, pz.sj, j0);
        load_words<T>(wnxt.B, pB.base, pB.sj, j0);
        load_words<T>(wnxt.C, pC.base, pC.sj, j0);
        return;
      }
    }
    if constexpr (!kVec) load_row_band<T, CPL>(nxt, pd, pu, pz, pB, pC, m, lane, W);
  };
  load_band(0);
  float carry = 0.f;
  // G entering every kScan2dRowChunk-th column (the backward's chunks), from the lanes whose first
  // column starts a chunk.
  float* saved = o.carries ? o.carries + (b * p.dim + d) * ceil_div(W, kScan2dRowChunk) : nullptr;
  for (int64_t m = 0; m < L.nb; ++m) {
    if constexpr (kVec) {
      wcur = wnxt;
      full_cur = full_nxt;
    } else {
      cur = nxt;
    }
    if (m + 1 < L.nb) load_band(m + 1);
    const int64_t j0 = m * BW + lane * CPL;
    float vd[CPL], vu[CPL], vz[CPL], vB[CPL], vC[CPL];
    if constexpr (kVec) {
      if (full_cur) {
        decode_words<T>(vd, wcur.d, pd.sj);
        decode_words<T>(vu, wcur.u, pu.sj);
        if (gated) decode_words<T>(vz, wcur.z, pz.sj);
        decode_words<T>(vB, wcur.B, pB.sj);
        decode_words<T>(vC, wcur.C, pC.sj);
      } else {  // the last band's partial chunk (or none: columns past the end repeat a valid one)
        const int64_t jl = j0 < W ? j0 : W - 1;
        const int nl = static_cast<int>(W - jl < CPL ? W - jl : CPL);
        load_chunk<T, false>(vd, pd.base, pd.sj, jl, nl);
        load_chunk<T, false>(vu, pu.base, pu.sj, jl, nl);
        load_chunk<T, false>(vz, pz.base, pz.sj, jl, nl);
        load_chunk<T, false>(vB, pB.base, pB.sj, jl, nl);
        load_chunk<T, false>(vC, pC.base, pC.sj, jl, nl);
      }
    } else {
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        vd[k] = to_f(cur.d[k]);
        vu[k] = to_f(cur.u[k]);
        vz[k] = to_f(cur.z[k]);
        vB[k] = to_f(cur.B[k]);
        vC[k] = to_f(cur.C[k]);
      }
    }
    float a[CPL], x[CPL], e[CPL];
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const float v = vd[k] + bias;
      const float dt = j0 + k < W ? (p.softplus ? softplus_f(v) : v) : 0.f;
      a[k] = fast_exp2(dt * A2);
      x[k] = dt * vu[k] * vB[k];
    }
    carry = band_scan<CPL, false>(a, x, carry, e, lane);
    if (saved && (lane * CPL) % kScan2dRowChunk == 0 && j0 < W) saved[j0 / kScan2dRowChunk] = e[0];
    float y[CPL];
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      y[k] = fmaf(Dd, vu[k], vC[k] * fmaf(a[k], e[k], x[k]));
      if (gated) y[k] *= vz[k] * sigmoid_f(vz[k]);
    }
    const int64_t nv = W - j0 < CPL ? W - j0 : CPL;
    if constexpr (kVec) {
      if (nv > 0) store_chunk<T, true>(&out.at(0, 0), out.sj, j0, static_cast<int>(nv), y);
    } else {
#pragma unroll
      for (int k = 0; k < CPL; ++k)
        if (k < nv) out.at(0, j0 + k) = from_f<T>(y[k]);
    }
  }
}

template <typename T, bool kDet, int kDir>
__global__ void __launch_bounds__(kRowBwdWarps * 32, 4) scan2d_bwd_row_kernel(Scan2dProblem p, Scan2dBackwardArgs ga,
                                                                          Plan L, int64_t b0) {
  constexpr bool kVec = kDir != 0;
  constexpr int CH = kRowChunk, SEG = kRowSeg;
  const int lane = threadIdx.x & 31, s = lane % SEG, cw = lane / SEG;
  const int64_t dw =
      L.d_begin + (static_cast<int64_t>(blockIdx.x) * kRowBwdWarps + (threadIdx.x >> 5)) * kRowChans;
  if (dw >= L.d_end) return;
  // Lanes of channels past the range run the last channel (the warp's shuffles need every lane) and
  // write nothing.
  const bool valid = dw + cw < L.d_end;
  const int64_t d = valid ? dw + cw : L.d_end - 1, dl = d - L.d_begin, b = blockIdx.y + b0;
  const int64_t W = p.width, cpg = p.dim / p.groups, g = d / cpg, nc = ceil_div(W, CH);
  const int64_t nsc = ceil_div(nc, SEG);
  // The warp's channels share one group: their dB, dC meet in the warp before the atomics.
  const bool warp_sum_bc = !kDet && dw + kRowChans - 1 < L.d_end && dw / cpg == (dw + kRowChans - 1) / cpg;
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[d] : 0.f;
  const float Dd = p.D ? static_cast<const float*>(p.D)[d] : 0.f;
  const float An = static_cast<const float*>(p.A)[d * p.A_sd], A2 = An * kLog2e;
  const bool gated = p.z.defined();
  const Plane<const T> pd = row_plane<const T, kDir>(p.delta, b, d), pu = row_plane<const T, kDir>(p.u, b, d);
  const Plane<const T> pz = gated ? row_plane<const T, kDir>(p.z, b, d) : pu;
  const Plane<const T> pB = row_plane<const T, kDir>(p.B, b, g), pC = row_plane<const T, kDir>(p.C, b, g);
  const Plane<const T> pg = row_plane<const T, kDir>(ga.dout, b, d);
  // h entering each super-chunk of SEG chunks (kScan2dRowChunk columns), saved by the forward.
  const float* car = ga.carries + (b * p.dim + d) * nsc;
  const int64_t bc_c = kDet ? dl : g;
  float* dBrow = ga.dB.defined() ? &plane<float>(ga.dB, b, bc_c, 0).at(0, 0) : nullptr;
  float* dCrow = ga.dC.defined() ? &plane<float>(ga.dC, b, bc_c, 0).at(0, 0) : nullptr;
  const int64_t dBsj = ga.dB.sj, dCsj = ga.dC.sj;

  // A super-chunk's columns of one operand span at most two 128-byte lines (32 columns of at most
  // 4 bytes): the channel's first lane asks L2 for the line of its first column, its last lane for
  // that of its last column; the lanes between ask for nothing (their columns lie in those lines).
  auto prefetch = [&](int64_t sc) {
    const int64_t first = sc * kScan2dRowChunk;
    if ((s != 0 && s != SEG - 1) || first >= W) return;
    const int64_t j = s == 0 ? first : (first + kScan2dRowChunk < W ? first + kScan2dRowChunk : W) - 1;
    prefetch_l2(pd.base + j * pd.sj);
    prefetch_l2(pu.base + j * pu.sj);
    if (gated) prefetch_l2(pz.base + j * pz.sj);
    prefetch_l2(pB.base + j * pB.sj);
    prefetch_l2(pC.base + j * pC.sj);
    prefetch_l2(pg.base + j * pg.sj);
  };

  prefetch(nsc - 1);
  if (nsc >= 2) prefetch(nsc - 2);

  // 16-bit rows read a super-chunk ahead into registers (12 words a lane; float32's 24 would not fit
  // the 128 registers of 4 blocks per SM): the loads of the next super-chunk are in flight during
  // this one's arithmetic instead of being waited for at its start.
  constexpr bool kAhead = kVec && sizeof(T) == 2;
  struct {
    uint32_t d[kRowWords<T>], u[kRowWords<T>], B[kRowWords<T>], C[kRowWords<T>], g[kRowWords<T>], z[kRowWords<T>];
  } ahead;
  float carry = 0.f;  // a * lamH entering the super-chunk from its right (same on the channel's lanes)
  float dA_acc = 0.f, dD_acc = 0.f, dbias_acc = 0.f;
  // One super-chunk. Every one but the row's last (walked first) has SEG full chunks: kWhole instances
  // of the body fold the per-column range tests and selects away (the 16-bit backward is
  // issue-bound).
  auto super_chunk = [&](auto whole, const int64_t sc) {
    constexpr bool kWhole = decltype(whole)::value;
    // This lane's chunk; chunks past the row's end (the last super-chunk's) are identities: no
    // columns, decay 1 (their loads read column 0, in range).
    const int64_t c = sc * SEG + s;
    const bool active = kWhole || c < nc;
    const int64_t j0 = active ? c * CH : 0;
    const int n = kWhole ? CH : active ? static_cast<int>(W - j0 < CH ? W - j0 : CH) : 0;
    const int nl = n > 0 ? n : 1;
    float rd[CH], ru[CH], rB[CH], rC[CH], rg[CH], rz[CH];
    if (kAhead && sc + 1 < nsc) {  // loaded during the super-chunk on the right (full chunks only)
      decode_words<T>(rd, ahead.d, pd.sj);
      decode_words<T>(ru, ahead.u, pu.sj);
      decode_words<T>(rB, ahead.B, pB.sj);
      decode_words<T>(rC, ahead.C, pC.sj);
      decode_words<T>(rg, ahead.g, pg.sj);
      if (gated) decode_words<T>(rz, ahead.z, pz.sj);
    } else {
      load_chunk<T, kVec>(rd, pd.base, pd.sj, j0, nl);
      load_chunk<T, kVec>(ru, pu.base, pu.sj, j0, nl);
      load_chunk<T, kVec>(rB, pB.base, pB.sj, j0, nl);
      load_chunk<T, kVec>(rC, pC.base, pC.sj, j0, nl);
      load_chunk<T, kVec>(rg, pg.base, pg.sj, j0, nl);
      if (gated) load_chunk<T, kVec>(rz, pz.base, pz.sj, j0, nl);
    }
    if (kAhead && sc >= 1) {  // the next super-chunk's words: in flight while this one is computed
      const int64_t jn = ((sc - 1) * SEG + s) * CH;  // a full chunk: only the last super-chunk has partial ones
      load_words<T>(ahead.d, pd.base, pd.sj, jn);
      load_words<T>(ahead.u, pu.base, pu.sj, jn);
      load_words<T>(ahead.B, pB.base, pB.sj, jn);
      load_words<T>(ahead.C, pC.base, pC.sj, jn);
      load_words<T>(ahead.g, pg.base, pg.sj, jn);
      if (gated) load_words<T>(ahead.z, pz.base, pz.sj, jn);
    }
    if (sc >= 2) prefetch(sc - 2);
    // Pass 1a, left to right: dt, the softplus slope, the decay and input of each column, and the
    // chunk's map h -> Pf*h + Xf. Columns past the row's end get dt = 0 (decay 1, no input) and
    // dout = 0: they add nothing.
    float dt[CH], dsp[CH], a[CH], x[CH], dy[CH], gz[CH];  // gz: d out / d z per unit of y (gated)
    float Pf = 1.f, Xf = 0.f;
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const float v = rd[k] + bias;
      // d softplus(v)/dv = sigmoid(v), from softplus's own exp(-|v|): no cancellation.
      float sp = v, t = 0.f;
      if (p.softplus) sp = softplus_t(v, t);
      dt[k] = k < n ? sp : 0.f;
      dsp[k] = p.softplus ? softplus_slope(v, t) : 1.f;
      a[k] = fast_exp2(dt[k] * A2);
      x[k] = dt[k] * ru[k] * rB[k];
      Xf = fmaf(a[k], Xf, x[k]);
      Pf *= a[k];
      const float go = k < n ? rg[k] : 0.f;
      if (gated) {  // the gate's sigmoid once per column: dy and dz's factor (dout, z die here)
        const float zv = rz[k], sz = sigmoid_f(zv);
        dy[k] = go * zv * sz;
        gz[k] = go * sz * (1.f + zv * (1.f - sz));
      } else {
        dy[k] = go;
        gz[k] = 0.f;
      }
    }
    // The h entering each chunk: a scan over the channel's SEG lanes from the h the forward saved
    // at the super-chunk's first column.
#pragma unroll
    for (int off = 1; off < SEG; off <<= 1) {  // inclusive, from the left: lane s composes 0 .. s
      const float Pp = __shfl_up_sync(kFull, Pf, off, SEG), Xp = __shfl_up_sync(kFull, Xf, off, SEG);
      if (s >= off) {
        Xf = fmaf(Pf, Xp, Xf);
        Pf *= Pp;
      }
    }
    float Pl = __shfl_up_sync(kFull, Pf, 1, SEG), Xl = __shfl_up_sync(kFull, Xf, 1, SEG);
    if (s == 0) {
      Pl = 1.f;
      Xl = 0.f;
    }
    const float h0 = car[sc];
    // Pass 1b: the h entering each column.
    float hin[CH];
    float h = fmaf(Pl, h0, Xl);
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      hin[k] = h;
      h = fmaf(a[k], h, x[k]);
    }
    // Pass 2a, right to left: the chunk's adjoint map R -> P*R + X (R = a*lamH leaving a column
    // to the left), then R entering each chunk of the super-chunk by a scan over the channel's
    // SEG lanes, from the carry entering on the right.
    float P = 1.f, X = 0.f;
#pragma unroll
    for (int k = CH - 1; k >= 0; --k) {
      X = a[k] * fmaf(dy[k], rC[k], X);
      P *= a[k];
    }
#pragma unroll
    for (int off = 1; off < SEG; off <<= 1) {  // inclusive, from the right: lane s composes s .. SEG-1
      const float Pn = __shfl_down_sync(kFull, P, off, SEG), Xn = __shfl_down_sync(kFull, X, off, SEG);
      if (s + off < SEG) {
        X = fmaf(P, Xn, X);
        P *= Pn;
      }
    }
    float Pe = __shfl_down_sync(kFull, P, 1, SEG), Xe = __shfl_down_sync(kFull, X, 1, SEG);
    if (s == SEG - 1) {
      Pe = 1.f;
      Xe = 0.f;
    }
    float lamR = fmaf(Pe, carry, Xe);
    carry = __shfl_sync(kFull, fmaf(P, carry, X), 0, SEG);  // leaving the super-chunk on the left
    // Pass 2b, right to left: lam and every gradient of the column.
    float vdu[CH], vdd[CH], vdz[CH], bc[2 * CH];
#pragma unroll
    for (int k = CH - 1; k >= 0; --k) {
      const float uv = ru[k], bv = rB[k], cv = rC[k];
      const float ah = a[k] * hin[k];  // the decayed carry
      const float hv = ah + x[k];
      const float lamH = fmaf(dy[k], cv, lamR);
      lamR = a[k] * lamH;
      const float q = lamH * ah;
      const float lbu = lamH * bv;
      const float ddt = fmaf(q, An, lbu * uv);
      bc[k] = lamH * dt[k] * uv;
      bc[CH + k] = dy[k] * hv;
      dA_acc = fmaf(q, dt[k], dA_acc);
      vdd[k] = ddt * dsp[k];
      if (k < n) dbias_acc += vdd[k];
      dD_acc = fmaf(dy[k], uv, dD_acc);
      vdu[k] = fmaf(Dd, dy[k], lbu * dt[k]);
      if (gated) vdz[k] = fmaf(Dd, uv, cv * hv) * gz[k];
    }
    if (valid && active) {
      auto store = [&](const Grid& g, const float (&v)[CH]) {
        if (!g.defined()) return;
        const Plane<T> r = row_plane<T, kDir>(g, b, d);
        store_chunk<T, kVec>(r.base, r.sj, j0, n, v);
      };
      store(ga.du, vdu);
      store(ga.ddelta, vdd);
      store(ga.dz, vdz);
    }
    if (warp_sum_bc) {
      // Lanes of one segment (same chunk) differ in the channel bits of the lane index (bits 3-4):
      // two rounds leave lane (cw, s) the channel sums of values 2*cw, 2*cw + 1 (dB below CH,
      // else dC).
      static_assert(SEG == 8 && CH == 4, "the rounds below take the channel bits of 4 channels x 8 lanes");
      reduce_scatter_round<4, 16>(bc, lane);
      reduce_scatter_round<2, 8>(bc, lane);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int idx = 2 * cw + i, k = idx & (CH - 1);
        float* dst = idx < CH ? dBrow : dCrow;
        if (dst && k < n) atomicAdd(dst + (j0 + k) * (idx < CH ? dBsj : dCsj), bc[i]);
      }
    } else if (valid) {
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        if (k >= n) continue;
        if (dBrow) {
          float* dst = dBrow + (j0 + k) * dBsj;
          if (kDet) *dst = bc[k]; else atomicAdd(dst, bc[k]);
        }
        if (dCrow) {
          float* dst = dCrow + (j0 + k) * dCsj;
          if (kDet) *dst = bc[CH + k]; else atomicAdd(dst, bc[CH + k]);
        }
      }
    }
  };
  int64_t sc = nsc - 1;
  if (W % kScan2dRowChunk != 0) super_chunk(std::false_type{}, sc--);
  for (; sc >= 0; --sc) super_chunk(std::true_type{}, sc);
  // The channel's sums over its SEG lanes, in a fixed order.
#pragma unroll
  for (int off = 1; off < SEG; off <<= 1) {
    dA_acc += __shfl_xor_sync(kFull, dA_acc, off, SEG);
    dD_acc += __shfl_xor_sync(kFull, dD_acc, off, SEG);
    dbias_acc += __shfl_xor_sync(kFull, dbias_acc, off, SEG);
  }
  if (valid && s == 0) {
    if (ga.dA_part) static_cast<float*>(ga.dA_part)[b * p.dim + d] = dA_acc;
    if (ga.dD_part) static_cast<float*>(ga.dD_part)[b * p.dim + d] = dD_acc;
    if (ga.ddelta_bias_part) static_cast<float*>(ga.ddelta_bias_part)[b * p.dim + d] = dbias_acc;
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

// States per warp: as many as keep enough warps in flight (a warp then shares its dt, u loads and
// its per-cell sums over more states).
int states_per_warp(int64_t items, int64_t N, bool team = false) {
  if (team && N <= 3) return 1;  // at least two warps: the team kernel's staging is split over them
  if (team && N <= 7) return 2;
  if (N == 1) return 1;
  if (N == 2) return 2;
  const int64_t n = std::min<int64_t>(N, 32);
  const int64_t want = 132 * 32;  // warps: about half the resident slots of a 132-SM GPU
  if (items * ceil_div(n, 4) >= want) return 4;
  if (items * ceil_div(n, 2) >= want) return 2;
  return 1;
}

// Splits the states into passes of at most NS * kMaxWarps<NS>, balanced (so that with N >= 2*NS every
// pass has at least two warps), and sets the team shape of each.
template <int NS, typename F>
void for_each_pass(int64_t N, Plan L, F&& launch) {
  const int64_t max_pass = static_cast<int64_t>(NS) * kMaxWarps<NS>;
  const int64_t passes = ceil_div(N, max_pass), per_pass = ceil_div(N, passes);
  for (int64_t n0 = 0; n0 < N; n0 += per_pass) {
    L.n_begin = n0;
    L.n_end = std::min(N, n0 + per_pass);
    L.first = n0 == 0;
    L.last = L.n_end == N;
    L.nw = static_cast<int>(ceil_div(L.n_end - n0, NS));
    launch(L);
  }
}

template <typename T, int CPL, int NS>
void forward_ns(const Scan2dProblem& p, const Scan2dForwardOutputs& o, const Plan& L0, cudaStream_t stream) {
  for_each_pass<NS>(p.dstate, L0, [&](const Plan& L) {
    constexpr int R = kRows<CPL, NS>;
    const size_t smem = (3 * 4 + 2 * static_cast<size_t>(L.nw)) * R * 32 * CPL * sizeof(float);
    auto kernel = scan2d_fwd_kernel<T, CPL, NS>;
    SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const unsigned blocks = static_cast<unsigned>(p.dim * L.nb);
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
      dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
      kernel<<<grid, L.nw * 32, smem, stream>>>(p, o, L, b0);
      SSM2D_CUDA_CHECK_LAUNCH("scan2d_fwd_kernel");
    }
  });
}

// Whether a row operand of the 1D kernels can be read and written as one vector per lane's chunk
// (kRowChunk elements: 16 bytes of float32, 8 of 16-bit types): column stride +1 or -1, and every
// (batch, channel) row aligned where a chunk's vector starts (for stride -1, one element past the
// row's last address). Absent operands fit.
bool row_grid_fits(const Scan2dProblem& p, const Grid& g, int64_t channels) {
  const int64_t es = p.dtype == DType::kFloat32 ? 4 : 2, vb = kRowChunk * es;
  if (!g.defined()) return true;
  if (g.sj != 1 && g.sj != -1) return false;
  const auto addr = reinterpret_cast<uintptr_t>(g.data) + (g.sj < 0 ? es : 0);
  return addr % vb == 0 && (p.batch == 1 || (g.sb * es) % vb == 0) && (channels == 1 || (g.sc * es) % vb == 0);
}
// The kDir of the 1D row kernels' instance for a call: the column stride (+1 or -1) that every
// defined row operand and the per-channel grids `cells` (outputs; dout) share, each fitting a vector
// chunk; else 0 (element by element). SS2D's routes read every operand of a route in one frame, so
// mixed directions are a caller's own strides.
int row_vector_dir(const Scan2dProblem& p, std::initializer_list<const Grid*> cells) {
  int64_t sj = 0;
  auto agrees = [&](const Grid& g, int64_t channels) {
    if (!g.defined()) return true;
    if (!row_grid_fits(p, g, channels) || (sj != 0 && g.sj != sj)) return false;
    sj = g.sj;
    return true;
  };
  bool ok = agrees(p.delta, p.dim) && agrees(p.u, p.dim) && agrees(p.z, p.dim) && agrees(p.B, p.groups) &&
            agrees(p.C, p.groups);
  for (const Grid* g : cells) ok = ok && agrees(*g, p.dim);
  return ok ? static_cast<int>(sj) : 0;
}

template <typename T, int CPL>
void forward_solo(const Scan2dProblem& p, const Scan2dForwardOutputs& o, const Plan& L, cudaStream_t stream) {
  if (p.height == 1) {
    auto kernel = scan2d_fwd_row_kernel<T, CPL, 0>;
    if constexpr (CPL == kRowChunk) {
      const int dir = row_vector_dir(p, {&o.out});
      if (dir != 0) kernel = dir > 0 ? scan2d_fwd_row_kernel<T, CPL, 1> : scan2d_fwd_row_kernel<T, CPL, -1>;
    }
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
      dim3 grid(static_cast<unsigned>(ceil_div(p.dim, 4)), static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
      kernel<<<grid, 128, 0, stream>>>(p, o, L, b0);
      SSM2D_CUDA_CHECK_LAUNCH("scan2d_fwd_row_kernel");
    }
    return;
  }
  const unsigned blocks = static_cast<unsigned>(ceil_div(p.dim * L.nb, 4));
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
    dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
    scan2d_fwd_solo_kernel<T, CPL><<<grid, 128, 0, stream>>>(p, o, L, b0);
    SSM2D_CUDA_CHECK_LAUNCH("scan2d_fwd_solo_kernel");
  }
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
  // Band summaries (before the passes, which read them); a 1-row grid with N == 1 needs none.
  if (L.nb > 1 && !(p.dstate == 1 && p.height == 1)) launch_summaries<T, CPL>(p, L, stream);
  if (p.dstate == 1) return forward_solo<T, CPL>(p, o, L, stream);
  switch (states_per_warp(p.batch * p.dim * L.nb, p.dstate, true)) {
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
    constexpr int RNS = 4;  // the pre-pass recomputes dy per state group: few, large groups
    const int64_t warps = channels * (L0.nb - 1) * ceil_div(p.dstate, RNS);
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
      dim3 grid(static_cast<unsigned>(ceil_div(warps, 4)), static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
      scan2d_rev_summary_kernel<T, CPL, RNS><<<grid, 128, 0, stream>>>(p, a, L0, b0);
      SSM2D_CUDA_CHECK_LAUNCH("scan2d_rev_summary_kernel");
    }
  }
  for_each_pass<NS>(p.dstate, L0, [&](const Plan& L) {
    const size_t slots = static_cast<size_t>(L.nw) * NS;
    const size_t smem =
        ((kSegment + 1) * slots + 2 * 4 + 2 * 3 * static_cast<size_t>(L.nw) + kSegment) * 32 * CPL * sizeof(float);
    auto kernel = scan2d_bwd_kernel<T, CPL, NS, Det>;
    SSM2D_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const unsigned blocks = static_cast<unsigned>(channels * L.nb);
    for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
      dim3 grid(blocks, static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
      kernel<<<grid, L.nw * 32, smem, stream>>>(p, a, L, b0);
      SSM2D_CUDA_CHECK_LAUNCH("scan2d_bwd_kernel");
    }
  });
  const int64_t threads = p.batch * channels * (p.dstate + 2);
  scan2d_bwd_reduce_kernel<<<static_cast<unsigned>(ceil_div(threads, 256)), 256, 0, stream>>>(p, a, L0);
  SSM2D_CUDA_CHECK_LAUNCH("scan2d_bwd_reduce_kernel");
}

template <typename T, bool Det>
void backward_row(const Scan2dProblem& p, const Scan2dBackwardArgs& a, const Plan& L, cudaStream_t stream) {
  const int64_t channels = L.d_end - L.d_begin;
  const int dir = row_vector_dir(p, {&a.dout, &a.du, &a.ddelta, &a.dz});
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridY) {
    dim3 grid(static_cast<unsigned>(ceil_div(channels, kRowBwdWarps * kRowChans)),
              static_cast<unsigned>(std::min(kMaxGridY, p.batch - b0)));
    auto kernel = dir > 0   ? scan2d_bwd_row_kernel<T, Det, 1>
                  : dir < 0 ? scan2d_bwd_row_kernel<T, Det, -1>
                            : scan2d_bwd_row_kernel<T, Det, 0>;
    kernel<<<grid, kRowBwdWarps * 32, 0, stream>>>(p, a, L, b0);
    SSM2D_CUDA_CHECK_LAUNCH("scan2d_bwd_row_kernel");
  }
}

template <typename T, int CPL, bool Det>
void backward_cpl(const Scan2dProblem& p, const Scan2dBackwardArgs& a, cudaStream_t stream) {
  Plan L = band_plan(p, CPL, a.workspace, true);
  L.d_begin = a.d_begin;
  L.d_end = a.d_end;
  if (p.dstate == 1 && p.height == 1) return backward_row<T, Det>(p, a, L, stream);
  if (L.nb > 1) launch_summaries<T, CPL>(p, L, stream);
  const int64_t items = p.batch * (a.d_end - a.d_begin) * L.nb;
  switch (states_per_warp(items, p.dstate)) {
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

}  // namespace

void scan2d_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o) {
  if (scan2d_tiled(p.dstate)) {
    if (!scan2d_lanes_fit(p)) return scan2d_tiled_forward(p, o);
    check_cuda_dtypes(p, "scan2d_forward");
    return scan2d_lanes_forward(p, o);
  }
  check_cuda_dtypes(p, "scan2d_forward");
  if (scan2d_chan_fit(p)) return scan2d_chan_forward(p, o);
  if (scan2d_forward_workspace_floats(p.batch, p.dim, p.dstate, p.height, p.width) > 0 && !o.workspace)
    throw ArgumentError("scan2d_forward: workspace is required on CUDA (scan2d_forward_workspace_floats)");
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  with_dtype(p.dtype, [&](auto tag) { forward_t<decltype(tag)>(p, o, stream); });
}

void scan2d_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& a_in) {
  if (scan2d_tiled(p.dstate)) {
    if (!scan2d_lanes_fit(p)) return scan2d_tiled_backward(p, a_in);
    check_cuda_dtypes(p, "scan2d_backward");
    Scan2dBackwardArgs a = a_in;
    if (a.d_end < 0) a.d_end = p.dim;
    return scan2d_lanes_backward(p, a);
  }
  check_cuda_dtypes(p, "scan2d_backward");
  Scan2dBackwardArgs a = a_in;
  if (a.d_end < 0) a.d_end = p.dim;
  if (scan2d_chan_fit(p)) return scan2d_chan_backward(p, a);
  if (!a.workspace || (!a.carries && scan2d_carry_floats(p.batch, p.dim, p.dstate, p.height, p.width) > 0))
    throw ArgumentError("scan2d_backward: carries and workspace are required on CUDA");
  DeviceGuard guard(p.device.index);
  auto stream = reinterpret_cast<cudaStream_t>(p.stream);
  const bool det = a.deterministic;
  with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    det ? backward_t<T, true>(p, a, stream) : backward_t<T, false>(p, a, stream);
  });
}

}  // namespace ssm2d::cuda
