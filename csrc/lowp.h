// bfloat16 / float16 storage: branch-free conversions shared by the CPU engine and CUDA kernels,
// and the stochastic rounding of bf16 parameters driven by the counter-based stream.
#pragma once
#include <stdint.h>

#include "substeps.h"

namespace te {

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

TE_HD bool nonfinite_bits(bf16_t x) { return ((x.bits >> 7) & 0xFFu) == 0xFFu; }
TE_HD bool nonfinite_bits(fp16_t x) { return ((x.bits >> 10) & 0x1Fu) == 0x1Fu; }

template <class T>
TE_HD T to_compute(float x) {
  return (T)x;
}
template <class T>
TE_HD T to_compute(double x) {
  return (T)x;
}
template <class T>
TE_HD T to_compute(bf16_t x) {
  return (T)bits_f32((uint32_t)x.bits << 16);
}
template <class T>
TE_HD T to_compute(fp16_t x) {
  // Giesen's half_to_float, with selects instead of branches.
  const uint32_t h = x.bits;
  const uint32_t shifted_exp = 0x7C00u << 13;
  uint32_t o = (h & 0x7FFFu) << 13;
  const uint32_t e = shifted_exp & o;
  o += (127u - 15u) << 23;
  const uint32_t inf_nan = o + ((128u - 16u) << 23);
  const float sub = bits_f32(o + (1u << 23)) - bits_f32(113u << 23);
  o = e == shifted_exp ? inf_nan : (e == 0 ? f32_bits(sub) : o);
  return (T)bits_f32(o | ((h & 0x8000u) << 16));
}

TE_HD bf16_t bf16_round_nearest(float f) {
  const uint32_t u = f32_bits(f);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bf16_t b;
  b.bits = (uint16_t)(nan ? ((u >> 16) | 0x40u) : r);
  return b;
}

// Adds 16 uniform random bits below bf16 precision and truncates: E[result] = f.
TE_HD bf16_t bf16_round_stochastic(float f, uint32_t random16) {
  const uint32_t u = f32_bits(f);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  const bool inf = (u & 0x7FFFFFFFu) == 0x7F800000u;
  const uint32_t r = (u + (random16 & 0xFFFFu)) >> 16;
  bf16_t b;
  b.bits = (uint16_t)(nan ? ((u >> 16) | 0x40u) : (inf ? (u >> 16) : r));
  return b;
}

TE_HD fp16_t fp16_round_nearest(float f) {
  // Giesen's float_to_half_fast3_rtne, with selects instead of branches.
  const uint32_t f32infty = 255u << 23;
  const uint32_t f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = f32_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  const uint32_t big = u > f32infty ? 0x7E00u : 0x7C00u;
  const uint32_t den = f32_bits(bits_f32(u) + bits_f32(denorm_magic)) - denorm_magic;
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t norm = (u + (((uint32_t)(15 - 127)) << 23) + 0xFFFu + mant_odd) >> 13;
  const uint32_t o = u >= f16max ? big : (u < (113u << 23) ? den : norm);
  fp16_t h;
  h.bits = (uint16_t)(o | (sign >> 16));
  return h;
}

// The 16 random bits for stochastic rounding of the four elements of global quad `quad`: the top
// halves of the words of one Philox call (counter (quad, uid, step, kRoundingDraw)).
TE_HD void rounding_quad(const NoiseKey& k, uint64_t quad, uint32_t& r0, uint32_t& r1,
                         uint32_t& r2, uint32_t& r3) {
  r0 = (uint32_t)quad;
  r1 = k.uid;
  r2 = k.step;
  r3 = k.draw;
  philox4x32_10(r0, r1, r2, r3, k.k0, k.k1);
  r0 >>= 16;
  r1 >>= 16;
  r2 >>= 16;
  r3 >>= 16;
}

// The same bits for global element g: word (g mod 4) of its quad (selects, so that a loop over
// elements vectorises).
TE_HD uint32_t rounding_bits(const NoiseKey& k, uint64_t g) {
  uint32_t r0, r1, r2, r3;
  rounding_quad(k, g >> 2, r0, r1, r2, r3);
  const uint32_t lane = (uint32_t)(g & 3);
  return lane == 0 ? r0 : (lane == 1 ? r1 : (lane == 2 ? r2 : r3));
}

// theta's storage from its compute value, for both engines: a copy for float32/float64
// parameters, round to nearest for fp16, and for bf16 stochastic rounding with the element's
// rounding bits (or round to nearest). to_storage<P>(x, ...) picks the overload by storage type.
TE_HD float store_as(float x, const float*, bool, uint32_t) { return x; }
TE_HD double store_as(double x, const double*, bool, uint32_t) { return x; }
TE_HD fp16_t store_as(float x, const fp16_t*, bool, uint32_t) { return fp16_round_nearest(x); }
TE_HD bf16_t store_as(float x, const bf16_t*, bool stochastic, uint32_t random16) {
  return stochastic ? bf16_round_stochastic(x, random16) : bf16_round_nearest(x);
}
template <class P, class T>
TE_HD P to_storage(T x, bool stochastic, uint32_t random16) {
  return store_as(x, (const P*)nullptr, stochastic, random16);
}

}  // namespace te
