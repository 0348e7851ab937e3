// The letter interpreter: one program loop for the CPU engine (a block of up to 256 elements in
// L1, one vectorised loop per letter) and the CUDA kernels (the four lanes of a quad in
// registers). Only the element range differs; the per-element math is substeps.h.
#pragma once
#include "substeps.h"

#if defined(__CUDACC__)
#define TE_UNROLL _Pragma("unroll")
#define TE_NO_UNROLL _Pragma("unroll 1")
#else
#define TE_UNROLL
#define TE_NO_UNROLL
#endif

namespace te {

// The per-element factors of the adaptive mass of a range (substeps.h, Mass): inv = 1 / m,
// sm = sqrt(m) (for O and D noise) and rs = 1 / sm (for V noise); null where unused.
template <class T>
struct MassFactors {
  const T* inv;
  const T* sm;
  const T* rs;
};

// Runs ops[0, n_ops) on elements [0, n) of th (theta), pm (momentum) and gr (gradient) in the
// compute type T, where n = kLanes when kLanes > 0 (fixed at compile time: a CUDA quad, whose
// arrays then stay in registers) and n = len otherwise (a CPU block).
//   cfac[o]:        the factor exp(-xi delta) of C letter o for the range's segment
//   noise(op, c):   the range's normals for noise letter op, whose scale is c (the noise letters
//                   skip drawing and give zeros when c is 0: the same bits, without the cost)
//   skip_theta:     a read-only phase that leaves theta unread (substeps.h, sum_reads_theta):
//                   A is not run
//   mass (kMass):   the range's mass factors (sm and rs read only where a letter draws: they
//                   are not formed otherwise); without kMass the unit mass
// An E inside the range's ops moves only xi, which the engines do between phases.
template <int kLanes, bool kMass, class T, class Noise>
TE_HD void interpret(const Op* ops, int n_ops, int len, T* __restrict__ th, T* __restrict__ pm,
                     const T* __restrict__ gr, const double* cfac, bool skip_theta,
                     Noise&& noise, const MassFactors<T>& mass) {
  const int n = kLanes > 0 ? kLanes : len;
  const T* __restrict__ inv = mass.inv;
  const T* __restrict__ sm = mass.sm;
  const T* __restrict__ rs = mass.rs;
  TE_NO_UNROLL
  for (int o = 0; o < n_ops; ++o) {
    const Op& op = ops[o];
    const T c0 = (T)op.c[0], c1 = (T)op.c[1];
    switch (op.letter) {
      case kA:
        if (skip_theta) break;
        if (kMass) {
          TE_UNROLL
          for (int j = 0; j < n; ++j) th[j] = letter_A(th[j], pm[j] * inv[j], c0);
        } else {
          TE_UNROLL
          for (int j = 0; j < n; ++j) th[j] = letter_A(th[j], pm[j], c0);
        }
        break;
      case kB:
        TE_UNROLL
        for (int j = 0; j < n; ++j) pm[j] = letter_B(pm[j], th[j], gr[j], c0, c1);
        break;
      case kO: {
        const float* z = noise(op, op.c[1]);
        if (kMass && op.c[1] != 0.0) {  // (sm is only formed where a letter draws)
          TE_UNROLL
          for (int j = 0; j < n; ++j) pm[j] = letter_O(pm[j], sm[j] * (T)z[j], c0, c1);
        } else {
          TE_UNROLL
          for (int j = 0; j < n; ++j) pm[j] = letter_O(pm[j], (T)z[j], c0, c1);
        }
        break;
      }
      case kC: {
        const T f = (T)cfac[o];
        TE_UNROLL
        for (int j = 0; j < n; ++j) pm[j] = letter_C(pm[j], f);
        break;
      }
      case kD: {
        const float* z = noise(op, op.c[0]);
        if (kMass && op.c[0] != 0.0) {
          TE_UNROLL
          for (int j = 0; j < n; ++j) pm[j] = letter_D(pm[j], sm[j] * (T)z[j], c0);
        } else {
          TE_UNROLL
          for (int j = 0; j < n; ++j) pm[j] = letter_D(pm[j], (T)z[j], c0);
        }
        break;
      }
      case kV: {
        const T c2 = (T)op.c[2];
        const float* z = noise(op, op.c[2]);
        if (kMass) {  // rs only where V draws: otherwise its noise term is c2 * z = 0
          TE_UNROLL
          for (int j = 0; j < n; ++j)
            th[j] = letter_V_mass(th[j], gr[j], (T)z[j], c0, c1, c2, inv[j],
                                  op.c[2] != 0.0 ? rs[j] : (T)1);
        } else {
          TE_UNROLL
          for (int j = 0; j < n; ++j) th[j] = letter_V(th[j], gr[j], (T)z[j], c0, c1, c2);
        }
        break;
      }
      default:
        break;
    }
  }
}

// Which mass factors a program's ops [0, n_ops) use: sm for O or D noise, rs (and inv) for V
// noise, each only where the letter draws (a zero scale draws nothing).
TE_HD void mass_needs(const Op* ops, int n_ops, bool* need_sm, bool* need_rs) {
  *need_sm = *need_rs = false;
  for (int o = 0; o < n_ops; ++o) {
    const Op& op = ops[o];
    if ((op.letter == kO && op.c[1] != 0.0) || (op.letter == kD && op.c[0] != 0.0))
      *need_sm = true;
    if (op.letter == kV && op.c[2] != 0.0) *need_rs = true;
  }
}

// The mass factors of an element from its second moment v (already updated for the step):
// inv = 1 / m always, sm = sqrt(m) where O or D draw (need_sm) or V does (need_rs), and
// rs = 1 / sm where V draws; 0 where unused.
template <class T>
TE_HD void mass_factors(T v, T bias, T eps, bool need_sm, bool need_rs, T* inv, T* sm, T* rs) {
  const T m = mass_of(v, bias, eps);
  *inv = (T)1 / m;
  *sm = need_sm || need_rs ? te_sqrt(m) : (T)0;
  *rs = need_rs ? (T)1 / *sm : (T)0;
}

}  // namespace te
