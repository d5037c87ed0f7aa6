"""The C++ autograd twins of the public ops (csrc/autograd.cpp) against the torch.library ops.

In eager mode with a compiled backend the public functions take the C++ path; with
SCNET_FUSED_CPP_AUTOGRAD=0 (or under torch.compile) the torch.library custom ops. Both must give the
same outputs, gradients, statistics and saved tensors, bit for bit (they run the same kernels).
"""

import pytest
import torch

from scnet_fused.ops import _dispatch, available, sc_avgpool, sc_gate, sc_gate_bn2_train, sc_gate_bn_train
from scnet_fused.ops.bn_relu import bn_add_relu_train, bn_relu_cat_train, bn_relu_train

pytestmark = pytest.mark.skipif(available("cpu") is not None, reason="the compiled CPU backend is not built")


def _both(monkeypatch, fn, *args):
    """fn(*args) on the C++ path and on the torch.library path: (outputs, grads) of each."""
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", flag)
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                  for a in args]
        assert _dispatch.cpp_autograd(leaves[0]) == (flag == "1")
        with torch.profiler.profile() as prof:
            out = fn(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            g = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(3)).to(outs[0].dtype)
            wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = torch.autograd.grad(outs[0], wrt, g)
        names = {e.name for e in prof.events() if e.name.startswith("scnet_fused::")}
        results.append((outs, grads, names))
    return results


def _same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.is_contiguous(memory_format=torch.channels_last) == y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, y)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affines", [0, 1, 2], ids=["plain", "k3_affine", "k3_and_pooled_affines"])
def test_gate_paths_agree(monkeypatch, channels_last, dtype, affines):
    """The gate without affine, with k3's, and with k3's and the pooled branch's: outputs and every
    gradient (seven with both affines)."""
    g = torch.Generator().manual_seed(0)
    x, k3 = (torch.randn(2, 5, 14, 13, generator=g).to(dtype) for _ in range(2))
    small = torch.randn(2, 5, 3, 3, generator=g).to(dtype)
    if channels_last:
        x, k3 = (t.contiguous(memory_format=torch.channels_last) for t in (x, k3))
    args = [x.requires_grad_(), small.requires_grad_(), k3.requires_grad_()]
    for _ in range(affines):
        args += [(torch.rand(5, generator=g) + 0.5).requires_grad_(), torch.randn(5, generator=g).requires_grad_()]
    (o1, g1, n1), (o2, g2, n2) = _both(monkeypatch, sc_gate, *args)
    assert "scnet_fused::_sc_gate_ag" in n1 and "scnet_fused::sc_gate" not in n1
    assert "scnet_fused::sc_gate" in n2 and "scnet_fused::_sc_gate_ag" not in n2
    assert len(g1) == len(g2) == len(args)
    _same(o1, o2)
    _same(g1, g2)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_bn2_train_paths_agree(monkeypatch, channels_last, dtype):
    """Both BatchNorms in the gate: outputs, both batch statistics and all seven gradients."""
    g = torch.Generator().manual_seed(5)
    x, k3 = torch.randn(3, 6, 9, 11, generator=g), torch.randn(3, 6, 9, 11, generator=g) * 2 + 1
    x, k3 = x.to(dtype), k3.to(dtype)
    if channels_last:
        x, k3 = (t.contiguous(memory_format=torch.channels_last) for t in (x, k3))
    small = (torch.randn(3, 6, 2, 2, generator=g) * 1.5 - 0.3).to(dtype)
    w, b, w2, b2 = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g), \
        torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    args = [x.requires_grad_(), small.requires_grad_(), k3.requires_grad_(), w.requires_grad_(),
            b.requires_grad_(), 1e-5, w2.requires_grad_(), b2.requires_grad_(), 1e-3]
    (o1, g1, n1), (o2, g2, n2) = _both(monkeypatch, sc_gate_bn2_train, *args)
    assert "scnet_fused::_sc_gate_bn2_train_ag" in n1 and "scnet_fused::sc_gate_bn2_train" in n2
    for names in (n1, n2):  # the cpu backend's one call per direction, with the small map's statistics
        assert {"scnet_fused::_gate_bn_train_forward", "scnet_fused::_gate_bn_train_backward",
                "scnet_fused::_channel_stats"} <= names
    assert len(o1) == 5 and len(g1) == 7
    _same(o1, o2)
    _same(g1, g2)
    assert not any(t.requires_grad for t in o1[1:])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_bn_train_paths_agree(monkeypatch, channels_last, dtype):
    g = torch.Generator().manual_seed(1)
    x, k3 = torch.randn(3, 6, 9, 11, generator=g), torch.randn(3, 6, 9, 11, generator=g) * 2 + 1
    x, k3 = x.to(dtype), k3.to(dtype)
    if channels_last:
        x, k3 = (t.contiguous(memory_format=torch.channels_last) for t in (x, k3))
    small = torch.randn(3, 6, 2, 2, generator=g).to(dtype)
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    args = [x.requires_grad_(), small.requires_grad_(), k3.requires_grad_(), w.requires_grad_(),
            b.requires_grad_(), 1e-5]
    (o1, g1, n1), (o2, g2, n2) = _both(monkeypatch, sc_gate_bn_train, *args)
    assert "scnet_fused::_sc_gate_bn_train_ag" in n1 and "scnet_fused::sc_gate_bn_train" in n2
    # Both paths take the cpu backend's one call per direction (which picks its passes inside).
    for names in (n1, n2):
        assert {"scnet_fused::_gate_bn_train_forward", "scnet_fused::_gate_bn_train_backward"} <= names
        assert not names & {"scnet_fused::_channel_stats", "scnet_fused::_gate_forward",
                            "scnet_fused::_gate_backward", "scnet_fused::_gate_backward_k3"}
    _same(o1, o2)  # y, mean and var
    _same(g1, g2)
    assert not o1[1].requires_grad and not o1[2].requires_grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_avgpool_paths_agree(monkeypatch, channels_last):
    x = torch.randn(2, 8, 13, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    (o1, g1, n1), (o2, g2, n2) = _both(monkeypatch, sc_avgpool, x.requires_grad_(), 4)
    assert "scnet_fused::_sc_avgpool_ag" in n1 and "scnet_fused::sc_avgpool" in n2
    _same(o1, o2)
    _same(g1, g2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_relu_paths_agree(monkeypatch, channels_last):
    g = torch.Generator().manual_seed(4)
    t = torch.randn(3, 6, 9, 11, generator=g) * 2 + 0.2
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    args = [t.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5]
    (o1, g1, n1), (o2, g2, n2) = _both(monkeypatch, bn_relu_train, *args)
    assert "scnet_fused::_bn_relu_train_ag" in n1 and "scnet_fused::bn_relu_train" in n2
    _same(o1, o2)
    _same(g1, g2)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_add_relu_paths_agree(monkeypatch, channels_last, dtype):
    g = torch.Generator().manual_seed(6)
    t = (torch.randn(3, 6, 9, 11, generator=g) * 2 + 0.2).to(dtype)
    res = torch.randn(3, 6, 9, 11, generator=g).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    args = [t.requires_grad_(), w.requires_grad_(), b.requires_grad_(), res.requires_grad_(), 1e-5]
    (o1, g1, n1), (o2, g2, n2) = _both(monkeypatch, bn_add_relu_train, *args)
    assert "scnet_fused::_bn_add_relu_train_ag" in n1 and "scnet_fused::bn_add_relu_train" not in n1
    assert "scnet_fused::bn_add_relu_train" in n2
    _same(o1, o2)  # y, mean, var
    _same(g1, g2)  # dt, dweight, dbias, dresidual
    assert not any(t.requires_grad for t in o1[1:])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_relu_cat_paths_agree(monkeypatch, channels_last, dtype):
    g = torch.Generator().manual_seed(5)
    ta = (torch.randn(3, 6, 9, 11, generator=g) * 2 + 0.2).to(dtype)
    tb = (torch.randn(3, 4, 9, 11, generator=g) - 0.3).to(dtype)
    if channels_last:
        ta, tb = (t.contiguous(memory_format=torch.channels_last) for t in (ta, tb))
    wa, ba = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    wb, bb = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    args = [ta.requires_grad_(), wa.requires_grad_(), ba.requires_grad_(), tb.requires_grad_(), wb.requires_grad_(),
            bb.requires_grad_(), 1e-5, 1e-3]
    (o1, g1, n1), (o2, g2, n2) = _both(monkeypatch, bn_relu_cat_train, *args)
    assert "scnet_fused::_bn_relu_cat_train_ag" in n1 and "scnet_fused::bn_relu_cat_train" not in n1
    assert "scnet_fused::bn_relu_cat_train" in n2
    _same(o1, o2)  # out and both branches' mean and var
    _same(g1, g2)
    assert not any(t.requires_grad for t in o1[1:])


def test_saved_tensors_are_the_same(monkeypatch):
    """The C++ nodes keep exactly what the Python ones keep (no gate, sigmoid or product)."""
    g = torch.Generator().manual_seed(2)
    x, k3 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    small = torch.randn(2, 4, 2, 2, generator=g)
    w, b = torch.rand(4, generator=g), torch.randn(4, generator=g)
    saved = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", flag)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            sc_gate_bn_train(*(t.clone().requires_grad_() for t in (x, small, k3, w, b)))
            sc_gate_bn2_train(*(t.clone().requires_grad_() for t in (x, small, k3, w, b)), 1e-5, w.clone(), b.clone())
            sc_gate(*(t.clone().requires_grad_() for t in (x, small, k3, w, b, w, b)))
            sc_avgpool(x.clone().requires_grad_(), 4)
            bn_relu_cat_train(x.clone().requires_grad_(), w, b, k3[:, :3].clone().requires_grad_(), w[:3], b[:3])
            bn_add_relu_train(x.clone().requires_grad_(), w, b, k3.clone().requires_grad_())
        saved[flag] = sorted(shapes)
    assert saved["1"] == saved["0"]


def test_inference_mode_and_no_grad():
    x, k3 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    small = torch.randn(2, 4, 2, 2)
    ref = sc_gate(x, small, k3).detach()
    with torch.inference_mode():  # autograd keys skipped: the plain kernels
        torch.testing.assert_close(sc_gate(x, small, k3), ref, rtol=0, atol=0)
        y, mean, var = sc_gate_bn_train(x, small, k3, torch.ones(4), torch.zeros(4))
        y2, *stats = sc_gate_bn2_train(x, small, k3, torch.ones(4), torch.zeros(4), 1e-5, torch.ones(4),
                                       torch.zeros(4), 1e-5)
        assert len(stats) == 4 and y2.shape == x.shape
        torch.testing.assert_close(sc_gate(x, small, k3, None, None, torch.ones(4), torch.zeros(4)), ref,
                                   rtol=0, atol=0)
        assert sc_avgpool(x, 4).shape == (2, 4, 2, 2)
    with torch.no_grad():
        assert not sc_gate(x.requires_grad_(), small, k3).requires_grad


def test_direct_calls_check_the_per_channel_shapes():
    """The C++ ops check what the public wrappers check, also when called directly: a 0-d pooled-branch
    weight (its backward failed later) and filters that are not 4-D with the norm's channel count (folded
    by broadcasting)."""
    ops = torch.ops.scnet_fused
    x, k3, small = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 2, 2)
    one, zero = torch.ones(4), torch.zeros(4)
    for sw, sb in ((torch.tensor(1.0), zero), (one, torch.zeros(3))):
        with pytest.raises(RuntimeError, match="one value per channel of small"):
            ops._sc_gate_bn2_train_ag(x, small, k3, one, zero, 1e-5, sw, sb, 1e-5)
    mean, var = torch.zeros(4), torch.ones(4)
    for w in (torch.randn(4), torch.randn(3, 2, 3, 3)):
        with pytest.raises(RuntimeError, match=r"\(K, C, kH, kW\)"):
            ops._conv_bn_fold(w, one, zero, mean, var, 1e-5, torch.float32)
    folded, _ = ops._conv_bn_fold(torch.ones(4, 2, 3, 3), 2 * one, zero, mean, var, 0.0, torch.float32)
    torch.testing.assert_close(folded, torch.full((4, 2, 3, 3), 2.0))


def test_double_backward_through_the_standard_ops():
    """A backward with create_graph through the C++ autograd ops goes through scnet_fused::_double_vjp
    (the op recomputed in standard operators): differentiable again, the first derivative the kernels'
    own to rounding (the second derivatives' values: tests/test_double_backward.py)."""
    x, k3 = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8, requires_grad=True)
    small = torch.randn(2, 4, 2, 2, requires_grad=True)
    w, b = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
    assert _dispatch.cpp_autograd(x)
    for fn in (lambda: sc_gate(x, small, k3), lambda: sc_gate_bn2_train(x, small, k3, w, b, 1e-5, w, b, 1e-5)[0],
               lambda: bn_add_relu_train(k3, w, b, x)[0]):
        with torch.profiler.profile() as prof:
            (gx,) = torch.autograd.grad(fn().square().sum(), x, create_graph=True)
        assert "scnet_fused::_double_vjp" in {e.name for e in prof.events()}
        assert gx.requires_grad
        (gx_plain,) = torch.autograd.grad(fn().square().sum(), x)
        torch.testing.assert_close(gx.detach(), gx_plain, rtol=1e-5, atol=1e-5)
        (gx2,) = torch.autograd.grad(gx.square().sum(), x)
        assert torch.isfinite(gx2).all() and gx2.abs().sum() > 0


def test_not_taken_where_it_must_not_be(monkeypatch):
    x = torch.randn(2, 4, 8, 8)
    assert _dispatch.cpp_autograd(x)
    assert not _dispatch.cpp_autograd(x[:0])  # empty: the Python path's own handling
    assert not _dispatch.cpp_autograd(x.double())  # float64: the reference backend
    assert not _dispatch.cpp_autograd(torch.empty(2, 4, 8, 8, device="meta"))
    with _dispatch.backend("reference"):
        assert not _dispatch.cpp_autograd(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not _dispatch.cpp_autograd(mode.from_tensor(x))
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", "0")
    assert not _dispatch.cpp_autograd(x)


def _expected_route(x):
    if _dispatch.standard_ops_only():
        return _dispatch.PLAIN
    return _dispatch.CPP if _dispatch.cpp_autograd(x) else _dispatch.OP


def test_route_is_the_two_predicates_in_one_call(monkeypatch):
    """The public ops ask ``route`` once instead of standard_ops_only() and cpp_autograd(): the same
    answer in every case those two tell apart."""
    x = torch.randn(2, 4, 8, 8)
    cases = [x, x[:0], x.double(), torch.empty(2, 4, 8, 8, device="meta"), torch.nn.Parameter(x.clone()),
             "not a tensor"]
    for t in cases:
        assert _dispatch.route(t) == (_expected_route(t) if isinstance(t, torch.Tensor) else _dispatch.OP)
    assert _dispatch.route(x) == _dispatch.CPP
    with _dispatch.backend("reference"):
        assert _dispatch.route(x) == _dispatch.OP
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert _dispatch.route(mode.from_tensor(x)) == _dispatch.OP
    seen = []
    torch.func.vmap(lambda t: seen.append(_dispatch.route(t)) or t)(x)
    with torch.autograd.forward_ad.dual_level():
        seen.append(_dispatch.route(x))
    assert seen == [_dispatch.PLAIN, _dispatch.PLAIN]
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", "0")
    assert _dispatch.route(x) == _dispatch.OP == _expected_route(x)


def test_route_fast_path_takes_only_the_plain_eager_cpu_call(monkeypatch):
    """``route`` answers the common eager CPU call without ``select`` (``_plain_cpu_call``): taken for a
    non-empty CPU tensor of a kernel dtype in any layout, with no backend block and
    $SCNET_FUSED_BACKEND not set; in every other case ``select`` answers; always as the two predicates
    do."""
    x = torch.randn(2, 4, 8, 8)
    plain = [x, x.half(), x.bfloat16(), x.contiguous(memory_format=torch.channels_last), x[:, :, ::2],
             torch.nn.Parameter(x.clone())]
    for t in plain:
        assert _dispatch._plain_cpu_call(t) and _dispatch.route(t) == _dispatch.CPP == _expected_route(t)
    for t in (x[:0], x.double(), torch.empty(2, 4, 8, 8, device="meta"), torch.ones(2, 4, 8, 8, dtype=torch.int32)):
        assert not _dispatch._plain_cpu_call(t) and _dispatch.route(t) == _expected_route(t)
    with _dispatch.backend("cpu"):
        assert not _dispatch._plain_cpu_call(x) and _dispatch.route(x) == _dispatch.CPP == _expected_route(x)
    with _dispatch.backend("reference"):
        assert not _dispatch._plain_cpu_call(x) and _dispatch.route(x) == _dispatch.OP == _expected_route(x)
    settings = (("SCNET_FUSED_BACKEND", "reference", _dispatch.OP), ("SCNET_FUSED_BACKEND", "auto", _dispatch.CPP),
                ("SCNET_FUSED_CPP_AUTOGRAD", "1", _dispatch.CPP), ("SCNET_FUSED_CPP_AUTOGRAD", "0", _dispatch.OP))
    for name, value, want in settings:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            # $SCNET_FUSED_BACKEND is select's to read; $SCNET_FUSED_CPP_AUTOGRAD is asked before it
            assert _dispatch._plain_cpu_call(x) == (name != "SCNET_FUSED_BACKEND"), (name, value)
            assert _dispatch.route(x) == want == _expected_route(x), (name, value)
    assert _dispatch._plain_cpu_call(x)  # the variables unset again
    # check_trace off: its check reruns the function outside tracing, where route is not PLAIN (the
    # point of this line), and would warn that the outputs differ.
    traced = torch.jit.trace(lambda t: t + (1.0 if _dispatch.route(t) == _dispatch.PLAIN else -1.0), x,
                             check_trace=False)
    assert torch.equal(traced(x), x + 1.0)


@pytest.mark.parametrize("affine", [True, False])
def test_bottleneck_paths_agree_bit_for_bit(monkeypatch, affine):
    """The fused bottleneck with the C++ ops (the autograd twins, relu_cat, and the modules' BatchNorm
    helpers: fold, convolution fold, running-statistics update) and with the torch.library ops and
    the Python helpers: the same outputs, gradients and running statistics, bit for bit, over two
    training steps (one BatchNorm with momentum=None), eval with autograd and inference (folded)."""
    import copy

    from torch import nn

    import scnet_fused
    from scnet_fused import reference as R

    torch.manual_seed(0)

    def norm(c):
        return nn.BatchNorm2d(c, affine=affine)

    ref = R.SCBottleneck(32, 16, downsample=nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), norm(64)),
                         norm_layer=norm)
    ref.bn1_a.momentum = None  # cumulative moving average
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                if affine:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 32, 12, 10)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", flag)
        m = scnet_fused.convert(copy.deepcopy(ref))
        params = list(m.parameters())
        got = []
        with torch.profiler.profile() as prof:
            for mode in ("train", "train", "eval"):
                m.train(mode == "train")
                xg = x.clone().requires_grad_()
                out = m(xg)
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(len(got)))
                got += [out] + list(torch.autograd.grad(out, [xg] + params, g))
            with torch.no_grad():
                got.append(m(x))
        got += [t.clone() for t in m.state_dict().values()]
        runs[flag] = (got, {e.name for e in prof.events() if e.name.startswith("scnet_fused::")})
    (a, names_cpp), (b, names_py) = runs["1"], runs["0"]
    helpers = {"scnet_fused::_update_running_stats_", "scnet_fused::_bn_affine_fold", "scnet_fused::_conv_bn_fold",
               "scnet_fused::_relu_cat_ag"}
    assert helpers <= names_cpp and not helpers & names_py, (names_cpp, names_py)
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and torch.equal(u, v), i


_AFFINE_CASES = [  # (scale: absent / frozen / trained, shift: likewise, gradients asked of: x, scale, shift)
    ("absent", "absent", "x"), ("frozen", "frozen", "x"), ("trained", "trained", "x"),
    ("trained", "trained", "x,scale"), ("trained", "trained", "shift"), ("absent", "trained", "x,shift"),
    ("trained", "absent", "scale"), ("frozen", "trained", "x,shift"), ("trained", "frozen", "x,scale"),
]


@pytest.mark.parametrize("scale_kind,shift_kind,wrt", _AFFINE_CASES, ids=["-".join(c) for c in _AFFINE_CASES])
def test_gate_sums_only_where_an_affine_gradient_is_asked(monkeypatch, scale_kind, shift_kind, wrt):
    """The gate backward computes the per-channel sums (the gradients of scale and shift) only where
    they can be needed: on the C++ path when one of them is asked for (the engine tells), on the
    torch.library path when one requires grad (its ctx knows no more); every gradient asked for is the
    same on both and matches the reference backend."""
    g = torch.Generator().manual_seed(1)
    x, k3 = (torch.randn(2, 6, 7, 9, generator=g).requires_grad_() for _ in range(2))
    small = torch.randn(2, 6, 2, 3, generator=g).requires_grad_()

    def per_channel(kind, t):
        return None if kind == "absent" else t.requires_grad_(kind == "trained")

    scale = per_channel(scale_kind, torch.rand(6, generator=g) + 0.5)
    shift = per_channel(shift_kind, torch.randn(6, generator=g))
    named = {"x": x, "scale": scale, "shift": shift}
    inputs = [named[n] for n in wrt.split(",")]
    dy = torch.randn(2, 6, 7, 9, generator=g)
    want_sums = {"1": any(n in ("scale", "shift") for n in wrt.split(",")),
                 "0": "trained" in (scale_kind, shift_kind)}
    with _dispatch.backend("reference"):
        expected = torch.autograd.grad(sc_gate(x, small, k3, scale, shift), inputs, dy)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", flag)
        with torch.profiler.profile(record_shapes=True) as prof:
            grads = torch.autograd.grad(sc_gate(x, small, k3, scale, shift), inputs, dy)
        calls = [e.concrete_inputs for e in prof.events() if e.name == "scnet_fused::_gate_backward"]
        assert len(calls) == 1 and calls[0][-1] is want_sums[flag], (flag, calls)
        for got, ref in zip(grads, expected):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        results.append(grads)
    _same(results[0], results[1])
