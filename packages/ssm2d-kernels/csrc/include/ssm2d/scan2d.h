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
// Whether the CUDA forward can run without a carries buffer (inference: no backward follows), on
// the scanned (height, width): N <= 16 and (H == 1 or W <= 64).
inline bool scan2d_inference_fits(int64_t dstate, int64_t height, int64_t width) {
  return dstate <= 16 && (height == 1 || width <= 64);
}
// Floats of per-tile carries the CUDA forward saves for the backward (N/16 of u's elements).
int64_t scan2d_carry_floats(const Scan2dProblem& p);
// Floats of scratch the CUDA backward needs: batch * dim * N * (H + W).
int64_t scan2d_backward_workspace_floats(const Scan2dProblem& p);
void scan2d_forward(const Scan2dProblem& p, const Scan2dForwardOutputs& o);
void scan2d_backward(const Scan2dProblem& p, const Scan2dBackwardArgs& g);
}  // namespace cuda

}  // namespace ssm2d
