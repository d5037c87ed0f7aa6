"""The C++ kernels (CPU, and CUDA when a GPU is present) against the reference primitives.

Primitives through ``scnet_fused.ops._cpp.Primitives``; public ops through ``scnet_fused.backend``.
Poison mode is on (conftest sets SCNET_FUSED_POISON=1): an output element a kernel forgets to
write is NaN and fails the comparisons.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scnet_fused
from scnet_fused import reference as R
from scnet_fused._index import cell_starts, nearest_source_index
from scnet_fused.ops import _dispatch

CPU_REASON = _dispatch.available("cpu")
pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")


def prims(device: str = "cpu"):
    from scnet_fused.ops._cpp import Primitives

    return Primitives(device)


# (N, C, H, W, h, w): r=4 pooled sizes of the irregular maps, r=2, h=1 / w=1, odd N, C % 8 != 0.
SHAPES = [
    (3, 13, 14, 14, 3, 3),
    (1, 8, 25, 25, 6, 6),
    (2, 5, 13, 7, 3, 1),
    (3, 6, 7, 5, 1, 1),
    (1, 4, 56, 56, 14, 14),
    (2, 3, 5, 13, 2, 6),
    (1, 17, 14, 25, 7, 12),
    (3, 9, 56, 14, 14, 3),
    (1, 12, 25, 13, 1, 3),
    (2, 16, 14, 7, 7, 3),
    (1, 3, 203, 57, 50, 14),  # NCHW planes split into row blocks, cells across block edges
    (1, 130, 9, 7, 2, 1),     # NHWC channel blocks with a partial last block
    # NCHW upsampling by lane permutes where the source values of a vector span < 2 vectors:
    (2, 3, 31, 123, 7, 30),   # they span 30 values: permutes with 16 lanes, the blocked path with 8
    (1, 2, 23, 67, 5, 33),    # 33 values: the blocked path with 8 and 16 lanes
    (2, 5, 3, 5, 1, 2),       # a 15-element plane: one partial vector of 16 lanes, overlapping ones of 8
    (3, 4, 2, 3, 1, 1),       # a 6-element plane: one partial vector
    (2, 9, 7, 7, 1, 1),       # a 1x1 pooled map: NCHW planes walked as one flat array, a partial last chunk
    # The NHWC backward's channel chunks (16 lanes: chunks of 4, 2 and 1 vectors; 8 lanes: of 2 and 1):
    (2, 117, 11, 10, 3, 4),   # a block wider than a chunk, walked cell by cell, with a partial last vector
    (1, 53, 12, 13, 4, 5),    # a block of at most one chunk (16 lanes), walked row by row
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def make_inputs(shape, dtype=torch.float32, channels_last=False, device="cpu", seed=0):
    N, C, H, W, h, w = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, scale=1.0, offset=0.0):
        return (torch.randn(*size, generator=g) * scale + offset).to(device)

    x = rnd(N, C, H, W).to(dtype)
    k3 = rnd(N, C, H, W, scale=1.5, offset=0.3).to(dtype)
    dy = rnd(N, C, H, W).to(dtype)
    small = rnd(N, C, h, w).to(dtype)
    if channels_last:
        x, k3, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, k3, dy))
    scale = (torch.rand(C, generator=g) + 0.5).to(device)
    shift = rnd(C, scale=0.5)
    center = rnd(C, scale=0.3, offset=0.3)
    return x, small, k3, dy, scale, shift, center


def fmt_of(t):
    if t.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


def assert_sum_close(got, ref64, terms_abs_sum, rel=2e-6):
    """Per-channel sums: error bounded relative to the sum of |terms| (the conditioning of a sum)."""
    err = (got.double() - ref64.double()).abs()
    bound = rel * terms_abs_sum.double() + 1e-6
    assert torch.all(err <= bound), f"sum error {err.max().item():.3g} > bound {bound.min().item():.3g}"


def gate_abs_terms(dy, x, small, k3, center, small_affine=(None, None)):
    """sum over N, H, W of |g| and |g * (k3 - center)| in float64."""
    up = R._affine(small.double(), *to64(*small_affine))
    s = torch.sigmoid(x.double() + F.interpolate(up, size=x.shape[-2:], mode="nearest"))
    g = (dy.double() * s).abs()
    kc = k3.double() - (0 if center is None else center.double().view(1, -1, 1, 1))
    return g.sum(dim=(0, 2, 3)), (g * kc.abs()).sum(dim=(0, 2, 3))


def to64(*ts):
    return tuple(None if t is None else t.double() for t in ts)


# ------------------------------------------------------------------------------------------------
# fp32 parity of the primitives
# ------------------------------------------------------------------------------------------------


def check_fp32(device, P=None):
    """fp32 parity on `device` of the primitives P (default: the extension's)."""
    P = P or prims(device)
    for shape in SHAPES:
        for cl in (False, True):
            x, small, k3, dy, scale, shift, center = make_inputs(shape, channels_last=cl, device=device)
            for sc, sh in ((scale, shift), (None, None), (scale, None)):
                y = P.gate_forward(x, small, k3, sc, sh)
                torch.testing.assert_close(y, R.gate_forward(x, small, k3, sc, sh))
                assert y.is_contiguous(memory_format=fmt_of(x))
            for sc, sh, ct in ((scale, shift, center), (None, None, None), (scale, shift, None)):
                for need_dk3 in (True, False):
                    out = P.gate_backward(dy, x, small, k3, sc, sh, ct, need_dk3)
                    ref = R.gate_backward(dy, x, small, k3, sc, sh, ct, need_dk3)
                    ref64 = R.gate_backward(*to64(dy, x, small, k3, sc, sh, ct), need_dk3)
                    torch.testing.assert_close(out[0], ref[0])
                    assert out[0].is_contiguous(memory_format=fmt_of(x))
                    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
                    assert out[1].is_contiguous() and out[1].shape == small.shape
                    if need_dk3:
                        torch.testing.assert_close(out[2], ref[2])
                        assert out[2].is_contiguous(memory_format=fmt_of(x))
                    else:
                        assert out[2] is None
                    ag, agk = gate_abs_terms(dy, x, small, k3, ct)
                    assert out[3].dtype == torch.float32 and out[4].dtype == torch.float32
                    assert_sum_close(out[3].cpu(), ref64[3].cpu(), ag.cpu())
                    assert_sum_close(out[4].cpu(), ref64[4].cpu(), agk.cpu())
            p, q, r = (t.to(device) for t in (torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape[1])))
            dk3 = P.gate_backward_k3(dy, x, small, k3, p, q, r)
            torch.testing.assert_close(dk3, R.gate_backward_k3(dy, x, small, k3, p, q, r))
            assert dk3.is_contiguous(memory_format=fmt_of(x))
            check_small_affine(P, x, small, k3, dy, scale, shift, center, p, q, r)
            mean, var = P.channel_stats(k3 + 5.0)
            rmean, rvar = R.channel_stats((k3 + 5.0).double())
            torch.testing.assert_close(mean.double(), rmean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=1e-6)


def test_primitives_fp32_cpu():
    check_fp32("cpu")


def test_gate_large_plane_cpu():
    """A plane above the NCHW permute table's size limit (2^20 elements) with a small map narrow enough
    for the table: the blocked path, against the reference."""
    P = prims("cpu")
    x, small, k3, dy, scale, shift, center = make_inputs((1, 2, 1030, 1030, 32, 32))
    torch.testing.assert_close(P.gate_forward(x, small, k3, scale, shift), R.gate_forward(x, small, k3, scale, shift))
    out = P.gate_backward(dy, x, small, k3, scale, shift, center, True)
    ref = R.gate_backward(dy, x, small, k3, scale, shift, center, True)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[2], ref[2])
    ref64 = R.gate_backward(*to64(dy, x, small, k3, scale, shift, center), True)
    # dsmall: sums of about 1000 dz each, checked against float64 relative to the sum of |dz| per cell
    abs_cells = R.upsample_adjoint(ref64[0].abs(), small.shape[-2:])
    err = (out[1].double() - ref64[1]).abs()
    assert torch.all(err <= 2e-6 * abs_cells + 1e-6), f"dsmall error {err.max().item():.3g}"
    ag, agk = gate_abs_terms(dy, x, small, k3, center)
    assert_sum_close(out[3], ref64[3], ag)
    assert_sum_close(out[4], ref64[4], agk)


# Streaming stores: planes a multiple of 16 elements (every build streams them), of 8 but not 16
# (the AVX2 build streams, the AVX-512 build does not), and of neither.
STREAM_SHAPES = [(2, 5, 16, 16, 4, 4), (1, 3, 56, 56, 14, 14), (2, 4, 8, 3, 2, 1), (3, 2, 7, 7, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_streaming_stores_give_the_same_results(monkeypatch, dtype):
    """SCNET_FUSED_CPU_STREAM=1 stores the NCHW outputs past the cache whatever their size (where the
    build and the alignment allow): the results are bitwise those of normal stores, and right."""
    P = prims()

    def run(mode, inp):
        monkeypatch.setenv("SCNET_FUSED_CPU_STREAM", mode)
        x, small, k3, dy, scale, shift, center = inp
        outs = [P.gate_forward(x, small, k3, scale, shift), P.gate_backward_k3(dy, x, small, k3, scale, shift, center)]
        for need_dk3 in (True, False):
            outs += [t for t in P.gate_backward(dy, x, small, k3, scale, shift, center, need_dk3) if t is not None]
        outs += list(P.gate_bn_train_backward(dy, x, small, k3, scale, shift, center, center.abs() + 0.1, 1e-5))
        outs += list(P.gate_bn_train_forward(x, small, k3, scale, shift, 1e-5))
        return outs

    for shape in STREAM_SHAPES:
        inp = make_inputs(shape, dtype=dtype)
        streamed, normal, auto = run("1", inp), run("0", inp), run("auto", inp)
        for a, b, c in zip(streamed, normal, auto):
            assert torch.equal(a, b) and torch.equal(b, c)
        if dtype == torch.float32:
            x, small, k3, dy, scale, shift, center = inp
            torch.testing.assert_close(streamed[0], R.gate_forward(x, small, k3, scale, shift))
            torch.testing.assert_close(streamed[1], R.gate_backward_k3(dy, x, small, k3, scale, shift, center))
            ref = R.gate_backward(dy, x, small, k3, scale, shift, center, True)
            torch.testing.assert_close(streamed[2], ref[0])
            torch.testing.assert_close(streamed[3], ref[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(streamed[4], ref[2])
    monkeypatch.setenv("SCNET_FUSED_CPU_STREAM", "yes")
    x, small, k3, dy, scale, shift, center = make_inputs(STREAM_SHAPES[0], dtype=dtype)
    for call in (lambda: P.gate_forward(x, small, k3, scale, shift),
                 lambda: P.gate_backward(dy, x, small, k3, scale, shift, center, True)):
        with pytest.raises(RuntimeError, match="SCNET_FUSED_CPU_STREAM must be 0, 1 or auto, got 'yes'"):
            call()


# ------------------------------------------------------------------------------------------------
# fp16 / bf16: error against float64 at most 2x eager PyTorch's error in the same dtype (+ small atol)
# ------------------------------------------------------------------------------------------------


def eager_lowp_backward(dy, x, small, k3, scale, shift, center):
    """The gate's backward written with plain ops in the inputs' dtype (what eager PyTorch computes)."""
    dt = x.dtype
    up = F.interpolate(small, size=x.shape[-2:], mode="nearest")
    s = torch.sigmoid(x + up)
    a = k3 * scale.to(dt).view(1, -1, 1, 1) + shift.to(dt).view(1, -1, 1, 1)
    g = dy * s
    dz = dy * a * s * (1 - s)
    dsmall = R.upsample_adjoint(dz, small.shape[-2:])
    dk3 = g * scale.to(dt).view(1, -1, 1, 1)
    y = a * s
    return y, dz, dsmall, dk3


def check_lowp(device, dtype, P=None):
    P = P or prims(device)
    eps = torch.finfo(dtype).eps
    for shape in SHAPES[:6]:
        for cl in (False, True):
            x, small, k3, dy, scale, shift, center = make_inputs(shape, dtype=dtype, channels_last=cl, device=device)
            e_y, e_dx, e_ds, e_dk = eager_lowp_backward(dy, x, small, k3, scale, shift, center)
            r_y = R.gate_forward(*to64(x, small, k3, scale, shift))
            r = R.gate_backward(*to64(dy, x, small, k3, scale, shift, center), True)
            f_y = P.gate_forward(x, small, k3, scale, shift)
            f = P.gate_backward(dy, x, small, k3, scale, shift, center, True)
            assert f_y.dtype == dtype and f[0].dtype == dtype and f[1].dtype == dtype and f[2].dtype == dtype
            for name, got, eager, ref in (("y", f_y, e_y, r_y), ("dx", f[0], e_dx, r[0]),
                                          ("dsmall", f[1], e_ds, r[1]), ("dk3", f[2], e_dk, r[2])):
                err = (got.double() - ref).abs().max().item()
                err_eager = (eager.double() - ref).abs().max().item()
                atol = eps * (1.0 + ref.abs().max().item()) * 0.5
                assert err <= 2 * err_eager + atol, f"{name} {dtype}: {err:.3g} > 2 * {err_eager:.3g} + {atol:.3g}"
            ag, agk = gate_abs_terms(dy, x, small, k3, center)
            # The sums are float32 accumulations of float32 terms: bounded like the fp32 path.
            assert_sum_close(f[3].cpu(), r[3].cpu(), ag.cpu(), rel=1e-5)
            assert_sum_close(f[4].cpu(), r[4].cpu(), agk.cpu(), rel=1e-5)
            p, q, rr = (torch.randn(shape[1]).to(device) for _ in range(3))
            dk = P.gate_backward_k3(dy, x, small, k3, p, q, rr)
            ref_dk = R.gate_backward_k3(*to64(dy, x, small, k3, p, q, rr))
            s_l = torch.sigmoid(x + F.interpolate(small, size=x.shape[-2:], mode="nearest"))
            eager_dk = p.to(dtype).view(1, -1, 1, 1) * (dy * s_l) + q.to(dtype).view(1, -1, 1, 1) * k3 + \
                rr.to(dtype).view(1, -1, 1, 1)
            err = (dk.double() - ref_dk).abs().max().item()
            err_eager = (eager_dk.double() - ref_dk).abs().max().item()
            assert err <= 2 * err_eager + eps * (1.0 + ref_dk.abs().max().item()) * 0.5
            mean, var = P.channel_stats(k3)
            rmean, rvar = R.channel_stats(k3.double())
            torch.testing.assert_close(mean.double(), rmean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_primitives_lowp_cpu(dtype):
    check_lowp("cpu", dtype)


# ------------------------------------------------------------------------------------------------
# Poison mode, determinism, threads
# ------------------------------------------------------------------------------------------------


def test_poison_mode_is_on():
    from scnet_fused._alloc import poison_enabled

    assert poison_enabled(), "conftest sets SCNET_FUSED_POISON=1 so unwritten outputs show up as NaN"


def test_every_output_written_under_poison():
    P = prims()
    for shape in SHAPES:
        for cl in (False, True):
            x, small, k3, dy, scale, shift, center = make_inputs(shape, channels_last=cl)
            outs = [P.gate_forward(x, small, k3, scale, shift),
                    P.gate_backward_k3(dy, x, small, k3, scale, shift, center)]
            outs += [t for t in P.gate_backward(dy, x, small, k3, scale, shift, center, True) if t is not None]
            outs += list(P.channel_stats(k3))
            weight, var = scale + 0.5, center.abs() + 0.1
            outs += list(P.gate_bn_train_backward(dy, x, small, k3, weight, shift, center, var, 1e-5))
            outs += list(P.gate_bn_train_forward(x, small, k3, weight, shift, 1e-5))
            for t in outs:
                assert not torch.isnan(t).any()


def test_backward_deterministic_across_thread_counts():
    P = prims()
    before = torch.get_num_threads()
    for shape in (SHAPES[0], SHAPES[4], SHAPES[7]):
        for cl in (False, True):
            x, small, k3, dy, scale, shift, center = make_inputs(shape, channels_last=cl)
            results = []
            for nt in (1, 2, 3):
                torch.set_num_threads(nt)
                results.append(P.gate_backward(dy, x, small, k3, scale, shift, center, True) + P.channel_stats(k3))
            torch.set_num_threads(before)
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    assert torch.equal(a, b)


def test_channel_loops_split_across_threads_give_the_same_bits():
    """The channel-by-channel kernels (BatchNorm gate, BatchNorm + ReLU) and the NHWC sums take tasks of
    at least 32768 elements, so small maps run on one thread; at 2x4x96x96 (18432 values per channel)
    they split across threads. Every thread count gives the one-thread bits, and those match float64
    math (statistics, the BatchNorm gate's and the BatchNorm + ReLU's outputs)."""
    P = prims()
    before = torch.get_num_threads()
    shape = (2, 4, 96, 96, 24, 24)
    try:
        for cl in (False, True):
            x, small, k3, dy, scale, shift, center = make_inputs(shape, channels_last=cl)
            weight, var = scale + 0.5, center.abs() + 0.1
            results = []
            for nt in (1, 2, 3):
                torch.set_num_threads(nt)
                out = torch.empty_like(k3)
                outs = list(P.gate_bn_train_forward(x, small, k3, weight, shift, 1e-5))
                outs += list(P.gate_bn_train_backward(dy, x, small, k3, weight, shift, center, var, 1e-5))
                outs += list(P.bn_relu_train_out(k3, weight, shift, 1e-5, out)) + [out]
                outs += list(P.bn_relu_train_backward(dy, k3, weight, shift, center, var, 1e-5))
                results.append(outs)
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    assert torch.equal(a, b)
            # and the split results are right: statistics and outputs against float64 math
            y, bmean, bvar = results[0][:3]
            k64 = k3.double()
            var64, mean64 = torch.var_mean(k64, dim=(0, 2, 3), unbiased=False)
            torch.testing.assert_close(bmean.double(), mean64, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bvar.double(), var64, rtol=1e-5, atol=1e-6)
            bn = ((k64 - mean64.view(1, -1, 1, 1)) * torch.rsqrt(var64.view(1, -1, 1, 1) + 1e-5)
                  * weight.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
            up = F.interpolate(small.double(), size=x.shape[-2:], mode="nearest")
            torch.testing.assert_close(y.double(), bn * torch.sigmoid(x.double() + up), rtol=1e-4, atol=1e-5)
            relu64 = torch.relu(bn)
            torch.testing.assert_close(results[0][-4].double(), relu64, rtol=1e-4, atol=1e-5)  # bn_relu out
    finally:
        torch.set_num_threads(before)


def test_two_threads_at_once():
    P = prims()
    cases = []
    for i, shape in enumerate(SHAPES[:6]):
        inp = make_inputs(shape, channels_last=bool(i % 2), seed=i)
        x, small, k3, dy, scale, shift, center = inp
        cases.append((inp, R.gate_forward(x, small, k3, scale, shift),
                      R.gate_backward(dy, x, small, k3, scale, shift, center, True)))
    barrier = threading.Barrier(2)

    def work(offset):
        barrier.wait()
        for rep in range(6):
            (x, small, k3, dy, scale, shift, center), y_ref, b_ref = cases[(rep + offset) % len(cases)]
            y = P.gate_forward(x, small, k3, scale, shift)
            b = P.gate_backward(dy, x, small, k3, scale, shift, center, True)
            torch.testing.assert_close(y, y_ref)
            torch.testing.assert_close(b[0], b_ref[0])
            torch.testing.assert_close(b[1], b_ref[1], rtol=1e-5, atol=1e-5)
        return True

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert all(f.result() for f in [pool.submit(work, 0), pool.submit(work, 3)])


def test_noncontiguous_and_mixed_layouts_are_handled():
    P = prims()
    x, small, k3, dy, scale, shift, center = make_inputs(SHAPES[0])
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # neither NCHW nor NHWC contiguous
    y = P.gate_forward(xt, small, k3.contiguous(memory_format=torch.channels_last), scale, shift)
    torch.testing.assert_close(y, R.gate_forward(x, small, k3, scale, shift))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_channel_affine_in_place(dtype):
    P = prims()
    # planes and channel counts with vector tails, both layouts, a 1x1 plane (both layouts at once)
    for shape in [(2, 5, 7, 9), (3, 19, 4, 4), (2, 3, 1, 1), (1, 16, 8, 8)]:
        for cl in (False, True):
            g = torch.Generator().manual_seed(shape[1])
            t = torch.randn(*shape, generator=g).to(dtype)
            d = torch.randn(*shape, generator=g).to(dtype)
            if cl:
                t, d = (v.contiguous(memory_format=torch.channels_last) for v in (t, d))
            q, r = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
            want = d.float() + (q.view(1, -1, 1, 1) * t.float() + r.view(1, -1, 1, 1))
            ptr, strides = d.data_ptr(), d.stride()
            out = P.add_channel_affine_(d, t, q, r)
            assert out is d and d.data_ptr() == ptr and d.stride() == strides
            tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(d.float(), want.to(dtype).float(), **tol)


def test_add_channel_affine_errors():
    P = prims()
    t = torch.randn(2, 3, 5, 5)
    q, r = torch.randn(3), torch.randn(3)
    with pytest.raises(RuntimeError, match="dense in t's memory format"):
        P.add_channel_affine_(torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last), t, q, r)
    with pytest.raises(RuntimeError, match="dense in t's memory format"):
        P.add_channel_affine_(torch.randn(2, 3, 5, 10)[..., ::2], t, q, r)
    with pytest.raises(RuntimeError, match="match t's shape, dtype"):
        P.add_channel_affine_(torch.randn(2, 3, 5, 5).double(), t, q, r)
    with pytest.raises(RuntimeError, match="match t's shape, dtype"):
        P.add_channel_affine_(torch.randn(2, 3, 5, 4), t, q, r)
    with pytest.raises(RuntimeError, match="C=3"):
        P.add_channel_affine_(torch.randn(2, 3, 5, 5), t, q[:2], r)


def _two_pass_backward(P, dy, t, weight, bias, mean, var, eps):
    """bn_relu_train_backward composed from bn_fold, the sums and apply primitives and the algebra in ATen."""
    from scnet_fused.ops.sc_gate import bn_fold

    invstd, scale, shift = bn_fold(weight, bias, mean, var, eps)
    sum_g, sum_gc = P.affine_relu_backward_sums(dy, t, scale, shift, mean)
    m = float(t.shape[0] * t.shape[2] * t.shape[3])
    dweight = sum_gc * invstd
    q = -scale * invstd * dweight / m
    r = -q * mean - scale * sum_g / m
    return P.affine_relu_backward_apply(dy, t, scale, shift, scale, q, r), dweight, sum_g


def _bn_backward_inputs(shape, dtype, cl, seed):
    """dy, t, weight, bias and t's batch statistics (mean, biased var)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * 2 + 0.3).to(dtype)
    dy = torch.randn(*shape, generator=g).to(dtype)
    if cl:
        t, dy = (v.contiguous(memory_format=torch.channels_last) for v in (t, dy))
    C = shape[1]
    var, mean = torch.var_mean(t.float(), dim=(0, 2, 3), unbiased=False)
    weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.5
    return dy, t, weight, bias, mean, var


# NCHW channel by channel (vector tails, a 1x1 plane, one channel: with two or more threads the
# two-pass path), NHWC, and an NCHW shape whose channels exceed the by-channel size (two passes).
WHOLE_BACKWARD = [((2, 16, 14, 13), False), ((3, 5, 7, 6), False), ((4, 3, 1, 1), False), ((3, 1, 9, 9), False),
                  ((2, 16, 14, 13), True), ((3, 19, 5, 5), True), ((2, 2, 260, 256), False),
                  # NCHW statistics in runs of small planes: 40 planes of 25 a run, then 5; 2 of 512, 2, 1
                  ((45, 2, 5, 5), False), ((5, 3, 16, 32), False),
                  # NHWC statistics: chunks of 4, 2 and 1 vectors and a tail (16 lanes); 64 tasks of 75 pixels
                  ((2, 117, 11, 10), True), ((4, 3, 40, 30), True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,cl", WHOLE_BACKWARD, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else ("nhwc" if v else "nchw"))
def test_bn_relu_train_backward_matches_two_passes(shape, cl, dtype):
    """The one-call BatchNorm + ReLU backward gives the bits of the two-pass composition with the
    algebra in ATen (the sums' partials added in the same order, the fold and the algebra rounded as
    ATen rounds them); and against float64 BatchNorm + ReLU."""
    P = prims()
    dy, t, w, b, mean, var = _bn_backward_inputs(shape, dtype, cl, seed=shape[1])
    dt, dweight, dbias = P.bn_relu_train_backward(dy, t, w, b, mean, var, 1e-3)
    want_dt, want_dw, want_db = _two_pass_backward(P, dy, t, w, b, mean, var, 1e-3)
    torch.testing.assert_close(dbias, want_db, rtol=0, atol=0)
    torch.testing.assert_close(dweight, want_dw, rtol=0, atol=0)
    torch.testing.assert_close(dt.float(), want_dt.float(), rtol=0, atol=0)
    fmt = torch.channels_last if cl and shape[2] * shape[3] > 1 else torch.contiguous_format
    assert dt.dtype == dtype and dt.is_contiguous(memory_format=fmt)
    assert dweight.dtype == dbias.dtype == torch.float32
    tt, w64, b64 = (v.double().requires_grad_() for v in (t, w, b))
    y64 = F.relu(F.batch_norm(tt, None, None, w64, b64, True, 0.1, 1e-3))
    g64 = torch.autograd.grad(y64, (tt, w64, b64), dy.double())
    tol64 = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, e in zip((dt, dweight, dbias), g64):
        torch.testing.assert_close(a.double(), e, **tol64)


@pytest.mark.parametrize("cl", [False, True])
def test_bn_relu_train_backward_reads_a_gradient_slice_and_ignores_threads(cl):
    """dy as a channel slice of a concatenation's gradient reads as the same values made dense; the
    results do not depend on the thread count (bit for bit)."""
    P = prims()
    fmt = torch.channels_last if cl else torch.contiguous_format
    _, t, w, b, mean, var = _bn_backward_inputs((3, 6, 9, 10), torch.float32, cl, seed=5)
    wide = torch.randn(3, 14, 9, 10).contiguous(memory_format=fmt)
    dy = wide[:, 5:11]
    dense = dy.contiguous(memory_format=fmt)
    got = P.bn_relu_train_backward(dy, t, w, b, mean, var, 1e-5)
    for a, e in zip(got, P.bn_relu_train_backward(dense, t, w, b, mean, var, 1e-5)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = P.bn_relu_train_backward(dense, t, w, b, mean, var, 1e-5)
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(got, one):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="dy must match t's shape"):
        P.bn_relu_train_backward(dense[:, :5], t, w, b, mean, var, 1e-5)
    with pytest.raises(RuntimeError, match="var must be a 1-D CPU tensor of C=6"):
        P.bn_relu_train_backward(dense, t, w, b, mean, var[:5], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,cl", WHOLE_BACKWARD, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else ("nhwc" if v else "nchw"))
def test_bn_relu_train_out_matches_stats_then_apply(shape, cl, dtype):
    """The one-call BatchNorm + ReLU forward: `channel_stats`' statistics and `affine_relu`'s y with
    bn_fold's scale and shift, bit for bit."""
    from scnet_fused.ops.sc_gate import bn_fold

    P = prims()
    _, t, w, b, _, _ = _bn_backward_inputs(shape, dtype, cl, seed=shape[1] + 1)
    fmt = torch.channels_last if cl and shape[2] * shape[3] > 1 else torch.contiguous_format
    y = torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=fmt)
    mean, var = P.bn_relu_train_out(t, w, b, 1e-3, y)
    want_mean, want_var = P.channel_stats(t)
    torch.testing.assert_close(mean, want_mean, rtol=0, atol=0)
    torch.testing.assert_close(var, want_var, rtol=0, atol=0)
    _, scale, shift = bn_fold(w, b, want_mean, want_var, 1e-3)
    torch.testing.assert_close(y.float(), P.affine_relu(t, scale, shift).float(), rtol=0, atol=0)
    want64 = F.relu(F.batch_norm(t.double(), None, None, w.double(), b.double(), True, 0.1, 1e-3))
    tol64 = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(y.double(), want64, **tol64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,cl", WHOLE_BACKWARD, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else ("nhwc" if v else "nchw"))
def test_bn_train_without_relu(shape, cl, dtype):
    """The one-call BatchNorm forward and backward without the ReLU (a standalone SCConv's k4 norm):
    where the ReLU would pass everything (a bias that keeps every z above 0) the bits of the BatchNorm +
    ReLU kernels, and otherwise float64 BatchNorm's values (outputs below zero kept, every gradient
    passed)."""
    P = prims()
    dy, t, w, b, mean, var = _bn_backward_inputs(shape, dtype, cl, seed=shape[1] + 2)
    fmt = torch.channels_last if cl and shape[2] * shape[3] > 1 else torch.contiguous_format
    y = torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=fmt)
    stats = P.bn_train_out(t, w, b, 1e-3, y)
    grads = P.bn_train_backward(dy, t, w, b, mean, var, 1e-3)
    assert grads[0].dtype == dtype and grads[0].is_contiguous(memory_format=fmt)
    tt, w64, b64 = (v.double().requires_grad_() for v in (t, w, b))
    y64 = F.batch_norm(tt, None, None, w64, b64, True, 0.1, 1e-3)
    g64 = torch.autograd.grad(y64, (tt, w64, b64), dy.double())
    tol64 = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    assert (y64 < 0).any()
    torch.testing.assert_close(y.double(), y64, **tol64)
    for a, e in zip(grads, g64):
        torch.testing.assert_close(a.double(), e, **tol64)
    up = b + 100.0  # relu(z) = z everywhere: the ReLU kernels' bits
    y_relu = torch.empty_like(y)
    y_plain = torch.empty_like(y)
    for a, e in zip(P.bn_train_out(t, w, up, 1e-3, y_plain), P.bn_relu_train_out(t, w, up, 1e-3, y_relu)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.testing.assert_close(y_plain, y_relu, rtol=0, atol=0)
    for a, e in zip(P.bn_train_backward(dy, t, w, up, mean, var, 1e-3),
                    P.bn_relu_train_backward(dy, t, w, up, mean, var, 1e-3)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    for a, e in zip(stats, P.channel_stats(t)):  # the statistics: `_channel_stats`' bits
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("cl", [False, True])
def test_bn_relu_train_out_writes_its_slice_and_ignores_threads(cl):
    P = prims()
    fmt = torch.channels_last if cl else torch.contiguous_format
    _, t, w, b, _, _ = _bn_backward_inputs((3, 6, 9, 10), torch.float32, cl, seed=7)
    buf = torch.full((3, 14, 9, 10), 7.0).contiguous(memory_format=fmt)
    stats = P.bn_relu_train_out(t, w, b, 1e-5, buf[:, 5:11])
    dense = torch.empty_like(t)
    for a, e in zip(stats, P.bn_relu_train_out(t, w, b, 1e-5, dense)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.testing.assert_close(buf[:, 5:11], dense, rtol=0, atol=0)
    assert (buf[:, :5] == 7.0).all() and (buf[:, 11:] == 7.0).all()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.empty_like(t)
        stats1 = P.bn_relu_train_out(t, w, b, 1e-5, one)
    finally:
        torch.set_num_threads(threads)
    for a, e in zip((*stats, dense), (*stats1, one)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="out must match t's shape"):
        P.bn_relu_train_out(t, w, b, 1e-5, torch.empty(3, 5, 9, 10))
    with pytest.raises(RuntimeError, match="dense in t's memory format or a channel slice"):
        P.bn_relu_train_out(t, w, b, 1e-5, torch.empty(3, 6, 10, 9).transpose(2, 3))
    with pytest.raises(RuntimeError, match="weight must be a 1-D CPU tensor of C=6"):
        P.bn_relu_train_out(t, w[:5], b, 1e-5, dense)
    with pytest.raises(RuntimeError, match="no elements per channel"):
        P.bn_relu_train_out(t[:0], w, b, 1e-5, torch.empty_like(t[:0]))


def check_small_affine(P, x, small, k3, dy, scale, shift, center, p, q, r):
    """The primitives with the pooled branch's affine (small * ss + st where they read small; dsmall
    the gradient of that affine's output) against the reference's, float32."""
    ss, st = scale.flip(0) * 1.3, shift.flip(0) - 0.2
    for a in ((ss, st), (ss, None), (None, st)):
        torch.testing.assert_close(P.gate_forward(x, small, k3, scale, shift, *a),
                                   R.gate_forward(x, small, k3, scale, shift, *a))
    out = P.gate_backward(dy, x, small, k3, scale, shift, center, True, ss, st)
    ref = R.gate_backward(dy, x, small, k3, scale, shift, center, True, ss, st)
    ref64 = R.gate_backward(*to64(dy, x, small, k3, scale, shift, center), True, *to64(ss, st))
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], ref[2])
    ag, agk = gate_abs_terms(dy, x, small, k3, center, (ss, st))
    assert_sum_close(out[3].cpu(), ref64[3].cpu(), ag.cpu())
    assert_sum_close(out[4].cpu(), ref64[4].cpu(), agk.cpu())
    torch.testing.assert_close(P.gate_backward_k3(dy, x, small, k3, p, q, r, ss, st),
                               R.gate_backward_k3(dy, x, small, k3, p, q, r, ss, st))


def _gate_bn_inputs(shape, dtype, cl, seed):
    """x, small, k3, dy, weight, bias and k3's batch statistics (mean, biased var)."""
    x, small, k3, dy, _, _, _ = make_inputs(shape, dtype=dtype, channels_last=cl, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    C = shape[1]
    var, mean = torch.var_mean(k3.float(), dim=(0, 2, 3), unbiased=False)
    weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.5
    return x, small, k3, dy, weight, bias, mean, var


def _gate_bn_two_passes(P, dy, x, small, k3, weight, bias, mean, var, eps, sa=()):
    """The BatchNorm gate backward composed from bn_fold, the two gate passes and the algebra in ATen:
    for float32 dk3 from the g * scale of the first pass, else the sigmoid recomputed. sa: the pooled
    branch's affine, or nothing."""
    from scnet_fused.ops.sc_gate import bn_fold

    invstd, scale, shift = bn_fold(weight, bias, mean, var, eps)
    from_g = x.dtype == torch.float32
    dx, dsmall, gs, sum_g, sum_gc = P.gate_backward(dy, x, small, k3, scale, shift, mean, from_g, *sa)
    m = float(x.shape[0] * x.shape[2] * x.shape[3])
    dweight = sum_gc * invstd
    q = -scale * invstd * dweight / m
    r = -q * mean - scale * sum_g / m
    dk3 = P.add_channel_affine_(gs, k3, q, r) if from_g else P.gate_backward_k3(dy, x, small, k3, scale, q, r, *sa)
    return dx, dsmall, dk3, dweight, sum_g


def _small_affine(C, seed):
    """A per-channel affine of the pooled map (its BatchNorm's fold)."""
    g = torch.Generator().manual_seed(seed + 200)
    return torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.5


def _small_up64(small, sa, size):
    """The pooled map through the affine sa (or none), upsampled, in float64."""
    return F.interpolate(R._affine(small.double(), *to64(*sa)) if sa else small.double(), size=size,
                         mode="nearest")


# NCHW channel by channel (vector tails, 1x1 maps, one-vector and partial-vector planes, N = 1);
# NCHW two passes inside: one channel (fewer channels than threads), a channel over the by-channel
# size, and a map whose upsampling the permute table does not cover (the blocked path); NHWC.
GATE_BN_BACKWARD = [(SHAPES[0], False), (SHAPES[3], False), (SHAPES[6], False), (SHAPES[14], False),
                    (SHAPES[15], False), ((3, 1, 9, 9, 2, 2), False), ((1, 2, 240, 232, 60, 58), False),
                    (SHAPES[13], False), (SHAPES[0], True), (SHAPES[11], True),
                    ((7, 3, 14, 14, 3, 3), False)]  # statistics in runs of 5 planes and 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,cl", GATE_BN_BACKWARD, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else ("nhwc" if v else "nchw"))
def test_gate_bn_train_backward_matches_two_passes(shape, cl, dtype):
    """The one-call BatchNorm gate backward gives the bits of the two-pass composition with the
    algebra in ATen (the same per-plane code, the sums' partials added in the same order, the fold and
    the algebra rounded as ATen rounds them); dk3 too in float32, and to float32 rounding of g * scale
    in half precision (the composition recomputes g there). All against float64 autograd."""
    P = prims()
    x, small, k3, dy, w, b, mean, var = _gate_bn_inputs(shape, dtype, cl, seed=shape[1])
    for sa in ((), _small_affine(shape[1], shape[1])):  # with the pooled branch's affine: dsmall of its output
        dx, dsmall, dk3, dweight, dbias = P.gate_bn_train_backward(dy, x, small, k3, w, b, mean, var, 1e-3, *sa)
        want = _gate_bn_two_passes(P, dy, x, small, k3, w, b, mean, var, 1e-3, sa)
        for got, exp in ((dx, want[0]), (dsmall, want[1]), (dweight, want[3]), (dbias, want[4])):
            torch.testing.assert_close(got, exp, rtol=0, atol=0)
        tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dk3.float(), want[2].float(), **tol)
        fmt = torch.channels_last if cl else torch.contiguous_format
        assert dx.dtype == dk3.dtype == dtype and dx.is_contiguous(memory_format=fmt)
        assert dk3.is_contiguous(memory_format=fmt)
        assert dweight.dtype == dbias.dtype == torch.float32 and dsmall.shape == small.shape
        a = [t.double().requires_grad_() for t in (x, small, k3, w, b)]
        bn = F.batch_norm(a[2], None, None, a[3], a[4], True, 0.1, 1e-3)
        up = a[1] if not sa else a[1] * sa[0].double().view(1, -1, 1, 1) + sa[1].double().view(1, -1, 1, 1)
        y64 = bn * torch.sigmoid(a[0] + F.interpolate(up, size=x.shape[-2:], mode="nearest"))
        g64 = list(torch.autograd.grad(y64, a, dy.double()))
        if sa:  # the kernels' dsmall is the gradient of the affine's output
            g64[1] = g64[1] / sa[0].double().view(1, -1, 1, 1)
        tol64 = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        for got, exp in zip((dx, dsmall, dk3, dweight, dbias), g64):
            torch.testing.assert_close(got.double(), exp, **tol64)


@pytest.mark.parametrize("cl", [False, True])
def test_gate_bn_train_backward_ignores_threads_and_paths(cl):
    """The results do not depend on the thread count, bit for bit; with one channel one thread goes
    channel by channel and two threads take the two passes (float32: from g * scale), with the same
    bits."""
    P = prims()
    threads = torch.get_num_threads()
    for shape in (SHAPES[0], (3, 1, 9, 9, 2, 2), SHAPES[3]):
        args = _gate_bn_inputs(shape, torch.float32, cl, seed=3)
        x, small, k3, dy, w, b, mean, var = args
        results = []
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(P.gate_bn_train_backward(dy, x, small, k3, w, b, mean, var, 1e-5))
        finally:
            torch.set_num_threads(threads)
        for other in results[1:]:
            for a, e in zip(results[0], other):
                torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,cl", GATE_BN_BACKWARD, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else ("nhwc" if v else "nchw"))
def test_gate_bn_train_forward_matches_stats_then_gate(shape, cl, dtype):
    """The one-call BatchNorm gate forward: `channel_stats`' statistics and `gate_forward`'s y with
    bn_fold's scale and shift, bit for bit; and against float64."""
    from scnet_fused.ops.sc_gate import bn_fold

    P = prims()
    x, small, k3, _, w, b, _, _ = _gate_bn_inputs(shape, dtype, cl, seed=shape[1] + 2)
    for sa in ((), _small_affine(shape[1], shape[1])):  # and with the pooled branch's affine
        y, mean, var = P.gate_bn_train_forward(x, small, k3, w, b, 1e-3, *sa)
        want_mean, want_var = P.channel_stats(k3)
        _, scale, shift = bn_fold(w, b, want_mean, want_var, 1e-3)
        for got, exp in ((mean, want_mean), (var, want_var), (y, P.gate_forward(x, small, k3, scale, shift, *sa))):
            torch.testing.assert_close(got, exp, rtol=0, atol=0)
        fmt = torch.channels_last if cl else torch.contiguous_format
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
        bn = F.batch_norm(k3.double(), None, None, w.double(), b.double(), True, 0.1, 1e-3)
        y64 = bn * torch.sigmoid(x.double() + _small_up64(small, sa, x.shape[-2:]))
        tol64 = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(y.double(), y64, **tol64)


def test_gate_bn_train_forward_ignores_threads_and_checks_inputs():
    P = prims()
    threads = torch.get_num_threads()
    for shape in (SHAPES[0], (3, 1, 9, 9, 2, 2), SHAPES[3], (7, 3, 14, 14, 3, 3)):
        for cl in (False, True):
            x, small, k3, _, w, b, _, _ = _gate_bn_inputs(shape, torch.float32, cl, seed=4)
            results = []
            try:
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    results.append(P.gate_bn_train_forward(x, small, k3, w, b, 1e-5))
            finally:
                torch.set_num_threads(threads)
            for other in results[1:]:
                for a, e in zip(results[0], other):
                    torch.testing.assert_close(a, e, rtol=0, atol=0)
    x, small, k3, _, w, b, _, _ = _gate_bn_inputs(SHAPES[0], torch.float32, False, seed=1)
    with pytest.raises(RuntimeError, match="weight must be 1-D with C=13"):
        P.gate_bn_train_forward(x, small, k3, w[:5], b, 1e-5)
    with pytest.raises(RuntimeError, match="k3 must have x's shape"):
        P.gate_bn_train_forward(x, small, k3[:, :5], w, b, 1e-5)
    with pytest.raises(RuntimeError, match="no elements per channel"):
        P.gate_bn_train_forward(x[:0], small[:0], k3[:0], w, b, 1e-5)


def test_gate_bn_train_backward_errors_and_empty():
    P = prims()
    x, small, k3, dy, w, b, mean, var = _gate_bn_inputs(SHAPES[0], torch.float32, False, seed=1)
    with pytest.raises(RuntimeError, match="dy"):
        P.gate_bn_train_backward(dy[:, :5], x, small, k3, w, b, mean, var, 1e-5)
    with pytest.raises(RuntimeError, match="var must be 1-D with C=13"):
        P.gate_bn_train_backward(dy, x, small, k3, w, b, mean, var[:5], 1e-5)
    with pytest.raises(RuntimeError, match="weight must be 1-D with C=13"):
        P.gate_bn_train_backward(dy, x, small, k3, w[:5], b, mean, var, 1e-5)
    with pytest.raises(RuntimeError, match="k3"):
        P.gate_bn_train_backward(dy, x, small, k3.double(), w, b, mean, var, 1e-5)
    dx, dsmall, dk3, dweight, dbias = P.gate_bn_train_backward(dy[:0], x[:0], small[:0], k3[:0], w, b, mean, var, 1e-5)
    assert dx.shape == dk3.shape == x[:0].shape and dsmall.shape == small[:0].shape
    assert torch.equal(dweight, torch.zeros(13)) and torch.equal(dbias, torch.zeros(13))


def test_clear_errors():
    P = prims()
    x, small, k3, dy, scale, shift, center = make_inputs(SHAPES[0])
    with pytest.raises(RuntimeError, match="4-D"):
        P.gate_forward(x[0], small, k3, None, None)
    with pytest.raises(RuntimeError, match="dtype"):
        P.gate_forward(x, small.double(), k3, None, None)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        P.gate_forward(x.double(), small.double(), k3.double(), None, None)
    with pytest.raises(RuntimeError, match="C="):
        P.gate_forward(x, small, k3, scale[:-1], None)


# ------------------------------------------------------------------------------------------------
# Public ops on the cpu backend vs reference autograd
# ------------------------------------------------------------------------------------------------


def ref_gate(x, small, k3, scale=None, shift=None):
    a = k3
    if scale is not None:
        a = a * scale.view(1, -1, 1, 1)
    if shift is not None:
        a = a + shift.view(1, -1, 1, 1)
    return a * torch.sigmoid(x + F.interpolate(small, size=x.shape[-2:], mode="nearest"))


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[6]], ids=[SHAPE_IDS[0], SHAPE_IDS[2], SHAPE_IDS[6]])
@pytest.mark.parametrize("affine", [False, True])
def test_sc_gate_public_cpu(shape, cl, affine):
    x, small, k3, dy, scale, shift, _ = make_inputs(shape, channels_last=cl)
    if not affine:
        scale = shift = None
    a = leaves(x, small, k3, scale, shift)
    b = leaves(x, small, k3, scale, shift)
    with scnet_fused.backend("cpu"):
        y = scnet_fused.sc_gate(*a)
        y.backward(dy)
    y_ref = ref_gate(*b)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    for ga, gb in zip(a, b):
        if ga is not None:
            torch.testing.assert_close(ga.grad, gb.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[7]], ids=[SHAPE_IDS[0], SHAPE_IDS[3], SHAPE_IDS[7]])
def test_sc_gate_bn_train_public_cpu(shape, cl):
    x, small, k3, dy, _, _, _ = make_inputs(shape, channels_last=cl)
    C = shape[1]
    weight = torch.rand(C) + 0.5
    bias = torch.randn(C)
    a = leaves(x, small, k3, weight, bias)
    b = leaves(x, small, k3, weight, bias)
    with scnet_fused.backend("cpu"):
        y, mean, var = scnet_fused.sc_gate_bn_train(*a, eps=1e-5)
        y.backward(dy)
    bn = F.batch_norm(b[2], None, None, b[3], b[4], training=True, eps=1e-5)
    y_ref = bn * torch.sigmoid(b[0] + F.interpolate(b[1], size=x.shape[-2:], mode="nearest"))
    y_ref.backward(dy)
    rvar, rmean = torch.var_mean(k3, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, rmean)
    torch.testing.assert_close(var, rvar)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga.grad, gb.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["cpp", "library"])
@pytest.mark.parametrize("x_cl", [False, True], ids=["x_nchw", "x_nhwc"])
def test_sc_gate_bn_train_mixed_layouts_cpu(monkeypatch, path, x_cl):
    """x and k3 in different memory formats: dk3 is finished in place in x's format (float32), on both
    the C++ autograd path and the torch.library one, against float64."""
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", "1" if path == "cpp" else "0")
    x, small, k3, dy, _, _, _ = make_inputs(SHAPES[6])
    if x_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        k3 = k3.contiguous(memory_format=torch.channels_last)
    C = x.shape[1]
    weight, bias = torch.rand(C) + 0.5, torch.randn(C)
    a = leaves(x, small, k3, weight, bias)
    b = [t.detach().double().requires_grad_() for t in (x, small, k3, weight, bias)]
    with scnet_fused.backend("cpu"):
        y, _, _ = scnet_fused.sc_gate_bn_train(*a, eps=1e-5)
        y.backward(dy)
    bn = F.batch_norm(b[2], None, None, b[3], b[4], training=True, eps=1e-5)
    (bn * torch.sigmoid(b[0] + F.interpolate(b[1], size=x.shape[-2:], mode="nearest"))).backward(dy.double())
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga.grad.double(), gb.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_cpu_backend(requires_grad, cl):
    x, small, k3, _, scale, shift, _ = make_inputs(SHAPES[0], channels_last=cl)
    C = SHAPES[0][1]

    def rg(t):
        return t.detach().clone().requires_grad_(requires_grad)

    with scnet_fused.backend("cpu"):
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate.default, (rg(x), rg(small), rg(k3), rg(scale), rg(shift)))
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate.default, (rg(x), rg(small), rg(k3), None, None))
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate_bn_train.default,
                              (rg(x), rg(small), rg(k3), rg(torch.rand(C) + 0.5), rg(torch.randn(C)), 1e-5))


# ------------------------------------------------------------------------------------------------
# The index math of the C++ kernels
# ------------------------------------------------------------------------------------------------

PAIRS = [(H, h) for H in list(range(1, 70)) + [112, 113, 224, 225, 500, 1023] for h in range(1, H + 1)
         if h <= 8 or H % h == 0 or h in (H // 4, H // 2, H // 3, H - 1)]


def test_nearest_index_matches_python_and_interpolate():
    for H, h in PAIRS:
        got = torch.ops.scnet_fused._nearest_index(H, h).tolist()
        assert got == nearest_source_index(H, h), (H, h)
        src = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
        via_interp = F.interpolate(src, size=(H, 1), mode="nearest").view(-1).long().tolist()
        assert got == via_interp, (H, h)


def test_cell_starts_match_python():
    for H, h in PAIRS:
        got = [torch.ops.scnet_fused._cell_start(a, H, h) for a in range(h + 1)]
        assert got == cell_starts(H, h), (H, h)


def exact_source(i: int, out_size: int, in_size: int) -> int:
    """IEEE float32 semantics of PyTorch's map, emulated exactly with numpy float32 arithmetic."""
    if out_size == in_size:
        return i
    if out_size == 2 * in_size:
        return i >> 1
    s = np.float32(in_size) / np.float32(out_size)
    prod = np.float32(np.float32(i) * s)  # float32 * float32, correctly rounded
    return min(int(np.floor(prod)), in_size - 1)


HUGE = [(2**31 + 7, (2**31 + 7) // 4), (3_000_000_001, 750_000_000), (2**33 + 3, 5), (2**32, 2**31),
        (2**31 - 1, 2**31 - 1), (5_000_000_000, 1_234_567_891)]


@pytest.mark.parametrize("out_size,in_size", HUGE)
def test_nearest_source_at_huge_sizes(out_size, in_size):
    rng = np.random.default_rng(0)
    idx = [0, 1, out_size - 1, out_size - 2, out_size // 2, 2**31 - 1, 2**31, 2**31 + 1]
    idx += [int(v) for v in rng.integers(0, out_size, 200)]
    for i in idx:
        if 0 <= i < out_size:
            got = torch.ops.scnet_fused._nearest_source(i, out_size, in_size)
            assert got == exact_source(i, out_size, in_size), (i, out_size, in_size)
            assert 0 <= got < in_size
    for a in [0, 1, in_size // 2, in_size - 1, in_size] + [int(v) for v in rng.integers(0, in_size, 50)]:
        st = torch.ops.scnet_fused._cell_start(a, out_size, in_size)
        # The first output whose source is >= a.
        assert st == out_size or exact_source(st, out_size, in_size) >= a
        assert st == 0 or exact_source(st - 1, out_size, in_size) < a


# ------------------------------------------------------------------------------------------------
# CUDA: the same parity checks on a GPU
# ------------------------------------------------------------------------------------------------


def _cuda_ready():
    return torch.cuda.is_available() and _dispatch.available("cuda") is None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the compiled CUDA kernels")
def test_primitives_fp32_cuda():
    check_fp32("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the compiled CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_primitives_lowp_cuda(dtype):
    check_lowp("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the compiled CUDA kernels")
def test_cuda_matches_cpu_and_is_deterministic():
    P, Q = prims("cuda"), prims("cpu")
    for shape in SHAPES:
        for cl in (False, True):
            inp = make_inputs(shape, channels_last=cl, device="cuda")
            x, small, k3, dy, scale, shift, center = inp
            a = P.gate_backward(dy, x, small, k3, scale, shift, center, True)
            b = P.gate_backward(dy, x, small, k3, scale, shift, center, True)
            for t, u in zip(a, b):
                assert torch.equal(t, u)
            c = Q.gate_backward(*(t.cpu() for t in (dy, x, small, k3, scale, shift, center)), True)
            for t, u in zip(a, c):
                torch.testing.assert_close(t.cpu(), u, rtol=1e-4, atol=1e-4)
            m1, v1 = P.channel_stats(k3)
            m2, v2 = P.channel_stats(k3)
            assert torch.equal(m1, m2) and torch.equal(v1, v2)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the compiled CUDA kernels")
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_cuda_backend(requires_grad):
    x, small, k3, _, scale, shift, _ = make_inputs(SHAPES[0], device="cuda")

    def rg(t):
        return t.detach().clone().requires_grad_(requires_grad)

    with scnet_fused.backend("cuda"):
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate.default, (rg(x), rg(small), rg(k3), rg(scale), rg(shift)))
        C = SHAPES[0][1]
        torch.library.opcheck(torch.ops.scnet_fused.sc_gate_bn_train.default,
                              (rg(x), rg(small), rg(k3), rg(torch.rand(C, device="cuda") + 0.5),
                               rg(torch.randn(C, device="cuda")), 1e-5))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_saturated_gate_passes_no_gradient(channels_last):
    """Where sigmoid(x + up(small)) is 1 in float32 (z of 20 or more), torch's gate derivative
    s * (1 - s) is exactly 0: the fused backward gives exact zeros there too, however large k3 is (the
    AVX2 reciprocal once gave 1 - 2^-24 and a gradient of 0.06 at k3 = 1e6), and torch's values
    elsewhere. Rerun for every CPU build by test_cpu_isa."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(2, 20, 9, 11, generator=g) * 80 + 20).contiguous(memory_format=fmt)  # z in [20, 110)
    x[:, :, 0] = torch.randn(2, 20, 11, generator=g)  # and a row of ordinary values
    k3 = torch.full_like(x, 1e6)
    small = torch.rand(2, 20, 2, 2, generator=g)
    dy = torch.randn(x.shape, generator=g)
    with scnet_fused.backend("cpu"):
        leaves = [t.clone().requires_grad_() for t in (x, small)]
        scnet_fused.sc_gate(leaves[0], leaves[1], k3).backward(dy)
    ex, es = (t.clone().requires_grad_() for t in (x, small))
    (torch.sigmoid(ex + F.interpolate(es, size=x.shape[-2:], mode="nearest")) * k3).backward(dy)
    assert torch.equal(leaves[0].grad[:, :, 1:], torch.zeros_like(x[:, :, 1:]))
    assert torch.equal(ex.grad[:, :, 1:], torch.zeros_like(x[:, :, 1:]))
    torch.testing.assert_close(leaves[0].grad, ex.grad, rtol=1e-4, atol=1e-2)  # (k3 = 1e6 in the first row)
    torch.testing.assert_close(leaves[1].grad, es.grad, rtol=1e-4, atol=1e-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_on_a_one_pixel_pooled_map_is_the_same_per_plane(dtype):
    """On a 1x1 pooled map the NCHW pointwise kernels walk the planes as one flat array, a vector's
    lanes spanning planes: every plane must come out bit for bit as when it is computed alone (its own
    tensor: other lanes, other chunks), for the gate forward with and without per-channel affines and
    the BN gate's dk3 pass."""
    P = prims()
    for N, C, H, W in ((3, 7, 7, 7), (2, 9, 5, 6), (1, 20, 4, 5)):
        x, small, k3, dy, scale, shift, center = make_inputs((N, C, H, W, 1, 1), dtype=dtype)
        ss, st = torch.rand(C) + 0.5, torch.randn(C)
        calls = [
            lambda x, s, k, d, sl: P.gate_forward(x, s, k, scale[sl], shift[sl]),
            lambda x, s, k, d, sl: P.gate_forward(x, s, k, None, None),
            lambda x, s, k, d, sl: P.gate_forward(x, s, k, scale[sl], shift[sl], ss[sl], st[sl]),
            lambda x, s, k, d, sl: P.gate_backward_k3(d, x, s, k, scale[sl], shift[sl], center[sl]),
        ]
        for f in calls:
            whole = f(x, small, k3, dy, slice(None))
            for n in range(N):
                for c in range(C):
                    one = f(*(t[n:n + 1, c:c + 1].contiguous() for t in (x, small, k3, dy)), slice(c, c + 1))
                    assert torch.equal(one[0, 0], whole[n, c]), (N, C, H, W, n, c)


# (N, C, H, W, h, w) of the three NCHW kernel paths a gate forward can take on the CPU: a 1x1 pooled map
# (planes walked as one flat array), lane permutes, and the blocked path of large planes.
_SIGMOID_PATHS = [(2, 8, 7, 7, 1, 1), (2, 8, 25, 25, 6, 6), (1, 1, 203, 320, 50, 80)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", _SIGMOID_PATHS, ids=["x".join(map(str, s)) for s in _SIGMOID_PATHS])
def test_gate_sigmoid_accuracy_over_its_range(shape, channels_last):
    """The vectorized sigmoid of the CPU gate against float64 on z spread evenly over [-87, 87], through
    every layout and NCHW path, with and without k3's affine: within 2.5e-7 absolute and 5e-6 relative
    (about 4e-6 measured with the AVX-512 build near |z| = 87, from rounding -z * log2(e) to float;
    below 4e-7 for |z| < 5). Rerun for every CPU build by test_cpu_isa."""
    N, C, H, W, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    z = torch.linspace(-87.0, 87.0, N * C * H * W).reshape(N, C, H, W).contiguous(memory_format=fmt)
    small = torch.zeros(N, C, h, w)
    ones = torch.ones(N, C, H, W).contiguous(memory_format=fmt)
    want = torch.sigmoid(z.double())
    P = prims()
    for scale, shift in ((None, None), (torch.ones(C), torch.zeros(C))):
        got = P.gate_forward(z, small, ones, scale, shift).double()
        err = (got - want).abs()
        assert err.max().item() <= 2.5e-7, (scale is None, err.max().item())
        assert (err / want).max().item() <= 5e-6, (scale is None, (err / want).max().item())


def check_plain_gate_sign_of_zero(P, device="cpu"):
    """Without scale and shift the gate is k3 * s, as eager computes it: k3 = -0 gives -0. With k3's
    affine it is (k3 * scale + shift) * s, which for scale 1 and shift 0 turns -0 into +0, as eager's
    does. P: a backend's primitives; over the CPU kernels' NCHW paths (flat walk, permutes) and
    channels_last."""
    for N, C, H, W, h, w in _SIGMOID_PATHS[:2]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            g = torch.Generator().manual_seed(3)
            x = torch.randn(N, C, H, W, generator=g).contiguous(memory_format=fmt)
            small = torch.randn(N, C, h, w, generator=g)
            k3 = torch.full((N, C, H, W), -0.0).contiguous(memory_format=fmt)
            up = F.interpolate(small, size=(H, W), mode="nearest")
            want_plain = (k3 * torch.sigmoid(x + up)).signbit()
            want_affine = ((k3 * 1.0 + 0.0) * torch.sigmoid(x + up)).signbit()
            x, small, k3 = (t.to(device) for t in (x, small, k3))
            plain = P.gate_forward(x, small, k3, None, None).cpu()
            ones, zeros = torch.ones(C, device=device), torch.zeros(C, device=device)
            affine = P.gate_forward(x, small, k3, ones, zeros).cpu()
            assert torch.equal(plain.signbit(), want_plain) and want_plain.all(), (N, C, H, W, fmt)
            assert torch.equal(affine.signbit(), want_affine) and not want_affine.any(), (N, C, H, W, fmt)


def test_gate_without_affine_keeps_the_sign_of_zero():
    check_plain_gate_sign_of_zero(prims())


def check_gate_backward_without_sums(P, device="cpu", shapes=_SIGMOID_PATHS[:2]):
    """``gate_backward(..., need_sums=False)``: the same dx, dsmall and dk3 as with the sums, bit for
    bit, and empty sums; without an affine and with scale, shift and center, in both layouts. P: a
    backend's primitives; the default shapes take the CPU kernels' one-cell and many-cell permute paths."""
    for N, C, H, W, h, w in shapes:
        for fmt in (torch.contiguous_format, torch.channels_last):
            g = torch.Generator().manual_seed(5)
            x, k3, dy = (torch.randn(N, C, H, W, generator=g).contiguous(memory_format=fmt).to(device)
                         for _ in range(3))
            small = torch.randn(N, C, h, w, generator=g).to(device)
            affine = [(torch.rand(C, generator=g) + 0.5).to(device), torch.randn(C, generator=g).to(device),
                      torch.randn(C, generator=g).to(device)]
            for scale, shift, center in ((None, None, None), affine):
                full = P.gate_backward(dy, x, small, k3, scale, shift, center, True)
                bare = P.gate_backward(dy, x, small, k3, scale, shift, center, True, need_sums=False)
                where = (N, C, H, W, fmt, scale is None)
                for a, b in zip(full[:3], bare[:3]):
                    assert torch.equal(a, b), where
                assert full[3].shape == full[4].shape == (C,), where
                assert bare[3].numel() == 0 and bare[4].numel() == 0, where


def test_gate_backward_without_sums():
    check_gate_backward_without_sums(prims(), shapes=_SIGMOID_PATHS[:2] + SHAPES[-2:])
    check_gate_backward_without_sums(R)
