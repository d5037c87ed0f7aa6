"""ONNX export and ``torch.jit.trace`` of the fused modules: the recorded graph holds standard operators
only (no custom op of this package); onnxruntime computes from it what the fused module computes in
PyTorch, including the nearest upsampling's exact index map at sizes where onnxruntime's Resize picks
other source rows, and a traced module loads and runs in a process without this package."""

import io
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scnet_fused
from scnet_fused import reference as R
from scnet_fused.ops._dispatch import standard_ops_only
from scnet_fused.ops._plain import upsample_nearest

# (output size, input size): equal, doubled, the SCNet-50 stage maps pooled by 4, and sizes where
# onnxruntime's Resize (it divides by out / in) disagrees with PyTorch's map (114 -> 28 at row 57).
SIZE_PAIRS = [(5, 5), (8, 4), (56, 14), (28, 7), (14, 3), (7, 1), (114, 28), (171, 42), (74, 24), (82, 16), (1, 1)]


@pytest.mark.parametrize("out_size,in_size", SIZE_PAIRS)
def test_exact_upsample_matches_interpolate(out_size, in_size):
    g = torch.Generator().manual_seed(out_size * 1000 + in_size)
    small = torch.randn(2, 3, in_size, max(1, in_size // 2 + 1), generator=g)
    like = torch.empty(2, 3, out_size, out_size + 3)
    want = F.interpolate(small, size=like.shape[-2:], mode="nearest")
    assert torch.equal(upsample_nearest(small, like), want)


def _bn_stats(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def _session(data: bytes):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _check_standard_ops(data: bytes) -> None:
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    foreign = {(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    assert not foreign, f"non-standard operators in the exported graph: {sorted(foreign)}"


def _run(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_scconv_exports_with_dynamic_shapes():
    """TorchScript-based exporter, batch and spatial axes dynamic: one graph serves other sizes,
    exactly, including the 114-row map where a Resize-based graph would read the wrong source row."""
    pytest.importorskip("onnx")  # the TorchScript-based exporter serialises through it
    torch.manual_seed(0)
    m = _bn_stats(scnet_fused.SCConv(4, 4, 1, 1, 1, 1, 4, nn.BatchNorm2d), seed=1)
    x = torch.randn(2, 4, 14, 14)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), f, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    _check_standard_ops(f.getvalue())
    sess = _session(f.getvalue())
    for shape in [(2, 4, 14, 14), (3, 4, 114, 171), (1, 4, 7, 9), (2, 4, 4, 5)]:
        xs = torch.randn(shape)
        with torch.no_grad():
            want = m(xs)
        torch.testing.assert_close(_run(sess, xs), want, rtol=1e-5, atol=1e-5)
    # The module itself is untouched by the export: still the fused path afterwards.
    assert not standard_ops_only()


def test_bottleneck_exports_with_the_dynamo_exporter():
    """torch.onnx.export's default (dynamo-based) exporter on a converted reference bottleneck."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    ref = _bn_stats(R.SCBottleneck(32, 8, 1, None), seed=2)
    fused = scnet_fused.convert(ref)
    x = torch.randn(2, 32, 18, 22)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(fused, (x,), dynamo=True, verbose=False)
    data = program.model_proto.SerializeToString()
    _check_standard_ops(data)
    with torch.no_grad():
        want = ref.double()(x.double()).float()
    torch.testing.assert_close(_run(_session(data), x), want, rtol=1e-4, atol=1e-4)


def test_strided_grouped_dilated_bottleneck_exports():
    """stride 2 with avd, groups 2, dilation 2, a downsample branch: the fused model's export equals
    the fused model."""
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    ref = _bn_stats(R.SCBottleneck(16, 8, 2, down, cardinality=2, avd=True, dilation=2), seed=3)
    fused = scnet_fused.convert(ref)
    x = torch.randn(1, 16, 23, 19)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), f, dynamo=False, opset_version=17)
    _check_standard_ops(f.getvalue())
    with torch.no_grad():
        want = fused(x)
    torch.testing.assert_close(_run(_session(f.getvalue()), x), want, rtol=1e-4, atol=1e-4)


def test_jit_trace_records_standard_ops_and_loads_without_the_package(tmp_path):
    """torch.jit.trace with gradients enabled (the usual call) passes its own check that two runs record
    the same graph, and the saved module runs where scnet_fused is never imported."""
    torch.manual_seed(0)
    fused = scnet_fused.convert(_bn_stats(R.SCBottleneck(32, 8, 1, None), seed=4))
    x = torch.randn(2, 32, 14, 18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fused, x)
    assert "scnet_fused::" not in str(traced.inlined_graph)
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    x2 = torch.randn(1, 32, 114, 30)  # another size: the index maps are recorded as arithmetic on shapes
    with torch.no_grad():
        want = fused(x2)
    torch.save(x2, tmp_path / "x.pt")
    code = (f"import sys, torch\nm = torch.jit.load({str(path)!r})\nx = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r})\n"
            "assert not any(k.startswith('scnet_fused') for k in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=1e-4, atol=1e-4)
