// The CUDA engine: multi-tensor fused kernels with deterministic segment reductions.
//
// Semantics are those of the CPU engine (csrc/cpu/engine_impl.h, engine_cpu.cpp); the element
// math and the noise come from the same headers (substeps.h, philox.h, lowp.h), compiled with
// --fmad=false, so a CUDA thread computes the bits a CPU lane computes.
//
// Organisation
// * phase_kernel<P, M, T, Mode, Cap>: one kernel for every dtype and three modes: kSum (a
//   read-only phase ending in an E: letters, then sum p^2 of each chunk into scratch), kWrite
//   (all letters, store theta and p) and kCheck (the read-only non-finite check of theta and g
//   that precedes a scheme without E). The letters are interpreted from the program in the
//   arguments. Tensors are packed into the kernel's arguments by value (as torch's
//   multi_tensor_apply does): up to 42 in a 4 KiB argument block, up to 490 in the 32764-byte
//   parameter space of CUDA 12.1+ (Volta and newer); a call with more tensors than fit takes
//   several launches. 64-bit element indices throughout. Each block handles one chunk of kChunk
//   elements, aligned in *global* index (tensor offset + local index), so that every thread
//   handles whole global quads: one Philox call gives the four normals of a quad (DESIGN.md §3).
//   Blocks find their tensor by binary search over the packed tensors' first block.
// * seg_kernel: a single block per launch, one warp per segment: adds the chunk partials of a
//   segment in a fixed order (FINISH), applies the thermostat E (UPDATE), and checks the
//   exp(-xi delta) factors of the next phase (CHECK). Fixed blocking everywhere, no float
//   atomics: a run is bitwise repeatable.
// * commit_kernel: xi = version n_e after the writing phase.
// * normal_kernel: the noise stream as a tensor (fill_normal).
//
// Phases: cuda_run(phase = -1) runs a whole step; -2 its "pre" half (everything that can fail:
// the checks, the sum phases and the xi versions in ws, the factors of the writing phase) and
// n_e its writing half; 0 <= phase < n_e one sum phase of a distributed step (cuda_update_xi
// applies the E between them).
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
#include <stdexcept>
#include <string>
#include <vector>

#include "../engine.h"
#include "../lowp.h"
#include "../philox.h"
#include "../substeps.h"
#include "cuda_engine.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "thermo_ext's CUDA engine needs sm_70 or newer (large kernel parameters)"
#endif

namespace te {

namespace {

constexpr int kThreads = 256;             // threads of a phase block
constexpr int64_t kChunk = 8192;          // elements of a block's chunk; multiple of 4
constexpr int kSegThreads = 512;          // threads of the single seg_kernel block
constexpr int kSegWarps = kSegThreads / 32;
constexpr int64_t kMaxBlocksPerLaunch = INT_MAX;

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
static_assert(sizeof(KTensor) == 64, "KTensor layout");

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
  int32_t stochastic;
  int32_t check_data;  // set the flag for non-finite theta/g(/p)
  int32_t check_cfac;  // set the flag for a non-finite exp(-xi delta)
  int32_t early_exit;  // do nothing when *flag != 0 (only where no block of this kernel sets it)
  int32_t skip_theta;  // kSum: theta unread and A undone (substeps.h: sum_reads_theta)
  int32_t pad;
};

// Two sizes of every kernel's arguments: up to the 32764-byte limit of CUDA 12.1+ (Volta and
// newer), and within the classic 4096 bytes, which launches cheaper (the driver copies the whole
// argument block with every launch) and serves the common calls with few tensors.
constexpr int kParamLimit = 32764;
constexpr int kSmallParams = 4096;
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
  int32_t n_cops;
  int32_t compute_double;  // float64 parameters: C factors need only fit a double
  double cop_c0[kMaxOps];  // the next phase's C letters: delta and xi version
  int32_t cop_ver[kMaxOps];
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

// theta's storage from the compute value, as the CPU engine's store_theta.
__device__ __forceinline__ void to_storage(const float th[4], float out[4], bool, const NoiseKey&,
                                           uint64_t) {
#pragma unroll
  for (int l = 0; l < 4; ++l) out[l] = th[l];
}
__device__ __forceinline__ void to_storage(const double th[4], double out[4], bool,
                                           const NoiseKey&, uint64_t) {
#pragma unroll
  for (int l = 0; l < 4; ++l) out[l] = th[l];
}
__device__ __forceinline__ void to_storage(const float th[4], fp16_t out[4], bool,
                                           const NoiseKey&, uint64_t) {
#pragma unroll
  for (int l = 0; l < 4; ++l) out[l] = fp16_round_nearest(th[l]);
}
__device__ __forceinline__ void to_storage(const float th[4], bf16_t out[4], bool stochastic,
                                           const NoiseKey& k, uint64_t quad) {
  if (stochastic) {
    // rounding_bits(k, g) for the four elements of the quad: word (g mod 4) of one Philox call.
    uint32_t w0 = (uint32_t)quad, w1 = k.uid, w2 = k.step, w3 = k.draw;
    philox4x32_10(w0, w1, w2, w3, k.k0, k.k1);
    out[0] = bf16_round_stochastic(th[0], w0 >> 16);
    out[1] = bf16_round_stochastic(th[1], w1 >> 16);
    out[2] = bf16_round_stochastic(th[2], w2 >> 16);
    out[3] = bf16_round_stochastic(th[3], w3 >> 16);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = bf16_round_nearest(th[l]);
  }
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

__device__ __forceinline__ double xi_version_dev(const double* xi, const double* ws, int n_seg,
                                                 int v, int s) {
  return v == 0 ? xi[s] : ws[(int64_t)(v - 1) * n_seg + s];
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

// The normals of elements 4q .. 4q+3 for a noise letter; zeros when its coefficient is 0 (the same
// bits as the CPU engine, without drawing).
__device__ __forceinline__ void quad_noise(uint64_t seed, uint32_t uid, uint64_t step,
                                           const Op& op, double coef, int64_t q, float z[4]) {
  z[0] = z[1] = z[2] = z[3] = 0.0f;
  if (coef != 0.0)
    normal4(make_key(seed, uid, step, (uint32_t)op.draw), (uint64_t)q, z[0], z[1], z[2], z[3]);
}

template <class P, class M, class T, int kMode, int kCap>
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

  __shared__ double s_fac[kMaxOps];
  __shared__ double s_warp[kThreads / 32];
  __shared__ int s_bad;

  const uint64_t step = c.step_ptr ? (uint64_t)*c.step_ptr : c.step;

  if (kMode != kCheck) {
    // exp(-xi delta) of every C of the phase for this tensor's segment.
    const int o = threadIdx.x;
    if (o < c.n_ops && c.ops[o].letter == kC) {
      const double x = xi_version_dev(c.xi, c.ws, c.n_seg, c.ops[o].xi_version, d.seg);
      const double f = exp(-x * c.ops[o].c[0]);
      s_fac[o] = f;
      if (c.check_cfac && factor_overflows(f, sizeof(T) == 8)) flag_min(c.flag, d.seg * 4 + kBadThermostat + 1);
    }
  }
  if (threadIdx.x == 0) s_bad = 0;
  __syncthreads();

  P* __restrict__ theta = (P*)d.theta;
  M* __restrict__ mom = (M*)d.mom;
  const P* __restrict__ grad = (const P*)d.grad;
  const bool has_mom = mom != nullptr;
  const bool check = c.check_data != 0;

  double acc = 0.0;
  int bad = 0;
  const int64_t q_first = g_lo >> 2, q_last = (g_hi - 1) >> 2;
  for (int64_t q = q_first + threadIdx.x; q <= q_last; q += kThreads) {
    const int64_t gq = q << 2;
    const int l0 = g_lo > gq ? (int)(g_lo - gq) : 0;
    const int l1 = g_hi < gq + 4 ? (int)(g_hi - gq) : 4;
    const int64_t i0 = gq - d.offset;  // local index of lane 0 (>= -3)

    P rt[4], rg[4];
    const bool skip_theta = kMode == kSum && c.skip_theta;
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

#pragma unroll 1
    for (int o = 0; o < c.n_ops; ++o) {
      const Op& op = c.ops[o];
      const T c0 = (T)op.c[0], c1 = (T)op.c[1];
      switch (op.letter) {
        case kA:
          if (skip_theta) break;
#pragma unroll
          for (int l = 0; l < 4; ++l) th[l] = letter_A(th[l], pm[l], c0);
          break;
        case kB:
#pragma unroll
          for (int l = 0; l < 4; ++l) pm[l] = letter_B(pm[l], th[l], gr[l], c0, c1);
          break;
        case kO: {
          float z[4];
          quad_noise(c.seed, d.uid, step, op, op.c[1], q, z);
#pragma unroll
          for (int l = 0; l < 4; ++l) pm[l] = letter_O(pm[l], (T)z[l], c0, c1);
          break;
        }
        case kC: {
          const T f = (T)s_fac[o];
#pragma unroll
          for (int l = 0; l < 4; ++l) pm[l] = letter_C(pm[l], f);
          break;
        }
        case kD: {
          float z[4];
          quad_noise(c.seed, d.uid, step, op, op.c[0], q, z);
#pragma unroll
          for (int l = 0; l < 4; ++l) pm[l] = letter_D(pm[l], (T)z[l], c0);
          break;
        }
        case kV: {
          const T c2 = (T)op.c[2];
          float z[4];
          quad_noise(c.seed, d.uid, step, op, op.c[2], q, z);
#pragma unroll
          for (int l = 0; l < 4; ++l) th[l] = letter_V(th[l], gr[l], (T)z[l], c0, c1, c2);
          break;
        }
        default:  // E: only xi moves, between phases
          break;
      }
    }

    if (kMode == kSum) {
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (l >= l0 && l < l1) acc += (double)pm[l] * (double)pm[l];
    } else {
      P st[4];
      to_storage(th, st, c.stochastic != 0, make_key(c.seed, d.uid, step, kRoundingDraw),
                 (uint64_t)q);
      store_quad(theta + i0, l0, l1, st);
      if (has_mom) {
        M sp[4];
#pragma unroll
        for (int l = 0; l < 4; ++l) sp[l] = (M)pm[l];
        store_quad(mom + i0, l0, l1, sp);
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
        const double sum = h.ws[sum_at];
        const double from = xi_version_dev(h.xi, h.ws, h.n_seg, h.k, s);
        const double to = thermostat_E(from, sum, e.n, h.e_c0, h.e_c1);
        h.ws[(int64_t)h.k * n_seg + s] = to;
        bad = nonfinite_bits(sum) || nonfinite_bits(to);
      }
      if ((h.mode & kSegCheck) && e.present) {
        for (int o = 0; o < h.n_cops; ++o) {
          const double x = xi_version_dev(h.xi, h.ws, h.n_seg, h.cop_ver[o], s);
          bad = bad || factor_overflows(exp(-x * h.cop_c0[o]), h.compute_double != 0);
        }
      }
      if (bad) atomicMin(&s_min, s);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && h.flag && s_min != INT_MAX)
    flag_min(h.flag, s_min * 4 + kBadThermostat + 1);
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

// Sets the device for the scope of a call and restores the caller's afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_call(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check_call(cudaSetDevice(device), "cudaSetDevice");
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// Chunks of a tensor: kChunk-aligned pieces of its global index range.
int64_t n_chunks(int64_t numel, int64_t offset) {
  if (numel <= 0) return 0;
  return (offset + numel - 1) / kChunk - offset / kChunk + 1;
}

// The fixed decomposition of a call: tensors ordered by (segment, index), so that each segment's
// partial slots are contiguous.
struct Plan {
  std::vector<int32_t> order;
  std::vector<int64_t> chunks;
  std::vector<int32_t> slot_base;
  std::vector<int32_t> seg_lo, seg_hi;
  std::vector<char> present;
  int64_t total_slots = 0;
};

Plan& build_plan(const StepArgs& a) {
  thread_local Plan p;
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
  c.partials = a.scratch;
  c.stochastic = a.stochastic_rounding;
  return c;
}

template <class P, class M, class T, int kMode>
void launch_phase_t(const StepArgs& a, const Plan& plan, const KCommon& common,
                    cudaStream_t st) {
  thread_local LaunchArgs<kMaxT> la;  // 32 KiB: off the stack
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
      phase_kernel<P, M, T, kMode, kSmallT><<<(unsigned)blocks, kThreads, 0, st>>>(small);
    } else {
      phase_kernel<P, M, T, kMode, kMaxT><<<(unsigned)blocks, kThreads, 0, st>>>(la);
    }
    check_launch("the phase kernel");
    la.n_t = 0;
    blocks = 0;
  };
  for (int32_t t : plan.order) {
    const int64_t nc = plan.chunks[t];
    if (nc == 0) continue;
    if (la.n_t == kMaxT || blocks + nc > kMaxBlocksPerLaunch) flush();
    const TensorDesc& d = a.tensors[t];
    KTensor& k = la.t[la.n_t++];
    k.desc = d;
    k.tidx = t;
    k.slot_base = plan.slot_base[t];
    k.block_begin = (int32_t)blocks;
    k.pad = 0;
    blocks += nc;
  }
  flush();
}

template <int kMode>
void launch_phase(const StepArgs& a, const Plan& plan, const KCommon& common, cudaStream_t st) {
  switch (a.dtype) {
    case kFloat32:
      return launch_phase_t<float, float, float, kMode>(a, plan, common, st);
    case kFloat64:
      return launch_phase_t<double, double, double, kMode>(a, plan, common, st);
    case kBFloat16:
      return launch_phase_t<bf16_t, float, float, kMode>(a, plan, common, st);
    case kFloat16:
      return launch_phase_t<fp16_t, float, float, kMode>(a, plan, common, st);
  }
  throw std::invalid_argument("thermo_ext CUDA engine: unknown dtype " + std::to_string(a.dtype));
}

// Runs seg_kernel over all segments in batches (in segment order, so that a later batch that
// skips because an earlier one set the flag loses no smaller code).
void launch_seg(const StepArgs& a, const Plan* plan, int mode, int k, int next_ops,
                int32_t* flag, cudaStream_t st) {
  const Program& pg = *a.prog;
  thread_local SegArgs<kMaxSegEntries> sa;  // 32 KiB: off the stack
  memset(&sa.h, 0, sizeof(sa.h));
  SegHeader& h = sa.h;
  h.mode = mode;
  h.k = k;
  h.n_e = pg.n_e;
  h.n_seg = a.n_seg;
  h.compute_double = a.dtype == kFloat64;
  if (mode & kSegUpdate) {
    const Op& e = pg.ops[pg.e_pos[k]];
    h.e_c0 = e.c[0];
    h.e_c1 = e.c[1];
  }
  h.partials = a.scratch;
  h.ws = a.ws;
  h.xi = a.xi;
  h.flag = flag;
  if (mode & kSegCheck)
    for (int o = 0; o < next_ops; ++o)
      if (pg.ops[o].letter == kC) {
        h.cop_c0[h.n_cops] = pg.ops[o].c[0];
        h.cop_ver[h.n_cops] = pg.ops[o].xi_version;
        ++h.n_cops;
      }
  for (int s0 = 0; s0 < a.n_seg; s0 += kMaxSegEntries) {
    const int count = std::min(kMaxSegEntries, a.n_seg - s0);
    h.s0 = s0;
    h.count = count;
    for (int i = 0; i < count; ++i) {
      SegEntry& e = sa.e[i];
      const int s = s0 + i;
      e.n = a.seg_n ? a.seg_n[s] : 0.0;
      e.lo = plan ? plan->seg_lo[s] : 0;
      e.hi = plan ? plan->seg_hi[s] : 0;
      e.present = plan ? plan->present[s] : 0;
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

bool has_letter(const Program& pg, int n_ops, int letter) {
  for (int o = 0; o < n_ops; ++o)
    if (pg.ops[o].letter == letter) return true;
  return false;
}

int phase_ops(const Program& pg, int k) { return k == pg.n_e ? pg.n_ops : pg.e_pos[k]; }

// A sum phase k < n_e. all: part of a whole step (or of its "pre" half), so the segment kernel
// also applies the E and checks the next phase's factors; else one phase of a distributed step
// (update_xi runs separately and does not see the tensors, so the factors are checked here).
void sum_phase(const StepArgs& a, const Plan& plan, int k, bool all, int check, int32_t* flag,
               cudaStream_t st) {
  const Program& pg = *a.prog;
  const int n_ops = phase_ops(pg, k);
  KCommon c = make_common(a, n_ops, flag);
  if (k == 0) {
    // The first sum pass checks the data and this phase's factors itself; it never skips.
    c.check_data = check && flag;
    c.check_cfac = flag != nullptr;
  } else {
    if (!all && flag && has_letter(pg, n_ops, kC))
      launch_seg(a, &plan, kSegCheck, k, n_ops, flag, st);
    c.early_exit = flag != nullptr;
  }
  c.skip_theta = !sum_reads_theta(pg.ops, n_ops, c.check_data != 0);
  launch_phase<kSum>(a, plan, c, st);
  int mode = kSegFinish, next_ops = 0;
  if (all) {
    mode |= kSegUpdate;
    next_ops = phase_ops(pg, k + 1);
    if (flag && has_letter(pg, next_ops, kC)) mode |= kSegCheck;
  }
  launch_seg(a, &plan, mode, k, next_ops, flag, st);
}

// What can fail before the writing phase that the sum phases did not already check: for a
// scheme without E the read-only check of theta and g (the CPU engine's order: data first),
// then the factors of the writing phase's C letters.
void write_checks(const StepArgs& a, const Plan& plan, bool check_data, bool check_factors,
                  int32_t* flag, cudaStream_t st) {
  if (!flag) return;
  const Program& pg = *a.prog;
  if (check_data) {
    KCommon c = make_common(a, 0, flag);
    c.check_data = 1;
    launch_phase<kCheck>(a, plan, c, st);
  }
  if (check_factors && has_letter(pg, pg.n_ops, kC))
    launch_seg(a, &plan, kSegCheck, pg.n_e, pg.n_ops, flag, st);
}

// The writing phase (skipped on the device when the flag is set), then xi = version n_e.
void write_phase(const StepArgs& a, const Plan& plan, int32_t* flag, cudaStream_t st) {
  const Program& pg = *a.prog;
  KCommon c = make_common(a, pg.n_ops, flag);
  c.early_exit = flag != nullptr;
  launch_phase<kWrite>(a, plan, c, st);
  if (pg.n_e > 0) {
    const int threads = 256;
    commit_kernel<<<(a.n_seg + threads - 1) / threads, threads, 0, st>>>(a.xi, a.ws, a.n_seg,
                                                                       pg.n_e, flag);
    check_launch("the xi commit kernel");
  }
}

void validate(const StepArgs& a) {
  if (!a.prog) throw std::invalid_argument("thermo_ext CUDA engine: no program");
  const Program& pg = *a.prog;
  if (pg.n_ops < 0 || pg.n_ops > kMaxOps || pg.n_e < 0 || pg.n_e > pg.n_ops)
    throw std::invalid_argument("thermo_ext CUDA engine: malformed program");
  if (a.n_tensors < 0 || (a.n_tensors > 0 && !a.tensors))
    throw std::invalid_argument("thermo_ext CUDA engine: no tensors");
  if (a.n_seg < 1) throw std::invalid_argument("thermo_ext CUDA engine: n_seg must be >= 1");
  const bool thermostat = pg.n_e > 0 || has_letter(pg, pg.n_ops, kC);
  if (thermostat && !a.xi) throw std::invalid_argument("thermo_ext CUDA engine: xi is null");
  if (pg.n_e > 0 && (!a.ws || !a.seg_n))
    throw std::invalid_argument("thermo_ext CUDA engine: ws or seg_n is null");
}

}  // namespace

bool cuda_compiled() { return true; }

int64_t cuda_scratch_doubles(const int64_t* numels, int n) {
  // A tensor of numel elements at any offset spans at most numel / kChunk + 2 chunks.
  int64_t total = 1;
  for (int i = 0; i < n; ++i)
    if (numels[i] > 0) total += (numels[i] + kChunk - 1) / kChunk + 1;
  return total;
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
  int rt = 0;
  if (cudaRuntimeGetVersion(&rt) != cudaSuccess) rt = 0;
  s += " runtime=" + std::to_string(rt / 1000) + "." + std::to_string(rt % 1000 / 10);
  int drv = 0;
  if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
  cudaGetLastError();  // leave no error behind on a machine without a driver
  s += " driver=" + (drv ? std::to_string(drv / 1000) + "." + std::to_string(drv % 1000 / 10)
                         : std::string("none"));
  s += " chunk=" + std::to_string(kChunk) + " tensors_per_launch=" + std::to_string(kSmallT) +
       "/" + std::to_string(kMaxT);
  return s;
}

int cuda_run(const StepArgs& a, int device, intptr_t stream, int phase, int check,
             int32_t* flag) {
  validate(a);
  const Program& pg = *a.prog;
  const int n_e = pg.n_e;
  if (phase < -2 || phase > n_e)
    throw std::invalid_argument("thermo_ext CUDA engine: phase " + std::to_string(phase) +
                                " out of range [-2, " + std::to_string(n_e) + "]");
  Plan& plan = build_plan(a);
  const bool any_sum = phase < 0 ? n_e > 0 : phase < n_e;
  if (any_sum && (!a.scratch || a.scratch_len < plan.total_slots))
    throw std::invalid_argument(
        "thermo_ext CUDA engine: scratch has " + std::to_string(a.scratch_len) +
        " doubles, this call needs " + std::to_string(plan.total_slots) +
        " (allocate cuda_scratch_doubles(numels))");

  DeviceGuard guard(device);
  cudaStream_t st = (cudaStream_t)stream;
  if (phase < 0) {
    // -1: the whole step; -2: its "pre" half (everything that can fail, writing only ws).
    for (int k = 0; k < n_e; ++k) sum_phase(a, plan, k, true, check, flag, st);
    if (n_e == 0) write_checks(a, plan, check != 0, true, flag, st);
    if (phase == -1) write_phase(a, plan, flag, st);
  } else if (phase < n_e) {
    sum_phase(a, plan, phase, false, check, flag, st);
  } else {
    // The writing phase alone: after update_xi (which saw no tensors) or after a "pre".
    write_checks(a, plan, check != 0 && n_e == 0, true, flag, st);
    write_phase(a, plan, flag, st);
  }
  return -1;
}

int cuda_update_xi(const StepArgs& a, int device, intptr_t stream, int k, int32_t* flag) {
  if (!a.prog) throw std::invalid_argument("thermo_ext CUDA engine: no program");
  if (k < 0 || k >= a.prog->n_e)
    throw std::invalid_argument("thermo_ext CUDA engine: update_xi: no E number " +
                                std::to_string(k));
  if (!a.xi || !a.ws || !a.seg_n || a.n_seg < 1)
    throw std::invalid_argument("thermo_ext CUDA engine: update_xi: xi, ws or seg_n missing");
  DeviceGuard guard(device);
  launch_seg(a, nullptr, kSegUpdate, k, 0, flag, (cudaStream_t)stream);
  return -1;
}

void cuda_fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,
                      uint32_t draw, int64_t offset, int device, intptr_t stream) {
  if (n < 0 || offset < 0)
    throw std::invalid_argument("thermo_ext CUDA engine: fill_normal: negative n or offset");
  if (n == 0) return;
  DeviceGuard guard(device);
  const int64_t quads = ((offset + n - 1) >> 2) - (offset >> 2) + 1;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((quads + threads - 1) / threads, 1 << 16);
  normal_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(
      out, n, make_key(seed, uid, step, draw), offset);
  check_launch("the normal kernel");
}

}  // namespace te
