// pybind11 surface of thermo_ext._C: raw pointers, counts and dtypes in; no libtorch.
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

struct Call {
  std::vector<TensorDesc> tensors;
  StepArgs args{};
};

Call make_call(int dtype, const std::vector<intptr_t>& thetas, const std::vector<intptr_t>& moms,
               const std::vector<intptr_t>& grads, const std::vector<int64_t>& numels,
               const std::vector<int64_t>& offsets, const std::vector<int64_t>& uids,
               const std::vector<int32_t>& segs, const Program& prog, uint64_t seed,
               uint64_t step, intptr_t step_ptr, intptr_t xi, int n_seg,
               const std::vector<double>& seg_n, intptr_t ws, bool stochastic_rounding) {
  const size_t n = thetas.size();
  if (moms.size() != n || grads.size() != n || numels.size() != n || offsets.size() != n ||
      uids.size() != n || segs.size() != n)
    throw std::invalid_argument("engine: per-tensor lists differ in length");
  if ((int)seg_n.size() != n_seg) throw std::invalid_argument("engine: seg_n needs n_seg entries");
  if (dtype < kFloat32 || dtype > kFloat16) throw std::invalid_argument("engine: unknown dtype");
  Call c;
  c.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (segs[i] < 0 || segs[i] >= n_seg) throw std::invalid_argument("engine: segment out of range");
    c.tensors[i] = TensorDesc{(void*)thetas[i], (void*)moms[i], (const void*)grads[i], numels[i],
                              offsets[i], (uint32_t)uids[i], segs[i]};
  }
  StepArgs& a = c.args;
  a.dtype = dtype;
  a.tensors = c.tensors.data();
  a.n_tensors = (int32_t)n;
  a.prog = &prog;
  a.seed = seed;
  a.step = step;
  a.step_ptr = (const int64_t*)step_ptr;
  a.xi = (double*)xi;
  a.n_seg = n_seg;
  a.seg_n = seg_n.data();
  a.ws = (double*)ws;
  a.stochastic_rounding = stochastic_rounding ? 1 : 0;
  return c;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "thermo_ext compiled engine (no libtorch: raw pointers in)";

  py::class_<Program>(m, "Program")
      .def(py::init(&make_program), py::arg("ops"),
           "ops: list of (letter, draw, xi_version, c0, c1, c2), letters A B O C D E V = 0..6")
      .def_property_readonly("n_ops", [](const Program& p) { return p.n_ops; })
      .def_property_readonly("n_e", [](const Program& p) { return p.n_e; });

  m.def(
      "step",
      [](int device, intptr_t stream, int dtype, const std::vector<intptr_t>& thetas,
         const std::vector<intptr_t>& moms, const std::vector<intptr_t>& grads,
         const std::vector<int64_t>& numels, const std::vector<int64_t>& offsets,
         const std::vector<int64_t>& uids, const std::vector<int32_t>& segs, const Program& prog,
         uint64_t seed, uint64_t step, intptr_t step_ptr, intptr_t xi, int n_seg,
         const std::vector<double>& seg_n, intptr_t ws, int phase, bool check,
         bool stochastic_rounding, intptr_t flag_ptr) {
        Call c = make_call(dtype, thetas, moms, grads, numels, offsets, uids, segs, prog, seed,
                           step, step_ptr, xi, n_seg, seg_n, ws, stochastic_rounding);
        if (device >= 0) {
          py::gil_scoped_release nogil;
          return cuda_run(c.args, device, stream, phase, check, (int32_t*)flag_ptr);
        }
        py::gil_scoped_release nogil;
        if (phase < 0) return cpu_step(c.args, check);
        return cpu_kernels().run_phase(c.args, phase, check);
      },
      py::arg("device"), py::arg("stream"), py::arg("dtype"), py::arg("thetas"), py::arg("moms"),
      py::arg("grads"), py::arg("numels"), py::arg("offsets"), py::arg("uids"), py::arg("segs"),
      py::arg("program"), py::arg("seed"), py::arg("step"), py::arg("step_ptr"), py::arg("xi"),
      py::arg("n_seg"), py::arg("seg_n"), py::arg("ws"), py::arg("phase"), py::arg("check"),
      py::arg("stochastic_rounding"), py::arg("flag_ptr"),
      "Runs phase `phase` (all phases and xi updates when -1). Returns -1 or a BadKind code.");

  m.def(
      "update_xi",
      [](int device, intptr_t stream, const Program& prog, intptr_t xi, int n_seg,
         const std::vector<double>& seg_n, intptr_t ws, int k, intptr_t flag_ptr) {
        if ((int)seg_n.size() != n_seg) throw std::invalid_argument("update_xi: seg_n length");
        if (k < 0 || k >= prog.n_e) throw std::invalid_argument("update_xi: no such E");
        StepArgs a{};
        a.prog = &prog;
        a.xi = (double*)xi;
        a.n_seg = n_seg;
        a.seg_n = seg_n.data();
        a.ws = (double*)ws;
        if (device >= 0) return cuda_update_xi(a, device, stream, k, (int32_t*)flag_ptr);
        return cpu_update_xi(a, k);
      },
      py::arg("device"), py::arg("stream"), py::arg("program"), py::arg("xi"), py::arg("n_seg"),
      py::arg("seg_n"), py::arg("ws"), py::arg("k"), py::arg("flag_ptr"));

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
  m.attr("max_ops") = kMaxOps;
}
