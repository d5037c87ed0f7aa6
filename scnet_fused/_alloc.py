"""Output allocation for the kernels' launchers.

With ``SCNET_FUSED_POISON=1`` (the test suite sets it) every output buffer is filled with NaN before a
kernel writes it, so an element a kernel forgets to write fails a parity test instead of passing by
luck with whatever the allocator returned. The C++ kernels honour the same variable.
"""

from __future__ import annotations

import os

import torch


def poison_enabled() -> bool:
    return os.environ.get("SCNET_FUSED_POISON", "0") not in ("", "0")


def new_empty(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if poison_enabled():
        t.fill_(float("nan"))
    return t
