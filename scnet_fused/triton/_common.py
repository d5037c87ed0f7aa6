"""Host-side helpers shared by the Triton launchers."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

INT32_LIMIT = 2 ** 31  # at or above this many elements a kernel switches to 64-bit offsets (BIG)
_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)  # CUDA's blocks per launch along x, y and z


def on_tensor_device(fn):
    """``fn`` (a launcher whose first tensor argument is on the device of all its tensors) run with that
    tensor's CUDA device current. A Triton launch runs on the current device and its current stream,
    whatever device the pointers belong to: a model on ``cuda:1`` called while ``cuda:0`` is current
    would run there, unordered with cuda:1's stream (or fault without peer access)."""

    @functools.wraps(fn)
    def launch(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_cuda and a.device.index != torch.cuda.current_device():
                    with torch.cuda.device(a.device):
                        return fn(*args, **kwargs)
                break
        return fn(*args, **kwargs)

    launch.on_tensor_device = True
    return launch


class GridLimitError(ValueError):
    """A launch grid past CUDA's limits (:func:`check_grid`). ``auto`` runs such a call on its next
    backend; a forced ``triton`` backend raises it."""


def check_grid(op: str, grid: tuple, what: str) -> tuple:
    """For the 2-D and 3-D grids (a 1-D grid of 1024-element programs stays under its limit for any
    tensor a GPU holds): ``grid`` if CUDA can launch it, else a :class:`GridLimitError` naming ``what``
    made it that large (decided before anything runs; the limits hold for the interpreter's launches
    too, so the error is the same on every machine). A grid with an empty axis (an empty tensor)
    launches nothing: no limit."""
    if 0 in grid:
        return grid
    for axis, (n, limit) in enumerate(zip(grid, _GRID_LIMITS)):
        if n > limit:
            raise GridLimitError(f"{op}: {what} needs {n} programs along axis {axis} of the Triton launch grid, "
                                 f"more than CUDA's {limit}")
    return grid


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
