"""SCNet-50/101 (and v1d) built from the fused modules, with checkpoint loading and a
feature-pyramid mode for detection and segmentation backbones."""

from __future__ import annotations

import operator
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import reference
from .checkpoint import load_pretrained, wants_pretrained
from .modules import MaxPool2d, SCBottleneck, scnet_stem
from .ops._dispatch import exporting, fx_symbolic, standard_ops_only

__all__ = ["scnet50", "scnet50_v1d", "scnet101", "scnet101_v1d", "SCNetFeatures", "build"]


class SCNetFeatures(reference.SCNet):
    """SCNet returning the stage feature maps selected by ``out_indices`` (1..4 = layer1..layer4).

    ``out_indices``: strictly increasing stage numbers (the maps come out in that order).
    ``feature_info``: one dict per returned map with ``module``, ``num_chs`` and ``reduction`` (stride
    to the input). The classifier head (``avgpool``, ``fc``) and the stages after the last selected one
    are not kept (no parameters that get no gradient, which DistributedDataParallel would reject);
    ``pretrained`` checkpoints load with those keys ignored.
    """

    def __init__(self, *args, out_indices: Sequence[int] = (1, 2, 3, 4), **kwargs):
        out_indices = _checked_out_indices(out_indices)
        super().__init__(*args, **kwargs)
        self.out_indices = out_indices
        del self.avgpool
        del self.fc
        info, reduction = [], 4
        for i in range(1, 5):
            layer = getattr(self, f"layer{i}")
            first = layer[0]
            stride = _layer_stride(first)
            reduction *= stride
            channels = first.conv3.out_channels
            info.append(dict(module=f"layer{i}", num_chs=channels, reduction=reduction))
        self.feature_info = [info[i - 1] for i in out_indices]
        for i in range(max(out_indices) + 1, 5):  # stages past the last map: no unused parameters (DDP)
            delattr(self, f"layer{i}")

    @property
    def channels(self) -> List[int]:
        return [f["num_chs"] for f in self.feature_info]

    @property
    def strides(self) -> List[int]:
        return [f["reduction"] for f in self.feature_info]

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> List[Tensor]:
        x = reference.checked_image_batch(x)
        x = self.stem(x)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if i in self.out_indices:
                outs.append(x)
            if i >= max(self.out_indices):
                break
        return outs


def _checked_out_indices(out_indices) -> tuple:
    """``out_indices`` as a tuple of stage numbers, strictly increasing (the order the maps come out in),
    each 1..4; anything else a clear error."""
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence):
        raise TypeError(f"out_indices must be a sequence of stage numbers (1..4), got {out_indices!r}")
    try:
        if any(isinstance(i, bool) for i in out_indices):
            raise TypeError
        idx = tuple(operator.index(i) for i in out_indices)
    except TypeError:
        raise TypeError(f"out_indices must hold ints (stage numbers 1..4), got {out_indices!r}") from None
    if not idx or any(i not in (1, 2, 3, 4) for i in idx):
        raise ValueError(f"out_indices must be a non-empty subset of (1, 2, 3, 4), got {idx}")
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise ValueError(f"out_indices must be strictly increasing (the maps come out in stage order), got {idx}")
    return idx


# Eval images of at least this many pixels (H * W: 192 x 192) run channels_last on a CPU.
_CPU_CHANNELS_LAST_EVAL_PIXELS = 192 * 192


def _cpu_channels_last(x: Tensor, training: bool, policy) -> bool:
    """Whether the fused classifier converts a CPU batch to channels_last before its stem (``policy``:
    :attr:`SCNet.cpu_channels_last`). The logits do not depend on the layout; only the maps inside do.

    ``"auto"``: under torch.compile (not torch.export), always. Inductor runs a CPU graph's
    convolutions channels_last whatever the input's layout, while the fused ops' outputs keep their
    input's layout: from an NCHW batch the graph converted the maps between the two around every fused
    op (the compiled scnet50 training step at N = 8, 224 px: 0.86x the speed of the compiled reference
    that way, 1.08x this way; benchmarks/results/cpu-xeon/compile_model.md). Eager, when training and
    for eval images of at least 192 x 192 px: the 1x1 convolutions from 128 channels are then matrix
    products and the Winograd tiles are read with the channels innermost. On the Intel Xeon (2 threads,
    interleaved rounds in one process, benchmarks/results/cpu-xeon/eager_layout.md, medians) the
    training step ran 1.02x-1.08x faster from 2 images of 128 px to 8 of 224 px; the eval forward
    1.02x-1.16x faster with 224 px images (1 to 8 of them) and 1.04x with 192 px, 0.99x-1.02x with
    160 px, and 0.94x-0.98x with one to four 128 px images (1.02x with eight), so eval images below
    192 px keep their layout.
    Never while ``torch.jit`` traces or scripts (the traced graph keeps the caller's layout), inside a
    ``torch.func`` transform (vmap cannot convert a batched tensor's memory format) or with a
    forward-mode AD level open: there the modules run the reference computation anyway.
    """
    if fx_symbolic(x) or x.dim() != 4 or x.device.type != "cpu" or policy is False:
        return False  # (a torch.fx graph keeps the caller's layout)
    if torch.compiler.is_compiling():
        return not exporting()
    if torch.jit.is_scripting() or standard_ops_only():  # tracing, torch.func transforms, forward-mode AD
        return False
    if policy is True:
        return True
    return training or x.shape[2] * x.shape[3] >= _CPU_CHANNELS_LAST_EVAL_PIXELS


class _FusedStem:
    def stem(self, x: Tensor) -> Tensor:
        """The stem with bn1 + ReLU fused (:func:`scnet_fused.modules.scnet_stem`)."""
        return scnet_stem(self.conv1, self.bn1, self.relu, self.maxpool, x)


class SCNet(_FusedStem, reference.SCNet):
    """The fused models' SCNet: :class:`scnet_fused.reference.SCNet` (same module tree and state_dict)
    whose stem runs through :func:`scnet_fused.modules.scnet_stem`; its blocks are the fused
    SCBottlenecks and its stem pool :class:`scnet_fused.modules.MaxPool2d` (see :func:`build`)."""

    #: On a CPU the classifier may run its maps channels_last (the logits are the same either way):
    #: ``"auto"`` (the default; see :func:`_cpu_channels_last`), ``True`` (always), ``False`` (the
    #: caller's layout). A class attribute, so the state_dict is unchanged; set it on an instance to
    #: override it there.
    cpu_channels_last = "auto"

    def forward(self, x: Tensor) -> Tensor:
        policy = self.cpu_channels_last
        if not (policy is True or policy is False or (isinstance(policy, str) and policy == "auto")):
            raise ValueError(f"cpu_channels_last must be 'auto', True or False, got {policy!r}")
        if _cpu_channels_last(x, self.training, policy):
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


class FusedSCNetFeatures(_FusedStem, SCNetFeatures):
    """:class:`SCNetFeatures` with the fused stem (the fused models' ``features_only=True``)."""


def _layer_stride(block: nn.Module) -> int:
    """The spatial stride of a bottleneck (in avd_layer for v1d, in k1/scconv otherwise)."""
    if getattr(block, "avd", False):
        s = block.avd_layer.stride
    else:
        s = block.k1[0].stride
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def build(arch: str, fused: bool = True, pretrained=False, features_only: bool = False,
          out_indices: Optional[Sequence[int]] = None, check_hash: bool = False, **kwargs) -> nn.Module:
    """An SCNet of ``arch`` (scnet50, scnet50_v1d, scnet101, scnet101_v1d).

    ``fused``: fused SCBottleneck/SCConv (default) or the reference modules; the state_dict is the
    same either way. ``pretrained``: False, True (the published file via the torch hub cache) or a
    path; ``check_hash=True`` checks the file against the published file's SHA-256 prefix (not the
    default). ``features_only``: return the stage feature maps (see :class:`SCNetFeatures`) of the stages
    ``out_indices`` (default all four; stages after the last one selected are not built).
    """
    if arch not in reference.ARCHS:
        raise ValueError(f"unknown SCNet architecture {arch!r}; choose one of {sorted(reference.ARCHS)}")
    block = SCBottleneck if fused else reference.SCBottleneck
    cfg = dict(reference.ARCHS[arch])
    cfg.update(kwargs)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the stage maps of features_only=True; pass features_only=True too")
    if features_only and "num_classes" in kwargs:
        raise ValueError("num_classes sizes the classification head, which features_only=True does not build")
    if "num_classes" in cfg:
        n = cfg["num_classes"]
        if isinstance(n, (bool, Tensor)) or not hasattr(type(n), "__index__") or operator.index(n) < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {n!r}")
        cfg["num_classes"] = operator.index(n)  # (a numpy integer as a Python int)
    if features_only:
        cfg.pop("num_classes", None)
        model = (FusedSCNetFeatures if fused else SCNetFeatures)(
            block, out_indices=(1, 2, 3, 4) if out_indices is None else out_indices, **cfg)
    else:
        model = (SCNet if fused else reference.SCNet)(block, **cfg)
    if fused and type(model.maxpool) is nn.MaxPool2d:
        pool = model.maxpool  # the stem's pool on the package's kernel (no state: the state_dict is unchanged)
        model.maxpool = MaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                                  pool.ceil_mode)
    if wants_pretrained(pretrained):
        ignore = ()
        if features_only:  # the head, and the stages not built
            ignore = ("fc.",) + tuple(f"layer{i}." for i in range(max(model.out_indices) + 1, 5))
        load_pretrained(model, arch, pretrained, check_hash=check_hash, ignore_prefixes=ignore)
    elif check_hash:
        raise ValueError("check_hash applies to pretrained weights; pass pretrained=True or a file path")
    return model


def scnet50(pretrained=False, fused: bool = True, **kwargs) -> nn.Module:
    """SCNet-50 (fused by default)."""
    return build("scnet50", fused=fused, pretrained=pretrained, **kwargs)


def scnet50_v1d(pretrained=False, fused: bool = True, **kwargs) -> nn.Module:
    """SCNet-50 v1d: deep stem, average-pool downsampling, avd (fused by default)."""
    return build("scnet50_v1d", fused=fused, pretrained=pretrained, **kwargs)


def scnet101(pretrained=False, fused: bool = True, **kwargs) -> nn.Module:
    """SCNet-101 (fused by default)."""
    return build("scnet101", fused=fused, pretrained=pretrained, **kwargs)


def scnet101_v1d(pretrained=False, fused: bool = True, **kwargs) -> nn.Module:
    """SCNet-101 v1d (fused by default; no published weights exist for it)."""
    return build("scnet101_v1d", fused=fused, pretrained=pretrained, **kwargs)
