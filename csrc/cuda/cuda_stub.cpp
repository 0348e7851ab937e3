// Entry points of a build without CUDA: any CUDA tensor reaching the engine gets this error.
#include <stdexcept>

#include "cuda_engine.h"

namespace te {

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "thermo_ext was built without CUDA: reinstall with a CUDA compiler on PATH, e.g. "
      "pip install --no-build-isolation -C cmake.define.THERMO_EXT_CUDA=ON .");
}
}  // namespace

bool cuda_compiled() { return false; }
int64_t cuda_scratch_doubles(const int64_t*, int) { return 0; }
std::string cuda_build_info() { return ""; }
void cuda_versions(int* driver, int* runtime) { *driver = *runtime = 0; }
bool cuda_param_layout(int) { return false; }
int cuda_run(const StepArgs&, int, intptr_t, int, int, int32_t*) { no_cuda(); }
void cuda_fill_normal(float*, int64_t, uint64_t, uint32_t, uint64_t, uint32_t, int64_t, int,
                      intptr_t) {
  no_cuda();
}

}  // namespace te
