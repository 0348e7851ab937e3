"""Smoke test of an installed thermo_ext wheel (tools/wheel_smoke.sh, tools/check_cuda_wheel.sh).

Run from outside the source tree: checks that the package comes from site-packages, that
importing it and stepping CPU tensors loads no CUDA code, that a short AdLaLa run trains, and
prints build_info(). With --expect-cuda-lib MAJOR it also checks that the wheel carries the
library of that CUDA major and that the rule chooses it beside this torch.
"""

import argparse
import os
import sys

import torch

import thermo_ext as te

ap = argparse.ArgumentParser()
ap.add_argument("--expect-cuda-lib", type=int, default=None)
args = ap.parse_args()

here = os.path.dirname(os.path.abspath(te.__file__))
assert "site-packages" in here, f"thermo_ext imported from {here}, not an installed wheel"
print("thermo_ext", te.__version__, "from", here, "| torch", torch.__version__,
      "| CUDA", torch.version.cuda)

torch.manual_seed(0)
x = torch.randn(256, 2)
y = (x[:, :1] * x[:, 1:] > 0).float()
model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
opt = te.AdLaLa(model, seed=1)
loss_fn = torch.nn.BCEWithLogitsLoss()
first = None
for _ in range(300):
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    first = first if first is not None else float(loss)
print(f"AdLaLa: loss {first:.3f} -> {float(loss):.3f}")
assert float(loss) < 0.8 * first, "the smoke run did not train"

# thermo_ext's CUDA code, that is: a CUDA build of torch maps its own CUDA runtime at import.
maps = open("/proc/self/maps").read()
assert "libthermo_ext_cuda" not in maps and te._C.cuda_library() is None, \
    "CPU steps loaded the CUDA engine library"
print("CPU steps loaded no CUDA code of thermo_ext")

info = te.build_info()
for k, v in info.items():
    print(f"  {k}: {v}")
if args.expect_cuda_lib is not None:
    want = f"libthermo_ext_cuda{args.expect_cuda_lib}.so"
    assert want in info["cuda_libraries"], info["cuda_libraries"]
    choice = te.cuda_library.choose()
    assert choice.path and choice.path.endswith(want), choice
    print("chosen:", choice.why)
print("smoke test passed")
sys.exit(0)
