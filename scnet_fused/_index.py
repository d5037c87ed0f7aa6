"""The nearest-upsampling index map, computed exactly as PyTorch computes it.

PyTorch's ``interpolate(mode="nearest", size=...)`` maps output index ``i`` to source index
``min(floor(float32(i) * s), in - 1)`` with ``s = float32(in) / float32(out)`` (float32 division and
float32 product), and to ``i >> 1`` when ``out == 2 * in`` (the same value). The map is monotone and
steps by at most one, so the output indices that read source index ``a`` form one contiguous run
``[start[a], start[a + 1])``: kernels walk these "cells" and reduce the upsampling adjoint inside them.
A run can be empty (rounding can leave the last source index unread); its gradient is then zero.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["nearest_source_index", "cell_starts", "cell_tables", "max_run", "uniform_run"]


@functools.lru_cache(maxsize=512)
def _source_index_np(out_size: int, in_size: int) -> np.ndarray:
    if out_size <= 0 or in_size <= 0:
        raise ValueError(f"sizes must be positive, got out={out_size}, in={in_size}")
    if out_size == in_size:
        return np.arange(out_size, dtype=np.int64)
    if out_size == 2 * in_size:
        return np.arange(out_size, dtype=np.int64) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    prod = np.arange(out_size, dtype=np.float32) * scale  # float32 product, as the C++ kernels
    idx = np.floor(prod).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def nearest_source_index(out_size: int, in_size: int) -> list:
    """Source index of every output index (length ``out_size``)."""
    return _source_index_np(int(out_size), int(in_size)).tolist()


@functools.lru_cache(maxsize=512)
def _starts_np(out_size: int, in_size: int) -> np.ndarray:
    idx = _source_index_np(out_size, in_size)
    # start[a] = first output index whose source is >= a; start[in_size] = out_size.
    return np.searchsorted(idx, np.arange(in_size + 1), side="left").astype(np.int32)


def cell_starts(out_size: int, in_size: int) -> list:
    """``start`` of length ``in_size + 1``: source ``a`` is read by outputs ``[start[a], start[a+1])``."""
    return _starts_np(int(out_size), int(in_size)).tolist()


def max_run(out_size: int, in_size: int) -> int:
    """Longest run of outputs sharing one source index (the cell extent a kernel must cover)."""
    s = _starts_np(int(out_size), int(in_size))
    return int(np.max(np.diff(s))) if len(s) > 1 else 0


def uniform_run(out_size: int, in_size: int) -> int:
    """``out_size // in_size`` when every source index is read by that many consecutive outputs, the
    cells starting at its multiples (56 -> 14, 28 -> 7); 0 otherwise (14 -> 3, 7 -> 1)."""
    out_size, in_size = int(out_size), int(in_size)
    if out_size % in_size:
        return 0
    run = out_size // in_size
    return run if np.array_equal(_starts_np(out_size, in_size), np.arange(in_size + 1) * run) else 0


_TABLE_CACHE: dict = {}
# Distinct (sizes, device) keys kept; past it, new keys get a table of their own call. A cached table is
# never freed: a kernel on another stream, or a captured CUDA graph, may still read it.
_TABLE_CACHE_MAX = 4096


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tables_on_device(H: int, W: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """The tables made by device ops alone (no host copy, no synchronization: what a CUDA graph capture
    allows), the same values as :func:`_starts_np`: the float32 product, floor and clamp of
    :func:`_source_index_np`, then the first output index of each source index."""
    parts = []
    for out_size, in_size in ((H, h), (W, w)):
        if out_size <= 0 or in_size <= 0:
            raise ValueError(f"sizes must be positive, got out={out_size}, in={in_size}")
        i = torch.arange(out_size, device=device, dtype=torch.int64)
        if out_size == in_size:
            idx = i
        elif out_size == 2 * in_size:
            idx = i >> 1
        else:
            scale = float(np.float32(in_size) / np.float32(out_size))  # a float32 value, exact in a double
            prod = i.to(torch.float32) * scale  # computed in float32 (a Python scalar: no host copy)
            idx = torch.floor(prod).to(torch.int64).clamp_(max=in_size - 1)
        a = torch.arange(in_size + 1, device=device, dtype=torch.int64)
        parts.append(torch.searchsorted(idx, a, side="left").to(torch.int32))
    return torch.cat(parts)


def cell_tables(H: int, W: int, h: int, w: int, device) -> torch.Tensor:
    """One int32 tensor on ``device``: row starts (h + 1 entries) then column starts (w + 1).

    Cached per sizes and device; a cached table lives as long as the process, so kernels queued on any
    stream and CUDA graphs that captured it keep reading valid memory. While a CUDA stream is capturing,
    a table not yet cached is made by device ops (a host copy cannot be captured) and not cached: its
    memory belongs to the graph, and it holds values only once the graph is replayed."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (H, W, h, w, str(device))
    t = _TABLE_CACHE.get(key)
    if t is not None:
        return t
    if _capturing(device):
        return _tables_on_device(H, W, h, w, device)
    arr = np.concatenate([_starts_np(H, h), _starts_np(W, w)]).astype(np.int32)
    t = torch.from_numpy(arr).to(device)  # a blocking copy: complete before any stream reads it
    if len(_TABLE_CACHE) < _TABLE_CACHE_MAX:
        t = _TABLE_CACHE.setdefault(key, t)  # two threads racing: both use the one kept
    return t
