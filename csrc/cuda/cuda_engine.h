// The CUDA engine's host entry points. Without a CUDA build they are stubs (cuda_stub.cpp) that
// raise an error telling how to rebuild.
#pragma once
#include <stdint.h>

#include <string>

#include "../engine.h"

namespace te {

bool cuda_compiled();
// Doubles of device scratch a call over tensors of these sizes needs (segment-sum partials).
int64_t cuda_scratch_doubles(const int64_t* numels, int n);
std::string cuda_build_info();
// Runs phase `phase` >= 0, the whole step (-1) or everything that can fail without writing
// theta, p or xi (-2) on `stream` of `device`. Never synchronises: non-finite values set *flag
// (a device int32 the caller zeroes once per optimizer step) to the smallest BadKind code + 1,
// and the writing phase then does nothing. Returns -1.
int cuda_run(const StepArgs& a, int device, intptr_t stream, int phase, int check, int32_t* flag);
int cuda_update_xi(const StepArgs& a, int device, intptr_t stream, int k, int32_t* flag);
void cuda_fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,
                      uint32_t draw, int64_t offset, int device, intptr_t stream);

}  // namespace te
