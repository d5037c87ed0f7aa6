"""Mixed precision (bf16 autocast on the CPU, fp16 + GradScaler on CUDA), channels_last end to end
without hidden copies, and bitwise-reproducible gradients under deterministic algorithms."""

import copy
import os

import pytest
import torch
from torch import nn

import scnet_fused
from scnet_fused import models
from scnet_fused.ops import _dispatch, available

BACKEND = "cpu" if available("cpu") is None else "reference"


def _tiny(fused=True):
    torch.manual_seed(0)
    return models.build("scnet50", fused=fused, layers=(1, 1, 1, 1), num_classes=5)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def _step(model, x, y, autocast_dtype=None, device="cpu"):
    model = copy.deepcopy(model).train()
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
    loss.backward()
    return out, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_bf16_autocast_training_close_to_reference():
    ref, fused = _tiny(False), _tiny(True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 5, (4,), generator=g)
    with scnet_fused.backend(BACKEND):
        out32, loss32, grad32 = _step(ref, x, y)
        out_r, loss_r, grad_r = _step(ref, x, y, torch.bfloat16)
        out_f, loss_f, grad_f = _step(fused, x, y, torch.bfloat16)
    assert out_f.dtype == out_r.dtype == torch.bfloat16
    assert torch.isfinite(loss_f)
    # bf16 rule: the fused error against fp32 at most 2x eager PyTorch's bf16 error, plus a little.
    assert abs(loss_f - loss32) <= 2 * abs(loss_r - loss32) + 1e-2 * abs(loss32), (loss_f, loss_r, loss32)
    assert _rel(out_f, out32) <= 2 * _rel(out_r, out32) + 1e-2
    for n in grad32:
        assert grad_f[n] is not None and grad_f[n].dtype == torch.float32, n
        err_f, err_r = _rel(grad_f[n], grad32[n]), _rel(grad_r[n], grad32[n])
        assert err_f <= 2 * err_r + 2e-2, f"{n}: fused bf16 error {err_f:.3g} vs eager bf16 {err_r:.3g}"


class _Recorder:
    """Backend primitives that record what reaches them (data pointer, layout, shape) and pass through."""

    def __init__(self, prims, log):
        self._prims, self._log = prims, log

    def __getattr__(self, name):
        fn = getattr(self._prims, name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            self._log.append((name, [_info(a) for a in args], [_info(o) for o in outs]))
            return out

        return wrapped


def _info(t):
    if not isinstance(t, torch.Tensor):
        return None
    return dict(ptr=t.data_ptr(), shape=tuple(t.shape), cl=t.dim() == 4 and t.is_contiguous(
        memory_format=torch.channels_last) and not t.is_contiguous())


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("path", ["python", "cpp"])
def test_channels_last_end_to_end_no_hidden_copies(train, path, monkeypatch):
    """Both eager paths: the torch.library ops (primitives recorded) and their C++ autograd twins."""
    if path == "cpp" and BACKEND != "cpu":
        pytest.skip("the C++ autograd ops serve the compiled backends only")
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", "1" if path == "cpp" else "0")
    torch.manual_seed(0)
    conv = scnet_fused.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d).train(train)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    full = tuple(x.shape)
    k3_out = {}

    def remember_k3(module, inputs, output):
        k3_out.setdefault("ptr", output.data_ptr())

    conv.k3[0].register_forward_hook(remember_k3)
    log = []
    select = _dispatch.select
    monkeypatch.setattr(_dispatch, "select", lambda d, t: (lambda n, p: (n, _Recorder(p, log)))(*select(d, t)))
    with scnet_fused.backend(BACKEND):
        with torch.profiler.profile(record_shapes=True) as prof:
            out = conv(x)
            out.backward(torch.randn_like(out))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    names = [name for name, _, _ in log]
    ops = {e.name for e in prof.events() if e.name.startswith("scnet_fused::")}
    if path == "python":
        assert "gate_forward" in names and any(n.startswith("gate_backward") for n in names), names
    else:  # nothing went through the Python primitives: the C++ autograd ops ran the kernels
        assert not names, names
        assert "scnet_fused::_sc_avgpool_ag" in ops, ops
        assert ({"scnet_fused::_sc_gate_bn2_train_ag"} if train else {"scnet_fused::_sc_gate_ag"}) <= ops, ops
        assert {"scnet_fused::_gate_forward", "scnet_fused::_avgpool_backward"} <= ops, ops
    for name, args, outs in log:
        for a in args + outs:
            if a is not None and a["shape"] == full:  # every full-size tensor in and out: channels_last
                assert a["cl"], f"{name}: a full-size tensor is not channels_last"
        if name in ("gate_forward", "gate_backward", "gate_backward_k3"):
            x_arg = args[0] if name == "gate_forward" else args[1]
            k3_arg = args[2] if name == "gate_forward" else args[3]
            assert x_arg["ptr"] == x.data_ptr(), f"{name}: x was copied before reaching the kernel"
            if "ptr" in k3_out:
                assert k3_arg["ptr"] == k3_out["ptr"], f"{name}: k3 was copied before reaching the kernel"
    # No copy of a full-size tensor anywhere under the fused ops (the pooled map may be relaid out).
    copies = []
    for e in prof.events():
        if e.name not in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"):
            continue
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        under_op = any(c.startswith("scnet_fused::") or "scnet_fused_sc_gate" in c or "CppNode<scnet_fused" in c
                       for c in chain)
        if under_op and any(tuple(s) == full for s in e.input_shapes if isinstance(s, list)):
            copies.append((e.name, e.input_shapes, chain[:3]))
    assert not copies, copies


@pytest.mark.gpu
def test_fp16_autocast_grad_scaler_cuda():
    device = "cuda"
    ref, fused = _tiny(False).to(device), _tiny(True).to(device)
    results = {}
    for name, model in (("ref", ref), ("fused", fused)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler(device)
        losses = []
        for step in range(3):
            g = torch.Generator(device=device).manual_seed(step)
            x = torch.randn(4, 3, 64, 64, device=device, generator=g)
            y = torch.randint(0, 5, (4,), device=device, generator=g)
            with torch.autocast(device, dtype=torch.float16):
                out = model(x)
                assert out.dtype == torch.float16
                loss = nn.functional.cross_entropy(out.float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        results[name] = (losses, scaler.get_scale())
    losses_r, scale_r = results["ref"]
    losses_f, scale_f = results["fused"]
    assert all(torch.isfinite(torch.tensor(losses_f)))
    assert scale_f == scale_r  # no inf/nan skipped step that the reference did not skip
    torch.testing.assert_close(torch.tensor(losses_f), torch.tensor(losses_r), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    old_cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was, warn_only=warn_only)
    if old_cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = old_cublas


def _two_identical_steps(model, x, target, backend_name):
    grads = []
    for _ in range(2):
        m = copy.deepcopy(model).train()
        xi = x.clone().requires_grad_()
        with scnet_fused.backend(backend_name):
            out = m(xi)
            loss = nn.functional.cross_entropy(out, target) if out.dim() == 2 else (out * target).sum()
            loss.backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()] + list(m.buffers()))
    for i, (a, b) in enumerate(zip(*grads)):
        assert torch.equal(a, b), f"tensor {i} differs between two identical steps"


@pytest.mark.skipif(available("cpu") is not None, reason="the compiled CPU backend is not built here")
def test_deterministic_model_step_cpu_backend(deterministic):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 3, 64, 64, generator=g), torch.randint(0, 5, (3,), generator=g)
    _two_identical_steps(_tiny(True), x, y, "cpu")


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_deterministic_scconv_step(backend_name, deterministic):
    if available(backend_name) is not None or _dispatch._device_ok(backend_name, torch.device("cpu")) is not None:
        pytest.skip(f"{backend_name} cannot run CPU tensors here")
    torch.manual_seed(0)
    conv = scnet_fused.SCConv(4, 4, 2, 1, 1, 1, 4, nn.BatchNorm2d)
    x = torch.randn(2, 4, 13, 10)
    weight = torch.randn(2, 4, 7, 5)
    _two_identical_steps(conv, x, weight, backend_name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_deterministic_scconv_step_cuda(backend_name, deterministic):
    if available(backend_name) is not None:
        pytest.skip(f"{backend_name}: {available(backend_name)}")
    torch.manual_seed(0)
    conv = scnet_fused.SCConv(32, 32, 1, 1, 1, 1, 4, nn.BatchNorm2d).cuda()
    x = torch.randn(4, 32, 28, 28, device="cuda")
    weight = torch.randn(4, 32, 28, 28, device="cuda")
    _two_identical_steps(conv, x, weight, backend_name)
