// The tiled scan2d kernels (scan2d_tiled.cu), which scan2d.cu runs for N >= kScan2dTiledStates.
#pragma once

#include "ssm2d/ops.h"

namespace ssm2d::cuda {
// Forward: saves per-tile carries in o.carries (or, with no backward to follow, in o.workspace).
void scan2d_tiled_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o);
// Backward: needs the carries, y (the pre-gate output) when z is given, and the workspace.
void scan2d_tiled_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& a);
}  // namespace ssm2d::cuda
