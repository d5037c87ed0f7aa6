"""Parity of the Triton gate kernels with the pure-PyTorch reference.

On a machine without a GPU the kernels run under the Triton interpreter (conftest sets
TRITON_INTERPRET=1), on CPU tensors; with a GPU they run compiled, on CUDA tensors.
"""

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

import scnet_fused  # noqa: E402
from scnet_fused import reference as ref  # noqa: E402
from scnet_fused._index import max_run  # noqa: E402
from scnet_fused.triton import sc_gate as tg  # noqa: E402

from _util import interpreter_broken  # noqa: E402

if interpreter_broken():
    pytest.skip(interpreter_broken(), allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"

# (N, C, H, W, h, w): irregular maps (14 -> 3, 25 -> 6, 13 -> 3), pooling rates 4, 2 and h = 1,
# odd N, C not a multiple of 8.
SHAPES = [
    (3, 5, 5, 7, 1, 1),      # r = 4, h = w = 1
    (3, 12, 7, 7, 1, 1),     # SCNet-50 layer4, r = 4
    (1, 3, 13, 14, 3, 3),    # r = 4, both irregular
    (3, 5, 14, 14, 3, 3),    # SCNet-50 layer3 size, r = 4: runs 5, 5, 4
    (1, 12, 25, 13, 6, 3),   # r = 4: 25 -> 6
    (1, 3, 56, 56, 14, 14),  # SCNet-50 layer1 size, r = 4
    (3, 5, 14, 14, 7, 7),    # r = 2
    (1, 3, 25, 13, 12, 6),   # r = 2: 25 -> 12
    (3, 5, 13, 14, 1, 1),    # r = 13: h = w = 1, runs of 13 and 14
]
SHAPE_IDS = [f"{n}x{c}x{H}x{W}-{h}x{w}" for n, c, H, W, h, w in SHAPES]


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _inputs(shape, dtype=torch.float32, channels_last=False):
    N, C, H, W, h, w = shape
    x = torch.randn(N, C, H, W, device=DEVICE)
    k3 = torch.randn(N, C, H, W, device=DEVICE) * 1.5 + 0.3
    dy = torch.randn(N, C, H, W, device=DEVICE)
    small = torch.randn(N, C, h, w, device=DEVICE)
    x, k3, dy = (_layout(t.to(dtype), channels_last) for t in (x, k3, dy))
    return x, small.to(dtype), k3, dy


def _vecs(C):
    scale = torch.rand(C, device=DEVICE) + 0.5
    shift = torch.randn(C, device=DEVICE)
    center = torch.randn(C, device=DEVICE) * 0.5
    return scale, shift, center


def _fmt_ok(t, like):
    if like.is_contiguous():
        return t.is_contiguous()
    return t.is_contiguous(memory_format=torch.channels_last)


def _d(t):
    return None if t is None else t.double()


def _close_to_f64(out, exact, **kw):
    """fp32 output against the float64 reference rounded to fp32 (assert_close defaults unless given)."""
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact.to(out.dtype), **kw)


# ---------------------------------------------------------------------------------------------
# fp32: every primitive, both layouts, the irregular shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_primitives_fp32(shape, channels_last):
    x, small, k3, dy = _inputs(shape, channels_last=channels_last)
    C = shape[1]
    scale, shift, center = _vecs(C)

    # forward: plain gate, folded affine, scale only
    for sc, sh in ((None, None), (scale, shift), (scale, None)):
        y = tg.gate_forward(x, small, k3, sc, sh)
        assert y.dtype == x.dtype and _fmt_ok(y, x)
        _close_to_f64(y, ref.gate_forward(x.double(), small.double(), k3.double(), _d(sc), _d(sh)))

    # backward pass 1: the plain gate (dk3, no affine), BN-train pass 1 (affine + center, no dk3),
    # and a mixed one (scale only, center, dk3)
    for sc, sh, ce, need in ((None, None, None, True), (scale, shift, center, False), (scale, None, center, True)):
        out = tg.gate_backward(dy, x, small, k3, sc, sh, ce, need)
        exact = ref.gate_backward(dy.double(), x.double(), small.double(), k3.double(), _d(sc), _d(sh), _d(ce), need)
        dx, dsmall, dk3, sum_g, sum_gk = out
        assert _fmt_ok(dx, x) and dsmall.is_contiguous() and dsmall.shape == small.shape
        assert sum_g.dtype == torch.float32 and sum_gk.dtype == torch.float32 and sum_g.shape == (C,)
        assert (dk3 is None) == (not need)
        for got, want in zip(out, exact):
            if want is None:
                continue
            _close_to_f64(got, want)
        if need:
            assert _fmt_ok(dk3, k3)

    # backward pass 2
    p, q, r = torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE)
    dk3 = tg.gate_backward_k3(dy, x, small, k3, p, q, r)
    assert _fmt_ok(dk3, k3)
    _close_to_f64(dk3, ref.gate_backward_k3(dy.double(), x.double(), small.double(), k3.double(),
                                            p.double(), q.double(), r.double()))

    # statistics
    mean, var = tg.channel_stats(k3)
    emean, evar = ref.channel_stats(k3.double())
    _close_to_f64(mean, emean)
    _close_to_f64(var, evar)


@pytest.mark.parametrize("shape,channels_last", [((2, 160, 7, 7, 1, 1), True), ((2, 3, 6, 70, 1, 2), False)],
                         ids=["nhwc-C160", "nchw-run35"])
def test_long_runs_and_channel_blocks(shape, channels_last):
    """Cells longer than the run block (the kernels loop over chunks of the run), several channel blocks."""
    N, C, H, W, h, w = shape
    run = max_run(W, w)
    assert tg._gate_blocks(N * h, C, w, run, channels_last)[2] < run
    x, small, k3, dy = _inputs(shape, channels_last=channels_last)
    scale, shift, center = _vecs(C)
    _close_to_f64(tg.gate_forward(x, small, k3, scale, shift),
                  ref.gate_forward(x.double(), small.double(), k3.double(), _d(scale), _d(shift)))
    out = tg.gate_backward(dy, x, small, k3, scale, shift, center, True)
    exact = ref.gate_backward(dy.double(), x.double(), small.double(), k3.double(), _d(scale), _d(shift),
                              _d(center), True)
    for got, want in zip(out, exact):
        _close_to_f64(got, want)


@pytest.mark.parametrize("big", [False, True], ids=["int32", "int64"])
def test_uniform_runs_take_the_run_path_bit_for_bit(monkeypatch, big):
    """NCHW maps whose column runs are all one power-of-two length (56 -> 14 and 28 -> 7 in SCNet-50;
    12 -> 3 here) run the gate kernels with RUN set, their runs' lanes provably contiguous and aligned
    (vector accesses when compiled); the results are the table path's, bit for bit (on a GPU the
    reductions over a run to within rounding: the two paths' thread layouts add its lanes in other
    orders)."""
    assert tg.nchw_run(56, 14, 4, False) == 4 and tg.nchw_run(28, 7, 4, False) == 4
    assert tg.nchw_run(14, 3, 8, False) == 0 and tg.nchw_run(7, 1, 8, False) == 0
    assert tg.nchw_run(56, 14, 4, True) == 0 and tg.nchw_run(13, 3, 8, False) == 0
    if big:
        monkeypatch.setattr(tg, "INT32_LIMIT", 1)
    shape = (2, 3, 8, 12, 2, 3)
    x, small, k3, dy = _inputs(shape)
    scale, shift, center = _vecs(3)
    p, q, r = torch.randn(3, device=DEVICE), torch.randn(3, device=DEVICE), torch.randn(3, device=DEVICE)

    def run_all():
        outs = [tg.gate_forward(x, small, k3, scale, shift), tg.gate_forward(x, small, k3, None, None),
                tg.gate_backward_k3(dy, x, small, k3, p, q, r)]
        outs += tg.gate_backward(dy, x, small, k3, scale, shift, center, True)
        outs += tg.gate_backward(dy, x, small, k3, None, None, None, True)
        return [t for t in outs if t is not None]

    picked, real = [], tg.nchw_run
    monkeypatch.setattr(tg, "nchw_run", lambda *a: picked.append(real(*a)) or picked[-1])
    with_run = run_all()
    assert picked and set(picked) == {4}
    monkeypatch.setattr(tg, "nchw_run", lambda *a: 0)
    table = run_all()
    assert len(with_run) == len(table) >= 10
    for a, b in zip(with_run, table):
        if a.shape == x.shape or DEVICE == "cpu":
            assert torch.equal(a, b)
        else:  # compiled, a run's sums (dsmall, the per-channel sums) add in the two layouts' lane orders
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _close_to_f64(with_run[0], ref.gate_forward(x.double(), small.double(), k3.double(), _d(scale), _d(shift)))


def test_backward_deterministic():
    x, small, k3, dy = _inputs((3, 5, 14, 14, 3, 3), channels_last=True)
    scale, shift, center = _vecs(5)
    a = tg.gate_backward(dy, x, small, k3, scale, shift, center, True)
    b = tg.gate_backward(dy, x, small, k3, scale, shift, center, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_int64_offsets_path(monkeypatch):
    """The 64-bit index path (taken for tensors of 2**31 elements or more) on a small tensor."""
    monkeypatch.setattr(tg, "INT32_LIMIT", 1)
    for cl in (False, True):
        x, small, k3, dy = _inputs((3, 5, 14, 14, 3, 3), channels_last=cl)
        scale, shift, center = _vecs(5)
        _close_to_f64(tg.gate_forward(x, small, k3, scale, shift),
                      ref.gate_forward(x.double(), small.double(), k3.double(), _d(scale), _d(shift)))
        out = tg.gate_backward(dy, x, small, k3, scale, shift, center, True)
        exact = ref.gate_backward(dy.double(), x.double(), small.double(), k3.double(), _d(scale), _d(shift),
                                  _d(center), True)
        for got, want in zip(out, exact):
            _close_to_f64(got, want)
        mean, var = tg.channel_stats(k3)
        emean, evar = ref.channel_stats(k3.double())
        _close_to_f64(mean, emean)
        _close_to_f64(var, evar)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_channel_stats_large_mean(channels_last):
    """Mean 100, std 1: a naive fp32 sum / sum-of-squares would lose the variance."""
    t = _layout(torch.randn(5, 6, 25, 28, device=DEVICE) * torch.linspace(0.5, 2.0, 6, device=DEVICE).view(1, -1, 1, 1)
                + 100.0, channels_last)
    mean, var = tg.channel_stats(t)
    emean, evar = ref.channel_stats(t.double())
    torch.testing.assert_close(mean, emean.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(var, evar.float(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# fp16 / bf16: error against float64 at most 2x eager PyTorch's error in the same dtype, plus a small atol
# ---------------------------------------------------------------------------------------------

# atol, relative to the largest magnitude of the exact result. The interpreter stores bf16 by
# truncation (up to 1 ulp instead of half an ulp): the bf16 allowance covers that.
_REL_ATOL = {torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _eager_lowp(x, small, k3, dy, scale, shift, center):
    """The gate and its backward written as eager PyTorch ops in x's dtype."""
    dt = x.dtype
    sc = None if scale is None else scale.to(dt).view(1, -1, 1, 1)
    sh = None if shift is None else shift.to(dt).view(1, -1, 1, 1)
    aff = k3 if sc is None else k3 * sc
    aff = aff if sh is None else aff + sh
    s = torch.sigmoid(x + F.interpolate(small, size=x.shape[-2:], mode="nearest"))
    y = aff * s
    g = dy * s
    dz = dy * aff * s * (1 - s)
    dsmall = ref.upsample_adjoint(dz, small.shape[-2:])
    dk3 = g if sc is None else g * sc
    kc = k3 if center is None else k3 - center.to(dt).view(1, -1, 1, 1)
    return y, (dz, dsmall, dk3, g.sum(dim=(0, 2, 3)), (g * kc).sum(dim=(0, 2, 3)))


def _check_lowp(name, got, eager, exact):
    exact = exact.double()
    err = (got.double() - exact).abs().max().item()
    err_eager = (eager.double() - exact).abs().max().item()
    atol = _REL_ATOL[eager.dtype] * max(exact.abs().max().item(), 1e-3)
    if os.environ.get("SCNET_PRINT_ERR"):
        print(f"{name}: fused {err:.3g} eager {err_eager:.3g} atol {atol:.3g}")
    assert err <= 2 * err_eager + atol, f"{name}: fused error {err:.3g} > 2 * eager {err_eager:.3g} + {atol:.3g}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4]], ids=[SHAPE_IDS[3], SHAPE_IDS[4]])
def test_primitives_low_precision(shape, dtype, channels_last):
    x, small, k3, dy = _inputs(shape, dtype=dtype, channels_last=channels_last)
    C = shape[1]
    scale, shift, center = _vecs(C)
    x64, s64, k64, dy64 = (t.double() for t in (x, small, k3, dy))

    y = tg.gate_forward(x, small, k3, scale, shift)
    assert y.dtype == dtype and _fmt_ok(y, x)
    eager_y, eager_bwd = _eager_lowp(x, small, k3, dy, scale, shift, center)
    _check_lowp("y", y, eager_y, ref.gate_forward(x64, s64, k64, _d(scale), _d(shift)))

    out = tg.gate_backward(dy, x, small, k3, scale, shift, center, True)
    exact = ref.gate_backward(dy64, x64, s64, k64, _d(scale), _d(shift), _d(center), True)
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[2].dtype == dtype
    assert out[3].dtype == torch.float32 and out[4].dtype == torch.float32
    for name, got, eager, want in zip(("dx", "dsmall", "dk3", "sum_g", "sum_gk"), out, eager_bwd, exact):
        _check_lowp(name, got, eager, want)

    p, q, r = torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE), torch.randn(C, device=DEVICE)
    dk3 = tg.gate_backward_k3(dy, x, small, k3, p, q, r)
    g = dy * torch.sigmoid(x + F.interpolate(small, size=x.shape[-2:], mode="nearest"))
    eager_dk3 = g * p.to(dtype).view(1, -1, 1, 1) + k3 * q.to(dtype).view(1, -1, 1, 1) + r.to(dtype).view(1, -1, 1, 1)
    _check_lowp("dk3 (pass 2)", dk3, eager_dk3, ref.gate_backward_k3(dy64, x64, s64, k64, p.double(), q.double(),
                                                                      r.double()))

    mean, var = tg.channel_stats(k3)
    emean, evar = ref.channel_stats(k64)
    var_eager, mean_eager = torch.var_mean(k3, dim=(0, 2, 3), unbiased=False)
    _check_lowp("mean", mean, mean_eager, emean)
    _check_lowp("var", var, var_eager, evar)


# ---------------------------------------------------------------------------------------------
# Through the public ops, with the Triton backend forced, against reference autograd
# ---------------------------------------------------------------------------------------------


def _ref_gate(x, small, k3, scale=None, shift=None):
    a = k3
    if scale is not None:
        a = a * scale.view(1, -1, 1, 1)
    if shift is not None:
        a = a + shift.view(1, -1, 1, 1)
    return a * torch.sigmoid(x + F.interpolate(small, size=x.shape[-2:], mode="nearest"))


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def test_gate_without_affine_keeps_the_sign_of_zero():
    import test_cpu_kernels as K

    K.check_plain_gate_sign_of_zero(tg, DEVICE)


def test_gate_backward_without_sums():
    import test_cpu_kernels as K

    K.check_gate_backward_without_sums(tg, DEVICE, shapes=[(2, 4, 7, 9, 2, 3)])


@pytest.mark.parametrize("case", ["nchw", "nhwc", "sliced"])
def test_public_sc_gate_triton(case):
    N, C, H, W, h, w = 3, 5, 14, 13, 3, 3
    if case == "sliced":  # a non-contiguous view of a wider tensor
        x = torch.randn(N, C + 2, H, W + 3, device=DEVICE)[:, 1:C + 1, :, 3:]
        k3 = torch.randn(N, C, H, W + 1, device=DEVICE)[..., 1:]
    else:
        x = torch.randn(N, C, H, W, device=DEVICE)
        k3 = torch.randn(N, C, H, W, device=DEVICE)
        x, k3 = _layout(x, case == "nhwc"), _layout(k3, case == "nhwc")
    small = torch.randn(N, C, h, w, device=DEVICE)
    scale, shift, _ = _vecs(C)
    dy = torch.randn(N, C, H, W, device=DEVICE)
    for sc, sh in ((None, None), (scale, shift)):
        args = [_leaf(t) for t in (x, small, k3)] + [None if v is None else _leaf(v) for v in (sc, sh)]
        rargs = [None if t is None else _leaf(t) for t in args]
        with scnet_fused.backend("triton"):
            y = scnet_fused.sc_gate(*args)
        y_ref = _ref_gate(*rargs)
        torch.testing.assert_close(y, y_ref)
        if case == "nhwc":
            assert y.is_contiguous(memory_format=torch.channels_last)
        with scnet_fused.backend("triton"):
            y.backward(dy)
        y_ref.backward(dy)
        for a, b in zip(args, rargs):
            if a is not None:
                torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("case", ["nchw", "nhwc", "sliced"])
def test_public_sc_gate_bn_train_triton(case):
    N, C, H, W, h, w = 3, 6, 14, 14, 3, 3
    if case == "sliced":
        x = torch.randn(N, C, H + 2, W, device=DEVICE)[:, :, 1:-1]
        k3 = torch.randn(N, C, H, W, device=DEVICE).transpose(2, 3)
    else:
        x = _layout(torch.randn(N, C, H, W, device=DEVICE), case == "nhwc")
        k3 = _layout(torch.randn(N, C, H, W, device=DEVICE) * 2 + 1, case == "nhwc")
    small = torch.randn(N, C, h, w, device=DEVICE)
    weight = torch.rand(C, device=DEVICE) + 0.5
    bias = torch.randn(C, device=DEVICE)
    dy = torch.randn(N, C, H, W, device=DEVICE)
    args = [_leaf(t) for t in (x, small, k3, weight, bias)]
    rargs = [_leaf(t) for t in args]

    with scnet_fused.backend("triton"):
        y, mean, var = scnet_fused.sc_gate_bn_train(*args, eps=1e-5)
    xr, sr, kr, wr, br = rargs
    rm = torch.zeros(C, device=DEVICE)
    rv = torch.ones(C, device=DEVICE)
    kn = F.batch_norm(kr, rm, rv, wr, br, training=True, momentum=1.0, eps=1e-5)
    y_ref = _ref_gate(xr, sr, kn)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(mean, rm)  # momentum 1: the running mean is the batch mean
    n = N * H * W
    torch.testing.assert_close(var, rv * (n - 1) / n)  # the running var is unbiased
    with scnet_fused.backend("triton"):
        y.backward(dy)
    y_ref.backward(dy)
    for a, b in zip(args, rargs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=2e-5)
