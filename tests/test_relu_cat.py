"""relu_cat: the bottleneck's ReLUs written straight into conv3's concatenated input."""

import pytest
import torch

from scnet_fused.ops.relu_cat import relu_cat


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_relu_then_cat(channels_last, dtype):
    a = torch.randn(3, 5, 7, 6, dtype=dtype)
    b = torch.randn(3, 7, 7, 6, dtype=dtype)
    a[0, 0, 0, 0] = 0.0  # the ReLU's gradient at exactly zero is zero, as in torch.relu
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    a.requires_grad_()
    b.requires_grad_()
    out = relu_cat(a, b)
    ref = torch.cat([torch.relu(a), torch.relu(b)], dim=1)
    assert torch.equal(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn_like(ref)
    for x, y in zip(torch.autograd.grad(out, (a, b), g), torch.autograd.grad(ref, (a, b), g)):
        assert torch.equal(x, y)


def test_opcheck_and_errors():
    a = torch.randn(2, 3, 5, 5, requires_grad=True)
    b = torch.randn(2, 4, 5, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.scnet_fused.relu_cat.default, (a, b))
    torch.library.opcheck(torch.ops.scnet_fused.relu_cat.default, (a.detach(), b.detach()))
    with pytest.raises(ValueError, match="differ outside dim 1"):
        relu_cat(a, b[:, :, :4])
    with pytest.raises(ValueError, match="dtype/device differ"):
        relu_cat(a, b.double())
