"""relu_cat(a, b) = cat([relu(a), relu(b)], 1), each ReLU writing its half of one buffer: the
bottleneck's branch ends outside training. Two eager paths (the C++ autograd op ``_relu_cat_ag`` and
the torch.library op ``scnet_fused::relu_cat``) against ReLU + cat, bit for bit."""

import pytest
import torch

from scnet_fused.ops import _cpp, _dispatch
from scnet_fused.ops.relu_cat import relu_cat

PATHS = ["library"] + (["cpp"] if _cpp.has_glue_ops() else [])


def _path(monkeypatch, path):
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", "1" if path == "cpp" else "0")


def _inputs(layout, dtype, n=2):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 3, 5, 6, generator=g).to(dtype)
    b = torch.randn(n, 4, 5, 6, generator=g).to(dtype)
    if n:  # NaN, +-inf, -0.0 and exact zeros: ReLU's forward and backward conventions
        a[0, 0, 0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0]).to(dtype)
        b[-1, 3, 4, :2] = torch.tensor([float("nan"), 0.0]).to(dtype)
    if layout == "channels_last":
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    elif layout == "strided":  # non-contiguous views in neither format
        a, b = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (a, b))
    return a, b


def _events(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events() if e.name.startswith("scnet_fused::")}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_relu_then_cat(monkeypatch, path, layout, dtype):
    _path(monkeypatch, path)
    a, b = _inputs(layout, dtype)
    la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
    out, names = _events(lambda: relu_cat(la, lb))
    assert ("scnet_fused::_relu_cat_ag" in names) == (path == "cpp")
    assert ("scnet_fused::relu_cat" in names) == (path == "library")
    ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
    expected = torch.cat([torch.relu(ra), torch.relu(rb)], 1)
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                             else torch.contiguous_format)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(out), torch.signbit(expected))  # -0.0 stays -0.0, as ReLU keeps it
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ga, gb = torch.autograd.grad(out, (la, lb), dy)
    ea, eb = torch.autograd.grad(expected, (ra, rb), dy)
    for got, want, like in ((ga, ea, a), (gb, eb, b)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # NaN outputs pass the gradient, zeros do not
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)


@pytest.mark.parametrize("path", PATHS)
def test_empty_batch_no_grad_and_inference_mode(monkeypatch, path):
    _path(monkeypatch, path)
    a, b = _inputs("contiguous", torch.float32, n=0)
    out = relu_cat(a.requires_grad_(), b.requires_grad_())
    assert out.shape == (0, 7, 5, 6)
    ga, gb = torch.autograd.grad(out, (a, b), torch.ones_like(out))
    assert ga.shape == a.shape and gb.shape == b.shape
    a, b = _inputs("channels_last", torch.float32)
    expected = torch.cat([torch.relu(a), torch.relu(b)], 1)
    with torch.inference_mode():
        torch.testing.assert_close(relu_cat(a, b), expected, rtol=0, atol=0, equal_nan=True)
    with torch.no_grad():
        assert not relu_cat(a.requires_grad_(), b).requires_grad


@pytest.mark.parametrize("path", PATHS)
def test_double_backward_as_relu_and_cat(monkeypatch, path):
    """A backward with create_graph stays attached to the upstream gradient (the derivative is linear
    in it): the second derivative with respect to that gradient is ReLU + cat's, bit for bit."""
    _path(monkeypatch, path)
    a, b = (t.requires_grad_() for t in _inputs("contiguous", torch.float32))
    dy = torch.randn(2, 7, 5, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(2))
    got = []
    for fn in (relu_cat, lambda p, q: torch.cat([torch.relu(p), torch.relu(q)], 1)):
        (ga,) = torch.autograd.grad(fn(a, b), a, dy, create_graph=True)
        got.append(torch.autograd.grad((ga * w).sum(), dy)[0])
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)


def test_bad_inputs_raise_before_any_kernel():
    a, b = _inputs("contiguous", torch.float32)
    with pytest.raises(ValueError, match="relu_cat expects 4-D"):
        relu_cat(a[0], b)
    with pytest.raises(ValueError, match="differ outside dim 1"):
        relu_cat(a, b[:, :, :4])
    with pytest.raises(ValueError, match="dtype/device differ"):
        relu_cat(a, b.double())
    if _cpp.has_glue_ops():  # the C++ op called directly checks the same (it wrote b broadcast or unset)
        op = torch.ops.scnet_fused._relu_cat_ag
        for bad in (b[:1], b[:, :, :4], torch.cat([b, b]), b[0]):
            with pytest.raises(RuntimeError, match="differ outside dim 1|4-D"):
                op(a, bad)
        with pytest.raises(RuntimeError, match="dtype/device differ"):
            op(a, b.double())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(layout, requires_grad):
    a, b = (torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0).requires_grad_(requires_grad)
            for t in _inputs(layout, torch.float32))
    torch.library.opcheck(torch.ops.scnet_fused.relu_cat.default, (a, b))


def test_cpp_path_only_in_plain_eager(monkeypatch):
    if not _cpp.has_glue_ops():
        pytest.skip("scnet_fused._C is not built")
    a, b = _inputs("contiguous", torch.float32)
    assert _dispatch.cpp_glue(a, b)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not _dispatch.cpp_glue(mode.from_tensor(a), mode.from_tensor(b))
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", "0")
    assert not _dispatch.cpp_glue(a, b)
