// The per-element letter math of docs/DESIGN.md, Letters, the letters' coefficients from a
// group's hyperparameters, and the folded program the engines execute. One source of truth for
// the host program builder, the CPU engine (all ISAs) and the CUDA kernels.
#pragma once
#include <math.h>
#include <stdint.h>

#include "philox.h"

namespace te {

// Letter codes; V is the separate Euler–Maruyama overdamped update.
enum Letter : int32_t { kA = 0, kB = 1, kO = 2, kC = 3, kD = 4, kE = 5, kV = 6 };
constexpr int kNumLetters = 7;
constexpr char kLetterNames[kNumLetters + 1] = "ABOCDEV";  // indexed by Letter

// A letter with its coefficients c (letter_coefficients below).
struct Op {
  int32_t letter;
  int32_t draw;        // O, D, V: the draw field of the noise counter
  int32_t xi_version;  // C: how many E precede it in the folded string
  int32_t pad;
  double c[3];
};

constexpr int kMaxOps = 32;  // letters of a program (and of a written scheme)

// A folded scheme with its coefficients. The k-th E at ops[e_pos[k]] ends phase k, which only
// reads; phase n_e runs all ops and writes. factor[o] = delta / h of op o, kept (has_factors)
// when the program was built from letters and hyperparameters, so that the CUDA engine can
// recompute the coefficients from hyperparameters on the device.
struct Program {
  int32_t n_ops;
  int32_t n_e;
  int32_t e_pos[kMaxOps];
  Op ops[kMaxOps];
  double factor[kMaxOps];
  int32_t has_factors;
  // 1: the adaptive diagonal mass of docs/DESIGN.md, Mass (each tensor's second-moment buffer
  // in TensorDesc::mass); 0: the unit mass, whose bits are those of the letters without it.
  int32_t mass;
  // -1 when the program runs the dynamics of -L (maximize: B and V see -g), else +1.
  double grad_sign;
  // The mass's settings (Hyper's mass_beta, mass_eps, mass_freeze), and mass_wd = grad_sign *
  // weight_decay: B's and V's force g + mass_wd theta is what v averages the square of.
  double mass_beta, mass_eps, mass_freeze, mass_wd;
};

// A group's hyperparameters, in the order of a device hyperparameter tensor. mass_freeze is a
// count of steps (0: the mass adapts at every step).
struct Hyper {
  double lr, gamma, tau, sigma, eps, weight_decay, mass_beta, mass_eps, mass_freeze;
};
constexpr int kNumHyper = 9;
constexpr const char* kHyperNames[kNumHyper] = {"lr",           "gamma",     "tau",
                                                "sigma",        "eps",       "weight_decay",
                                                "mass_beta",    "mass_eps",  "mass_freeze"};

// The coefficients c of a letter moving by delta (= its factor * lr), in double:
//   A: c0 = delta                      B: c0 = delta, c1 = weight_decay
//   O: c0 = exp(-gamma delta), c1 = sqrt(tau (1 - exp(-2 gamma delta)));  gamma = inf: 0, sqrt(tau)
//   C: c0 = delta (the factor exp(-xi delta) is formed per segment from the xi version)
//   D: c0 = sigma sqrt(delta)          E: c0 = eps delta, c1 = tau
//   V: c0 = h, c1 = weight_decay, c2 = sqrt(2 h tau)
// grad_sign = -1 (maximize) negates B's and V's c0 and c1: they see -g, and weight decay still
// pulls theta towards 0.
// The host builds programs with the host's libm and the CUDA engine recomputes them from device
// hyperparameters with CUDA's: exp, expm1 and sqrt may differ by an ulp between the two.
TE_HD void letter_coefficients(int letter, double delta, const Hyper& h, double c[3],
                               double grad_sign = 1.0) {
  c[0] = c[1] = c[2] = 0.0;
  switch (letter) {
    case kA:
    case kC:
      c[0] = delta;
      break;
    case kB:
      c[0] = grad_sign * delta;
      c[1] = grad_sign * h.weight_decay;
      break;
    case kO:
      if (isinf(h.gamma)) {
        c[1] = sqrt(h.tau);
      } else {
        c[0] = exp(-h.gamma * delta);
        c[1] = sqrt(h.tau * -expm1(-2.0 * h.gamma * delta));
      }
      break;
    case kD:
      c[0] = h.sigma * sqrt(delta);
      break;
    case kE:
      c[0] = h.eps * delta;
      c[1] = h.tau;
      break;
    case kV:
      c[0] = grad_sign * h.lr;
      c[1] = grad_sign * h.weight_decay;
      c[2] = sqrt(2.0 * h.lr * h.tau);
      break;
    default:
      break;
  }
}

template <class T>
TE_HD T letter_A(T theta, T p, T delta) {
  return theta + delta * p;
}
template <class T>
TE_HD T letter_B(T p, T theta, T g, T delta, T wd) {
  return p - delta * (g + wd * theta);
}
template <class T>
TE_HD T letter_O(T p, T z, T a, T b) {
  return a * p + b * z;
}
template <class T>
TE_HD T letter_C(T p, T factor) {
  return factor * p;
}
template <class T>
TE_HD T letter_D(T p, T z, T s) {
  return p + s * z;
}
template <class T>
TE_HD T letter_V(T theta, T g, T z, T h, T wd, T s) {
  return theta - h * (g + wd * theta) + s * z;
}
// The adaptive mass (docs/DESIGN.md, Mass). v is the second moment of the force (the gradient
// plus weight decay), an EMA with decay beta; m = sqrt(v bias) + eps with Adam's bias correction bias = 1 / (1 - beta^t), t the
// number of updates v has had. A moves by p / m, O and D draw sqrt(m) R, E sums p^2 / m, V
// moves by (g + wd theta) / m with noise R / sqrt(m). Each letter takes inv = 1 / m,
// sm = sqrt(m) and rs = 1 / sm, each correctly rounded in the compute type (IEEE), so the bits
// are the same on every ISA and on CUDA; with inv = sm = rs = 1 the letters give the unit
// mass's bits.
TE_HD float te_sqrt(float x) { return sqrtf(x); }  // correctly rounded in float (IEEE)
TE_HD double te_sqrt(double x) { return sqrt(x); }

// v takes the square of the force B and V apply, f = g + wd theta (wd = grad_sign * weight
// decay: the same bits as B's g + wd theta up to sign), as Adam's v takes its L2-decayed
// gradient: a coordinate whose gradient vanishes then keeps a mass of about wd |theta| instead of
// eps, and the weight decay's own oscillation, of frequency sqrt(wd / m), stays slow.
template <class T>
TE_HD T mass_update(T v, T g, T theta, T wd, T beta, T one_minus_beta) {
  const T f = g + wd * theta;
  return beta * v + one_minus_beta * (f * f);
}
template <class T>
TE_HD T mass_of(T v, T bias, T eps) {
  return te_sqrt(v * bias) + eps;
}

// A tensor's mass at a step: whether its v takes this step's gradient (not after mass_freeze
// updates), and the bias correction of the v the step uses. start is the step whose gradient
// was v's first; steps before it (a counter set back by hand) count as its first.
struct MassStep {
  bool update;
  double bias;
};
TE_HD MassStep mass_step(double beta, double freeze, uint64_t step, int64_t start) {
  const double t = (int64_t)step >= start ? (double)((int64_t)step - start) + 1.0 : 1.0;
  MassStep m;
  m.update = !(freeze > 0.0) || t <= freeze;
  const double n = m.update ? t : freeze;
  m.bias = 1.0 / -expm1(n * log(beta));  // 1 / (1 - beta^n); beta = 0: 1
  return m;
}

template <class T>
TE_HD T letter_V_mass(T theta, T g, T z, T h, T wd, T s, T inv, T rs) {
  return theta - h * (inv * (g + wd * theta)) + s * (rs * z);
}

// E on the segment: xi + eps delta (sum p^2 - N tau), in double.
TE_HD double thermostat_E(double xi, double sum_p2, double n, double eps_delta, double tau) {
  return xi + eps_delta * (sum_p2 - n * tau);
}

// Whether a read-only phase of the program's ops [0, n) reads theta: to check it, because a B
// with weight decay carries it into p, or because the adaptive mass's force g + mass_wd theta
// does (in every phase, so that each forms the same v). A moves theta alone, which such a phase
// discards, so otherwise the phase leaves theta unread (and A undone) and still sums the same
// p^2 for finite inputs.
TE_HD bool sum_reads_theta(const Program& pg, int n, bool checked) {
  if (checked || (pg.mass && pg.mass_wd != 0.0)) return true;
  for (int i = 0; i < n; ++i)
    if (pg.ops[i].letter == kB && pg.ops[i].c[1] != 0.0) return true;
  return false;
}

// Deterministic sum of squares: 16 fixed lanes in element order, then a fixed pairwise tree.
constexpr int kSumLanes = 16;
TE_HD double reduce_lanes(const double* acc) {
  double t8[8], t4[4];
  for (int i = 0; i < 8; ++i) t8[i] = acc[i] + acc[i + 8];
  for (int i = 0; i < 4; ++i) t4[i] = t8[i] + t8[i + 4];
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

// Non-finite test on the raw bits: the exponent field is all ones.
TE_HD bool nonfinite_bits(float x) { return ((f32_bits(x) >> 23) & 0xFFu) == 0xFFu; }
TE_HD bool nonfinite_bits(double x) {
  uint64_t u;
  memcpy(&u, &x, 8);
  return ((u >> 52) & 0x7FFu) == 0x7FFu;
}

// A C factor exp(-xi delta) that the compute type cannot hold (float32 for every parameter
// dtype but float64): the runaway-thermostat check of docs/DESIGN.md, Failure model.
TE_HD bool factor_overflows(double f, bool compute_double) {
  return nonfinite_bits(f) || (!compute_double && f > 3.4028234663852886e38);
}

}  // namespace te
