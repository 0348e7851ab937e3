"""The CUDA engine as a library chosen at run time, and the CUDA step that always works
(docs/DESIGN.md, "The CUDA engine library"), on a machine without a GPU:

* the torch-op noise (thermo_ext.torch_noise) against the engine's: the Philox words exactly,
  the normals bit for bit;
* the choice of library (torch's CUDA major, never across majors; the environment's overrides),
  the loader's refusal of a library built from other sources, and that importing thermo_ext
  and stepping CPU tensors loads no CUDA code;
* the fallback: chosen only by default and only where the engine cannot run, one warning per
  reason naming the reason, cost and fix, and steps equal to the reference's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import pytest
import torch

import thermo_ext as te
from thermo_ext import _C, cuda_library, fallback, torch_noise
from thermo_ext import random as te_random
from thermo_ext.backends import BACKENDS

# ---------------------------------------------------------------------------------------------
# torch-op noise
# ---------------------------------------------------------------------------------------------


def test_torch_philox_known_answers_and_random_words():
    # docs/DESIGN.md, Noise: Random123's known answers
    zero = torch_noise.philox_words(torch.zeros(4, dtype=torch.int64),
                                    torch.zeros(2, dtype=torch.int64))
    assert zero.tolist() == [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    ones = torch_noise.philox_words(torch.full((4,), 2**32 - 1), torch.full((2,), 2**32 - 1))
    assert ones.tolist() == [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 2**32, (4096, 4), generator=gen)
    keys = torch.randint(0, 2**32, (4096, 2), generator=gen)
    counters[:8] = 2**32 - 1  # the products' extremes
    keys[:4] = 0
    assert torch.equal(torch_noise.philox_words(counters, keys), te_random.philox(counters, keys))


@pytest.mark.parametrize("n, offset, seed, uid, step, draw", [
    (1, 0, 0, 0, 0, 0),
    (7, 3, 1, 2, 3, 1),
    (40_003, 5, 2**40 + 987654321, (3 << 16) | 5, 2**33 + 9, 2),
    (1021, 2**33 + 1, 2**64 - 1, 2**32 - 1, 2**32 - 1, 0xFFFF),
])
def test_torch_normals_equal_the_engines_bit_for_bit(n, offset, seed, uid, step, draw):
    kw = dict(seed=seed, uid=uid, step=step, draw=draw, offset=offset)
    want = te_random.normal(n, **kw)                      # the CPU engine (csrc/philox.h)
    got = torch_noise.normal(n, **kw)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    with torch_noise.native(exact=True):
        assert torch_noise.in_use("cpu") and torch_noise.exact_mode()
        assert torch.equal(te_random.normal(n, **kw), want)
    assert not torch_noise.in_use("cpu")
    # the fallback's default: torch's float64 log/sin/cos, within 4 ulps of the engine's
    fast = torch_noise.normal(n, exact=False, **kw)
    ulps = (fast.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 4, int(ulps.max())
    with torch_noise.native():                            # what the fallback draws by default
        assert not torch_noise.exact_mode()
        assert torch.equal(te_random.normal(n, **kw), fast)


def test_many_draws_at_once_equal_each_alone():
    specs = [(7, 1, 2, 3, 0, 0), (1, 5, 6, 2**33, 1, 13), (20_001, 2**64 - 1, 9, 9, 2, 3),
             (4, 5, 6, 7, 8, 4)]
    for exact in (True, False):
        for (n, seed, uid, step, draw, off), z in zip(specs, torch_noise.normal_many(
                specs, "cpu", exact)):
            want = torch_noise.normal(n, seed=seed, uid=uid, step=step, draw=draw, offset=off,
                                      exact=exact)
            assert torch.equal(z, want)


def test_noise_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv(torch_noise.ENV_MODE, "exact")
    assert torch_noise.exact_mode()
    monkeypatch.setenv(torch_noise.ENV_MODE, "fastest")
    with pytest.raises(ValueError, match="THERMO_EXT_FALLBACK_NOISE='fastest': expected"):
        torch_noise.exact_mode()
    with torch_noise.native(exact=False):
        assert not torch_noise.exact_mode()


def test_torch_normals_of_runs_and_wide_words():
    kw = dict(seed=11, uid=7, step=5, draw=1, offset=13, runs=(6, 40))
    want = te_random.normal_runs(36, **kw)
    assert torch.equal(torch_noise.normal_runs(36, **kw), want)
    with torch_noise.native(exact=True):
        assert torch.equal(te_random.normal_runs(36, **kw), want)
    # the Box–Muller extremes: w_a = 0 and 2**32 - 1, every quadrant boundary of w_b
    wa = torch.tensor([0, 1, 2**31, 2**32 - 1] * 4, dtype=torch.int64)
    wb = torch.tensor([0, 2**29, 2**29 - 1, 2**30, 2**31, 3 * 2**30, 2**32 - 2**29, 2**32 - 1]
                      * 2, dtype=torch.int64)
    z_even, z_odd = torch_noise.box_muller(wa, wb)
    assert torch.isfinite(z_even).all() and torch.isfinite(z_odd).all()
    r = torch.sqrt(-2 * torch.log(wa.double() * 2.0**-32 + 2.0**-33))
    ang = 2 * torch.pi * wb.double() * 2.0**-32
    # float32 as written (u rounds to 1 for w_a = 2**32 - 1: r = 0 there, 1.5e-5 in double)
    torch.testing.assert_close(z_even.double(), r * torch.cos(ang), rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(z_odd.double(), r * torch.sin(ang), rtol=1e-6, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# choosing the library
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def libs(tmp_path, monkeypatch):
    """A lib/ directory with libraries for CUDA 12 and 13 (empty files: choose() loads none)."""
    for major in (12, 13):
        (tmp_path / f"libthermo_ext_cuda{major}.so").write_bytes(b"")
    (tmp_path / "libthermo_ext_cuda_emu.so").write_bytes(b"")   # never chosen by the rule
    (tmp_path / "notes.txt").write_text("")
    monkeypatch.setattr(cuda_library, "lib_dir", lambda: str(tmp_path))
    monkeypatch.delenv(cuda_library.ENV_LIB, raising=False)
    monkeypatch.delenv(cuda_library.ENV_VERSION, raising=False)
    return tmp_path


@pytest.mark.parametrize("torch_cuda, major", [("13.0", 13), ("12.8", 12), ("12.4", 12)])
def test_the_library_of_torchs_cuda_major_is_chosen(libs, monkeypatch, torch_cuda, major):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    assert sorted(cuda_library.available()) == [12, 13]
    c = cuda_library.choose()
    assert c.path == str(libs / f"libthermo_ext_cuda{major}.so") and c.major == major
    assert f"uses CUDA {torch_cuda}: the library built for CUDA {major}" in c.why


def test_never_across_majors(libs, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "11.8")
    c = cuda_library.choose()
    assert c.path is None and c.major == 11
    assert "no engine library built for CUDA 11 (it has: CUDA 12, CUDA 13" in c.why
    assert "never used across CUDA major versions" in c.why
    monkeypatch.setattr(torch.version, "cuda", None)
    c = cuda_library.choose()
    assert c.path is None and "is built without CUDA" in c.why


def test_environment_overrides_the_choice(libs, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv(cuda_library.ENV_VERSION, "12.6")
    c = cuda_library.choose()
    assert c.path.endswith("libthermo_ext_cuda12.so") and "THERMO_EXT_CUDA_VERSION=12.6" in c.why
    monkeypatch.setenv(cuda_library.ENV_VERSION, "twelve")
    assert "is not a CUDA version" in cuda_library.choose().why
    monkeypatch.setenv(cuda_library.ENV_LIB, str(libs / "libthermo_ext_cuda_emu.so"))
    c = cuda_library.choose()
    assert c.path.endswith("libthermo_ext_cuda_emu.so") and "THERMO_EXT_CUDA_LIB=" in c.why
    monkeypatch.setenv(cuda_library.ENV_LIB, str(libs / "missing.so"))
    c = cuda_library.choose()
    assert c.path is None and "names no file" in c.why


def _fake_library(tmp_path, abi: int, source: str) -> str:
    cc = shutil.which("g++") or shutil.which("c++")
    if cc is None:
        pytest.skip("needs a C++ compiler to build a fake library")
    src = tmp_path / "fake.cpp"
    src.write_text(textwrap.dedent(f"""
        #include <stdint.h>
        extern "C" int te_cuda_abi(void) {{ return {abi}; }}
        extern "C" uint64_t te_cuda_layout(void) {{ return 1; }}
        extern "C" const char* te_cuda_source(void) {{ return "{source}"; }}
        extern "C" const char* te_cuda_version(void) {{ return "0.0.1"; }}
    """))
    out = tmp_path / f"libthermo_ext_cuda99_{abi}.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
    return str(out)


def test_a_stale_or_foreign_library_is_refused_with_the_reason(tmp_path):
    if _C.cuda_library() is not None:
        pytest.skip("a library is loaded in this process already")
    with pytest.raises(RuntimeError, match="cannot load the CUDA engine library .*missing"):
        _C.cuda_load(str(tmp_path / "missing.so"))
    with pytest.raises(RuntimeError, match="has interface version 0, this module needs 1: it is "
                                           "stale"):
        _C.cuda_load(_fake_library(tmp_path, 0, "x"))
    with pytest.raises(RuntimeError, match="built from other engine sources than this module.*"
                                           "stale; rebuild it"):
        _C.cuda_load(_fake_library(tmp_path, 1, "0123456789abcdef"))
    assert _C.cuda_library() is None and not _C.cuda_compiled()  # nothing was kept


def test_import_and_cpu_steps_load_no_cuda_code():
    code = textwrap.dedent("""
        import torch, thermo_ext as te
        m = torch.nn.Linear(4, 3)
        opt = te.AdLaLa(torch.nn.Sequential(m, torch.nn.Linear(3, 1)), seed=1)
        for _ in range(3):
            opt.zero_grad(); opt.param_groups[0]["params"][0].sum().backward()
            for p in opt.param_groups[1]["params"]: p.grad = torch.ones_like(p)
            opt.step()
        maps = open("/proc/self/maps").read()  # (a CUDA torch maps its own libcudart)
        print("loaded:", te._C.cuda_library(), "libthermo_ext_cuda" in maps)
        info = te.build_info()
        print("info:", info["cuda_library"], info["cuda_library_why"])
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "loaded: None False" in run.stdout, run.stdout
    assert "info: None" in run.stdout, run.stdout


def test_the_installed_library_loads_and_says_what_it_is():
    libs = cuda_library.available()
    if not libs:
        pytest.skip("no CUDA engine library in this installation (a CPU-only build)")
    major, path = max(libs.items())
    code = textwrap.dedent(f"""
        import thermo_ext as te
        info = te._C.cuda_load({path!r})
        print(info["runtime"], info["min_driver"], info["archs"], te._C.cuda_compiled())
        print(te.build_info()["cuda_library"])
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    runtime, floor, archs, loaded = run.stdout.splitlines()[0].split()
    assert int(runtime) // 1000 == major and loaded == "True" and archs
    assert floor == {12: "525.60.13", 13: "580.65.06"}.get(major, floor)
    assert run.stdout.splitlines()[1] == path


# ---------------------------------------------------------------------------------------------
# the fallback
# ---------------------------------------------------------------------------------------------

def _cuda_call(index=0):
    return SimpleNamespace(params=[SimpleNamespace(device=torch.device("cuda", index))])


def test_fallback_is_chosen_by_default_only_where_the_engine_cannot_run(monkeypatch):
    bad = cuda_library.Verdict(False, "the NVIDIA driver supports CUDA 12.8, below the floor",
                               "Fix: update the NVIDIA driver to >= 580.65.06", "why", None)
    good = cuda_library.Verdict(True, "", "", "why", None)
    monkeypatch.setattr(cuda_library, "_verdicts", {0: bad, 1: good})
    monkeypatch.setattr(fallback, "_warned", set())
    cpu = SimpleNamespace(params=[torch.zeros(1)])
    assert fallback.choose(None, [cpu], False) is BACKENDS["engine"]
    assert fallback.choose(None, [_cuda_call(1)], True) is BACKENDS["engine"]
    assert fallback.choose("engine", [_cuda_call(0)], True) is BACKENDS["engine"]
    assert fallback.choose("reference", [_cuda_call(0)], True) is BACKENDS["reference"]
    with pytest.warns(te.EngineFallbackWarning) as record:
        assert fallback.choose(None, [cpu, _cuda_call(0)], True) is fallback.FALLBACK
    (w,) = record
    text = str(w.message)
    for part in ("cuda:0", "torch-op fallback", "the NVIDIA driver supports CUDA 12.8",
                 fallback.COST, "Fix: update the NVIDIA driver", "backend='engine' raises"):
        assert part in text, text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        assert fallback.choose(None, [_cuda_call(0)], True) is fallback.FALLBACK


def test_backend_argument():
    p = torch.nn.Parameter(torch.zeros(3))
    assert te.Thermo([p]).backend is None
    assert te.Thermo([p], backend="engine").backend == "engine"
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        te.Thermo([p], backend="cuda")


def _run(method, backend, steps=4, dtype=torch.float32, monkeypatch=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 2)).to(dtype)
    kw = dict(seed=1234, momentum_init="thermal")
    if backend == "fallback":
        monkeypatch.setattr("thermo_ext.stepping.choose_backend",
                            lambda requested, calls, on_device: fallback.FALLBACK)
        opt = method(model, **kw)
    else:
        opt = method(model, backend=backend, **kw)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)).to(dtype)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.thermostats()


@pytest.mark.parametrize("method", [te.Langevin, te.AdL, te.AdLaLa, te.LOL, te.Overdamped])
def test_fallback_steps_equal_the_reference(method, monkeypatch):
    want, want_xi = _run(method, "reference")
    monkeypatch.setenv(torch_noise.ENV_MODE, "exact")
    got, got_xi = _run(method, "fallback", monkeypatch=monkeypatch)
    for a, b in zip(got, want):  # the same letters and the same normals: the same bits
        assert torch.equal(a, b)
    assert got_xi == want_xi
    monkeypatch.setenv(torch_noise.ENV_MODE, "fast")  # the default: normals within 4 ulps
    fast, fast_xi = _run(method, "fallback", monkeypatch=monkeypatch)
    engine, _ = _run(method, "engine")
    for a, b, c in zip(fast, want, engine):  # (the engine rounds its fused letters differently)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_xi, want_xi):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_fallback_of_bf16_parameters_rounds_stochastically_as_the_reference(monkeypatch):
    monkeypatch.setenv(torch_noise.ENV_MODE, "exact")
    want, _ = _run(te.AdLaLa, "reference", dtype=torch.bfloat16)
    got, _ = _run(te.AdLaLa, "fallback", dtype=torch.bfloat16, monkeypatch=monkeypatch)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_build_info_names_the_choice_without_loading():
    info = te.build_info()
    for key in ("cuda_libraries", "cuda_library", "cuda_library_why", "cuda_fallback",
                "cuda_min_driver"):
        assert key in info
    assert isinstance(info["cuda_libraries"], list)
    assert info["cuda_library_why"]
    if os.environ.get(cuda_library.ENV_LIB) is None and torch.version.cuda is None:
        assert "built without CUDA" in info["cuda_library_why"]
