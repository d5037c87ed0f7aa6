"""1x1 convolutions of channels_last float32 CPU maps as matrix products.

With the channels innermost, a 1x1 convolution (stride 1, no padding, one group) is one matrix product:
the map's pixels as rows, ``Y (N*H*W, K) = X (N*H*W, C) @ W^T``, and its gradients two more,
``dX = dY @ W`` and ``dW = dY^T @ X``, each a single torch.mm over the whole batch. Against oneDNN,
which ``F.conv2d`` calls, on a 2-core Intel Xeon (AVX-512, MKL), N = 8, channels_last, SCNet-50's 1x1
convolutions forward + both gradients (``benchmarks/results/cpu-xeon/conv1x1.md``): 1.30x-1.60x as
fast at 7 px, 1.03x-1.17x at 14 px, 0.96x-1.03x at 28 px, 0.95x at 56 px with 128 output channels and
0.85x-0.91x with 64 channels on either side; the fused scnet50 channels_last training step 1.06x
(``conv1x1_model.md``: 986 against 1050 ms; 1014 with the 64-channel ones as products too). The rule
(``"auto"``): an Intel CPU, at least :data:`MIN_CHANNELS` input and output channels, eager PyTorch, a
float32 CPU map whose channel stride is 1 (channels_last, or a strided view of such a map: the
subsampled input of a strided 1x1 convolution), autograd on (the fused modules call it there; at
inference the forward alone was 1.22x-1.25x as fast at 7 px but 0.86x-1.17x at the larger maps).
Not taken: NCHW maps (one product per image for the weight gradient: the scnet50 training step did not
gain in a trial), other CPUs (on AMD, torch.mm is MKL's slower path and oneDNN has its own products;
not measured), torch.compile / torch.export (inductor plans its own). :func:`set_conv1x1` (or ``SCNET_FUSED_CONV1X1``) forces either
way; the 3x3 convolutions' setting (:func:`scnet_fused.ops.set_conv_algorithm`) is another.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import winograd

_MODES = ("auto", "gemm", "onednn")
_ENV = "SCNET_FUSED_CONV1X1"


def _env_mode() -> str:
    return winograd._env_choice(_ENV, _MODES)


_mode = _env_mode()
_intel: Optional[bool] = None
# "auto": at least this many input and output channels (measured: module docstring)
MIN_CHANNELS = 128


def set_conv1x1(mode: str) -> str:
    """How the fused modules run their 1x1 convolutions of channels_last float32 CPU maps: ``"auto"`` (as
    matrix products on Intel CPUs, the default), ``"gemm"`` (as matrix products on any CPU) or
    ``"onednn"`` (always ``F.conv2d``). Returns the previous setting."""
    global _mode
    previous, _mode = _mode, winograd._checked_choice("set_conv1x1", mode, _MODES)
    return previous


def get_conv1x1() -> str:
    return _mode


def _on_intel() -> bool:
    global _intel
    if _intel is None:
        _intel = winograd._cpu_vendor() == "GenuineIntel"
    return _intel


def gemm_applies(x: Tensor, weights: Sequence[Tensor], stride, padding, dilation, groups: int) -> bool:
    """Whether the convolution of ``x`` with the filters ``weights`` (one, or several stacked along the
    output channels) runs as matrix products (module docstring): 1x1 float32 filters of x's channels,
    stride 1, no padding, no dilation, one group; x a non-empty 4-D float32 CPU tensor with unit channel
    stride, in plain eager PyTorch; and the setting (``"auto"``: an Intel CPU and at least
    :data:`MIN_CHANNELS` input and output channels)."""
    mode = _mode
    if mode == "onednn" or not winograd._plain_eager(x, weights[0]):
        return False
    if not (x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0
            and x.stride(1) == 1 and groups == 1 and winograd._pair(stride) == (1, 1)
            and winograd._pair(padding) == (0, 0) and winograd._pair(dilation) == (1, 1)):
        return False
    for w in weights:
        if not (type(w) in (torch.Tensor, torch.nn.Parameter) and w.dim() == 4 and w.dtype == torch.float32
                and w.device.type == "cpu" and w.shape[0] > 0 and w.shape[1] == x.shape[1]
                and tuple(w.shape[2:]) == (1, 1)):
            return False
    if mode == "gemm":
        return True
    return _on_intel() and min(x.shape[1], sum(w.shape[0] for w in weights)) >= MIN_CHANNELS


def _rows(t: Tensor) -> Tensor:
    """``(N, C, H, W)`` with unit channel stride as ``(N*H*W, C)``: a view where t is channels_last-dense,
    a copy for a strided view."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _unrows(m: Tensor, like: Tensor) -> Tensor:
    """``(N*H*W, K)`` rows back as the channels_last ``(N, K, H, W)`` map of ``like``'s N, H and W."""
    return m.view(like.shape[0], like.shape[2], like.shape[3], m.shape[1]).permute(0, 3, 1, 2)


def forward(x: Tensor, weight: Tensor) -> Tensor:
    """``F.conv2d(x, weight)`` for a 1x1 ``weight`` (K, C, 1, 1); the output channels_last."""
    return _unrows(torch.mm(_rows(x), weight.reshape(weight.shape[0], weight.shape[1]).t()), x)


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_weight: bool):
    """``(dx | None, dweight | None)`` of :func:`forward`: dx channels_last, dweight like
    weight's shape."""
    g = _rows(grad_out.contiguous(memory_format=torch.channels_last))
    K, C = weight.shape[0], weight.shape[1]
    dx = _unrows(torch.mm(g, weight.reshape(K, C)), x) if need_input else None
    dw = torch.mm(g.t(), _rows(x)).view(K, C, 1, 1) if need_weight else None
    return dx, dw
