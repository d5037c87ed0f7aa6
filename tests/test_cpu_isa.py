"""The CPU kernels are built once per instruction set (scnet_fused._cpu_default / _cpu_avx2 /
_cpu_avx512) and the best one this CPU runs is loaded; ``$SCNET_FUSED_CPU_ISA`` caps the choice.

The rest of the suite runs the loaded build (the best one here); every other build this CPU runs
is checked here in subprocesses (one build per process: each registers the same kernels) by the
parity check of ``python -m scnet_fused check`` and by the test files of the kernels, the ops and
their C++ autograd (``KERNEL_TESTS``, the builds side by side), with poisoned outputs.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import types

import pytest

from scnet_fused.ops import _cpp, _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_REASON = _dispatch.available("cpu")
pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")


# The tests of the CPU kernels and of the ops and autograd over them, rerun for every other build.
KERNEL_TESTS = ["tests/test_cpu_kernels.py", "tests/test_avgpool.py", "tests/test_bn_relu.py", "tests/test_gate_ops.py",
                "tests/test_cpp_autograd.py", "tests/test_relu_cat.py", "tests/test_winograd.py"]


def _env(**extra):
    env = dict(os.environ)
    env.update(SCNET_FUSED_POISON="1", OMP_NUM_THREADS="2", **extra)
    env.pop("SCNET_FUSED_BACKEND", None)
    return env


def _run(args, timeout=600, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def test_the_best_runnable_build_is_loaded_and_only_it():
    cap = os.environ.get("SCNET_FUSED_CPU_ISA", "").strip().lower()
    runnable = [i for i in _cpp.runnable_isas() if not cap or _cpp.CPU_ISAS.index(i) >= _cpp.CPU_ISAS.index(cap)]
    assert runnable, "no CPU kernel build is both built and runnable here"
    assert _cpp.cpu_isa() == runnable[0]
    loaded = sorted(m for m in sys.modules if m.startswith("scnet_fused._cpu_"))
    assert loaded == [f"scnet_fused._cpu_{runnable[0]}"]
    mod = sys.modules[loaded[0]]
    assert mod.isa == runnable[0]
    assert mod.vector_floats == {"default": mod.vector_floats, "avx2": 8, "avx512": 16}[mod.isa]
    assert _cpp.unavailable_reason("cpu") is None


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
                    reason="reads the x86 CPU flags of /proc/cpuinfo")
def test_cpu_detection_agrees_with_proc_cpuinfo():
    from scnet_fused import _C

    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    assert _C.cpu_supports_isa("default")
    assert _C.cpu_supports_isa("avx2") == ({"avx2", "fma"} <= set(flags))
    assert _C.cpu_supports_isa("avx512") == ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= set(flags))
    assert not _C.cpu_supports_isa("sse9")


@pytest.mark.parametrize("isa", _cpp.CPU_ISAS)
def test_each_runnable_build_matches_the_reference(isa):
    if isa not in _cpp.runnable_isas():
        pytest.skip(f"the {isa} build is not built or this CPU does not run it")
    # one process: the build it loaded, then the parity check of `python -m scnet_fused check` under it
    check = _run(["-c", "from scnet_fused.ops import _cpp; print('loaded build:', _cpp.cpu_isa(), flush=True)\n"
                        "from scnet_fused.__main__ import main\n"
                        "raise SystemExit(main(['check', '--backends', 'cpu']))"], SCNET_FUSED_CPU_ISA=isa)
    assert check.stdout.startswith(f"loaded build: {isa}\n"), check.stdout[:2000]
    assert check.returncode == 0 and "0 failing case(s)" in check.stdout, check.stdout[-4000:]


def test_other_builds_pass_the_kernel_tests():
    """The kernel tests (KERNEL_TESTS) under every runnable build but the loaded one (the whole suite runs
    that), the builds' processes side by side (two threads each, waiting passively: most of their time
    is the tests' own Python, so two processes on two cores take little longer than one). Without the
    model-level SGD run (a third of the files' time), whose Winograd kernels the kernel tests cover."""
    others = [isa for isa in _cpp.runnable_isas() if isa != _cpp.cpu_isa()]
    if not others:
        pytest.skip("no other CPU kernel build is built and runnable here")
    procs = {isa: subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS,
                                    "-k", "not triton and not sgd_losses"], cwd=ROOT,
                                   env=_env(SCNET_FUSED_CPU_ISA=isa, OMP_WAIT_POLICY="PASSIVE"),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for isa in others}
    try:
        outs = {isa: p.communicate(timeout=900)[0] for isa, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for isa, out in outs.items():
        assert procs[isa].returncode == 0, f"{isa}:\n{out[-4000:]}"
        summary = out.strip().splitlines()[-1]
        assert re.match(r"\d+ passed", summary) and int(summary.split()[0]) >= 100, f"{isa}:\n{out[-2000:]}"


def test_an_unknown_isa_name_is_a_clear_error():
    proc = _run(["-c", "import torch, scnet_fused\n"
                       "x = torch.randn(1, 2, 8, 8)\n"
                       "with scnet_fused.backend('cpu'):\n"
                       "    scnet_fused.sc_gate(x, torch.randn(1, 2, 2, 2), torch.randn(1, 2, 8, 8))"],
                SCNET_FUSED_CPU_ISA="sse9")
    assert proc.returncode != 0
    assert "SCNET_FUSED_CPU_ISA='sse9'" in proc.stdout and "avx512, avx2, default" in proc.stdout, proc.stdout


def _fake_load(monkeypatch, runnable, built, cap):
    """_load_cpu_kernels against a stand-in CPU (``runnable`` sets) and build list (``built``), importing
    nothing: returns (loaded isa, error, names it imported)."""
    imported = []

    def import_module(name):
        isa = name.rsplit("_cpu_", 1)[1]
        if isa not in built:
            raise ImportError(f"No module named {name!r}")
        imported.append(isa)

    monkeypatch.setattr(_cpp, "_C", types.SimpleNamespace(cpu_supports_isa=lambda isa: isa in runnable))
    monkeypatch.setattr(_cpp, "importlib", types.SimpleNamespace(import_module=import_module))
    monkeypatch.setattr(_cpp, "_cpu_isa", None)
    monkeypatch.setattr(_cpp, "_cpu_isa_error", None)
    if cap is None:
        monkeypatch.delenv("SCNET_FUSED_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("SCNET_FUSED_CPU_ISA", cap)
    _cpp._load_cpu_kernels()
    return _cpp._cpu_isa, _cpp._cpu_isa_error, imported


def test_selection_logic_over_cpus_and_builds(monkeypatch):
    every = set(_cpp.CPU_ISAS)
    assert _fake_load(monkeypatch, every, every, None)[::2] == ("avx512", ["avx512"])
    assert _fake_load(monkeypatch, {"default", "avx2"}, every, None)[::2] == ("avx2", ["avx2"])
    assert _fake_load(monkeypatch, every, {"default", "avx2"}, None)[::2] == ("avx2", ["avx2"])
    assert _fake_load(monkeypatch, every, every, "avx2")[::2] == ("avx2", ["avx2"])
    assert _fake_load(monkeypatch, every, every, "DEFAULT")[::2] == ("default", ["default"])
    with pytest.warns(RuntimeWarning, match="SCNET_FUSED_CPU_ISA=avx512 .*this CPU lacks it.*using the avx2 build"):
        assert _fake_load(monkeypatch, {"default", "avx2"}, every, "avx512")[::2] == ("avx2", ["avx2"])
    isa, error, imported = _fake_load(monkeypatch, {"default"}, {"avx2"}, None)
    assert isa is None and imported == []
    assert "avx512: this CPU lacks it" in error and "default: not loadable" in error
    with pytest.raises(ValueError, match="SCNET_FUSED_CPU_ISA='sse9'"):
        _fake_load(monkeypatch, every, every, "sse9")
