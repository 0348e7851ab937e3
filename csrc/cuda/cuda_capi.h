// The plain C interface between thermo_ext._C and the CUDA engine library
// (thermo_ext/lib/libthermo_ext_cuda<major>.so, docs/DESIGN.md "The CUDA engine library").
//
// The library is loaded at run time (dlopen, cuda_loader.cpp), never linked: importing
// thermo_ext and stepping CPU tensors loads no CUDA code. Its entry points have C linkage and
// exchange only integers, raw pointers and the POD structs of engine.h (StepArgs by pointer), so
// one library serves every Python version and the module and the library are built apart (the
// library once per CUDA major, the module once per Python). No C++ exception crosses the
// boundary outward: an entry point returns a status and te_cuda_last_error() says why.
//
// What makes a library usable by a module, checked by the loader before any other call:
// * te_cuda_abi() == TE_CUDA_ABI: this interface's version (bump it whenever a function below
//   changes its signature or meaning);
// * te_cuda_layout() == te_layout_fingerprint(): the sizes of the structs shared through
//   engine.h and substeps.h (StepArgs, TensorDesc, Program, Op, Hyper, SumHook) and their
//   constants, as this header computes them on both sides;
// * te_cuda_source() == TE_ENGINE_SOURCE_HASH: a hash of the engine's sources (engine.h,
//   substeps.h, interpret.h, philox.h, lowp.h, this header and engine.cu) taken by CMake when
//   both were configured, so that a library built from other sources (a stale build, a field
//   added to StepArgs in padding) is refused with a message saying so.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "../engine.h"

#define TE_CUDA_ABI 1

// Status codes of the entry points.
#define TE_CUDA_OK 0
#define TE_CUDA_INVALID 1  // a bad argument (the module raises ValueError)
#define TE_CUDA_ERROR 2    // anything else (RuntimeError)

#if defined(_WIN32)
#define TE_CUDA_EXPORT __declspec(dllexport)
#else
#define TE_CUDA_EXPORT __attribute__((visibility("default")))
#endif

namespace te {

// FNV-1a over the sizes of the shared structs and the constants that shape them.
constexpr uint64_t te_fnv(uint64_t h, uint64_t v) {
  for (int i = 0; i < 8; ++i) h = (h ^ ((v >> (8 * i)) & 0xFFu)) * 1099511628211ull;
  return h;
}
constexpr uint64_t te_layout_fingerprint() {
  uint64_t h = 14695981039346656037ull;
  const uint64_t parts[] = {
      sizeof(StepArgs),  alignof(StepArgs), sizeof(TensorDesc), sizeof(Program),
      sizeof(Op),        sizeof(Hyper),     sizeof(SumHook),    (uint64_t)kMaxOps,
      (uint64_t)kNumLetters, (uint64_t)kNumHyper, (uint64_t)kNumDTypes,
      (uint64_t)kNumBadKinds, (uint64_t)kRoundingDraw, (uint64_t)kUidGroupShift,
      offsetof(StepArgs, tensors), offsetof(StepArgs, prog), offsetof(StepArgs, sum_hook),
      offsetof(StepArgs, cpu_store), offsetof(TensorDesc, uid), offsetof(Program, ops),
      offsetof(Program, factor), offsetof(Program, grad_sign)};
  for (uint64_t p : parts) h = te_fnv(h, p);
  return h;
}

}  // namespace te

extern "C" {

// Identity and compatibility (see the top of this file); they touch no CUDA API.
TE_CUDA_EXPORT int te_cuda_abi(void);
TE_CUDA_EXPORT uint64_t te_cuda_layout(void);
TE_CUDA_EXPORT const char* te_cuda_source(void);
TE_CUDA_EXPORT const char* te_cuda_version(void);  // the thermo_ext version it was built as
// The CUDA runtime it carries (CUDART_VERSION: 1000 * major + 10 * minor, linked statically)
// and the oldest Linux driver of that major ("580.65.06"), which it needs.
TE_CUDA_EXPORT int te_cuda_runtime(void);
TE_CUDA_EXPORT const char* te_cuda_min_driver(void);
// The architectures compiled in, as CMake names them ("75-real;...;121-virtual").
TE_CUDA_EXPORT const char* te_cuda_archs(void);

// The message of the last failed call on this thread.
TE_CUDA_EXPORT const char* te_cuda_last_error(void);

// cuda_engine.h's functions, with statuses instead of exceptions.
TE_CUDA_EXPORT int te_cuda_driver_version(void);  // 0 without a driver
TE_CUDA_EXPORT int te_cuda_build_info(char* out, int len);
TE_CUDA_EXPORT int64_t te_cuda_scratch_doubles(const int64_t* numels, int n);
TE_CUDA_EXPORT int te_cuda_param_layout(int large, int* result);
TE_CUDA_EXPORT int te_cuda_run(const te::StepArgs* a, int device, intptr_t stream, int mode,
                               int check, int32_t* flag, int* result);
TE_CUDA_EXPORT int te_cuda_fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid,
                                       uint64_t step, uint32_t draw, int64_t offset, int device,
                                       intptr_t stream);
// Whether the kernels can run on `device` (an image for its architecture: SASS, or PTX the
// driver can compile); TE_CUDA_ERROR with the CUDA error's name and text otherwise.
TE_CUDA_EXPORT int te_cuda_probe(int device);

}  // extern "C"
