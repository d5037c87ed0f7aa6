"""Triton kernels of the k2 average pool (``avgpool`` / ``avgpool_backward`` of the primitive contract).

``y[n, c, p, q]`` is the mean of the ``r x r`` window at ``(p * r, q * r)`` (``h = H // r``,
``w = W // r``: trailing rows and columns are dropped); the backward spreads ``dy / r**2`` over each
window and writes 0 to the dropped rows and columns. The pool's windows are regular, so here (unlike
the gate's upsampling) ``i // r`` is the exact source index.

Both kernels walk a flat index over their output in memory order (NCHW or NHWC, a constexpr), so
stores are coalesced: the forward reads each window with ``R * R`` (constexpr) masked loads whose
lanes the next loads reuse from cache (NCHW maps whose width is a multiple of a power-of-two ``R``:
``R`` loads of a window row's ``R`` contiguous values each, vectors when compiled; ``row_vectors``);
the backward reads the pooled gradient (``1 / r**2`` of the traffic) by gather. Bytes: forward reads
x once and writes ``1 / r**2`` of it; backward writes dx once and reads ``1 / r**2`` of it. Float32
math; 64-bit offsets when a tensor reaches 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import new_empty
from ._common import INT32_LIMIT, flat_block, layout as _layout, offset4, on_tensor_device, unflatten

_BLOCK = 1024
# Rates up to this unroll the forward's window (R * R loads; SCNet's r = 4); larger ones loop over it,
# and read no window row as a vector (a [BLOCK, R] row tile: 170 registers at R = 16, spills at 32).
UNROLL_MAX_R = 8
_UNROLL_MAX_R: tl.constexpr = tl.constexpr(UNROLL_MAX_R)


@triton.jit
def _avgpool_fwd_kernel(x_ptr, y_ptr, total, C, H, W, h, w, inv,
                        CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr, R: tl.constexpr, BLOCK_E: tl.constexpr,
                        ROW_VEC: tl.constexpr = False):
    """ROW_VEC (NCHW, R a power of two dividing W): each window row's R columns are one load of R
    contiguous values starting at a multiple of R (a vector when compiled), summed across after the
    rows; otherwise R * R scalar loads."""
    o = flat_block(BLOCK_E, BIG)
    mask = o < total
    n, c, p, q = unflatten(o, C, h, w, CHANNELS_LAST)
    base = offset4(n, c, p * R, q * R, C, H, W, CHANNELS_LAST)  # the window's top-left element
    if CHANNELS_LAST:
        if BIG:
            s_row = tl.cast(W, tl.int64) * C  # (R - 1) * W * C may pass 2**31 (W may be a constexpr 1)
        else:
            s_row = W * C
        s_col = C
    else:
        s_row = W
        s_col = 1
    if ROW_VEC:
        cols = tl.arange(0, R)
        rows = tl.zeros([BLOCK_E, R], dtype=tl.float32)
        # The row starts are built as multiples of the constexpr R (W and the window's column are): a
        # tl.multiple_of hint on base + di * W is lost where di = 0 folds it to base, and that row was
        # read one element a lane.
        Wr = W // R
        base_r = (((n * C + c) * H + p * R) * Wr + q) * R
        for di in tl.static_range(R):
            start = base_r + di * (Wr * R)
            rows += tl.load(x_ptr + start[:, None] + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        acc = tl.sum(rows, axis=1)
    elif R <= _UNROLL_MAX_R:
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for di in tl.static_range(R):
            for dj in tl.static_range(R):
                acc += tl.load(x_ptr + base + di * s_row + dj * s_col, mask=mask, other=0.0).to(tl.float32)
    else:  # a large rate: loops, not R * R unrolled loads (minutes of compile at r = 32)
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for di in range(R):
            for dj in range(R):
                acc += tl.load(x_ptr + base + di * s_row + dj * s_col, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + o, (acc * inv).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _avgpool_bwd_kernel(dy_ptr, dx_ptr, total, C, H, W, h, w, inv,
                        CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr, R: tl.constexpr, BLOCK_E: tl.constexpr):
    e = flat_block(BLOCK_E, BIG)
    mask = e < total
    n, c, i, j = unflatten(e, C, H, W, CHANNELS_LAST)
    p = i // R
    q = j // R
    inside = (p < h) & (q < w)  # rows / columns the floor pool dropped get no gradient
    g = tl.load(dy_ptr + offset4(n, c, p, q, C, h, w, CHANNELS_LAST), mask=mask & inside, other=0.0).to(tl.float32)
    tl.store(dx_ptr + e, (g * inv).to(dx_ptr.dtype.element_ty), mask=mask)


def _num_warps() -> int:
    return max(1, min(8, _BLOCK // 128))  # as kernel_options() computes it from BLOCK_E


def row_vectors(W: int, r: int, channels_last: bool) -> bool:
    """Whether the forward reads each window row as one vector (its ROW_VEC): NCHW maps whose width is
    a multiple of a power-of-two rate up to UNROLL_MAX_R (SCNet's r = 4 at 56 and 28 px; not at 14 or 7)."""
    return not channels_last and 1 < r <= UNROLL_MAX_R and r & (r - 1) == 0 and W % r == 0


@on_tensor_device
def avgpool(x: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r x r``, stride ``r`` average pool of x, in x's dtype and memory format."""
    channels_last, fmt = _layout(x)
    x = x.contiguous(memory_format=fmt)
    N, C, H, W = x.shape
    r = int(r)
    if r < 1 or H < r or W < r:
        raise ValueError(f"avgpool: H and W ({H}x{W}) must be at least the pooling rate {r} (>= 1)")
    h, w = H // r, W // r
    y = new_empty((N, C, h, w), x.dtype, x.device, fmt)
    total = y.numel()
    if total == 0:
        return y
    big = x.numel() >= INT32_LIMIT
    _avgpool_fwd_kernel[(triton.cdiv(total, _BLOCK),)](
        x, y, total, C, H, W, h, w, 1.0 / (r * r), CHANNELS_LAST=channels_last, BIG=big, R=r, BLOCK_E=_BLOCK,
        ROW_VEC=row_vectors(W, r, channels_last), num_warps=_num_warps())
    return y


@on_tensor_device
def avgpool_backward(dy: torch.Tensor, H: int, W: int, r: int, channels_last: bool) -> torch.Tensor:
    """dx of :func:`avgpool` for an ``H x W`` input, in ``channels_last`` or contiguous format."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dy = dy.contiguous(memory_format=fmt)
    N, C, h, w = dy.shape
    r = int(r)
    if r < 1 or H < r or W < r or h != H // r or w != W // r:
        raise ValueError(f"avgpool_backward: dy {tuple(dy.shape)} does not match an input of {H}x{W} at rate {r}")
    dx = new_empty((N, C, H, W), dy.dtype, dy.device, fmt)
    total = dx.numel()
    if total == 0:
        return dx
    big = total >= INT32_LIMIT
    _avgpool_bwd_kernel[(triton.cdiv(total, _BLOCK),)](
        dy, dx, total, C, H, W, h, w, 1.0 / (r * r), CHANNELS_LAST=bool(channels_last), BIG=big, R=r,
        BLOCK_E=_BLOCK, num_warps=_num_warps())
    return dx


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_kernels():
    """(name, kernel, signature, constexprs) of the pool kernels at SCNet's rate 4, both layouts (and the
    forward at a rate that loops)."""
    entries = []
    ints = {nm: "i32" for nm in ("total", "C", "H", "W", "h", "w")}
    for dtype in (torch.float32, torch.bfloat16):
        ty = "*" + _TRITON_DTYPE[dtype]
        for cl in (False, True):
            const = dict(CHANNELS_LAST=cl, BIG=False, R=4, BLOCK_E=_BLOCK)
            tag = f"{'nhwc' if cl else 'nchw'}_{_TRITON_DTYPE[dtype]}_r4"
            # NCHW widths that are multiples of r (56, 28 px) read a window row as one vector
            for row_vec in ((False, True) if not cl else (False,)):
                fconst = dict(const, ROW_VEC=row_vec)
                sig = {"x_ptr": ty, "y_ptr": ty, **ints, "inv": "fp32", **{k: "constexpr" for k in fconst}}
                entries.append((f"avgpool_fwd_{tag}" + ("_rowvec" if row_vec else ""), _avgpool_fwd_kernel, sig,
                                fconst))
            sig = {"dy_ptr": ty, "dx_ptr": ty, **ints, "inv": "fp32", **{k: "constexpr" for k in const}}
            entries.append((f"avgpool_bwd_{tag}", _avgpool_bwd_kernel, sig, const))
    # the forward's 64-bit path (2**31 elements or more) over NHWC maps, whose row stride is 64-bit there
    const = dict(CHANNELS_LAST=True, BIG=True, R=4, BLOCK_E=_BLOCK, ROW_VEC=False)
    sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", **ints, "total": "i64", "inv": "fp32",
           **{k: "constexpr" for k in const}}
    entries.append(("avgpool_fwd_nhwc_bf16_r4_int64", _avgpool_fwd_kernel, sig, const))
    # a rate past UNROLL_MAX_R: the forward loops over its window (unrolled, r = 32 took minutes to compile)
    for cl in (False, True):
        const = dict(CHANNELS_LAST=cl, BIG=False, R=32, BLOCK_E=_BLOCK, ROW_VEC=False)
        sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", **ints, "inv": "fp32", **{k: "constexpr" for k in const}}
        entries.append((f"avgpool_fwd_{'nhwc' if cl else 'nchw'}_fp32_r32", _avgpool_fwd_kernel, sig, const))
    return entries
