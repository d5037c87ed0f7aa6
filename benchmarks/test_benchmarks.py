"""pytest-benchmark suite over small shapes (runs on the CPU; uses the GPU when present).

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-json=/tmp/bench.json -k "gate and not compile"

Not part of the test suite (``pytest tests/`` never collects this folder): it times, it asserts nothing
about speed.
"""

import os

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from scnet_fused import bench  # noqa: E402

os.environ["SCNET_FUSED_POISON"] = "0"  # no NaN fill of outputs while timing
bench.raise_compile_limits()

DEVICE = bench.best_device()
DTYPE = torch.float32
N = 2
SHAPES = [(32, 28, 28), (64, 14, 14)]
OP_PROVIDERS = bench.default_providers(DEVICE, DTYPE, "op")
MODULE_PROVIDERS = bench.default_providers(DEVICE, DTYPE, "module")


def _callable(op, provider):
    f = bench._gate_callable(op, provider, {})
    if provider in bench.FUSED_BACKENDS:
        def run(*a):
            with bench.provider_context(provider):
                return f(*a)
        return run
    return f


def _sync_after(fn):
    def run():
        out = fn()
        bench.sync(DEVICE)
        return out
    return run


@pytest.mark.parametrize("shape", SHAPES, ids=bench.shape_str)
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("op", bench.OPS)
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_gate(benchmark, provider, op, mode, shape):
    C, H, W = shape
    args = bench.make_gate_inputs(op, N, C, H, W, DTYPE, DEVICE)
    out_hw = bench.pooled_hw(H, W) if op == "avgpool" else (H, W)
    dy = torch.randn(N, C, *out_hw, device=DEVICE, dtype=DTYPE)
    f = _callable(op, provider)
    gin = bench._grad_inputs(args)
    if mode == "forward":
        fn = lambda: f(*args)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(f(*args), gin, dy)  # noqa: E731
    fn()  # compile / warm up outside the timing
    m = bench.gate_model(op, mode, N, C, H, W, args[0].element_size())
    benchmark.extra_info.update(op=op, mode=mode, provider=provider, shape=bench.shape_str((N,) + shape),
                                bytes=m["bytes"], device=bench.device_name(DEVICE))
    benchmark(_sync_after(fn))


@pytest.mark.parametrize("shape", [(32, 28, 28)], ids=bench.shape_str)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("provider", MODULE_PROVIDERS)
def test_scconv(benchmark, provider, mode, shape):
    C, H, W = shape
    ref = bench.build_module("scconv", C, fused=False).to(DEVICE)
    fused = provider not in ("eager", "compile")
    m = bench.build_module("scconv", C, fused=fused, like=ref).to(DEVICE)
    runner = torch.compile(m, dynamic=False) if "compile" in provider else m
    x = torch.randn(N, C, H, W, device=DEVICE)
    if mode == "train":
        m.train()
        x.requires_grad_(True)
        params = list(m.parameters())
        dy = torch.randn(N, C, H, W, device=DEVICE)

        def fn():
            with bench.provider_context(provider):
                return torch.autograd.grad(runner(x), [x] + params, dy)
    else:
        m.eval()

        def fn():
            with bench.provider_context(provider), torch.no_grad():
                return runner(x)
    fn()
    benchmark.extra_info.update(module="scconv", mode=mode, provider=provider, shape=bench.shape_str((N,) + shape),
                                device=bench.device_name(DEVICE))
    benchmark(_sync_after(fn))
