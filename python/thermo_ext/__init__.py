"""thermo_ext: partitioned thermodynamic parameterization of neural networks for PyTorch.

Langevin (BAOAB), LaLa, adaptive Langevin (AdL), AdLaLa, LOL and overdamped Langevin as
torch.optim optimizers, run by fused C++/OpenMP (and CUDA) kernels with counter-based noise.
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (the compiled module takes tensors' raw pointers)

from . import _C
from . import kernels, partition, random, reference, schemes, stability, tuning
from .chains import Chains
from .kernels import get_num_threads, set_num_threads
from .methods import LOL, AdL, AdLaLa, LaLa, Langevin, Overdamped
from .optim import Thermo
from .posterior import PosteriorPredictive, posterior_temperature, prior_weight_decay
from .schedulers import TemperatureScheduler
from .stability import InstabilityWarning
from .tuning import from_adam, from_sgd

__all__ = ["Chains", "Thermo", "Langevin", "AdL", "Overdamped", "LaLa", "AdLaLa", "LOL",
           "TemperatureScheduler", "InstabilityWarning", "from_sgd", "from_adam", "build_info",
           "get_num_threads", "set_num_threads", "kernels", "partition", "random", "reference",
           "schemes", "stability", "tuning", "PosteriorPredictive", "posterior_temperature",
           "prior_weight_decay", "__version__"]


def build_info() -> dict:
    """What this build of the engine is and can do on this machine."""
    cuda = bool(_C.cuda_compiled())
    driver, runtime = _C.cuda_versions()  # 1000 * major + 10 * minor; 0 where unknown
    return {
        "version": __version__,
        "cuda": cuda,
        "cuda_archs": _C.cuda_build_info() if cuda else "",
        "cuda_driver": driver,
        "cuda_runtime": runtime,
        "cuda_available": cuda and torch.cuda.is_available(),
        "openmp_threads": get_num_threads(),
        "isa": _C.isa(),
        "isas": list(_C.isas()),
        "torch": torch.__version__,
    }
