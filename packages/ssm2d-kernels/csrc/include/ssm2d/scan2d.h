// scan2d entry points of the CPU and CUDA implementations (same descriptors, see ops.h).
#pragma once

#include <cstdint>

#include "ssm2d/ops.h"

namespace ssm2d {

namespace cpu {
// Forward: writes out (and y when requested). Memory beyond the outputs: per worker thread, one
// float grid of the accumulation type per state (the G row and h column carries are O(W)).
void scan2d_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o);
// Backward: recomputes the forward per (batch, channel); per worker thread it holds G and h of
// every state of one channel (2 * N * H * W values) plus private dB/dC accumulators that are
// summed in thread order at the end (deterministic for a given thread count).
void scan2d_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& g);
}  // namespace cpu

namespace cuda {
// Sizes below are of the SCANNED grid (height, width after the order's transpose).
//
// Columns per lane of the CUDA forward (a warp scans a band of 32 * this many columns): narrow
// grids use fewer so that lanes are not left idle.
inline int scan2d_cols_per_lane(int64_t width) { return width <= 32 ? 1 : width <= 64 ? 2 : 4; }
// The backward keeps kScan2dSegment + 1 rows of h of every state of a band in shared memory: with
// many states its bands are narrower.
inline int scan2d_bwd_cols_per_lane(int64_t width, int64_t dstate) {
  const int cpl = scan2d_cols_per_lane(width);
  return dstate >= 8 && cpl > 2 ? 2 : cpl;
}
// States one pass runs at least (16 warps of one state or 8 of two; 8 of four run 32); more take
// several passes, which add per-cell partial sums through the workspace.
constexpr int64_t kScan2dStatesPerPass = 16;
// Rows between the h rows the forward saves for the backward.
constexpr int64_t kScan2dSegment = 16;

inline int64_t scan2d_bands(int64_t width, int cols_per_lane) {
  return (width + 32 * cols_per_lane - 1) / (32 * cols_per_lane);
}
// With this many states or more the tiled kernels run (one block per (batch, channel) walking 32x32
// tiles: at MIL shapes, N = 16, still faster than the band kernels); with fewer, the band kernels.
constexpr int64_t kScan2dTiledStates = 8;
constexpr int64_t kScan2dTile = 32;
inline bool scan2d_tiled(int64_t dstate) { return dstate >= kScan2dTiledStates; }
// Whether the backward needs the pre-gate output y saved by the forward (when z is given): the tiled
// kernels do; the band kernels rebuild it.
inline bool scan2d_backward_needs_y(int64_t dstate) { return scan2d_tiled(dstate); }

// Floats the CUDA forward saves for the backward. Band kernels: h every kScan2dSegment rows,
// batch*dim*N*(ceil(H/kScan2dSegment) - 1)*W (N/16 of u's element count; none when H <= 16); a
// 1-row grid with N == 1 instead keeps the G entering each band, batch*dim*bands.
// Tiled kernels: the G and h carries of every 32x32 tile, batch*dim*N*tiles*64.
inline int64_t scan2d_carry_floats(int64_t batch, int64_t dim, int64_t dstate, int64_t height, int64_t width) {
  if (scan2d_tiled(dstate)) {
    const int64_t tiles = ((height + kScan2dTile - 1) / kScan2dTile) * ((width + kScan2dTile - 1) / kScan2dTile);
    return batch * dim * dstate * tiles * 2 * kScan2dTile;
  }
  if (height == 1 && dstate == 1) return batch * dim * scan2d_bands(width, scan2d_cols_per_lane(width));
  return batch * dim * dstate * ((height + kScan2dSegment - 1) / kScan2dSegment - 1) * width;
}
// States the lanes forward (a lane per state) runs at most; from kScan2dTiledStates up.
constexpr int64_t kScan2dLanesMaxStates = 16;
// Scratch of the lanes forward: per (batch, 8 or 16 channels, 16-column strip) a flag, and the G
// each strip but the last hands to the next per row and lane: at most
// 1 + batch*ceil(dim/8)*strips + batch*(dim+15)*16*(strips-1)*H floats (about u's element count).
inline int64_t scan2d_lanes_workspace_floats(int64_t batch, int64_t dim, int64_t height, int64_t width) {
  const int64_t strips = (width + 15) / 16;
  if (strips <= 1) return 0;
  return 1 + batch * ((dim + 7) / 8) * strips + batch * (dim + 15) * 16 * (strips - 1) * height;
}
// Floats of scratch the CUDA forward needs. Band kernels: for grids wider than one band (but 1-row
// grids with N == 1), per (row, band) summaries batch*dim*H*(bands + N*(bands-1)).
// N >= 8: the lanes forward's scratch for N <= kScan2dLanesMaxStates; and, when no carries are
// saved (`saving` false: inference), room for the tile carries, which the tiled forward (N > 16, or
// groups the lanes forward does not take) then writes there.
inline int64_t scan2d_forward_workspace_floats(int64_t batch, int64_t dim, int64_t dstate, int64_t height,
                                               int64_t width, bool saving = false) {
  if (scan2d_tiled(dstate)) {
    const int64_t carries = saving ? 0 : scan2d_carry_floats(batch, dim, dstate, height, width);
    if (dstate > kScan2dLanesMaxStates) return carries;
    const int64_t lanes = scan2d_lanes_workspace_floats(batch, dim, height, width);
    return carries > lanes ? carries : lanes;
  }
  const int64_t nb = scan2d_bands(width, scan2d_cols_per_lane(width));
  // A 1-row grid with N == 1 is walked band after band by one warp: no summaries.
  const bool summarised = nb > 1 && !(dstate == 1 && height == 1);
  const int64_t summaries = summarised ? batch * dim * height * (nb + dstate * (nb - 1)) : 0;
  const int64_t partial = dstate > kScan2dStatesPerPass ? batch * dim * height * width : 0;
  return summaries + partial;
}
// Floats of scratch the CUDA backward needs. Band kernels: the forward's summaries and the reverse
// ones batch*dim*H*(bands + 2N*(bands-1)) for grids wider than one band, per-band sums
// batch*dim*bands*(N+2), and for N > 16 per-cell partial sums 3*batch*dim*H*W. Tiled kernels: the
// reverse carries, batch*dim*N*(H + W).
inline int64_t scan2d_backward_workspace_floats(int64_t batch, int64_t dim, int64_t dstate, int64_t height,
                                                int64_t width) {
  if (scan2d_tiled(dstate)) return batch * dim * dstate * (height + width);
  const int64_t nb = scan2d_bands(width, scan2d_bwd_cols_per_lane(width, dstate));
  // A 1-row grid with N == 1 is walked band after band by one warp: no summaries.
  const bool summarised = nb > 1 && !(dstate == 1 && height == 1);
  const int64_t summaries = summarised ? batch * dim * height * (nb + 2 * dstate * (nb - 1)) : 0;
  const int64_t partial = dstate > kScan2dStatesPerPass ? 3 * batch * dim * height * width : 0;
  return summaries + batch * dim * nb * (dstate + 2) + partial;
}
void scan2d_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o);
void scan2d_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& g);
}  // namespace cuda

}  // namespace ssm2d
