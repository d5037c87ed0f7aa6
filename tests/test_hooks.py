"""Hooks and per-instance forwards on the fused modules' submodules run as in the reference.

The fused paths stand in for the forward of submodules (a BatchNorm applied inside the gate kernel, a
convolution with its BatchNorm folded in, the ReLU written into the concatenation, ...). Whatever a
user attached to one of those modules (a forward hook that reads or replaces its output, pruning's
forward pre-hook, a backward hook, a global module hook) must still run: the fused module then runs
that part as modules, and outputs, gradients and running statistics match the reference.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import scnet_fused
from scnet_fused import reference as R


def _models(kind):
    torch.manual_seed(0)
    if kind == "scconv":
        ref = R.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
        shape = (3, 8, 13, 10)
    else:
        down = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
        ref = R.SCBottleneck(16, 8, downsample=down, norm_layer=nn.BatchNorm2d)
        shape = (3, 16, 13, 10)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    fused = scnet_fused.convert(ref)
    assert type(fused) is not type(ref)
    return ref, fused, torch.randn(*shape)


def _run(model, x, mode):
    """Output and input gradient (None at inference) of one forward in ``mode``."""
    model.train(mode == "train")
    if mode == "inference":
        with torch.no_grad():
            return model(x), None
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), x.grad


def _compare(ref, fused, x, mode):
    out_r, gx_r = _run(ref, x, mode)
    out_f, gx_f = _run(fused, x, mode)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-4)
    if gx_r is not None:
        torch.testing.assert_close(gx_f, gx_r, rtol=1e-4, atol=1e-4)
        grads_r = {n: p.grad for n, p in ref.named_parameters()}
        for n, p in fused.named_parameters():
            torch.testing.assert_close(p.grad, grads_r[n], rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")
    state_r = ref.state_dict()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, state_r[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def _names(kind):
    ref, _, _ = _models(kind)
    return [n for n, _ in ref.named_modules() if n]


@pytest.mark.parametrize("mode", ["train", "eval", "inference"])
@pytest.mark.parametrize("kind", ["scconv", "bottleneck"])
def test_forward_hook_replacing_an_output_runs_on_every_submodule(kind, mode):
    """A forward hook that scales its module's output, on each submodule in turn: the fused module's
    output, gradients and running statistics are the reference's with the same hook, and the hook
    ran as often as in the reference."""
    for name in _names(kind):
        ref, fused, x = _models(kind)
        counts = []
        for model in (ref, fused):
            n = []
            model.get_submodule(name).register_forward_hook(
                lambda m, inputs, out, n=n: (n.append(1), out * 0.75 + 0.125)[1])
            counts.append(n)
        _compare(ref, fused, x, mode)
        assert len(counts[1]) == len(counts[0]) > 0, name


@pytest.mark.parametrize("kind", ["scconv", "bottleneck"])
def test_forward_pre_hook_and_instance_forward(kind):
    """A forward pre-hook that changes the input, and a forward replaced on one instance, both take
    effect in training, on a BatchNorm the fused path would otherwise apply inside a kernel."""
    name = "k3.1" if kind == "scconv" else "scconv.k3.1"
    ref, fused, x = _models(kind)
    for model in (ref, fused):
        model.get_submodule(name).register_forward_pre_hook(lambda m, inputs: (inputs[0] * 2.0,))
    _compare(ref, fused, x, "train")

    ref, fused, x = _models(kind)
    for model in (ref, fused):
        bn = model.get_submodule(name)
        bn.forward = lambda t, bn=bn: nn.BatchNorm2d.forward(bn, t) - 0.25
    _compare(ref, fused, x, "train")


@pytest.mark.parametrize("kind", ["scconv", "bottleneck"])
def test_full_backward_hook_sees_the_reference_gradients(kind):
    name = "k3.1" if kind == "scconv" else "scconv.k3.1"  # (not before an in-place ReLU: torch refuses)
    ref, fused, x = _models(kind)
    seen = []
    for model in (ref, fused):
        grads = []
        model.get_submodule(name).register_full_backward_hook(
            lambda m, grad_in, grad_out, grads=grads: grads.append(grad_out[0].clone()))
        _run(model, x, "train")
        seen.append(grads)
    assert len(seen[0]) == len(seen[1]) == 1
    torch.testing.assert_close(seen[1][0], seen[0][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["scconv", "bottleneck"])
def test_global_module_hook_sees_every_module_call(kind):
    ref, fused, x = _models(kind)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        counts = []
        for model in (ref, fused):
            calls.clear()
            _run(model, x, "train")
            counts.append(sorted(c for c in calls if c not in ("SCConv", "SCBottleneck")))
    finally:
        handle.remove()
    assert counts[1] == counts[0] and len(counts[0]) > 5


@pytest.mark.parametrize("kind", ["scconv", "bottleneck"])
def test_pruned_convolutions_train_as_the_reference(kind):
    """torch.nn.utils.prune computes ``weight`` from ``weight_orig`` in a forward pre-hook: several SGD
    steps with pruned convolutions (k4's, which the fused training path would call itself, and
    conv1_a / conv3 in the bottleneck) give the reference's losses and weights."""
    ref, fused, x = _models(kind)
    names = ["k4.0"] if kind == "scconv" else ["scconv.k4.0", "conv1_a", "conv3"]
    for model in (ref, fused):
        for name in names:
            prune.l1_unstructured(model.get_submodule(name), "weight", amount=0.5)
    losses = []
    for model in (ref, fused):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        history = []
        for step in range(3):
            opt.zero_grad()
            loss = model(x + 0.1 * step).square().mean()
            loss.backward()
            opt.step()
            history.append(loss.item())
        losses.append(history)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    state_r = ref.state_dict()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, state_r[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
