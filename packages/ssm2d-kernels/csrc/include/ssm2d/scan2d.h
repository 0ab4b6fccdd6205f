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
// Columns between the h values the forward saves on a 1-row grid with N == 1 (the backward walks
// each row in super-chunks of this many columns, 8 lanes per channel).
constexpr int64_t kScan2dRowChunk = 32;

inline int64_t scan2d_bands(int64_t width, int cols_per_lane) {
  return (width + 32 * cols_per_lane - 1) / (32 * cols_per_lane);
}
// With this many states or more the tiled kernels run (one block per (batch, channel) walking 32x32
// tiles: at MIL shapes, N = 16, still faster than the band kernels); with fewer, the band kernels.
constexpr int64_t kScan2dTiledStates = 8;
constexpr int64_t kScan2dTile = 32;
inline bool scan2d_tiled(int64_t dstate) { return dstate >= kScan2dTiledStates; }
// States the lanes kernels (a lane per state) run at most; from kScan2dTiledStates up.
constexpr int64_t kScan2dLanesMaxStates = 16;
// Rows between the h rows the lanes forward saves for its backward.
constexpr int64_t kScan2dLanesSegment = 16;
// Whether the lanes kernels run this problem (forward and backward): 8 <= N <= 16 and the channels of
// a group a multiple of 8 (or one group), so that a block's 8 or 16 channels share B and C.
inline bool scan2d_lanes_fit(int64_t dim, int64_t groups, int64_t dstate) {
  return dstate >= kScan2dTiledStates && dstate <= kScan2dLanesMaxStates && groups > 0 &&
         (groups == 1 || (dim / groups) % 8 == 0);
}
// Whether the backward needs the pre-gate output y saved by the forward (when z is given): the tiled
// kernels do; the band and lanes kernels rebuild it.
inline bool scan2d_backward_needs_y(int64_t dim, int64_t groups, int64_t dstate) {
  return scan2d_tiled(dstate) && !scan2d_lanes_fit(dim, groups, dstate);
}
// The lanes kernels' carries, per batch item, 16-column strip k, row i, channel d, state n (n padded
// to 16): the G entering strip k >= 1 at row i, batch*(strips-1)*H*dim*16 floats (about u's element
// count), then h after every kScan2dLanesSegment-th row, batch*strips*(segments-1)*dim*256 (N/16 of u's).
inline int64_t scan2d_lanes_gin_floats(int64_t batch, int64_t dim, int64_t height, int64_t width) {
  return batch * ((width + 15) / 16 - 1) * height * dim * 16;
}
inline int64_t scan2d_lanes_carry_floats(int64_t batch, int64_t dim, int64_t height, int64_t width) {
  const int64_t segments = (height + kScan2dLanesSegment - 1) / kScan2dLanesSegment;
  return scan2d_lanes_gin_floats(batch, dim, height, width) + batch * ((width + 15) / 16) * (segments - 1) * dim * 256;
}

// N == 1 on a grid with both sides of at most 64 cells: lanes of a warp hold the scanned grid's
// short side in registers, 8 cells per lane (one lane per channel up to 8 cells, 2 up to 16, 4 up
// to 32, 8 up to 64) and walk the long one (scan2d_chan.cu). A warp's walk is serial, so long grids
// stay with the band kernels (their bands split the rows); and it needs the channels of a warp in one
// group (G == 1 or channels per group a multiple of 32) and enough warps to fill the GPU: at least
// kScan2dChanMinWarps, counted for the walk with the fewer lanes per channel.
constexpr int64_t kScan2dChanMaxInner = 64;
constexpr int64_t kScan2dChanMaxSteps = 64;
constexpr int64_t kScan2dChanSegment = 4;  // steps between the carries the chan forward saves
constexpr int64_t kScan2dChanMinWarps = 264;
inline bool scan2d_chan_shape(int64_t steps, int64_t inner) {
  return inner <= kScan2dChanMaxInner && steps <= kScan2dChanMaxSteps;
}
// Grids with both sides of at most 16 cells run whole-channel kernels instead (a block of 8 or 16
// channels in shared memory; the backward recomputes the forward and needs no carries).
constexpr int64_t kScan2dChanTileSide = 16;
inline bool scan2d_chan_tile(int64_t height, int64_t width) {
  return height <= kScan2dChanTileSide && width <= kScan2dChanTileSide;
}
// Lanes per channel for a short side of `inner` cells (the chan kernels' register widths).
inline int64_t scan2d_chan_lanes(int64_t inner) { return inner <= 8 ? 1 : inner <= 16 ? 2 : inner <= 32 ? 4 : 8; }
inline bool scan2d_chan_fit(int64_t batch, int64_t dim, int64_t groups, int64_t dstate, int64_t height,
                            int64_t width) {
  if (dstate != 1 || height < 2 || groups <= 0 || (groups != 1 && (dim / groups) % 32 != 0)) return false;
  const bool rows = scan2d_chan_shape(height, width), cols = scan2d_chan_shape(width, height);
  if (!rows && !cols) return false;
  int64_t lanes = 8;
  if (rows) lanes = scan2d_chan_lanes(width);
  if (cols && scan2d_chan_lanes(height) < lanes) lanes = scan2d_chan_lanes(height);
  const int64_t per_warp = 32 / lanes;  // channels per warp
  return batch * ((dim + per_warp - 1) / per_warp) >= kScan2dChanMinWarps;
}
// The chan kernels' carries: the carry entering every kScan2dChanSegment-th step of the walk along
// the long side, per (batch, segment >= 1, cell of the short side, channel): at most u's element
// count / kScan2dChanSegment. The larger of the two walks (which one runs depends on the strides).
// None for the whole-channel kernels (scan2d_chan_tile).
inline int64_t scan2d_chan_carry_floats(int64_t batch, int64_t dim, int64_t height, int64_t width) {
  if (scan2d_chan_tile(height, width)) return 0;
  auto walk = [&](int64_t steps, int64_t inner) {
    return scan2d_chan_shape(steps, inner) ? batch * dim * inner * ((steps + kScan2dChanSegment - 1) / kScan2dChanSegment - 1) : 0;
  };
  const int64_t r = walk(height, width), c = walk(width, height);
  return r > c ? r : c;
}

// Floats the CUDA forward saves for the backward. Band kernels: h every kScan2dSegment rows,
// batch*dim*N*(ceil(H/kScan2dSegment) - 1)*W (N/16 of u's element count; none when H <= 16); a
// 1-row grid with N == 1 instead keeps the G entering every kScan2dRowChunk-th column,
// batch*dim*ceil(W/kScan2dRowChunk); with N == 1 and
// both sides of at most 64 cells, the larger of that and the chan kernels' layout (scan2d_chan_carry_floats).
// Tiled kernels: the G and h carries of every 32x32 tile, batch*dim*N*tiles*64.
// Lanes kernels (8 <= N <= 16): the larger of their layout and the tiled one (which of the two runs
// depends on the groups).
inline int64_t scan2d_carry_floats(int64_t batch, int64_t dim, int64_t dstate, int64_t height, int64_t width) {
  if (scan2d_tiled(dstate)) {
    const int64_t tiles = ((height + kScan2dTile - 1) / kScan2dTile) * ((width + kScan2dTile - 1) / kScan2dTile);
    const int64_t tiled = batch * dim * dstate * tiles * 2 * kScan2dTile;
    if (dstate > kScan2dLanesMaxStates) return tiled;
    const int64_t lanes = scan2d_lanes_carry_floats(batch, dim, height, width);
    return tiled > lanes ? tiled : lanes;
  }
  if (height == 1 && dstate == 1) return batch * dim * ((width + kScan2dRowChunk - 1) / kScan2dRowChunk);
  const int64_t band = batch * dim * dstate * ((height + kScan2dSegment - 1) / kScan2dSegment - 1) * width;
  const int64_t chan = dstate == 1 ? scan2d_chan_carry_floats(batch, dim, height, width) : 0;
  return band > chan ? band : chan;
}
// Scratch of the lanes forward: per (batch, 8 or 16 channels, 16-column strip) a flag, and when no
// carries are saved the G each strip hands to the next (the carries' first part otherwise).
inline int64_t scan2d_lanes_workspace_floats(int64_t batch, int64_t dim, int64_t height, int64_t width,
                                             bool saving) {
  const int64_t strips = (width + 15) / 16;
  if (strips <= 1) return 0;
  return 1 + batch * ((dim + 7) / 8) * strips + (saving ? 0 : scan2d_lanes_gin_floats(batch, dim, height, width));
}
// Scratch of the lanes backward: flags; the a*lamH each strip hands to the one on its left
// (batch*(strips-1)*H*dim*16); h of half a 16-row segment per block (8 rows x 16 columns x 16
// states per channel: at most batch*(dim+31)*strips*2048 for blocks of 8 or 16 channels, a channel
// range of a deterministic chunk adding one block); per-strip sums of dA, dD, ddelta_bias
// (batch*strips*dim*18).
inline int64_t scan2d_lanes_backward_workspace_floats(int64_t batch, int64_t dim, int64_t height, int64_t width) {
  const int64_t strips = (width + 15) / 16;
  return 1 + batch * ((dim + 7) / 8 + 1) * strips + scan2d_lanes_gin_floats(batch, dim, height, width) +
         batch * (dim + 31) * strips * 8 * 256 + batch * strips * dim * 18;
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
    const int64_t lanes = scan2d_lanes_workspace_floats(batch, dim, height, width, saving);
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
  if (scan2d_tiled(dstate)) {
    const int64_t tiled = batch * dim * dstate * (height + width);
    if (dstate > kScan2dLanesMaxStates) return tiled;
    const int64_t lanes = scan2d_lanes_backward_workspace_floats(batch, dim, height, width);
    return tiled > lanes ? tiled : lanes;
  }
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
