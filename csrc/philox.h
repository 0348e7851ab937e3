// The noise stream of docs/DESIGN.md, Noise: Philox4x32-10 and the float32 Box–Muller map.
//
// Host and device share this file. Every function is branch-free scalar code written so that a
// compiler can vectorise a loop over it, and uses only IEEE add/mul/sqrt (the build turns off
// floating-point contraction), so a lane of an AVX2 loop, a scalar tail and a CUDA thread give
// the same bits. log, sin and cos are our own polynomials for the same reason: libm and the
// CUDA math library differ by an ulp, ours do not.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define TE_HD static __host__ __device__ __forceinline__
#else
// static: every ISA translation unit keeps its own copy (no ODR merge across -m flags).
#define TE_HD static inline __attribute__((always_inline))
#endif

namespace te {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

TE_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                        uint32_t k1) {
  const uint64_t p0 = (uint64_t)kPhiloxM0 * c0;
  const uint64_t p1 = (uint64_t)kPhiloxM1 * c2;
  const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
  const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Philox4x32-10 on counter (c0..c3) with key (k0, k1); the result overwrites the counter words.
// The rounds are written out so that a loop over counters vectorises without further unrolling.
TE_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                         uint32_t k1) {
  philox_round(c0, c1, c2, c3, k0, k1);
  philox_round(c0, c1, c2, c3, k0 + 1u * kPhiloxW0, k1 + 1u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 2u * kPhiloxW0, k1 + 2u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 3u * kPhiloxW0, k1 + 3u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 4u * kPhiloxW0, k1 + 4u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 5u * kPhiloxW0, k1 + 5u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 6u * kPhiloxW0, k1 + 6u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 7u * kPhiloxW0, k1 + 7u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 8u * kPhiloxW0, k1 + 8u * kPhiloxW1);
  philox_round(c0, c1, c2, c3, k0 + 9u * kPhiloxW0, k1 + 9u * kPhiloxW1);
}

#if (defined(__x86_64__) || defined(__SSE2__)) && !defined(__CUDACC__)
#define TE_PHILOX_SIMD 1
}  // namespace te
#include <immintrin.h>
namespace te {
// Philox4x32-10 of many counters at once with x86 vector intrinsics: 32-bit lanes, the 32x32->64
// products of the even and of the odd lanes (mul_epu32) recombined into high and low words.
// The words are exact integers, so they equal the scalar function's; GCC's own vectorisation
// of the scalar loop spends most of its time shuffling 64-bit products. One vector type per
// ISA; philox_x32 below is written once for all three.
struct PhiloxSse2 {  // x86-64 baseline
  using V = __m128i;
  static constexpr int kLanes = 4;
  static V set1(uint32_t x) { return _mm_set1_epi32((int)x); }
  static V iota() { return _mm_setr_epi32(0, 1, 2, 3); }
  static V add(V a, V b) { return _mm_add_epi32(a, b); }
  static V bxor(V a, V b) { return _mm_xor_si128(a, b); }
  static V mul_even(V a, V b) { return _mm_mul_epu32(a, b); }
  static V odd_down(V a) { return _mm_srli_epi64(a, 32); }
  // (low words, high words) of the even-lane products pe and odd-lane products po
  static V lo_words(V pe, V po) {
    return _mm_or_si128(_mm_and_si128(pe, _mm_set1_epi64x(0xFFFFFFFFll)), _mm_slli_epi64(po, 32));
  }
  static V hi_words(V pe, V po) {
    return _mm_or_si128(_mm_srli_epi64(pe, 32),
                        _mm_and_si128(po, _mm_set1_epi64x((long long)0xFFFFFFFF00000000ull)));
  }
  static void store(uint32_t* p, V a) { _mm_storeu_si128((__m128i*)p, a); }
};
#if defined(__AVX2__)
struct PhiloxAvx2 {
  using V = __m256i;
  static constexpr int kLanes = 8;
  static V set1(uint32_t x) { return _mm256_set1_epi32((int)x); }
  static V iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static V add(V a, V b) { return _mm256_add_epi32(a, b); }
  static V bxor(V a, V b) { return _mm256_xor_si256(a, b); }
  static V mul_even(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V odd_down(V a) { return _mm256_srli_epi64(a, 32); }
  static V lo_words(V pe, V po) { return _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA); }
  static V hi_words(V pe, V po) { return _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA); }
  static void store(uint32_t* p, V a) { _mm256_storeu_si256((__m256i*)p, a); }
};
#endif
#if defined(__AVX512F__)
struct PhiloxAvx512 {
  using V = __m512i;
  static constexpr int kLanes = 16;
  static V set1(uint32_t x) { return _mm512_set1_epi32((int)x); }
  static V iota() {
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  static V add(V a, V b) { return _mm512_add_epi32(a, b); }
  static V bxor(V a, V b) { return _mm512_xor_si512(a, b); }
  static V mul_even(V a, V b) { return _mm512_mul_epu32(a, b); }
  static V odd_down(V a) { return _mm512_srli_epi64(a, 32); }
  // mask_blend(k, a, b) takes b where bit k is set: the odd 32-bit lanes
  static V lo_words(V pe, V po) {
    return _mm512_mask_blend_epi32((__mmask16)0xAAAA, pe, _mm512_slli_epi64(po, 32));
  }
  static V hi_words(V pe, V po) {
    return _mm512_mask_blend_epi32((__mmask16)0xAAAA, _mm512_srli_epi64(pe, 32), po);
  }
  static void store(uint32_t* p, V a) { _mm512_storeu_si512((void*)p, a); }
};
using PhiloxVec = PhiloxAvx512;
#elif defined(__AVX2__)
using PhiloxVec = PhiloxAvx2;
#else
using PhiloxVec = PhiloxSse2;
#endif

// The words of counters (b0 + i, c1, c2, c3), i < 32, into w0..w3[0..31]: 32 / kLanes
// independent vectors interleaved, so that the rounds' multiply-xor chains overlap.
template <class X>
static inline __attribute__((always_inline)) void philox4x32_10_x32_with(
    uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3, uint32_t b0, uint32_t c1,
    uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  using V = typename X::V;
  constexpr int S = 32 / X::kLanes;
  const V m0 = X::set1(kPhiloxM0), m1 = X::set1(kPhiloxM1);
  V x0[S], x1[S], x2[S], x3[S];
  for (int s = 0; s < S; ++s) {
    x0[s] = X::add(X::set1(b0 + (uint32_t)(s * X::kLanes)), X::iota());
    x1[s] = X::set1(c1);
    x2[s] = X::set1(c2);
    x3[s] = X::set1(c3);
  }
  for (int r = 0; r < 10; ++r) {
    const V kk0 = X::set1(k0 + (uint32_t)r * kPhiloxW0);
    const V kk1 = X::set1(k1 + (uint32_t)r * kPhiloxW1);
    for (int s = 0; s < S; ++s) {
      const V pe0 = X::mul_even(x0[s], m0), po0 = X::mul_even(X::odd_down(x0[s]), m0);
      const V pe1 = X::mul_even(x2[s], m1), po1 = X::mul_even(X::odd_down(x2[s]), m1);
      x0[s] = X::bxor(X::bxor(X::hi_words(pe1, po1), x1[s]), kk0);
      x1[s] = X::lo_words(pe1, po1);
      x2[s] = X::bxor(X::bxor(X::hi_words(pe0, po0), x3[s]), kk1);
      x3[s] = X::lo_words(pe0, po0);
    }
  }
  for (int s = 0; s < S; ++s) {
    X::store(w0 + s * X::kLanes, x0[s]);
    X::store(w1 + s * X::kLanes, x1[s]);
    X::store(w2 + s * X::kLanes, x2[s]);
    X::store(w3 + s * X::kLanes, x3[s]);
  }
}
static inline __attribute__((always_inline)) void philox4x32_10_x32(
    uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3, uint32_t b0, uint32_t c1,
    uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  philox4x32_10_x32_with<PhiloxVec>(w0, w1, w2, w3, b0, c1, c2, c3, k0, k1);
}
#endif

TE_HD uint32_t f32_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
}
TE_HD float bits_f32(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// a * b + c rounded once (IEEE fusedMultiplyAdd) gives the same bits on every path: the FMA
// instruction where the ISA has one (CUDA, x86 with -mfma, AArch64), else a software fma in
// double (x86-64 baseline). The build turns contraction off, so only these explicit calls fuse.
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__ARM_FEATURE_FMA) || \
    defined(__aarch64__)
#define TE_SOFT_FMA 0
#else
#define TE_SOFT_FMA 1
#endif

// The software fma, with floating-point operations only so that loops over it still vectorise
// (SSE2 has no 64-bit integer compare). The product of two floats is exact in double and TwoSum
// gives the double sum s and its exact error; rounding s to float differs from rounding the
// exact value only when s lies exactly halfway between two floats and the error is nonzero,
// which then decides the side: the other float neighbour is s + (s - RN(s)), representable
// exactly when s is such a midpoint.
TE_HD float fma_soft(float a, float b, float c) {
  const double p = (double)a * (double)b;
  const double dc = (double)c;
  const double s = p + dc;
  const double bp = s - dc;
  const double err = (p - bp) + (dc - (s - bp));
  const float f1 = (float)s;
  const double d = s - (double)f1;
  const double far = s + d;
  const float f2 = (float)far;
  // & rather than &&, so that there is no branch; f1 infinite: so is d, and f1 is the answer.
  const bool take_far = (d != 0.0) & (d < HUGE_VAL) & (d > -HUGE_VAL) & ((double)f2 == far) &
                        (err * d > 0.0);
  return take_far ? f2 : f1;
}

TE_HD float fma_f32(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif !TE_SOFT_FMA
  return __builtin_fmaf(a, b, c);
#else
  return fma_soft(a, b, c);
#endif
}

// fma_f32 for the hot loops. With kFlag on the software path it rounds the double sum to float
// directly (a third of fma_soft's work) and sets `risk` where that may differ from fma_f32:
// the sum exactly at a float midpoint (low 29 bits 1 << 28) or below the normal range (whose
// midpoints have other patterns); the caller then redoes its batch with fma_f32 (about once in
// 2^29 calls). Elsewhere it is fma_f32 and leaves `risk` alone.
template <bool kFlag>
TE_HD float fma_risky(float a, float b, float c, uint32_t& risk) {
#if TE_SOFT_FMA
  if (kFlag) {
    const double s = (double)a * (double)b + (double)c;
    uint64_t u;
    memcpy(&u, &s, 8);
    risk |= (((uint32_t)u & 0x1FFFFFFFu) == 0x10000000u) | (fabs(s) < 0x1p-126);
    return (float)s;
  }
#endif
  (void)risk;
  return fma_f32(a, b, c);
}

// a * b + c where the product a * b is exact in float (a power-of-two factor): one rounding
// either way, so the plain add of the software path gives the FMA's bits.
TE_HD float fma_exact_product(float a, float b, float c) {
#if TE_SOFT_FMA
  return a * b + c;
#else
  return fma_f32(a, b, c);
#endif
}

// -2 ln(u) of a positive normal float u, the Box–Muller radius squared. u = 2^e m with m in
// [sqrt(1/2), sqrt(2)) (integer arithmetic on the bits, exact), f = m - 1 (exact, Sterbenz);
// -2 ln(1 + f) = -2 f + f^2 Q(f), Q a degree-7 minimax polynomial (relative error of the whole
// below 2^-25 on the interval), then e times -2 ln 2 in two parts (the first with few bits, so
// that its product with e is exact: |e| < 2^8).
template <bool kFlag>
TE_HD float minus_2_log_f32(float u, uint32_t& risk) {
  const int32_t ix = (int32_t)f32_bits(u) - 0x3F3504F3;
  const int32_t e = ix >> 23;  // arithmetic shift: floor
  const float m = bits_f32((uint32_t)(ix & 0x007FFFFF) + 0x3F3504F3u);
  const float f = m - 1.0f;
  const float f2 = f * f;
  // Estrin: short dependency chains for the many independent lanes of a block.
  const float q01 = fma_risky<kFlag>(-6.666790247e-01f, f, 9.999998212e-01f, risk);
  const float q23 = fma_risky<kFlag>(-3.992414176e-01f, f, 5.000351071e-01f, risk);
  const float q45 = fma_risky<kFlag>(-2.983597815e-01f, f, 3.314102888e-01f, risk);
  const float q67 = fma_risky<kFlag>(-1.746950150e-01f, f, 2.861496508e-01f, risk);
  const float q03 = fma_risky<kFlag>(q23, f2, q01, risk);
  const float q47 = fma_risky<kFlag>(q67, f2, q45, risk);
  const float q = fma_risky<kFlag>(q47, f2 * f2, q03, risk);
  const float l = fma_risky<kFlag>(f2, q, -2.0f * f, risk);
  const float fe = (float)e;
  return fma_exact_product(fe, -1.38671875f, fma_risky<kFlag>(fe, 4.243888834e-04f, l, risk));
}

// sin and cos of 2 pi w / 2^32 (a 32-bit word as a fraction of a turn): the nearest quarter turn
// q and the rest d / 2^32, |d| <= 2^29, in exact integer arithmetic; t = d / 2^32 (d rounded to
// float: 2^-24 relative, so the normals keep their relative accuracy near the zeros of sin and
// cos); minimax polynomials in t^2 on |t| <= 1/8: sin(2 pi t) = t S(t^2) (relative error
// 2^-28), cos(2 pi t) = 1 + t^2 C(t^2) (2^-33); then the quadrant's swap and signs.
template <bool kFlag>
TE_HD void sincos_turn_u32(uint32_t w, float& s_out, float& c_out, uint32_t& risk) {
  const uint32_t q = (w + 0x20000000u) >> 30;
  const int32_t d = (int32_t)(w - (q << 30));
  const float t = (float)d * 2.3283064365386963e-10f;
  const float y = t * t;
  const float s3 = fma_risky<kFlag>(-7.539356232e+01f, y, 8.159235382e+01f, risk);
  const float s2 = fma_risky<kFlag>(s3, y, -4.134166336e+01f, risk);
  const float s = t * fma_risky<kFlag>(s2, y, 6.283185482e+00f, risk);
  const float c3 = fma_risky<kFlag>(5.922924042e+01f, y, -8.544323730e+01f, risk);
  const float c2 = fma_risky<kFlag>(c3, y, 6.493932343e+01f, risk);
  const float c1 = fma_risky<kFlag>(c2, y, -1.973920822e+01f, risk);
  const float c = fma_risky<kFlag>(y, c1, 1.0f, risk);
  // cos(2 pi (q/4 + t)), sin(...) for q = 0..3: (c, s), (-s, c), (-c, -s), (s, -c).
  const bool odd = (q & 1u) != 0;
  const float cv = odd ? s : c;
  const float sv = odd ? c : s;
  c_out = bits_f32(f32_bits(cv) ^ (((q + 1u) & 2u) << 30));
  s_out = bits_f32(f32_bits(sv) ^ ((q & 2u) << 30));
}

// The two normals of one word pair (w_a, w_b): u = w_a 2^-32 + 2^-33 (in float32, as written),
// r = sqrt(-2 ln u), and r cos(2 pi w_b / 2^32) for the even lane, r sin(...) for the odd lane.
// kFlag: fma_risky's fast software path (the caller checks `risk`).
template <bool kFlag>
TE_HD void box_muller_impl(uint32_t wa, uint32_t wb, float& z_even, float& z_odd,
                           uint32_t& risk) {
  const float u = fma_exact_product((float)wa, 2.3283064365386963e-10f, 1.1641532182693481e-10f);
  const float r = sqrtf(minus_2_log_f32<kFlag>(u, risk));
  float s, c;
  sincos_turn_u32<kFlag>(wb, s, c, risk);
  z_even = r * c;
  z_odd = r * s;
}
TE_HD void box_muller(uint32_t wa, uint32_t wb, float& z_even, float& z_odd) {
  uint32_t unused = 0;
  box_muller_impl<false>(wa, wb, z_even, z_odd, unused);
}

// The counter-based key and counter of docs/DESIGN.md, Noise.
struct NoiseKey {
  uint32_t k0, k1;   // seed mod 2^32, seed >> 32
  uint32_t uid;      // (group << 16) | position
  uint32_t step;     // completed optimizer steps mod 2^32
  uint32_t draw;     // index of the noise-using letter in the folded string
};

TE_HD NoiseKey make_key(uint64_t seed, uint32_t uid, uint64_t step, uint32_t draw) {
  NoiseKey k;
  k.k0 = (uint32_t)seed;
  k.k1 = (uint32_t)(seed >> 32);
  k.uid = uid;
  k.step = (uint32_t)step;
  k.draw = draw;
  return k;
}

// The four normals of elements 4*block .. 4*block+3 (block = global element index >> 2).
TE_HD void normal4(const NoiseKey& k, uint64_t block, float& z0, float& z1, float& z2, float& z3) {
  uint32_t c0 = (uint32_t)block, c1 = k.uid, c2 = k.step, c3 = k.draw;
  philox4x32_10(c0, c1, c2, c3, k.k0, k.k1);
  box_muller(c0, c1, z0, z1);
  box_muller(c2, c3, z2, z3);
}

}  // namespace te
