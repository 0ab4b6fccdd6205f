// The scan2d forward and backward with a lane per (batch, channel) for N == 1 on narrow grids
// (scan2d_chan.cu), which scan2d.cu runs when scan2d_chan_fit (ssm2d/scan2d.h) says so.
#pragma once

#include "ssm2d/ops.h"

namespace ssm2d::cuda {
bool scan2d_chan_fit(const Scan2dProblem& p);
void scan2d_chan_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o);
// Needs the chan forward's carries (scan2d_chan_carry_floats: none when both sides are at most 16
// cells, scan2d_chan_tile); a.d_end set. No workspace.
void scan2d_chan_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& a);
}  // namespace ssm2d::cuda
