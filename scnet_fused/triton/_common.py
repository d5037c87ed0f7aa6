"""Host-side helpers shared by the Triton launchers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT32_LIMIT = 2 ** 31  # at or above this many elements a kernel switches to 64-bit offsets (BIG)


def layout(x: torch.Tensor):
    """(channels_last, memory_format) the kernels use for x: contiguous wins when both hold (size-1
    dims); anything else is copied to contiguous by the launcher."""
    if x.is_contiguous():
        return False, torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return True, torch.channels_last
    return False, torch.contiguous_format


@triton.jit
def flat_block(BLOCK_E: tl.constexpr, BIG: tl.constexpr):
    """This program's BLOCK_E consecutive flat indices (64-bit when BIG)."""
    pid = tl.program_id(0)
    if BIG:
        e = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)
    else:
        e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    return e
