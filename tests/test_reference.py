"""The reference model: architecture, state_dict layout, constructor errors, index map."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scnet_fused import _index, reference as R


@pytest.mark.parametrize("H,h", [(14, 3), (25, 6), (7, 1), (13, 3), (56, 14), (5, 1), (28, 7), (9, 2),
                                 (100, 25), (37, 9), (8, 4), (6, 3), (31, 7), (200, 50), (1000, 7)])
def test_index_map_matches_interpolate(H, h):
    src = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1)
    expect = F.interpolate(src, size=(H, 1), mode="nearest").view(-1).long().tolist()
    assert _index.nearest_source_index(H, h) == expect
    starts = _index.cell_starts(H, h)
    assert len(starts) == h + 1 and starts[0] == 0 and starts[-1] == H
    for a in range(h):
        assert all(expect[i] == a for i in range(starts[a], starts[a + 1]))


def test_irregular_maps_of_the_spec():
    assert _index.nearest_source_index(14, 3) == [0] * 5 + [1] * 5 + [2] * 4
    assert _index.nearest_source_index(25, 6)[:13] == [0] * 5 + [1] * 4 + [2] * 4


def _small_input(n=1, size=128):
    return torch.randn(n, 3, size, size)


@pytest.mark.parametrize("ctor", [R.scnet50, R.scnet50_v1d, R.scnet101, R.scnet101_v1d])
def test_constructors_output_shape(ctor):
    model = ctor(num_classes=7).eval()
    with torch.no_grad():
        out = model(_small_input())
    assert out.shape == (1, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs,final", [(dict(dilated=True), 16), (dict(dilation=2), 8), (dict(dilation=4), 16),
                                          (dict(groups=2), 4)])
def test_variants_feature_size(kwargs, final):
    model = R.build("scnet50", num_classes=5, **kwargs).eval()
    with torch.no_grad():
        feats = model.forward_features(_small_input())
    assert feats.shape == (1, 2048, final, final)


def test_groups_changes_widths():
    m = R.scnet50(groups=2)
    blk = m.layer1[0]
    assert blk.conv1_a.out_channels == 64 and blk.k1[0].groups == 2 and blk.scconv.k3[0].groups == 2


def test_dilated_layers_use_stride_one_and_dilation():
    m = R.scnet50(dilated=True)
    assert m.layer3[0].scconv.k4[0].stride == (1, 1) and m.layer3[1].scconv.k4[0].dilation == (2, 2)
    assert m.layer4[0].scconv.k4[0].dilation == (2, 2) and m.layer4[1].scconv.k4[0].dilation == (4, 4)
    with pytest.raises(ValueError, match="dilation"):
        R.build("scnet50", dilation=3)


def test_state_dict_keys_scnet50():
    keys = list(R.scnet50().state_dict().keys())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    blk = [k[len("layer1.0."):] for k in keys if k.startswith("layer1.0.")]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expect = (["conv1_a.weight"] + [f"bn1_a.{b}" for b in bn] + ["conv1_b.weight"] + [f"bn1_b.{b}" for b in bn]
              + ["k1.0.weight"] + [f"k1.1.{b}" for b in bn]
              + ["scconv.k2.1.weight"] + [f"scconv.k2.2.{b}" for b in bn]
              + ["scconv.k3.0.weight"] + [f"scconv.k3.1.{b}" for b in bn]
              + ["scconv.k4.0.weight"] + [f"scconv.k4.1.{b}" for b in bn]
              + ["conv3.weight"] + [f"bn3.{b}" for b in bn]
              + ["downsample.0.weight"] + [f"downsample.1.{b}" for b in bn])
    assert blk == expect
    assert "layer2.0.downsample.0.weight" in keys
    assert sum(1 for k in keys if k.endswith("scconv.k2.1.weight")) == 16
    sd = R.scnet50().state_dict()
    assert sd["layer1.0.scconv.k2.1.weight"].shape == (32, 32, 3, 3)
    assert sd["conv1.weight"].shape == (64, 3, 7, 7) and sd["fc.weight"].shape == (1000, 2048)


def test_state_dict_keys_v1d():
    sd = R.scnet50_v1d().state_dict()
    assert sd["conv1.0.weight"].shape == (32, 3, 3, 3) and sd["conv1.6.weight"].shape == (64, 32, 3, 3)
    assert sd["bn1.weight"].shape == (64,)
    assert "layer2.0.downsample.1.weight" in sd and "layer2.0.downsample.0.weight" not in sd
    assert R.scnet101_v1d().state_dict()["conv1.6.weight"].shape == (128, 64, 3, 3)
    assert sum(1 for k in R.scnet101().state_dict() if k.endswith("conv3.weight")) == 33


def test_avd_layer_and_strides():
    m = R.scnet50_v1d()
    assert hasattr(m.layer2[0], "avd_layer") and not hasattr(m.layer2[1], "avd_layer")
    assert not hasattr(m.layer1[0], "avd_layer")  # layer1 is built with is_first=False, stride 1
    assert m.layer2[0].scconv.k4[0].stride == (1, 1)


def test_scconv_channel_mismatch_raises_at_construction():
    with pytest.raises(ValueError, match="inplanes == planes"):
        R.SCConv(16, 32, 1, 1, 1, 1, 4, nn.BatchNorm2d)


@pytest.mark.parametrize("shape,match", [((2, 8, 3, 9), "3x9 is smaller than pooling_r=4"),
                                         ((2, 8, 9), "4-D"), ((2, 6, 9, 9), "8 input channels")])
def test_scconv_input_errors(shape, match):
    m = R.SCConv(8, 8, 1, 1, 1, 1, 4, nn.BatchNorm2d)
    with pytest.raises(ValueError, match=match):
        m(torch.randn(*shape))


def test_reference_scconv_matches_formula():
    m = R.SCConv(6, 6, 1, 1, 1, 1, 4, nn.BatchNorm2d).eval()
    x = torch.randn(2, 6, 14, 13)
    up = F.interpolate(m.k2(x), size=(14, 13), mode="nearest")
    torch.testing.assert_close(m(x), m.k4(m.k3(x) * torch.sigmoid(x + up)))
