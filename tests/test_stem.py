"""The fused models' stem (scnet_fused.modules.scnet_stem): BatchNorm + ReLU fused in training, the
BatchNorm folded into the convolution at inference, the modules wherever a hook is attached; against
the reference's stem."""

import copy

import pytest
import torch
from torch import nn

from scnet_fused import models, reference
from scnet_fused.modules import scnet_stem


def _pair(arch, **kw):
    ref = getattr(reference, arch)(num_classes=4, **kw)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    fused = getattr(models, arch)(num_classes=4, **kw)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _ref_stem(m, x):
    return m.maxpool(m.relu(m.bn1(m.conv1(x))))


@pytest.mark.parametrize("arch", ["scnet50", "scnet50_v1d"])
@pytest.mark.parametrize("training", [True, False])
def test_stem_matches_the_reference(arch, training):
    ref, fused = _pair(arch)
    assert type(fused) is models.SCNet and isinstance(fused, reference.SCNet)
    assert list(fused.state_dict()) == list(ref.state_dict())
    ref.train(training)
    fused.train(training)
    x = torch.randn(2, 3, 40, 44)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # twice: the running statistics after two updates
        ya, yb = fused.stem(a), _ref_stem(ref, b)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for (n, pa), (_, pb) in zip(fused.named_parameters(), ref.named_parameters()):
        if n.startswith(("conv1", "bn1")):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-4, msg=n)
    for (n, ba), (_, bb) in zip(fused.named_buffers(), ref.named_buffers()):
        if n.startswith(("conv1", "bn1")):
            torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-6, msg=n)


def test_stem_fuses_in_training_and_folds_at_inference(monkeypatch):
    """Which path runs: bn_relu_train in training; no BatchNorm call at inference (folded)."""
    from scnet_fused import modules

    _, fused = _pair("scnet50")
    calls = []
    real = modules.bn_relu_train
    monkeypatch.setattr(modules, "bn_relu_train", lambda *a, **k: calls.append("fused") or real(*a, **k))
    x = torch.randn(2, 3, 64, 64)  # conv1's output at least 4x its weights: folded at inference
    fused.train()
    fused.stem(x)
    assert calls == ["fused"]
    folds = []
    real_fold = modules._folded
    monkeypatch.setattr(modules, "_folded", lambda *a: folds.append(1) or real_fold(*a))
    fused.eval()
    with torch.no_grad():
        fused.stem(x)
    assert folds == [1]  # conv1 with bn1 folded in (no BatchNorm pass)
    bn_calls = []
    fused.bn1.register_forward_pre_hook(lambda m, i: bn_calls.append(1))
    with torch.no_grad():
        fused.stem(x)  # a hook on bn1: the modules run, the hook sees its call
    assert bn_calls == [1]


def test_deep_stem_fuses_its_triples(monkeypatch):
    """scnet50_v1d: the deep stem's two conv + BN + ReLU triples and bn1 + ReLU, three fused calls."""
    from scnet_fused import modules

    _, fused = _pair("scnet50_v1d")
    calls = []
    real = modules.bn_relu_train
    monkeypatch.setattr(modules, "bn_relu_train", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    fused.train()
    fused.stem(torch.randn(2, 3, 32, 32))
    assert calls == [32, 32, 64]
    calls.clear()
    fused.conv1[1].register_forward_hook(lambda m, i, o: None)  # a hook inside: that pair runs as modules
    fused.stem(torch.randn(2, 3, 32, 32))
    assert calls == [32, 64]


@pytest.mark.parametrize("where", ["bn1", "relu", "global"])
def test_hooks_run_the_modules(where):
    ref, fused = _pair("scnet50")
    seen = []

    def hook(m, i, o):
        seen.append(type(m).__name__)

    if where == "global":
        handle = nn.modules.module.register_module_forward_hook(hook)
    else:
        handle = getattr(fused, where).register_forward_hook(hook)
    try:
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(fused.stem(x), _ref_stem(ref, x), rtol=1e-4, atol=1e-5)
    finally:
        handle.remove()
    assert ("BatchNorm2d" in seen) if where in ("bn1", "global") else ("ReLU" in seen)


def test_num_classes_is_checked():
    """features_only builds no head, so a num_classes there is an error; a negative one is refused with
    its name (torch's error was about a tensor's negative dimension)."""
    with pytest.raises(ValueError, match="features_only=True does not build"):
        models.scnet50(features_only=True, num_classes=10)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 0"):
            models.scnet50(num_classes=bad)
    np = pytest.importorskip("numpy")
    out = models.scnet50(num_classes=np.int64(10), fused=False).fc.out_features  # as the reference takes it
    assert out == 10 and type(out) is int


def test_features_only_and_errors():
    ref, _ = _pair("scnet50")
    feats = models.scnet50(features_only=True, out_indices=(1, 2))
    assert type(feats) is models.FusedSCNetFeatures
    assert type(models.scnet50(features_only=True, fused=False)) is models.SCNetFeatures
    # the head and the stages after layer2 are not in the model
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith(("fc.", "layer3.", "layer4."))}
    feats.load_state_dict(state)
    plain = models.scnet50(features_only=True, out_indices=(1, 2), fused=False)
    plain.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    for m in (feats, plain):
        m.train()
    outs = feats(x)
    expect = plain(x)
    for o, e in zip(outs, expect):
        torch.testing.assert_close(o, e, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="image batch"):
        feats(torch.randn(2, 4, 64, 64))
    # a stem with a one-value-per-channel batch: BatchNorm2d's own error, as in the reference
    one = copy.deepcopy(models.scnet50()).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        scnet_stem(one.conv1, one.bn1, one.relu, one.maxpool, torch.randn(1, 3, 2, 2))
