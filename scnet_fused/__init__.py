"""scnet_fused: a fused, drop-in self-calibrated convolution (SCNet, CVPR 2020) for PyTorch."""

from . import reference
from .checkpoint import CheckpointError, load_checkpoint
from .ops import backend, sc_gate, sc_gate_bn_train

__version__ = "0.1.0"

__all__ = [
    "reference",
    "backend",
    "sc_gate",
    "sc_gate_bn_train",
    "load_checkpoint",
    "CheckpointError",
    "__version__",
]
