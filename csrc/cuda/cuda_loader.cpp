// cuda_engine.h's functions in thermo_ext._C: forwarded to the CUDA engine library once
// thermo_ext.cuda_library has chosen and loaded one (cuda_load), through the C interface of
// cuda_capi.h. Nothing here links or loads CUDA until cuda_load is called: importing thermo_ext
// and stepping CPU tensors needs no CUDA library and no driver.
#include <dlfcn.h>

#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>

#include "cuda_capi.h"
#include "cuda_engine.h"

#ifndef TE_ENGINE_SOURCE_HASH
#define TE_ENGINE_SOURCE_HASH "no-hash"
#endif

namespace te {

namespace {

struct Library {
  void* handle = nullptr;
  CudaLibraryInfo info;
  const char* (*last_error)(void);
  int (*driver_version)(void);
  int (*build_info)(char*, int);
  int64_t (*scratch_doubles)(const int64_t*, int);
  int (*param_layout)(int, int*);
  int (*run)(const StepArgs*, int, intptr_t, int, int, int32_t*, int*);
  int (*fill_normal)(float*, int64_t, uint64_t, uint32_t, uint64_t, uint32_t, int64_t, int,
                     intptr_t);
  int (*probe)(int);
};

std::mutex g_mutex;
Library* g_lib = nullptr;  // set once, never unloaded

const Library& lib() {
  Library* l = g_lib;
  if (!l)
    throw std::runtime_error(
        "thermo_ext: no CUDA engine library is loaded (thermo_ext.cuda_library loads one at the "
        "first CUDA step; thermo_ext.build_info() says which is chosen and why)");
  return *l;
}

// A status from the library as the exception it stood for.
void raise_status(const Library& l, int status) {
  if (status == TE_CUDA_OK) return;
  const std::string msg = l.last_error();
  if (status == TE_CUDA_INVALID) throw std::invalid_argument(msg);
  throw std::runtime_error(msg);
}

template <class T>
T symbol(void* h, const std::string& path, const char* name) {
  void* p = dlsym(h, name);
  if (!p)
    throw std::runtime_error("thermo_ext: " + path + " lacks " + name +
                             ": not a thermo_ext CUDA engine library of this version");
  return reinterpret_cast<T>(p);
}

// The sum hook of a distributed step calls back into Python from inside the library: its
// exception is kept here and rethrown after the library returned, so that only std exceptions
// unwind through the library's frames and the caller sees the original error.
struct HookRelay {
  const SumHook* inner;
  std::exception_ptr error;
};

void relay_hook(void* ctx, int k) {
  HookRelay* r = static_cast<HookRelay*>(ctx);
  try {
    r->inner->fn(r->inner->ctx, k);
  } catch (...) {
    r->error = std::current_exception();
    throw std::runtime_error("thermo_ext: the sum hook raised");
  }
}

}  // namespace

CudaLibraryInfo cuda_load(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_lib) {
    if (g_lib->info.path == path) return g_lib->info;
    throw std::runtime_error("thermo_ext: the CUDA engine library " + g_lib->info.path +
                             " is already loaded; a process uses one (asked for " + path + ")");
  }
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    throw std::runtime_error("thermo_ext: cannot load the CUDA engine library " + path + ": " +
                             (e ? e : "dlopen failed"));
  }
  try {
    const int abi = symbol<int (*)(void)>(h, path, "te_cuda_abi")();
    if (abi != TE_CUDA_ABI)
      throw std::runtime_error("thermo_ext: the CUDA engine library " + path +
                               " has interface version " + std::to_string(abi) +
                               ", this module needs " + std::to_string(TE_CUDA_ABI) +
                               ": it is stale; rebuild it from this source or reinstall "
                               "thermo_ext");
    const uint64_t layout = symbol<uint64_t (*)(void)>(h, path, "te_cuda_layout")();
    const std::string source = symbol<const char* (*)(void)>(h, path, "te_cuda_source")();
    const std::string version = symbol<const char* (*)(void)>(h, path, "te_cuda_version")();
    if (layout != te_layout_fingerprint() || source != TE_ENGINE_SOURCE_HASH)
      throw std::runtime_error(
          "thermo_ext: the CUDA engine library " + path + " (thermo_ext " + version +
          ") was built from other engine sources than this module (" +
          (layout != te_layout_fingerprint() ? "the layout of StepArgs and the shared structs "
                                               "differs"
                                             : "source hash " + source + ", this module's " +
                                                   TE_ENGINE_SOURCE_HASH) +
          "): it is stale; rebuild it from this source (tools/build_wheel.sh, or pip install .) "
          "or reinstall thermo_ext");
    Library* l = new Library;
    l->handle = h;
    l->info.path = path;
    l->info.version = version;
    l->info.archs = symbol<const char* (*)(void)>(h, path, "te_cuda_archs")();
    l->info.min_driver = symbol<const char* (*)(void)>(h, path, "te_cuda_min_driver")();
    l->info.runtime = symbol<int (*)(void)>(h, path, "te_cuda_runtime")();
    l->last_error = symbol<const char* (*)(void)>(h, path, "te_cuda_last_error");
    l->driver_version = symbol<int (*)(void)>(h, path, "te_cuda_driver_version");
    l->build_info = symbol<int (*)(char*, int)>(h, path, "te_cuda_build_info");
    l->scratch_doubles =
        symbol<int64_t (*)(const int64_t*, int)>(h, path, "te_cuda_scratch_doubles");
    l->param_layout = symbol<int (*)(int, int*)>(h, path, "te_cuda_param_layout");
    l->run = symbol<decltype(l->run)>(h, path, "te_cuda_run");
    l->fill_normal = symbol<decltype(l->fill_normal)>(h, path, "te_cuda_fill_normal");
    l->probe = symbol<int (*)(int)>(h, path, "te_cuda_probe");
    g_lib = l;
    return l->info;
  } catch (...) {
    dlclose(h);  // nothing of it ran but the identity functions, which touch no CUDA API
    throw;
  }
}

bool cuda_loaded(CudaLibraryInfo* info) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_lib && info) *info = g_lib->info;
  return g_lib != nullptr;
}

bool cuda_compiled() { return g_lib != nullptr; }

int64_t cuda_scratch_doubles(const int64_t* numels, int n) {
  return lib().scratch_doubles(numels, n);
}

std::string cuda_build_info() {
  const Library* l = g_lib;
  if (!l) return "";
  char buf[1024];
  raise_status(*l, l->build_info(buf, sizeof(buf)));
  return buf;
}

void cuda_versions(int* driver, int* runtime) {
  const Library* l = g_lib;
  *driver = l ? l->driver_version() : 0;
  *runtime = l ? l->info.runtime : 0;
}

int cuda_runtime_version() { return g_lib ? g_lib->info.runtime : 0; }

bool cuda_param_layout(int large) {
  const Library& l = lib();
  int result = 0;
  raise_status(l, l.param_layout(large, &result));
  return result != 0;
}

int cuda_run(const StepArgs& a, int device, intptr_t stream, int mode, int check,
             int32_t* flag) {
  const Library& l = lib();
  StepArgs args = a;
  HookRelay relay{a.sum_hook, nullptr};
  SumHook hook{&relay_hook, &relay};
  if (a.sum_hook) args.sum_hook = &hook;
  int result = -1;
  const int status = l.run(&args, device, stream, mode, check, flag, &result);
  if (relay.error) std::rethrow_exception(relay.error);
  raise_status(l, status);
  return result;
}

void cuda_fill_normal(float* out, int64_t n, uint64_t seed, uint32_t uid, uint64_t step,
                      uint32_t draw, int64_t offset, int device, intptr_t stream) {
  const Library& l = lib();
  raise_status(l, l.fill_normal(out, n, seed, uid, step, draw, offset, device, stream));
}

void cuda_probe(int device) {
  const Library& l = lib();
  raise_status(l, l.probe(device));
}

}  // namespace te
