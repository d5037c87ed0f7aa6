"""torch.func transforms over the fused modules (functional_call + grad, vmap) and forward-mode AD with
dual tensors: the custom ops' autograd does not support them, so inside a transform or a dual level the
modules run the reference computation in standard operators; the results must equal the reference
model's, running statistics included."""

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
    assert not scnet_fused.ops._dispatch.standard_ops_only()
    assert "_ConvOfGateBackward" in names, sorted(names)
    assert "SigmoidBackward0" not in names and "IndexSelectBackward0" not in names, sorted(names)


def _op_cases():
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    # Irregular map (13x9 pooled to 3x2), per-channel vectors away from 1 / 0.
    x, small, k3, dy = r(2, 3, 13, 9), r(2, 3, 3, 2), r(2, 3, 13, 9) * 2 + 0.3, r(2, 3, 13, 9)
    w, b, tb = r(3).abs() + 0.5, r(3) * 0.3, r(2, 4, 13, 9)
    wb, bb = r(4).abs() + 0.5, r(4) * 0.3
    ops = scnet_fused.ops
    return [
        ("sc_gate", lambda x, k3, w, b: scnet_fused.sc_gate(x, small, k3, w, b), (x, k3, w, b), dy),
        ("sc_gate_bn_train", lambda x, k3, w, b: scnet_fused.sc_gate_bn_train(x, small, k3, w, b)[0], (x, k3, w, b), dy),
        ("sc_gate_small_affine", lambda x, s, w, b: scnet_fused.sc_gate(x, s, k3, None, None, w, b), (x, small, w, b),
         dy),
        ("sc_gate_bn2_train", lambda x, s, w, b: scnet_fused.sc_gate_bn2_train(x, s, k3, w, b, 1e-5, b.abs() + 0.5, w,
                                                                                1e-3)[0], (x, small, w, b), dy),
        ("sc_avgpool", lambda x: scnet_fused.sc_avgpool(x, 4), (x,), r(2, 3, 3, 2)),
        ("bn_relu_train", lambda t, w, b: ops.bn_relu_train(t, w, b)[0], (k3, w, b), dy),
        ("bn_relu_cat_train", lambda ta, tb: ops.bn_relu_cat_train(ta, w, b, tb, wb, bb)[0], (k3, tb), r(2, 7, 13, 9)),
        ("relu_cat", lambda a, c: scnet_fused.ops.relu_cat.relu_cat(a, c), (k3, tb), r(2, 7, 13, 9)),
        ("bn_add_relu_train", lambda t, w, b, res: ops.bn_add_relu_train(t, w, b, res)[0], (k3, w, b, x), dy),
    ]


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_public_ops_under_func_grad_match_the_fused_ops(case):
    """Each public op inside torch.func.grad (standard operators) against the same op in eager autograd
    (the fused kernels): outputs and the gradient of every differentiable argument."""
    _, fn, args, dy = case
    want_out = fn(*args)
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    torch.autograd.backward(fn(*leaves), dy)
    outs = []

    def loss(*a):
        out = fn(*a)
        outs.append(out.detach())
        return (out * dy).sum()

    grads = torch.func.grad(loss, argnums=tuple(range(len(args))))(*args)
    torch.testing.assert_close(outs[0], want_out.detach(), rtol=1e-5, atol=1e-6)
    for i, (got, leaf) in enumerate(zip(grads, leaves)):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"argument {i}: {m}")


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_public_ops_under_vmap_match_a_loop(case):
    """Each public op batched by torch.func.vmap over a leading dimension (every argument batched) equals
    the op called on each slice, and vmap of its gradient equals the slices' gradients."""
    _, fn, args, dy = case
    batched = [torch.stack([a, a.flip(0) * 0.5 + 0.25]) if a.dim() == 4 else torch.stack([a, a.abs() + 0.1])
               for a in args]
    got = torch.func.vmap(fn)(*batched)
    want = torch.stack([fn(*(b[i] for b in batched)) for i in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def loss(*a):
        return (fn(*a) * dy).sum()

    grads = torch.func.vmap(torch.func.grad(loss, argnums=0))(*batched)
    for i in range(2):
        torch.testing.assert_close(grads[i], torch.func.grad(loss, argnums=0)(*(b[i] for b in batched)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_forward_ad_dual_tensors_match_reference(train):
    """torch.autograd.forward_ad (dual tensors, outside torch.func): the custom ops and the C++ autograd
    nodes have no forward derivative, so while a dual level is open the modules run the standard
    operators; the tangent equals the reference's. Outside the level the fused path runs again."""
    import torch.autograd.forward_ad as fwAD

    ref, fused = _pair(3)
    ref.train(train), fused.train(train)
    x, t = torch.randn(2, 32, 14, 18), torch.randn(2, 32, 14, 18)
    got = []
    for model in (ref, copy.deepcopy(fused)):
        with fwAD.dual_level():
            assert scnet_fused.ops._dispatch.standard_ops_only()
            out = fwAD.unpack_dual(model(fwAD.make_dual(x, t)))
        got.append((out.primal, out.tangent))
    assert got[1][1] is not None
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-4, atol=1e-4)
    assert not scnet_fused.ops._dispatch.standard_ops_only()


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_public_ops_forward_ad(case):
    """Each public op with dual inputs: its tangent J t is torch.func.jvp's, and <J t, dy> equals
    <t, J^T dy> with J^T dy from the op's own eager backward (the fused kernels)."""
    import torch.autograd.forward_ad as fwAD

    _, fn, args, dy = case
    tangents = [torch.randn(a.shape, generator=torch.Generator().manual_seed(i)) for i, a in enumerate(args)]
    with fwAD.dual_level():
        out = fwAD.unpack_dual(fn(*[fwAD.make_dual(a, t) for a, t in zip(args, tangents)]))
    _, want = torch.func.jvp(fn, tuple(args), tuple(tangents))
    torch.testing.assert_close(out.tangent, want, rtol=1e-5, atol=1e-5)
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    grads = torch.autograd.grad(fn(*leaves), leaves, dy)
    lhs = (out.tangent.double() * dy.double()).sum()
    rhs = sum((g.double() * t.double()).sum() for g, t in zip(grads, tangents))
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(rhs)), (lhs.item(), rhs.item())


def test_bad_input_inside_a_transform_is_the_same_clear_error():
    x, k3 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    small = torch.randn(2, 4, 2, 2)  # 4 channels against 3
    with pytest.raises(ValueError, match="channel"):
        torch.func.grad(lambda x: scnet_fused.sc_gate(x, small, k3).sum())(x)
    with pytest.raises(ValueError, match="channel"):
        scnet_fused.sc_gate(x, small, k3)


def test_conv3x3_winograd_under_transforms_and_dual_tensors():
    """The public Winograd convolution inside torch.func.grad and with dual tensors: F.conv2d's results."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    from scnet_fused.ops import winograd

    if not winograd._kernels_present():
        pytest.skip("no compiled CPU kernels")
    g = torch.Generator().manual_seed(4)
    x, w, t = torch.randn(2, 8, 9, 7, generator=g), torch.randn(5, 8, 3, 3, generator=g), torch.randn(2, 8, 9, 7,
                                                                                                       generator=g)
    got = torch.func.grad(lambda w: scnet_fused.ops.conv3x3_winograd(x, w).square().sum())(w)
    want = torch.func.grad(lambda w: F.conv2d(x, w, padding=1).square().sum())(w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(scnet_fused.ops.conv3x3_winograd(fwAD.make_dual(x, t), w)).tangent
    torch.testing.assert_close(got, F.conv2d(t, w, padding=1), rtol=1e-5, atol=1e-5)


def test_classifier_under_transforms_keeps_its_layout():
    """The fused classifier's CPU layout rule stands aside inside torch.func transforms (vmap cannot
    convert a batched tensor's memory format): torch.func.grad in training and vmap of eval batches of
    192 px images (which the rule would otherwise convert) match the reference."""
    from scnet_fused import models

    torch.manual_seed(0)
    fused = models.build("scnet50", layers=(1, 1, 1, 1), num_classes=5)
    ref = models.build("scnet50", fused=False, layers=(1, 1, 1, 1), num_classes=5)
    ref.load_state_dict(fused.state_dict())
    params = {k: v.detach() for k, v in fused.named_parameters()}
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (fused, ref):
        bufs = {k: v.clone() for k, v in model.named_buffers()}

        def loss(p, b, model=model):
            return torch.func.functional_call(model, {**p, **b}, (x,)).square().mean()

        grads.append(torch.func.grad(loss)(params, bufs))
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    fused.eval(), ref.eval()
    bufs = {k: v.clone() for k, v in fused.named_buffers()}
    xs = torch.randn(2, 1, 3, 192, 192)
    with torch.no_grad():
        out = torch.vmap(lambda xx: torch.func.functional_call(fused, {**params, **bufs}, (xx,)))(xs)
        expect = torch.stack([ref(xx) for xx in xs])
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)
