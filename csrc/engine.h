// The engine's calling convention, shared by the CPU engine, the CUDA engine and the bindings,
// and the constants Python reads from thermo_ext._C instead of retyping them (bindings.cpp).
// Everything is raw pointers and counts: the module never links libtorch.
#pragma once
#include <stdint.h>

#include "substeps.h"

namespace te {

enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };
constexpr int kNumDTypes = 4;
// torch's names of the dtypes, indexed by DType.
constexpr const char* kDTypeNames[kNumDTypes] = {"float32", "float64", "bfloat16", "float16"};

// One (parameter, momentum, gradient) triple. theta and grad have the call's dtype; mom has the
// compute dtype (float32 for float32/bf16/fp16 parameters, float64 for float64) and may be null
// for the overdamped scheme. offset is the global index of element 0 in the whole tensor. With
// an adaptive mass (Program::mass), mass is the tensor's second-moment buffer v (the compute
// dtype) and mass_start the step whose gradient was v's first (substeps.h, mass_step).
struct TensorDesc {
  void* theta;
  void* mom;
  const void* grad;
  int64_t numel;
  int64_t offset;
  uint32_t uid;
  int32_t seg;
  void* mass;
  int64_t mass_start;
};

// Reduces the segment sums of E number k in place (ws row n_e + k) before that E moves xi: the
// all-reduce of a distributed step. Called from the host between the phases, on every rank the
// same number of times (also after a local failure), so that the collectives inside stay matched.
struct SumHook {
  void (*fn)(void* ctx, int k);
  void* ctx;
};

// What a CPU plan keeps for the engine between the phases of a step (cpu/cpu_engine.h).
struct CpuStore;

// xi:     n_seg doubles, the live thermostat variables (version 0 during a step).
// ws:     2 * n_e * n_seg doubles of workspace: versions 1..n_e, then the n_e segment sums.
// seg_n:  n_seg doubles, the number of elements of each segment (whole tensors, all shards).
// (The CUDA engine never zeroes the flag: the caller zeroes it once per optimizer step.)
// step_ptr, when not null, is a device int64 that replaces `step` (capturable CUDA steps).
// hyper, when not null, is a device Hyper (kNumHyper doubles) from which the CUDA engine
// recomputes the program's coefficients and mass settings at the start of each call (graphs then
// follow schedulers); the program's own are ignored.
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
  const double* hyper;
  const SumHook* sum_hook;      // null: the sums stay local
  CpuStore* cpu_store;          // CPU: the plan's store; null: later phases redraw the normals
};

// What a call runs: the whole step; everything of it that can fail, writing only the workspace
// ("pre"); or the writes after a "pre" ("finish"). An optimizer step over several calls runs
// every "pre" before any "finish", so a refused step changes nothing anywhere.
enum RunMode : int32_t { kRunAll = -1, kRunPre = -2, kRunFinish = -3 };
constexpr const char* kRunModeNames[3] = {"all", "pre", "finish"};  // -1, -2, -3

// Result of a phase: -1 when every checked value was finite, otherwise
// tensor * 4 + kind (0 gradient, 1 parameter, 2 momentum) or, for kind 3, segment * 4 + 3
// (the thermostat overflowed: exp(-xi delta) or xi itself is not finite).
enum BadKind : int32_t { kBadGrad = 0, kBadParam = 1, kBadMom = 2, kBadThermostat = 3 };
constexpr int kNumBadKinds = 4;
constexpr const char* kBadKindNames[kNumBadKinds] = {"gradient", "parameter", "momentum",
                                                     "thermostat"};

// The draw index used for stochastic rounding of low-precision parameters: above every noise
// letter's draw (a program has at most kMaxOps letters).
constexpr uint32_t kRoundingDraw = 0xFFFFu;
static_assert(kMaxOps < (int)kRoundingDraw, "noise draws must stay below the rounding draw");

// A tensor's uid in the noise counter (docs/DESIGN.md, Noise): its group in the high bits, its
// position in the group in the low ones; both below 2^16.
constexpr int kUidGroupShift = 16;
constexpr uint32_t kUidLimit = 1u << kUidGroupShift;  // groups and positions per group
inline uint32_t make_uid(uint32_t group, uint32_t position) {
  return (group << kUidGroupShift) | position;
}

// Thermostat variable version v of segment s: 0 is xi itself, v > 0 lives in the workspace.
TE_HD double xi_version(const double* xi, const double* ws, int n_seg, int v, int s) {
  return v == 0 ? xi[s] : ws[(int64_t)(v - 1) * n_seg + s];
}

// The factor exp(-xi delta) of a C letter that reads xi version `version` on segment s. Sets
// *overflow when the compute type cannot hold it (factor_overflows: the runaway-thermostat check
// of docs/DESIGN.md, Failure model); the CPU and CUDA engines check every factor through here.
TE_HD double c_factor(const double* xi, const double* ws, int n_seg, int version, double delta,
                      int s, bool compute_double, bool* overflow) {
  const double f = exp(-xi_version(xi, ws, n_seg, version, s) * delta);
  *overflow = factor_overflows(f, compute_double);
  return f;
}

}  // namespace te
