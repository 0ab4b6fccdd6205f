// The scan2d forward with a half-warp per (batch, channel) and a lane per state (scan2d_lanes.cu),
// and its backward, which scan2d.cu runs for kScan2dTiledStates <= N <= kScan2dLanesMaxStates when the
// channels of a group come in multiples of 8 (or G == 1): scan2d_lanes_fit in ssm2d/scan2d.h.
#pragma once

#include "ssm2d/ops.h"

namespace ssm2d::cuda {
bool scan2d_lanes_fit(const Scan2dProblem& p);
// Needs o.workspace (scan2d_forward_workspace_floats) when the grid is wider than 16 columns.
void scan2d_lanes_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o);
// Needs the lanes forward's carries and scan2d_backward_workspace_floats of workspace; a.d_end set.
void scan2d_lanes_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& a);
}  // namespace ssm2d::cuda
