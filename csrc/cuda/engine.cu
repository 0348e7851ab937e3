// The CUDA engine: multi-tensor fused kernels with deterministic segment reductions.
//
// Semantics are those of the CPU engine (csrc/cpu/engine_impl.h, engine_cpu.cpp); the letters
// are run by the same interpreter (interpret.h) on the same element math and noise (substeps.h,
// philox.h, lowp.h), compiled with --fmad=false, so a CUDA thread computes the bits a CPU lane
// computes (docs/DESIGN.md, Noise: what is bitwise and where).
//
// Organisation
// * phase_kernel<P, M, T, Mode, Cap, DevCoef>: one kernel for every dtype and three modes: kSum
//   (a read-only phase ending in an E: letters, then sum p^2 of each chunk into scratch), kWrite
//   (all letters, store theta and p) and kCheck (the read-only non-finite check of theta and g
//   that precedes a scheme without E). The letters are interpreted from the program in the
//   arguments (with DevCoef, with the coefficients of coef_kernel). Tensors are packed into the
//   kernel's arguments by value (as torch's multi_tensor_apply does): up to 42 in a 4 KiB
//   argument block, and up to 490 in the 32764-byte parameter space, which needs CUDA >= 12.1 at
//   build time (CMakeLists.txt) and a driver >= R530 (CUDA 12.1) at run time (otherwise every
//   launch uses the 4 KiB layout); a call with more tensors than fit takes several launches.
//   64-bit element indices throughout. Each block handles one chunk of kChunk elements,
//   aligned in *global* index (tensor offset + local index), so that every thread handles whole
//   global quads: one Philox call gives the four normals of a quad (docs/DESIGN.md, Noise).
//   Blocks find their tensor by binary search over the packed tensors' first block.
// * seg_kernel: a single block per launch, one warp per segment: adds the chunk partials of a
//   segment in a fixed order (FINISH), applies the thermostat E (UPDATE), and checks the
//   exp(-xi delta) factors of the next phase (CHECK). Fixed blocking everywhere, no float
//   atomics: a run is bitwise repeatable.
// * coef_kernel: the program's coefficients from the group's hyperparameters in device memory
//   (StepArgs::hyper), at the start of every call that has them, so that a captured CUDA graph
//   follows the schedulers that change those tensors. The program's structure (letters, draws,
//   factors delta/h, xi versions) stays in the arguments. CUDA's exp, expm1 and sqrt may differ
//   from the host's by an ulp, so such a step may differ from a host-coefficient step by as much.
// * commit_kernel: xi = version n_e after the writing phase.
// * normal_kernel: the noise stream as a tensor (fill_normal).
//
// Modes (engine.h, RunMode): kRunAll runs a whole step; kRunPre everything that can fail (the
// checks, the sum phases and the xi versions in ws, the factors of the writing phase) and
// kRunFinish the writing phase after it. With a sum hook (distributed steps) the sum phases run
// one by one: partial sums, the hook (the all-reduce), then the E.
//
// Non-finite values set *flag (a device int32, zeroed by the caller once per optimizer step) to
// the smallest (code + 1) found by the earliest failing stage; kernels after it do nothing, so a
// flagged step changes neither theta, p nor xi (of any call sharing the flag). A kernel that
// itself sets the flag never skips work by reading the flag (its blocks would race), except the
// single-block seg_kernel, which reads it once before doing anything.
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../engine.h"
#include "../interpret.h"
#include "../lowp.h"
#include "../philox.h"
#include "../substeps.h"
#include "cuda_engine.h"

// The 32 KB kernel-parameter layout: CMakeLists.txt defines TE_CUDA_LARGE_PARAMS from the
// toolkit's version; a build outside CMake decides from the runtime header.
#ifndef TE_CUDA_LARGE_PARAMS
#if CUDART_VERSION >= 12010
#define TE_CUDA_LARGE_PARAMS 1
#else
#define TE_CUDA_LARGE_PARAMS 0
#endif
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "thermo_ext's CUDA engine needs sm_70 or newer (__grid_constant__ kernel parameters)"
#endif

namespace te {

namespace {

constexpr int kThreads = 256;             // threads of a phase block
constexpr int64_t kChunk = 8192;          // elements of a block's chunk; multiple of 4
constexpr int kSegThreads = 512;          // threads of the single seg_kernel block
constexpr int kSegWarps = kSegThreads / 32;
constexpr int64_t kMaxBlocksPerLaunch = INT_MAX;
// Scratch layout: the coefficients of device hyperparameters (3 per op), then the partial sums.
// Device coefficients: 3 per op, then the mass's beta, eps and freeze (coef_kernel).
constexpr int kMassCoef = 3 * kMaxOps;
constexpr int64_t kCoefDoubles = kMassCoef + 4;

enum Mode : int { kSum = 0, kWrite = 1, kCheck = 2 };
enum SegMode : int { kSegFinish = 1, kSegUpdate = 2, kSegCheck = 4 };

// ----------------------------------------------------------------------------------------------
// Kernel arguments, passed by value.

struct KTensor {
  TensorDesc desc;      // the call's descriptor, as engine.h defines it
  int32_t tidx;         // index in the call (the flag's tensor number)
  int32_t slot_base;    // first partial-sum slot (kSum)
  int32_t block_begin;  // first block of this tensor in the launch
  int32_t pad;
};
static_assert(sizeof(KTensor) == 80, "KTensor layout");

struct KCommon {
  Op ops[kMaxOps];
  int32_t n_ops;
  int32_t n_seg;
  uint64_t seed;
  uint64_t step;
  const int64_t* step_ptr;
  const double* xi;
  const double* ws;
  int32_t* flag;
  double* partials;
  const double* coef;  // 3 per op from device hyperparameters (coef_kernel), or null: ops[].c
  int32_t stochastic;
  int32_t check_data;  // set the flag for non-finite theta/g(/p)
  int32_t check_cfac;  // set the flag for a non-finite exp(-xi delta)
  int32_t early_exit;  // do nothing when *flag != 0 (only where no block of this kernel sets it)
  int32_t skip_theta;  // kSum: theta unread and A undone (substeps.h: sum_reads_theta)
  int32_t pad;
  // The adaptive mass's settings (Program; with coef, the device's at coef[kMassCoef]).
  double mass_beta, mass_eps, mass_freeze, mass_wd;
};

// Two sizes of every kernel's arguments: the 32764-byte parameter space (see the top of this
// file for what it needs) and the classic 4096 bytes, which launches cheaper (the driver copies
// the whole argument block with every launch) and serves the common calls with few tensors.
constexpr int kSmallParams = 4096;
constexpr int kParamLimit = TE_CUDA_LARGE_PARAMS ? 32764 : kSmallParams;
constexpr int kMaxT = (kParamLimit - (int)sizeof(KCommon) - 16) / (int)sizeof(KTensor);
constexpr int kSmallT = (kSmallParams - (int)sizeof(KCommon) - 16) / (int)sizeof(KTensor);

template <int kCap>
struct LaunchArgs {
  KCommon c;
  int32_t n_t;
  int32_t pad;
  KTensor t[kCap];
};
static_assert(sizeof(LaunchArgs<kMaxT>) <= kParamLimit, "kernel parameters over the limit");
static_assert(sizeof(LaunchArgs<kSmallT>) <= kSmallParams, "small kernel parameters too big");
static_assert(kSmallT >= 8, "KCommon leaves no room for tensors in 4 KiB");

struct SegEntry {
  double n;         // elements of the segment (UPDATE)
  int32_t lo, hi;   // partial slots [lo, hi) (FINISH)
  int32_t present;  // has tensors in this call (CHECK)
  int32_t pad;
};

struct SegHeader {
  int32_t s0, count, mode, k, n_e, n_seg;
  double e_c0, e_c1;  // the E's eps*delta and tau
  const double* partials;
  double* ws;
  const double* xi;
  int32_t* flag;
  const double* coef;  // as KCommon::coef; then e_op and cop_op say where to read
  int32_t e_op;
  int32_t n_cops;
  int32_t compute_double;  // float64 parameters: C factors need only fit a double
  int32_t pad;
  double cop_c0[kMaxOps];  // the next phase's C letters: delta, xi version and op index
  int32_t cop_ver[kMaxOps];
  int32_t cop_op[kMaxOps];
};

constexpr int kMaxSegEntries = (kParamLimit - (int)sizeof(SegHeader) - 16) / (int)sizeof(SegEntry);
constexpr int kSmallSegEntries =
    (kSmallParams - (int)sizeof(SegHeader) - 16) / (int)sizeof(SegEntry);

template <int kCap>
struct SegArgs {
  SegHeader h;
  SegEntry e[kCap];
};
static_assert(sizeof(SegArgs<kMaxSegEntries>) <= kParamLimit, "kernel parameters over the limit");
static_assert(sizeof(SegArgs<kSmallSegEntries>) <= kSmallParams, "small parameters too big");

struct CoefArgs {
  int32_t n_ops;
  int32_t letter[kMaxOps];
  double factor[kMaxOps];
  double grad_sign;
  const double* hyper;
  double* out;
};

// ----------------------------------------------------------------------------------------------
// Quad loads and stores: four consecutive elements, vectorised when whole and aligned.

template <class S>
struct VecAlign {
  static constexpr uintptr_t value = 4 * sizeof(S) < 16 ? 4 * sizeof(S) : 16;
};

__device__ __forceinline__ void load_vec4(const float* p, float v[4]) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  v[0] = x.x;
  v[1] = x.y;
  v[2] = x.z;
  v[3] = x.w;
}
__device__ __forceinline__ void load_vec4(const double* p, double v[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x;
  v[1] = a.y;
  v[2] = b.x;
  v[3] = b.y;
}
template <class H>
__device__ __forceinline__ void load_vec4_16(const H* p, H v[4]) {
  const uint2 x = *reinterpret_cast<const uint2*>(p);
  v[0].bits = (uint16_t)(x.x & 0xFFFFu);
  v[1].bits = (uint16_t)(x.x >> 16);
  v[2].bits = (uint16_t)(x.y & 0xFFFFu);
  v[3].bits = (uint16_t)(x.y >> 16);
}
__device__ __forceinline__ void load_vec4(const bf16_t* p, bf16_t v[4]) { load_vec4_16(p, v); }
__device__ __forceinline__ void load_vec4(const fp16_t* p, fp16_t v[4]) { load_vec4_16(p, v); }

__device__ __forceinline__ void store_vec4(float* p, const float v[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_vec4(double* p, const double v[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}
template <class H>
__device__ __forceinline__ void store_vec4_16(H* p, const H v[4]) {
  uint2 x;
  x.x = (uint32_t)v[0].bits | ((uint32_t)v[1].bits << 16);
  x.y = (uint32_t)v[2].bits | ((uint32_t)v[3].bits << 16);
  *reinterpret_cast<uint2*>(p) = x;
}
__device__ __forceinline__ void store_vec4(bf16_t* p, const bf16_t v[4]) { store_vec4_16(p, v); }
__device__ __forceinline__ void store_vec4(fp16_t* p, const fp16_t v[4]) { store_vec4_16(p, v); }

// Lanes [l0, l1) of the quad whose lane 0 is at p (p itself may point before the tensor).
template <class S>
__device__ __forceinline__ void load_quad(const S* p, int l0, int l1, S v[4]) {
  if (l0 == 0 && l1 == 4 && ((uintptr_t)p & (VecAlign<S>::value - 1)) == 0) {
    load_vec4(p, v);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) v[l] = (l >= l0 && l < l1) ? p[l] : S{};
  }
}
template <class S>
__device__ __forceinline__ void store_quad(S* p, int l0, int l1, const S v[4]) {
  if (l0 == 0 && l1 == 4 && ((uintptr_t)p & (VecAlign<S>::value - 1)) == 0) {
    store_vec4(p, v);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (l >= l0 && l < l1) p[l] = v[l];
  }
}

// theta's storage for a quad (lowp.h to_storage; for stochastic bf16 the quad's rounding bits
// come from one Philox call).
template <class P, class T>
__device__ __forceinline__ void quad_to_storage(const T th[4], P out[4], bool stochastic,
                                                const NoiseKey& k, uint64_t quad) {
  uint32_t r[4] = {0u, 0u, 0u, 0u};
  if (std::is_same<P, bf16_t>::value && stochastic) rounding_quad(k, quad, r[0], r[1], r[2], r[3]);
#pragma unroll
  for (int l = 0; l < 4; ++l) out[l] = to_storage<P>(th[l], stochastic, r[l]);
}

// *flag = min(*flag, v) over the codes set so far, where 0 means "no code yet" (so a plain
// atomicMin would never replace it). v > 0.
__device__ __forceinline__ void flag_min(int32_t* flag, int v) {
  int old = *(volatile int32_t*)flag;
  while (old == 0 || v < old) {
    const int prev = atomicCAS((int*)flag, old, v);
    if (prev == old) break;
    old = prev;
  }
}

// Sum over the block in a fixed order: a shuffle tree per warp, then the warps in order.
__device__ __forceinline__ double block_sum(double x, double* warp_sums) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xFFFFFFFFu, x, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += warp_sums[w];
  return total;  // valid in thread 0
}

// ----------------------------------------------------------------------------------------------
// The phase kernel.

// The normals of elements 4q .. 4q+3 for a noise letter; zeros when its scale is 0 (the same
// bits as the CPU engine, without drawing).
__device__ __forceinline__ void quad_noise(uint64_t seed, uint32_t uid, uint64_t step,
                                           const Op& op, double scale, int64_t q, float z[4]) {
  z[0] = z[1] = z[2] = z[3] = 0.0f;
  if (scale != 0.0)
    normal4(make_key(seed, uid, step, (uint32_t)op.draw), (uint64_t)q, z[0], z[1], z[2], z[3]);
}

// kDevCoef: the coefficients come from device hyperparameters (c.coef), through a copy of the
// ops in shared memory. A separate instantiation, because reading the ops from shared memory
// costs the kernel 7 registers (48 -> 55 for the float32 writing phase, 5 -> 4 blocks per SM),
// which the usual calls, reading the ops from the argument block, should not pay.
template <class P, class M, class T, int kMode, int kCap, bool kDevCoef, bool kMass>
__global__ void __launch_bounds__(kThreads)
    phase_kernel(const __grid_constant__ LaunchArgs<kCap> la) {
  const KCommon& c = la.c;
  if (c.early_exit && *c.flag != 0) return;  // uniform: set by an earlier kernel only

  // The tensor of this block: the last packed tensor whose first block is <= blockIdx.x.
  const int b = (int)blockIdx.x;
  int lo = 0, hi = la.n_t - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (la.t[mid].block_begin <= b) lo = mid;
    else hi = mid - 1;
  }
  const KTensor& kt = la.t[lo];
  const TensorDesc& d = kt.desc;
  const int64_t chunk = b - kt.block_begin;
  const int64_t cbase = (d.offset / kChunk + chunk) * kChunk;
  const int64_t g_lo = d.offset > cbase ? d.offset : cbase;
  const int64_t g_end = d.offset + d.numel;
  const int64_t g_hi = g_end < cbase + kChunk ? g_end : cbase + kChunk;

  __shared__ Op s_ops[kDevCoef ? kMaxOps : 1];
  __shared__ double s_fac[kMaxOps];
  __shared__ double s_warp[kThreads / 32];
  __shared__ int s_bad;

  const uint64_t step = c.step_ptr ? (uint64_t)*c.step_ptr : c.step;

  if (kMode != kCheck) {
    // exp(-xi delta) of every C of the phase for this tensor's segment (and with kDevCoef the
    // phase's letters with the device's coefficients).
    const int o = threadIdx.x;
    if (o < c.n_ops) {
      Op op = c.ops[o];
      if (kDevCoef) {
        op.c[0] = c.coef[3 * o];
        op.c[1] = c.coef[3 * o + 1];
        op.c[2] = c.coef[3 * o + 2];
        s_ops[o] = op;
      }
      if (op.letter == kC) {
        bool overflow;
        s_fac[o] = c_factor(c.xi, c.ws, c.n_seg, op.xi_version, op.c[0], d.seg, sizeof(T) == 8,
                            &overflow);
        if (c.check_cfac && overflow) flag_min(c.flag, d.seg * 4 + kBadThermostat + 1);
      }
    }
  }
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();

  P* __restrict__ theta = (P*)d.theta;
  M* __restrict__ mom = (M*)d.mom;
  const P* __restrict__ grad = (const P*)d.grad;
  const bool has_mom = mom != nullptr;
  const bool check = c.check_data != 0;
  const bool skip_theta = kMode == kSum && c.skip_theta;

  // The adaptive mass of this block's tensor at this step (substeps.h, Mass).
  M* __restrict__ mass = kMass ? (M*)d.mass : nullptr;
  MassStep ms{false, 1.0};
  T mass_beta = (T)0, mass_omb = (T)0, mass_eps = (T)0, mass_bias = (T)1, mass_wd = (T)0;
  bool need_sm = false, need_rs = false;
  if (kMass) {
    const double beta = kDevCoef ? c.coef[kMassCoef] : c.mass_beta;
    const double eps = kDevCoef ? c.coef[kMassCoef + 1] : c.mass_eps;
    const double freeze = kDevCoef ? c.coef[kMassCoef + 2] : c.mass_freeze;
    mass_wd = (T)(kDevCoef ? c.coef[kMassCoef + 3] : c.mass_wd);
    ms = mass_step(beta, freeze, step, d.mass_start);
    mass_beta = (T)beta;
    mass_omb = (T)(1.0 - beta);
    mass_eps = (T)eps;
    mass_bias = (T)ms.bias;
    mass_needs(kDevCoef ? s_ops : c.ops, c.n_ops, &need_sm, &need_rs);
  }

  double acc = 0.0;
  int bad = 0;
  const int64_t q_first = g_lo >> 2, q_last = (g_hi - 1) >> 2;
  for (int64_t q = q_first + threadIdx.x; q <= q_last; q += kThreads) {
    const int64_t gq = q << 2;
    const int l0 = g_lo > gq ? (int)(g_lo - gq) : 0;
    const int l1 = g_hi < gq + 4 ? (int)(g_hi - gq) : 4;
    const int64_t i0 = gq - d.offset;  // local index of lane 0 (>= -3)

    P rt[4], rg[4];
    if (skip_theta) {
#pragma unroll
      for (int l = 0; l < 4; ++l) rt[l] = P{};
    } else {
      load_quad(theta + i0, l0, l1, rt);
    }
    load_quad(grad + i0, l0, l1, rg);
    T th[4], gr[4], pm[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      th[l] = to_compute<T>(rt[l]);
      gr[l] = to_compute<T>(rg[l]);
      pm[l] = (T)0;
    }
    if (kMode == kCheck) {
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (l >= l0 && l < l1)
          bad |= (nonfinite_bits(gr[l]) ? 1 << kBadGrad : 0) |
                 (nonfinite_bits(th[l]) ? 1 << kBadParam : 0);
      continue;
    }
    if (has_mom) {
      M rp[4];
      load_quad(mom + i0, l0, l1, rp);
#pragma unroll
      for (int l = 0; l < 4; ++l) pm[l] = (T)rp[l];
    }
    if (check) {
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (l >= l0 && l < l1)
          bad |= (nonfinite_bits(gr[l]) ? 1 << kBadGrad : 0) |
                 (nonfinite_bits(th[l]) ? 1 << kBadParam : 0) |
                 (has_mom && nonfinite_bits(pm[l]) ? 1 << kBadMom : 0);
    }

    T vq[4], inv[4], sm[4], rs[4];
    if (kMass) {
      M rv[4];
      load_quad(mass + i0, l0, l1, rv);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        vq[l] = (T)rv[l];
        if (ms.update) vq[l] = mass_update(vq[l], gr[l], th[l], mass_wd, mass_beta, mass_omb);
        mass_factors(vq[l], mass_bias, mass_eps, need_sm, need_rs, &inv[l], &sm[l], &rs[l]);
      }
    }

    float z[4];
    auto noise = [&](const Op& op, double scale) -> const float* {
      quad_noise(c.seed, d.uid, step, op, scale, q, z);
      return z;
    };
    interpret<4, kMass>(kDevCoef ? s_ops : c.ops, c.n_ops, 4, th, pm, gr, s_fac, skip_theta,
                        noise, MassFactors<T>{inv, sm, rs});

    if (kMode == kSum) {
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (l >= l0 && l < l1)
          acc += kMass ? (double)pm[l] * (double)pm[l] * (double)inv[l]
                       : (double)pm[l] * (double)pm[l];
    } else {
      P st[4];
      quad_to_storage(th, st, c.stochastic != 0, make_key(c.seed, d.uid, step, kRoundingDraw),
                      (uint64_t)q);
      store_quad(theta + i0, l0, l1, st);
      if (has_mom) {
        M sp[4];
#pragma unroll
        for (int l = 0; l < 4; ++l) sp[l] = (M)pm[l];
        store_quad(mom + i0, l0, l1, sp);
      }
      if (kMass && ms.update) {
        M sv[4];
#pragma unroll
        for (int l = 0; l < 4; ++l) sv[l] = (M)vq[l];
        store_quad(mass + i0, l0, l1, sv);
      }
    }
  }

  if (kMode == kSum) {
    const double total = block_sum(acc, s_warp);
    if (threadIdx.x == 0) c.partials[kt.slot_base + chunk] = total;
  }
  if (kMode == kCheck || check) {
    if (bad) atomicOr(&s_bad, bad);
    __syncthreads();
    if (threadIdx.x == 0 && s_bad) {
      const int kind = __ffs(s_bad) - 1;
      flag_min(c.flag, kt.tidx * 4 + kind + 1);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Segment kernel: one block; warp w handles segments w, w + kSegWarps, ...

template <int kCap>
__global__ void __launch_bounds__(kSegThreads) seg_kernel(const __grid_constant__ SegArgs<kCap> a) {
  const SegHeader& h = a.h;
  __shared__ int s_prior, s_min;
  if (threadIdx.x == 0) {
    s_prior = h.flag ? *h.flag : 0;
    s_min = INT_MAX;
  }
  __syncthreads();
  if (s_prior != 0) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n_seg = h.n_seg;
  for (int i = warp; i < h.count; i += kSegWarps) {
    const int s = h.s0 + i;
    const SegEntry& e = a.e[i];
    const int64_t sum_at = (int64_t)(h.n_e + h.k) * n_seg + s;  // ws row of E k's sums
    if (h.mode & kSegFinish) {
      // Eight accumulators per lane keep eight loads in flight; a fixed order all the same.
      double a8[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
      int64_t j = (int64_t)e.lo + lane;
      for (; j + 7 * 32 < e.hi; j += 8 * 32) {
#pragma unroll
        for (int u = 0; u < 8; ++u) a8[u] += h.partials[j + u * 32];
      }
#pragma unroll
      for (int u = 0; u < 7; ++u)
        if (j + u * 32 < e.hi) a8[u] += h.partials[j + u * 32];
      double acc = ((a8[0] + a8[1]) + (a8[2] + a8[3])) + ((a8[4] + a8[5]) + (a8[6] + a8[7]));
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xFFFFFFFFu, acc, o);
      if (lane == 0) h.ws[sum_at] = acc;
    }
    if (lane == 0) {
      bool bad = false;
      if (h.mode & kSegUpdate) {
        const double e_c0 = h.coef ? h.coef[3 * h.e_op] : h.e_c0;
        const double e_c1 = h.coef ? h.coef[3 * h.e_op + 1] : h.e_c1;
        const double sum = h.ws[sum_at];
        const double from = xi_version(h.xi, h.ws, h.n_seg, h.k, s);
        const double to = thermostat_E(from, sum, e.n, e_c0, e_c1);
        h.ws[(int64_t)h.k * n_seg + s] = to;
        bad = nonfinite_bits(sum) || nonfinite_bits(to);
      }
      if ((h.mode & kSegCheck) && e.present) {
        for (int o = 0; o < h.n_cops; ++o) {
          const double delta = h.coef ? h.coef[3 * h.cop_op[o]] : h.cop_c0[o];
          bool overflow;
          c_factor(h.xi, h.ws, h.n_seg, h.cop_ver[o], delta, s, h.compute_double != 0,
                   &overflow);
          bad = bad || overflow;
        }
      }
      if (bad) atomicMin(&s_min, s);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && h.flag && s_min != INT_MAX)
    flag_min(h.flag, s_min * 4 + kBadThermostat + 1);
}

// The coefficients of op threadIdx.x from the hyperparameters in device memory (substeps.h).
__global__ void coef_kernel(const __grid_constant__ CoefArgs a) {
  const int o = threadIdx.x;
  const Hyper h{a.hyper[0], a.hyper[1], a.hyper[2], a.hyper[3], a.hyper[4],
                a.hyper[5], a.hyper[6], a.hyper[7], a.hyper[8]};
  if (o == 0) {  // the mass's settings (kMassCoef)
    a.out[kMassCoef] = h.mass_beta;
    a.out[kMassCoef + 1] = h.mass_eps;
    a.out[kMassCoef + 2] = h.mass_freeze;
    a.out[kMassCoef + 3] = a.grad_sign * h.weight_decay;
  }
  if (o >= a.n_ops) return;
  letter_coefficients(a.letter[o], a.factor[o] * h.lr, h, a.out + 3 * o, a.grad_sign);
}

__global__ void commit_kernel(double* xi, const double* ws, int n_seg, int n_e,
                              const int32_t* flag) {
  if (flag && *flag != 0) return;
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s < n_seg) xi[s] = ws[(int64_t)(n_e - 1) * n_seg + s];
}

__global__ void normal_kernel(float* __restrict__ out, int64_t n, NoiseKey k, int64_t offset) {
  const int64_t q_first = offset >> 2, q_last = (offset + n - 1) >> 2;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t q = q_first + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; q <= q_last;
       q += stride) {
    float z[4];
    normal4(k, (uint64_t)q, z[0], z[1], z[2], z[3]);
    const int64_t gq = q << 2;
    const int l0 = offset > gq ? (int)(offset - gq) : 0;
    const int l1 = offset + n < gq + 4 ? (int)(offset + n - gq) : 4;
    store_quad(out + (gq - offset), l0, l1, z);
  }
}

// ----------------------------------------------------------------------------------------------
// Host side.

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("thermo_ext CUDA engine: launching ") + what +
                             " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

void check_call(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("thermo_ext CUDA engine: ") + what + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

// The CUDA version the driver supports (cudaDriverGetVersion: 12080 is 12.8), 0 without one.
int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
  cudaGetLastError();
  return v;
}

std::string version_str(int v) {
  return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
}

// The oldest Linux driver of each CUDA major version (NVIDIA's CUDA toolkit release notes,
// minor version compatibility), for the error message.
const char* min_driver(int major) {
  switch (major) {
    case 11: return "450.80.02";
    case 12: return "525.60.13";
    case 13: return "580.65.06";
    default: return nullptr;
  }
}

// The runtime is linked statically, so it is the toolkit's that built the module (CUDART_VERSION);
// a driver of an older CUDA major version cannot run it (cudaErrorInsufficientDriver at the first
// call). Checked at the first use of the engine, before any other CUDA call, to say why and how
// to fix it.
void require_driver() {
  static const std::string problem = []() -> std::string {
    const int drv = driver_version();
    const int rt = CUDART_VERSION;
    if (drv == 0)
      return "thermo_ext CUDA engine: no NVIDIA driver was found (cudaDriverGetVersion reports "
             "none), so CUDA tensors cannot be stepped on this machine";
    if (drv / 1000 >= rt / 1000) return "";
    const char* need = min_driver(rt / 1000);
    return "thermo_ext CUDA engine: this build uses CUDA " + version_str(rt) +
           ", which needs an NVIDIA driver for CUDA " + std::to_string(rt / 1000) + ".x" +
           (need ? std::string(" (>= ") + need + ")" : std::string()) +
           ", but the installed driver supports CUDA " + version_str(drv) +
           ". Update the driver, or rebuild thermo_ext with the CUDA " +
           std::to_string(drv / 1000) + " toolkit (the major version of torch.version.cuda): "
           "pip install --no-build-isolation "
           "-C cmake.define.THERMO_EXT_CUDA_HOME=/usr/local/cuda-" +
           std::to_string(drv / 1000) + ".<minor> thermo_ext";
  }();
  if (!problem.empty()) throw std::runtime_error(problem);
}

// Whether launches may use the 32 KB parameter layout: compiled in and a driver >= R530
// (CUDA 12.1). cuda_param_layout can force the 4 KB one.
std::mutex g_layout_mutex;
int g_large_params = -1;  // -1: not decided yet

bool large_params_supported() { return TE_CUDA_LARGE_PARAMS && driver_version() >= 12010; }

bool large_params() {
  std::lock_guard<std::mutex> lock(g_layout_mutex);
  if (g_large_params < 0) g_large_params = large_params_supported() ? 1 : 0;
  return g_large_params != 0;
}

// cuDevicePrimaryCtxGetState through the runtime's driver entry point: the module does not link
// libcuda. Null when the driver does not give it.
using PrimaryCtxGetState = int (*)(int device, unsigned int* flags, int* active);
PrimaryCtxGetState primary_ctx_get_state() {
  static const PrimaryCtxGetState fn = []() -> PrimaryCtxGetState {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &p,
                                                             12000, cudaEnableDefault, &found);
#else
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuDevicePrimaryCtxGetState", &p, cudaEnableDefault, &found);
#endif
    cudaGetLastError();
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? (PrimaryCtxGetState)p
                                                                      : nullptr;
  }();
  return fn;
}

// Whether `device` has an active primary context (true when the driver cannot tell: then the
// guard below restores the device as it always did).
bool has_primary_context(int device) {
  const PrimaryCtxGetState fn = primary_ctx_get_state();
  if (!fn) return true;
  unsigned int flags = 0;
  int active = 0;
  return fn(device, &flags, &active) != 0 || active != 0;
}

// Makes `device` current for the scope of a call. Switches only when it is not current already,
// and switches back only where the caller's device has a context: cudaSetDevice would create one
// otherwise (hundreds of MB on a GPU the thread never used), as torch's MaybeSetDevice avoids.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_call(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check_call(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_ && has_primary_context(prev_)) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool switched_ = false;
};

// Chunks of a tensor: kChunk-aligned pieces of its global index range.
int64_t n_chunks(int64_t numel, int64_t offset) {
  if (numel <= 0) return 0;
  return (offset + numel - 1) / kChunk - offset / kChunk + 1;
}

// How a call's elements map to blocks and partial-sum slots: tensors ordered by (segment,
// index), so that each segment's partial slots are contiguous; the same for every step.
struct ChunkLayout {
  std::vector<int32_t> order;
  std::vector<int64_t> chunks;
  std::vector<int32_t> slot_base;
  std::vector<int32_t> seg_lo, seg_hi;
  std::vector<char> present;
  int64_t total_slots = 0;
};

ChunkLayout& build_layout(const StepArgs& a) {
  thread_local ChunkLayout p;
  const int n = a.n_tensors;
  p.order.resize(n);
  p.chunks.resize(n);
  p.slot_base.assign(n, 0);
  for (int t = 0; t < n; ++t) {
    const TensorDesc& d = a.tensors[t];
    if (d.numel < 0 || d.offset < 0)
      throw std::invalid_argument("thermo_ext CUDA engine: tensor " + std::to_string(t) +
                                  ": negative numel or offset");
    if (d.seg < 0 || d.seg >= a.n_seg)
      throw std::invalid_argument("thermo_ext CUDA engine: tensor " + std::to_string(t) +
                                  ": segment out of range");
    p.order[t] = t;
    p.chunks[t] = n_chunks(d.numel, d.offset);
    if (p.chunks[t] > kMaxBlocksPerLaunch)
      throw std::invalid_argument("thermo_ext CUDA engine: tensor " + std::to_string(t) +
                                  " is too large");
  }
  const auto by_seg = [&](int32_t x, int32_t y) { return a.tensors[x].seg < a.tensors[y].seg; };
  if (!std::is_sorted(p.order.begin(), p.order.end(), by_seg))  // usually already in order
    std::stable_sort(p.order.begin(), p.order.end(), by_seg);
  p.seg_lo.assign(a.n_seg, 0);
  p.seg_hi.assign(a.n_seg, 0);
  p.present.assign(a.n_seg, 0);
  int64_t slot = 0;
  int cur = -1;
  for (int32_t t : p.order) {
    const int s = a.tensors[t].seg;
    if (s != cur) {
      for (int x = cur + 1; x <= s; ++x) p.seg_lo[x] = p.seg_hi[x] = (int32_t)slot;
      cur = s;
    }
    p.present[s] = 1;
    if (slot + p.chunks[t] > (int64_t)INT_MAX)
      throw std::invalid_argument("thermo_ext CUDA engine: too many elements in one call");
    p.slot_base[t] = (int32_t)slot;
    slot += p.chunks[t];
    p.seg_hi[s] = (int32_t)slot;
  }
  for (int x = cur + 1; x < a.n_seg; ++x) p.seg_lo[x] = p.seg_hi[x] = (int32_t)slot;
  p.total_slots = slot;
  return p;
}

// Device coefficients (scratch's first kCoefDoubles) when the call has device hyperparameters.
const double* device_coef(const StepArgs& a) { return a.hyper ? a.scratch : nullptr; }

KCommon make_common(const StepArgs& a, int n_ops, int32_t* flag) {
  KCommon c;
  memset(&c, 0, sizeof(c));
  for (int o = 0; o < n_ops; ++o) c.ops[o] = a.prog->ops[o];
  c.n_ops = n_ops;
  c.n_seg = a.n_seg;
  c.seed = a.seed;
  c.step = a.step;
  c.step_ptr = a.step_ptr;
  c.xi = a.xi;
  c.ws = a.ws;
  c.flag = flag;
  c.partials = a.scratch ? a.scratch + kCoefDoubles : nullptr;
  c.coef = device_coef(a);
  c.stochastic = a.stochastic_rounding;
  c.mass_beta = a.prog->mass_beta;
  c.mass_eps = a.prog->mass_eps;
  c.mass_freeze = a.prog->mass_freeze;
  c.mass_wd = a.prog->mass_wd;
  return c;
}

template <class P, class M, class T, int kMode>
void launch_phase_t(const StepArgs& a, const ChunkLayout& layout, const KCommon& common,
                    cudaStream_t st) {
  thread_local LaunchArgs<kMaxT> la;  // 32 KiB: off the stack
  // Device coefficients (capturable steps, whose launches a graph replays cheaply) take only
  // the 4 KB layout: half the instantiations.
  const bool dev_coef = common.coef != nullptr;
  const bool mass = a.prog->mass != 0;  // the adaptive mass: its own instantiations
  const int max_t = large_params() && !dev_coef ? kMaxT : kSmallT;
  la.c = common;
  la.n_t = 0;
  la.pad = 0;
  int64_t blocks = 0;
  auto flush = [&]() {
    if (la.n_t == 0) return;
    if (la.n_t <= kSmallT) {
      LaunchArgs<kSmallT> small;
      small.c = la.c;
      small.n_t = la.n_t;
      small.pad = 0;
      memcpy(small.t, la.t, sizeof(KTensor) * la.n_t);
      bool launched = false;
      if constexpr (kMode != kCheck) {  // a check runs no letters: never device coefficients
        if (dev_coef && mass) {
          phase_kernel<P, M, T, kMode, kSmallT, true, true>
              <<<(unsigned)blocks, kThreads, 0, st>>>(small);
          launched = true;
        } else if (dev_coef) {
          phase_kernel<P, M, T, kMode, kSmallT, true, false>
              <<<(unsigned)blocks, kThreads, 0, st>>>(small);
          launched = true;
        } else if (mass) {
          phase_kernel<P, M, T, kMode, kSmallT, false, true>
              <<<(unsigned)blocks, kThreads, 0, st>>>(small);
          launched = true;
        }
      }
      if (!launched)
        phase_kernel<P, M, T, kMode, kSmallT, false, false>
            <<<(unsigned)blocks, kThreads, 0, st>>>(small);
    } else {
      bool launched = false;
      if constexpr (kMode != kCheck) {
        if (mass) {
          phase_kernel<P, M, T, kMode, kMaxT, false, true><<<(unsigned)blocks, kThreads, 0, st>>>(la);
          launched = true;
        }
      }
      if (!launched)
        phase_kernel<P, M, T, kMode, kMaxT, false, false><<<(unsigned)blocks, kThreads, 0, st>>>(la);
    }
    check_launch("the phase kernel");
    la.n_t = 0;
    blocks = 0;
  };
  for (int32_t t : layout.order) {
    const int64_t nc = layout.chunks[t];
    if (nc == 0) continue;
    if (la.n_t == max_t || blocks + nc > kMaxBlocksPerLaunch) flush();
    const TensorDesc& d = a.tensors[t];
    KTensor& k = la.t[la.n_t++];
    k.desc = d;
    k.tidx = t;
    k.slot_base = layout.slot_base[t];
    k.block_begin = (int32_t)blocks;
    k.pad = 0;
    blocks += nc;
  }
  flush();
}

template <int kMode>
void launch_phase(const StepArgs& a, const ChunkLayout& layout, const KCommon& common,
                  cudaStream_t st) {
  switch (a.dtype) {
    case kFloat32:
      return launch_phase_t<float, float, float, kMode>(a, layout, common, st);
    case kFloat64:
      return launch_phase_t<double, double, double, kMode>(a, layout, common, st);
    case kBFloat16:
      return launch_phase_t<bf16_t, float, float, kMode>(a, layout, common, st);
    case kFloat16:
      return launch_phase_t<fp16_t, float, float, kMode>(a, layout, common, st);
  }
  throw std::invalid_argument("thermo_ext CUDA engine: unknown dtype " + std::to_string(a.dtype));
}

// Runs seg_kernel over all segments in batches (in segment order, so that a later batch that
// skips because an earlier one set the flag loses no smaller code).
void launch_seg(const StepArgs& a, const ChunkLayout* layout, int mode, int k, int next_ops,
                int32_t* flag, cudaStream_t st) {
  const Program& pg = *a.prog;
  thread_local SegArgs<kMaxSegEntries> sa;  // 32 KiB: off the stack
  const int max_entries = large_params() ? kMaxSegEntries : kSmallSegEntries;
  memset(&sa.h, 0, sizeof(sa.h));
  SegHeader& h = sa.h;
  h.mode = mode;
  h.k = k;
  h.n_e = pg.n_e;
  h.n_seg = a.n_seg;
  h.compute_double = a.dtype == kFloat64;
  h.coef = device_coef(a);
  if (mode & kSegUpdate) {
    const Op& e = pg.ops[pg.e_pos[k]];
    h.e_c0 = e.c[0];
    h.e_c1 = e.c[1];
    h.e_op = pg.e_pos[k];
  }
  h.partials = a.scratch ? a.scratch + kCoefDoubles : nullptr;
  h.ws = a.ws;
  h.xi = a.xi;
  h.flag = flag;
  if (mode & kSegCheck)
    for (int o = 0; o < next_ops; ++o)
      if (pg.ops[o].letter == kC) {
        h.cop_c0[h.n_cops] = pg.ops[o].c[0];
        h.cop_ver[h.n_cops] = pg.ops[o].xi_version;
        h.cop_op[h.n_cops] = o;
        ++h.n_cops;
      }
  for (int s0 = 0; s0 < a.n_seg; s0 += max_entries) {
    const int count = std::min(max_entries, a.n_seg - s0);
    h.s0 = s0;
    h.count = count;
    for (int i = 0; i < count; ++i) {
      SegEntry& e = sa.e[i];
      const int s = s0 + i;
      e.n = a.seg_n ? a.seg_n[s] : 0.0;
      e.lo = layout ? layout->seg_lo[s] : 0;
      e.hi = layout ? layout->seg_hi[s] : 0;
      e.present = layout ? layout->present[s] : 0;
      e.pad = 0;
    }
    if (count <= kSmallSegEntries) {
      SegArgs<kSmallSegEntries> small;
      small.h = sa.h;
      memcpy(small.e, sa.e, sizeof(SegEntry) * count);
      seg_kernel<kSmallSegEntries><<<1, kSegThreads, 0, st>>>(small);
    } else {
      seg_kernel<kMaxSegEntries><<<1, kSegThreads, 0, st>>>(sa);
    }
    check_launch("the segment kernel");
  }
}

// The program's coefficients from the device hyperparameters, into scratch (device_coef).
void launch_coef(const StepArgs& a, cudaStream_t st) {
  const Program& pg = *a.prog;
  CoefArgs c;
  memset(&c, 0, sizeof(c));
  c.n_ops = pg.n_ops;
  for (int o = 0; o < pg.n_ops; ++o) {
    c.letter[o] = pg.ops[o].letter;
    c.factor[o] = pg.factor[o];
  }
  c.grad_sign = pg.grad_sign;
  c.hyper = a.hyper;
  c.out = a.scratch;
  coef_kernel<<<1, 32, 0, st>>>(c);
  check_launch("the coefficient kernel");
}

bool has_letter(const Program& pg, int n_ops, int letter) {
  for (int o = 0; o < n_ops; ++o)
    if (pg.ops[o].letter == letter) return true;
  return false;
}

int phase_ops(const Program& pg, int k) { return k == pg.n_e ? pg.n_ops : pg.e_pos[k]; }

// Sum phase k < n_e. fused: the segment kernel also applies the E and checks the next phase's
// factors (a whole step or its "pre" half); else the sums stay in ws for the sum hook, the E
// runs afterwards (update_xi), and this phase's factors are checked here (k > 0: the previous
// phase's E did not check them).
void sum_phase(const StepArgs& a, const ChunkLayout& layout, int k, bool fused, int check,
               int32_t* flag, cudaStream_t st) {
  const Program& pg = *a.prog;
  const int n_ops = phase_ops(pg, k);
  KCommon c = make_common(a, n_ops, flag);
  if (k == 0) {
    // The first sum pass checks the data and this phase's factors itself; it never skips.
    c.check_data = check && flag;
    c.check_cfac = flag != nullptr;
  } else {
    if (!fused && flag && has_letter(pg, n_ops, kC))
      launch_seg(a, &layout, kSegCheck, k, n_ops, flag, st);
    c.early_exit = flag != nullptr;
  }
  c.skip_theta = !sum_reads_theta(pg, n_ops, c.check_data != 0);
  launch_phase<kSum>(a, layout, c, st);
  int mode = kSegFinish, next_ops = 0;
  if (fused) {
    mode |= kSegUpdate;
    next_ops = phase_ops(pg, k + 1);
    if (flag && has_letter(pg, next_ops, kC)) mode |= kSegCheck;
  }
  launch_seg(a, &layout, mode, k, next_ops, flag, st);
}

// The E number k after the sum hook reduced its sums.
void update_xi(const StepArgs& a, int k, int32_t* flag, cudaStream_t st) {
  launch_seg(a, nullptr, kSegUpdate, k, 0, flag, st);
}

// What can fail before the writing phase that the sum phases did not already check: for a
// scheme without E the read-only check of theta and g (the CPU engine's order: data first),
// then the factors of the writing phase's C letters.
void write_checks(const StepArgs& a, const ChunkLayout& layout, bool check_data,
                  bool check_factors, int32_t* flag, cudaStream_t st) {
  if (!flag) return;
  const Program& pg = *a.prog;
  if (check_data) {
    KCommon c = make_common(a, 0, flag);
    c.check_data = 1;
    c.coef = nullptr;  // no letters run
    launch_phase<kCheck>(a, layout, c, st);
  }
  if (check_factors && has_letter(pg, pg.n_ops, kC))
    launch_seg(a, &layout, kSegCheck, pg.n_e, pg.n_ops, flag, st);
}

// The writing phase (skipped on the device when the flag is set), then xi = version n_e.
void write_phase(const StepArgs& a, const ChunkLayout& layout, int32_t* flag, cudaStream_t st) {
  const Program& pg = *a.prog;
  KCommon c = make_common(a, pg.n_ops, flag);
  c.early_exit = flag != nullptr;
  launch_phase<kWrite>(a, layout, c, st);
  if (pg.n_e > 0) {
    const int threads = 256;
    commit_kernel<<<(a.n_seg + threads - 1) / threads, threads, 0, st>>>(a.xi, a.ws, a.n_seg,
                                                                       pg.n_e, flag);
    check_launch("the xi commit kernel");
  }
}

void validate(const StepArgs& a, int mode) {
  if (!a.prog) throw std::invalid_argument("thermo_ext CUDA engine: no program");
  const Program& pg = *a.prog;
  if (pg.n_ops < 0 || pg.n_ops > kMaxOps || pg.n_e < 0 || pg.n_e > pg.n_ops)
    throw std::invalid_argument("thermo_ext CUDA engine: malformed program");
  if (mode != kRunAll && mode != kRunPre && mode != kRunFinish)
    throw std::invalid_argument("thermo_ext CUDA engine: unknown mode " + std::to_string(mode));
  if (a.n_tensors < 0 || (a.n_tensors > 0 && !a.tensors))
    throw std::invalid_argument("thermo_ext CUDA engine: no tensors");
  if (a.n_seg < 1) throw std::invalid_argument("thermo_ext CUDA engine: n_seg must be >= 1");
  const bool thermostat = pg.n_e > 0 || has_letter(pg, pg.n_ops, kC);
  if (thermostat && !a.xi) throw std::invalid_argument("thermo_ext CUDA engine: xi is null");
  if (pg.n_e > 0 && (!a.ws || !a.seg_n))
    throw std::invalid_argument("thermo_ext CUDA engine: ws or seg_n is null");
  if (a.hyper && !pg.has_factors)
    throw std::invalid_argument(
        "thermo_ext CUDA engine: device hyperparameters need a program built from letters and "
        "hyperparameters (its factors), not from coefficients");
}

}  // namespace

bool cuda_compiled() { return true; }

int64_t cuda_scratch_doubles(const int64_t* numels, int n) {
  // A tensor of numel elements at any offset spans at most numel / kChunk + 2 chunks.
  int64_t total = kCoefDoubles + 1;
  for (int i = 0; i < n; ++i)
    if (numels[i] > 0) total += (numels[i] + kChunk - 1) / kChunk + 1;
  return total;
}

void cuda_versions(int* driver, int* runtime) {
  *driver = driver_version();
  *runtime = CUDART_VERSION;
}

bool cuda_param_layout(int large) {
  std::lock_guard<std::mutex> lock(g_layout_mutex);
  if (large > 0 && !large_params_supported())
    throw std::invalid_argument(
        "large: the 32 KB kernel-parameter layout needs a build with CUDA >= 12.1 and a driver "
        ">= R530 (CUDA 12.1)");
  if (large >= 0) g_large_params = large;
  if (g_large_params < 0) g_large_params = large_params_supported() ? 1 : 0;
  return g_large_params != 0;
}

std::string cuda_build_info() {
  std::string s = "archs=";
#if defined(TE_CUDA_ARCHS)
  s += TE_CUDA_ARCHS;
#elif defined(__CUDA_ARCH_LIST__)
#define TE_STR2(...) #__VA_ARGS__
#define TE_STR(...) TE_STR2(__VA_ARGS__)
  s += TE_STR(__CUDA_ARCH_LIST__);
#else
  s += "?";
#endif
  const int drv = driver_version();
  s += " runtime=" + version_str(CUDART_VERSION);
  s += " driver=" + (drv ? version_str(drv) : std::string("none"));
  s += " chunk=" + std::to_string(kChunk) + " tensors_per_launch=" + std::to_string(kSmallT) +
       "/" + std::to_string(kMaxT);
  return s;
}

int cuda_run(const StepArgs& a, int device, intptr_t stream, int mode, int check,
             int32_t* flag) {
  validate(a, mode);
  const Program& pg = *a.prog;
  const int n_e = pg.n_e;
  ChunkLayout& layout = build_layout(a);
  const bool any_sum = mode != kRunFinish && n_e > 0;
  const int64_t need = any_sum ? kCoefDoubles + layout.total_slots : (a.hyper ? kCoefDoubles : 0);
  if (need > 0 && (!a.scratch || a.scratch_len < need))
    throw std::invalid_argument(
        "thermo_ext CUDA engine: scratch has " + std::to_string(a.scratch ? a.scratch_len : 0) +
        " doubles, this call needs " + std::to_string(need) +
        " (allocate cuda_scratch_doubles(numels))");

  require_driver();
  DeviceGuard guard(device);
  cudaStream_t st = (cudaStream_t)stream;
  if (a.hyper) launch_coef(a, st);
  if (mode != kRunFinish) {
    if (!a.sum_hook) {
      for (int k = 0; k < n_e; ++k) sum_phase(a, layout, k, true, check, flag, st);
      if (n_e == 0) write_checks(a, layout, check != 0, true, flag, st);
    } else {
      // Distributed: each E's partial sums, reduced by the hook, then the E. The hook runs on
      // every rank whatever the flag says (the kernels skip), so the collectives stay matched.
      for (int k = 0; k < n_e; ++k) {
        sum_phase(a, layout, k, false, check, flag, st);
        a.sum_hook->fn(a.sum_hook->ctx, k);
        update_xi(a, k, flag, st);
      }
      write_checks(a, layout, check != 0 && n_e == 0, true, flag, st);
    }
  }
  if (mode != kRunPre) write_phase(a, layout, flag, st);
  return -1;
}

void cuda_fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,
                      uint32_t draw, int64_t offset, int device, intptr_t stream) {
  if (n < 0 || offset < 0)
    throw std::invalid_argument("thermo_ext CUDA engine: fill_normal: negative n or offset");
  if (n == 0) return;
  require_driver();
  DeviceGuard guard(device);
  const int64_t quads = ((offset + n - 1) >> 2) - (offset >> 2) + 1;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((quads + threads - 1) / threads, 1 << 16);
  normal_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(
      out, n, make_key(seed, uid, step, draw), offset);
  check_launch("the normal kernel");
}

int cuda_runtime_version() { return CUDART_VERSION; }

// Whether the kernels can run on `device`: the runtime finds an image for its architecture
// (SASS, or PTX the driver compiles) or says which error it met (cudaErrorNoKernelImageForDevice,
// cudaErrorUnsupportedPtxVersion, ...). The loader asks before the first step on a device.
void cuda_probe(int device) {
  require_driver();
  DeviceGuard guard(device);
  cudaFuncAttributes attr;
  check_call(cudaFuncGetAttributes(&attr, normal_kernel),
             "looking up the kernels' image for this GPU (cudaFuncGetAttributes)");
}

}  // namespace te
