"""torch.fx symbolic tracing: the fused modules and models trace to the reference's graph (the published
model's modules and functions, the input checks as nodes), and a tracer that keeps them as leaves gets
graphs that call them, fused."""

import copy
import io

import pytest
import torch
from torch import nn

import scnet_fused
from scnet_fused import models, reference
from scnet_fused import modules as fused_modules

from _util import randomize_norms
from published_style import TinyNet


def _pair(arch, train):
    torch.manual_seed(0)
    ref = models.build(arch, fused=False, layers=(1, 1, 1, 1), num_classes=5)
    randomize_norms(ref)
    fused = models.build(arch, fused=True, layers=(1, 1, 1, 1), num_classes=5)
    fused.load_state_dict(ref.state_dict())
    return ref.train(train), fused.train(train)


def _calls(gm):
    """The graph's module calls and function calls, in order (functions by qualified name)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(("module", n.target))
        elif n.op in ("call_function", "call_method"):
            t = n.target
            out.append((n.op, t if isinstance(t, str) else f"{getattr(t, '__module__', '')}.{t.__name__}"))
    return out


@pytest.mark.parametrize("arch", ["scnet50", "scnet50_v1d"])
def test_fused_model_traces_to_the_reference_graph_and_runs_it(arch):
    ref, fused = _pair(arch, train=False)
    gm_ref = torch.fx.symbolic_trace(ref)
    gm = torch.fx.symbolic_trace(fused)
    calls = _calls(gm)
    assert calls == _calls(gm_ref)
    names = {c[1] for c in calls}
    assert "scnet_fused.reference.checked_image_batch" in names
    assert "scnet_fused.reference.checked_sc_input" in names
    assert "torch.nn.functional.interpolate" in names
    assert ("module", "maxpool") in calls and ("module", "layer1.0.scconv.k2.0") in calls
    # the fused stem pool stays the package's module in the graph (called as nn.MaxPool2d is)
    assert type(gm.maxpool) is fused_modules.MaxPool2d
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = ref(x)
        assert torch.equal(gm(x), expected)  # the reference computation, operator for operator
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


def test_traced_training_step_matches_the_reference():
    ref, fused = _pair("scnet50", train=True)
    gm = torch.fx.symbolic_trace(fused)
    assert gm.training
    x = torch.randn(2, 3, 128, 128)
    out_ref, out = ref(x), gm(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    for (name, p_ref), p in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, b_ref), b in zip(ref.named_buffers(), fused.buffers()):  # the graph's BatchNorms are the model's
        torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert int(fused.layer1[0].scconv.k2[2].num_batches_tracked) == 1


def test_the_traced_graph_checks_its_input():
    _, fused = _pair("scnet50", train=False)
    gm = torch.fx.symbolic_trace(fused)
    with pytest.raises(ValueError, match=r"SCNet expects an \(N, 3, H, W\) image batch"):
        gm(torch.randn(2, 4, 128, 128))
    with pytest.raises(ValueError, match=r"SCNet expects an \(N, 3, H, W\) image batch"):
        gm(torch.randn(3, 128, 128))
    # 32 px: layer4's SCConv sees 2 x 2, below pooling_r = 4
    with pytest.raises(ValueError, match="spatial size 2x2 is smaller than pooling_r=4"):
        gm(torch.randn(1, 3, 32, 32))
    sc = torch.fx.symbolic_trace(scnet_fused.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d))
    with pytest.raises(ValueError, match="SCConv expects 8 input channels, got 6"):
        sc(torch.randn(1, 6, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        sc(torch.randn(8, 8, 8))


@pytest.mark.parametrize("channels_last", [False, True])
def test_standalone_modules_trace(channels_last):
    torch.manual_seed(1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sc_ref = reference.SCConv(16, 16, 2, 2, 2, 2, 4, nn.BatchNorm2d)
    randomize_norms(sc_ref)
    sc = scnet_fused.SCConv(16, 16, 2, 2, 2, 2, 4, nn.BatchNorm2d)
    sc.load_state_dict(sc_ref.state_dict())
    down = nn.Sequential(nn.Conv2d(32, 128, 1, stride=2, bias=False), nn.BatchNorm2d(128))
    b_ref = reference.SCBottleneck(32, 32, stride=2, downsample=down, avd=True, is_first=True)
    randomize_norms(b_ref)
    b = scnet_fused.convert(copy.deepcopy(b_ref))
    for m_ref, m, shape in ((sc_ref, sc, (2, 16, 13, 11)), (b_ref, b, (2, 32, 16, 16))):
        m_ref.eval(), m.eval()
        gm = torch.fx.symbolic_trace(m)
        assert _calls(gm) == _calls(torch.fx.symbolic_trace(m_ref))
        x = torch.randn(shape).contiguous(memory_format=fmt)
        with torch.no_grad():
            assert torch.equal(gm(x), m_ref(x))


def test_converted_published_model_traces_to_the_published_graph():
    torch.manual_seed(2)
    net = TinyNet()
    randomize_norms(net)
    net.eval()
    converted = scnet_fused.convert(copy.deepcopy(net))
    gm_pub, gm = torch.fx.symbolic_trace(net), torch.fx.symbolic_trace(converted)
    mods = [c for c in _calls(gm) if c[0] == "module"]
    assert mods == [c for c in _calls(gm_pub) if c[0] == "module"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), net(x))


def test_a_leaf_tracer_keeps_the_fused_blocks(monkeypatch):
    """A tracer that keeps the fused bottleneck as a leaf (torchvision's create_feature_extractor takes
    them as ``leaf_modules``) records calls of the blocks, and the graph runs them fused."""
    _, fused = _pair("scnet50", train=True)

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, scnet_fused.SCBottleneck) or super().is_leaf_module(m, qualname)

    gm_leaf = torch.fx.GraphModule(fused, Leaves().trace(fused))
    gm_plain = torch.fx.symbolic_trace(fused)
    assert ("module", "layer3.0") in _calls(gm_leaf)
    assert not any(c[1].startswith("layer3.0.") for c in _calls(gm_leaf))
    calls = []
    real = fused_modules.bn_add_relu_train

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_modules, "bn_add_relu_train", counting)
    x = torch.randn(2, 3, 128, 128)
    gm_plain(x)
    assert not calls  # the standard graph: the modules' reference computation
    gm_leaf(x)
    assert len(calls) == 4  # each block's bn3 + shortcut + ReLU, fused


def test_traced_graphs_pickle_and_features_only_traces():
    torch.manual_seed(3)
    ref = models.build("scnet50", fused=False, features_only=True, out_indices=(2, 4), layers=(1, 1, 1, 1))
    randomize_norms(ref)
    fused = models.build("scnet50", fused=True, features_only=True, out_indices=(2, 4), layers=(1, 1, 1, 1))
    fused.load_state_dict(ref.state_dict())
    ref.eval(), fused.eval()
    gm = torch.fx.symbolic_trace(fused)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = ref(x)
        for g in (gm, loaded):
            out = g(x)
            assert len(out) == 2 and all(torch.equal(a, b) for a, b in zip(out, expected))


def test_torchvision_feature_extractor():
    """torchvision's create_feature_extractor (where torchvision is installed): stage maps from the
    reference graph, and with the fused blocks as leaf modules."""
    fx_tv = pytest.importorskip("torchvision.models.feature_extraction")
    ref, fused = _pair("scnet50", train=False)
    x = torch.randn(1, 3, 128, 128)
    nodes = {"layer2": "c3", "layer4": "c5", "layer1.0.scconv.k3.1": "k3"}
    with torch.no_grad():
        expected = fx_tv.create_feature_extractor(ref, return_nodes=nodes)(x)
        out = fx_tv.create_feature_extractor(fused, return_nodes=nodes)(x)
        assert all(torch.equal(out[k], expected[k]) for k in nodes.values())
        leaf = fx_tv.create_feature_extractor(fused, return_nodes={"layer2": "c3", "layer4": "c5"},
                                             tracer_kwargs={"leaf_modules": [scnet_fused.SCBottleneck]})
        got = leaf(x)
        for k in ("c3", "c5"):
            torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-4 * expected[k].abs().max().item())


_WINOGRAD = scnet_fused.ops.available("cpu") is None  # the Winograd convolution is a compiled CPU kernel


class _OpsUser(nn.Module):
    """A block of a user's own, written with the public fused ops."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        small = scnet_fused.sc_avgpool(x, 4)
        k3 = scnet_fused.ops.conv3x3_winograd(x, self.conv.weight) if _WINOGRAD else self.conv(x)
        y, mean, var = scnet_fused.sc_gate_bn_train(x, small, k3, self.bn.weight, self.bn.bias, 1e-5)
        g = scnet_fused.sc_gate(x, small, k3, self.bn.weight, self.bn.bias)
        z, m2, v2 = scnet_fused.ops.bn_relu_train(y, self.bn2.weight, self.bn2.bias, 1e-5)
        w, *_ = scnet_fused.ops.bn_add_relu_train(g, self.bn2.weight, self.bn2.bias, z)
        cat = scnet_fused.ops.relu_cat.relu_cat(w, z)
        c2, *_ = scnet_fused.ops.bn_relu_cat_train(z, self.bn.weight, self.bn.bias, w, self.bn2.weight,
                                                    self.bn2.bias)
        y2, *_ = scnet_fused.sc_gate_bn2_train(x, small, k3, self.bn.weight, self.bn.bias, 1e-5,
                                               self.bn2.weight, self.bn2.bias)
        return cat + c2 + torch.cat([y2, mean.view(1, -1, 1, 1) + var.view(1, -1, 1, 1) + m2.view(1, -1, 1, 1)
                                     + v2.view(1, -1, 1, 1) + y], 1)


def test_public_ops_trace_as_single_nodes():
    torch.manual_seed(4)
    m = _OpsUser()
    randomize_norms(m)
    gm = torch.fx.symbolic_trace(m)
    targets = [c[1] for c in _calls(gm) if c[0] == "call_function"]
    for name in ("avgpool.sc_avgpool", "sc_gate.sc_gate", "sc_gate.sc_gate_bn_train", "sc_gate.sc_gate_bn2_train",
                 "bn_relu.bn_relu_train", "bn_relu.bn_add_relu_train", "bn_relu.bn_relu_cat_train",
                 "relu_cat.relu_cat") + (("winograd.conv3x3_winograd",) if _WINOGRAD else ()):
        assert targets.count(f"scnet_fused.ops.{name}") == 1, name
    x = torch.randn(2, 8, 12, 10, requires_grad=True)
    out = gm(x)
    expected = m(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same ops, called by the graph
    gx, = torch.autograd.grad(out.sum(), x)
    gx_ref, = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sc_avgpool"):  # the op's own checks, when the graph runs
        gm(torch.randn(2, 8, 3, 3))

    class Folded(nn.Module):
        def forward(self, t, r, scale, shift):
            return scnet_fused.ops.affine_add_relu(t, r, scale, shift)

    gf = torch.fx.symbolic_trace(Folded())
    assert [c[1] for c in _calls(gf)] == ["scnet_fused.ops.bn_relu.affine_add_relu"]
    t, r, sc, sh = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5), torch.rand(8), torch.randn(8)
    with torch.no_grad():
        assert torch.equal(gf(t, r, sc, sh), scnet_fused.ops.affine_add_relu(t, r, sc, sh))


def test_the_fused_stem_pool_traced_on_its_own():
    pool = fused_modules.MaxPool2d(3, 2, 1)
    gm = torch.fx.symbolic_trace(pool)  # the root itself: the pool's function, not a call of the root
    assert not [c for c in _calls(gm) if c[0] == "module"]
    x = torch.randn(2, 4, 9, 8)
    assert torch.equal(gm(x), nn.functional.max_pool2d(x, 3, 2, 1))
