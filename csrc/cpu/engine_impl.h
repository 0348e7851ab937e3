// The CPU engine, compiled once per vector ISA (engine_<isa>.cpp define TE_ISA_NS and include
// this file with their own -m flags). Each work item copies a block of at most kBlock elements
// into L1-resident arrays, applies the phase's letters one loop per letter (interpret.h: the
// loops vectorise; the per-element math is substeps.h), and writes the block back: one pass
// over memory a phase.
#ifndef TE_ISA_NS
#error "define TE_ISA_NS before including engine_impl.h"
#endif

#include <math.h>
#include <omp.h>
#include <string.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../engine.h"
#include "../interpret.h"
#include "../lowp.h"
#include "cpu_engine.h"

namespace te {
namespace TE_ISA_NS {

namespace {

constexpr int kBlock = 256;             // multiple of kSumLanes and of 4; aligned in global index
constexpr int64_t kChunk = 1 << 15;     // elements per work item, aligned in global index
constexpr int64_t kParallelMin = 1 << 15;  // below this many elements a call runs on one thread

struct Item {
  int32_t t;
  int32_t bad;   // bit k set: a non-finite value of kind k was seen
  int64_t lo, hi;  // local element range of tensor t
  double sum;
};

// body(i) for i < n: on the OpenMP team when `parallel`, else inline on this thread (skipping
// the runtime's fork/join, which costs more than a small step).
template <class F>
void for_each_item(int64_t n, bool parallel, F&& body) {
  if (!parallel) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) body(i);
}

// The work items of a call are global-aligned chunks of each tensor: the same decomposition for
// any thread count, so every reduction below has a fixed order.
std::vector<Item>& build_items(const StepArgs& a, int64_t& total) {
  thread_local std::vector<Item> items;  // reused: no allocation per step once grown
  items.clear();
  total = 0;
  for (int t = 0; t < a.n_tensors; ++t) {
    const TensorDesc& d = a.tensors[t];
    int64_t lo = 0;
    while (lo < d.numel) {
      const int64_t g = d.offset + lo;
      const int64_t hi = std::min(d.numel, lo + (kChunk - g % kChunk));
      items.push_back(Item{t, 0, lo, hi, 0.0});
      lo = hi;
    }
    total += d.numel;
  }
  return items;
}

// out[i] = normal of global element 4*b0 + i, for nb blocks of four. The Philox words of up to
// 64 blocks go to L1-resident arrays (x86 vector intrinsics where available: the same
// integers), then a vectorised Box–Muller loop turns them into normals.
void normals_from_blocks(float* __restrict out, const NoiseKey& k, uint64_t b0, int64_t nb) {
  constexpr int kWords = 64;
  alignas(64) uint32_t w0[kWords], w1[kWords], w2[kWords], w3[kWords];
  for (int64_t i0 = 0; i0 < nb; i0 += kWords) {
    const int cnt = (int)std::min<int64_t>(kWords, nb - i0);
#if defined(TE_PHILOX_SIMD)
    for (int i = 0; i < cnt; i += 32)
      philox4x32_10_x32(w0 + i, w1 + i, w2 + i, w3 + i, (uint32_t)(b0 + i0 + i), k.uid, k.step,
                        k.draw, k.k0, k.k1);
#else
    for (int i = 0; i < cnt; ++i) {
      uint32_t c0 = (uint32_t)(b0 + i0 + i), c1 = k.uid, c2 = k.step, c3 = k.draw;
      philox4x32_10(c0, c1, c2, c3, k.k0, k.k1);
      w0[i] = c0;
      w1[i] = c1;
      w2[i] = c2;
      w3[i] = c3;
    }
#endif
    float* __restrict o = out + 4 * i0;
    // fma_risky's fast path on ISAs without FMA (philox.h): the few flagged quads (about one
    // in 10^3) are redone with the exact software fma.
    alignas(64) uint32_t risk[kWords];
    uint32_t any_risk = 0;
#pragma omp simd reduction(| : any_risk)
    for (int i = 0; i < cnt; ++i) {
      float z0, z1, z2, z3;
      uint32_t r = 0;
      box_muller_impl<true>(w0[i], w1[i], z0, z1, r);
      box_muller_impl<true>(w2[i], w3[i], z2, z3, r);
      o[4 * i + 0] = z0;
      o[4 * i + 1] = z1;
      o[4 * i + 2] = z2;
      o[4 * i + 3] = z3;
      risk[i] = r;
      any_risk |= r;
    }
    if (TE_SOFT_FMA && any_risk) {
      for (int i = 0; i < cnt; ++i) {
        if (!risk[i]) continue;
        box_muller(w0[i], w1[i], o[4 * i + 0], o[4 * i + 1]);
        box_muller(w2[i], w3[i], o[4 * i + 2], o[4 * i + 3]);
      }
    }
  }
}

// Normals of global elements g0 .. g0+len-1 into buf; returns the pointer to element g0's.
const float* noise_block(float* buf, const NoiseKey& k, int64_t g0, int len) {
  const uint64_t b0 = (uint64_t)g0 >> 2;
  const uint64_t b1 = (uint64_t)(g0 + len - 1) >> 2;
  normals_from_blocks(buf, k, b0, (int64_t)(b1 - b0 + 1));
  return buf + (g0 & 3);
}

template <class S>
int nonfinite_any(const S* __restrict x, int len) {
  int bad = 0;
  for (int j = 0; j < len; ++j) bad |= nonfinite_bits(x[j]) ? 1 : 0;
  return bad;
}

template <class T>
void sum_squares(double* __restrict acc, const T* __restrict p, int len) {
  int j = 0;
  for (; j + kSumLanes <= len; j += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) acc[l] += (double)p[j + l] * (double)p[j + l];
  for (int l = 0; j + l < len; ++l) acc[l] += (double)p[j + l] * (double)p[j + l];
}

// sum p^2 / m with an adaptive mass: (p^2 in double) * inv, in the lanes of sum_squares.
template <class T>
void sum_squares_mass(double* __restrict acc, const T* __restrict p, const T* __restrict inv,
                      int len) {
  int j = 0;
  for (; j + kSumLanes <= len; j += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l)
      acc[l] += (double)p[j + l] * (double)p[j + l] * (double)inv[j + l];
  for (int l = 0; j + l < len; ++l)
    acc[l] += (double)p[j + l] * (double)p[j + l] * (double)inv[j + l];
}

// The mass factors of a block (interpret.h, MassFactors) from its second moments v, updated in
// place with the block's forces g + wd theta first when the step updates them (theta: the
// step's starting values; a sum phase leaves it unread only where wd is 0, sum_reads_theta).
template <class T>
void block_mass(T* __restrict v, const T* __restrict g, const T* __restrict theta, T wd,
                int len, bool update, T beta, T one_minus_beta, T bias, T eps, bool need_sm,
                bool need_rs, T* __restrict inv, T* __restrict sm, T* __restrict rs) {
  if (update)
    for (int j = 0; j < len; ++j)
      v[j] = mass_update(v[j], g[j], theta[j], wd, beta, one_minus_beta);
  // One loop per combination, each vectorised; the same per-element operations as
  // interpret.h's mass_factors (the CUDA engine's).
  if (need_rs) {
    for (int j = 0; j < len; ++j) {
      const T m = mass_of(v[j], bias, eps);
      const T s = te_sqrt(m);
      inv[j] = (T)1 / m;
      sm[j] = s;
      rs[j] = (T)1 / s;
    }
  } else if (need_sm) {
    for (int j = 0; j < len; ++j) {
      const T m = mass_of(v[j], bias, eps);
      inv[j] = (T)1 / m;
      sm[j] = te_sqrt(m);
    }
  } else {
    for (int j = 0; j < len; ++j) inv[j] = (T)1 / mass_of(v[j], bias, eps);
  }
}

// theta's storage from the block's compute values (lowp.h to_storage), the stochastic test
// outside the loops so that each loop vectorises.
template <class P, class T>
void store_theta(P* __restrict out, const T* __restrict th, int len, int stochastic,
                 const NoiseKey& k, int64_t g0) {
  if constexpr (std::is_same<P, bf16_t>::value) {
    if (stochastic) {
      // One Philox call per quad of elements, its four words shared by the quad's lanes
      // (lowp.h rounding_bits makes one per element): the same bits.
      constexpr int kQuads = kBlock / 4 + 32;  // a block spans kBlock / 4 + 1 quads at most
      alignas(64) uint32_t w[4][kQuads];
      const uint64_t q0 = (uint64_t)g0 >> 2;
      const int nq = (int)(((uint64_t)(g0 + len - 1) >> 2) - q0 + 1);
#if defined(TE_PHILOX_SIMD)
      for (int i = 0; i < nq; i += 32)
        philox4x32_10_x32(w[0] + i, w[1] + i, w[2] + i, w[3] + i, (uint32_t)(q0 + i), k.uid,
                          k.step, k.draw, k.k0, k.k1);
#else
      for (int i = 0; i < nq; ++i) {
        uint32_t c0 = (uint32_t)(q0 + i), c1 = k.uid, c2 = k.step, c3 = k.draw;
        philox4x32_10(c0, c1, c2, c3, k.k0, k.k1);
        w[0][i] = c0;
        w[1][i] = c1;
        w[2][i] = c2;
        w[3][i] = c3;
      }
#endif
      for (int j = 0; j < len; ++j) {
        const uint64_t g = (uint64_t)(g0 + j);
        out[j] = to_storage<P>(th[j], true, w[g & 3][(g >> 2) - q0] >> 16);
      }
      return;
    }
  }
  for (int j = 0; j < len; ++j) out[j] = to_storage<P>(th[j], false, 0);
}

// The noise letters of a program whose normals go through the plan's store (cpu_engine.h,
// CpuStore): those before the last E, where a read-only phase draws them first, with a nonzero
// scale (a zero scale draws nothing). slot[o] numbers them (-1: drawn where used); drawn_in[o]
// is the phase that draws and stores letter o.
struct StoreSlots {
  int8_t slot[kMaxOps];
  int8_t drawn_in[kMaxOps];
  int n;
};

StoreSlots store_slots(const Program& pg) {
  StoreSlots s;
  s.n = 0;
  const int end = pg.n_e > 0 ? pg.e_pos[pg.n_e - 1] : 0;
  int phase = 0;
  for (int o = 0; o < kMaxOps; ++o) {
    s.slot[o] = -1;
    s.drawn_in[o] = -1;
    if (o >= end) continue;
    while (o > pg.e_pos[phase]) ++phase;
    const Op& op = pg.ops[o];
    const double scale = op.letter == kO ? op.c[1] : op.letter == kD ? op.c[0]
                         : op.letter == kV ? op.c[2] : 0.0;
    if (scale == 0.0) continue;
    s.slot[o] = (int8_t)s.n++;
    s.drawn_in[o] = (int8_t)phase;
  }
  return s;
}

// One phase over all tensors. P: parameter/gradient storage, M: momentum (and mass) storage,
// T: compute. kMass: the adaptive mass (Program::mass).
template <class P, class M, class T, bool kMass>
int phase_impl(const StepArgs& a, int phase, bool check) {
  const Program& pg = *a.prog;
  const bool write = phase == pg.n_e;
  const int n_ops = write ? pg.n_ops : pg.e_pos[phase];  // the ending E itself is the sum
  const uint64_t step = a.step_ptr ? (uint64_t)*a.step_ptr : a.step;

  // exp(-xi delta) of every C for every tensor, formed and checked before anything is written.
  thread_local std::vector<double> cfac;
  cfac.resize((size_t)a.n_tensors * n_ops);
  const int bad_factor = cpu_c_factors(a, n_ops, check, cfac.data());
  if (bad_factor >= 0) return bad_factor;

  const double* cfac_all = cfac.data();  // thread_local: name it outside the parallel region

  int64_t total;
  std::vector<Item>& items = build_items(a, total);
  const int64_t n_items = (int64_t)items.size();
  const bool sum_phase = !write;
  const bool fused_check = check && sum_phase && phase == 0;
  const bool skip_theta = sum_phase && !sum_reads_theta(pg, n_ops, fused_check);
  constexpr bool kSameTypes = std::is_same<P, T>::value && std::is_same<M, T>::value;

  // The plan's store: phase 0 (re)fills it, the later phases of the same step read it back.
  CpuStore* const st = a.cpu_store;
  const StoreSlots slots = store_slots(pg);
  bool store_reads = false, store_writes = false;
  if (st && slots.n > 0 && st->steps > 0) {
    if (phase == 0) {
      const int64_t need = (int64_t)slots.n * total;
      if (st->capacity < need) {
        st->z.reset();  // the old buffer first: the peak stays at the new size
        st->z.reset(new float[(size_t)need]);
        st->capacity = need;
      }
      st->filled = false;
      store_writes = true;
    } else {
      store_reads = st->filled && st->seed == a.seed && st->step == step && st->prog == a.prog;
      store_writes = store_reads && sum_phase;
    }
  }
  float* const store = store_writes || store_reads ? st->z.get() : nullptr;
  thread_local std::vector<int64_t> tbase;  // call element index of each tensor's element 0
  tbase.resize((size_t)a.n_tensors);
  for (int t = 0; t < a.n_tensors; ++t)
    tbase[t] = t == 0 ? 0 : tbase[t - 1] + a.tensors[t - 1].numel;
  const int64_t* tbase_all = tbase.data();

  // The adaptive mass: each tensor's update and bias correction at this step, and which of the
  // mass factors the phase's letters use.
  thread_local std::vector<MassStep> mass_steps;
  bool need_sm = false, need_rs = false;
  if (kMass) {
    mass_steps.resize((size_t)a.n_tensors);
    for (int t = 0; t < a.n_tensors; ++t)
      mass_steps[t] = mass_step(pg.mass_beta, pg.mass_freeze, step, a.tensors[t].mass_start);
    mass_needs(pg.ops, n_ops, &need_sm, &need_rs);
  }
  const MassStep* mass_steps_all = mass_steps.data();
  const T mass_beta = (T)pg.mass_beta, mass_omb = (T)(1.0 - pg.mass_beta);
  const T mass_eps = (T)pg.mass_eps, mass_wd = (T)pg.mass_wd;

  for_each_item(n_items, total >= kParallelMin, [&](int64_t it) {
    Item& item = items[it];
    const TensorDesc& d = a.tensors[item.t];
    P* __restrict theta = (P*)d.theta;
    M* __restrict mom = (M*)d.mom;
    const P* __restrict grad = (const P*)d.grad;
    alignas(64) T th[kBlock], pm[kBlock], gr[kBlock];
    alignas(64) T vloc[kMass ? kBlock : 1], inv[kMass ? kBlock : 1], sm[kMass ? kBlock : 1],
        rs[kMass ? kBlock : 1];
    M* __restrict mass = kMass ? (M*)d.mass : nullptr;
    const MassStep ms = kMass ? mass_steps_all[item.t] : MassStep{false, 1.0};
    const T mass_bias = (T)ms.bias;
    alignas(64) float zbuf[kBlock + 8];
    alignas(64) double acc[kSumLanes] = {0};
    const double* fac = cfac_all + (size_t)item.t * n_ops;
    int bad = 0;
    if (skip_theta) memset(th, 0, sizeof(th));  // B reads 0 * theta; A does not run
    for (int64_t lo = item.lo; lo < item.hi;) {
      const int64_t g0 = d.offset + lo;
      const int len = (int)std::min(item.hi - lo, kBlock - g0 % kBlock);
      // A writing phase on float32/float64 works on the buffers in place (the block stays in
      // L1 across the letters); a sum phase and low-precision storage work on local copies.
      T* __restrict thb = th;
      T* __restrict pmb = pm;
      const T* __restrict grb = gr;
      T* __restrict vb = vloc;
      bool copied = true;
      if constexpr (kSameTypes) {
        if (!sum_phase) {
          thb = (T*)(theta + lo);
          grb = (const T*)(grad + lo);
          if (mom) pmb = (T*)(mom + lo);
          if (kMass) vb = (T*)(mass + lo);  // updated in place
          copied = false;
        }
      }
      if (copied) {
        if (!skip_theta)
          for (int j = 0; j < len; ++j) th[j] = to_compute<T>(theta[lo + j]);
        for (int j = 0; j < len; ++j) gr[j] = to_compute<T>(grad[lo + j]);
        if (mom)
          for (int j = 0; j < len; ++j) pm[j] = (T)mom[lo + j];
        if (kMass)
          for (int j = 0; j < len; ++j) vloc[j] = (T)mass[lo + j];
      }
      if (kMass)
        block_mass(vb, grb, thb, mass_wd, len, ms.update, mass_beta, mass_omb, mass_bias,
                   mass_eps, need_sm, need_rs, inv, sm, rs);
      if (fused_check) {
        bad |= nonfinite_any(grb, len) << kBadGrad;
        bad |= nonfinite_any(thb, len) << kBadParam;
        if (mom) bad |= nonfinite_any(pmb, len) << kBadMom;
      }
      // The normals of a noise letter for this block; zeros without drawing when its scale is 0
      // (tau = 0 or sigma = 0).
      auto noise = [&](const Op& op, double scale) -> const float* {
        if (scale == 0.0) {
          memset(zbuf, 0, sizeof(zbuf));
          return zbuf;
        }
        const int o = (int)(&op - pg.ops);  // interpret passes pg.ops[o]
        const int slot = store ? slots.slot[o] : -1;
        float* const zs = slot >= 0 ? store + (int64_t)slot * total + tbase_all[item.t] + lo
                                    : nullptr;
        if (zs && slots.drawn_in[o] < phase) return zs;  // drawn by an earlier phase
        const float* z = noise_block(zbuf, make_key(a.seed, d.uid, step, op.draw), g0, len);
        if (zs) memcpy(zs, z, sizeof(float) * (size_t)len);
        return z;
      };
      interpret<0, kMass>(pg.ops, n_ops, len, thb, pmb, grb, fac, skip_theta, noise,
                          MassFactors<T>{inv, sm, rs});
      if (sum_phase) {
        if (kMass)
          sum_squares_mass(acc, pmb, inv, len);
        else
          sum_squares(acc, pmb, len);
      } else if (copied) {
        store_theta(theta + lo, th, len, a.stochastic_rounding,
                    make_key(a.seed, d.uid, step, kRoundingDraw), g0);
        if (mom)
          for (int j = 0; j < len; ++j) mom[lo + j] = (M)pm[j];
        if (kMass && ms.update)
          for (int j = 0; j < len; ++j) mass[lo + j] = (M)vloc[j];
      }
      lo += len;
    }
    item.bad = bad;
    item.sum = reduce_lanes(acc);
  });

  if (fused_check)
    for (const Item& item : items)
      for (int kind = 0; kind < 3; ++kind)
        if (item.bad >> kind & 1) return item.t * 4 + kind;
  if (st) {
    if (phase == 0 && store_writes) {
      st->filled = true;
      st->seed = a.seed;
      st->step = step;
      st->prog = a.prog;
    }
    if (write) {
      st->filled = false;
      ++st->steps;
    }
  }
  if (sum_phase) {
    double* sums = a.ws + (int64_t)(pg.n_e + phase) * a.n_seg;
    for (int s = 0; s < a.n_seg; ++s) sums[s] = 0.0;
    for (const Item& item : items) sums[a.tensors[item.t].seg] += item.sum;
  } else if (pg.n_e > 0) {
    for (int s = 0; s < a.n_seg; ++s) a.xi[s] = xi_version(a.xi, a.ws, a.n_seg, pg.n_e, s);
  }
  return -1;
}

// The read-only check of parameters and gradients that precedes a scheme without E.
template <class P>
int check_impl(const StepArgs& a) {
  int64_t total;
  std::vector<Item>& items = build_items(a, total);
  const int64_t n_items = (int64_t)items.size();
  for_each_item(n_items, total >= kParallelMin, [&](int64_t it) {
    Item& item = items[it];
    const TensorDesc& d = a.tensors[item.t];
    const int len = (int)(item.hi - item.lo);
    item.bad = nonfinite_any((const P*)d.grad + item.lo, len) << kBadGrad |
               nonfinite_any((const P*)d.theta + item.lo, len) << kBadParam;
  });
  for (const Item& item : items)
    for (int kind = 0; kind < 2; ++kind)
      if (item.bad >> kind & 1) return item.t * 4 + kind;
  return -1;
}

}  // namespace

template <bool kMass>
int run_phase_t(const StepArgs& a, int phase, int check) {
  switch (a.dtype) {
    case kFloat32: return phase_impl<float, float, float, kMass>(a, phase, check);
    case kFloat64: return phase_impl<double, double, double, kMass>(a, phase, check);
    case kBFloat16: return phase_impl<bf16_t, float, float, kMass>(a, phase, check);
    case kFloat16: return phase_impl<fp16_t, float, float, kMass>(a, phase, check);
  }
  return -1;
}

int run_phase(const StepArgs& a, int phase, int check) {
  return a.prog->mass ? run_phase_t<true>(a, phase, check) : run_phase_t<false>(a, phase, check);
}

int check_inputs(const StepArgs& a) {
  switch (a.dtype) {
    case kFloat32: return check_impl<float>(a);
    case kFloat64: return check_impl<double>(a);
    case kBFloat16: return check_impl<bf16_t>(a);
    case kFloat16: return check_impl<fp16_t>(a);
  }
  return -1;
}

void fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step, uint32_t draw,
                 int64_t offset) {
  const NoiseKey k = make_key(seed, uid, step, draw);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c) {
    int64_t lo = c * kChunk;
    const int64_t hi = std::min(n, lo + kChunk);
    alignas(64) float buf[8];
    // Unaligned head: elements up to the next multiple of 4 in global index.
    while (lo < hi && ((offset + lo) & 3) != 0) {
      const int len = (int)std::min<int64_t>(hi - lo, 4 - ((offset + lo) & 3));
      const float* z = noise_block(buf, k, offset + lo, len);
      for (int j = 0; j < len; ++j) out[lo + j] = z[j];
      lo += len;
    }
    const int64_t nb = (hi - lo) / 4;
    normals_from_blocks(out + lo, k, (uint64_t)(offset + lo) >> 2, nb);
    lo += nb * 4;
    if (lo < hi) {
      const float* z = noise_block(buf, k, offset + lo, (int)(hi - lo));
      for (int j = 0; lo + j < hi; ++j) out[lo + j] = z[j];
    }
  }
}

}  // namespace TE_ISA_NS
}  // namespace te
