"""torch.func transforms over the fused modules (functional_call + grad, vmap): the custom ops' autograd
does not support them, so inside a transform the modules run the reference computation in standard
operators; the results must equal the reference model's, running statistics included."""

import copy

import pytest
import torch

import scnet_fused
from scnet_fused import reference as R


def _pair(seed=0):
    torch.manual_seed(seed)
    ref = R.SCBottleneck(32, 8, 1, None)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return ref, scnet_fused.convert(ref)


@pytest.mark.parametrize("train", [True, False])
def test_func_grad_matches_reference(train):
    ref, fused = _pair()
    ref.train(train), fused.train(train)
    x = torch.randn(2, 32, 14, 18)
    grads, bufs_after = [], []
    for model in (ref, fused):
        params = {k: v.detach() for k, v in model.named_parameters()}
        bufs = {k: v.clone() for k, v in model.named_buffers()}

        def loss(p, b, model=model):
            return torch.func.functional_call(model, {**p, **b}, (x,)).square().mean()

        grads.append(torch.func.grad(loss)(params, bufs))
        bufs_after.append(bufs)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    for k in bufs_after[0]:  # the running statistics move in train mode, as the reference's do
        torch.testing.assert_close(bufs_after[1][k], bufs_after[0][k], rtol=1e-5, atol=1e-7)
    if train:
        assert not torch.equal(bufs_after[1]["bn3.running_mean"], dict(fused.named_buffers())["bn3.running_mean"])


def test_vmap_eval_matches_reference():
    ref, fused = _pair(1)
    ref.eval(), fused.eval()
    xs = torch.randn(3, 2, 32, 13, 9)
    with torch.no_grad():
        want = torch.stack([ref(x) for x in xs])
        got = torch.func.vmap(fused)(xs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_fused_path_runs_outside_transforms():
    """The standard-operator path is taken only inside a transform: outside it the fused ops run (k4's
    convolution of the recomputed gate, no sigmoid or gather of the reference computation)."""
    _, fused = _pair(2)
    fused = copy.deepcopy(fused).train()
    x = torch.randn(2, 32, 14, 18, requires_grad=True)
    names = set()
    fn = fused(x).grad_fn
    stack = [fn]
    while stack:
        f = stack.pop()
        if f is None or f.name() in names:
            continue
        names.add(f.name())
        stack.extend(g for g, _ in f.next_functions)
    assert not scnet_fused.modules._standard_ops_only()
    assert "_ConvOfGateBackward" in names, sorted(names)
    assert "SigmoidBackward0" not in names and "IndexSelectBackward0" not in names, sorted(names)
