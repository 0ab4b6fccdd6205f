// wavefront2d entry points of the CPU and CUDA implementations (descriptors in ops.h).
#pragma once

#include "ssm2d/ops.h"

namespace ssm2d {

namespace cpu {
// Forward: one (batch, channel) per task; per state two rows of h (O(W)) per worker thread.
void wavefront2d_forward(const Wave2dProblem& p, const Grid& out);
// Backward: recomputes h of one state at a time (H * W values per worker thread); private
// dBT/dBL/dC accumulators per thread summed in task order (deterministic for a thread count).
void wavefront2d_backward(const Wave2dProblem& p, const Wave2dBackwardArgs& g);
}  // namespace cpu

namespace cuda {
// Longest logical row the general CUDA kernel (N > 16, or a block's 16 channels in two groups) holds
// in registers (32 lanes x 64 columns); the lane-per-state kernels (N <= 16) take any row length.
constexpr int64_t kWave2dMaxWidth = 2048;
// float32 scratch of a CUDA call. N <= 16 (16 channels of one group per block): the forward's
// strip flags and carries, batch*ceil(E/16)*((strips - 1)*H*256 + strips) + 1 floats (none when
// whole rows run); with rows of at most 64 cells and enough blocks the backward's row checkpoints
// every 8 rows and one 8-row segment per (batch, 16 channels, 16 states); in column strips the
// backward's: the forward's carries, as many carries of the adjoint (strips - 1) * H * 256 per
// (batch, 16 channels), and row checkpoints and a segment per (batch, 16 channels, strip) of the
// strip's width. Otherwise (N > 16, or a block's channels in two groups): the forward's
// per-cell partials of state chunks after the first; the backward's three such partials plus row
// checkpoints and one 32-row segment per state.
int64_t wavefront2d_forward_workspace_floats(const Wave2dProblem& p);
int64_t wavefront2d_backward_workspace_floats(const Wave2dProblem& p);
// The same from the sizes of the grid as scanned (after any transpose).
int64_t wavefront2d_workspace_floats(int64_t batch, int64_t dim, int64_t dstate, int64_t groups, int64_t height,
                                     int64_t width, int64_t states_per_block, bool backward);
// States one CUDA call takes (one warp each): at most 16, fewer for long rows (shared memory).
int wavefront2d_max_states(int64_t width);
// `out` is a float32 accumulator the forward adds into (zero it first).
void wavefront2d_forward(const Wave2dProblem& p, const Grid& out);
// The forward with `out` in p.dtype, written (not added to): no float32 accumulator to zero, read or
// cast. Only where the lane kernels run (N <= 16, each 16-channel block in one group: one thread
// writes each output cell; ssm2d_kernels.wavefront2d.lanes_fit says so); ArgumentError otherwise.
void wavefront2d_forward_dtype(const Wave2dProblem& p, const Grid& out);
void wavefront2d_backward(const Wave2dProblem& p, const Wave2dBackwardArgs& g);
}  // namespace cuda

}  // namespace ssm2d
