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


def channel_pitch(t: torch.Tensor, channels_last: bool) -> int:
    """The channel pitch of ``t`` when it is dense in that layout or a channel slice of such a buffer
    (a half of a concatenation), else 0; the rule of ``channel_pitch`` in csrc/sc_host.h."""
    if t.dim() != 4:
        return 0
    _, C, H, W = t.shape
    s = t.stride()
    if not channels_last:
        if s[3] != 1 or s[2] != W or s[1] != H * W or H * W == 0 or s[0] % (H * W) != 0:
            return 0
        cp = s[0] // (H * W)
        return cp if cp >= C else 0
    cp = s[3]
    if s[1] != 1 or cp < C or s[2] != W * cp or s[0] != H * W * cp:
        return 0
    return cp


def in_layout_or_slice(t: torch.Tensor, channels_last: bool, fmt: torch.memory_format):
    """(tensor, pitch): t itself when dense in the layout or a channel slice, else a dense copy."""
    cp = channel_pitch(t, channels_last)
    if cp:
        return t, cp
    return t.contiguous(memory_format=fmt), t.shape[1]


@triton.jit
def unflatten(e, C, rows, cols, CHANNELS_LAST: tl.constexpr):
    """(n, c, row, col) of the flat index e of an (N, C, rows, cols) tensor stored NCHW or NHWC."""
    if CHANNELS_LAST:
        c = e % C
        rest = e // C
        col = rest % cols
        rest = rest // cols
        row = rest % rows
        n = rest // rows
    else:
        col = e % cols
        rest = e // cols
        row = rest % rows
        rest = rest // rows
        c = rest % C
        n = rest // C
    return n, c, row, col


@triton.jit
def offset4(n, c, row, col, C, rows, cols, CHANNELS_LAST: tl.constexpr):
    """Offset of element (n, c, row, col) in a dense (N, C, rows, cols) tensor stored NCHW or NHWC
    (C may be the channel pitch of a wider buffer the tensor is a channel slice of)."""
    if CHANNELS_LAST:
        off = ((n * rows + row) * cols + col) * C + c
    else:
        off = ((n * C + c) * rows + row) * cols + col
    return off
