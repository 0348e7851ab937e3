// Run-time choice of the CPU engine's instruction set, the per-segment thermostat update and
// the C factors, and the order of a step's phases.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "cpu_engine.h"

namespace te {

namespace {

bool supported(const char* isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (!strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return !strcmp(isa, "baseline");
}

const CpuKernels kAll[] = {
    {"baseline", isa_baseline::run_phase, isa_baseline::check_inputs, isa_baseline::fill_normal},
#if defined(TE_HAVE_X86_ISAS)
    {"avx2", isa_avx2::run_phase, isa_avx2::check_inputs, isa_avx2::fill_normal},
    {"avx512", isa_avx512::run_phase, isa_avx512::check_inputs, isa_avx512::fill_normal},
#endif
};
constexpr int kNumAll = sizeof(kAll) / sizeof(kAll[0]);

const CpuKernels& choose() {
  const char* want = getenv("THERMO_EXT_ISA");
  if (want && *want)
    for (const CpuKernels& k : kAll)
      if (!strcmp(k.isa, want) && supported(k.isa)) return k;
  for (int i = kNumAll - 1; i > 0; --i)
    if (supported(kAll[i].isa)) return kAll[i];
  return kAll[0];
}

}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels& k = choose();
  return k;
}

int cpu_isas(const CpuKernels** out, int max) {
  int n = 0;
  for (const CpuKernels& k : kAll)
    if (supported(k.isa) && n < max) out[n++] = &k;
  return n;
}

int cpu_c_factors(const StepArgs& a, int n_ops, int check, double* out) {
  const Program& pg = *a.prog;
  if (out) std::fill(out, out + (size_t)a.n_tensors * n_ops, 1.0);
  for (int o = 0; o < n_ops; ++o) {
    const Op& op = pg.ops[o];
    if (op.letter != kC) continue;
    for (int t = 0; t < a.n_tensors; ++t) {
      const int s = a.tensors[t].seg;
      bool overflow;
      const double f = c_factor(a.xi, a.ws, a.n_seg, op.xi_version, op.c[0], s,
                                a.dtype == kFloat64, &overflow);
      if (check && overflow) return s * 4 + kBadThermostat;
      if (out) out[(size_t)t * n_ops + o] = f;
    }
  }
  return -1;
}

namespace {

// Applies one E between phases: version k+1 = version k + eps delta (sum_k - N tau), per segment.
// Returns -1, or (when `check`) segment * 4 + kBadThermostat if a sum or the new xi is not finite.
int update_xi(const StepArgs& a, int k, int check) {
  const Op& e = a.prog->ops[a.prog->e_pos[k]];
  const double* from = k == 0 ? a.xi : a.ws + (int64_t)(k - 1) * a.n_seg;
  double* to = a.ws + (int64_t)k * a.n_seg;
  const double* sums = a.ws + (int64_t)(a.prog->n_e + k) * a.n_seg;
  for (int s = 0; s < a.n_seg; ++s) {
    to[s] = thermostat_E(from[s], sums[s], a.seg_n[s], e.c[0], e.c[1]);
    if (check && (!isfinite(sums[s]) || !isfinite(to[s]))) return s * 4 + kBadThermostat;
  }
  return -1;
}

}  // namespace

int cpu_pre(const StepArgs& a, int check) {
  const CpuKernels& k = cpu_kernels();
  const Program& pg = *a.prog;
  int bad = -1;
  if (check && pg.n_e == 0 && (bad = k.check_inputs(a)) >= 0) return bad;
  for (int phase = 0; phase < pg.n_e; ++phase) {
    if (bad < 0) bad = k.run_phase(a, phase, check);
    if (a.sum_hook) {
      // A refused step still takes part in every reduction (zeros for the sums it did not
      // form), so that the other ranks' collectives complete; the caller agrees on the verdict.
      if (bad >= 0) std::fill_n(a.ws + (int64_t)(pg.n_e + phase) * a.n_seg, a.n_seg, 0.0);
      a.sum_hook->fn(a.sum_hook->ctx, phase);
    } else if (bad >= 0) {
      return bad;
    }
    if (bad < 0) bad = update_xi(a, phase, check);
  }
  if (bad >= 0 || !check) return bad;
  return cpu_c_factors(a, pg.n_ops, 1, nullptr);
}

int cpu_finish(const StepArgs& a) { return cpu_kernels().run_phase(a, a.prog->n_e, 0); }

int cpu_step(const StepArgs& a, int check) {
  const int bad = cpu_pre(a, check);
  return bad >= 0 ? bad : cpu_finish(a);
}

}  // namespace te
