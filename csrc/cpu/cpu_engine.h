// The CPU engine's entry points. Each ISA translation unit defines them in its own namespace;
// engine_cpu.cpp picks one at run time.
#pragma once
#include <stdint.h>

#include "../engine.h"

namespace te {

struct CpuKernels {
  const char* isa;
  // Runs phase `phase` of a.prog (see engine.h); returns -1 or a BadKind code.
  int (*run_phase)(const StepArgs& a, int phase, int check);
  void (*fill_normal)(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,
                      uint32_t draw, int64_t offset);
};

#define TE_DECLARE_ISA(ns)                                                                     \
  namespace ns {                                                                               \
  int run_phase(const StepArgs& a, int phase, int check);                                      \
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

// Applies one E between phases: version k+1 = version k + eps delta (sum_k - N tau), per segment.
// Returns -1, or segment * 4 + kBadThermostat when a sum or the new xi is not finite.
int cpu_update_xi(const StepArgs& a, int k);

// All phases of a step, with the xi updates between them.
int cpu_step(const StepArgs& a, int check);

}  // namespace te
