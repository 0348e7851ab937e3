// A CPU emulation of the few CUDA features csrc/cuda/engine.cu uses, so that its kernels and
// host code run, slowly, on a machine without a GPU (tools/cuda_emu.sh). Device memory is host
// memory. A launch runs its blocks one after another, each block as blockDim.x std::threads
// that really run concurrently: __syncthreads is a barrier, a warp shuffle exchanges values
// through a per-warp barrier, atomics are real atomics. So races and missing barriers inside a
// block can show up, while what only a GPU has (graph capture, streams, 32 KB parameter
// support, the device math library's ulps) cannot. The driver is a pretend one: its version and
// the devices' primary contexts are emulated state.
#pragma once
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __grid_constant__
#define __shared__ static  // one copy, shared by the threads of the block that is running

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline double2 make_double2(double a, double b) { return {a, b}; }

typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
constexpr cudaError_t cudaErrorInvalidDevice = 101;
inline cudaError_t emu_error = cudaSuccess;
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu_error;
  emu_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t) { return "emulated launch error"; }
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaErrorInvalidDevice ? "cudaErrorInvalidDevice" : "cudaErrorInvalidConfiguration";
}
// The runtime and driver versions: a CUDA 13.0 build on a CUDA 13.0 driver, unless
// TE_EMU_DRIVER_VERSION (e.g. 12080) says which driver to pretend (the driver check's test).
#define CUDART_VERSION 13000
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  const char* env = getenv("TE_EMU_DRIVER_VERSION");
  *v = env && *env ? atoi(env) : 13000;
  return cudaSuccess;
}

// Devices and their primary contexts: cudaSetDevice creates the context of the device it makes
// current (as CUDA 12+ does); device 0's exists from the start (the tests' tensors live there).
constexpr int kEmuMaxDevices = 16;
inline int emu_device = 0;
inline bool emu_context[kEmuMaxDevices] = {true};
inline cudaError_t cudaGetDevice(int* d) {
  *d = emu_device;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= kEmuMaxDevices) return emu_error = cudaErrorInvalidDevice;
  emu_device = d;
  emu_context[d] = true;
  return cudaSuccess;
}
inline int emu_primary_ctx_get_state(int d, unsigned int* flags, int* active) {
  if (d < 0 || d >= kEmuMaxDevices) return 101;  // CUDA_ERROR_INVALID_DEVICE
  *flags = 0;
  *active = emu_context[d] ? 1 : 0;
  return 0;
}
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2
};
constexpr unsigned long long cudaEnableDefault = 0;
inline cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int,
                                                    unsigned long long,
                                                    cudaDriverEntryPointQueryResult* found) {
  const bool known = strcmp(symbol, "cuDevicePrimaryCtxGetState") == 0;
  *fn = known ? (void*)&emu_primary_ctx_get_state : nullptr;
  if (found) *found = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

// The kernels' image lookup of the loader's probe (cuda_probe): the emulation runs every kernel.
struct cudaFuncAttributes {
  int numRegs = 0;
};
template <class T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T*) {
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}

struct EmuWarp {
  std::barrier<>* bar;
  double slots[32];
};
inline thread_local std::barrier<>* emu_block_barrier = nullptr;
inline thread_local EmuWarp* emu_warp = nullptr;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline double __shfl_down_sync(unsigned, double x, int offset) {
  const int lane = threadIdx.x & 31;
  emu_warp->slots[lane] = x;
  emu_warp->bar->arrive_and_wait();
  const double r = lane + offset < 32 ? emu_warp->slots[lane + offset] : x;
  emu_warp->bar->arrive_and_wait();
  return r;
}
inline int atomicMin(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old &&
         !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicCAS(int* p, int expected, int v) {
  __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
inline int __ffs(int x) { return __builtin_ffs(x); }

// kernel<<<grid, block, smem, stream>>>(args...) becomes emu_launch(grid, block, smem, stream,
// body) (tools/cuda_emu/translate.py); the body calls the kernel with copies of the arguments.
inline void emu_launch(unsigned grid, unsigned block, int, cudaStream_t,
                       const std::function<void()>& body) {
  if (grid == 0 || block == 0 || block > 1024) {
    emu_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::barrier<> bar(block);
  const unsigned n_warps = (block + 31) / 32;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<EmuWarp> warps(n_warps);
  for (unsigned w = 0; w < n_warps; ++w) {
    warp_bars.emplace_back(new std::barrier<>(std::min(32u, block - 32 * w)));
    warps[w].bar = warp_bars.back().get();
  }
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t)
    threads.emplace_back([&, t]() {
      threadIdx.x = t;
      blockDim.x = block;
      gridDim.x = grid;
      emu_block_barrier = &bar;
      emu_warp = &warps[t / 32];
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        body();
        bar.arrive_and_wait();  // every thread ends block b before any starts block b + 1
      }
    });
  for (std::thread& t : threads) t.join();
}
