"""Shared fixtures of the CPU test suite (kept small: helpers live in the test files)."""

from __future__ import annotations

import pytest
import torch

import thermo_ext


@pytest.fixture
def restore_threads():
    """Restores the engine's OpenMP thread count after a test that changes it."""
    before = thermo_ext._C.get_num_threads()
    yield thermo_ext._C.set_num_threads
    thermo_ext._C.set_num_threads(before)


@pytest.fixture
def gen():
    """A seeded torch generator, so that every test draws the same inputs on every run."""
    return torch.Generator().manual_seed(1234)
