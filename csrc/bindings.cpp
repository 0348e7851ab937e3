// pybind11 surface of thermo_ext._C: raw pointers, counts and dtypes in; no libtorch.
//
// A Plan holds everything of one (group, device, dtype) call that does not change from step to
// step; a step sets its gradient pointers, program and step counter, and run_plans executes a
// whole optimizer step (every plan) in one call from Python.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

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

Program make_program(const std::vector<OpTuple>& ops) {
  if (ops.size() > (size_t)kMaxOps)
    throw std::invalid_argument("scheme: at most " + std::to_string(kMaxOps) + " letters");
  Program p{};
  p.n_ops = (int32_t)ops.size();
  for (size_t i = 0; i < ops.size(); ++i) {
    Op& op = p.ops[i];
    std::tie(op.letter, op.draw, op.xi_version, op.c[0], op.c[1], op.c[2]) = ops[i];
    if (op.letter < kA || op.letter > kV) throw std::invalid_argument("scheme: unknown letter code");
    if (op.letter == kE) p.e_pos[p.n_e++] = (int32_t)i;
  }
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
  bool stochastic_rounding = true;

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
    return a;
  }
};

Plan make_plan(int device, int dtype, const std::vector<intptr_t>& thetas,
               const std::vector<intptr_t>& moms, const std::vector<int64_t>& numels,
               const std::vector<int64_t>& offsets, const std::vector<int64_t>& uids,
               const std::vector<int32_t>& segs, uint64_t seed, intptr_t step_ptr, intptr_t xi,
               int n_seg, const std::vector<double>& seg_n, intptr_t ws, intptr_t scratch,
               int64_t scratch_len) {
  const size_t n = thetas.size();
  if (moms.size() != n || numels.size() != n || offsets.size() != n || uids.size() != n ||
      segs.size() != n)
    throw std::invalid_argument("plan: per-tensor lists differ in length");
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
                              (uint32_t)uids[i], segs[i]};
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

// phase >= 0: that phase; -1: the whole step; -2: everything that can fail (cpu_pre).
int run_one(const Plan& p, intptr_t stream, int phase, bool check, intptr_t flag) {
  const StepArgs a = p.args();
  if (phase < -2 || phase > a.prog->n_e) throw std::invalid_argument("step: no such phase");
  if (p.device >= 0) return cuda_run(a, p.device, stream, phase, check, (int32_t*)flag);
  if (phase == -1) return cpu_step(a, check);
  if (phase == -2) return cpu_pre(a, check);
  return cpu_kernels().run_phase(a, phase, check);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "thermo_ext compiled engine (no libtorch: raw pointers in)";

  py::class_<Program>(m, "Program")
      .def(py::init(&make_program), py::arg("ops"),
           "ops: list of (letter, draw, xi_version, c0, c1, c2), letters A B O C D E V = 0..6")
      .def_property_readonly("n_ops", [](const Program& p) { return p.n_ops; })
      .def_property_readonly("n_e", [](const Program& p) { return p.n_e; });

  py::class_<Plan>(m, "Plan")
      .def(py::init(&make_plan), py::arg("device"), py::arg("dtype"), py::arg("thetas"),
           py::arg("moms"), py::arg("numels"), py::arg("offsets"), py::arg("uids"),
           py::arg("segs"), py::arg("seed"), py::arg("step_ptr"), py::arg("xi"),
           py::arg("n_seg"), py::arg("seg_n"), py::arg("ws"), py::arg("scratch"),
           py::arg("scratch_len"))
      .def("set", [](Plan& p, const std::vector<intptr_t>& grads, const Program& prog,
                     uint64_t step, bool stochastic_rounding) {
        if (grads.size() != p.tensors.size())
          throw std::invalid_argument("plan: expected one gradient per tensor");
        for (size_t i = 0; i < grads.size(); ++i) p.tensors[i].grad = (const void*)grads[i];
        p.prog = prog;
        p.has_prog = true;
        p.step = step;
        p.stochastic_rounding = stochastic_rounding;
      }, py::arg("grads"), py::arg("program"), py::arg("step"), py::arg("stochastic_rounding"),
      "Sets what changes every step: gradient pointers, program and step counter.")
      .def_property_readonly("n_tensors", [](const Plan& p) { return (int)p.tensors.size(); });

  m.def(
      "run_plans",
      [](const std::vector<Plan*>& plans, const std::vector<intptr_t>& streams, bool check,
         intptr_t flag, int mode) {
        if (streams.size() != plans.size())
          throw std::invalid_argument("run_plans: one stream per plan");
        py::gil_scoped_release nogil;
        const int n = (int)plans.size();
        // With several plans and a check, everything that can fail runs first for all plans:
        // a failed step changes nothing anywhere. mode: -1 whole step, -2 pre only, -3 finish.
        const bool staged = mode == -1 && check && n > 1;
        for (int i = 0; i < n; ++i) {
          const int phase = mode == -3 ? plans[i]->prog.n_e : (staged ? -2 : mode);
          const int bad = run_one(*plans[i], streams[i], phase, check && mode != -3, flag);
          if (bad >= 0) return std::make_pair(i, bad);
        }
        if (staged)
          for (int i = 0; i < n; ++i) run_one(*plans[i], streams[i], plans[i]->prog.n_e, false, flag);
        return std::make_pair(-1, -1);
      },
      py::arg("plans"), py::arg("streams"), py::arg("check"), py::arg("flag"), py::arg("mode"),
      "One optimizer step over all plans. Returns (plan, BadKind code) or (-1, -1).");

  m.def(
      "run_phase",
      [](const Plan& p, intptr_t stream, int phase, bool check, intptr_t flag) {
        py::gil_scoped_release nogil;
        return run_one(p, stream, phase, check, flag);
      },
      py::arg("plan"), py::arg("stream"), py::arg("phase"), py::arg("check"), py::arg("flag"));

  m.def(
      "update_xi",
      [](const Plan& p, intptr_t stream, int k, intptr_t flag, bool check) {
        const StepArgs a = p.args();
        if (k < 0 || k >= a.prog->n_e) throw std::invalid_argument("update_xi: no such E");
        if (p.device >= 0) return cuda_update_xi(a, p.device, stream, k, (int32_t*)flag);
        return cpu_update_xi(a, k, check);
      },
      py::arg("plan"), py::arg("stream"), py::arg("k"), py::arg("flag"), py::arg("check") = true);

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
  m.attr("max_ops") = kMaxOps;
}
