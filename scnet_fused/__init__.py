"""scnet_fused: a fused, drop-in self-calibrated convolution (SCNet, CVPR 2020) for PyTorch.

    import scnet_fused
    conv = scnet_fused.SCConv(64, 64, stride=1, padding=1, dilation=1, groups=1, pooling_r=4,
                              norm_layer=torch.nn.BatchNorm2d)      # same args/state_dict as SCNet's
    model = scnet_fused.convert(existing_scnet)                      # swap in the fused modules
    model = scnet_fused.models.scnet50(pretrained="scnet50-dc6a7e87.pth")
"""

import warnings as _warnings

import torch as _torch

from .ops._dispatch import _release

# The oldest torch the whole test suite has passed on (README, "Supported"). An older one can still
# reach this package (an install without dependencies, a build in place): say so once, at import.
MIN_TORCH = (2, 9)
if _release(_torch.__version__) < MIN_TORCH:
    _warnings.warn(f"scnet_fused needs torch >= {'.'.join(map(str, MIN_TORCH))}; this is torch {_torch.__version__}, "
                   "on which parts of it fail (on torch 2.6: torch.compile / torch.export integration, "
                   "activation checkpointing's early stop)", RuntimeWarning, stacklevel=2)

from . import models, reference  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from .convert import convert, convert_with_report  # noqa: E402
from .modules import SCBottleneck, SCConv  # noqa: E402
from .ops import backend, get_conv_algorithm, sc_avgpool, sc_gate, sc_gate_bn2_train, sc_gate_bn_train  # noqa: E402
from .ops import get_conv1x1, set_conv1x1, set_conv_algorithm, set_filter_cache  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SCConv",
    "SCBottleneck",
    "convert",
    "convert_with_report",
    "models",
    "reference",
    "backend",
    "sc_gate",
    "sc_gate_bn_train",
    "sc_gate_bn2_train",
    "sc_avgpool",
    "set_conv_algorithm",
    "get_conv_algorithm",
    "set_filter_cache",
    "set_conv1x1",
    "get_conv1x1",
    "load_checkpoint",
    "CheckpointError",
    "__version__",
]
