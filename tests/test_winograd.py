"""The Winograd F(4x4, 3x3) convolution of the CPU path (scnet_fused/ops/winograd.py) and its use by the
fused modules: the transforms against their definitions, the convolution and its three gradients
against a float64 direct convolution, the argument checks, the selection rule, and the modules run
through it against the reference."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import scnet_fused
from scnet_fused import reference
from scnet_fused.ops import _cpp, winograd

pytestmark = pytest.mark.skipif(not winograd._kernels_present(),
                                reason=f"compiled CPU kernels unavailable: {_cpp.unavailable_reason('cpu')}")

BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                   [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                  dtype=torch.float64)


@contextlib.contextmanager
def algorithm(name):
    previous = scnet_fused.set_conv_algorithm(name)
    try:
        yield
    finally:
        scnet_fused.set_conv_algorithm(previous)


def _windows(x, size, step, pad):
    """The (N, C, TH, TW, size, size) windows of x at stride `step`, x zero-padded by `pad` first."""
    N, C, H, W = x.shape
    TH, TW = (H + 3) // 4, (W + 3) // 4
    xp = torch.zeros(N, C, 4 * TH + 2, 4 * TW + 2, dtype=x.dtype)
    xp[:, :, pad:pad + H, pad:pad + W] = x
    return xp.unfold(2, size, step).unfold(3, size, step)


# irregular sizes: maps below one tile, sizes not multiples of 4, more than 16 tiles in a row (two
# vector chunks), a single row or column, more channels than one vector holds (20)
SHAPES = [(2, 3, 13, 9), (1, 5, 1, 1), (3, 4, 4, 5), (1, 2, 6, 70), (2, 3, 67, 2), (1, 8, 16, 16), (2, 20, 9, 11)]


@pytest.mark.parametrize("shape", SHAPES)
def test_input_transform_is_bt_d_b(shape):
    x = torch.randn(*shape)
    N, C, H, W = shape
    TH, TW = (H + 3) // 4, (W + 3) // 4
    v = torch.ops.scnet_fused._wino_input(x, TH, TW)
    d = _windows(x.double(), 6, 4, 1)[:, :, :TH, :TW]
    want = torch.einsum("ri,nchwij,sj->rscnhw", BT, d, BT).reshape(36, C, N * TH * TW)
    torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_output_transform_is_at_m_a_and_its_adjoint(shape):
    N, K, H, W = shape
    TH, TW = (H + 3) // 4, (W + 3) // 4
    m = torch.randn(36, K, N * TH * TW)
    bias = torch.randn(K)
    y = torch.ops.scnet_fused._wino_output(m, N, H, W, bias)
    tiles = m.double().reshape(6, 6, K, N, TH, TW)
    full = torch.einsum("ar,rsknhw,bs->nkhawb", AT, tiles, AT).reshape(N, K, 4 * TH, 4 * TW)
    torch.testing.assert_close(y.double(), full[:, :, :H, :W] + bias.double().view(1, -1, 1, 1), rtol=1e-6, atol=1e-4)
    # the adjoint: <output(m), dy> == <m, adjoint(dy)>, and adjoint(dy) = A dy_tile A^T
    dy = torch.randn(N, K, H, W)
    z = torch.ops.scnet_fused._wino_output_adjoint(dy, TH, TW)
    lhs = (torch.ops.scnet_fused._wino_output(m, N, H, W, None).double() * dy.double()).sum()
    rhs = (m.double() * z.double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-3)
    dyp = torch.zeros(N, K, 4 * TH, 4 * TW, dtype=torch.float64)
    dyp[:, :, :H, :W] = dy.double()
    t = dyp.unfold(2, 4, 4).unfold(3, 4, 4)
    want = torch.einsum("ir,nkhwij,js->rsknhw", AT, t, AT).reshape(36, K, N * TH * TW)
    torch.testing.assert_close(z.double(), want, rtol=1e-6, atol=1e-4)


G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)


# filter counts around the kernels' 16-filter vectors: one, fewer than 16, a remainder, exact multiples
@pytest.mark.parametrize("K, C", [(1, 1), (5, 3), (17, 33), (16, 32), (40, 7)])
def test_filter_transforms_are_g_g_gt_and_its_adjoint(K, C):
    torch.manual_seed(4)
    g = torch.randn(K, C, 3, 3)
    want = torch.einsum("ri,kcij,sj->rskc", G, g.double(), G).reshape(36, K, C)
    u = torch.ops.scnet_fused._wino_filter(g)
    assert u.shape == (36, K, C) and u.is_contiguous()
    torch.testing.assert_close(u.double(), want, rtol=1e-6, atol=1e-6)
    # flip: the input gradient's filters flip(g)^T, (C, K, 3, 3), transformed
    flipped = g.flip(2, 3).transpose(0, 1)
    want_flip = torch.einsum("ri,ckij,sj->rsck", G, flipped.double(), G).reshape(36, C, K)
    torch.testing.assert_close(torch.ops.scnet_fused._wino_filter(g, True).double(), want_flip, rtol=1e-6, atol=1e-6)
    # in_major: the two channel axes swapped (the layout the channels_last kernels' products read)
    for flip, w in ((False, want), (True, want_flip)):
        got = torch.ops.scnet_fused._wino_filter(g, flip, True)
        assert got.is_contiguous()
        torch.testing.assert_close(got.double(), w.transpose(1, 2), rtol=1e-6, atol=1e-6)
    # a non-contiguous weight is read as its values
    torch.testing.assert_close(torch.ops.scnet_fused._wino_filter(flipped), want_flip.float(), rtol=1e-6, atol=1e-6)
    # the adjoint: <U(g), du> = <g, U*(du)>, and U* against the float64 products
    du = torch.randn(36, K, C)
    dg = torch.ops.scnet_fused._wino_filter_adjoint(du)
    assert dg.shape == (K, C, 3, 3) and dg.is_contiguous()
    want_dg = torch.einsum("ri,rskc,sj->kcij", G, du.double().reshape(6, 6, K, C), G)
    torch.testing.assert_close(dg.double(), want_dg, rtol=1e-6, atol=1e-6)
    lhs, rhs = (want * du.double()).sum(), (g.double() * want_dg).sum()
    assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs))
    # the matrix-product forms the kernels replaced agree
    torch.testing.assert_close(winograd._weight_transform_mm(g), u, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(winograd._weight_transform_adjoint_mm(du), dg, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_channels_last_transforms_are_the_nchw_ones_transposed(shape):
    x = torch.randn(*shape)
    N, C, H, W = shape
    TH, TW = (H + 3) // 4, (W + 3) // 4
    cl = x.contiguous(memory_format=torch.channels_last)
    ops = torch.ops.scnet_fused
    torch.testing.assert_close(ops._wino_input_nhwc(cl, TH, TW), ops._wino_input(x, TH, TW).transpose(1, 2),
                               rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ops._wino_output_adjoint_nhwc(cl, TH, TW),
                               ops._wino_output_adjoint(x, TH, TW).transpose(1, 2), rtol=1e-6, atol=1e-5)
    m = torch.randn(36, C, N * TH * TW)
    bias = torch.randn(C)
    y = ops._wino_output_nhwc(m.transpose(1, 2).contiguous(), N, H, W, bias)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ops._wino_output(m, N, H, W, bias), rtol=1e-6, atol=1e-4)
    # the same kernels on an NCHW map (its rows staged channels_last a strip at a time), and writing
    # NCHW: the very same values, as the channels_last copy gives them
    assert torch.equal(ops._wino_input_nhwc(x, TH, TW), ops._wino_input_nhwc(cl, TH, TW))
    assert torch.equal(ops._wino_output_adjoint_nhwc(x, TH, TW), ops._wino_output_adjoint_nhwc(cl, TH, TW))
    y_nchw = ops._wino_output_nhwc(m.transpose(1, 2).contiguous(), N, H, W, bias, True)
    assert y_nchw.is_contiguous() and torch.equal(y_nchw, y.contiguous())


def _check_conv(x, w, b, rel=5e-5):
    """conv3x3_winograd against a float64 direct convolution: output and the three gradients, each
    within `rel` of its largest magnitude."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = scnet_fused.ops.conv3x3_winograd(x, w, b)
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (x.shape[0], w.shape[0], *x.shape[2:])
    assert y.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    g = torch.randn_like(y)
    y.backward(g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y64 = F.conv2d(x64, w64, b64, padding=1)
    y64.backward(g.double())
    assert x.grad.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    pairs = [("y", y, y64), ("grad x", x.grad, x64.grad), ("grad w", w.grad, w64.grad)]
    if b is not None:
        pairs.append(("grad b", b.grad, b64.grad))
    for name, got, want in pairs:
        err = (got.double() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= rel * scale, f"{name}: error {err:.3e} against {rel} x {scale:.3e}"


@pytest.fixture(params=["bmm", "kernel", "fused", "inside"])
def gemm(request, monkeypatch):
    """The Winograd products as torch.bmm, as the package's kernel between the three transform passes,
    inside the one-kernel convolution (with the weight gradient's transforms inside it where its rule
    takes them), and that with the filters transformed inside the convolution and the weight gradient's
    products kernel (whichever this machine's "auto" takes, all are checked)."""
    monkeypatch.setattr(winograd, "_gemm_kernel_choice", request.param != "bmm")
    monkeypatch.setattr(winograd, "_fused_setting", "1" if request.param in ("fused", "inside") else "0")
    inside = request.param == "inside"
    monkeypatch.setattr(winograd, "_filters_inside", lambda tiles, k_out, c_in: inside)
    monkeypatch.setattr(winograd, "_wgrad_inside", lambda tiles, k, c: inside)
    if inside:  # the weight gradient's products kernel at every size (the runs kernel: "fused")
        monkeypatch.setattr(winograd, "_wgrad_runs", lambda tiles, k, c: False)
    return request.param


# sizes around the kernel's blocks (14 rows and 32 columns with AVX-512, 6 and 16 with AVX2): below one
# block, remainders, exact multiples; an empty reduction
@pytest.mark.parametrize("P, M, K, N", [(3, 5, 7, 9), (2, 14, 16, 32), (36, 29, 33, 70), (1, 1, 1, 1),
                                        (2, 6, 3, 200), (4, 30, 65, 129), (2, 30, 0, 5)])
def test_batched_products_kernel(P, M, K, N):
    torch.manual_seed(5)
    a, b = torch.randn(P, M, K), torch.randn(P, K, N)
    want = torch.bmm(a.double(), b.double())
    scale = 1e-6 * max(1.0, K)
    for got in (torch.ops.scnet_fused._wino_bmm(a, b), torch.ops.scnet_fused._wino_bmm(a.transpose(1, 2).contiguous(), b, True),
                torch.ops.scnet_fused._wino_bmm(a.transpose(1, 2).contiguous().transpose(1, 2),  # strided views
                                                b.transpose(1, 2).contiguous().transpose(1, 2))):
        assert got.shape == (P, M, N) and got.dtype == torch.float32 and got.is_contiguous()
        assert (got.double() - want).abs().max().item() <= scale * max(1.0, want.abs().max().item())
    with pytest.raises(RuntimeError, match="multiply"):
        torch.ops.scnet_fused._wino_bmm(a, torch.randn(P, K + 1, N))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.scnet_fused._wino_bmm(a.double(), b.double())
    with pytest.raises(RuntimeError, match="3-D"):
        torch.ops.scnet_fused._wino_bmm(a[0], b[0])


# tile counts around the blocks (14 tiles; below 4 x threads blocks, equal blocks up to 16 with the output
# channels split), channels around the 16-channel vectors and the 32-column product blocks
@pytest.mark.parametrize("N, C, K, H, W", [(2, 20, 24, 9, 11), (1, 3, 5, 1, 1), (3, 33, 17, 13, 7), (1, 16, 70, 6, 70),
                                           (4, 7, 64, 16, 16), (9, 2, 3, 8, 12)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_kernel_convolution_is_the_three_passes(N, C, K, H, W, channels_last):
    """_wino_conv computes what the three passes compute (input transform, products, output transform),
    bit for bit (the same sums in the same order), for any block size and with or without the output
    channels split, and writes its result in the input's layout."""
    torch.manual_seed(6)
    x = torch.randn(N, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(K, C, 3, 3), torch.randn(K)
    u = torch.ops.scnet_fused._wino_filter(w, False, True)
    TH, TW = (H + 3) // 4, (W + 3) // 4
    ops = torch.ops.scnet_fused
    for bias in (None, b):
        want = ops._wino_output_nhwc(ops._wino_bmm(ops._wino_input_nhwc(x, TH, TW), u), N, H, W, bias, not channels_last)
        T = N * TH * TW
        for block, split in ((0, True), (1, True), (5, False), (14, True), (16, True), (T, True), (T + 3, False)):
            got = ops._wino_conv(x, u, bias, block, split)
            assert got.shape == (N, K, H, W) and got.is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert torch.equal(got, want), (block, split)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    err = (ops._wino_conv(x, u, b).double() - ref).abs().max().item()
    assert err <= 5e-5 * ref.abs().max().item()


def test_one_kernel_convolution_refuses_bad_arguments():
    x, u = torch.randn(1, 4, 8, 8), torch.randn(36, 4, 6)
    conv = torch.ops.scnet_fused._wino_conv
    with pytest.raises(RuntimeError, match=r"\(36, C, K\) with C = 4"):
        conv(x, torch.randn(36, 5, 6))
    with pytest.raises(RuntimeError, match=r"\(36, C, K\)"):
        conv(x, torch.randn(35, 4, 6))
    with pytest.raises(RuntimeError, match="float32"):
        conv(x.double(), u.double())
    with pytest.raises(RuntimeError, match="bias"):
        conv(x, u, torch.randn(5))
    with pytest.raises(RuntimeError, match="block"):
        conv(x, u, None, -1)
    empty = conv(torch.randn(0, 4, 8, 8), u)
    assert empty.shape == (0, 6, 8, 8)
    # strides of neither layout: read through a channels_last copy, the result channels_last
    odd = torch.randn(1, 4, 9, 8).transpose(2, 3)
    got = conv(odd, u)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, conv(odd.contiguous(memory_format=torch.channels_last), u))
    # no input channels: the bias alone
    b = torch.randn(6)
    torch.testing.assert_close(conv(torch.randn(2, 0, 5, 5), torch.randn(36, 0, 6), b), b.view(1, 6, 1, 1).expand(2, 6, 5, 5))


# output channels around the 32-column parts (16 with AVX2), tiles around the 14-row blocks, groups of
# tiles more than the tiles; flipped filters (the input gradient's convolution)
# (4, 20, 12, 16, 17): 80 tiles, more than one pass of register blocks in a group
@pytest.mark.parametrize("N, C, K, H, W", [(2, 20, 24, 9, 11), (1, 3, 5, 1, 1), (3, 33, 17, 13, 7), (8, 16, 70, 7, 7),
                                           (1, 40, 33, 6, 70), (4, 20, 12, 16, 17)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_convolution_with_the_filters_transformed_inside(N, C, K, H, W, channels_last):
    """_wino_conv_w computes what _wino_conv computes from the filters' transform made by _wino_filter,
    bit for bit (the same transform of the same taps, the same sums in the same order), for any grouping
    of the tiles, flipped or not, in the input's layout; and the direct convolution within float32
    rounding."""
    torch.manual_seed(7)
    ops = torch.ops.scnet_fused
    w, b = torch.randn(K, C, 3, 3), torch.randn(K)
    for flip in (False, True):
        cin = K if flip else C
        x = torch.randn(N, cin, H, W)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        u = ops._wino_filter(w, flip, True)
        bias = torch.randn(C) if flip else b
        want = ops._wino_conv(x, u, bias)
        T = N * ((H + 3) // 4) * ((W + 3) // 4)
        threads = torch.get_num_threads()
        try:
            # each thread transforms the tiles of its own groups: any split of the groups between threads
            for nthreads in (threads, 1, 3):
                torch.set_num_threads(nthreads)
                for groups in (0, 1, 2, 5, T, T + 4):
                    got = ops._wino_conv_w(x, w, bias, flip, groups)
                    assert got.is_contiguous(
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                    assert torch.equal(got, want), (flip, groups, nthreads)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(ops._wino_conv_w(x, w, None, flip), ops._wino_conv(x, u, None))
        ref = F.conv2d(x.double(), (w.flip(2, 3).transpose(0, 1) if flip else w).double(), bias.double(), padding=1)
        assert (want.double() - ref).abs().max().item() <= 5e-5 * ref.abs().max().item()


# tiles around the run boundaries and the 14-row product blocks; output channels around the 32-column
# blocks (16 with AVX2); maps not a multiple of 4
@pytest.mark.parametrize("N, C, K, H, W", [(2, 5, 7, 9, 11), (3, 33, 17, 13, 7), (1, 16, 70, 20, 36),
                                           (8, 4, 3, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_gradient_with_the_transforms_inside(N, C, K, H, W, channels_last):
    """_wino_wgrad_x (both transforms inside, the tiles in runs whose partial products are added in
    run order): with one run, bit for bit the separate transforms, products and adjoint transform (the
    same sums in the same order); with any number of runs within float32 rounding of the float64 weight
    gradient; the same bits for every thread count and in both layouts."""
    torch.manual_seed(9)
    ops = torch.ops.scnet_fused
    x, dy = torch.randn(N, C, H, W), torch.randn(N, K, H, W)
    TH, TW = (H + 3) // 4, (W + 3) // 4
    T = N * TH * TW
    want = ops._wino_filter_adjoint(ops._wino_bmm(ops._wino_output_adjoint_nhwc(dy, TH, TW),
                                                  ops._wino_input_nhwc(x, TH, TW), True))
    ref = torch.nn.grad.conv2d_weight(x.double(), (K, C, 3, 3), dy.double(), padding=1)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    assert torch.equal(ops._wino_wgrad_x(dy, x, 1), want)
    threads = torch.get_num_threads()
    try:
        for chunks in (0, 2, 3, T, T + 5):
            got = {}
            for nthreads in (1, 2, 3):
                torch.set_num_threads(nthreads)
                got[nthreads] = ops._wino_wgrad_x(dy, x, chunks)
            assert got[1].shape == (K, C, 3, 3) and got[1].is_contiguous()
            assert torch.equal(got[1], got[2]) and torch.equal(got[1], got[3]), chunks
            assert (got[1].double() - ref).abs().max().item() <= 5e-5 * ref.abs().max().item(), chunks
            other = ops._wino_wgrad_x(dy.contiguous(), x.contiguous(), chunks) if channels_last else \
                ops._wino_wgrad_x(dy.contiguous(memory_format=torch.channels_last),
                                  x.contiguous(memory_format=torch.channels_last), chunks)
            assert torch.equal(other, got[1]), chunks
    finally:
        torch.set_num_threads(threads)


def test_weight_gradient_with_the_transforms_inside_rejects_bad_input():
    ops = torch.ops.scnet_fused
    x, dy = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    with pytest.raises(RuntimeError, match="batch or spatial"):
        ops._wino_wgrad_x(dy[:1], x)
    with pytest.raises(RuntimeError, match="batch or spatial"):
        ops._wino_wgrad_x(dy[..., :7], x)
    with pytest.raises(RuntimeError, match="float32"):
        ops._wino_wgrad_x(dy.double(), x.double())
    with pytest.raises(RuntimeError, match="dimensions"):
        ops._wino_wgrad_x(dy[0], x[0])
    with pytest.raises(RuntimeError, match="chunks"):
        ops._wino_wgrad_x(dy, x, -1)
    assert torch.equal(ops._wino_wgrad_x(dy[:0], x[:0]), torch.zeros(6, 4, 3, 3))  # no tiles: zero
    assert ops._wino_wgrad_x(torch.randn(2, 6, 8, 8), torch.randn(2, 0, 8, 8)).shape == (6, 0, 3, 3)


@pytest.mark.parametrize("C, H", [(16, 34), (64, 14)])
def test_few_channels_and_many_tiles_take_the_weight_gradient_with_the_transforms_inside(C, H, gemm):
    """Up to 64 x 64 channels and more than 64 tiles, with the product kernel, the weight gradient runs
    as one _wino_wgrad_x call (no separate transforms); it matches the direct convolution's."""
    torch.manual_seed(4)
    x = torch.randn(8, C, H, H, requires_grad=True)
    w = torch.randn(C, C, 3, 3, requires_grad=True)
    with _OpLog() as log:
        y = scnet_fused.ops.conv3x3_winograd(x, w)
        dy = torch.randn_like(y)
        y.backward(dy)
    runs = winograd._wgrad_runs(8 * ((H + 3) // 4) ** 2, C, C)
    assert runs == (gemm == "fused")
    assert ("_wino_wgrad_x" in log.names) == runs
    assert any(n.startswith("_wino_input") for n in log.names) != runs  # no separate transform of x
    ref = torch.nn.grad.conv2d_weight(x.detach().double(), w.shape, dy.double(), padding=1)
    assert (w.grad.double() - ref).abs().max().item() <= 5e-5 * ref.abs().max().item()


@pytest.mark.parametrize("T, K, C", [(1, 1, 1), (3, 14, 32), (10, 29, 70), (64, 15, 31), (0, 5, 6), (2, 64, 40)])
def test_weight_gradient_kernel(T, K, C):
    """_wino_wgrad is the products z[xi]^T v[xi] and the filters' adjoint transform, bit for bit (the same
    sums in the same order) for every width of its column parts; no tiles give zero gradients."""
    torch.manual_seed(8)
    ops = torch.ops.scnet_fused
    z, v = torch.randn(36, T, K), torch.randn(36, T, C)
    want = ops._wino_filter_adjoint(ops._wino_bmm(z, v, True))
    for cpart in (0, 32, 64, 96):  # multiples of the column block (32 with AVX-512, 16 in the other builds)
        got = ops._wino_wgrad(z, v, cpart)
        assert got.shape == (K, C, 3, 3) and got.is_contiguous()
        assert torch.equal(got, want), cpart
    assert torch.equal(ops._wino_wgrad(z.transpose(1, 2).contiguous().transpose(1, 2), v), want)  # strided z
    ref = winograd._weight_transform_adjoint_mm(torch.bmm(z.double().transpose(1, 2), v.double()).float())
    torch.testing.assert_close(want, ref, rtol=1e-5, atol=1e-4 * max(1.0, T))


def test_filters_inside_kernels_refuse_bad_arguments():
    ops = torch.ops.scnet_fused
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    with pytest.raises(RuntimeError, match="4 channels"):
        ops._wino_conv_w(x, w, None, True)  # flipped: the map must have the filters' 6 outputs
    with pytest.raises(RuntimeError, match=r"\(K, C, 3, 3\)"):
        ops._wino_conv_w(x, torch.randn(6, 4, 5, 5))
    with pytest.raises(RuntimeError, match="float32"):
        ops._wino_conv_w(x.double(), w.double())
    with pytest.raises(RuntimeError, match="bias"):
        ops._wino_conv_w(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="tile_groups"):
        ops._wino_conv_w(x, w, None, False, -1)
    assert ops._wino_conv_w(torch.randn(0, 4, 8, 8), w).shape == (0, 6, 8, 8)
    b = torch.randn(6)
    torch.testing.assert_close(ops._wino_conv_w(torch.randn(2, 0, 5, 5), torch.randn(6, 0, 3, 3), b),
                               b.view(1, 6, 1, 1).expand(2, 6, 5, 5))
    odd = torch.randn(1, 4, 9, 8).transpose(2, 3)  # neither layout: through a channels_last copy
    assert torch.equal(ops._wino_conv_w(odd, w), ops._wino_conv_w(odd.contiguous(memory_format=torch.channels_last), w))
    z, v = torch.randn(36, 5, 3), torch.randn(36, 5, 4)
    with pytest.raises(RuntimeError, match="5 and 6 tiles"):
        ops._wino_wgrad(z, torch.randn(36, 6, 4))
    with pytest.raises(RuntimeError, match=r"\(36, tiles, channels\)"):
        ops._wino_wgrad(z[:35], v[:35])
    with pytest.raises(RuntimeError, match="float32"):
        ops._wino_wgrad(z.double(), v.double())
    with pytest.raises(RuntimeError, match="cpart"):
        ops._wino_wgrad(z, v, 5)
    # a part wider than the channels is one part of them all (a huge one overflowed the scratch's size)
    assert torch.equal(ops._wino_wgrad(z, v, 2 ** 62), ops._wino_wgrad(z, v, 0))


def test_gemm_choice(monkeypatch):
    monkeypatch.setattr(winograd, "_gemm_kernel_choice", None)
    monkeypatch.setenv(winograd._GEMM_ENV, "fastest")
    with pytest.raises(ValueError, match="auto, bmm or kernel"):
        winograd._gemm_kernel()
    for value, want in (("bmm", False), ("kernel", True)):
        monkeypatch.setattr(winograd, "_gemm_kernel_choice", None)
        monkeypatch.setenv(winograd._GEMM_ENV, value)
        assert winograd._gemm_kernel() is want
    monkeypatch.setenv(winograd._GEMM_ENV, "auto")
    monkeypatch.setattr(_cpp, "cpu_isa", lambda: "avx512")
    for vendor, want in (("GenuineIntel", False), ("AuthenticAMD", True), ("", False)):
        monkeypatch.setattr(winograd, "_gemm_kernel_choice", None)
        monkeypatch.setattr(winograd, "_cpu_vendor", lambda v=vendor: v)
        assert winograd._gemm_kernel() is want
    monkeypatch.setattr(winograd, "_gemm_kernel_choice", None)
    monkeypatch.setattr(_cpp, "cpu_isa", lambda: "avx2")
    assert winograd._gemm_kernel() is False


def test_one_kernel_choice(monkeypatch):
    """SCNET_FUSED_WINOGRAD_FUSED: auto follows the products' choice (the one-kernel convolution runs the
    product kernel), 0 and 1 force it; anything else is refused."""
    for value, gemm_kernel, want in (("auto", True, True), ("auto", False, False), ("0", True, False), ("1", False, True)):
        monkeypatch.setattr(winograd, "_fused_setting", None)
        monkeypatch.setattr(winograd, "_gemm_kernel_choice", gemm_kernel)
        monkeypatch.setenv(winograd._FUSED_ENV, value)
        assert winograd._fused() is want
    monkeypatch.setattr(winograd, "_fused_setting", None)
    monkeypatch.setenv(winograd._FUSED_ENV, "yes")
    with pytest.raises(ValueError, match="auto, 0 or 1"):
        winograd._fused()


@pytest.fixture
def bmm_by_auto(monkeypatch):
    """The products as torch.bmm by the "auto" choice (an AVX-512 build on an Intel CPU), the one-kernel
    convolution left to "auto"."""
    monkeypatch.setattr(winograd, "_fused_setting", "auto")
    monkeypatch.setattr(winograd, "_gemm_kernel_choice", False)
    monkeypatch.setattr(winograd, "_bmm_by_auto", True)


def test_one_kernel_choice_per_convolution_where_auto_chose_bmm(bmm_by_auto, monkeypatch):
    """With torch.bmm chosen by "auto", the one-kernel convolution runs where the products are small: at most
    64 channels (the smaller side); where the filters' transform is made in the call, also at most 32
    tiles or at most 16384 channel-tiles; never without a convolution's sizes, and never where torch.bmm
    was asked for."""
    for kept in (False, True):
        assert winograd._fused(1568, 32, kept) and winograd._fused(392, 64, kept) and winograd._fused(4, 64, kept)
        assert not winograd._fused(392, 128, kept) and not winograd._fused(128, 256, kept)
    assert winograd._fused(32, 256) and winograd._fused(4, 512)
    assert not winograd._fused(32, 256, kept=True) and not winograd._fused(4, 65, kept=True)
    assert winograd._fused(128, 128) and winograd._fused(33, 65) and not winograd._fused(129, 128)
    assert not winograd._fused(128, 128, kept=True) and not winograd._fused(33, 65, kept=True)
    assert not winograd._fused()
    # a convolution's forward, input gradient and weight gradient decide alike (64 -> 256 channels)
    assert winograd._filters_inside(16, 256, 64) and winograd._filters_inside(16, 64, 256)
    assert winograd._wgrad_inside(16, 64, 256) and winograd._wgrad_inside(16, 256, 64)
    monkeypatch.setattr(winograd, "_bmm_by_auto", False)
    assert not winograd._fused(1568, 32)
    for value, want in (("auto", True), ("bmm", False), ("kernel", False)):
        monkeypatch.setattr(winograd, "_bmm_by_auto", None)
        monkeypatch.setenv(winograd._GEMM_ENV, value)
        monkeypatch.setattr(_cpp, "cpu_isa", lambda: "avx512")
        assert winograd._bmm_chosen_by_auto() is want
    monkeypatch.setattr(winograd, "_bmm_by_auto", None)
    monkeypatch.setattr(_cpp, "cpu_isa", lambda: "avx2")
    assert winograd._bmm_chosen_by_auto() is False


@pytest.mark.parametrize("shape, K", [((4, 72, 32, 32), 72), ((2, 72, 20, 20), 72), ((1, 72, 16, 16), 80),
                                      ((4, 16, 32, 32), 72), ((4, 72, 32, 32), 16)])
def test_conv_and_gradients_with_the_per_convolution_choice(bmm_by_auto, shape, K):
    """Each of the choice's cases against the direct convolution: 72 channels and 256 tiles (torch.bmm), 50
    tiles (one kernel: 3600 channel-tiles), 16 tiles (one kernel, the filters transformed inside), 16
    channels on either side (one kernel)."""
    torch.manual_seed(0)
    tiles = shape[0] * ((shape[2] + 3) // 4) * ((shape[3] + 3) // 4)
    ch = min(K, shape[1])
    assert winograd._fused(tiles, ch) == (tiles <= 32 or ch <= 64 or ch * tiles <= 16384)
    assert winograd._fused(tiles, ch) == (shape != (4, 72, 32, 32) or K != 72)
    x = torch.randn(*shape)
    _check_conv(x, torch.randn(K, shape[1], 3, 3) * 0.2, torch.randn(K))
    _check_conv(x.contiguous(memory_format=torch.channels_last), torch.randn(K, shape[1], 3, 3) * 0.2, None)


def test_selection_rule_where_auto_chose_bmm(bmm_by_auto, monkeypatch):
    """"auto" takes the one-kernel rule where the one-kernel convolution runs (32 channels at 56 px, 7 px
    maps), the three-pass rule elsewhere."""
    monkeypatch.setattr(winograd, "_auto_isa", lambda: True)
    args = ((1, 1), (1, 1), (1, 1), 1)

    def auto(shape, cached=False):
        return winograd.winograd_applies(torch.randn(*shape), torch.randn(shape[1], shape[1], 3, 3), *args,
                                         algorithm="auto", cached=cached)

    assert auto((8, 32, 56, 56)) and auto((8, 256, 7, 7)) and auto((8, 64, 28, 28)) and auto((8, 128, 28, 28))
    assert not auto((8, 16, 56, 56))  # below the one-kernel rule's 32 channels
    # 48 tiles of 128 channels: one kernel where the filters' transform is made in the call, three passes
    # where it is kept
    assert auto((3, 128, 14, 14)) and auto((3, 128, 14, 14), cached=True)
    assert winograd._fused(48, 128) and not winograd._fused(48, 128, kept=True)


def test_kept_filter_transforms_take_the_three_passes_where_auto_chose_bmm(bmm_by_auto, monkeypatch):
    """Where "auto" chose torch.bmm and the filters' transform is kept, more than 64 channels run the three
    passes from 4 tiles up with at least half of the tiles' outputs inside the map, on the kernels that
    read maps up to 32 px wide; the transform is kept even where it is large (no transform made inside);
    wider NCHW maps keep the three-pass rule of 64 tiles and enough work. With the product kernel (the
    AMD rule) a large transform is still made inside."""
    monkeypatch.setattr(winograd, "_auto_isa", lambda: True)
    args = ((1, 1), (1, 1), (1, 1), 1)

    def auto(shape, cached=True, k=None):
        w = torch.randn(k or shape[1], shape[1], 3, 3)
        return winograd.winograd_applies(torch.randn(*shape), w, *args, algorithm="auto", cached=cached)

    for shape in ((8, 256, 7, 7), (1, 128, 7, 7), (8, 128, 3, 3), (4, 256, 4, 4), (1, 512, 7, 7), (8, 96, 7, 7),
                  (2, 256, 14, 14)):
        assert auto(shape), shape
    assert auto((4, 128, 4, 4), k=256) and auto((4, 256, 4, 4), k=128)  # the smaller side counts
    assert not auto((1, 256, 4, 4))  # 1 tile
    assert not auto((2, 256, 4, 4))  # 2 tiles
    assert not auto((8, 256, 5, 5))  # 25 of 64 outputs inside the map
    assert not auto((1, 128, 36, 36))  # NCHW over 32 px: 81 tiles, under the three passes' work
    x, w = torch.randn(8, 256, 7, 7), torch.randn(256, 256, 3, 3)
    assert not winograd._made_inside(x, w) and winograd._filters_inside(32, 256, 256)
    # wide NCHW (81 tiles of 192 channels, a 5.3 MB transform): made inside as before
    assert winograd._made_inside(torch.randn(1, 192, 36, 36), torch.randn(192, 192, 3, 3))
    monkeypatch.setattr(winograd, "_gemm_kernel_choice", True)
    assert winograd._made_inside(x, w)


def test_weight_gradient_inside_where_auto_chose_bmm(bmm_by_auto, monkeypatch):
    """Where "auto" chose torch.bmm, the weight gradient's products kernel (dU in cache) runs where the
    transformed input is at most 8192 tiles x input channels or dU is over glibc's largest mmap threshold;
    elsewhere the separate form. With the product kernel (the AMD rule) or the one kernel forced, the
    channels-twice-the-tiles rule alone."""
    for tiles, k, c in ((16, 256, 256), (4, 256, 256), (32, 128, 128), (24, 128, 128), (8, 512, 512),
                        (16, 64, 256), (16, 256, 64), (32, 256, 128), (24, 256, 256), (32, 256, 256),
                        (32, 128, 256), (16, 448, 448)):
        assert winograd._wgrad_inside(tiles, k, c), (tiles, k, c)
    for tiles, k, c in ((40, 256, 256), (48, 256, 256), (128, 256, 256), (32, 448, 448), (64, 128, 256),
                        (24, 384, 384)):
        assert not winograd._wgrad_inside(tiles, k, c), (tiles, k, c)
    assert winograd._wgrad_inside(32, 512, 512) and winograd._wgrad_inside(16, 512, 483)  # dU 36 and 34 MiB
    assert not winograd._wgrad_inside(16, 16, 256)  # under twice the tiles
    for setting, kernel in (("auto", True), ("1", False)):
        monkeypatch.setattr(winograd, "_fused_setting", setting)
        monkeypatch.setattr(winograd, "_gemm_kernel_choice", kernel)
        assert winograd._wgrad_inside(32, 256, 256) and winograd._wgrad_inside(128, 256, 256)
        assert not winograd._wgrad_inside(129, 256, 256)


def test_weight_gradient_form_setting(bmm_by_auto, monkeypatch):
    """SCNET_FUSED_WINOGRAD_WGRAD: "inside" takes the products kernel wherever it is eligible (40 tiles x
    256 channels, where the rule keeps torch.bmm), "separate" never (also where the rule takes the
    kernel), "auto" the rule; an ineligible convolution stays separate; a bad value is a clear error.
    Both forms give the direct convolution's weight gradient."""
    import torch.nn.functional as F

    for value, want in (("inside", True), ("separate", False), ("auto", False)):
        monkeypatch.setenv("SCNET_FUSED_WINOGRAD_WGRAD", value)
        monkeypatch.setattr(winograd, "_wgrad_setting", None)
        assert winograd._wgrad_inside(40, 256, 256) is want, value
    monkeypatch.setattr(winograd, "_wgrad_setting", "separate")
    assert not winograd._wgrad_inside(16, 256, 256)
    monkeypatch.setattr(winograd, "_wgrad_setting", "inside")
    assert not winograd._wgrad_inside(16, 16, 256)  # channels under twice the tiles: not eligible
    monkeypatch.setenv("SCNET_FUSED_WINOGRAD_WGRAD", "bogus")
    monkeypatch.setattr(winograd, "_wgrad_setting", None)
    with pytest.raises(ValueError, match="SCNET_FUSED_WINOGRAD_WGRAD='bogus'"):
        winograd._wgrad_inside(32, 256, 256)
    torch.manual_seed(0)
    x, w = torch.randn(2, 64, 7, 7, requires_grad=True), torch.randn(64, 64, 3, 3, requires_grad=True)
    dy = torch.randn(2, 64, 7, 7)
    want = torch.autograd.grad(F.conv2d(x, w, padding=1), w, dy)[0]
    for value in ("inside", "separate"):
        monkeypatch.setattr(winograd, "_wgrad_setting", value)
        got = torch.autograd.grad(winograd.conv3x3_winograd(x, w), w, dy)[0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("n, inside", [(4, False), (2, True)])
def test_weight_gradient_form_in_place_where_auto_chose_bmm(bmm_by_auto, n, inside):
    """A 136 -> 136 channel convolution of 14x14 maps: at 4 images (64 tiles x 136 channels) the weight
    gradient in its separate form through torch.bmm, at 2 images (32 tiles) the products kernel; both
    against float64."""
    torch.manual_seed(5)
    x = torch.randn(n, 136, 14, 14)
    assert winograd._wgrad_inside(n * 16, 136, 136) is inside
    with _OpLog() as log, algorithm("auto"):
        _check_conv(x, torch.randn(136, 136, 3, 3) * 0.1, None)
    assert ("_wino_wgrad" in log.names) is inside
    assert ("bmm" in log.names) is not inside


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_conv_and_gradients_match_the_direct_convolution(shape, bias, gemm):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w = torch.randn(7, shape[1], 3, 3) * 0.3
    _check_conv(x, w, torch.randn(7) if bias else None)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("width, kernels", [(winograd._NHWC_ROUTE_MAX_W, "_nhwc"),
                                            (winograd._NHWC_ROUTE_MAX_W + 1, "")])
def test_narrow_nchw_maps_run_the_channels_last_kernels(width, kernels, gemm):
    """An NCHW map up to _NHWC_ROUTE_MAX_W wide runs the channels_last transforms (forward and both
    gradients) on a channels_last copy; a wider one the NCHW transforms. Either way the output and
    the input gradient come back NCHW and match the direct convolution."""
    torch.manual_seed(3)
    x = torch.randn(2, 5, 6, width, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, requires_grad=True)
    with _OpLog() as log:
        y = scnet_fused.ops.conv3x3_winograd(x, w)
        y.backward(torch.randn_like(y))
    wino = {n for n in log.names if n.startswith(("_wino_input", "_wino_output", "_wino_conv", "_wino_wgrad"))}
    if gemm == "fused":  # the forward and the input gradient in one kernel each, the weight gradient in passes
        assert log.names.count("_wino_conv") == 2  # (on the channels_last kernels at every width)
        assert wino == {"_wino_conv", "_wino_input_nhwc", "_wino_output_adjoint_nhwc"}
    elif gemm == "inside":  # those two from the filters themselves, the weight gradient's products and
        assert log.names.count("_wino_conv_w") == 2  # adjoint transform in one kernel
        assert wino == {"_wino_conv_w", "_wino_input_nhwc", "_wino_output_adjoint_nhwc", "_wino_wgrad"}
    else:
        assert wino == {"_wino_input" + kernels, "_wino_output" + kernels, "_wino_output_adjoint" + kernels}
    _check_conv(x, w, None)


def test_wide_layer_error_stays_small():
    torch.manual_seed(1)
    _check_conv(torch.randn(2, 256, 14, 14), torch.randn(64, 256, 3, 3) * 0.05, None, rel=1e-4)


def test_channels_last_and_non_contiguous_inputs():
    """channels_last runs its own kernels (output and gradients channels_last, as F.conv2d gives);
    other strides are read through an NCHW copy."""
    torch.manual_seed(2)
    x = torch.randn(2, 6, 11, 10)
    w = torch.randn(4, 6, 3, 3)
    want = F.conv2d(x, w, padding=1)
    cl = x.contiguous(memory_format=torch.channels_last)
    y = scnet_fused.ops.conv3x3_winograd(cl, w)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    xg = cl.detach().requires_grad_()
    scnet_fused.ops.conv3x3_winograd(xg, w.requires_grad_()).sum().backward()
    assert xg.grad.is_contiguous(memory_format=torch.channels_last)
    wide = torch.randn(2, 12, 11, 10)
    sliced = wide[:, ::2]
    torch.testing.assert_close(scnet_fused.ops.conv3x3_winograd(sliced, w), F.conv2d(sliced, w, padding=1),
                               rtol=1e-4, atol=1e-4)
    _check_conv(cl, w, None)


def test_empty_batch():
    x = torch.randn(0, 4, 9, 9, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, requires_grad=True)
    y = scnet_fused.ops.conv3x3_winograd(x, w)
    assert y.shape == (0, 5, 9, 9)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("make, err, match", [
    (lambda: (torch.randn(4, 9, 9), torch.randn(5, 4, 3, 3), None), ValueError, "dimensions"),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(5, 4, 5, 5), None), ValueError, "3, 3"),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(5, 3, 3, 3), None), ValueError, "channels"),
    (lambda: (torch.randn(1, 4, 9, 9).double(), torch.randn(5, 4, 3, 3).double(), None), TypeError, "float32"),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(5, 4, 3, 3).half(), None), TypeError, "float32"),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(5, 4, 3, 3), torch.randn(4)), ValueError, "bias"),
    (lambda: (torch.randn(1, 4, 0, 9), torch.randn(5, 4, 3, 3), None), ValueError, "empty"),
    (lambda: (torch.randn(1, 4, 9, 9, device="meta"), torch.randn(5, 4, 3, 3), None), ValueError, "CPU"),
])
def test_bad_arguments_are_refused(make, err, match):
    x, w, b = make()
    with pytest.raises(err, match=match):
        scnet_fused.ops.conv3x3_winograd(x, w, b)


def test_kernels_refuse_bad_tensors():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.scnet_fused._wino_input(torch.randn(1, 2, 8, 8).double(), 2, 2)
    with pytest.raises(RuntimeError, match="tiles"):
        torch.ops.scnet_fused._wino_input(torch.randn(1, 2, 8, 8), 3, 2)
    with pytest.raises(RuntimeError, match="tiles"):
        torch.ops.scnet_fused._wino_output(torch.randn(36, 2, 5), 1, 8, 8, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.scnet_fused._wino_output(torch.randn(36, 2, 4), 1, 8, 8, torch.randn(3))
    with pytest.raises(RuntimeError, match="tiles"):
        torch.ops.scnet_fused._wino_input_nhwc(torch.randn(1, 2, 8, 8), 2, 3)
    with pytest.raises(RuntimeError, match="tiles"):
        torch.ops.scnet_fused._wino_output_nhwc(torch.randn(36, 5, 2), 1, 8, 8, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.scnet_fused._wino_output_adjoint_nhwc(torch.randn(1, 2, 8, 8).half(), 2, 2)
    with pytest.raises(RuntimeError, match="3, 3"):
        torch.ops.scnet_fused._wino_filter(torch.randn(4, 2, 5, 5))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.scnet_fused._wino_filter(torch.randn(4, 2, 3, 3).double(), True)
    with pytest.raises(RuntimeError, match="36"):
        torch.ops.scnet_fused._wino_filter_adjoint(torch.randn(35, 2, 4))


def test_set_conv_algorithm_validates_and_returns_the_previous_choice():
    with algorithm("direct"):
        assert scnet_fused.get_conv_algorithm() == "direct"
        assert scnet_fused.set_conv_algorithm("winograd") == "direct"
    with pytest.raises(ValueError, match="expected one of"):
        scnet_fused.set_conv_algorithm("fft")


def test_set_filter_cache_takes_only_a_bool():
    """A string such as "false" is an error, not a truthy value that turns the cache on."""
    before = winograd.set_filter_cache(True)
    try:
        for bad in ("false", "0", None, 2, 0.5, 1.0, 0.0, torch.tensor(1)):
            with pytest.raises(ValueError, match="expected True or False"):
                winograd.set_filter_cache(bad)
        assert winograd.set_filter_cache(0) is True and winograd.set_filter_cache(1) is False
        np = pytest.importorskip("numpy")
        assert winograd.set_filter_cache(np.bool_(False)) is True and winograd.set_filter_cache(np.int64(1)) is False
    finally:
        winograd.set_filter_cache(before)


def test_selection_rule(monkeypatch):
    """"auto" with the three-pass convolution (the products as torch.bmm or the kernel between passes)."""
    monkeypatch.setattr(winograd, "_fused_setting", "0")
    x = torch.randn(8, 64, 28, 28)
    w = torch.randn(64, 64, 3, 3)
    args = ((1, 1), (1, 1), (1, 1), 1)
    expected_auto = _cpp.cpu_isa() == "avx512"
    assert winograd.winograd_applies(x, w, *args, algorithm="auto") == expected_auto
    assert winograd.winograd_applies(x, w, *args, algorithm="winograd")
    assert not winograd.winograd_applies(x, w, *args, algorithm="direct")
    # too few tiles (8x7x7: 32) or channels for "auto", still possible when asked for
    small = torch.randn(8, 256, 7, 7)
    assert not winograd.winograd_applies(small, torch.randn(256, 256, 3, 3), *args, algorithm="auto")
    assert winograd.winograd_applies(small, torch.randn(256, 256, 3, 3), *args, algorithm="winograd")
    narrow = torch.randn(8, 32, 56, 56)
    assert not winograd.winograd_applies(narrow, torch.randn(32, 32, 3, 3), *args, algorithm="auto")
    assert not winograd.winograd_applies(torch.randn(8, 64, 56, 56), torch.randn(32, 64, 3, 3), *args,
                                         algorithm="auto")  # 32 output channels
    # never: another stride, padding, dilation, groups, dtype, layout, kernel size, or autocast
    for xs, ws, a in [(x, w, ((2, 2), (1, 1), (1, 1), 1)), (x, w, ((1, 1), (2, 2), (2, 2), 1)),
                      (x, w, ((1, 1), (0, 0), (1, 1), 1)), (x, torch.randn(64, 32, 3, 3), ((1, 1), (1, 1), (1, 1), 2)),
                      (x.double(), w.double(), args), (x[:, :, ::2], w, args), (x, torch.randn(64, 64, 1, 1), args)]:
        assert not winograd.winograd_applies(xs, ws, *a, algorithm="winograd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.winograd_applies(x, w, *args, algorithm="winograd")
    # channels_last has kernels of its own and a rule of its own (fewer tiles x channels suffice); NCHW maps
    # narrow enough to run those kernels take that rule too
    cl = torch.channels_last
    mid = torch.randn(8, 64, 14, 14)
    assert winograd.winograd_applies(mid, w, *args, algorithm="auto") == expected_auto
    assert winograd.winograd_applies(mid.contiguous(memory_format=cl), w, *args, algorithm="auto") == expected_auto
    wide = torch.randn(2, 64, 40, 40)  # 200 tiles x 64 channels: under the NCHW threshold, over channels_last's
    assert not winograd.winograd_applies(wide, w, *args, algorithm="auto")
    assert winograd.winograd_applies(wide.contiguous(memory_format=cl), w, *args, algorithm="auto") == expected_auto
    narrow14 = torch.randn(8, 32, 14, 14).contiguous(memory_format=cl)
    assert not winograd.winograd_applies(narrow14, torch.randn(32, 32, 3, 3), *args, algorithm="auto")
    assert not winograd.winograd_applies(small.contiguous(memory_format=cl), torch.randn(256, 256, 3, 3), *args,
                                         algorithm="auto")


def test_selection_rule_with_the_one_kernel_convolution(monkeypatch):
    """"auto" with the one-kernel convolution: 32 channels, 64 tiles (16 where the filters' transform is kept
    between calls, 8 where it is made inside the convolution), half of the tiles' outputs inside the map."""
    monkeypatch.setattr(winograd, "_fused_setting", "1")
    monkeypatch.setattr(winograd, "_auto_isa", lambda: True)
    args = ((1, 1), (1, 1), (1, 1), 1)

    def auto(shape, K=None, cached=False, cl=False):
        x = torch.randn(*shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return winograd.winograd_applies(x, torch.randn(K or shape[1], shape[1], 3, 3), *args, algorithm="auto",
                                         cached=cached)

    assert auto((8, 32, 56, 56)) and auto((8, 32, 14, 14)) and auto((8, 64, 14, 14), cl=True)
    assert not auto((8, 16, 56, 56)) and not auto((8, 64, 56, 56), K=16)  # too few channels
    # 16 to 63 tiles: with the transform kept, or with at least as many outputs as tiles (the filters
    # transformed inside the convolution)
    assert auto((8, 256, 7, 7)) and auto((8, 32, 7, 7))  # 32 tiles
    assert not auto((12, 32, 7, 7)) and auto((12, 32, 7, 7), cached=True) and auto((12, 64, 7, 7))  # 48 tiles
    assert auto((1, 256, 14, 14)) and auto((1, 32, 14, 14))  # 16 tiles
    # 8 tiles: with the filters transformed inside (at least 8 outputs); not 4
    assert auto((8, 256, 4, 4)) and auto((8, 128, 3, 3)) and not auto((4, 256, 4, 4), cached=True)
    assert not auto((16, 32, 2, 2), cached=True)  # 16 tiles, 32 outputs, 25% of their outputs inside the map
    assert not auto((16, 64, 5, 5), cached=True)  # 64 tiles, 39% of their outputs inside the map
    assert auto((16, 64, 6, 6), cached=True)  # 56%
    monkeypatch.setattr(winograd, "_auto_isa", lambda: False)
    assert not auto((8, 64, 56, 56))


def _spy(monkeypatch):
    calls = []
    real = winograd._forward

    def counting(x, weight, bias, flip=False, u=None):
        calls.append(tuple(x.shape))
        return real(x, weight, bias, flip, u)

    monkeypatch.setattr(winograd, "_forward", counting)
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_scconv_through_winograd_matches_the_reference(monkeypatch, mode, channels_last):
    """The fused SCConv with its 3x3 convolutions as Winograd against the float64 reference: output,
    every gradient, running statistics after two steps."""
    torch.manual_seed(3)
    ref = reference.SCConv(16, 16, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    fused = scnet_fused.SCConv(16, 16, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d)
    fused.load_state_dict(ref.state_dict())
    ref64 = ref.double()
    getattr(fused, mode)()
    getattr(ref64, mode)()
    calls = _spy(monkeypatch)
    with algorithm("winograd"):
        for step in range(2):
            x = torch.randn(2, 16, 18, 13)
            if channels_last:
                fused = fused.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            xf, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
            out, out64 = fused(xf), ref64(x64)
            g = torch.randn_like(out)
            out.backward(g)
            out64.backward(g.double())
            scale = out64.abs().max().item()
            assert (out.double() - out64).abs().max().item() <= 2e-4 * scale
            assert (xf.grad.double() - x64.grad).abs().max().item() <= 5e-4 * x64.grad.abs().max().item()
    assert calls, "no convolution ran as Winograd"
    for (name, p), p64 in zip(fused.named_parameters(), ref64.parameters()):
        assert (p.grad.double() - p64.grad).abs().max().item() <= 5e-4 * p64.grad.abs().max().item(), name
    for (name, b), b64 in zip(fused.named_buffers(), ref64.buffers()):
        torch.testing.assert_close(b.to(b64.dtype), b64, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bottleneck_and_direct_choice(monkeypatch):
    """The bottleneck's 3x3 convolutions (k1, the SCConv's) run as Winograd when asked and never
    under "direct"; the outputs agree with the reference either way."""
    torch.manual_seed(4)
    ref = reference.SCBottleneck(64, 16).eval()
    fused = scnet_fused.SCBottleneck(64, 16).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 64, 12, 12)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        with algorithm("direct"):
            direct = fused(x)
        assert calls == []
        with algorithm("winograd"):
            wino = fused(x)
        want = ref.double()(x.double())
    assert len(calls) >= 3  # k1, k3, k4 (k2 too: its pooled map is 3x3)
    torch.testing.assert_close(direct.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wino.double(), want, rtol=1e-3, atol=1e-3)


def test_bottleneck_training_through_winograd(monkeypatch):
    """A training step of the fused bottleneck with every 3x3 convolution as Winograd against the
    float64 reference: output, input and parameter gradients, running statistics."""
    torch.manual_seed(6)
    ref = reference.SCBottleneck(64, 16).double()
    fused = scnet_fused.SCBottleneck(64, 16)
    fused.load_state_dict(ref.state_dict())
    calls = _spy(monkeypatch)
    x = torch.randn(2, 64, 12, 12)
    xf, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    with algorithm("winograd"):
        out = fused(xf)
        g = torch.randn_like(out)
        out.backward(g)
    out64 = ref(x64)
    out64.backward(g.double())
    assert len(calls) >= 3
    assert (out.double() - out64).abs().max().item() <= 2e-4 * out64.abs().max().item()
    pairs = [("x", xf.grad, x64.grad)] + [(n, p.grad, q.grad) for (n, p), q in
                                          zip(fused.named_parameters(), ref.parameters())]
    for name, got, want in pairs:
        assert (got.double() - want).abs().max().item() <= 1e-3 * want.abs().max().item(), name
    for (name, b), b64 in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b.to(b64.dtype), b64, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_small_scnet_sgd_losses_through_winograd(channels_last):
    """Four SGD steps of a small SCNet with its 3x3 convolutions as Winograd: the losses follow a float64
    run of the reference within 3x the float32 reference's drift plus 1e-3 (Winograd's rounding moves
    them by up to ~5e-4 here; the direct convolutions' by ~2e-4). Required on two of three inputs (the
    input and two copies with 1e-5 relative noise), as in test_modules.py: a ReLU input within rounding
    of 0 can take the other side of its kink in either float32 run."""
    from test_modules import _sgd_history
    from _util import kink_perturbed

    torch.manual_seed(0)
    x = torch.randn(4, 3, 128, 128)
    y = torch.tensor([0, 1, 2, 3])
    verdicts = []
    with algorithm("winograd"):
        for inp in kink_perturbed(x):
            history, _, _ = _sgd_history(inp, y, steps=4, channels_last=channels_last)
            assert history[-1][1] < 0.5 * history[0][1], history
            verdicts.append(all(abs(lf - lt) <= 3 * abs(lr - lt) + 1e-3 * max(1.0, lt) for lr, lf, lt in history))
            if sum(verdicts) >= 2:  # two of three: the third input cannot change the verdict
                break
    assert sum(verdicts) >= 2, verdicts


def test_not_under_export_or_trace_and_twice_differentiable(monkeypatch):
    """torch.export and torch.jit.trace record the direct convolutions (the transforms have no fake
    forms and a trace must run without this package); a second derivative through a Winograd
    convolution is the direct convolution's (its backward under create_graph is ATen's)."""
    torch.manual_seed(7)
    m = scnet_fused.SCConv(16, 16, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d).eval()
    x = torch.randn(2, 16, 12, 12)
    calls = _spy(monkeypatch)
    with algorithm("winograd"):
        ep = torch.export.export(m, (x,))
        assert calls == []
        traced = torch.jit.trace(m, x, check_trace=False)  # (the check would rerun m in eager mode)
        assert calls == []
        with torch.no_grad():
            want = m(x)
        assert calls
        torch.testing.assert_close(ep.module()(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(traced(x), want, rtol=1e-4, atol=1e-4)
        xg = torch.randn(2, 16, 12, 12, requires_grad=True)
        w = torch.randn(8, 16, 3, 3, requires_grad=True)
        grads = []
        for conv in (scnet_fused.ops.conv3x3_winograd, lambda a, b: F.conv2d(a, b, padding=1)):
            calls.clear()
            (gx,) = torch.autograd.grad(conv(xg, w).square().sum(), xg, create_graph=True)
            grads.append((gx,) + torch.autograd.grad(gx.square().sum(), (xg, w)))
            if len(grads) == 1:
                assert calls  # the forward was Winograd
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item())


def _filter_transforms(fn):
    """fn()'s result and how many filter transforms it made (by _wino_filter, or inside _wino_conv_w)."""
    with _OpLog() as log:
        out = fn()
    return out, log.names.count("_wino_filter") + log.names.count("_wino_conv_w")


def _eval_scconv(C=16):
    torch.manual_seed(8)
    m = scnet_fused.SCConv(C, C, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d)
    for bn in (m.k2[2], m.k3[1], m.k4[1]):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.running_var.data.uniform_(0.5, 2.0)
    return m.eval()


def test_inference_keeps_the_filter_transforms_until_a_source_changes(gemm):
    """At inference the filters' transforms of k3 and of k4 (with its BatchNorm folded in) are made once
    and reused; any change to what they were made from (an in-place edit of the filters or of the
    BatchNorm's statistics, also through .data, load_state_dict of other values, a new tensor assigned,
    eps) remakes them, and the output always matches the reference of the current parameters."""
    m = _eval_scconv()
    ref = reference.SCConv(16, 16, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d).double().eval()
    x = torch.randn(4, 16, 24, 24)  # large enough for k4's BatchNorm to be folded into its filters

    def check(expect_made):
        ref.load_state_dict(m.state_dict())
        ref.k4[1].eps = m.k4[1].eps
        with torch.no_grad(), algorithm("winograd"):
            y, made = _filter_transforms(lambda: m(x))
            want = ref(x.double())
        assert made == expect_made
        assert (y.double() - want).abs().max().item() <= 5e-5 * want.abs().max().item()

    winograd.set_filter_cache(True)
    check(3)  # k2 (on the pooled map), k3 and the folded k4
    check(0)
    with torch.no_grad():
        m.k3[0].weight.mul_(1.5)
    check(1)
    with torch.no_grad():
        m.k4[1].running_var.mul_(2.0)
    check(1)
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    check(0)  # the same values: the same transforms
    m.load_state_dict({k: v * 0.75 if v.is_floating_point() else v for k, v in m.state_dict().items()})
    check(3)
    m.k4[0].weight.data = m.k4[0].weight.data * 0.5
    check(1)
    # edits through .data leave the parameters' version counters as they were (EMA updates do this)
    m.k3[0].weight.data.mul_(0.5)
    check(1)
    m.k4[1].running_mean.data.add_(0.25)
    check(1)
    m.k2[1].weight.data[0, 0, 0, 0] += 1.0  # one element of k2's filters
    check(1)
    m.k4[1].eps = 1e-3
    check(1)
    check(0)
    assert winograd.set_filter_cache(False) is True
    try:
        check(3)
        check(3)
    finally:
        winograd.set_filter_cache(True)


def test_bits_digest_sees_every_bit_and_not_the_thread_count():
    """The cache's digest: equal for equal bytes (also of a clone in another process-wide thread count),
    different after a change of any single bit, dtype or shape; channels_last and non-dense tensors."""
    digest = torch.ops.scnet_fused._bits_digest
    torch.manual_seed(0)
    w = torch.randn(300, 70, 3, 3)  # 756000 bytes: three 256 KiB chunks and a partial one
    d = digest(w)
    assert digest(w.clone()) == d
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert digest(w) == d
    finally:
        torch.set_num_threads(threads)
    flat = w.view(-1).view(torch.int32)
    for index in (0, 1, 7, 8, 15, 16, 65535, 65536, flat.numel() - 1):
        for bit in (0, 17, 31):
            v = flat.clone()
            v[index] ^= 1 << bit
            assert digest(v.view(torch.float32).view_as(w)) != d, (index, bit)
    assert digest(w.view(torch.int32)) != d  # same bytes, another dtype
    assert digest(w.view(70, 300, 3, 3)) != d  # same bytes, another shape
    tail = torch.arange(13, dtype=torch.uint8)  # bytes not a multiple of 8
    t2 = tail.clone()
    t2[12] = 99
    assert digest(tail) != digest(t2) and digest(tail) == digest(tail.clone())
    cl = w.contiguous(memory_format=torch.channels_last)
    assert digest(cl) == digest(cl.clone())
    strided = w[:, ::2]
    assert digest(strided) == digest(strided.contiguous())
    assert digest(torch.empty(0, 3)) == digest(torch.empty(0, 3)) != digest(torch.empty(3, 0))


def test_filter_cache_leaves_training_and_inference_mode_alone(gemm):
    """With autograd on (training) nothing is kept; under torch.inference_mode the cache works and what it
    made serves later no-grad calls too; the cache holds no module alive."""
    import gc

    m = _eval_scconv()
    x = torch.randn(4, 16, 24, 24)
    with algorithm("winograd"):
        _, made = _filter_transforms(lambda: m(x))
        assert made == 3 and m.k3[0] not in winograd._filter_cache
        with torch.inference_mode():
            y1, made = _filter_transforms(lambda: m(x))
        assert made == 3
        with torch.no_grad():
            y2, made = _filter_transforms(lambda: m(x))
        assert made == 0
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    keys = len(winograd._filter_cache)
    assert keys >= 3
    del m
    gc.collect()
    assert len(winograd._filter_cache) == keys - 3


def test_large_filter_transforms_made_inside_are_not_kept(monkeypatch, gemm):
    """Where the convolution transforms the filters inside itself and the transform would exceed
    _CACHE_MAX_BYTES, inference keeps nothing: every call makes the transforms again, and the output
    still matches the reference."""
    monkeypatch.setattr(winograd, "_CACHE_MAX_BYTES", 36 * 16 * 16 * 4 - 1)  # just below k3's and k4's
    m = _eval_scconv()
    ref = reference.SCConv(16, 16, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d).double().eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 16, 24, 24)  # 36 tiles; k2's pooled map 4
    winograd._filter_cache.clear()
    with torch.no_grad(), algorithm("winograd"):
        for _ in range(2):
            y, made = _filter_transforms(lambda: m(x))
            want = ref(x.double())
            assert (y.double() - want).abs().max().item() <= 5e-5 * want.abs().max().item()
            convs = (m.k2[1], m.k3[0], m.k4[0])
            if gemm == "inside":  # k2 (on the 6x6 pooled map), k3 and k4 made inside on every call
                assert made == 3 and not any(c in winograd._filter_cache for c in convs)
            else:
                assert all(c in winograd._filter_cache for c in convs)


def test_scconv_with_the_per_convolution_choice(bmm_by_auto, monkeypatch):
    """Where "auto" chose torch.bmm, a 72-channel SCConv at 4x16x16 (64 tiles: one kernel in training, three
    passes once the filters' transform is kept at inference): the training
    step's output and gradients, and two eval forwards (the second from the kept transforms), against the
    float64 reference."""
    monkeypatch.setattr(winograd, "_auto_isa", lambda: True)
    with algorithm("auto"):
        torch.manual_seed(0)
        ref = reference.SCConv(72, 72, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d)
        m = scnet_fused.SCConv(72, 72, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d)
        m.load_state_dict(ref.state_dict())
        ref = ref.double()
        x = torch.randn(4, 72, 16, 16)
        assert winograd.winograd_applies(x, m.k3[0].weight, (1, 1), (1, 1), (1, 1), 1)
        assert winograd._fused(64, 72) and not winograd._fused(64, 72, kept=True)
        xg, xr = x.clone().requires_grad_(), x.double().requires_grad_()
        y, want = m(xg), ref(xr)
        g = torch.randn_like(y)
        y.backward(g)
        want.backward(g.double())
        assert (y.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()
        assert (xg.grad.double() - xr.grad).abs().max().item() <= 1e-4 * xr.grad.abs().max().item()
        for (name, p), pr in zip(m.named_parameters(), ref.parameters()):
            assert (p.grad.double() - pr.grad).abs().max().item() <= 1e-4 * pr.grad.abs().max().item() + 1e-6, name
        m.eval()
        ref.eval()
        with torch.no_grad():
            want = ref(x.double())
            for _ in range(2):
                y = m(x)
                assert (y.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()
        assert m.k3[0] in winograd._filter_cache  # kept: the three passes took it


def test_scconv_inference_keeps_large_transforms_for_the_three_passes(bmm_by_auto, monkeypatch):
    """Where "auto" chose torch.bmm, a 72-channel SCConv's eval forward at 2x72x7x7 (8 tiles) with the
    transforms counted as large (over _CACHE_MAX_BYTES): k3 and k4 keep their transforms and run the three
    passes through torch.bmm (no transform made inside, none made again), against the float64 reference."""
    monkeypatch.setattr(winograd, "_auto_isa", lambda: True)
    monkeypatch.setattr(winograd, "_CACHE_MAX_BYTES", 36 * 72 * 72 * 4 - 1)
    m = _eval_scconv(72)
    ref = reference.SCConv(72, 72, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d).double().eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 72, 7, 7)
    assert not winograd._made_inside(x, m.k3[0].weight) and winograd._filters_inside(8, 72, 72)
    winograd._filter_cache.clear()
    want = ref(x.double())
    with torch.no_grad(), algorithm("auto"):
        for call in range(2):
            with _OpLog() as log:
                y = m(x)
            assert (y.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()
            assert "_wino_conv_w" not in log.names and "_wino_conv" not in log.names
            assert log.names.count("_wino_input_nhwc") == 2 and log.names.count("_wino_output_nhwc") == 2
            assert log.names.count("_wino_filter") == (2 if call == 0 else 0)
    assert m.k3[0] in winograd._filter_cache and m.k4[0] in winograd._filter_cache


def test_missing_kernels_are_a_clear_error(monkeypatch):
    """conv3x3_winograd without the compiled transforms: a RuntimeError that says so, before any kernel."""
    monkeypatch.setattr(winograd, "_kernels_present", lambda: False)
    with pytest.raises(RuntimeError, match="compiled CPU kernels are not loaded"):
        scnet_fused.ops.conv3x3_winograd(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))


# ----------------------------------------------------------------------------------------------
# Under torch.compile: the convolutions as one custom op of the graph (scnet_fused::conv3x3)
# ----------------------------------------------------------------------------------------------


def _recording_backend(targets):
    """aot_eager, recording the call targets of the graphs dynamo hands over and of their subgraphs
    (an autograd.Function's forward and backward), an op by its packet."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        for sub in gm.modules():
            if isinstance(sub, torch.fx.GraphModule):
                targets.extend(getattr(n.target, "overloadpacket", n.target) for n in sub.graph.nodes
                               if n.op == "call_function")
        return aot_eager(gm, example_inputs)

    return backend


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_compiled_scconv_runs_its_convolutions_as_the_graph_op(monkeypatch, mode, channels_last):
    """A fused SCConv under torch.compile (fullgraph) with the Winograd algorithm: its 3x3 convolutions
    are scnet_fused::conv3x3 nodes of the one graph, their bodies run Winograd, and output, input and
    parameter gradients and running statistics agree with the eager module's (which runs the same
    convolutions)."""
    torch.manual_seed(9)
    eager = scnet_fused.SCConv(16, 16, 1, 1, 1, 1, 4, torch.nn.BatchNorm2d)
    for bn in (eager.k2[2], eager.k3[1], eager.k4[1]):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        bn.running_var.data.uniform_(0.5, 2.0)
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
    eager.train(mode == "train")
    compiled_mod = copy.deepcopy(eager)
    targets = []
    torch._dynamo.reset()
    compiled = torch.compile(compiled_mod, backend=_recording_backend(targets), fullgraph=True)
    x = torch.randn(2, 16, 18, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = _spy(monkeypatch)
    with algorithm("winograd"), torch.set_grad_enabled(mode != "no_grad"):
        xe, xc = x.clone().requires_grad_(mode != "no_grad"), x.clone().requires_grad_(mode != "no_grad")
        out_e = eager(xe)
        calls.clear()
        out_c = compiled(xc)
        assert len(calls) == 3, f"the graph ops' bodies ran Winograd for {calls}, not for k2, k3 and k4"
        assert out_c.stride() == out_e.stride()
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
        if mode != "no_grad":
            g = torch.randn_like(out_e)
            out_e.backward(g)
            calls.clear()
            out_c.backward(g)
            # the input gradients of k2, k3 and k4 (Winograd with the flipped filters)
            assert len(calls) == 3, f"the backward ran Winograd for {calls}"
            torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-4 * xe.grad.abs().max().item())
            assert xc.grad.stride() == xe.grad.stride()
            for (name, p), q in zip(compiled_mod.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * q.grad.abs().max().item(),
                                           msg=lambda m: f"{name}: {m}")
    for (name, b), b_e in zip(compiled_mod.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, b_e, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # k2 and k3; k4 too without autograd, and with it scnet_fused::conv_of_gate (k4 over the recomputed
    # gate), whose body runs scnet_fused::conv3x3 (the Winograd runs counted above)
    if mode == "no_grad":
        assert targets.count(torch.ops.scnet_fused.conv3x3) == 3, targets
    else:
        assert targets.count(torch.ops.scnet_fused.conv3x3) == 2, targets
        assert targets.count(torch.ops.scnet_fused.conv_of_gate) == 1, targets
    assert torch.nn.functional.conv2d not in targets and torch.conv2d not in targets, targets


def test_graph_op_takes_the_eager_decision_on_the_real_sizes(monkeypatch):
    """Under "auto" the size rule runs in the graph op's body: one graph (dynamic shapes) serves maps
    on both sides of it, Winograd where eager takes it and F.conv2d where not, each with eager's
    results; without the AVX-512 build "auto" leaves the convolution to the graph as F.conv2d."""
    torch.manual_seed(10)
    w = torch.randn(64, 64, 3, 3, requires_grad=True)
    targets = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    f = torch.compile(lambda a, b: scnet_fused.ops.winograd.conv2d(a, b, None, 1, 1, 1, 1),
                      backend=_recording_backend(targets), fullgraph=True, dynamic=True)
    calls = _spy(monkeypatch)
    with algorithm("auto"):
        for shape in ((2, 64, 6, 7), (8, 64, 30, 29), (3, 64, 5, 9)):  # (a batch of 1 would specialize)
            x = torch.randn(shape, requires_grad=True)
            eager_takes = winograd.winograd_applies(x, w, (1, 1), (1, 1), (1, 1), 1)
            calls.clear()
            y = f(x, w)
            assert bool(calls) == eager_takes, (shape, eager_takes)
            with algorithm("direct"):
                want = F.conv2d(x, w, padding=1)
            tol = 1e-4 * want.abs().max().item() if eager_takes else 1e-5
            torch.testing.assert_close(y, want, rtol=1e-4, atol=tol)
            gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
            wx, ww = torch.autograd.grad(want.square().sum(), (x, w))
            torch.testing.assert_close(gx, wx, rtol=1e-3, atol=1e-4 * wx.abs().max().item())
            torch.testing.assert_close(gw, ww, rtol=1e-3, atol=1e-4 * ww.abs().max().item())
    if winograd._auto_isa():
        assert targets.count(torch.ops.scnet_fused.conv3x3) == 1, targets
    else:
        assert torch.ops.scnet_fused.conv3x3 not in targets, targets
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 8, 9, 11),
    lambda: torch.randn(2, 8, 9, 11).contiguous(memory_format=torch.channels_last),
    lambda: torch.randn(2, 16, 9, 11)[:, ::2],  # neither layout: NCHW out
    lambda: torch.randn(3, 8, 1, 1).contiguous(memory_format=torch.channels_last),  # both layouts at once
    lambda: torch.randn(0, 8, 5, 5),
], ids=["nchw", "channels_last", "strided", "1x1", "empty"])
@pytest.mark.parametrize("bias", [False, True])
def test_graph_op_under_inductor_keeps_the_layouts_it_declares(monkeypatch, make, bias):
    """Inductor checks every custom op's output strides against its fake form: the graph op and its
    backward return exactly the declared layouts (the input's format; contiguous filters' gradients)
    whichever convolution the body ran, with the direct convolution's results. Forward and backward
    take one decision: Winograd for a dense map under "winograd", never for the strided one."""
    torch.manual_seed(11)
    x = make().requires_grad_()
    dense = x.numel() > 0 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    calls = _spy(monkeypatch)
    w = torch.randn(6, 8, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True) if bias else None
    torch._dynamo.reset()
    f = torch.compile(lambda a, c, d: scnet_fused.ops.conv3x3_winograd(a, c, d), fullgraph=True)
    for name in ("winograd", "direct", "auto"):
        calls.clear()
        with algorithm(name):
            y = f(x, w, b)
            want = F.conv2d(x.detach().double(), w.detach().double(), None if b is None else b.detach().double(),
                            padding=1)
            torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
            ref = [t.detach().double().requires_grad_() for t in (x, w, b) if t is not None]
            want = torch.autograd.grad(F.conv2d(ref[0], ref[1], ref[2] if bias else None, padding=1), ref, g.double())
            for a, c in zip(got, want):
                scale = c.abs().max().item() if c.numel() else 1.0
                torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-4 * max(1.0, scale))
        if name == "winograd" and dense:  # the forward, the input gradient (and the weight gradient's
            assert len(calls) >= 2, calls  # products in their own kernels)
        elif name == "direct" or not dense:
            assert calls == [], (name, calls)


def test_graph_ops_opcheck_and_refuse_bad_arguments():
    """The graph ops pass torch.library.opcheck (schema, fake forms, autograd registration, AOT
    dispatch) and, called directly, refuse what conv3x3_winograd refuses."""
    torch.manual_seed(12)
    x = torch.randn(2, 5, 7, 9)
    w = torch.randn(4, 5, 3, 3)
    b = torch.randn(4)
    with algorithm("winograd"):
        torch.library.opcheck(torch.ops.scnet_fused.conv3x3.default, (x.requires_grad_(), w.requires_grad_(), b))
        torch.library.opcheck(torch.ops.scnet_fused.conv3x3.default, (x.contiguous(memory_format=torch.channels_last),
                                                                      w, None))
        g = torch.randn(2, 4, 7, 9)
        for need in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(torch.ops.scnet_fused.conv3x3_backward.default, (g, x.detach(), w.detach()) + need)
        with pytest.raises(ValueError, match="channels"):
            torch.ops.scnet_fused.conv3x3(torch.randn(1, 3, 6, 6), w, None)
        with pytest.raises(TypeError, match="float32"):
            torch.ops.scnet_fused.conv3x3(x.double(), w.double(), None)
        with pytest.raises(ValueError, match="3, 3"):
            torch.ops.scnet_fused.conv3x3(x, torch.randn(4, 5, 1, 1), None)
