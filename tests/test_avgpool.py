"""sc_avgpool: the k2 average pool's own kernels against F.avg_pool2d, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

import scnet_fused
from scnet_fused import reference
from scnet_fused.ops import available, backend, sc_avgpool

from _util import backends_here

# (N, C, H, W, r): divisible and not (trailing rows / columns dropped), r = 1 .. 5 and 16, a 1x1 pooled map.
SHAPES = [
    (2, 3, 8, 8, 4),
    (2, 5, 14, 14, 4),
    (1, 4, 7, 9, 4),
    (2, 3, 11, 10, 3),
    (1, 16, 9, 13, 2),
    (1, 2, 5, 5, 5),
    (2, 3, 4, 6, 1),
    (1, 17, 6, 7, 4),
    (1, 3, 37, 40, 16),  # a rate the Triton forward loops over instead of unrolling
]

TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


def _make(shape, dtype, layout):
    N, C, H, W, _ = shape
    x = torch.randn(N, C, H, W, dtype=torch.float32).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a slice: neither contiguous nor channels_last
        x = torch.randn(N, C, H, W + 3, dtype=torch.float32).to(dtype)[..., 1:W + 1]
    return x


@pytest.mark.parametrize("name", backends_here())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_forward_backward_match_aten(name, shape, layout):
    r = shape[-1]
    x = _make(shape, torch.float32, layout).requires_grad_()
    with backend(name):
        y = sc_avgpool(x, r)
    ref = F.avg_pool2d(x, r, r)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    g = torch.randn_like(ref)
    with backend(name):
        (dx,) = torch.autograd.grad(y, x, g)
    (dref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(dx, dref, rtol=1e-6, atol=1e-7)
    H, W = shape[2], shape[3]
    h, w = H // r, W // r
    # the dropped trailing rows and columns get exactly zero (NaN-poisoned outputs would show here)
    assert torch.all(dx[:, :, h * r:, :] == 0) and torch.all(dx[:, :, :, w * r:] == 0)
    if layout == "channels_last":
        assert dx.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", [n for n in backends_here() if n != "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision(name, dtype, layout):
    shape = (2, 16, 14, 13, 4)
    x = _make(shape, dtype, layout).requires_grad_()
    with backend(name):
        y = sc_avgpool(x, 4)
        g = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, g)
    assert y.dtype == dtype and dx.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    ref = F.avg_pool2d(x64, 4, 4)
    (dref,) = torch.autograd.grad(ref, x64, g.double())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx.double(), dref, rtol=rtol, atol=atol)


# Triton's CPU interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest even),
# so its bfloat16 case is not one of these.
@pytest.mark.parametrize("name,dtype", [(n, d) for n in backends_here() if n != "reference"
                                        for d in (torch.float16, torch.bfloat16)
                                        if not (n == "triton" and d == torch.bfloat16)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_rounding_is_exact(name, dtype, layout):
    """Half-precision outputs are the float results rounded to nearest, ties to even, bit for bit: on
    multiples of 1/16 below 8 in magnitude every 4x4 window mean is exact in float32 and many need
    rounding (ties among them), with rows and channels long enough for whole-vector stores; a NaN
    or an infinity in a window gives NaN or that infinity."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(-128, 128, (2, 40, 8, 164), generator=g) / 16).to(dtype)
    x[0, 3, 1, 5], x[1, 7, 6, 70], x[1, 20, 2, 33] = float("nan"), float("inf"), -float("inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with backend(name):
        y = sc_avgpool(x, 4)
    expected = F.avg_pool2d(x.float(), 4, 4).to(dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    assert y.isnan().sum() == 1 and y.isinf().sum() == 2


@pytest.mark.parametrize("name,dtype", [(n, d) for n in backends_here() if n != "reference"
                                        for d in (torch.float32, torch.float16, torch.bfloat16)
                                        if not (n == "triton" and d == torch.bfloat16)])
@pytest.mark.parametrize("H,W,r", [(7, 7, 4), (3, 3, 2), (2, 3, 2), (4, 5, 4), (9, 15, 8)])
def test_one_window_per_plane(name, dtype, H, W, r):
    """Planes with one pooling window (r <= H, W < 2r: SCNet's 7x7 maps at r = 4), which the CPU kernels
    read and write as whole planes with a mask of the window: planes of fewer and more elements than a
    vector, NaN and infinities inside the window (propagated) and outside it (dropped: nothing of them
    reaches y, and their gradient is exactly zero), power-of-two rates and values whose means are exact,
    so the results are bit for bit (SHAPES has rates 3 and 5 in this case too, to a tolerance);
    contiguous only (channels_last has its own kernel)."""
    g = torch.Generator().manual_seed(H * 100 + W * 10 + r)
    N, C = 3, 11
    x = (torch.randint(-128, 128, (N, C, H, W), generator=g) / 16).to(dtype)
    # outside the window (every shape here has W > r; the last one below is in a dropped row where H > r)
    x[0, 1, H - 1, W - 1], x[1, 2, 0, W - 1] = float("nan"), float("inf")
    x[2, 3, H - 1 if H > r else 1, 0 if H > r else W - 1] = -float("inf")
    x[0, 4, 0, 0], x[1, 5, r - 1, r - 1], x[2, 6, r - 1, 0] = float("nan"), float("inf"), -float("inf")
    x.requires_grad_()
    with backend(name):
        y = sc_avgpool(x, r)
    expected = F.avg_pool2d(x.detach().float(), r, r).to(dtype)
    assert y.shape == (N, C, 1, 1)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    assert y.isnan().sum() == 1 and y.isinf().sum() == 2
    dy = (torch.randint(-64, 64, (N, C, 1, 1), generator=g) / 4).to(dtype)
    dy[0, 0], dy[1, 1], dy[2, 2] = float("nan"), float("inf"), -float("inf")
    with backend(name):
        (dx,) = torch.autograd.grad(y, x, dy)
    dref = (dy.float() / (r * r)).expand(N, C, r, r).to(dtype)
    assert dx.is_contiguous()
    torch.testing.assert_close(dx[:, :, :r, :r], dref, rtol=0, atol=0, equal_nan=True)
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[:r, :r] = False
    assert torch.all(dx[:, :, outside] == 0)  # exactly zero: no 0 * inf, no poisoned memory


def test_triton_row_vectors_only_at_unrolled_power_of_two_rates():
    """The Triton forward reads window rows as vectors at SCNet's widths (r = 4 dividing W, NCHW), never
    past the unrolled rates (its [block, r] row tile would take 170 registers at r = 16)."""
    sc_pool = pytest.importorskip("scnet_fused.triton.sc_pool")
    assert sc_pool.row_vectors(56, 4, False) and sc_pool.row_vectors(28, 4, False)
    assert not sc_pool.row_vectors(14, 4, False) and not sc_pool.row_vectors(56, 4, True)
    assert not sc_pool.row_vectors(63, 3, False) and not sc_pool.row_vectors(64, 1, False)
    assert sc_pool.row_vectors(64, sc_pool.UNROLL_MAX_R, False)
    assert not sc_pool.row_vectors(64, 2 * sc_pool.UNROLL_MAX_R, False)


def test_float64_gradcheck_and_opcheck():
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sc_avgpool(t, 3), (x,))
    for name in backends_here():
        with backend(name):
            xf = torch.randn(2, 3, 9, 7, requires_grad=True)
            torch.library.opcheck(torch.ops.scnet_fused.sc_avgpool.default, (xf, 4))
            torch.library.opcheck(torch.ops.scnet_fused.sc_avgpool.default,
                                  (xf.detach().contiguous(memory_format=torch.channels_last), 2))


@pytest.mark.parametrize("name", backends_here(include_reference=False))
def test_primitives_agree_with_reference(name):
    """The backward primitive on its own, both layouts, against the reference's independent formula."""
    from scnet_fused.ops import _dispatch

    with backend(name):
        _, prims = _dispatch.select(torch.device("cpu"), torch.float32)
    for cl in (False, True):
        dy = torch.randn(2, 8, 3, 2)
        dx = prims.avgpool_backward(dy, 13, 9, 4, cl)
        ref = reference.avgpool_backward(dy, 13, 9, 4, cl)
        assert dx.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        torch.testing.assert_close(dx, ref, rtol=1e-6, atol=1e-7)


def test_double_backward():
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: sc_avgpool(t, 4) ** 2, (x,))
    xf = x.detach().float().requires_grad_()
    (g,) = torch.autograd.grad((sc_avgpool(xf, 4) ** 2).sum(), xf, create_graph=True)
    (gg,) = torch.autograd.grad(g.pow(2).sum(), xf)
    xr = x.detach().float().requires_grad_()
    (gr,) = torch.autograd.grad((F.avg_pool2d(xr, 4, 4) ** 2).sum(), xr, create_graph=True)
    (ggr,) = torch.autograd.grad(gr.pow(2).sum(), xr)
    torch.testing.assert_close(gg, ggr, rtol=1e-5, atol=1e-6)


def test_empty_batch_and_errors():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    y = sc_avgpool(x, 4)
    assert y.shape == (0, 3, 2, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape
    # zero channels (ATen's pool refuses them): the empty result on every path, the standard-operator
    # form (traces, exports, torch.func) included
    from scnet_fused.ops import _plain

    for pool in (sc_avgpool, _plain.sc_avgpool):
        x0 = torch.randn(2, 0, 9, 8, requires_grad=True)
        y0 = pool(x0, 4)
        assert y0.shape == (2, 0, 2, 2)
        y0.sum().backward()
        assert x0.grad.shape == x0.shape
    with pytest.raises(ValueError, match="at least the pooling rate 4"):
        sc_avgpool(torch.randn(1, 2, 3, 8), 4)
    with pytest.raises(ValueError, match="4-D"):
        sc_avgpool(torch.randn(2, 8, 8), 4)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        sc_avgpool(torch.ones(1, 2, 8, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="int >= 1"):
        sc_avgpool(torch.randn(1, 2, 8, 8), 0)
    with pytest.raises(ValueError, match="int >= 1"):
        sc_avgpool(torch.randn(1, 2, 8, 8), 2.0)


def test_nothing_full_size_saved_for_backward():
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sc_avgpool(x, 4)
    assert saved == []


def test_compiles_fullgraph():
    x = torch.randn(2, 3, 12, 10, requires_grad=True)
    f = torch.compile(lambda t: sc_avgpool(t, 4) * 2.0, fullgraph=True, backend="aot_eager")
    y = f(x)
    torch.testing.assert_close(y, F.avg_pool2d(x, 4, 4) * 2.0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.avg_pool2d(x, 4, 4).sum() * 2.0, x)[0])


def _pool_calls(module, x):
    """Names of the pool ops (either eager path) one forward + backward of ``module`` ran."""
    with torch.profiler.profile() as prof:
        module(x).sum().backward()
    return {e.name for e in prof.events() if "avgpool" in e.name and e.name.startswith("scnet_fused::")}


def test_fused_scconv_uses_the_pool_kernel_and_falls_back_for_other_pools():
    torch.manual_seed(0)
    ref = reference.SCConv(8, 8, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d)
    fused = scnet_fused.SCConv.adopt(ref)
    x = torch.randn(2, 8, 13, 11, requires_grad=True)
    calls = _pool_calls(fused, x)
    if available("cpu") is None:  # the kernels themselves ran
        assert {"scnet_fused::_avgpool", "scnet_fused::_avgpool_backward"} <= calls, calls
    assert calls & {"scnet_fused::sc_avgpool", "scnet_fused::_sc_avgpool_ag"}, calls
    # a pool sc_avgpool does not compute (ceil mode): the module itself runs, results still match
    ref.k2[0] = torch.nn.AvgPool2d(4, 4, ceil_mode=True)
    fused = scnet_fused.SCConv.adopt(ref)
    calls = _pool_calls(fused, x)
    assert not calls
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(available("triton") is not None, reason="triton unavailable")
def test_triton_int64_offsets_path(monkeypatch):
    """The 64-bit index path of the Triton pool kernels (taken at 2**31 elements) on a small tensor."""
    from scnet_fused.triton import sc_pool

    monkeypatch.setattr(sc_pool, "INT32_LIMIT", 1)
    for cl in (False, True):
        x = torch.randn(2, 6, 13, 11)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(sc_pool.avgpool(x, 4), F.avg_pool2d(x, 4, 4), rtol=1e-6, atol=1e-6)
        dy = torch.randn(2, 6, 3, 2)
        torch.testing.assert_close(sc_pool.avgpool_backward(dy, 13, 11, 4, cl),
                                   reference.avgpool_backward(dy, 13, 11, 4, cl), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(available("triton") is not None, reason="triton unavailable")
@pytest.mark.parametrize("big", [False, True], ids=["int32", "int64"])
def test_triton_row_vectors(monkeypatch, big):
    """NCHW maps whose width is a multiple of a power-of-two rate read each window row as one vector
    (56 and 28 px at r = 4): the same means as the R * R loads, to rounding, and as ATen's."""
    from scnet_fused.triton import sc_pool

    assert sc_pool.row_vectors(56, 4, False) and sc_pool.row_vectors(28, 4, False)
    assert not (sc_pool.row_vectors(14, 4, False) or sc_pool.row_vectors(56, 4, True)
                or sc_pool.row_vectors(12, 3, False) or sc_pool.row_vectors(8, 1, False))
    if big:
        monkeypatch.setattr(sc_pool, "INT32_LIMIT", 1)
    x = torch.randn(2, 6, 13, 12) * 3 + 1
    picked, real = [], sc_pool.row_vectors
    monkeypatch.setattr(sc_pool, "row_vectors", lambda *a: picked.append(real(*a)) or picked[-1])
    y = sc_pool.avgpool(x, 4)
    assert picked == [True]
    monkeypatch.setattr(sc_pool, "row_vectors", lambda *a: False)
    torch.testing.assert_close(y, sc_pool.avgpool(x, 4), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, F.avg_pool2d(x, 4, 4), rtol=1e-6, atol=1e-6)
