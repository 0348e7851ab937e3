// The CUDA engine library's C entry points (cuda_capi.h): engine.cu's functions behind statuses,
// and what the loader checks before it uses the library. Part of libthermo_ext_cuda<major>.so.
#include "cuda_capi.h"

#include <stdio.h>
#include <string.h>

#include <stdexcept>
#include <string>

#include "cuda_engine.h"

// CMakeLists.txt defines these; a build outside CMake gets values that never match a module's.
#ifndef TE_VERSION
#define TE_VERSION "unknown"
#endif
#ifndef TE_CUDA_ARCHS
#define TE_CUDA_ARCHS "?"
#endif
#ifndef TE_MIN_DRIVER
#define TE_MIN_DRIVER "?"
#endif
#ifndef TE_ENGINE_SOURCE_HASH
#define TE_ENGINE_SOURCE_HASH "no-hash"
#endif

namespace {

thread_local std::string g_error;

// Runs f, turning a C++ exception into a status and the message te_cuda_last_error returns.
template <class F>
int guarded(F&& f) {
  try {
    f();
    return TE_CUDA_OK;
  } catch (const std::invalid_argument& e) {
    g_error = e.what();
    return TE_CUDA_INVALID;
  } catch (const std::exception& e) {
    g_error = e.what();
    return TE_CUDA_ERROR;
  } catch (...) {
    g_error = "thermo_ext CUDA engine: unknown C++ exception";
    return TE_CUDA_ERROR;
  }
}

}  // namespace

extern "C" {

int te_cuda_abi(void) { return TE_CUDA_ABI; }
uint64_t te_cuda_layout(void) { return te::te_layout_fingerprint(); }
const char* te_cuda_source(void) { return TE_ENGINE_SOURCE_HASH; }
const char* te_cuda_version(void) { return TE_VERSION; }
int te_cuda_runtime(void) { return te::cuda_runtime_version(); }
const char* te_cuda_min_driver(void) { return TE_MIN_DRIVER; }
const char* te_cuda_archs(void) { return TE_CUDA_ARCHS; }
const char* te_cuda_last_error(void) { return g_error.c_str(); }

int te_cuda_driver_version(void) {
  int driver = 0, runtime = 0;
  if (guarded([&] { te::cuda_versions(&driver, &runtime); }) != TE_CUDA_OK) return 0;
  return driver;
}

int te_cuda_build_info(char* out, int len) {
  return guarded([&] {
    const std::string s = te::cuda_build_info();
    if (len > 0) snprintf(out, (size_t)len, "%s", s.c_str());
  });
}

int64_t te_cuda_scratch_doubles(const int64_t* numels, int n) {
  return te::cuda_scratch_doubles(numels, n);
}

int te_cuda_param_layout(int large, int* result) {
  return guarded([&] { *result = te::cuda_param_layout(large) ? 1 : 0; });
}

int te_cuda_run(const te::StepArgs* a, int device, intptr_t stream, int mode, int check,
                int32_t* flag, int* result) {
  return guarded([&] { *result = te::cuda_run(*a, device, stream, mode, check, flag); });
}

int te_cuda_fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,
                        uint32_t draw, int64_t offset, int device, intptr_t stream) {
  return guarded(
      [&] { te::cuda_fill_normal(out, n, seed, uid, step, draw, offset, device, stream); });
}

int te_cuda_probe(int device) {
  return guarded([&] { te::cuda_probe(device); });
}

}  // extern "C"
