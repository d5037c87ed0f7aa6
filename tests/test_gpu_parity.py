"""The parity suite on CUDA for every fused backend (gpu-marked: skipped without a GPU), and the same
checks run here on the CPU backends so the suite itself is exercised on every machine."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scnet_fused
from scnet_fused import reference as R
from scnet_fused.ops import available, sc_avgpool, sc_gate, sc_gate_bn2_train, sc_gate_bn_train

from _util import assert_close_rule, eager_gate, interpreter_broken

SHAPES = [(3, 5, 14, 13, 3, 3), (2, 12, 25, 7, 6, 1), (2, 16, 7, 7, 1, 1), (1, 64, 56, 56, 14, 14)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, device, dtype, channels_last):
    N, C, H, W, h, w = shape
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = torch.randn(N, C, H, W, generator=g)
    small = torch.randn(N, C, h, w, generator=g)
    k3 = torch.randn(N, C, H, W, generator=g) + 0.3
    dy = torch.randn(N, C, H, W, generator=g)
    out = []
    for t in (x, small, k3, dy):
        t = t.to(device=device, dtype=dtype)
        if channels_last and t.shape[-1] == W and t.shape[-2] == H:
            t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return out


def check_gate_parity(backend, device, shape, dtype, channels_last):
    x, small, k3, dy = _inputs(shape, device, dtype, channels_last)
    leaves = [t.detach().requires_grad_() for t in (x, small, k3)]
    ref64 = [t.detach().double().requires_grad_() for t in (x, small, k3)]
    eager = [t.detach().requires_grad_() for t in (x, small, k3)]
    with scnet_fused.backend(backend):
        y = sc_gate(*leaves)
        grads = torch.autograd.grad(y, leaves, dy)
    y64 = eager_gate(*ref64)
    g64 = torch.autograd.grad(y64, ref64, dy.double())
    ye = eager_gate(*eager)
    ge = torch.autograd.grad(ye, eager, dy)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, g64):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    else:
        assert_close_rule(y, y64.detach(), ye.detach(), what=f"{backend} {dtype} y")
        for name, a, b, e in zip(("dx", "dsmall", "dk3"), grads, g64, ge):
            assert_close_rule(a, b, e, what=f"{backend} {dtype} {name}")


def check_bn_parity(backend, device, shape, channels_last):
    x, small, k3, dy = _inputs(shape, device, torch.float32, channels_last)
    C = x.shape[1]
    w = torch.rand(C, device=device) + 0.5
    b = torch.randn(C, device=device)
    ins = [t.detach().requires_grad_() for t in (x, small, k3, w, b)]
    refs = [t.detach().double().requires_grad_() for t in (x, small, k3, w, b)]
    with scnet_fused.backend(backend):
        y, mean, var = sc_gate_bn_train(*ins, 1e-5)
        grads = torch.autograd.grad(y, ins, dy)
    y64 = eager_gate(refs[0], refs[1], F.batch_norm(refs[2], None, None, refs[3], refs[4], True, 0.0, 1e-5))
    g64 = torch.autograd.grad(y64, refs, dy.double())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-4, atol=1e-4)
    var64, mean64 = torch.var_mean(k3.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var64, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(grads, g64):
        torch.testing.assert_close(a.double(), b_, rtol=1e-3, atol=1e-3)


def check_bn2_parity(backend, device, shape, channels_last):
    """Both BatchNorms inside the gate (k3's and the pooled map's, batch statistics) against float64."""
    x, small, k3, dy = _inputs(shape, device, torch.float32, channels_last)
    C = x.shape[1]
    g = torch.Generator().manual_seed(C)
    w, b, w2, b2 = ((torch.rand(C, generator=g) + 0.5).to(device), torch.randn(C, generator=g).to(device),
                    (torch.rand(C, generator=g) + 0.5).to(device), torch.randn(C, generator=g).to(device))
    ins = [t.detach().requires_grad_() for t in (x, small, k3, w, b, w2, b2)]
    refs = [t.detach().double().requires_grad_() for t in ins]
    with scnet_fused.backend(backend):
        y, mean, var, mean2, var2 = sc_gate_bn2_train(*ins[:5], 1e-5, *ins[5:], 1e-3)
        grads = torch.autograd.grad(y, ins, dy)
    bn3 = F.batch_norm(refs[2], None, None, refs[3], refs[4], True, 0.0, 1e-5)
    bn2 = F.batch_norm(refs[1], None, None, refs[5], refs[6], True, 0.0, 1e-3)
    y64 = eager_gate(refs[0], bn2, bn3)
    g64 = torch.autograd.grad(y64, refs, dy.double())
    torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-4, atol=1e-4)
    for t, m, v in ((k3, mean, var), (small, mean2, var2)):
        v64, m64 = torch.var_mean(t.double(), dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(m.double(), m64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v.double(), v64, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(grads, g64):
        torch.testing.assert_close(a.double(), b_, rtol=1e-3, atol=1e-3)


def check_scconv_parity(backend, device, channels_last):
    torch.manual_seed(0)
    ref = R.SCConv(16, 16, 2, 1, 1, 1, 4, nn.BatchNorm2d).to(device)
    fused = scnet_fused.convert(ref)
    x = torch.randn(3, 16, 14, 13, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with scnet_fused.backend(backend):
        for mode in ("train", "train", "eval"):
            getattr(ref, mode)(), getattr(fused, mode)()
            xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yf = ref(xr), fused(xf)
            torch.testing.assert_close(yf, yr, rtol=1e-4, atol=1e-4)
            g = torch.randn_like(yr)
            for a, b in zip(torch.autograd.grad(yf, [xf] + list(fused.parameters()), g),
                            torch.autograd.grad(yr, [xr] + list(ref.parameters()), g)):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-4, atol=1e-5)


POOL_SHAPES = [(2, 5, 14, 13, 4), (2, 64, 56, 56, 4), (3, 24, 25, 7, 3), (2, 16, 7, 7, 4), (1, 8, 9, 9, 1)]


def check_pool_parity(backend, device, shape, dtype, channels_last):
    N, C, H, W, r = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(N, C, H, W, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with scnet_fused.backend(backend):
        y = sc_avgpool(x, r)
        dy = torch.randn(y.shape, generator=g).to(device=device, dtype=dtype)
        (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = F.avg_pool2d(x64, r, r)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    tol = 1e-5 if dtype == torch.float32 else (2e-3 if dtype == torch.float16 else 1e-2)
    torch.testing.assert_close(y.double(), y64.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), dx64, rtol=tol, atol=tol)


def check_bn_relu_parity(backend, device, shape, dtype, channels_last):
    from scnet_fused.ops.bn_relu import bn_relu_train

    g = torch.Generator().manual_seed(sum(shape) + 7)
    t = (torch.randn(*shape, generator=g) * 2 + 0.3).to(device=device, dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = (torch.rand(C, generator=g) + 0.5).to(device)
    b = torch.randn(C, generator=g).to(device)
    dy = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    ins = [t.detach().clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    with scnet_fused.backend(backend):
        y, mean, var = bn_relu_train(*ins)
        grads = torch.autograd.grad(y, ins, dy)

    def eager(t_, w_, b_):
        return F.relu(F.batch_norm(t_, None, None, w_, b_, True, 0.0, 1e-5))

    _compare_with_eager(y, grads, eager, [t, w, b], dy, ("dt", "dweight", "dbias"), f"{backend} {dtype} bn_relu")


def _compare_with_eager(out, grads, eager, args, dout, names, what):
    """fp32: the fused output and gradients against float64 eager within tolerances; low precision:
    DESIGN.md's rule against eager run in that precision."""
    refs = [v.detach().double().requires_grad_() for v in args]
    out64 = eager(*refs)
    g64 = torch.autograd.grad(out64, refs, dout.double())
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), out64.detach(), rtol=1e-4, atol=1e-4)
        for a, e in zip(grads, g64):
            torch.testing.assert_close(a.double(), e, rtol=1e-3, atol=1e-3)
        return
    low = [v.detach().clone().to(out.dtype).requires_grad_() for v in args]
    oute = eager(*low)
    ge = torch.autograd.grad(oute, low, dout)
    assert_close_rule(out, out64.detach(), oute.detach(), what=f"{what} out")
    for n, a, e, l in zip(names, grads, g64, ge):
        assert_close_rule(a, e, l, what=f"{what} {n}")


def check_bn_relu_cat_parity(backend, device, shape, cb, dtype, channels_last):
    """Both branches' BatchNorm + ReLU written into the concatenation (halves written and their
    gradients read in place), against float64 eager (fp32: tolerances; low precision: the rule)."""
    from scnet_fused.ops.bn_relu import bn_relu_cat_train

    g = torch.Generator().manual_seed(sum(shape) + cb)
    shapes = (shape, (shape[0], cb) + tuple(shape[2:]))
    args = []
    for s in shapes:
        t = (torch.randn(*s, generator=g) * 2 + 0.3).to(device=device, dtype=dtype)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        args += [t, (torch.rand(s[1], generator=g) + 0.5).to(device), torch.randn(s[1], generator=g).to(device)]
    dout = torch.randn(shape[0], shape[1] + cb, *shape[2:], generator=g).to(device=device, dtype=dtype)
    ins = [v.detach().clone().requires_grad_() for v in args]
    with scnet_fused.backend(backend):
        out = bn_relu_cat_train(*ins)[0]
        grads = torch.autograd.grad(out, ins, dout)

    def eager(ta, wa, ba, tb, wb, bb):
        return torch.cat([F.relu(F.batch_norm(ta, None, None, wa, ba, True, 0.0, 1e-5)),
                          F.relu(F.batch_norm(tb, None, None, wb, bb, True, 0.0, 1e-5))], dim=1)

    _compare_with_eager(out, grads, eager, args, dout, ("dta", "dwa", "dba", "dtb", "dwb", "dbb"),
                        f"{backend} {dtype} bn_relu_cat")


def _gpu_backends():
    return [b for b in ("triton", "cuda")]


def _need(backend):
    reason = available(backend)
    if reason is None and backend == "triton":
        reason = interpreter_broken()
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")


@pytest.mark.gpu
def test_the_cuda_kernels_load_on_every_gpu_here():
    """Every GPU of compute capability 8.0 or more loads the CUDA kernels (sm_80 / sm_90 SASS, or the
    PTX on a newer one) and runs the cuda backend; an older one is refused by name before any kernel.
    The load probe leaves no error behind for the next launch to report."""
    from scnet_fused.ops import BackendUnavailable, _cpp

    if _cpp.unavailable_reason("cuda") is not None:
        pytest.skip(_cpp.unavailable_reason("cuda"))
    from scnet_fused import _C

    for i in range(torch.cuda.device_count()):
        dev = torch.device("cuda", i)
        problem = _C.cuda_kernel_problem(i)
        x, k3 = torch.randn(2, 8, 9, 9, device=dev), torch.randn(2, 8, 9, 9, device=dev)
        small = torch.randn(2, 8, 2, 2, device=dev)
        torch.cuda.synchronize(dev)
        if torch.cuda.get_device_capability(i) >= (8, 0):
            assert problem == "", problem
            with scnet_fused.backend("cuda"):
                torch.testing.assert_close(sc_gate(x, small, k3), eager_gate(x, small, k3), rtol=1e-5, atol=1e-5)
        else:
            assert "do not load" in problem
            with scnet_fused.backend("cuda"), pytest.raises(BackendUnavailable, match="compute capability"):
                sc_gate(x, small, k3)
        torch.cuda.synchronize(dev)


_PROBE_SCRIPT = """
import torch, scnet_fused
from scnet_fused import _C
last = torch.cuda.device_count() - 1
x = torch.randn(2, 8, 9, 9, device=f"cuda:{last}")  # plain torch first: its own contexts are the baseline
torch.cuda.synchronize(last)
before = [torch._C._cuda_hasPrimaryContext(i) for i in range(last + 1)]
current = torch.cuda.current_device()
assert _C.cuda_kernel_problem(last) == ""
with scnet_fused.backend("cuda"):
    scnet_fused.ops.sc_gate(x, torch.randn(2, 8, 2, 2, device=x.device), x)
torch.cuda.synchronize(last)
after = [torch._C._cuda_hasPrimaryContext(i) for i in range(last + 1)]
assert torch.cuda.current_device() == current, (torch.cuda.current_device(), current)
assert after == before, (before, after)
print("ok", before)
"""


@pytest.mark.gpu
def test_the_load_probe_leaves_the_current_device_and_other_gpus_alone():
    """The first cuda-backend call on the last GPU probes it (a fresh process): the current device is
    the same afterwards, and no GPU gets a CUDA context that plain torch on that GPU did not create
    (a probe that set the previous device back unconditionally made one on cuda:0, several hundred MB
    of memory in every process of a multi-GPU job)."""
    import subprocess
    import sys

    from scnet_fused.ops import _cpp

    if _cpp.unavailable_reason("cuda") is not None:
        pytest.skip(_cpp.unavailable_reason("cuda"))
    if torch.cuda.get_device_capability(torch.cuda.device_count() - 1) < (8, 0):
        pytest.skip("the last GPU is older than sm_80: the cuda backend refuses it")
    run = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_cuda(backend, shape, dtype, channels_last):
    _need(backend)
    check_gate_parity(backend, "cuda", shape, dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_bn_train_cuda(backend, shape, channels_last):
    _need(backend)
    check_bn_parity(backend, "cuda", shape, channels_last)
    check_bn2_parity(backend, "cuda", shape, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("shape", POOL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_avgpool_cuda(backend, shape, dtype, channels_last):
    _need(backend)
    check_pool_parity(backend, "cuda", shape, dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("shape", [(4, 32, 56, 56), (3, 5, 14, 13), (8, 256, 7, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_relu_cuda(backend, shape, dtype, channels_last):
    _need(backend)
    check_bn_relu_parity(backend, "cuda", shape, dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("shape,cb", [((4, 32, 56, 56), 32), ((3, 5, 14, 13), 7), ((8, 256, 7, 7), 256)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_relu_cat_cuda(backend, shape, cb, dtype, channels_last):
    _need(backend)
    check_bn_relu_cat_parity(backend, "cuda", shape, cb, dtype, channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("channels_last", [False, True])
def test_scconv_cuda(backend, channels_last):
    _need(backend)
    check_scconv_parity(backend, "cuda", channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_opcheck_cuda(backend):
    _need(backend)
    x, small, k3, _ = _inputs(SHAPES[0], "cuda", torch.float32, False)
    w, b = torch.rand(5, device="cuda"), torch.randn(5, device="cuda")
    with scnet_fused.backend(backend):
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate.default,
                              tuple(t.requires_grad_() for t in (x, small, k3)) + (None, None))
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate_bn_train.default,
                              (x, small, k3, w.requires_grad_(), b.requires_grad_(), 1e-5))



@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_eager_cuda_graph_capture_of_a_training_scconv(backend):
    """torch.cuda.make_graphed_callables on a fused SCConv in training mode: the fused forward and
    backward capture (no host synchronisation, allocations from the graph's pool) and each replay gives
    the reference's output, input gradient and accumulated parameter gradients."""
    import copy

    _need(backend)
    torch.manual_seed(0)
    ref = R.SCConv(16, 16, 1, 1, 1, 1, 4, nn.BatchNorm2d).cuda()
    fused = scnet_fused.convert(copy.deepcopy(ref))
    shape = (4, 16, 20, 20)
    with scnet_fused.backend(backend):
        graphed = torch.cuda.make_graphed_callables(fused, (torch.randn(shape, device="cuda", requires_grad=True),))
        for _ in range(3):
            x = torch.randn(shape, device="cuda")
            xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            yg, yr = graphed(xg), ref(xr)
            torch.testing.assert_close(yg, yr, rtol=2e-3, atol=2e-3)
            g = torch.randn_like(yr)
            yg.backward(g), yr.backward(g)
            torch.testing.assert_close(xg.grad, xr.grad, rtol=2e-3, atol=2e-3)
    pr, pf = dict(ref.named_parameters()), dict(fused.named_parameters())
    for name in pr:
        torch.testing.assert_close(pf[name].grad, pr[name].grad, rtol=5e-3, atol=5e-3, msg=lambda m: f"{name}: {m}")

# The same checks on the CPU backends (one small shape each), so the suite above is known to work.
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_suite_on_cpu(backend, dtype):
    _need(backend)
    check_gate_parity(backend, "cpu", SHAPES[0], dtype, channels_last=(dtype == torch.bfloat16))
    check_pool_parity(backend, "cpu", POOL_SHAPES[0], dtype, channels_last=(dtype == torch.bfloat16))
    check_bn_relu_parity(backend, "cpu", (3, 5, 14, 13), dtype, channels_last=(dtype == torch.bfloat16))
    check_bn_relu_cat_parity(backend, "cpu", (3, 5, 14, 13), 7, dtype, channels_last=(dtype == torch.bfloat16))
    if dtype == torch.float32:
        check_bn_parity(backend, "cpu", SHAPES[2], channels_last=True)
        check_bn2_parity(backend, "cpu", SHAPES[0], channels_last=True)
        check_scconv_parity(backend, "cpu", channels_last=False)
