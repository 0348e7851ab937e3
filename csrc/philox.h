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

#if defined(__AVX2__) && !defined(__CUDA_ARCH__)
}  // namespace te
#include <immintrin.h>
namespace te {
// Eight Philox4x32-10 evaluations at once (AVX2), counters and results as SoA lanes. The words
// are exact integers, so they equal the scalar function's; GCC's own vectorisation of the scalar
// loop spends most of its time shuffling 64-bit products.
static inline __attribute__((always_inline)) __m256i philox_mulhi_x8(__m256i x, __m256i m,
                                                                      __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
// Sixteen evaluations (two independent sets of eight, interleaved for ILP) of counters
// (b0 + i, c1, c2, c3), i < 16; words into w0..w3[0..15].
static inline __attribute__((always_inline)) void philox4x32_10_x16(
    uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3, uint32_t b0, uint32_t c1,
    uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const __m256i m0 = _mm256_set1_epi32((int)kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi32((int)kPhiloxM1);
  __m256i a0 = _mm256_add_epi32(_mm256_set1_epi32((int)b0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i b0v = _mm256_add_epi32(a0, _mm256_set1_epi32(8));
  __m256i a1 = _mm256_set1_epi32((int)c1), a2 = _mm256_set1_epi32((int)c2);
  __m256i a3 = _mm256_set1_epi32((int)c3);
  __m256i b1 = a1, b2 = a2, b3 = a3;
  for (int r = 0; r < 10; ++r) {
    const __m256i kk0 = _mm256_set1_epi32((int)(k0 + (uint32_t)r * kPhiloxW0));
    const __m256i kk1 = _mm256_set1_epi32((int)(k1 + (uint32_t)r * kPhiloxW1));
    __m256i la0, la1, lb0, lb1;
    const __m256i ha0 = philox_mulhi_x8(a0, m0, la0);
    const __m256i ha1 = philox_mulhi_x8(a2, m1, la1);
    const __m256i hb0 = philox_mulhi_x8(b0v, m0, lb0);
    const __m256i hb1 = philox_mulhi_x8(b2, m1, lb1);
    a0 = _mm256_xor_si256(_mm256_xor_si256(ha1, a1), kk0);
    a1 = la1;
    a2 = _mm256_xor_si256(_mm256_xor_si256(ha0, a3), kk1);
    a3 = la0;
    b0v = _mm256_xor_si256(_mm256_xor_si256(hb1, b1), kk0);
    b1 = lb1;
    b2 = _mm256_xor_si256(_mm256_xor_si256(hb0, b3), kk1);
    b3 = lb0;
  }
  _mm256_storeu_si256((__m256i*)w0, a0);
  _mm256_storeu_si256((__m256i*)(w0 + 8), b0v);
  _mm256_storeu_si256((__m256i*)w1, a1);
  _mm256_storeu_si256((__m256i*)(w1 + 8), b1);
  _mm256_storeu_si256((__m256i*)w2, a2);
  _mm256_storeu_si256((__m256i*)(w2 + 8), b2);
  _mm256_storeu_si256((__m256i*)w3, a3);
  _mm256_storeu_si256((__m256i*)(w3 + 8), b3);
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

// Round-to-nearest uint32 -> float32 from two exact halves: SIMD units only convert signed ints.
TE_HD float u32_to_f32(uint32_t w) {
  return (float)(int32_t)(w >> 16) * 65536.0f + (float)(int32_t)(w & 0xFFFFu);
}

// Natural log of a positive normal float (Cephes logf polynomial, about 1 ulp).
TE_HD float log_f32(float x) {
  const uint32_t bits = f32_bits(x);
  const uint32_t mant = bits & 0x007FFFFFu;
  // m in [sqrt(1/2), sqrt(2)): the mantissa with exponent 0, or -1 when it exceeds sqrt(2).
  // Integer selects only, so that a loop over this vectorises without trapping-math branches.
  const bool big = mant > 0x3504F3u;
  const float m = bits_f32(mant | (big ? 0x3F000000u : 0x3F800000u));
  const int32_t e = (int32_t)(bits >> 23) - 127 + (big ? 1 : 0);
  const float f = m - 1.0f;  // exact (Sterbenz)
  // Cephes logf's polynomial, evaluated by Estrin's scheme: short dependency chains, so that
  // the many independent lanes of a block keep the FP units busy.
  const float z = f * f;
  const float z2 = z * z;
  const float q0 = 3.3333331174e-1f + -2.4999993993e-1f * f;
  const float q1 = 2.0000714765e-1f + -1.6668057665e-1f * f;
  const float q2 = 1.4249322787e-1f + -1.2420140846e-1f * f;
  const float q3 = 1.1676998740e-1f + -1.1514610310e-1f * f;
  const float r0 = q0 + q1 * z;
  const float r1 = q2 + q3 * z;
  const float poly = r0 + (r1 + 7.0376836292e-2f * z2) * z2;
  const float fe = (float)e;
  const float y = (f * z * poly + -2.12194440e-4f * fe) + -0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// sin and cos of 2*pi*u for u in [0, 1]: exact reduction to t in [-1/8, 1/8] of a turn, then
// Cephes minimax polynomials on [-pi/4, pi/4] and a quadrant swap.
TE_HD void sincos_2pi_f32(float u, float& s_out, float& c_out) {
  const int32_t q = (int32_t)(u * 4.0f + 0.5f);
  const float t = u - (float)q * 0.25f;  // exact: both are multiples of ulp(u)
  const float x = t * 6.28318530717958647692f;
  const float z = x * x;
  const float z2 = z * z;
  const float s = x + (x * z) * ((-1.6666654611e-1f + 8.3321608736e-3f * z) +
                                 -1.9515295891e-4f * z2);
  const float c = (1.0f - 0.5f * z) + z2 * ((4.166664568298827e-2f + -1.388731625493765e-3f * z) +
                                            2.443315711809948e-5f * z2);
  const int32_t qi = q & 3;
  const float sc = (qi & 1) ? c : s;
  const float cs = (qi & 1) ? s : c;
  s_out = (qi & 2) ? -sc : sc;
  c_out = ((qi + 1) & 2) ? -cs : cs;
}

// The two normals of one word pair (w_a, w_b): r cos(2 pi u2) for the even lane, r sin for the odd.
TE_HD void box_muller(uint32_t wa, uint32_t wb, float& z_even, float& z_odd) {
  const float u1 = u32_to_f32(wa) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
  const float u2 = u32_to_f32(wb) * 2.3283064365386963e-10f;
  const float r = sqrtf(-2.0f * log_f32(u1));
  float s, c;
  sincos_2pi_f32(u2, s, c);
  z_even = r * c;
  z_odd = r * s;
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
