"""Fused ops: public functions over torch.library custom ops, one file per fused computation."""

from ._dispatch import BACKENDS, BackendUnavailable, available, backend, requested, select
from .avgpool import sc_avgpool
from .bn_relu import affine_add_relu, bn_add_relu_train, bn_relu_cat_train, bn_relu_train
from .conv1x1 import get_conv1x1, set_conv1x1
from .sc_gate import check_gate_inputs, sc_gate, sc_gate_bn2_train, sc_gate_bn_train
from .winograd import conv3x3_winograd, get_conv_algorithm, set_conv_algorithm, set_filter_cache

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available",
    "backend",
    "requested",
    "select",
    "check_gate_inputs",
    "sc_gate",
    "sc_gate_bn_train",
    "sc_gate_bn2_train",
    "sc_avgpool",
    "bn_relu_train",
    "bn_relu_cat_train",
    "bn_add_relu_train",
    "affine_add_relu",
    "conv3x3_winograd",
    "set_conv_algorithm",
    "get_conv_algorithm",
    "set_filter_cache",
    "set_conv1x1",
    "get_conv1x1",
]
