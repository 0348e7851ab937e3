// The engine's calling convention, shared by the CPU engine, the CUDA engine and the bindings.
// Everything is raw pointers and counts: the module never links libtorch.
#pragma once
#include <stdint.h>

#include "substeps.h"

namespace te {

enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// One (parameter, momentum, gradient) triple. theta and grad have the call's dtype; mom has the
// compute dtype (float32 for float32/bf16/fp16 parameters, float64 for float64) and may be null
// for the overdamped scheme. offset is the global index of element 0 in the whole tensor.
struct TensorDesc {
  void* theta;
  void* mom;
  const void* grad;
  int64_t numel;
  int64_t offset;
  uint32_t uid;
  int32_t seg;
};

// xi:     n_seg doubles, the live thermostat variables (version 0 during a step).
// ws:     2 * n_e * n_seg doubles of workspace: versions 1..n_e, then the n_e segment sums.
// seg_n:  n_seg doubles, the number of elements of each segment (whole tensors, all shards).
// (The CUDA engine never zeroes the flag: the caller zeroes it once per optimizer step.)
// step_ptr, when not null, is a device int64 that replaces `step` (capturable CUDA steps).
struct StepArgs {
  int32_t dtype;
  const TensorDesc* tensors;
  int32_t n_tensors;
  const Program* prog;
  uint64_t seed;
  uint64_t step;
  const int64_t* step_ptr;
  double* xi;
  int32_t n_seg;
  const double* seg_n;
  double* ws;
  int32_t stochastic_rounding;  // bf16 parameters: round theta stochastically
  double* scratch;              // CUDA: cuda_scratch_doubles(...) doubles of device scratch
  int64_t scratch_len;
};

// Result of a phase: -1 when every checked value was finite, otherwise
// tensor * 4 + kind (0 gradient, 1 parameter, 2 momentum) or, for kind 3, segment * 4 + 3
// (the thermostat overflowed: exp(-xi delta) or xi itself is not finite).
enum BadKind : int32_t { kBadGrad = 0, kBadParam = 1, kBadMom = 2, kBadThermostat = 3 };

// The draw index used for stochastic rounding of low-precision parameters.
constexpr uint32_t kRoundingDraw = 0xFFFFu;

}  // namespace te
