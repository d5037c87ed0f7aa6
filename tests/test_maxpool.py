"""The NCHW CPU max pool (scnet_fused.ops.maxpool, csrc/cpu/sc_maxpool_cpu.cpp) against ATen's:
the same values, the same indices and the same gradients, bit for bit; the fallback everywhere else."""

import random

import pytest
import torch
import torch.nn.functional as F

from scnet_fused import models, reference
from scnet_fused.modules import MaxPool2d
from scnet_fused.ops import maxpool

needs_kernel = pytest.mark.skipif(not maxpool._kernel_ready(),
                                  reason="needs the compiled CPU kernels (AVX2 or AVX-512 build)")


def _same(a, b):
    """Bitwise equality that counts NaN as equal to NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.isnan(a), torch.isnan(b)) and \
        torch.equal(a.nan_to_num(0.0, 1.0, -1.0), b.nan_to_num(0.0, 1.0, -1.0)) and \
        torch.equal(torch.signbit(a), torch.signbit(b))


def _data(kind, shape, gen):
    x = torch.randn(shape, generator=gen)
    if kind == "relu":  # many zeros: windows whose maximum ties
        x = x.relu()
    elif kind == "ints":  # few distinct values: ties everywhere
        x = torch.randint(-2, 3, shape, generator=gen).float()
    elif kind == "nan":
        x[torch.rand(shape, generator=gen) < 0.05] = float("nan")
    elif kind == "inf":
        x[torch.rand(shape, generator=gen) < 0.3] = float("-inf")
        x[torch.rand(shape, generator=gen) < 0.05] = float("inf")
    elif kind == "neg_inf":  # whole windows of -inf: the index is the window's first element
        x.fill_(float("-inf"))
    elif kind == "signed_zero":
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
    return x


@needs_kernel
def test_kernel_matches_aten_values_and_indices():
    """Random windows, strides, paddings and sizes (rows shorter and longer than a vector, windows
    reaching into the padding on every side) over data with ties, NaN and infinities."""
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    op = torch.ops.scnet_fused._max_pool2d_nchw
    for _ in range(160):
        kh, kw = rng.randint(1, 5), rng.randint(1, 5)
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        ph, pw = rng.randint(0, kh // 2), rng.randint(0, kw // 2)
        H = rng.randint(max(1, kh - 2 * ph), 37)
        W = rng.randint(max(1, kw - 2 * pw), 75)
        shape = (rng.randint(1, 2), rng.randint(1, 3), H, W)
        kind = rng.choice(["randn", "relu", "ints", "nan", "inf", "neg_inf", "signed_zero"])
        x = _data(kind, shape, gen)
        ry, ri = F.max_pool2d_with_indices(x, (kh, kw), (sh, sw), (ph, pw))
        y, i = op(x, kh, kw, sh, sw, ph, pw, True)
        what = f"{shape} k{(kh, kw)} s{(sh, sw)} p{(ph, pw)} {kind}"
        assert _same(y, ry), what
        assert torch.equal(i, ri), what
        y2, i2 = op(x, kh, kw, sh, sw, ph, pw, False)
        assert _same(y2, ry) and i2.numel() == 0, what


@needs_kernel
@pytest.mark.parametrize("kind", ["randn", "relu", "nan"])
def test_stem_pool_forward_backward_and_double_backward(kind):
    """The stem's pool (3x3, stride 2, padding 1) on a ReLU'd map: output, input gradient (ATen's
    backward on the kernel's indices) and the gradient of that gradient, against F.max_pool2d."""
    gen = torch.Generator().manual_seed(1)
    x = _data(kind, (2, 5, 34, 38), gen)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = maxpool.max_pool2d(a, 3, 2, 1)
    yb = F.max_pool2d(b, 3, 2, 1)
    assert ya.grad_fn is not None and "MaxPool2dNCHW" in type(ya.grad_fn).__name__
    assert _same(ya, yb)
    dy = torch.randn(ya.shape, generator=gen, requires_grad=True)
    (ga,) = torch.autograd.grad(ya, a, dy, create_graph=True)
    (gb,) = torch.autograd.grad(yb, b, dy, create_graph=True)
    assert _same(ga, gb)
    w = torch.randn(ga.shape, generator=gen)
    (gga,) = torch.autograd.grad((ga * w).sum(), dy)
    (ggb,) = torch.autograd.grad((gb * w).sum(), dy)
    assert torch.equal(gga, ggb)


@needs_kernel
def test_result_does_not_depend_on_the_thread_count():
    x = torch.randn(3, 7, 41, 57).relu()
    prev = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.scnet_fused._max_pool2d_nchw(x, 3, 3, 2, 2, 1, 1, True))
    finally:
        torch.set_num_threads(prev)
    for y, i in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(i, outs[0][1])


@pytest.mark.parametrize("case", ["channels_last", "float64", "bfloat16", "dilation", "ceil_mode", "strided",
                                  "3d_input", "empty", "big_padding"])
def test_other_inputs_take_aten_with_its_results(case):
    """What the kernel does not take goes to F.max_pool2d: the same results and errors as ATen's."""
    x = torch.randn(2, 3, 16, 20)
    kw = dict(kernel_size=3, stride=2, padding=1)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case == "float64":
        x = x.double()
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "dilation":
        kw["dilation"] = 2
    elif case == "ceil_mode":
        kw["ceil_mode"] = True
    elif case == "strided":
        x = torch.randn(2, 3, 16, 40)[..., ::2]
    elif case == "3d_input":
        x = torch.randn(3, 16, 20)
    elif case == "empty":
        x = torch.randn(0, 3, 16, 20)
    elif case == "big_padding":  # ATen rejects padding above half the window
        kw["padding"] = 2
        with pytest.raises(RuntimeError, match="pad should be"):
            F.max_pool2d(x, **kw)
        with pytest.raises(RuntimeError, match="pad should be"):
            maxpool.max_pool2d(x, **kw)
        return
    k, s, p = (kw["kernel_size"],) * 2, (kw["stride"],) * 2, (kw["padding"],) * 2
    d = (kw.get("dilation", 1),) * 2
    assert not maxpool.kernel_applies(x, k, s, p, d, kw.get("ceil_mode", False))
    assert _same(maxpool.max_pool2d(x, **kw), F.max_pool2d(x, **kw))


@needs_kernel
def test_kernel_checks_its_inputs():
    op = torch.ops.scnet_fused._max_pool2d_nchw
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(RuntimeError, match="float32"):
        op(x.double(), 3, 3, 2, 2, 1, 1, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.contiguous(memory_format=torch.channels_last).transpose(2, 3), 3, 3, 2, 2, 1, 1, True)
    with pytest.raises(RuntimeError, match="4-D"):
        op(x[0], 3, 3, 2, 2, 1, 1, True)
    with pytest.raises(RuntimeError, match="at most half"):
        op(x, 3, 3, 2, 2, 2, 1, True)
    for pads in ((2 ** 63 - 1, 1), (1, 2 ** 63 - 1)):  # 2 p overflowed past the check (wrong pools, or a crash)
        with pytest.raises(RuntimeError, match="at most half"):
            op(torch.randn(2, 5, 21, 40), 3, 3, 2, 2, *pads, True)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        op(torch.randn(1, 1, 2, 8), 5, 3, 1, 1, 1, 1, True)


@pytest.mark.parametrize("args", [(True,), (2.5,), ((3, 2, 1),), (3, 2.0), (3, 2, (1, 0.5)), (3, 2, 1, True)])
def test_arguments_aten_rejects_are_rejected(args):
    """Pool arguments F.max_pool2d refuses (floats, bools, three numbers) get ATen's own error, not a
    truncated pool."""
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises((TypeError, RuntimeError)) as want:
        F.max_pool2d(x, *args)
    with pytest.raises(type(want.value)):
        maxpool.max_pool2d(x, *args)


def test_forward_mode_ad_gets_the_tangent():
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9, 9)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(maxpool.max_pool2d(fwAD.make_dual(x, t), 3, 2, 1))
        want = fwAD.unpack_dual(F.max_pool2d(fwAD.make_dual(x, t), 3, 2, 1))
    assert got.tangent is not None
    assert torch.equal(got.primal, want.primal) and torch.equal(got.tangent, want.tangent)


def test_module_is_a_maxpool2d_and_the_fused_models_use_it():
    pool = MaxPool2d(3, 2, 1)
    assert isinstance(pool, torch.nn.MaxPool2d) and pool.state_dict() == {}
    x = torch.randn(2, 4, 15, 17).relu()
    assert _same(pool(x), F.max_pool2d(x, 3, 2, 1))
    with_idx = MaxPool2d(3, 2, 1, return_indices=True)(x)
    ref_idx = torch.nn.MaxPool2d(3, 2, 1, return_indices=True)(x)
    assert _same(with_idx[0], ref_idx[0]) and torch.equal(with_idx[1], ref_idx[1])
    calls = []
    pool.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    pool(x)
    assert calls == [torch.Size([2, 4, 8, 9])]

    fused = models.scnet50(fused=True, num_classes=10)
    plain = models.scnet50(fused=False, num_classes=10)
    assert type(fused.maxpool) is MaxPool2d and type(plain.maxpool) is torch.nn.MaxPool2d
    assert fused.state_dict().keys() == plain.state_dict().keys()
    assert type(models.scnet50_v1d(fused=True, features_only=True).maxpool) is MaxPool2d


def test_traces_record_the_standard_operator():
    """torch.jit.trace records F.max_pool2d, not the package's op (the trace runs without it)."""
    pool = MaxPool2d(3, 2, 1)
    x = torch.randn(1, 2, 9, 9)
    traced = torch.jit.trace(pool, (x,))
    graph = str(traced.graph)
    assert "scnet_fused::" not in graph and "aten::max_pool2d" in graph
    assert _same(traced(x), F.max_pool2d(x, 3, 2, 1))


def test_stem_matches_the_reference_model():
    """A fused SCNet's stem (conv, BN, ReLU, the pool) against the reference's: same values and input
    gradient through the pool, training mode."""
    ref = reference.scnet50(num_classes=10)
    fused = models.scnet50(fused=True, num_classes=10)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 72)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()

    def stem(m, t):
        return m.maxpool(m.relu(m.bn1(m.conv1(t))))

    ya, yb = stem(fused, a), stem(ref, b)
    assert _same(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)
