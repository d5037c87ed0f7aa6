"""Seeded random configurations of SCBottleneck and SCConv against the float64 reference.

The parametrized tests elsewhere take each option on its own; here every case draws all of them at
once (stride, avd, is_first, dilation, cardinality, width, downsample kind, norm kind, batch, odd sizes,
memory format, train / eval), so combinations nobody listed get checked too. A case's draw comes from
its seed alone, so a failure names a case that reproduces.

The yardstick is the float32 reference's own error: the fused module's error against the float64
reference (output, input gradient, every parameter gradient, every buffer) must stay within
``_FACTOR`` times it, with a floor for values the float32 reference gets exact. The float32 reference
always runs NCHW: oneDNN's strided 1x1 weight gradient on channels_last maps with fewer input channels
than its channel block writes past its workspace (torch 2.14.1, AVX-512; see test_modules), and the
reference block, unlike the fused one, runs that convolution.
"""

import copy
import random

import pytest
import torch
import torch.nn as nn

import scnet_fused
from scnet_fused import reference as R

from _util import kink_perturbed, randomize_norms

_FACTOR = 20.0
_FLOOR = 1e-4
_NORMS = ("bn", "bn", "bn", "bn_momentum_none", "bn_untracked", "bn_no_affine", "groupnorm")


def _norm(kind):
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "bn_momentum_none":
        return lambda c: nn.BatchNorm2d(c, momentum=None)
    if kind == "bn_untracked":
        return lambda c: nn.BatchNorm2d(c, track_running_stats=False)
    if kind == "bn_no_affine":
        return lambda c: nn.BatchNorm2d(c, affine=False)
    assert kind == "groupnorm"
    return lambda c: nn.GroupNorm(2 if c % 2 == 0 else 1, c)


def _rel(a, b):
    return (a.double() - b.double()).abs().max().item() / (b.double().abs().max().item() + 1e-6)


def _bottleneck_case(seed):
    rng = random.Random(seed)
    planes = rng.choice([4, 8, 16])
    stride = rng.choice([1, 1, 2])
    dilation = rng.choice([1, 1, 2])
    inplanes = rng.choice([planes * 4, planes * 2, 8])
    kw = dict(cardinality=rng.choice([1, 1, 2]), bottleneck_width=rng.choice([32, 64]), avd=rng.random() < 0.3,
              dilation=dilation, is_first=rng.random() < 0.3, norm_layer=_norm(rng.choice(_NORMS)))
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        norm = kw["norm_layer"](planes * 4)
        if rng.random() < 0.5:  # the plain downsample
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), norm)
        else:  # the v1d models' average pool first
            pool = (nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1
                    else nn.Identity())
            downsample = nn.Sequential(pool, nn.Conv2d(inplanes, planes * 4, 1, bias=False), norm)
    lo = 4 * dilation
    shape = (rng.choice([1, 2, 3]), inplanes, rng.randint(lo, 21), rng.randint(lo, 21))
    torch.manual_seed(seed)
    ref = R.SCBottleneck(inplanes, planes, stride, downsample, **kw)
    return ref, shape, rng.random() < 0.4, rng.random() < 0.7


def _scconv_case(seed):
    rng = random.Random(seed)
    c = rng.choice([1, 2, 3, 4, 6, 8, 16, 17])
    groups = rng.choice([g for g in (1, 2, 4) if c % g == 0])
    r = rng.choice([1, 2, 3, 4, 4, 5])
    dilation = rng.choice([1, 1, 2])
    padding = dilation if rng.random() < 0.8 else rng.choice([0, 1, 2])
    stride = rng.choice([1, 1, 2])
    norm = rng.choice(_NORMS + ("identity",))
    shape = (rng.choice([1, 2, 4]), c, rng.randint(r, 23), rng.randint(r, 23))
    torch.manual_seed(seed)
    ref = R.SCConv(c, c, stride, padding, dilation, groups, r,
                   (lambda ch: nn.Identity()) if norm == "identity" else _norm(norm))
    return ref, shape, rng.random() < 0.4, rng.random() < 0.6


def _run(module, x, dy):
    """Output, input gradient and parameter gradients of one forward + backward, and the buffers after."""
    xi = x.clone().requires_grad_()
    y = module(xi)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [xi] + params, dy.to(y.dtype))
    return [y.detach()] + list(grads) + [b.detach().clone() for b in module.buffers()]


def _mismatches(ref, channels_last, train, x, dy):
    """What the fused module gets wrong on x (output gradient dy), measured against the float64
    reference with the float32 reference's error as the yardstick."""
    fused = scnet_fused.convert(copy.deepcopy(ref))
    ref32, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    for m in (fused, ref32, ref64):
        m.train(train)
    xf = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    want = _run(ref64, x.double(), dy.double())
    base = _run(ref32, x, dy)
    got = _run(fused, xf, dy)
    if channels_last and got[0].shape[-1] * got[0].shape[-2] > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last), "a channels_last input gave an NCHW output"
    names = ["output", "input grad"] + [f"grad {n}" for n, _ in ref.named_parameters()] + \
            [f"buffer {n}" for n, _ in ref.named_buffers()]
    bad = []
    for name, g, b, w in zip(names, got, base, want):
        if not g.dtype.is_floating_point:
            if not torch.equal(g, w.to(g.dtype)):
                bad.append(f"{name}: {g.tolist()} != {w.tolist()}")
            continue
        err, err_ref = _rel(g, w), _rel(b, w)
        if err > max(_FACTOR * err_ref, _FLOOR):
            bad.append(f"{name}: relative error {err:.2e}, float32 reference {err_ref:.2e}")
    # at inference: eval mode and no grad (the folded paths)
    for m in (fused, ref32, ref64):
        m.eval()
    with torch.no_grad():
        g, b, w = fused(xf), ref32(x), ref64(x.double())
    err, err_ref = _rel(g, w), _rel(b, w)
    if err > max(_FACTOR * err_ref, _FLOOR):
        bad.append(f"eval output: relative error {err:.2e}, float32 reference {err_ref:.2e}")
    return bad


def _check(make, seed):
    ref, shape, channels_last, train = make(seed)
    randomize_norms(ref)
    what = f"seed {seed}: input {shape}, {'channels_last' if channels_last else 'NCHW'}, " \
           f"{'train' if train else 'eval'}, module {ref}"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            out_shape = copy.deepcopy(ref).double().train(train)(x.double()).shape
    except (ValueError, RuntimeError):
        # the reference refuses this input: so must the fused module (with ValueError where it words the
        # reason itself, as for a padding that changes k3's size, where the reference fails in torch.mul)
        fused = scnet_fused.convert(copy.deepcopy(ref)).train(train)
        xf = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with pytest.raises((ValueError, RuntimeError)):
            fused(xf)
        return
    dy = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 1))
    bad = _mismatches(ref, channels_last, train, x, dy)
    if bad:
        # a pre-activation within float32 rounding of a ReLU kink flips that element's gradient in two
        # correct implementations; an input that is slightly off must then pass on both copies
        for xp in kink_perturbed(x)[1:]:
            again = _mismatches(ref, channels_last, train, xp, dy)
            assert not again, f"{what}\n" + "\n".join(bad)


@pytest.mark.parametrize("seed", range(24))
def test_random_bottleneck(seed):
    _check(_bottleneck_case, 1000 + seed)


@pytest.mark.parametrize("seed", range(16))
def test_random_scconv(seed):
    _check(_scconv_case, 2000 + seed)
