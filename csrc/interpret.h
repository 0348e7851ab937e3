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

// Runs ops[0, n_ops) on elements [0, n) of th (theta), pm (momentum) and gr (gradient) in the
// compute type T, where n = kLanes when kLanes > 0 (fixed at compile time: a CUDA quad, whose
// arrays then stay in registers) and n = len otherwise (a CPU block).
//   cfac[o]:        the factor exp(-xi delta) of C letter o for the range's segment
//   noise(op, c):   the range's normals for noise letter op, whose scale is c (the noise letters
//                   skip drawing and give zeros when c is 0: the same bits, without the cost)
//   skip_theta:     a read-only phase that leaves theta unread (substeps.h, sum_reads_theta):
//                   A is not run
// An E inside the range's ops moves only xi, which the engines do between phases.
template <int kLanes, class T, class Noise>
TE_HD void interpret(const Op* ops, int n_ops, int len, T* __restrict__ th, T* __restrict__ pm,
                     const T* __restrict__ gr, const double* cfac, bool skip_theta,
                     Noise&& noise) {
  const int n = kLanes > 0 ? kLanes : len;
  TE_NO_UNROLL
  for (int o = 0; o < n_ops; ++o) {
    const Op& op = ops[o];
    const T c0 = (T)op.c[0], c1 = (T)op.c[1];
    switch (op.letter) {
      case kA:
        if (skip_theta) break;
        TE_UNROLL
        for (int j = 0; j < n; ++j) th[j] = letter_A(th[j], pm[j], c0);
        break;
      case kB:
        TE_UNROLL
        for (int j = 0; j < n; ++j) pm[j] = letter_B(pm[j], th[j], gr[j], c0, c1);
        break;
      case kO: {
        const float* z = noise(op, op.c[1]);
        TE_UNROLL
        for (int j = 0; j < n; ++j) pm[j] = letter_O(pm[j], (T)z[j], c0, c1);
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
        TE_UNROLL
        for (int j = 0; j < n; ++j) pm[j] = letter_D(pm[j], (T)z[j], c0);
        break;
      }
      case kV: {
        const T c2 = (T)op.c[2];
        const float* z = noise(op, op.c[2]);
        TE_UNROLL
        for (int j = 0; j < n; ++j) th[j] = letter_V(th[j], gr[j], (T)z[j], c0, c1, c2);
        break;
      }
      default:
        break;
    }
  }
}

}  // namespace te
