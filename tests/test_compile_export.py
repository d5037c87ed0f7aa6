"""The fused model under torch.compile (fullgraph, dynamic shapes, aot_eager and inductor) and
torch.export: one graph, no breaks, the custom ops visible as graph nodes, eager results."""

import copy

import pytest
import torch
from torch import nn

import scnet_fused
from scnet_fused import models
from scnet_fused.ops import available

BACKEND = "cpu" if available("cpu") is None else "reference"


def _randomize_norms(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)


def _tiny_model(train=True):
    torch.manual_seed(0)
    m = models.build("scnet50", fused=True, layers=(1, 1, 1, 1), num_classes=5)
    _randomize_norms(m)
    return m.train(train)


def _grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


def _assert_same_state(a, b, rtol=1e-4, atol=1e-4):
    for (n, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def test_fullgraph_aot_eager_train_step_matches_eager():
    torch._dynamo.reset()
    eager = _tiny_model(True)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, backend="aot_eager", fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_mod.parameters(), lr=0.05, momentum=0.9)
    target = torch.tensor([0, 3, 1])
    with scnet_fused.backend(BACKEND):
        x = torch.randn(3, 3, 64, 64)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_e, out_c = eager(xe), compiled(xc)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
        nn.functional.cross_entropy(out_e, target).backward()
        nn.functional.cross_entropy(out_c, target).backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
        # The compiled graph's convolutions (inductor's, channels_last) sum the weight gradients in
        # another order than eager's: float32 rounding of the largest sums.
        ge, gc = _grads(eager), _grads(compiled_mod)
        for n in ge:
            atol = 1e-5 * max(1.0, ge[n].abs().max().item())
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=atol, msg=lambda m: f"grad {n}: {m}")
        opt_e.step(), opt_c.step()
        opt_e.zero_grad(), opt_c.zero_grad()
        _assert_same_state(compiled_mod, eager)  # running statistics updated alike


def test_dynamic_shapes_one_graph():
    """dynamic=True: other batch and spatial sizes (irregular nearest maps included) reuse one graph,
    in training and in eval mode."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    eager = scnet_fused.SCBottleneck(32, 16, stride=2, downsample=downsample).train()
    _randomize_norms(eager)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, backend="aot_eager", fullgraph=True, dynamic=True)
    with scnet_fused.backend(BACKEND):
        # H != W in every shape: duck sizing would otherwise specialize H == W and recompile.
        for shape in [(2, 32, 13, 12), (3, 32, 25, 14), (5, 32, 8, 17)]:
            x = torch.randn(shape)
            xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_e, out_c = eager(xe), compiled(xc)
            torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
            g = torch.randn_like(out_e)
            out_e.backward(g), out_c.backward(g)
            torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
            ge, gc = _grads(eager), _grads(compiled_mod)
            for n in ge:
                torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {n}: {m}")
        _assert_same_state(compiled_mod, eager, rtol=1e-5, atol=1e-6)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs == 1, f"{graphs} graphs for three shapes under dynamic=True"
        # Eval mode (the BatchNorm folded into the gate): one more graph, again for every shape.
        eager.eval(), compiled_mod.eval()
        for shape in [(2, 32, 9, 14), (4, 32, 21, 10)]:
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
        # Inference (no grad: convolution + BatchNorm pairs folded): one more graph, also across sizes
        # on both sides of eager's size rule for the fold.
        with torch.no_grad():
            for shape in [(2, 32, 9, 14), (3, 32, 8, 9), (4, 32, 21, 10)]:
                x = torch.randn(shape)
                torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 3, f"{graphs} graphs for train, eval and inference under dynamic=True"


def test_inductor_scconv_train_matches_eager():
    """The default backend (inductor, C++ codegen on the CPU) around the fused ops: one small SCConv."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = scnet_fused.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d).train()
    _randomize_norms(eager)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    x = torch.randn(2, 8, 13, 12)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    with scnet_fused.backend(BACKEND):
        out_e, out_c = eager(xe), compiled(xc)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(out_e)
        out_e.backward(g), out_c.backward(g)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-4)
    ge, gc = _grads(eager), _grads(compiled_mod)
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {n}: {m}")
    _assert_same_state(compiled_mod, eager, rtol=1e-5, atol=1e-6)


def test_export_eval_contains_custom_ops_and_runs(tmp_path):
    model = _tiny_model(False)
    x = torch.randn(2, 3, 64, 64)
    with scnet_fused.backend(BACKEND):
        expected = model(x)
        batch = torch.export.Dim("batch", min=1, max=64)
        ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
        targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
        assert torch.ops.scnet_fused.sc_gate.default in targets, sorted({str(t) for t in targets})
        torch.testing.assert_close(ep.module()(x), expected, rtol=1e-5, atol=1e-5)
        x3 = torch.randn(3, 3, 64, 64)
        torch.testing.assert_close(ep.module()(x3), model(x3), rtol=1e-5, atol=1e-5)
        # Round trip through a .pt2 file: the op is found again by name when loading.
        path = tmp_path / "scnet.pt2"
        torch.export.save(ep, str(path))
        loaded = torch.export.load(str(path))
        torch.testing.assert_close(loaded.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_export_inference_over_a_dynamic_batch():
    """Inference (no grad) exported over a batch range: the folded and stacked convolutions' size rules
    leave no guard on the batch (one graph), and the graph agrees with eager at batch sizes where
    eager folds and stacks and where it does not."""
    model = _tiny_model(False)
    with scnet_fused.backend(BACKEND), torch.no_grad():
        batch = torch.export.Dim("batch", min=1, max=64)
        ep = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes={"x": {0: batch}})
        for n in (1, 2, 5):
            x = torch.randn(n, 3, 64, 64)
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["scconv", "bottleneck"])
@pytest.mark.parametrize("train", [False, True])
def test_export_over_dynamic_height_and_width(kind, train):
    """A fused SCConv / bottleneck exported with dynamic H and W (from twice the pooling rate, where the
    reference exports too) runs at other and irregular sizes with the reference's results (the gate's
    size checks used to guard on h // r <= H and specialise H and W: the export failed)."""
    from scnet_fused import reference as R

    torch.manual_seed(0)
    ref = R.SCConv(16, 16, 1, 1, 1, 1, 4, nn.BatchNorm2d) if kind == "scconv" else \
        R.SCBottleneck(64, 16, norm_layer=nn.BatchNorm2d)
    _randomize_norms(ref)
    C = 16 if kind == "scconv" else 64
    fused = scnet_fused.convert(copy.deepcopy(ref)).train(train)
    ref.train(train)
    dims = {2: torch.export.Dim("h", min=8, max=64), 3: torch.export.Dim("w", min=8, max=64)}
    with scnet_fused.backend(BACKEND):
        ep = torch.export.export(fused, (torch.randn(2, C, 24, 24),), dynamic_shapes={"x": dims})
        for size in ((12, 12), (17, 9), (8, 8)):
            x = torch.randn(2, C, *size)
            torch.testing.assert_close(ep.module()(x), ref(x), rtol=1e-4, atol=1e-5)


def test_gate_size_checks_run_on_the_real_sizes_under_compile():
    """While tracing, the gate leaves its spatial-size checks to the op's body, which runs them on the
    real sizes: a pooled map larger than x is still refused, before any kernel."""
    x, k3 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    small = torch.randn(1, 2, 5, 4)
    f = torch.compile(lambda a, b, c: scnet_fused.sc_gate(a, b, c), backend="eager", fullgraph=True)
    with scnet_fused.backend(BACKEND), pytest.raises(Exception, match="must not be larger than x"):
        f(x, small, k3)


@pytest.mark.gpu
def test_reduce_overhead_cuda_graphs():
    device = "cuda"
    torch._dynamo.reset()
    eager = _tiny_model(True).to(device)
    compiled_mod = copy.deepcopy(eager)
    compiled = torch.compile(compiled_mod, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        x = torch.randn(4, 3, 64, 64, device=device)
        torch.compiler.cudagraph_mark_step_begin()
        out_c = compiled(x)
        out_e = eager(x)
        torch.testing.assert_close(out_c, out_e, rtol=2e-3, atol=2e-3)
        g = torch.randn_like(out_e)
        out_c.backward(g), out_e.backward(g)
    ge, gc = _grads(eager), _grads(compiled_mod)
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=5e-3, atol=5e-3, msg=lambda m: f"grad {n}: {m}")
    eager.eval(), compiled_mod.eval()
    compiled_eval = torch.compile(compiled_mod, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 3, 64, 64, device=device)
        torch.compiler.cudagraph_mark_step_begin()
        torch.testing.assert_close(compiled_eval(x).clone(), eager(x), rtol=2e-3, atol=2e-3)


class _ExportingProbe(nn.Module):
    def forward(self, x):
        from scnet_fused.ops import _dispatch

        return x + 1 if _dispatch.exporting() else x - 1


def test_exporting_is_true_only_under_export():
    """``_dispatch.exporting()`` is False in eager and under torch.compile, True under torch.export
    (strict or not). Before torch 2.14, dynamo replaced ``torch.compiler.is_exporting()`` with a constant
    True while compiling, which sent compiled graphs down the export paths (the Winograd graph op and the
    classifier's channels_last maps were lost under torch.compile on torch 2.11)."""
    probe, x = _ExportingProbe(), torch.zeros(3)
    assert torch.equal(probe(x), x - 1)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(probe, backend="aot_eager", fullgraph=True)(x), x - 1)
    for strict in (False, True):
        exported = torch.export.export(probe, (x,), strict=strict)
        assert torch.equal(exported.module()(x), x + 1), f"strict={strict}"


@pytest.mark.parametrize("stride,channels_last", [(1, False), (2, True)])
def test_compiled_graph_holds_custom_ops_not_autograd_functions(stride, channels_last):
    """Under torch.compile k4's convolution of the recomputed gate and the stacked conv1 enter the graph as
    the custom ops ``scnet_fused::conv_of_gate`` and ``param_conv`` (AOTAutograd caches a graph of custom
    ops; one holding autograd.Functions it traces again in every process), with eager's results."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(32, 128, 1, stride, bias=False), nn.BatchNorm2d(128))
    eager = scnet_fused.SCBottleneck(32, 32, stride=stride, downsample=downsample).train()
    _randomize_norms(eager)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    eager = eager.to(memory_format=fmt)
    compiled_mod = copy.deepcopy(eager)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(compiled_mod, backend=capture, fullgraph=True)
    x = torch.randn(2, 32, 40, 40).contiguous(memory_format=fmt)  # the gate output: 2x32x40x40 (recomputed)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    with scnet_fused.backend(BACKEND):
        out_e, out_c = eager(xe), compiled(xc)
        g = torch.randn_like(out_e)
        out_e.backward(g), out_c.backward(g)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "autograd_function_apply" in t]
    assert sum("scnet_fused.conv_of_gate" in t for t in targets) == 1
    assert sum("scnet_fused.param_conv" in t for t in targets) == 1
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
    ge, gc = _grads(eager), _grads(compiled_mod)
    for n in ge:
        atol = 1e-5 * max(1.0, ge[n].abs().max().item())
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=atol, msg=lambda m: f"grad {n}: {m}")
    _assert_same_state(compiled_mod, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_conv_ops_opcheck_and_gradients(channels_last):
    """``scnet_fused::conv_of_gate`` and ``param_conv``: opcheck (schema, fake tensors, autograd
    registration, AOT dispatch), and their gradients against the convolution of the gate output and of
    the stacked weights (autograd through standard operators)."""
    from scnet_fused.ops import compiled_convs

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    C = 8
    x = torch.randn(2, C, 13, 12).contiguous(memory_format=fmt).requires_grad_()
    small = torch.randn(2, C, 3, 3, requires_grad=True)
    k3 = torch.randn(2, C, 13, 12).contiguous(memory_format=fmt).requires_grad_()
    scale, shift = torch.rand(C) + 0.5, torch.randn(C)
    w = torch.randn(C, C, 3, 3, requires_grad=True)
    with scnet_fused.backend(BACKEND):
        for stride, wop in ((1, True), (1, False), (2, False)):
            y = scnet_fused.sc_gate(x, small, k3, scale, shift).detach().requires_grad_()
            args = (y, w, x.detach(), small.detach(), k3.detach(), scale, shift, None, None, [stride] * 2, [1, 1],
                    [1, 1], 1, wop and available("cpu") is None)
            torch.library.opcheck(torch.ops.scnet_fused.conv_of_gate.default, args)
            out = torch.ops.scnet_fused.conv_of_gate(*args)
            assert out.is_contiguous(memory_format=fmt)
            ref = nn.functional.conv2d(y, w, None, stride, 1)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            g = torch.randn_like(ref)
            got = torch.autograd.grad(out, (y, w), g)
            want = torch.autograd.grad(ref, (y, w), g)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        w1, w2 = torch.randn(5, C, 1, 1, requires_grad=True), torch.randn(3, C, 1, 1, requires_grad=True)
        xp = torch.randn(2, C, 6, 7).contiguous(memory_format=fmt).requires_grad_()
        args = (xp, [w1, w2], [1, 1], [0, 0], [1, 1], 1)
        torch.library.opcheck(torch.ops.scnet_fused.param_conv.default, args)
        out = compiled_convs.param_conv(xp, 1, 0, 1, 1, w1, w2)
        ref = nn.functional.conv2d(xp, torch.cat([w1, w2]))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (xp, w1, w2), g), torch.autograd.grad(ref, (xp, w1, w2), g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # only one of the stacked weights requires grad: the other gets none
        w2.requires_grad_(False)
        gw1, = torch.autograd.grad(compiled_convs.param_conv(xp.detach(), 1, 0, 1, 1, w1, w2), (w1,), g)
        ref1 = nn.functional.conv2d(xp.detach(), torch.cat([w1, w2]))
        torch.testing.assert_close(gw1, torch.autograd.grad(ref1, (w1,), g)[0], rtol=1e-5, atol=1e-5)
