// pybind11 surface of thermo_ext._C: raw pointers, counts and dtypes in; no libtorch.
//
// A Plan holds everything of one (group, device, dtype) call that does not change from step to
// step; a step sets its gradient pointers, program and step counter, and run_plans runs one
// mode of several plans in one call from Python (fewer crossings than a call per plan).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/cpu_engine.h"
#include "cuda/cuda_engine.h"
#include "engine.h"

namespace py = pybind11;
using namespace te;

namespace {

using OpTuple = std::tuple<int, int, int, double, double, double>;
// letter, factor (delta / h), draw, xi_version
using LetterTuple = std::tuple<int, double, int, int>;
// A group's hyperparameters (Hyper's fields in order): all kNumHyper, or only the first
// kNumLetterHyper, which the letters' coefficients read (the mass's settings then default).
using HyperValues = std::vector<double>;
constexpr int kNumLetterHyper = 6;

[[noreturn]] void bad_op(const char* arg, size_t i, const std::string& what) {
  throw std::invalid_argument(std::string(arg) + "[" + std::to_string(i) + "]: " + what);
}

bool is_noise(int letter) { return letter == kO || letter == kD || letter == kV; }

// Fills n_e and e_pos and rejects what no folded scheme produces: an unknown letter, a draw
// outside [0, kRoundingDraw) or shared by two noise letters (their noise would be the same), a
// C reading a xi version that no E before it produced (a read of an uninitialised, or with no
// E at all a null, workspace), or a xi version on another letter.
void finish_program(Program& p, const char* arg) {
  p.n_e = 0;
  for (int i = 0; i < p.n_ops; ++i) {
    const Op& op = p.ops[i];
    if (op.letter < kA || op.letter > kV)
      bad_op(arg, i, "unknown letter code " + std::to_string(op.letter) + "; expected 0.." +
                    std::to_string(kNumLetters - 1) + " (" + kLetterNames + ")");
    if (op.draw < 0 || op.draw >= (int)kRoundingDraw)
      bad_op(arg, i, "draw " + std::to_string(op.draw) + " out of range [0, " +
                    std::to_string(kRoundingDraw) + ") (" + std::to_string(kRoundingDraw) +
                    " is the stochastic-rounding draw)");
    if (is_noise(op.letter))
      for (int j = 0; j < i; ++j)
        if (is_noise(p.ops[j].letter) && p.ops[j].draw == op.draw)
          bad_op(arg, i, "draw " + std::to_string(op.draw) + " is already used by " +
                             std::string(arg) + "[" + std::to_string(j) +
                             "]; each noise letter needs its own draw");
    if (op.letter == kC) {
      if (op.xi_version < 0 || op.xi_version > p.n_e)
        bad_op(arg, i, "C reads xi version " + std::to_string(op.xi_version) + ", but " +
                           std::to_string(p.n_e) +
                           " E letter(s) precede it; expected a version in [0, " +
                           std::to_string(p.n_e) + "]");
    } else if (op.xi_version != 0) {
      bad_op(arg, i, "xi_version " + std::to_string(op.xi_version) +
                    " on a letter other than C; expected 0");
    }
    if (op.letter == kE) p.e_pos[p.n_e++] = i;
  }
}

void check_n_ops(size_t n, const char* arg) {
  if (n > (size_t)kMaxOps)
    throw std::invalid_argument(std::string(arg) + ": at most " + std::to_string(kMaxOps) +
                                " letters, got " + std::to_string(n));
}

// A program with explicit coefficients (no factors: device hyperparameters cannot rebuild it).
Program make_program(const std::vector<OpTuple>& ops) {
  check_n_ops(ops.size(), "ops");
  Program p{};
  p.n_ops = (int32_t)ops.size();
  p.grad_sign = 1.0;
  for (size_t i = 0; i < ops.size(); ++i) {
    Op& op = p.ops[i];
    std::tie(op.letter, op.draw, op.xi_version, op.c[0], op.c[1], op.c[2]) = ops[i];
  }
  finish_program(p, "ops");
  return p;
}

Hyper make_hyper(const HyperValues& t) {
  if ((int)t.size() != kNumHyper && (int)t.size() != kNumLetterHyper)
    throw std::invalid_argument("hyper: expected " + std::to_string(kNumHyper) + " values (or the "
                                "first " + std::to_string(kNumLetterHyper) + "), got " +
                                std::to_string(t.size()));
  double v[kNumHyper] = {0, 0, 0, 0, 0, 0, 0.999, 1e-8, 0};
  for (size_t i = 0; i < t.size(); ++i) v[i] = t[i];
  for (int i = 0; i < kNumHyper; ++i) {
    const bool gamma = i == 1;
    if (std::isnan(v[i]) || v[i] < 0 || (std::isinf(v[i]) && !gamma))
      throw std::invalid_argument(std::string("hyper.") + kHyperNames[i] + ": expected " +
                                  (gamma ? ">= 0 (inf allowed)" : "a finite number >= 0") +
                                  ", got " + std::to_string(v[i]));
  }
  if (!(v[6] < 1.0))
    throw std::invalid_argument("hyper.mass_beta: expected a number in [0, 1), got " +
                                std::to_string(v[6]));
  if (!(v[7] > 0.0))
    throw std::invalid_argument("hyper.mass_eps: expected a finite number > 0, got " +
                                std::to_string(v[7]));
  if (v[8] != std::floor(v[8]))
    throw std::invalid_argument("hyper.mass_freeze: expected a whole number of steps (0: never), "
                                "got " + std::to_string(v[8]));
  return Hyper{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8]};
}

// A program from a folded scheme's letters and a group's hyperparameters: the coefficients come
// from substeps.h, the formulas the CUDA engine also evaluates from device hyperparameters.
Program build_program(const std::vector<LetterTuple>& letters, const HyperValues& hyper,
                      bool maximize, bool mass) {
  check_n_ops(letters.size(), "letters");
  const Hyper h = make_hyper(hyper);
  Program p{};
  p.n_ops = (int32_t)letters.size();
  p.has_factors = 1;
  p.grad_sign = maximize ? -1.0 : 1.0;
  p.mass = mass ? 1 : 0;
  p.mass_beta = h.mass_beta;
  p.mass_eps = h.mass_eps;
  p.mass_freeze = h.mass_freeze;
  p.mass_wd = p.grad_sign * h.weight_decay;
  for (size_t i = 0; i < letters.size(); ++i) {
    Op& op = p.ops[i];
    double factor;
    std::tie(op.letter, factor, op.draw, op.xi_version) = letters[i];
    if (!(factor >= 0) || std::isinf(factor))
      bad_op("letters", i, "factor " + std::to_string(factor) +
                               "; expected a finite number >= 0");
    p.factor[i] = factor;
    letter_coefficients(op.letter, factor * h.lr, h, op.c, p.grad_sign);
  }
  finish_program(p, "letters");
  return p;
}

struct Plan {
  int device = -1;  // -1: CPU, else the CUDA device index
  int dtype = kFloat32;
  std::vector<TensorDesc> tensors;
  Program prog{};
  bool has_prog = false;
  uint64_t seed = 0, step = 0;
  intptr_t step_ptr = 0;
  intptr_t xi = 0;
  int n_seg = 1;
  std::vector<double> seg_n;
  intptr_t ws = 0;
  intptr_t scratch = 0;
  int64_t scratch_len = 0;
  intptr_t hyper = 0;
  bool stochastic_rounding = true;
  std::shared_ptr<CpuStore> cpu_store = std::make_shared<CpuStore>();

  StepArgs args() const {
    if (!has_prog) throw std::invalid_argument("plan: no program set");
    StepArgs a{};
    a.dtype = dtype;
    a.tensors = tensors.data();
    a.n_tensors = (int32_t)tensors.size();
    a.prog = &prog;
    a.seed = seed;
    a.step = step;
    a.step_ptr = (const int64_t*)step_ptr;
    a.xi = (double*)xi;
    a.n_seg = n_seg;
    a.seg_n = seg_n.data();
    a.ws = (double*)ws;
    a.stochastic_rounding = stochastic_rounding ? 1 : 0;
    a.scratch = (double*)scratch;
    a.scratch_len = scratch_len;
    a.hyper = (const double*)hyper;
    a.cpu_store = device < 0 ? cpu_store.get() : nullptr;
    return a;
  }
};

Plan make_plan(int device, int dtype, const std::vector<intptr_t>& thetas,
               const std::vector<intptr_t>& moms, const std::vector<int64_t>& numels,
               const std::vector<int64_t>& offsets, const std::vector<int64_t>& uids,
               const std::vector<int32_t>& segs, uint64_t seed, intptr_t step_ptr, intptr_t xi,
               int n_seg, const std::vector<double>& seg_n, intptr_t ws, intptr_t scratch,
               int64_t scratch_len, const std::vector<intptr_t>& masses,
               const std::vector<int64_t>& mass_starts) {
  const size_t n = thetas.size();
  if (moms.size() != n || numels.size() != n || offsets.size() != n || uids.size() != n ||
      segs.size() != n)
    throw std::invalid_argument("plan: per-tensor lists differ in length");
  if (!masses.empty() && (masses.size() != n || mass_starts.size() != n))
    throw std::invalid_argument("plan: masses and mass_starts: none, or one per tensor");
  if (n_seg < 1 || (int)seg_n.size() != n_seg)
    throw std::invalid_argument("plan: seg_n needs n_seg >= 1 entries");
  if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("plan: unknown dtype");
  Plan p;
  p.device = device;
  p.dtype = dtype;
  p.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (segs[i] < 0 || segs[i] >= n_seg) throw std::invalid_argument("plan: segment out of range");
    if (numels[i] < 0 || offsets[i] < 0) throw std::invalid_argument("plan: negative size");
    if (uids[i] < 0 || uids[i] > 0xFFFFFFFFll) throw std::invalid_argument("plan: uid range");
    p.tensors[i] = TensorDesc{(void*)thetas[i], (void*)moms[i], nullptr, numels[i], offsets[i],
                              (uint32_t)uids[i], segs[i],
                              masses.empty() ? nullptr : (void*)masses[i],
                              masses.empty() ? 0 : mass_starts[i]};
  }
  p.seed = seed;
  p.step_ptr = step_ptr;
  p.xi = xi;
  p.n_seg = n_seg;
  p.seg_n = seg_n;
  p.ws = ws;
  p.scratch = scratch;
  p.scratch_len = scratch_len;
  return p;
}

// One plan in `mode` (engine.h, RunMode).
int run_one(const Plan& p, intptr_t stream, int mode, bool check, intptr_t flag,
            const SumHook* hook) {
  StepArgs a = p.args();
  a.sum_hook = hook;
  if (p.device >= 0) return cuda_run(a, p.device, stream, mode, check, (int32_t*)flag);
  if (mode == kRunPre) return cpu_pre(a, check);
  if (mode == kRunFinish) return cpu_finish(a);
  return cpu_step(a, check);
}

// A Python sum hook, called with the number of the E whose sums it reduces.
void call_py_hook(void* ctx, int k) {
  py::gil_scoped_acquire gil;
  (*static_cast<py::object*>(ctx))(k);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "thermo_ext compiled engine (no libtorch: raw pointers in)";

  // The engine's constants, for Python to read rather than retype.
  py::dict dtypes, letters, modes;
  for (int i = 0; i < kNumDTypes; ++i) dtypes[kDTypeNames[i]] = i;
  for (int i = 0; i < kNumLetters; ++i) letters[py::str(std::string(1, kLetterNames[i]))] = i;
  for (int i = 0; i < 3; ++i) modes[kRunModeNames[i]] = -1 - i;
  py::tuple bad_kinds(kNumBadKinds), hyper_fields(kNumHyper);
  for (int i = 0; i < kNumBadKinds; ++i) bad_kinds[i] = kBadKindNames[i];
  for (int i = 0; i < kNumHyper; ++i) hyper_fields[i] = kHyperNames[i];
  // The letters a written scheme may use (V is the overdamped scheme's own), and those that draw
  // noise.
  std::string scheme_letters, noise_letters;
  for (int i = 0; i < kNumLetters; ++i) {
    if (i != kV) scheme_letters += kLetterNames[i];
    if (is_noise(i)) noise_letters += kLetterNames[i];
  }
  m.attr("DTYPE_CODES") = dtypes;        // torch dtype name -> code
  m.attr("LETTER_CODES") = letters;      // letter -> code
  m.attr("SCHEME_LETTERS") = scheme_letters;
  m.attr("NOISE_LETTERS") = noise_letters;
  m.attr("BAD_KINDS") = bad_kinds;       // kind of a non-finite value, by code % 4
  m.attr("MODES") = modes;               // run_plans mode name -> code
  m.attr("HYPER_FIELDS") = hyper_fields; // a hyperparameter tuple's (and tensor's) order
  m.attr("MAX_OPS") = kMaxOps;
  m.attr("ROUNDING_DRAW") = kRoundingDraw;
  m.attr("UID_GROUP_SHIFT") = kUidGroupShift;
  m.attr("UID_LIMIT") = kUidLimit;
  m.def(
      "make_uid",
      [](int64_t group, int64_t position) {
        if (group < 0 || group >= (int64_t)kUidLimit)
          throw std::invalid_argument("group: expected an int in [0, " +
                                      std::to_string(kUidLimit) + "), got " +
                                      std::to_string(group));
        if (position < 0 || position >= (int64_t)kUidLimit)
          throw std::invalid_argument("position: expected an int in [0, " +
                                      std::to_string(kUidLimit) + "), got " +
                                      std::to_string(position));
        return make_uid((uint32_t)group, (uint32_t)position);
      },
      py::arg("group"), py::arg("position"),
      "The noise counter's uid of parameter `position` of param group `group`.");
  m.def(
      "letter_coefficients",
      [](int letter, double delta, const HyperValues& hyper, bool maximize) {
        if (letter < kA || letter > kV)
          throw std::invalid_argument("letter: unknown letter code " + std::to_string(letter));
        double c[3];
        letter_coefficients(letter, delta, make_hyper(hyper), c, maximize ? -1.0 : 1.0);
        return std::make_tuple(c[0], c[1], c[2]);
      },
      py::arg("letter"), py::arg("delta"), py::arg("hyper"), py::arg("maximize") = false,
      "(c0, c1, c2) of a letter moving by delta under hyper = (lr, gamma, tau, sigma, eps, "
      "weight_decay[, mass_beta, mass_eps, mass_freeze]); maximize: B and V see -g.");

  py::class_<Program>(m, "Program")
      .def(py::init(&build_program), py::arg("letters"), py::arg("hyper"),
           py::arg("maximize") = false, py::arg("mass") = false,
           "letters: list of (letter, factor, draw, xi_version), factor = delta / h; hyper: "
           "HYPER_FIELDS' values (the first six will do for a unit mass); maximize: B and V "
           "see -g; mass: the adaptive mass. The coefficients are computed here.")
      .def(py::init(&make_program), py::arg("ops"),
           "ops: list of (letter, draw, xi_version, c0, c1, c2) with explicit coefficients")
      .def_property_readonly("n_ops", [](const Program& p) { return p.n_ops; })
      .def_property_readonly("n_e", [](const Program& p) { return p.n_e; })
      .def_property_readonly("ops", [](const Program& p) {
        std::vector<OpTuple> out;
        for (int i = 0; i < p.n_ops; ++i) {
          const Op& op = p.ops[i];
          out.emplace_back(op.letter, op.draw, op.xi_version, op.c[0], op.c[1], op.c[2]);
        }
        return out;
      }, "(letter, draw, xi_version, c0, c1, c2) of every op");

  py::class_<Plan>(m, "Plan")
      .def(py::init(&make_plan), py::arg("device"), py::arg("dtype"), py::arg("thetas"),
           py::arg("moms"), py::arg("numels"), py::arg("offsets"), py::arg("uids"),
           py::arg("segs"), py::arg("seed"), py::arg("step_ptr"), py::arg("xi"),
           py::arg("n_seg"), py::arg("seg_n"), py::arg("ws"), py::arg("scratch"),
           py::arg("scratch_len"), py::arg("masses") = std::vector<intptr_t>(),
           py::arg("mass_starts") = std::vector<int64_t>())
      .def("set", [](Plan& p, const std::vector<intptr_t>& grads, const Program& prog,
                     uint64_t step, bool stochastic_rounding) {
        if (grads.size() != p.tensors.size())
          throw std::invalid_argument("plan: expected one gradient per tensor");
        if (prog.mass)
          for (const TensorDesc& d : p.tensors)
            if (!d.mass && d.numel > 0)  // an empty shard's buffers have no address
              throw std::invalid_argument("plan: the program has an adaptive mass, but the plan "
                                          "was made without mass buffers");
        for (size_t i = 0; i < grads.size(); ++i) p.tensors[i].grad = (const void*)grads[i];
        p.prog = prog;
        p.has_prog = true;
        p.step = step;
        p.stochastic_rounding = stochastic_rounding;
      }, py::arg("grads"), py::arg("program"), py::arg("step"), py::arg("stochastic_rounding"),
      "Sets what changes every step: gradient pointers, program and step counter.")
      .def("set_hyper", [](Plan& p, intptr_t hyper) {
        if (hyper && p.device < 0)
          throw std::invalid_argument("hyper: device hyperparameters are for CUDA plans (the "
                                      "CPU engine uses the program's coefficients)");
        p.hyper = hyper;
      }, py::arg("hyper"),
      "A device pointer to len(HYPER_FIELDS) float64 hyperparameters (that order) from which "
      "every CUDA call recomputes the coefficients and mass settings, or 0 for the program's "
      "own.")
      .def_property_readonly("n_tensors", [](const Plan& p) { return (int)p.tensors.size(); });

  m.def(
      "run_plans",
      [](const std::vector<Plan*>& plans, const std::vector<intptr_t>& streams, bool check,
         intptr_t flag, const std::vector<int>& modes, const std::vector<py::object>& hooks) {
        const int n = (int)plans.size();
        if ((int)streams.size() != n) throw std::invalid_argument("streams: one per plan");
        if ((int)modes.size() != n) throw std::invalid_argument("modes: one per plan");
        if (!hooks.empty() && (int)hooks.size() != n)
          throw std::invalid_argument("hooks: none, or one (None or a callable) per plan");
        for (int mode : modes)
          if (mode != kRunAll && mode != kRunPre && mode != kRunFinish)
            throw std::invalid_argument("mode: expected -1 (all), -2 (pre) or -3 (finish), got " +
                                        std::to_string(mode));
        std::vector<SumHook> sum_hooks(n, SumHook{nullptr, nullptr});
        for (int i = 0; i < (int)hooks.size(); ++i)
          if (!hooks[i].is_none())
            sum_hooks[i] = SumHook{&call_py_hook, (void*)&hooks[i]};
        const auto hook = [&](int i) { return sum_hooks[i].fn ? &sum_hooks[i] : nullptr; };
        py::gil_scoped_release nogil;
        // Each entry's mode in order, up to the first refusal. Which modes run in which order
        // (a step over several plans: every "pre" before any "finish") is the caller's:
        // thermo_ext.backends.run_step, the one place that orders them.
        for (int i = 0; i < n; ++i) {
          const int bad = run_one(*plans[i], streams[i], modes[i],
                                  check && modes[i] != kRunFinish, flag, hook(i));
          if (bad >= 0) return std::make_pair(i, bad);
        }
        return std::make_pair(-1, -1);
      },
      py::arg("plans"), py::arg("streams"), py::arg("check"), py::arg("flag"), py::arg("modes"),
      py::arg("hooks") = std::vector<py::object>(),
      "Runs modes[i] (MODES) of plans[i] (a plan may appear more than once) in order, up to the "
      "first refusal. hooks[i], when not None, is called with k after plans[i]'s partial sums "
      "of E number k and before that E (distributed steps). Returns (entry, BadKind code) of "
      "the first refusal or (-1, -1).");

  m.def(
      "fill_normal",
      [](int device, intptr_t stream, intptr_t out, int64_t n, uint64_t seed, uint32_t uid,
         uint64_t step, uint32_t draw, int64_t offset) {
        py::gil_scoped_release nogil;
        if (device >= 0)
          cuda_fill_normal((float*)out, n, seed, uid, step, draw, offset, device, stream);
        else
          cpu_kernels().fill_normal((float*)out, n, seed, uid, step, draw, offset);
      },
      py::arg("device"), py::arg("stream"), py::arg("out"), py::arg("n"), py::arg("seed"),
      py::arg("uid"), py::arg("step"), py::arg("draw"), py::arg("offset"));

  m.def(
      "philox",
      [](intptr_t counters, intptr_t keys, intptr_t out, int64_t n) {
        const int64_t* c = (const int64_t*)counters;
        const int64_t* k = (const int64_t*)keys;
        int64_t* o = (int64_t*)out;
        for (int64_t i = 0; i < n; ++i) {
          uint32_t w0 = (uint32_t)c[4 * i], w1 = (uint32_t)c[4 * i + 1],
                   w2 = (uint32_t)c[4 * i + 2], w3 = (uint32_t)c[4 * i + 3];
          philox4x32_10(w0, w1, w2, w3, (uint32_t)k[2 * i], (uint32_t)k[2 * i + 1]);
          o[4 * i] = w0;
          o[4 * i + 1] = w1;
          o[4 * i + 2] = w2;
          o[4 * i + 3] = w3;
        }
      },
      py::arg("counters"), py::arg("keys"), py::arg("out"), py::arg("n"),
      "Philox4x32-10 words of n (counter[4], key[2]) rows of int64 into out[n][4].");

  m.def("set_num_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1");
    omp_set_num_threads(n);
  });
  m.def("get_num_threads", []() { return omp_get_max_threads(); });
  m.def("isa", []() { return std::string(cpu_kernels().isa); });
  m.def("isas", []() {
    const CpuKernels* ks[8];
    const int n = cpu_isas(ks, 8);
    std::vector<std::string> names;
    for (int i = 0; i < n; ++i) names.push_back(ks[i]->isa);
    return names;
  });
  m.def("cuda_compiled", []() { return cuda_compiled(); });
  m.def("cuda_build_info", []() { return cuda_build_info(); });
  m.def("cuda_scratch_doubles", [](const std::vector<int64_t>& numels) {
    return cuda_scratch_doubles(numels.data(), (int)numels.size());
  });
  m.def("cuda_versions", []() {
    int driver = 0, runtime = 0;
    cuda_versions(&driver, &runtime);
    return std::make_pair(driver, runtime);
  }, "(driver, runtime): the CUDA versions of the installed driver and of this build "
     "(1000 * major + 10 * minor; 0 where unknown)");
  // The CUDA engine library, loaded at run time (csrc/cuda/cuda_loader.cpp).
  const auto library_dict = [](const CudaLibraryInfo& i) {
    py::dict d;
    d["path"] = i.path;
    d["version"] = i.version;
    d["archs"] = i.archs;
    d["min_driver"] = i.min_driver;
    d["runtime"] = i.runtime;
    return d;
  };
  m.def("cuda_load", [library_dict](const std::string& path) {
    return library_dict(cuda_load(path));
  }, py::arg("path"), "Loads the CUDA engine library at path (checked against this module's "
     "engine sources) and routes CUDA calls to it; returns what it is.");
  m.def("cuda_library", [library_dict]() -> py::object {
    CudaLibraryInfo info;
    if (!cuda_loaded(&info)) return py::none();
    return library_dict(info);
  }, "The loaded CUDA engine library (path, version, archs, min_driver, runtime), or None.");
  m.def("cuda_probe", [](int device) {
    py::gil_scoped_release nogil;
    cuda_probe(device);
  }, py::arg("device"), "Raises RuntimeError when the loaded library's kernels cannot run on "
     "the device (no image for its architecture, or no usable driver).");
  m.def("cuda_param_layout", [](py::object large) {
    return cuda_param_layout(large.is_none() ? -1 : (large.cast<bool>() ? 1 : 0));
  }, py::arg("large") = py::none(),
  "Whether CUDA launches use the 32 KB kernel-parameter layout (else 4 KB); large=True/False "
  "sets it (True only where the build and the driver support it).");
}
