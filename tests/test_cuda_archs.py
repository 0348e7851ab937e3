"""cmake/cuda_archs.py: the CUDA architectures a build of the engine library compiles for."""

from __future__ import annotations

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cmake",
                     "cuda_archs.py")
if not os.path.exists(_PATH):  # an installed wheel's tests, without the source tree
    pytest.skip("needs the source tree (cmake/cuda_archs.py)", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("cuda_archs", _PATH)
ca = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ca)

CUDA13 = ca.toolkit_archs("sm_75 sm_80 sm_86 sm_87 sm_88 sm_89 sm_90 sm_100 sm_110 sm_103 "
                          "sm_120 sm_121")


def test_all_is_every_toolkit_architecture_from_sm75_and_ptx_of_the_newest():
    archs, why = ca.choose("all", CUDA13, [], "")
    assert archs == ["75-real", "80-real", "86-real", "87-real", "88-real", "89-real", "90-real",
                     "100-real", "103-real", "110-real", "120-real", "121-real", "121-virtual"]
    assert "THERMO_EXT_CUDA_ARCHS=all" in why


def test_torch_arch_list_is_followed_and_what_cannot_be_built_is_named():
    archs, why = ca.choose("", CUDA13, ["sm_50", "sm_75", "sm_80", "sm_90", "sm_120",
                                        "compute_120"], "")
    assert archs == ["75-real", "80-real", "90-real", "120-real", "120-virtual"]
    assert "installed torch" in why and "left out" in why and "sm_50" in why


def test_torch_cuda_arch_list_wins_over_torch_and_reads_its_notation():
    archs, why = ca.choose("", CUDA13, ["sm_80"], "7.5;8.6+PTX 9.0a")
    assert archs == ["75-real", "86-real", "86-virtual", "90a-real"]
    assert why.startswith("TORCH_CUDA_ARCH_LIST=")
    archs, _ = ca.choose("8.9", CUDA13, ["sm_80"], "7.5")  # THERMO_EXT_CUDA_ARCHS first
    assert archs == ["89-real"]


def test_no_torch_means_every_architecture_and_bad_entries_are_refused():
    archs, why = ca.choose("", CUDA13, [], "")
    assert archs[0] == "75-real" and archs[-1] == "121-virtual" and "TORCH_CUDA_ARCH_LIST" in why
    with pytest.raises(SystemExit, match="cannot read 'Ampere'"):
        ca.choose("", CUDA13, [], "Ampere")
    with pytest.raises(SystemExit, match="no architecture left"):
        ca.choose("6.1", CUDA13, [], "")
