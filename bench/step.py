"""Step-time benchmark: thermo_ext against torch.optim and thermo_ext.reference, side by side.

Every contender runs in this one process on the same tensors: warmed up, then timed in
interleaved rounds. The table prints each contender's ratio to Adam(fused) (of the medians over
the rounds, and of the minimums) next to its median, minimum and maximum time per step, and the
speed-up of the engine over the reference.

    python bench/step.py                 # CPU: 10 M float32 parameters in 20 tensors
    python bench/step.py --device cuda   # GPU: 2**26 float32 elements in 200 tensors
    python bench/step.py --spiral        # per-step overhead on the paper's 2-100-1 net
    python bench/step.py --isa all       # once per instruction set (THERMO_EXT_ISA), summary

The benchmark lives in the package (thermo_ext.benchmark) so that the installed console script
runs it too (``thermo-ext bench``, same options, same table); this file is its checkout entry point.
"""

from __future__ import annotations

import sys

from thermo_ext.benchmark import (Row, Timing, bench_noise, bench_spiral,  # noqa: F401
                                  bench_step, main, measure, print_table)

if __name__ == "__main__":
    sys.exit(main())
