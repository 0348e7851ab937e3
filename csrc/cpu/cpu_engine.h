// The CPU engine's entry points. Each ISA translation unit defines them in its own namespace;
// engine_cpu.cpp picks one at run time.
#pragma once
#include <stdint.h>

#include <memory>

#include "../engine.h"

namespace te {

// What a CPU plan keeps between the phases of a step: the normals of the noise letters that the
// read-only phases drew, so that the later phases of the step (the writing one above all) read
// them back instead of drawing them again (adl: two normals per element and step instead of
// three). On the CPU a normal costs more than the 8 bytes of traffic of storing and reading it;
// the CUDA engine keeps recomputing. Allocated on the plan's second step (a plan used once, as
// thermo_step's, never allocates), then reused; `filled` names the step whose normals it holds.
struct CpuStore {
  std::unique_ptr<float[]> z;  // slot s of call element e (tensors in order) at z[s * n + e]
  int64_t capacity = 0;        // floats allocated
  int64_t steps = 0;           // writing phases run with this store
  bool filled = false;         // the slots hold the normals of (seed, step, prog) below
  uint64_t seed = 0, step = 0;
  const Program* prog = nullptr;
};

struct CpuKernels {
  const char* isa;
  // Runs phase `phase` of a.prog (see engine.h); returns -1 or a BadKind code. `check`: the
  // non-finite checks (inputs in phase 0 when it sums; the C factors of the phase).
  int (*run_phase)(const StepArgs& a, int phase, int check);
  // The read-only check of parameters and gradients; -1 or tensor * 4 + kind.
  int (*check_inputs)(const StepArgs& a);
  void (*fill_normal)(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,
                      uint32_t draw, int64_t offset);
};

#define TE_DECLARE_ISA(ns)                                                                     \
  namespace ns {                                                                               \
  int run_phase(const StepArgs& a, int phase, int check);                                      \
  int check_inputs(const StepArgs& a);                                                         \
  void fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,          \
                   uint32_t draw, int64_t offset);                                             \
  }
TE_DECLARE_ISA(isa_baseline)
TE_DECLARE_ISA(isa_avx2)
TE_DECLARE_ISA(isa_avx512)
#undef TE_DECLARE_ISA

// The kernels for the best ISA this CPU supports, or the one named by THERMO_EXT_ISA
// (baseline, avx2, avx512) when it is set and supported.
const CpuKernels& cpu_kernels();
// Every ISA compiled in and supported by this CPU, best last.
int cpu_isas(const CpuKernels** out, int max);

// exp(-xi delta) of every C letter among ops [0, n_ops) for every tensor's segment, into
// out[t * n_ops + o] (1 for the other letters). With `check`, returns segment * 4 +
// kBadThermostat for the first factor (letter by letter, then tensor by tensor, as the
// reference) that the compute type cannot hold, else -1. out may be null (check only).
int cpu_c_factors(const StepArgs& a, int n_ops, int check, double* out);

// Everything of a step that can fail, without touching theta, p or xi: the input check (fused
// into phase 0 when it sums), every sum phase and xi update (with a.sum_hook between them), and
// the C factors of the writing phase. Returns -1 or a BadKind code.
int cpu_pre(const StepArgs& a, int check);
// The writing phase (after cpu_pre).
int cpu_finish(const StepArgs& a);
// cpu_pre then cpu_finish.
int cpu_step(const StepArgs& a, int check);

}  // namespace te
