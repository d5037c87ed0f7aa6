"""Pure-PyTorch reference of SCNet (CVPR 2020) and of the fused kernels' math.

Two parts:

* The published architecture: :class:`SCConv`, :class:`SCBottleneck`, :class:`SCNet` and the
  ``scnet50`` / ``scnet50_v1d`` / ``scnet101`` / ``scnet101_v1d`` constructors, with the exact module
  tree and state_dict keys of the released checkpoints.  This is the oracle every fused path is
  tested against.
* The kernel-level reference (``gate_forward``, ``gate_backward``, ``gate_backward_k3``,
  ``channel_stats``): the primitives every backend implements, written with ATen ops.  It is the
  ``reference`` backend of :mod:`scnet_fused.ops` and the fallback when no compiled backend exists.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SCConv",
    "SCBottleneck",
    "SCNet",
    "scnet50",
    "scnet50_v1d",
    "scnet101",
    "scnet101_v1d",
    "check_pooled_size",
]


def check_pooled_size(height: int, width: int, pooling_r: int) -> None:
    """Raise a clear error when an (H, W) map is too small for the ``pooling_r`` average pool."""
    if height < pooling_r or width < pooling_r:
        raise ValueError(
            f"SCConv: spatial size {height}x{width} is smaller than pooling_r={pooling_r}; "
            f"the average-pooled map would be empty (H and W must both be >= {pooling_r})"
        )


def _check_sc_input(x: Tensor, inplanes: int, pooling_r: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"SCConv expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != inplanes:
        raise ValueError(
            f"SCConv expects {inplanes} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    check_pooled_size(x.shape[2], x.shape[3], pooling_r)


def checked_sc_input(x: Tensor, inplanes: int, pooling_r: int) -> Tensor:
    """``x``, once it passed SCConv's input checks. Under ``torch.fx.symbolic_trace`` this call is a node
    of the graph (``torch.fx.wrap``), so a traced model checks its inputs as the module does."""
    _check_sc_input(x, inplanes, pooling_r)
    return x


def checked_image_batch(x: Tensor) -> Tensor:
    """``x``, once it is an ``(N, 3, H, W)`` image batch (a node of a torch.fx graph, as above)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"SCNet expects an (N, 3, H, W) image batch, got shape {tuple(x.shape)}")
    return x


# torch.fx: symbolic tracing records these two as calls (their Python checks cannot run on a Proxy)
torch.fx.wrap("checked_sc_input")
torch.fx.wrap("checked_image_batch")


class SCConv(nn.Module):
    """Self-calibrated convolution (reference implementation)."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        padding: int,
        dilation: int,
        groups: int,
        pooling_r: int,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        if inplanes != planes:
            raise ValueError(
                f"SCConv needs inplanes == planes: the gate adds the {inplanes}-channel input to the "
                f"{planes}-channel calibration map (got inplanes={inplanes}, planes={planes})"
            )
        if pooling_r < 1:
            raise ValueError(f"SCConv: pooling_r must be >= 1, got {pooling_r}")
        self.inplanes = inplanes
        self.planes = planes
        self.pooling_r = pooling_r
        self.k2 = nn.Sequential(
            nn.AvgPool2d(kernel_size=pooling_r, stride=pooling_r),
            nn.Conv2d(inplanes, planes, kernel_size=3, stride=1, padding=padding,
                      dilation=dilation, groups=groups, bias=False),
            norm_layer(planes),
        )
        self.k3 = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=3, stride=1, padding=padding,
                      dilation=dilation, groups=groups, bias=False),
            norm_layer(planes),
        )
        self.k4 = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=False),
            norm_layer(planes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = checked_sc_input(x, self.inplanes, self.pooling_r)
        identity = x
        up = F.interpolate(self.k2(x), size=identity.shape[2:], mode="nearest")
        out = torch.sigmoid(torch.add(identity, up))
        out = torch.mul(self.k3(x), out)
        return self.k4(out)


class SCBottleneck(nn.Module):
    """SCNet bottleneck: a plain 3x3 branch and a self-calibrated branch (reference)."""

    expansion = 4
    pooling_r = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        cardinality: int = 1,
        bottleneck_width: int = 32,
        avd: bool = False,
        dilation: int = 1,
        is_first: bool = False,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
        *,
        scconv_cls: Optional[type] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        scconv_cls = SCConv if scconv_cls is None else scconv_cls
        width = int(planes * (bottleneck_width / 64.0)) * cardinality
        self.conv1_a = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1_a = norm_layer(width)
        self.conv1_b = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1_b = norm_layer(width)
        self.avd = avd and (stride > 1 or is_first)
        if self.avd:
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.k1 = nn.Sequential(
            nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=dilation,
                      dilation=dilation, groups=cardinality, bias=False),
            norm_layer(width),
        )
        self.scconv = scconv_cls(width, width, stride=stride, padding=dilation, dilation=dilation,
                                 groups=cardinality, pooling_r=self.pooling_r, norm_layer=norm_layer)
        self.conv3 = nn.Conv2d(width * 2, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.dilation = dilation
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        out_a = self.relu(self.bn1_a(self.conv1_a(x)))
        out_b = self.relu(self.bn1_b(self.conv1_b(x)))
        out_a = self.relu(self.k1(out_a))
        out_b = self.relu(self.scconv(out_b))
        if self.avd:
            out_a = self.avd_layer(out_a)
            out_b = self.avd_layer(out_b)
        out = self.bn3(self.conv3(torch.cat([out_a, out_b], dim=1)))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        return self.relu(out)


class SCNet(nn.Module):
    """SCNet backbone (reference). ``block`` is the bottleneck class (reference or fused)."""

    def __init__(
        self,
        block: type = SCBottleneck,
        layers: tuple = (3, 4, 6, 3),
        groups: int = 1,
        bottleneck_width: int = 32,
        num_classes: int = 1000,
        dilated: bool = False,
        dilation: int = 1,
        deep_stem: bool = False,
        stem_width: int = 64,
        avg_down: bool = False,
        avd: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"SCNet needs four stage depths, got layers={tuple(layers)}")
        if dilation not in (1, 2, 4):
            raise ValueError(f"SCNet: dilation must be 1, 2 or 4, got {dilation}")
        if groups < 1 or bottleneck_width < 1 or stem_width < 1:
            raise ValueError(f"SCNet: groups, bottleneck_width and stem_width must be positive, got {groups}, "
                             f"{bottleneck_width}, {stem_width}")
        self.cardinality = groups
        self.bottleneck_width = bottleneck_width
        self.inplanes = stem_width * 2 if deep_stem else 64
        self.avg_down = avg_down
        self.avd = avd

        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_width, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width * 2, kernel_size=3, stride=1, padding=1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], norm_layer=norm_layer, is_first=False)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, norm_layer=norm_layer)
        if dilated or dilation == 4:
            self.layer3 = self._make_layer(block, 256, layers[2], stride=1, dilation=2, norm_layer=norm_layer)
            self.layer4 = self._make_layer(block, 512, layers[3], stride=1, dilation=4, norm_layer=norm_layer)
        elif dilation == 2:
            self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilation=1, norm_layer=norm_layer)
            self.layer4 = self._make_layer(block, 512, layers[3], stride=1, dilation=2, norm_layer=norm_layer)
        else:
            self.layer3 = self._make_layer(block, 256, layers[2], stride=2, norm_layer=norm_layer)
            self.layer4 = self._make_layer(block, 512, layers[3], stride=2, norm_layer=norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            # (a norm_layer that is a factory rather than a class, functools.partial or a lambda: its
            # modules keep their own initialisation, for BatchNorm and GroupNorm the same ones and zeros)
            elif isinstance(norm_layer, type) and isinstance(m, norm_layer) and getattr(m, "weight", None) is not None:
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1, norm_layer=None, is_first=True):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down_layers = []
            if self.avg_down:
                k = stride if dilation == 1 else 1
                down_layers.append(nn.AvgPool2d(kernel_size=k, stride=k, ceil_mode=True,
                                                count_include_pad=False))
                down_layers.append(nn.Conv2d(self.inplanes, planes * block.expansion,
                                             kernel_size=1, stride=1, bias=False))
            else:
                down_layers.append(nn.Conv2d(self.inplanes, planes * block.expansion,
                                             kernel_size=1, stride=stride, bias=False))
            down_layers.append(norm_layer(planes * block.expansion))
            downsample = nn.Sequential(*down_layers)

        if dilation in (1, 2):
            first_dilation = 1
        elif dilation == 4:
            first_dilation = 2
        else:
            raise ValueError(f"SCNet: unsupported stage dilation {dilation} (expected 1, 2 or 4)")
        layers = [block(self.inplanes, planes, stride, downsample=downsample,
                        cardinality=self.cardinality, bottleneck_width=self.bottleneck_width,
                        avd=self.avd, dilation=first_dilation, is_first=is_first,
                        norm_layer=norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, cardinality=self.cardinality,
                                bottleneck_width=self.bottleneck_width, avd=self.avd,
                                dilation=dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: Tensor) -> Tensor:
        x = checked_image_batch(x)
        x = self.forward_features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# Constructor table of SPEC.md: layers, deep_stem, stem_width, avg_down, avd.
ARCHS = {
    "scnet50": dict(layers=(3, 4, 6, 3), deep_stem=False, stem_width=32, avg_down=False, avd=False),
    "scnet50_v1d": dict(layers=(3, 4, 6, 3), deep_stem=True, stem_width=32, avg_down=True, avd=True),
    "scnet101": dict(layers=(3, 4, 23, 3), deep_stem=False, stem_width=64, avg_down=False, avd=False),
    "scnet101_v1d": dict(layers=(3, 4, 23, 3), deep_stem=True, stem_width=64, avg_down=True, avd=True),
}


def build(arch: str, block: type = SCBottleneck, **kwargs) -> SCNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown SCNet architecture {arch!r}; choose one of {sorted(ARCHS)}")
    cfg = dict(ARCHS[arch])
    cfg.update(kwargs)
    return SCNet(block, **cfg)


def _pretrained_model(arch: str, pretrained, kwargs) -> SCNet:
    check_hash = kwargs.pop("check_hash", False)
    model = build(arch, **kwargs)
    from .checkpoint import load_pretrained, wants_pretrained

    if wants_pretrained(pretrained):
        load_pretrained(model, arch, pretrained, check_hash=check_hash)
    elif check_hash:
        raise ValueError("check_hash applies to pretrained weights; pass pretrained=True or a file path")
    return model


def scnet50(pretrained=False, **kwargs) -> SCNet:
    """SCNet-50. ``pretrained``: False, True (published weights via the hub cache) or a file path;
    ``check_hash=True`` checks the file against the published file's SHA-256 prefix."""
    return _pretrained_model("scnet50", pretrained, kwargs)


def scnet50_v1d(pretrained=False, **kwargs) -> SCNet:
    """SCNet-50 v1d (deep stem, average-pool downsampling, avd)."""
    return _pretrained_model("scnet50_v1d", pretrained, kwargs)


def scnet101(pretrained=False, **kwargs) -> SCNet:
    """SCNet-101."""
    return _pretrained_model("scnet101", pretrained, kwargs)


def scnet101_v1d(pretrained=False, **kwargs) -> SCNet:
    """SCNet-101 v1d (no published weights exist for it)."""
    return _pretrained_model("scnet101_v1d", pretrained, kwargs)


# ---------------------------------------------------------------------------------------------
# Kernel-level reference: the primitives every backend implements (see scnet_fused/ops/_dispatch.py).
# All math in float32 (float64 when the inputs are float64); results cast back to the input dtype.
# ---------------------------------------------------------------------------------------------


def _acc(t: Tensor) -> Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _per_channel(v: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return None if v is None else _acc(v).view(1, -1, 1, 1).to(like.dtype)


def _upsample(small: Tensor, size) -> Tensor:
    if small.numel() == 0:  # no channels or no images: ATen's upsampling refuses them; nothing to compute
        return _acc(small)[:, :, :1, :1].expand(*small.shape[:2], *size)
    return F.interpolate(_acc(small), size=size, mode="nearest")


def _gate_sigmoid(x: Tensor, small: Tensor, small_scale: Optional[Tensor] = None,
                  small_shift: Optional[Tensor] = None) -> Tensor:
    # the pooled map through its per-channel affine (the pooled branch's BatchNorm), if any
    up = _upsample(_affine(small, small_scale, small_shift), x.shape[-2:])
    return torch.sigmoid(_acc(x) + up)


def _affine(k3: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    a = _acc(k3)
    if scale is not None:
        a = a * _per_channel(scale, a)
    if shift is not None:
        a = a + _per_channel(shift, a)
    return a


def _like(t: Tensor, ref: Tensor) -> Tensor:
    from .ops._dispatch import _functorch_active

    if _functorch_active():  # no layouts inside torch.func transforms (vmap refuses the query)
        return t.to(ref.dtype)
    fmt = torch.channels_last if ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous() \
        else torch.contiguous_format
    return t.to(ref.dtype).contiguous(memory_format=fmt)


def gate_forward(x: Tensor, small: Tensor, k3: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                 small_scale: Optional[Tensor] = None, small_shift: Optional[Tensor] = None) -> Tensor:
    """y = (k3 * scale + shift) * sigmoid(x + upsample_nearest(small * small_scale + small_shift))."""
    return _like(_affine(k3, scale, shift) * _gate_sigmoid(x, small, small_scale, small_shift), x)


def upsample_adjoint(grad_full: Tensor, small_size) -> Tensor:
    """Adjoint of nearest upsampling: block sums of ``grad_full`` onto ``small_size`` (irregular)."""
    h, w = (int(v) for v in small_size)
    N, C, H, W = grad_full.shape
    return torch.ops.aten.upsample_nearest2d_backward(grad_full, [H, W], [N, C, h, w], None, None)


def gate_backward(dy: Tensor, x: Tensor, small: Tensor, k3: Tensor, scale: Optional[Tensor],
                  shift: Optional[Tensor], center: Optional[Tensor], need_dk3: bool,
                  small_scale: Optional[Tensor] = None, small_shift: Optional[Tensor] = None,
                  need_sums: bool = True):
    """One pass of the gate's backward.

    Returns ``(dx, dsmall, dk3 or None, sum_g, sum_gk)`` where ``s = sigmoid(x + up(small))``,
    ``g = dy * s``, ``dx = dy * affine(k3) * s * (1 - s)``, ``dsmall = upsample_adjoint(dx)``,
    ``dk3 = g * scale`` (``g`` without scale), ``sum_g[c] = sum g`` and
    ``sum_gk[c] = sum g * (k3 - center)`` over N, H, W (``center`` 0 when None), both float32. With
    ``small_scale`` / ``small_shift``, ``up`` reads ``small * small_scale + small_shift`` and dsmall is
    the gradient of that affine's output (the cell sums of dx, not multiplied by small_scale).
    ``need_sums=False``: sum_g and sum_gk are empty (0 elements).
    """
    s = _gate_sigmoid(x, small, small_scale, small_shift)
    d = _acc(dy)
    g = d * s
    dz = d * _affine(k3, scale, shift) * s * (1 - s)
    dx = _like(dz, x)
    dsmall = upsample_adjoint(dz, small.shape[-2:]).to(small.dtype).contiguous()
    dk3 = None
    if need_dk3:
        dk3 = _like(g * _per_channel(scale, g) if scale is not None else g, k3)
    kc = _acc(k3)
    if center is not None:
        kc = kc - _per_channel(center, kc)
    acc_dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    if not need_sums:
        return dx, dsmall, dk3, g.new_empty(0, dtype=acc_dtype), g.new_empty(0, dtype=acc_dtype)
    sum_g = g.sum(dim=(0, 2, 3)).to(acc_dtype)
    sum_gk = (g * kc).sum(dim=(0, 2, 3)).to(acc_dtype)
    return dx, dsmall, dk3, sum_g, sum_gk


def gate_backward_k3(dy: Tensor, x: Tensor, small: Tensor, k3: Tensor, p: Tensor, q: Tensor,
                     r: Tensor, small_scale: Optional[Tensor] = None,
                     small_shift: Optional[Tensor] = None) -> Tensor:
    """dk3 = p[c] * dy * sigmoid(x + up(small)) + q[c] * k3 + r[c] (the BN-training input gradient)."""
    g = _acc(dy) * _gate_sigmoid(x, small, small_scale, small_shift)
    k = _acc(k3)
    out = g * _per_channel(p, g) + k * _per_channel(q, k) + _per_channel(r, k)
    return _like(out, k3)


def channel_stats(t: Tensor):
    """Per-channel mean and biased variance over N, H, W, in float32 (float64 for float64 input)."""
    a = _acc(t)
    # Two passes (not var_mean's running update): an infinite value gives an infinite mean, as
    # nn.BatchNorm2d's, where a running update gives inf - inf = NaN.
    mean = a.mean(dim=(0, 2, 3))
    var = (a - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    return mean, var


def avgpool(x: Tensor, r: int) -> Tensor:
    """The ``r x r``, stride-``r`` average pool (trailing rows and columns dropped), in x's format."""
    r = int(r)
    if x.dim() == 4 and x.shape[1] == 0:  # ATen's pool refuses zero channels: the empty result, as a slice
        return _like(_acc(x)[:, :, : x.shape[2] // r, : x.shape[3] // r], x)
    return _like(F.avg_pool2d(_acc(x), r, r), x)


def avgpool_backward(dy: Tensor, H: int, W: int, r: int, channels_last: bool) -> Tensor:
    """dx of :func:`avgpool` for an ``H x W`` input: ``dy / r**2`` over each window, 0 in the dropped
    trailing rows and columns."""
    r = int(r)
    N, C, h, w = dy.shape
    spread = _acc(dy).repeat_interleave(r, dim=2).repeat_interleave(r, dim=3) / (r * r)
    dx = torch.zeros((N, C, int(H), int(W)), dtype=spread.dtype, device=dy.device)
    dx[:, :, : h * r, : w * r] = spread
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return dx.to(dy.dtype).contiguous(memory_format=fmt)


def _affine_relu_z(t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return _acc(t) * _per_channel(scale, _acc(t)) + _per_channel(shift, _acc(t))


def _relu_grad(dy: Tensor, z: Tensor) -> Tensor:
    return torch.where(z <= 0, torch.zeros((), dtype=z.dtype), _acc(dy))  # a NaN z passes dy, as torch's ReLU


def affine_relu(t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(t * scale[c] + shift[c]) (NaN propagates), in t's dtype and memory format."""
    return _like(torch.relu(_affine_relu_z(t, scale, shift)), t)


def affine_add_relu(t: Tensor, residual: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(t * scale[c] + shift[c] + residual) (NaN propagates), in t's dtype and memory format."""
    return _like(torch.relu(_affine_relu_z(t, scale, shift) + _acc(residual)), t)


def affine_relu_out(t: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """relu(t * scale[c] + shift[c]) written into ``out`` (t's shape; any strides, e.g. a channel slice)."""
    out.copy_(torch.relu(_affine_relu_z(t, scale, shift)))
    return out


def affine_relu_backward_sums(dy: Tensor, t: Tensor, scale: Tensor, shift: Tensor, center: Tensor):
    """Per-channel (sum g, sum g * (t - center)), g = dy where relu's input is not <= 0."""
    g = _relu_grad(dy, _affine_relu_z(t, scale, shift))
    acc_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    tc = _acc(t) - _per_channel(center, _acc(t))
    return g.sum(dim=(0, 2, 3)).to(acc_dtype), (g * tc).sum(dim=(0, 2, 3)).to(acc_dtype)


def affine_relu_backward_apply(dy: Tensor, t: Tensor, scale: Tensor, shift: Tensor, p: Tensor, q: Tensor,
                               r: Tensor) -> Tensor:
    """dt = p[c] * g + q[c] * t + r[c]."""
    a = _acc(t)
    g = _relu_grad(dy, _affine_relu_z(t, scale, shift))
    return _like(g * _per_channel(p, a) + a * _per_channel(q, a) + _per_channel(r, a), t)
