"""Triton kernels of BatchNorm + ReLU with batch statistics (``affine_relu``,
``affine_relu_backward_sums``, ``affine_relu_backward_apply`` of the primitive contract).

``z = t * scale[c] + shift[c]``, ``y = relu(z)``; backward ``g = dy`` where ``not z <= 0`` (a NaN z
passes the gradient, as torch's threshold_backward), per-channel ``sum g`` and
``sum g * (t - center)``, then ``dt = p * g + q * t + r``. The pointwise kernel walks a flat index in
memory order (NCHW or NHWC); y (``affine_relu_out``) and dy may be channel slices of a concatenation
buffer, read and written in place through their channel pitch; the sums kernel is the statistics kernel's tiling (a chunk of positions
by a block of channels per program, partials summed by the launcher in a fixed order: deterministic).
Bytes: forward reads t, writes y (2 passes; 3 with a residual, ``affine_add_relu``); sums read dy and t (2);
apply reads dy, t, writes dt (3).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import new_empty
from ._common import (INT32_LIMIT, channel_pitch, check_grid, flat_block, in_layout_or_slice, layout as _layout,
                      offset4, on_tensor_device, unflatten)

_BLOCK = 1024


@triton.jit
def _affine_relu_pointwise_kernel(t_ptr, dy_ptr, out_ptr, a_ptr, b_ptr, p_ptr, q_ptr, r_ptr, total, C, HW,
                                  dy_pitch, out_pitch, APPLY: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                                  BIG: tl.constexpr, BLOCK_E: tl.constexpr, SLICED: tl.constexpr,
                                  RESIDUAL: tl.constexpr = False):
    # e: flat index of the dense t; with SLICED, dy (APPLY) or out (not APPLY) is a channel slice of a
    # wider buffer addressed through its channel pitch; without it both are dense and use e itself
    # (contiguous offsets the compiler can vectorize). RESIDUAL (not APPLY): dy_ptr is a residual,
    # dense like t, added before the ReLU.
    e = flat_block(BLOCK_E, BIG)
    mask = e < total
    n, c, _, pix = unflatten(e, C, 1, HW, CHANNELS_LAST)
    tv = tl.load(t_ptr + e, mask=mask, other=0.0).to(tl.float32)
    z = tv * tl.load(a_ptr + c, mask=mask, other=0.0) + tl.load(b_ptr + c, mask=mask, other=0.0)
    if APPLY:
        if SLICED:
            d_off = offset4(n, c, 0, pix, dy_pitch, 1, HW, CHANNELS_LAST)
        else:
            d_off = e
        dyv = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(z <= 0.0, 0.0, dyv)
        out = (tl.load(p_ptr + c, mask=mask, other=0.0) * g + tl.load(q_ptr + c, mask=mask, other=0.0) * tv
               + tl.load(r_ptr + c, mask=mask, other=0.0))
        o_off = e
    else:
        if RESIDUAL:
            z = z + tl.load(dy_ptr + e, mask=mask, other=0.0).to(tl.float32)
        out = tl.where(z <= 0.0, 0.0, z)
        if SLICED:
            o_off = offset4(n, c, 0, pix, out_pitch, 1, HW, CHANNELS_LAST)
        else:
            o_off = e
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _affine_relu_sums_kernel(t_ptr, dy_ptr, a_ptr, b_ptr, k_ptr, part_g_ptr, part_gc_ptr, C, HW, NHW, chunk,
                             dy_pitch, SLICED: tl.constexpr, CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_q = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    a = tl.load(a_ptr + c, mask=c_mask, other=0.0)[:, None]
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0)[:, None]
    k = tl.load(k_ptr + c, mask=c_mask, other=0.0)[:, None]
    if BIG:
        q_start = pid_q.to(tl.int64) * chunk
    else:
        q_start = pid_q * chunk
    q_end = tl.minimum(q_start + chunk, NHW)
    acc_g = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    acc_gc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        img = (q // HW)[None, :]
        pix = q[None, :] - img * HW
        off = offset4(img, c[:, None], 0, pix, C, 1, HW, CHANNELS_LAST)
        if SLICED:
            d_off = offset4(img, c[:, None], 0, pix, dy_pitch, 1, HW, CHANNELS_LAST)
        else:
            d_off = off
        mask = c_mask[:, None] & (q < q_end)[None, :]
        tv = tl.load(t_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dyv = tl.load(dy_ptr + d_off, mask=mask, other=0.0).to(tl.float32)  # masked lanes: dy = 0, g = 0
        g = tl.where(tv * a + b <= 0.0, 0.0, dyv)
        acc_g += g
        acc_gc += g * (tv - k)
    out = pid_q.to(tl.int64) * C + c
    tl.store(part_g_ptr + out, tl.sum(acc_g, axis=1), mask=c_mask)
    tl.store(part_gc_ptr + out, tl.sum(acc_gc, axis=1), mask=c_mask)


def _num_warps(tile: int) -> int:
    return max(1, min(8, tile // 128))


def _vec(v: torch.Tensor) -> torch.Tensor:
    return v.detach().to(torch.float32).contiguous()


def _pointwise(t, dy, scale, shift, pqr: Optional[tuple], out: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None):
    channels_last, fmt = _layout(t)
    if (out is not None and not channel_pitch(out, channels_last) and channel_pitch(out, not channels_last)
            and t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)):
        # t is dense in both layouts (one channel, or 1x1 maps): read it in the one out is written in
        channels_last = not channels_last
        fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = t.contiguous(memory_format=fmt)
    C, HW = t.shape[1], t.shape[2] * t.shape[3]
    out_pitch = C
    if out is None:
        out = new_empty(t.shape, t.dtype, t.device, fmt)
    else:
        if out.shape != t.shape or out.dtype != t.dtype or out.device != t.device:
            raise ValueError(f"affine_relu_out: out must match t's shape, dtype and device, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        out_pitch = channel_pitch(out, channels_last)
        if not out_pitch:
            raise ValueError(f"affine_relu_out: out must be dense in t's memory format or a channel slice of such "
                             f"a tensor, got strides {out.stride()}")
    total = t.numel()
    if total == 0:
        return out
    a, b = _vec(scale), _vec(shift)
    apply = pqr is not None
    p, q, r = (_vec(v) for v in pqr) if apply else (a, a, a)
    dy_pitch = C
    if apply:
        dy, dy_pitch = in_layout_or_slice(dy.to(t.dtype), channels_last, fmt)
    elif residual is not None:
        dy = residual.contiguous(memory_format=fmt)
    else:
        dy = t
    span = t.shape[0] * max(dy_pitch, out_pitch) * HW
    _affine_relu_pointwise_kernel[(triton.cdiv(total, _BLOCK),)](
        t, dy, out, a, b, p, q, r, total, C, HW, dy_pitch, out_pitch, APPLY=apply, CHANNELS_LAST=channels_last,
        BIG=max(total, span) >= INT32_LIMIT, BLOCK_E=_BLOCK, SLICED=max(dy_pitch, out_pitch) != C,
        RESIDUAL=residual is not None, num_warps=_num_warps(_BLOCK))
    return out


@on_tensor_device
def affine_relu(t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(t * scale[c] + shift[c]) in t's dtype and memory format."""
    return _pointwise(t, None, scale, shift, None)


@on_tensor_device
def affine_relu_out(t: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """relu(t * scale[c] + shift[c]) written into ``out`` (dense in t's format, or a channel slice)."""
    return _pointwise(t, None, scale, shift, None, out)


@on_tensor_device
def affine_add_relu(t: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(t * scale[c] + shift[c] + residual) in t's dtype and memory format."""
    if residual.shape != t.shape or residual.dtype != t.dtype or residual.device != t.device:
        raise ValueError(f"affine_add_relu: residual must match t's shape, dtype and device, got "
                         f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
    return _pointwise(t, None, scale, shift, None, residual=residual)


@on_tensor_device
def affine_relu_backward_apply(dy, t, scale, shift, p, q, r) -> torch.Tensor:
    """dt = p[c] * g + q[c] * t + r[c], g = dy masked by relu(t * scale + shift) > 0."""
    return _pointwise(t, dy, scale, shift, (p, q, r))


def _sums_blocks(C: int, channels_last: bool):
    block_c = min(triton.next_power_of_2(max(1, C)), 64 if channels_last else 4)
    return block_c, max(16, 2048 // block_c)


@on_tensor_device
def affine_relu_backward_sums(dy, t, scale, shift, center):
    """Per-channel float32 (sum g, sum g * (t - center))."""
    channels_last, fmt = _layout(t)
    t = t.contiguous(memory_format=fmt)
    dy, dy_pitch = in_layout_or_slice(dy.to(t.dtype), channels_last, fmt)
    N, C, H, W = t.shape
    nhw = N * H * W
    if nhw == 0 or C == 0:
        z = torch.zeros(C, dtype=torch.float32, device=t.device)
        return z, z.clone()
    block_c, block_p = _sums_blocks(C, channels_last)
    c_blocks = triton.cdiv(C, block_c)
    target = 2048 if t.device.type == "cuda" else 8
    tiles = triton.cdiv(nhw, block_p)
    chunk = block_p * triton.cdiv(tiles, min(tiles, max(1, target // c_blocks)))
    q_progs = triton.cdiv(nhw, chunk)
    part = new_empty((2, q_progs, C), torch.float32, t.device)
    _affine_relu_sums_kernel[check_grid("affine_relu_backward_sums", (q_progs, c_blocks), f"a tensor of {C} channels")](
        t, dy, _vec(scale), _vec(shift), _vec(center), part[0], part[1], C, H * W, nhw, chunk, dy_pitch,
        SLICED=dy_pitch != C, CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_P=block_p,
        # 64-bit offsets from 2**31 elements, or where the last chunk's end and loop counter would pass it
        BIG=max(N * max(C, dy_pitch) * H * W, nhw + chunk + block_p) >= INT32_LIMIT,
        num_warps=_num_warps(block_c * block_p))
    return part[0].sum(dim=0), part[1].sum(dim=0)


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_kernels():
    """(name, kernel, signature, constexprs) of the BN + ReLU kernels, both layouts, fp32 and bf16."""
    entries = []
    for dtype in (torch.float32, torch.bfloat16):
        ty = "*" + _TRITON_DTYPE[dtype]
        for cl in (False, True):
            tag = f"{'nhwc' if cl else 'nchw'}_{_TRITON_DTYPE[dtype]}"
            for sliced in (False, True):  # dense tensors, or a channel slice of a concatenation
                st = "_slice" if sliced else ""
                for apply, residual in ((False, False), (True, False)) + (((False, True),) if not sliced else ()):
                    const = dict(APPLY=apply, CHANNELS_LAST=cl, BIG=False, BLOCK_E=_BLOCK, SLICED=sliced,
                                 RESIDUAL=residual)
                    sig = {"t_ptr": ty, "dy_ptr": ty, "out_ptr": ty,
                           **{nm: "*fp32" for nm in ("a_ptr", "b_ptr", "p_ptr", "q_ptr", "r_ptr")},
                           "total": "i32", "C": "i32", "HW": "i32", "dy_pitch": "i32", "out_pitch": "i32",
                           **{k: "constexpr" for k in const}}
                    kind = "apply" if apply else "add_fwd" if residual else "fwd"
                    entries.append((f"affine_relu_{kind}{st}_{tag}",
                                    _affine_relu_pointwise_kernel, sig, const))
                bc, bp = _sums_blocks(64, cl)
                const = dict(SLICED=sliced, CHANNELS_LAST=cl, BIG=False, BLOCK_C=bc, BLOCK_P=bp)
                sig = {"t_ptr": ty, "dy_ptr": ty, **{nm: "*fp32" for nm in ("a_ptr", "b_ptr", "k_ptr")},
                       "part_g_ptr": "*fp32", "part_gc_ptr": "*fp32",
                       **{nm: "i32" for nm in ("C", "HW", "NHW", "chunk", "dy_pitch")},
                       **{k: "constexpr" for k in const}}
                entries.append((f"affine_relu_sums{st}_{tag}", _affine_relu_sums_kernel, sig, const))
    return entries
