"""The device code of the CUDA kernels, run on the host CUDA model (csrc/emu/cuda_emu.h).

``tests/_cuda_emu.py`` compiles ``csrc/cuda/*.cu`` as C++ against the model (every block of a launch,
every thread of a block as a fiber, ``__syncthreads`` a real barrier, vector accesses checked for
alignment) into ops that take CPU tensors. Here they are checked like the CPU kernels: against the
reference in fp32, fp16 and bf16 over the irregular shapes and both layouts, with poisoned outputs;
against the CPU kernels for the pool and BatchNorm + ReLU ops; and with the model's knobs moving every
launch off its usual path (a capped grid for the grid-stride loops, 64-bit index math, threads and
blocks in reverse order), where the results must not change by a bit. What this cannot show (speed,
coalescing, warp behaviour, the nvcc-only code) is for the ``gpu``-marked tests on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import _cuda_emu as E
import test_cpu_kernels as K
from scnet_fused.ops._cpp import Primitives


@pytest.fixture(scope="module")
def emu():
    return E.primitives()


@pytest.fixture(scope="module")
def cpu():
    return Primitives("cpu")


@pytest.fixture(autouse=True)
def _default_model():
    E.configure()
    E.take_log()
    yield
    E.configure()


# ------------------------------------------------------------------------------------------------
# The model itself: it must expose the bugs it claims to.
# ------------------------------------------------------------------------------------------------


def test_model_barrier_orders_shared_memory():
    ops = E.load_library()
    a = torch.arange(3 * 256, dtype=torch.float32).view(3, 256)
    torch.testing.assert_close(ops._emu_selftest_reverse(a, True), a.flip(1), rtol=0, atol=0)
    for reverse in (False, True):
        E.configure(reverse=reverse)
        ops._emu_selftest_reverse(a + 1000.0, True)  # leaves other values in the shared buffer
        # without the barrier, a thread reads its partner's slot before the partner wrote it
        assert not torch.equal(ops._emu_selftest_reverse(a, False), a.flip(1))


def test_model_rejects_misaligned_vectors_and_bad_launches():
    ops = E.load_library()
    v = torch.arange(17, dtype=torch.float32)
    out = ops._emu_selftest_pack_copy(v[:16].clone(), 0)
    torch.testing.assert_close(out, torch.arange(16, dtype=torch.float32), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="misaligned 16-byte load"):
        ops._emu_selftest_pack_copy(v, 1)
    ops._emu_selftest_launch(2, 65535, 1, 1)
    ops._emu_selftest_launch(1, 2, 3, 1024)
    with pytest.raises(RuntimeError, match="invalid grid"):
        ops._emu_selftest_launch(1, 65536, 1, 1)
    with pytest.raises(RuntimeError, match="invalid grid"):
        ops._emu_selftest_launch(0, 1, 1, 1)
    with pytest.raises(RuntimeError, match="invalid block"):
        ops._emu_selftest_launch(1, 1, 1, 1025)
    log = E.take_log()
    assert any("empty_kernel" in k for k in log) and any("pack_copy_kernel" in k for k in log)


# ------------------------------------------------------------------------------------------------
# Gate primitives against the reference (the CPU kernels' checks, run on the emulated CUDA kernels)
# ------------------------------------------------------------------------------------------------


def test_gate_fp32_matches_reference(emu):
    K.check_fp32("cpu", emu)
    names = E.take_log()
    # every family of the gate file ran, vectorized and scalar, NCHW and NHWC
    for k in ("pointwise_kernel<float, unsigned int, false, 1>", "pointwise_kernel<float, unsigned int, false, 4>",
              "pointwise_kernel<float, unsigned int, true, 1>", "pointwise_kernel<float, unsigned int, true, 4>",
              "backward_cells_kernel<float, unsigned int, false, 1>",
              "backward_cells_kernel<float, unsigned int, true, 1>",
              "backward_cells_kernel<float, unsigned int, true, 4>",
              "backward_cells_kernel<float, unsigned int, false, 4>",  # NCHW runs of 4 (56 -> 14)
              "channel_sum_kernel",
              "stats_nchw_kernel<float, 1>", "stats_nchw_kernel<float, 4>", "stats_nhwc_kernel<float>",
              "stats_nhwc_pack_kernel<float, 4>",
              "stats_finalize_kernel<float>"):
        assert f"scnet_fused::cuda::{k}" in names, f"{k} never launched: {sorted(names)}"


def test_gate_without_affine_keeps_the_sign_of_zero(emu):
    K.check_plain_gate_sign_of_zero(emu)


def test_gate_backward_without_sums(emu):
    K.check_gate_backward_without_sums(emu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gate_low_precision_matches_reference(emu, dtype):
    K.check_lowp("cpu", dtype, emu)
    T = {torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}[dtype]
    names = E.take_log()
    assert f"scnet_fused::cuda::pointwise_kernel<{T}, unsigned int, true, 8>" in names, sorted(names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_backward_nchw_runs_of_four_match_the_one_element_path(emu, dtype):
    """NCHW maps whose column runs are all 4 long (12 -> 3 here, 56 -> 14 in SCNet-50) take the
    backward with a cell row as one Pack; the same data at a misaligned address takes the one-element
    path. Every output is the same to the bit."""
    shape = (2, 5, 8, 12)
    g = torch.Generator().manual_seed(3)
    vals = [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]
    small = torch.randn(2, 5, 2, 3, generator=g).to(dtype)
    scale, shift, center = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g), torch.randn(5, generator=g)
    outs = {}
    for layout in ("contiguous", "misaligned"):
        dy, x, k3 = (_placed(v, layout) for v in vals)
        E.take_log()
        outs[layout] = emu.gate_backward(dy, x, small, k3, scale, shift, center, True)
        names = E.take_log()
        T = _CPP_T[dtype]
        width = 4 if layout == "contiguous" else 1
        assert f"scnet_fused::cuda::backward_cells_kernel<{T}, unsigned int, false, {width}>" in names, sorted(names)
    for a, b in zip(outs["contiguous"], outs["misaligned"]):
        assert torch.equal(a, b)


def test_gate_channel_sums_cross_planes_inside_a_thread_step(emu, cpu):
    """The backward's per-channel sums walk N * h * w cell partials a block step (256) at a time: with
    small maps of 9, 196 and 42 cells and several images, a thread's next partial lies one or many
    planes on. The sums match the CPU kernels'."""
    for shape in [(40, 2, 6, 6, 3, 3), (5, 3, 28, 28, 14, 14), (9, 2, 56, 14, 14, 3)]:
        x, small, k3, dy, scale, shift, center = K.make_inputs(shape, seed=4)
        got = emu.gate_backward(dy, x, small, k3, scale, shift, center, True)
        want = cpu.gate_backward(dy, x, small, k3, scale, shift, center, True)
        assert shape[0] * shape[4] * shape[5] > 256
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "scnet_fused::cuda::channel_sum_kernel" in E.take_log()


def test_gate_clear_errors(emu):
    x, small, k3, dy, scale, shift, center = K.make_inputs(K.SHAPES[0])
    with pytest.raises(RuntimeError, match="4-D"):
        emu.gate_forward(x[0], small, k3, None, None)
    with pytest.raises(RuntimeError, match="C="):
        emu.gate_forward(x, small, k3, scale[:-1], None)
    with pytest.raises(RuntimeError, match="x's shape"):
        emu.gate_backward(dy[:, :, 1:], x, small, k3, scale, shift, center, True)
    assert not E.take_log(), "a kernel ran before the arguments were checked"


# ------------------------------------------------------------------------------------------------
# Pool and BatchNorm + ReLU kernels against the CPU kernels
# ------------------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "channels_last", "misaligned", "misaligned_cl"]
POOL_SHAPES = [(2, 3, 8, 8, 4), (2, 5, 14, 14, 4), (1, 4, 7, 9, 4), (2, 3, 11, 10, 3), (1, 16, 9, 13, 2),
               (1, 8, 12, 12, 4), (2, 3, 4, 6, 1)]
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
_CPP_T = {torch.float32: "float", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}


def _tensor(shape, dtype, layout, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * scale + offset).to(dtype)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout.startswith("misaligned"):  # dense, but the data pointer one element past 16-byte alignment
        buf = torch.empty(t.numel() + 1, dtype=dtype)[1:]
        N, C, H, W = shape
        view = buf.view(N, H, W, C).permute(0, 3, 1, 2) if layout.endswith("_cl") else buf.view(shape)
        view.copy_(t)
        return view
    return t


def _placed(t, layout):
    """t's values, dense NCHW, at an aligned address ("contiguous") or one element past it ("misaligned")."""
    if layout == "contiguous":
        return t.contiguous()
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    view = buf.view(t.shape)
    view.copy_(t)
    return view


def _close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_avgpool_matches_cpu_kernels(emu, cpu, dtype, layout):
    for shape in POOL_SHAPES:
        N, C, H, W, r = shape
        x = _tensor((N, C, H, W), dtype, layout)
        y = emu.avgpool(x, r)
        _close(y, cpu.avgpool(x, r), dtype)
        assert not torch.isnan(y).any()
        cl = layout in ("channels_last", "misaligned_cl")
        dy = _tensor((N, C, H // r, W // r), dtype, layout, seed=1)
        dx = emu.avgpool_backward(dy, H, W, r, cl)
        _close(dx, cpu.avgpool_backward(dy, H, W, r, cl), dtype)
        assert dx.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    # (a vector access at a misaligned address would have raised: the model checks every one)
    names = E.take_log()
    if layout == "misaligned_cl":
        assert any("avgpool_fwd_kernel" in k and k.endswith("true, 1>") for k in names)
    # NCHW at r = 4 with W a multiple of 4 (8x8, 12x12 here): a window row as one Pack of 4
    row_vec = f"scnet_fused::cuda_pool::avgpool_fwd_kernel<{_CPP_T[dtype]}, unsigned int, false, 4>"
    assert (row_vec in names) == (layout == "contiguous"), sorted(names)


BN_SHAPES = [(3, 5, 7, 6), (2, 16, 14, 13), (4, 3, 1, 1), (1, 9, 25, 7), (2, 40, 9, 5), (2, 8, 4, 6), (1, 24, 5, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_relu_matches_cpu_kernels(emu, cpu, dtype, layout):
    for i, shape in enumerate(BN_SHAPES):
        C = shape[1]
        t = _tensor(shape, dtype, layout, seed=i, scale=2.0, offset=0.3)
        dy = _tensor(shape, dtype, layout, seed=i + 10)
        scale, shift, center, p, q, r = (torch.randn(C, generator=torch.Generator().manual_seed(20 + k))
                                         for k in range(6))
        y = emu.affine_relu(t, scale, shift)
        _close(y, cpu.affine_relu(t, scale, shift), dtype)
        # with a residual inside the ReLU (in the layout, and in the other one: read in t's)
        res = _tensor(shape, dtype, layout, seed=i + 30)
        for rr in (res, res.contiguous(memory_format=torch.channels_last if res.is_contiguous()
                                       else torch.contiguous_format)):
            ya = emu.affine_add_relu(t, rr, scale, shift)
            _close(ya, cpu.affine_add_relu(t, rr, scale, shift), dtype)
            assert ya.stride() == y.stride()
        for a, b in zip(emu.affine_relu_backward_sums(dy, t, scale, shift, center),
                        cpu.affine_relu_backward_sums(dy, t, scale, shift, center)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        _close(emu.affine_relu_backward_apply(dy, t, scale, shift, p, q, r),
               cpu.affine_relu_backward_apply(dy, t, scale, shift, p, q, r), dtype)
        # the output written into a channel slice of a wider buffer (a half of a concatenation)
        cl = layout in ("channels_last", "misaligned_cl")
        fmt = torch.channels_last if cl else torch.contiguous_format
        buf = torch.full((shape[0], C + 7, *shape[2:]), 5.0, dtype=dtype).contiguous(memory_format=fmt)
        emu.affine_relu_out(t, scale, shift, buf[:, 3:3 + C])
        _close(buf[:, 3:3 + C], y, dtype)
        assert torch.all(buf[:, :3] == 5.0) and torch.all(buf[:, 3 + C:] == 5.0)
        # and the backward reading dy as such a slice, in place
        wide = torch.randn(shape[0], C + 5, *shape[2:]).to(dtype).contiguous(memory_format=fmt)
        dys = wide[:, 2:2 + C]
        dense = dys.contiguous(memory_format=fmt)
        for a, b in zip(emu.affine_relu_backward_sums(dys, t, scale, shift, center),
                        cpu.affine_relu_backward_sums(dense, t, scale, shift, center)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        _close(emu.affine_relu_backward_apply(dys, t, scale, shift, p, q, r),
               cpu.affine_relu_backward_apply(dense, t, scale, shift, p, q, r), dtype)
        # the halves of a two-branch concatenation (pitch 2C; the second half 16-byte aligned when C is a
        # multiple of the vector): written and read in place, vectorized where the layout allows
        halves = torch.full((shape[0], 2 * C, *shape[2:]), 5.0, dtype=dtype).contiguous(memory_format=fmt)
        emu.affine_relu_out(t, scale, shift, halves[:, C:])
        _close(halves[:, C:], y, dtype)
        assert torch.all(halves[:, :C] == 5.0)
        dyh = torch.randn(shape[0], 2 * C, *shape[2:]).to(dtype).contiguous(memory_format=fmt)[:, C:]
        _close(emu.affine_relu_backward_apply(dyh, t, scale, shift, p, q, r),
               cpu.affine_relu_backward_apply(dyh.contiguous(memory_format=fmt), t, scale, shift, p, q, r), dtype)
        for a, b in zip(emu.affine_relu_backward_sums(dyh, t, scale, shift, center),
                        cpu.affine_relu_backward_sums(dyh.contiguous(memory_format=fmt), t, scale, shift, center)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # 16-byte vectors (4 floats, 8 halves) where every pointer is aligned and a vector stays in one
    # channel (NCHW) or one position (NHWC); one element per thread otherwise. (A vector access at a
    # misaligned address would have raised: the model checks every one.)
    log = E.take_log()
    names = [k for k in log if "cuda_bn_relu::pointwise_kernel" in k]
    nhwc = "true" if layout in ("channels_last", "misaligned_cl") else "false"
    v = 4 if dtype == torch.float32 else 8
    # the NCHW sums: a Pack of t and of dy (dy a channel slice too) where H * W is a multiple of it
    # (4 x 6 and 5 x 8 here), one value otherwise (and for the shapes dense in both layouts, as 4x3x1x1)
    sums = f"scnet_fused::cuda_bn_relu::sums_kernel<{_CPP_T[dtype]}, "
    assert (sums + f"{v}>" in log) == (layout == "contiguous"), sorted(log)
    assert nhwc == "true" or sums + "1>" in log, sorted(log)
    # the NHWC sums: a Pack of V channels where C (16, 40, 8, 24 here) and dy's pitch are multiples of it
    # and both are aligned; one channel a thread otherwise (C = 5, 3, 9; dy a misaligned slice)
    pack = f"scnet_fused::cuda_bn_relu::sums_nhwc_pack_kernel<{_CPP_T[dtype]}, {v}>"
    assert (pack in log) == (layout == "channels_last"), sorted(log)
    assert (f"scnet_fused::cuda_bn_relu::sums_nhwc_kernel<{_CPP_T[dtype]}>" in log) == (nhwc == "true"), sorted(log)
    for apply in ("true", "false"):
        for width in (1, v):
            k = f"scnet_fused::cuda_bn_relu::pointwise_kernel<{_CPP_T[dtype]}, unsigned int, {nhwc}, {apply}, {width}>"
            assert (k in names) == (width == 1 or not layout.startswith("misaligned")), (k, sorted(names))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_stats_match_cpu_kernels(emu, cpu, dtype, layout):
    """Per-channel mean and biased variance against the CPU kernels (which add in double), over the BN
    shapes; NCHW reads a 16-byte Pack a step where H * W is a multiple of it and t is aligned."""
    for i, shape in enumerate(BN_SHAPES + [(3, 4, 16, 16), (1, 2, 2, 2)]):
        t = _tensor(shape, dtype, layout, seed=i, scale=3.0, offset=1.5)
        for a, b in zip(emu.channel_stats(t), cpu.channel_stats(t)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    log = E.take_log()
    v = 4 if dtype == torch.float32 else 8
    nhwc = layout in ("channels_last", "misaligned_cl")
    stats = f"scnet_fused::cuda::stats_nchw_kernel<{_CPP_T[dtype]}, "
    assert (stats + f"{v}>" in log) == (layout == "contiguous"), sorted(log)
    assert nhwc or stats + "1>" in log, sorted(log)
    # NHWC: a Pack of V channels a step where C is a multiple of it and t is aligned; one channel a thread
    # for C = 5, 3, 9 and for every C when misaligned
    pack = f"scnet_fused::cuda::stats_nhwc_pack_kernel<{_CPP_T[dtype]}, {v}>"
    assert (pack in log) == (layout == "channels_last"), sorted(log)
    assert (f"scnet_fused::cuda::stats_nhwc_kernel<{_CPP_T[dtype]}>" in log) == nhwc, sorted(log)


def _reductions_match(emu, cpu, t, dy):
    """Channel statistics of t and BatchNorm + ReLU sums of (t, dy), host model against CPU kernels."""
    C = t.shape[1]
    scale, shift, center = torch.rand(C) + 0.5, torch.randn(C), torch.randn(C)
    for a, b in zip(emu.channel_stats(t), cpu.channel_stats(t)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(emu.affine_relu_backward_sums(dy, t, scale, shift, center),
                    cpu.affine_relu_backward_sums(dy, t, scale, shift, center)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nhwc_pack_reductions_over_groups_and_chunks(emu, cpu, dtype):
    """The NHWC reductions by Packs of V channels: G = C / V channel groups a position, 256 // G lanes of
    positions a block (G = 1, 3, 256: idle threads when G does not divide 256), several chunks of
    positions; past 256 groups (C = 1032 floats, 2064 halves) one channel a thread. Statistics and
    BatchNorm + ReLU sums match the CPU kernels."""
    v = 4 if dtype == torch.float32 else 8
    T = _CPP_T[dtype]
    for i, (N, G, H, W) in enumerate([(40, 1, 16, 16), (30, 3, 12, 10), (2, 256, 2, 3), (3, 258, 2, 2)]):
        shape = (N, G * v, H, W)
        t = _tensor(shape, dtype, "channels_last", seed=i, scale=2.0, offset=0.7)
        dy = _tensor(shape, dtype, "channels_last", seed=i + 5)
        _reductions_match(emu, cpu, t, dy)
        log = E.take_log()
        packed = G <= 256
        assert (f"scnet_fused::cuda::stats_nhwc_pack_kernel<{T}, {v}>" in log) == packed, sorted(log)
        assert (f"scnet_fused::cuda_bn_relu::sums_nhwc_pack_kernel<{T}, {v}>" in log) == packed, sorted(log)
        assert (f"scnet_fused::cuda::stats_nhwc_kernel<{T}>" in log) != packed, sorted(log)


def test_nchw_sums_cross_planes_inside_a_thread_step(emu, cpu):
    """Planes far smaller than a block's step (H * W = 4: a thread's next vector is 64 planes on, one
    value per plane as a Pack of 4 floats) and chunks that end inside a plane: the walk from plane to
    plane by addition gives the CPU kernels' sums."""
    for shape in [(300, 3, 2, 2), (1000, 2, 1, 1), (257, 5, 4, 1), (90, 2, 8, 9)]:
        t = _tensor(shape, torch.float32, "contiguous", seed=1, scale=2.0, offset=0.3)
        dy = _tensor(shape, torch.float32, "contiguous", seed=2)
        _reductions_match(emu, cpu, t, dy)
    log = E.take_log()
    assert "scnet_fused::cuda::stats_nchw_kernel<float, 4>" in log and "scnet_fused::cuda::stats_nchw_kernel<float, 1>" in log
    assert "scnet_fused::cuda_bn_relu::sums_kernel<float, 4>" in log


def test_bn_relu_vectors_with_misaligned_channel_vectors(emu, cpu):
    """Per-channel vectors that are views one float past 16-byte alignment: the NHWC vector kernels
    read them as float4 packs (the model checks each), so the launcher copies them first."""
    t = _tensor((2, 8, 3, 5), torch.float32, "channels_last", scale=2.0, offset=0.3)
    dy = _tensor((2, 8, 3, 5), torch.float32, "channels_last", seed=1)
    vecs = [torch.randn(9)[1:] for _ in range(6)]  # each a view one float into its own buffer
    scale, shift, center, p, q, r = vecs
    assert all(v.data_ptr() % 16 for v in vecs)
    _close(emu.affine_relu(t, scale, shift), cpu.affine_relu(t, scale, shift), torch.float32)
    _close(emu.affine_relu_backward_apply(dy, t, scale, shift, p, q, r),
           cpu.affine_relu_backward_apply(dy, t, scale, shift, p, q, r), torch.float32)
    assert "scnet_fused::cuda_bn_relu::pointwise_kernel<float, unsigned int, true, true, 4>" in E.take_log()


@pytest.mark.parametrize("channels_last", [False, True])
def test_affine_relu_out_one_channel_into_the_other_layout(emu, cpu, channels_last):
    """A one-channel t is dense in both layouts: it is written into a slice of a buffer in either."""
    t = torch.randn(2, 1, 7, 3)
    scale, shift = torch.rand(1) + 0.5, torch.randn(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    buf = torch.full((2, 4, 7, 3), 5.0).contiguous(memory_format=fmt)
    emu.affine_relu_out(t, scale, shift, buf[:, 2:3])
    _close(buf[:, 2:3], cpu.affine_relu(t, scale, shift), torch.float32)
    assert torch.all(buf[:, :2] == 5.0) and torch.all(buf[:, 3:] == 5.0)


# ------------------------------------------------------------------------------------------------
# Off the usual path: capped grids, 64-bit indices, reversed order. Bit-identical results.
# ------------------------------------------------------------------------------------------------


def _run_all(P, dtype, cl):
    shape = (2, 16, 28, 20, 7, 5)
    x, small, k3, dy, scale, shift, center = K.make_inputs(shape, dtype=dtype, channels_last=cl)
    outs = [P.gate_forward(x, small, k3, scale, shift), P.gate_backward_k3(dy, x, small, k3, scale, shift, center)]
    outs += [t for t in P.gate_backward(dy, x, small, k3, scale, shift, center, True)]
    outs += list(P.channel_stats(k3))
    pooled = P.avgpool(x, 4)
    outs += [pooled, P.avgpool_backward(pooled, 28, 20, 4, cl)]
    outs += [P.affine_relu(k3, scale, shift), P.affine_relu_backward_apply(dy, k3, scale, shift, shift, center, scale)]
    outs += list(P.affine_relu_backward_sums(dy, k3, scale, shift, center))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_results_do_not_depend_on_launch_geometry_or_order(emu, dtype, cl):
    base = _run_all(emu, dtype, cl)
    assert all("unsigned int" in k for k in E.take_log() if "<" in k and "int" in k)
    for knobs in (dict(max_blocks=1), dict(max_blocks=3, reverse=True), dict(index64=True),
                  dict(index64=True, max_blocks=2)):
        E.configure(**knobs)
        got = _run_all(emu, dtype, cl)
        names = E.take_log()
        if knobs.get("index64"):
            assert any("long int" in k for k in names) and not any("unsigned int" in k for k in names), sorted(names)
        for i, (a, b) in enumerate(zip(base, got)):
            assert torch.equal(a, b), f"output {i} changed under {knobs}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_stats_of_a_square_that_overflows(emu, cpu, layout):
    """A finite value of 3e19 (its float32 square overflows): variance +inf and a finite mean, as the CPU
    kernels and ATen give, not the NaN of a channel holding a NaN or an infinity (which stays NaN)."""
    t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t[1, 0, 2, 2] = 3e19
    t[0, 2, 1, 1] = float("inf")
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    mean, var = emu.channel_stats(t)
    cmean, cvar = cpu.channel_stats(t)
    assert float(var[0]) == float(cvar[0]) == float("inf")
    torch.testing.assert_close(mean[:2], cmean[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var[1], cvar[1], rtol=1e-5, atol=1e-5)
    assert bool(var[2].isnan()) and bool(cvar[2].isnan()) and bool(mean[2].isnan())
