// The CUDA engine's host entry points. The CUDA library (engine.cu, libthermo_ext_cuda<major>.so)
// defines them; in thermo_ext._C they forward to that library once it is loaded at run time
// (cuda_loader.cpp, through the C interface of cuda_capi.h), and raise an error before.
#pragma once
#include <stdint.h>

#include <string>

#include "../engine.h"

namespace te {

bool cuda_compiled();
// Doubles of device scratch a call over tensors of these sizes needs (the coefficients of
// device hyperparameters, then the segment-sum partials).
int64_t cuda_scratch_doubles(const int64_t* numels, int n);
std::string cuda_build_info();
// The CUDA version the installed driver supports and the one this module was built with (both
// as 1000 * major + 10 * minor; 0 where unknown or without a CUDA build).
void cuda_versions(int* driver, int* runtime);
// Whether launches use the 32 KB kernel-parameter layout; large = 0 or 1 sets it (1 only where
// the build and the driver support it), -1 only asks.
bool cuda_param_layout(int large);
// Runs `mode` (engine.h, RunMode) of a step on `stream` of `device`. Never synchronises:
// non-finite values set *flag (a device int32 the caller zeroes once per optimizer step) to the
// smallest BadKind code + 1, and the writing phase then does nothing. a.sum_hook, when set, is
// called from this thread between the launches. Returns -1.
int cuda_run(const StepArgs& a, int device, intptr_t stream, int mode, int check, int32_t* flag);
void cuda_fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,
                      uint32_t draw, int64_t offset, int device, intptr_t stream);
// Raises std::runtime_error naming the CUDA error when the kernels cannot run on `device` (no
// SASS for its architecture and no PTX the driver can compile, or no usable driver).
void cuda_probe(int device);
// The CUDA runtime version compiled in (CUDART_VERSION; 0 without a library).
int cuda_runtime_version();

// Run-time loading (thermo_ext._C only, cuda_loader.cpp).
struct CudaLibraryInfo {
  std::string path;        // the file loaded
  std::string version;     // the thermo_ext version it was built as
  std::string archs;       // CMake's architecture list ("75-real;...;121-virtual")
  std::string min_driver;  // the oldest Linux driver of its CUDA major
  int runtime = 0;         // the CUDA runtime it carries (1000 * major + 10 * minor)
};
// Loads the library at `path` and routes the functions above to it, after checking that it was
// built from the same engine sources (cuda_capi.h); raises std::runtime_error saying why a
// library cannot be used. Loading a second, different library is refused (a loaded library is
// never unloaded: its CUDA runtime may hold state). Loading touches no CUDA API.
CudaLibraryInfo cuda_load(const std::string& path);
// Whether a library is loaded, and which.
bool cuda_loaded(CudaLibraryInfo* info);

}  // namespace te
