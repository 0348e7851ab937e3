// The CUDA engine's host entry points. Without a CUDA build they are stubs (cuda_stub.cpp) that
// raise an error telling how to rebuild.
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

}  // namespace te
