"""Writes csrc/cuda/engine.cu as plain C++ for the CPU emulation of tools/cuda_emu/cuda_emu.h.

    python tools/cuda_emu/translate.py SRC OUT

Only two things change: the CUDA runtime header becomes the emulation header, and every launch
``kernel<<<grid, block, smem, stream>>>(args);`` becomes ``emu_launch(grid, block, smem, stream,
body)``, where ``body`` calls the kernel with copies of the arguments (as a launch copies them).
"""

import re
import sys

# (a kernel's template arguments and its launch configuration may be on different lines)
LAUNCH = re.compile(r"([\w:]+(?:<[^;<>]*>)?)\s*<<<(.*?)>>>\((.*?)\);", re.S)


def translate(src: str) -> str:
    if "#include <cuda_runtime.h>" not in src:
        raise SystemExit("translate.py: no '#include <cuda_runtime.h>' in the source")
    src = src.replace("#include <cuda_runtime.h>", '#include "cuda_emu.h"')

    def launch(m: re.Match) -> str:
        kernel, config, args = m.group(1), m.group(2), m.group(3)
        return (f"emu_launch({config}, [emu_args = std::make_tuple({args})]() {{ "
                f"std::apply([](const auto&... a) {{ {kernel}(a...); }}, emu_args); }});")

    out, n = LAUNCH.subn(launch, src)
    if n == 0 or "<<<" in out:
        raise SystemExit(f"translate.py: {n} launches rewritten, '<<<' left: {'<<<' in out}")
    return f'// Generated from {sys.argv[1]} by tools/cuda_emu/translate.py: do not edit.\n' + out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        text = translate(f.read())
    with open(sys.argv[2], "w") as f:
        f.write(text)
