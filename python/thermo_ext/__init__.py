"""thermo_ext: partitioned thermodynamic parameterization of neural networks for PyTorch.

Langevin (BAOAB), LaLa, adaptive Langevin (AdL), AdLaLa, LOL and overdamped Langevin as
torch.optim optimizers, run by fused C++/OpenMP (and CUDA) kernels with counter-based noise.
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (the compiled module takes tensors' raw pointers)

from . import _C
from . import cuda_library, kernels, partition, random, reference, schemes, stability, tuning
from .chains import Chains
from .fallback import EngineFallbackWarning
from .kernels import get_num_threads, set_num_threads
from .methods import LOL, AdL, AdLaLa, LaLa, Langevin, Overdamped
from .optim import Thermo
from .posterior import PosteriorPredictive, posterior_temperature, prior_weight_decay
from .schedulers import TemperatureScheduler
from .stability import InstabilityWarning
from .tuning import from_adam, from_sgd

__all__ = ["Chains", "Thermo", "Langevin", "AdL", "Overdamped", "LaLa", "AdLaLa", "LOL",
           "TemperatureScheduler", "InstabilityWarning", "EngineFallbackWarning", "from_sgd",
           "from_adam", "build_info", "get_num_threads", "set_num_threads", "cuda_library",
           "kernels", "partition", "random", "reference", "schemes", "stability", "tuning",
           "PosteriorPredictive", "posterior_temperature", "prior_weight_decay", "__version__"]


def build_info() -> dict:
    """What this build of the engine is and can do on this machine. The CUDA engine is a library
    loaded at the first CUDA step (thermo_ext.cuda_library); until then ``cuda_library`` is None
    and ``cuda_library_why`` says which one would be loaded and why. Nothing is loaded here."""
    from . import cuda_library

    cuda = cuda_library.info()
    loaded = _C.cuda_library()
    chosen = cuda_library.choose()
    driver, runtime = _C.cuda_versions()  # 1000 * major + 10 * minor; 0 where unknown
    usable = [v.usable for v in cuda_library._verdicts.values()]
    return {
        "version": __version__,
        # a CUDA engine library for this torch is installed (or loaded)
        "cuda": bool(loaded) or chosen.path is not None,
        **cuda,
        "cuda_archs": loaded["archs"] if loaded else "",
        "cuda_min_driver": loaded["min_driver"] if loaded else "",
        "cuda_driver": driver,
        "cuda_runtime": runtime,
        "cuda_available": (bool(loaded) or chosen.path is not None) and all(usable)
        and torch.cuda.is_available(),
        "openmp_threads": get_num_threads(),
        "isa": _C.isa(),
        "isas": list(_C.isas()),
        "torch": torch.__version__,
    }
