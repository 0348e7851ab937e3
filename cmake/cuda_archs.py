"""The CUDA architectures a build of the engine library compiles for (CMakeLists.txt).

    python cmake/cuda_archs.py --toolkit "sm_75 sm_80 ..." [--request REQ] [--torch "sm_80 ..."]

Prints two lines: the architectures, comma-separated ("75-real,80-real,90-virtual"), and why it was
chosen. REQ is THERMO_EXT_CUDA_ARCHS: "all" (every architecture of the toolkit from sm_75 on as
SASS, plus PTX of the newest: what the wheel carries), "torch" or "" (the default: the
TORCH_CUDA_ARCH_LIST environment variable when set, else the architectures of the installed
torch, ``torch.cuda.get_arch_list()``, else "all"), or an explicit list in TORCH_CUDA_ARCH_LIST's
notation ("7.5;8.6+PTX" or "7.5 8.6+PTX"). Architectures the toolkit cannot compile, or below
the engine's sm_70, are left out with a note.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

MIN_ARCH = 70  # the engine's kernels use __grid_constant__ parameters (csrc/cuda/engine.cu)
WHEEL_FLOOR = 75


def _num(code: str):
    m = re.fullmatch(r"(?:sm|compute)_(\d+)([af]?)", code)
    return (int(m.group(1)), m.group(2)) if m else None


def toolkit_archs(codes: str):
    out = sorted({n for c in codes.split() if (v := _num(c)) and not v[1] for n in [v[0]]})
    if not out:
        raise SystemExit(f"cuda_archs.py: no sm_XY in the toolkit's list: {codes!r}")
    return out


def all_archs(toolkit):
    archs = [a for a in toolkit if a >= WHEEL_FLOOR]
    return [f"{a}-real" for a in archs] + [f"{archs[-1]}-virtual"]


def parse_torch_list(text: str, where: str):
    """TORCH_CUDA_ARCH_LIST notation -> [(number, suffix, ptx)]."""
    out = []
    for item in re.split(r"[;\s]+", text.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if not m:
            raise SystemExit(f"thermo_ext: {where}: cannot read {item!r}; expected entries such "
                             f"as 7.5, 8.6+PTX or 9.0a, separated by ';' or spaces")
        out.append((int(m.group(1)) * 10 + int(m.group(2)), m.group(3), bool(m.group(4))))
    return out


def parse_torch_arch_list(codes):
    """torch.cuda.get_arch_list() (sm_80, compute_90, ...) -> [(number, suffix, ptx)]."""
    out = []
    for c in codes:
        v = _num(c)
        if v is None:
            continue
        out.append((v[0], v[1], c.startswith("compute_")))
    return out


def to_cmake(entries, toolkit):
    archs, dropped = [], []
    for n, suffix, ptx in entries:
        if n < MIN_ARCH or n not in toolkit:
            dropped.append(f"sm_{n}{suffix}")
            continue
        kind = "virtual" if ptx else "real"
        for k in (["real", "virtual"] if ptx and not suffix else [kind]):
            a = f"{n}{suffix}-{k}"
            if a not in archs:
                archs.append(a)
    return archs, sorted(set(dropped))


def choose(request: str, toolkit, torch_codes, env_list):
    request = (request or "").strip()
    if request == "all":
        return all_archs(toolkit), "THERMO_EXT_CUDA_ARCHS=all: every architecture of the " \
                                   "toolkit from sm_75 on, and PTX of the newest"
    if request not in ("", "torch"):
        entries, why = parse_torch_list(request, "THERMO_EXT_CUDA_ARCHS"), \
            f"THERMO_EXT_CUDA_ARCHS={request}"
    elif env_list:
        entries, why = parse_torch_list(env_list, "TORCH_CUDA_ARCH_LIST"), \
            f"TORCH_CUDA_ARCH_LIST={env_list}"
    elif torch_codes:
        entries = parse_torch_arch_list(torch_codes)
        why = f"the architectures of the installed torch ({' '.join(torch_codes)})"
    else:
        return all_archs(toolkit), "no torch with CUDA to follow at build time (build " \
            "isolation, or a CPU torch): every architecture of the toolkit from sm_75 on, and " \
            "PTX of the newest (set TORCH_CUDA_ARCH_LIST, e.g. 9.0, for a faster build)"
    archs, dropped = to_cmake(entries, toolkit)
    if dropped:
        why += f"; left out (below sm_{MIN_ARCH} or unknown to this toolkit): {', '.join(dropped)}"
    if not archs:
        raise SystemExit(f"thermo_ext: {why}: no architecture left to compile for")
    return archs, why


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--toolkit", required=True, help="nvcc --list-gpu-code")
    ap.add_argument("--request", default="")
    ap.add_argument("--torch", default="", help="torch.cuda.get_arch_list(), space separated")
    a = ap.parse_args(argv)
    archs, why = choose(a.request, toolkit_archs(a.toolkit), a.torch.split(),
                        os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    print(",".join(archs))
    print(why)


if __name__ == "__main__":
    sys.exit(main())
