"""The Triton launchers' host side: the tensors' device made current for the launch, the launch grid
checked against CUDA's limits before anything runs (and ``auto``'s fallback past them), the 64-bit
offset path of the BatchNorm + ReLU kernels (run on small tensors by lowering the threshold), and the
gate's cached index tables (never freed; made by device ops during a graph capture)."""

import contextlib
import os

import pytest
import torch

pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from scnet_fused import reference as ref  # noqa: E402
from scnet_fused.triton import _common, sc_bn_relu, sc_gate as tg  # noqa: E402

from _util import interpreter_broken  # noqa: E402

if interpreter_broken():
    pytest.skip(interpreter_broken(), allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_every_primitive_launches_on_its_tensors_device():
    launchers = [n for n in tg.__all__ if n not in ("aot_kernels", "kernel_options")]
    assert len(launchers) == 11
    for name in launchers:
        fn = getattr(tg, name)
        assert getattr(fn, "on_tensor_device", False), f"{name} launches on whatever device is current"


class _OnCudaOne(torch.Tensor):
    """A CPU tensor that says it is on cuda:1 (what the guard looks at)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


def _recording_guard(monkeypatch, current: int):
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    return entered


def test_guard_makes_the_first_tensors_device_current(monkeypatch):
    seen = []
    fn = _common.on_tensor_device(lambda *a, **k: seen.append((a, k)) or "result")
    t = torch.zeros(2).as_subclass(_OnCudaOne)
    entered = _recording_guard(monkeypatch, current=0)
    assert fn(3, t, scale=None) == "result"
    assert entered == [torch.device("cuda", 1)] and len(seen) == 1

    entered = _recording_guard(monkeypatch, current=1)  # already current: no switch
    assert fn(t) == "result" and entered == []
    entered = _recording_guard(monkeypatch, current=0)  # CPU tensors (the interpreter): no switch
    assert fn(torch.zeros(2), t) == "result" and entered == []


def test_grid_limits_are_checked_before_the_launch(monkeypatch):
    assert _common.check_grid("op", (5, 65535, 1), "x") == (5, 65535, 1)
    with pytest.raises(ValueError, match=r"op: a thing needs 65536 programs along axis 2 .* than CUDA's 65535"):
        _common.check_grid("op", (1, 1, 65536), "a thing")
    with pytest.raises(ValueError, match="axis 0"):
        _common.check_grid("op", (2 ** 31,), "a thing")
    assert _common.check_grid("op", (0, 70000, 1), "x") == (0, 70000, 1)  # empty: nothing is launched
    # An empty batch of many channels still gives empty outputs (its grid has an empty axis).
    e = torch.empty(0, 140000, 128, 128, device=DEVICE)
    es = torch.empty(0, 140000, 4, 4, device=DEVICE)
    assert tg.gate_forward(e, es, e, None, None).shape == e.shape
    assert tg.gate_backward_k3(e, e, es, e, *(torch.ones(140000, device=DEVICE),) * 3).shape == e.shape
    # The launchers apply them: with the limits lowered, a launch that needs two programs on axis 1
    # is refused with the input named, and no output is written.
    monkeypatch.setattr(_common, "_GRID_LIMITS", (2 ** 31 - 1, 1, 1))
    x = torch.randn(1, 200, 8, 8, device=DEVICE)
    small = torch.randn(1, 200, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"sc_gate: an input of shape \(1, 200, 8, 8\) with a pooled map 2x2"):
        tg.gate_forward(x, small, x, None, None)
    with pytest.raises(ValueError, match="channel_stats: a tensor of 200 channels"):
        tg.channel_stats(x)
    with pytest.raises(ValueError, match="affine_relu_backward_sums: a tensor of 200 channels"):
        v = torch.ones(200, device=DEVICE)
        sc_bn_relu.affine_relu_backward_sums(x, x, v, v, v)


class _LaunchRecorder:
    """Stands in for a kernel: records each launch's keyword arguments and launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_position_chunk_kernels_go_64_bit_before_their_loop_counters_wrap(monkeypatch, channels_last):
    """The statistics and BatchNorm-sums kernels walk (n, h, w) positions in chunks; the last program's
    chunk end and loop counter run past N*H*W by up to a chunk and a block. With the 32-bit limit just
    above the tensor's elements (a single-channel tensor just under 2**31, scaled down) both take the
    64-bit path, and give the reference's values."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(5)
    t, dy = (torch.randn(3, 1, 20, 24, generator=g).to(DEVICE).contiguous(memory_format=fmt) for _ in range(2))
    for module in (tg, sc_bn_relu):
        monkeypatch.setattr(module, "INT32_LIMIT", t.numel() + 1)
    stats = _LaunchRecorder(tg._channel_stats_kernel)
    sums = _LaunchRecorder(sc_bn_relu._affine_relu_sums_kernel)
    monkeypatch.setattr(tg, "_channel_stats_kernel", stats)
    monkeypatch.setattr(sc_bn_relu, "_affine_relu_sums_kernel", sums)
    mean, var = tg.channel_stats(t)
    torch.testing.assert_close(mean, t.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, t.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    v = torch.randn(1, generator=g).to(DEVICE)
    got = sc_bn_relu.affine_relu_backward_sums(dy, t, v, v, v)
    for u, w in zip(got, ref.affine_relu_backward_sums(dy, t, v, v, v)):
        torch.testing.assert_close(u, w.float(), rtol=1e-5, atol=1e-4)
    assert [k["BIG"] for k in stats.launches] == [True] and [k["BIG"] for k in sums.launches] == [True]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bn_relu_int64_offsets_path(monkeypatch, channels_last):
    """The 64-bit index path of the BatchNorm + ReLU kernels (taken at 2**31 elements), on a small
    tensor: the same values as the reference backend, dense and through a channel slice."""
    monkeypatch.setattr(sc_bn_relu, "INT32_LIMIT", 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(3)
    N, C, H, W = 2, 5, 7, 6
    t, dy, res = (torch.randn(N, C, H, W, generator=g).to(DEVICE).contiguous(memory_format=fmt) for _ in range(3))
    scale, shift, center, p, q, r = (torch.randn(C, generator=g).to(DEVICE) for _ in range(6))
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sc_bn_relu.affine_relu(t, scale, shift), ref.affine_relu(t, scale, shift), **close)
    torch.testing.assert_close(sc_bn_relu.affine_add_relu(t, res, scale, shift),
                               ref.affine_add_relu(t, res, scale, shift), **close)
    buf = torch.full((N, C + 3, H, W), float("nan"), device=DEVICE).contiguous(memory_format=fmt)
    sc_bn_relu.affine_relu_out(t, scale, shift, buf[:, 1:C + 1])
    torch.testing.assert_close(buf[:, 1:C + 1], ref.affine_relu(t, scale, shift), **close)
    assert buf[:, 0].isnan().all() and buf[:, C + 1:].isnan().all()
    wide = torch.randn(N, C + 4, H, W, generator=g).to(DEVICE).contiguous(memory_format=fmt)
    for d in (dy, wide[:, 2:C + 2]):
        got = sc_bn_relu.affine_relu_backward_sums(d, t, scale, shift, center)
        want = ref.affine_relu_backward_sums(d, t, scale, shift, center)
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v.float(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sc_bn_relu.affine_relu_backward_apply(d, t, scale, shift, p, q, r),
                                   ref.affine_relu_backward_apply(d, t, scale, shift, p, q, r), **close)


def test_cell_tables_made_by_device_ops_match_the_host_tables():
    """The tables a CUDA graph capture gets (device ops, no host copy) equal the host-made ones."""
    import numpy as np

    from scnet_fused import _index

    sizes = [(H, h) for H in range(1, 70) for h in range(1, H + 1)]
    sizes += [(1000, 999), (4097, 13), (65536, 7), (100003, 4099), (2 ** 20 + 1, 3)]
    for H, h in sizes:
        got = _index._tables_on_device(H, 5, h, 2, "cpu")
        want = np.concatenate([_index._starts_np(H, h), _index._starts_np(5, 2)])
        assert got.dtype == torch.int32 and np.array_equal(got.numpy(), want), (H, h)


def test_cell_tables_cached_tables_are_never_freed(monkeypatch):
    """A cached table stays alive (kernels on other streams and captured graphs may read it): past the
    cache's size, new sizes get a table of their own; while a stream captures, a missing table is made by
    device ops and not cached, a cached one is reused."""
    from scnet_fused import _index

    monkeypatch.setattr(_index, "_TABLE_CACHE", {})
    monkeypatch.setattr(_index, "_TABLE_CACHE_MAX", 2)
    a, b = _index.cell_tables(8, 8, 2, 2, "cpu"), _index.cell_tables(9, 9, 2, 2, "cpu")
    c = _index.cell_tables(10, 10, 3, 3, "cpu")
    assert _index.cell_tables(8, 8, 2, 2, "cpu") is a and _index.cell_tables(9, 9, 2, 2, "cpu") is b
    assert len(_index._TABLE_CACHE) == 2 and _index.cell_tables(10, 10, 3, 3, "cpu") is not c
    assert c.tolist() == [0, 4, 7, 10, 0, 4, 7, 10]
    monkeypatch.setattr(_index, "_TABLE_CACHE", {})
    monkeypatch.setattr(_index, "_capturing", lambda device: True)
    made = []
    monkeypatch.setattr(_index, "_tables_on_device", lambda *a: made.append(a) or torch.zeros(1))
    _index.cell_tables(8, 8, 2, 2, "cpu")
    assert made == [(8, 8, 2, 2, torch.device("cpu"))] and _index._TABLE_CACHE == {}
    _index._TABLE_CACHE[(8, 8, 2, 2, "cpu")] = a
    assert _index.cell_tables(8, 8, 2, 2, "cpu") is a and len(made) == 1


def test_auto_runs_a_call_past_the_grid_limits_on_the_next_backend(monkeypatch):
    """Under ``auto`` a Triton launch refused for its grid runs that call on the next backend in the
    order (one warning); the Triton backend stays selected for the next call. (A forced backend is not
    wrapped: the error reaches the caller, as the grid test above shows.)"""
    import warnings

    from scnet_fused.ops import _dispatch

    calls = []

    class Triton:
        @staticmethod
        def gate_forward(x):
            if x > 1:
                raise _common.GridLimitError("sc_gate: too many programs")
            calls.append(("triton", x))
            return "triton"

    class Cuda:
        @staticmethod
        def gate_forward(x):
            calls.append(("cuda", x))
            return "cuda"

    from scnet_fused.ops import _cpp

    real_load = _dispatch._load
    monkeypatch.setattr(_dispatch, "_load", lambda name: Cuda if name == "cuda" else real_load(name))
    monkeypatch.setattr(_cpp, "cuda_device_problem", lambda device: None)  # a GPU the kernels load on
    monkeypatch.setattr(_dispatch, "_warned", set())
    wrapped = _dispatch._DropOnCompileError("triton", Triton, torch.device("cuda"), torch.float32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert wrapped.gate_forward(5) == "cuda" and wrapped.gate_forward(6) == "cuda"
    assert wrapped.gate_forward(1) == "triton"
    assert calls == [("cuda", 5), ("cuda", 6), ("triton", 1)]
    assert len(seen) == 1 and "this call runs on the cuda backend" in str(seen[0].message)
    assert not isinstance(_dispatch._module_cache.get("triton"), str)  # not dropped
