"""Triton kernels and launchers of the self-calibration gate's primitives.

Implements the four primitives of the contract in :mod:`scnet_fused.ops._dispatch`:
``gate_forward``, ``gate_backward``, ``gate_backward_k3`` and ``channel_stats``.

Tiling (gate kernels). The nearest-upsampling index map is irregular, so the kernels never compute a
source index from an output index: they walk *cells*. Source pixel ``(a, b)`` of the pooled map is read
by output rows ``[rs[a], rs[a+1])`` and columns ``[cs[b], cs[b+1])`` (contiguous runs, possibly empty),
taken from :func:`scnet_fused._index.cell_tables`. One program owns one source row ``a`` of one image
``n``, a block of ``BLOCK_C`` channels and a block of ``BLOCK_B`` source columns::

    grid = (N * h, cdiv(C, BLOCK_C), cdiv(w, BLOCK_B))

and processes a ``[BLOCK_C, BLOCK_B, BLOCK_R]`` tile per output row of the cell: channel x source
column x offset inside the column run (``BLOCK_R`` >= the longest run, or a loop over chunks of it).
``small[n, :, a, b]`` is loaded once per program and broadcast over the run; in the backward the
upsampling adjoint is a sum over the run axis plus an accumulation over the cell's rows, so
``dsmall[n, c, a, b]`` is written directly by its single owner (no atomics: deterministic). The
per-channel sums of the backward are reduced per program into a float32 partial buffer
``[2, N * h * cdiv(w, BLOCK_B), C]`` that the launcher sums with ``torch.sum`` (deterministic).
Contiguous (NCHW) tensors vectorize along the run/columns, channels_last (NHWC) along the channels;
the layout is a constexpr and the unit stride is implied by it. In NCHW a run starts where the table
says, so the compiler cannot know a run's lanes aligned and moves them one element a lane; where every
column run has the same power-of-two length and starts at its multiples (SCNet-50's 56 -> 14 and
28 -> 7; :func:`nchw_run`), the ``RUN`` constexpr computes the starts instead and marks the offsets
multiples of it, and a run's lanes move as one vector (16 bytes in float32, 8 in 16-bit types).

Bytes moved per element of the full ``N x C x H x W`` tensors (``E`` = element size: 4 for fp32, 2 for
fp16/bf16; the pooled map, the cell tables, the per-channel vectors and the partial sums are 1/r^2 of
that or less and not counted). These are the minimum for each computation (PERF.md):

=========================  ================================  ================  ===========
kernel                     traffic                           bytes / element   full passes
=========================  ================================  ================  ===========
``_gate_fwd_kernel``       read x, k3; write y               3E                3
``_gate_bwd_kernel``       read dy, x, k3; write dx (+ dk3)  4E (5E)           4 (5)
``_gate_bwd_k3_kernel``    read dy, x, k3; write dk3         4E                4
``_channel_stats_kernel``  read t                            1E                1
=========================  ================================  ================  ===========

Tiles hold up to 1024 elements (NCHW: up to 128 lanes along the row, the rest channels; NHWC: up to
128 channels innermost), ``num_warps = tile / 128`` (at most 8): 4 elements a thread. When the grid
has fewer than about 1024 programs (tiny pooled maps), the channel block shrinks to 256-element tiles.

All math is float32; outputs take the input dtype (dsmall: small's dtype; sums and statistics: float32).
Index arithmetic: the per-image base offset is 64-bit; per-lane offsets are 32-bit unless one image (or
the pooled map) reaches 2**31 elements, in which case the ``BIG`` constexpr makes them 64-bit too.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import new_empty
from ._common import INT32_LIMIT, check_grid, layout as _layout, on_tensor_device
from .._index import cell_tables, max_run, uniform_run
from . import sc_pool as _pool
from . import sc_bn_relu as _bn_relu
from .sc_bn_relu import (  # noqa: F401  (the BatchNorm + ReLU primitives of this backend)
    affine_add_relu, affine_relu, affine_relu_backward_apply, affine_relu_backward_sums, affine_relu_out)
from .sc_pool import avgpool, avgpool_backward  # noqa: F401  (the pool primitives of this backend)

__all__ = ["gate_forward", "gate_backward", "gate_backward_k3", "channel_stats", "avgpool", "avgpool_backward",
           "affine_relu", "affine_relu_out", "affine_add_relu", "affine_relu_backward_sums",
           "affine_relu_backward_apply", "aot_kernels", "kernel_options"]



# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _cell_program(tab_ptr, C, h, w, BIG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                  RUN: tl.constexpr = 0):
    """This program's image, channels, source columns, row range and the offsets of small[n, c, a, b].

    With RUN (uniform column runs of RUN = BLOCK_R outputs), col0 is computed, not read, and ncol is the
    source columns' mask: the lanes of a run then share their mask (see _run_chunk)."""
    pid_na = tl.program_id(0)
    n = pid_na // h
    a = pid_na - n * h
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    c_mask = c < C
    b_mask = b < w
    row0 = tl.load(tab_ptr + a)
    row1 = tl.load(tab_ptr + a + 1)
    if BIG:  # the row loop variable then carries 64-bit offsets
        row0 = row0.to(tl.int64)
        row1 = row1.to(tl.int64)
    if RUN:
        col0 = b * RUN
        ncol = b_mask
    else:
        col0 = tl.load(tab_ptr + h + 1 + b, mask=b_mask, other=0)
        ncol = tl.load(tab_ptr + h + 2 + b, mask=b_mask, other=0) - col0
    if BIG:
        c_idx = c.to(tl.int64)
        nc = n.to(tl.int64) * C + c_idx
    else:
        c_idx = c
        nc = n * C + c
    small_off = (nc[:, None] * h + a) * w + b[None, :]  # [BLOCK_C, BLOCK_B]
    small_mask = c_mask[:, None] & b_mask[None, :]
    return n, c_idx, c_mask, col0, ncol, row0, row1, small_off, small_mask


@triton.jit
def _run_chunk(c_idx, c_mask, col0, ncol, k0, s_c, s_w, CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr,
               BLOCK_R: tl.constexpr, RUN: tl.constexpr = 0):
    """Per-lane offsets (inside one output row) and mask of a [BLOCK_C, BLOCK_B, BLOCK_R] tile.

    RUN (NCHW, uniform runs, one chunk): the RUN lanes of a run are contiguous, start at a multiple of
    RUN (every offset's other terms are too: the launcher checks) and share their mask, so the
    compiler can move them as one vector."""
    if RUN:
        j = col0[:, None] + tl.arange(0, BLOCK_R)[None, :]
        if BIG:
            j = j.to(tl.int64)
        lane = tl.multiple_of(c_idx * s_c, RUN)[:, None, None] + j[None, :, :]
        mask = tl.broadcast_to((c_mask[:, None] & ncol[None, :])[:, :, None], lane.shape)
        return lane, mask
    k = k0 + tl.arange(0, BLOCK_R)
    j = col0[:, None] + k[None, :]  # [BLOCK_B, BLOCK_R] output columns
    if BIG:
        j = j.to(tl.int64)
    if CHANNELS_LAST:
        lane = c_idx[:, None, None] + j[None, :, :] * s_w
    else:
        lane = c_idx[:, None, None] * s_c + j[None, :, :]
    mask = c_mask[:, None, None] & (k[None, :] < ncol[:, None])[None, :, :]
    return lane, mask


@triton.jit
def _row_base(base_n, i, s_h, RUN: tl.constexpr):
    """Offset of output row i of image base_n; a multiple of RUN in RUN mode (the launcher checks)."""
    if RUN:
        return tl.multiple_of(base_n + i * s_h, RUN)
    return base_n + i * s_h


@triton.jit
def _per_channel(ptr, c_idx, c_mask, PRESENT: tl.constexpr, default: tl.constexpr):
    if PRESENT:
        v = tl.load(ptr + c_idx, mask=c_mask, other=default)
    else:
        v = tl.full(c_idx.shape, default, tl.float32)
    return v[:, None, None]


@triton.jit
def _small_values(small_ptr, small_off, small_mask, ss_ptr, st_ptr, c_idx, c_mask,
                  HAS_SMALL_AFFINE: tl.constexpr):
    """small[n, c, a, b] as float32 [BLOCK_C, BLOCK_B, 1], through the pooled branch's per-channel
    affine ``small * ss[c] + st[c]`` (one fused multiply-add) when there is one."""
    sv = tl.load(small_ptr + small_off, mask=small_mask, other=0.0).to(tl.float32)
    if HAS_SMALL_AFFINE:
        ss = tl.load(ss_ptr + c_idx, mask=c_mask, other=1.0)[:, None]
        st = tl.load(st_ptr + c_idx, mask=c_mask, other=0.0)[:, None]
        sv = tl.fma(sv, ss, st)
    return sv[:, :, None]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gate_fwd_kernel(x_ptr, k3_ptr, small_ptr, scale_ptr, shift_ptr, ss_ptr, st_ptr, y_ptr, tab_ptr,
                     C, h, w, s_n, s_c, s_h, s_w, run_w,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SMALL_AFFINE: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr,
                     BIG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                     RUN: tl.constexpr = 0):
    """y = (k3 * scale + shift) * sigmoid(x + small[n, c, a, b]) over the cells of one source row."""
    n, c_idx, c_mask, col0, ncol, row0, row1, small_off, small_mask = _cell_program(
        tab_ptr, C, h, w, BIG, BLOCK_C, BLOCK_B, RUN)
    sv = _small_values(small_ptr, small_off, small_mask, ss_ptr, st_ptr, c_idx, c_mask, HAS_SMALL_AFFINE)
    scale = _per_channel(scale_ptr, c_idx, c_mask, HAS_SCALE, 1.0)
    shift = _per_channel(shift_ptr, c_idx, c_mask, HAS_SHIFT, 0.0)
    base_n = n.to(tl.int64) * s_n
    for k0 in range(0, run_w, BLOCK_R):
        lane, mask = _run_chunk(c_idx, c_mask, col0, ncol, k0, s_c, s_w, CHANNELS_LAST, BIG, BLOCK_R, RUN)
        for i in range(row0, row1):
            base = _row_base(base_n, i, s_h, RUN)
            xv = tl.load(x_ptr + base + lane, mask=mask, other=0.0).to(tl.float32)
            kv = tl.load(k3_ptr + base + lane, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE or HAS_SHIFT:
                a = kv * scale + shift
            else:  # k3 * s: k3 = -0 gives -0, as the CPU kernels and eager
                a = kv
            y = a * _sigmoid(xv + sv)
            tl.store(y_ptr + base + lane, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(dy_ptr, x_ptr, k3_ptr, small_ptr, scale_ptr, shift_ptr, center_ptr, ss_ptr, st_ptr,
                     dx_ptr, dk3_ptr, dsmall_ptr, part_g_ptr, part_gk_ptr, tab_ptr,
                     C, h, w, s_n, s_c, s_h, s_w, run_w,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_CENTER: tl.constexpr,
                     HAS_SMALL_AFFINE: tl.constexpr,
                     NEED_DK3: tl.constexpr, NEED_SUMS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                     BIG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                     RUN: tl.constexpr = 0):
    """dx, dk3 and, per cell, dsmall = sum(dx); with NEED_SUMS, per program, partial sums of g and
    g * (k3 - center) (without, neither their accumulators nor their stores: part_g_ptr and part_gk_ptr
    are not touched)."""
    n, c_idx, c_mask, col0, ncol, row0, row1, small_off, small_mask = _cell_program(
        tab_ptr, C, h, w, BIG, BLOCK_C, BLOCK_B, RUN)
    sv = _small_values(small_ptr, small_off, small_mask, ss_ptr, st_ptr, c_idx, c_mask, HAS_SMALL_AFFINE)
    scale = _per_channel(scale_ptr, c_idx, c_mask, HAS_SCALE, 1.0)
    shift = _per_channel(shift_ptr, c_idx, c_mask, HAS_SHIFT, 0.0)
    center = _per_channel(center_ptr, c_idx, c_mask, HAS_CENTER, 0.0)
    # Elementwise accumulators, reduced once at the end (no cross-lane reduction inside the loops).
    acc_ds = tl.zeros([BLOCK_C, BLOCK_B, BLOCK_R], dtype=tl.float32)
    if NEED_SUMS:
        acc_g = tl.zeros([BLOCK_C, BLOCK_B, BLOCK_R], dtype=tl.float32)
        acc_gk = tl.zeros([BLOCK_C, BLOCK_B, BLOCK_R], dtype=tl.float32)
    base_n = n.to(tl.int64) * s_n
    for k0 in range(0, run_w, BLOCK_R):
        lane, mask = _run_chunk(c_idx, c_mask, col0, ncol, k0, s_c, s_w, CHANNELS_LAST, BIG, BLOCK_R, RUN)
        for i in range(row0, row1):
            base = _row_base(base_n, i, s_h, RUN)
            # Masked lanes load dy = 0, so every term below is 0 there.
            dyv = tl.load(dy_ptr + base + lane, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + base + lane, mask=mask, other=0.0).to(tl.float32)
            kv = tl.load(k3_ptr + base + lane, mask=mask, other=0.0).to(tl.float32)
            s = _sigmoid(xv + sv)
            g = dyv * s
            dz = g * (kv * scale + shift) * (1.0 - s)
            tl.store(dx_ptr + base + lane, dz.to(dx_ptr.dtype.element_ty), mask=mask)
            if NEED_DK3:
                tl.store(dk3_ptr + base + lane, (g * scale).to(dk3_ptr.dtype.element_ty), mask=mask)
            acc_ds += dz
            if NEED_SUMS:
                acc_g += g
                acc_gk += g * (kv - center)
    # The run chunks of one source column all land in the same (c, b) slot: summing over the run axis
    # gives the cell sum of dx, which is dsmall.
    tl.store(dsmall_ptr + small_off, tl.sum(acc_ds, axis=2).to(dsmall_ptr.dtype.element_ty), mask=small_mask)
    if NEED_SUMS:
        part_row = tl.program_id(0) * tl.num_programs(2) + tl.program_id(2)
        part_off = part_row.to(tl.int64) * C + c_idx
        tl.store(part_g_ptr + part_off, tl.sum(tl.sum(acc_g, axis=2), axis=1), mask=c_mask)
        tl.store(part_gk_ptr + part_off, tl.sum(tl.sum(acc_gk, axis=2), axis=1), mask=c_mask)


@triton.jit
def _gate_bwd_k3_kernel(dy_ptr, x_ptr, k3_ptr, small_ptr, p_ptr, q_ptr, r_ptr, ss_ptr, st_ptr, dk3_ptr, tab_ptr,
                        C, h, w, s_n, s_c, s_h, s_w, run_w,
                        HAS_SMALL_AFFINE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                        RUN: tl.constexpr = 0):
    """dk3 = p * dy * sigmoid(x + small[n, c, a, b]) + q * k3 + r."""
    n, c_idx, c_mask, col0, ncol, row0, row1, small_off, small_mask = _cell_program(
        tab_ptr, C, h, w, BIG, BLOCK_C, BLOCK_B, RUN)
    sv = _small_values(small_ptr, small_off, small_mask, ss_ptr, st_ptr, c_idx, c_mask, HAS_SMALL_AFFINE)
    p = _per_channel(p_ptr, c_idx, c_mask, True, 0.0)
    q = _per_channel(q_ptr, c_idx, c_mask, True, 0.0)
    r = _per_channel(r_ptr, c_idx, c_mask, True, 0.0)
    base_n = n.to(tl.int64) * s_n
    for k0 in range(0, run_w, BLOCK_R):
        lane, mask = _run_chunk(c_idx, c_mask, col0, ncol, k0, s_c, s_w, CHANNELS_LAST, BIG, BLOCK_R, RUN)
        for i in range(row0, row1):
            base = _row_base(base_n, i, s_h, RUN)
            dyv = tl.load(dy_ptr + base + lane, mask=mask, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + base + lane, mask=mask, other=0.0).to(tl.float32)
            kv = tl.load(k3_ptr + base + lane, mask=mask, other=0.0).to(tl.float32)
            out = p * (dyv * _sigmoid(xv + sv)) + q * kv + r
            tl.store(dk3_ptr + base + lane, out.to(dk3_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_stats_kernel(t_ptr, mean_ptr, m2_ptr, C, HW, NHW, chunk,
                          CHANNELS_LAST: tl.constexpr, BIG: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per program: mean and M2 (sum of squared deviations) of ``chunk`` positions for BLOCK_C channels.

    Positions ``q`` enumerate (n, spatial) in [0, N*H*W). Each tile's exact mean and M2 are merged into
    the running ones with Chan's formula, so large-mean data loses no precision.
    """
    pid_q = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if BIG:
        q_start = pid_q.to(tl.int64) * chunk
        c_big = c.to(tl.int64)  # c * HW passes 2**31 where one image has that many elements
    else:
        q_start = pid_q * chunk
        c_big = c
    q_end = tl.minimum(q_start + chunk, NHW)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for q0 in range(q_start, q_end, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        if CHANNELS_LAST:
            off = q[None, :] * C + c[:, None]
        else:
            img = q // HW
            off = (img * C)[None, :] * HW + c_big[:, None] * HW + (q - img * HW)[None, :]
        mask = c_mask[:, None] & (q < q_end)[None, :]
        v = tl.load(t_ptr + off, mask=mask, other=0.0).to(tl.float32)
        cnt = (q0 - q_start).to(tl.float32)
        nt = tl.minimum(q_end - q0, BLOCK_P).to(tl.float32)
        t_mean = tl.sum(v, axis=1) / nt
        d = tl.where(mask, v - t_mean[:, None], 0.0)
        t_m2 = tl.sum(d * d, axis=1)
        delta = t_mean - mean
        tot = cnt + nt
        mean += delta * (nt / tot)
        m2 += t_m2 + tl.where(cnt > 0, delta * delta * (cnt * (nt / tot)), 0.0)  # (no inf * 0 on the first tile)
    out = pid_q.to(tl.int64) * C + c
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)


@triton.jit
def _stats_finalize_kernel(mean_ptr, m2_ptr, out_mean_ptr, out_var_ptr, C, Q, NHW, chunk,
                           BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The Q programs' per-channel (mean, M2) of ``_channel_stats_kernel`` merged (Chan's formula, each
    program's count ``min(NHW - q * chunk, chunk)``) into the batch mean and biased variance; a channel
    whose mean is not finite (a NaN or an infinity in it, or finite values near the float32 maximum
    whose float32 tile sums overflow, where the CPU kernels give variance +inf) gets NaN for both; a
    finite channel whose squares overflow float32 (values 2^64 apart) gets variance +inf, as the C++
    kernels and ATen."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        mask = (q < Q)[:, None] & c_mask[None, :]
        cnt = tl.minimum(NHW - q.to(tl.int64) * chunk, chunk).to(tl.float32)
        m = tl.load(mean_ptr + q[:, None] * C + c[None, :], mask=mask, other=0.0)
        acc += tl.sum(tl.where(mask, m * cnt[:, None], 0.0), axis=0)
    mean = acc / NHW
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        mask = (q < Q)[:, None] & c_mask[None, :]
        cnt = tl.minimum(NHW - q.to(tl.int64) * chunk, chunk).to(tl.float32)
        off = q[:, None] * C + c[None, :]
        d = tl.load(mean_ptr + off, mask=mask, other=0.0) - mean[None, :]
        m2 = tl.load(m2_ptr + off, mask=mask, other=0.0)
        acc2 += tl.sum(tl.where(mask, m2 + cnt[:, None] * d * d, 0.0), axis=0)
    var = acc2 / NHW
    inf = float("inf")
    ok = tl.abs(mean) < inf  # false for a NaN and for an infinity
    nan = float("nan")
    tl.store(out_mean_ptr + c, tl.where(ok, mean, nan), mask=c_mask)
    tl.store(out_var_ptr + c, tl.where(ok, var, nan), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(1, int(v)))


def _num_warps(tile: int) -> int:
    return max(1, min(8, tile // 128))


def kernel_options(constexprs: dict) -> dict:
    """Compile options the launchers use for a kernel with these constexprs (num_warps from the tile)."""
    tile = 1
    for k, v in constexprs.items():
        if k.startswith("BLOCK_"):
            tile *= int(v)
    return {"num_warps": _num_warps(tile)}


def _gate_blocks(rows: int, C: int, w: int, run_w: int, channels_last: bool):
    """(BLOCK_C, BLOCK_B, BLOCK_R): up to 1024 elements a tile, wide along the unit-stride axis.

    ``rows`` = N * h, the first grid axis. Small maps (h = w = 1 at 7x7) give few programs: the channel
    block then shrinks (down to 256-element tiles) until there are about 1024 programs.
    """
    if channels_last:
        block_c = min(_pow2(C), 128)
        block_r = min(_pow2(run_w), max(1, 512 // block_c))
        block_b = min(_pow2(w), max(1, 1024 // (block_c * block_r)))
        min_c = 16
    else:
        block_r = min(_pow2(run_w), 32)
        block_b = min(_pow2(w), max(1, 128 // block_r))
        block_c = min(_pow2(C), max(1, 1024 // (block_b * block_r)))
        min_c = 1
    while (block_c > min_c and block_c * block_b * block_r > 256
           and rows * triton.cdiv(C, block_c) * triton.cdiv(w, block_b) < 1024):
        block_c //= 2
    return block_c, block_b, block_r


def _stats_blocks(C: int, channels_last: bool):
    if channels_last:
        block_c = min(_pow2(C), 64)
    else:
        block_c = min(_pow2(C), 4)
    return block_c, max(16, 2048 // block_c)


def _strides(shape, channels_last: bool):
    """Canonical (s_n, s_c, s_h, s_w) of a dense tensor in the given layout."""
    N, C, H, W = shape
    if channels_last:
        return H * W * C, 1, W * C, C
    return C * H * W, H * W, W, 1


def _vec(v: Optional[torch.Tensor], C: int, like: torch.Tensor) -> torch.Tensor:
    if v is None:
        return like  # never read: the matching HAS_* constexpr is False
    v = v.to(torch.float32).contiguous()
    if v.numel() != C:
        raise ValueError(f"per-channel tensor must have {C} values, got {tuple(v.shape)}")
    return v


def nchw_run(W: int, w: int, block_r: int, channels_last: bool) -> int:
    """The gate kernels' RUN: NCHW maps whose column runs are all ``block_r`` long and start at its
    multiples (then W, H * W and C * H * W are multiples of it too, so every row of a run starts at
    one): the run's lanes load and store as vectors. 0: the run table."""
    if channels_last or block_r < 2:
        return 0
    return block_r if uniform_run(W, w) == block_r else 0


def _gate_setup(x, small, *others):
    channels_last, fmt = _layout(x)
    N, C, H, W = x.shape
    h, w = int(small.shape[2]), int(small.shape[3])
    run_w = max_run(W, w)
    block_c, block_b, block_r = _gate_blocks(N * h, C, w, run_w, channels_last)
    big = C * H * W >= INT32_LIMIT or small.numel() >= INT32_LIMIT
    grid = check_grid("sc_gate", (N * h, triton.cdiv(C, block_c), triton.cdiv(w, block_b)),
                      f"an input of shape {tuple(x.shape)} with a pooled map {h}x{w}")
    x = x.contiguous(memory_format=fmt)  # copies and tables only for a launch that will run
    others = tuple(t.contiguous(memory_format=fmt) for t in others)
    small = small.contiguous()
    tab = cell_tables(H, W, h, w, x.device)
    meta = dict(CHANNELS_LAST=channels_last, BIG=big, BLOCK_C=block_c, BLOCK_B=block_b, BLOCK_R=block_r,
                RUN=nchw_run(W, w, block_r, channels_last), num_warps=_num_warps(block_c * block_b * block_r))
    scalars = (C, h, w) + _strides(x.shape, channels_last) + (run_w,)
    return x, small, others, fmt, tab, grid, scalars, meta


# ----------------------------------------------------------------------------------------------
# Primitives (the contract of scnet_fused.ops._dispatch)
# ----------------------------------------------------------------------------------------------


def _small_affine(small_scale: Optional[torch.Tensor], small_shift: Optional[torch.Tensor], C: int,
                  like: torch.Tensor):
    """(ss, st, present): the pooled branch's affine as float32 [C] (a missing one 1 or 0)."""
    if small_scale is None and small_shift is None:
        return like, like, False
    ss = _vec(small_scale, C, like) if small_scale is not None else torch.ones(C, device=like.device)
    st = _vec(small_shift, C, like) if small_shift is not None else torch.zeros(C, device=like.device)
    return ss, st, True


@on_tensor_device
def gate_forward(x: torch.Tensor, small: torch.Tensor, k3: torch.Tensor, scale: Optional[torch.Tensor],
                 shift: Optional[torch.Tensor], small_scale: Optional[torch.Tensor] = None,
                 small_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (k3 * scale + shift) * sigmoid(x + up(small * small_scale + small_shift)), in x's dtype and
    memory format."""
    x, small, (k3,), fmt, tab, grid, scalars, meta = _gate_setup(x, small, k3)
    y = new_empty(x.shape, x.dtype, x.device, fmt)
    if x.numel() == 0:
        return y
    C = x.shape[1]
    ss, st, has_sa = _small_affine(small_scale, small_shift, C, x)
    _gate_fwd_kernel[grid](x, k3, small, _vec(scale, C, x), _vec(shift, C, x), ss, st, y, tab, *scalars,
                           HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_SMALL_AFFINE=has_sa,
                           **meta)
    return y


@on_tensor_device
def gate_backward(dy: torch.Tensor, x: torch.Tensor, small: torch.Tensor, k3: torch.Tensor,
                  scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                  center: Optional[torch.Tensor], need_dk3: bool, small_scale: Optional[torch.Tensor] = None,
                  small_shift: Optional[torch.Tensor] = None, need_sums: bool = True):
    """One pass: (dx, dsmall, dk3 or None, sum_g, sum_gk); see the contract in ops._dispatch."""
    x, small, (k3, dy), fmt, tab, grid, scalars, meta = _gate_setup(x, small, k3, dy.to(x.dtype))
    N, C = x.shape[0], x.shape[1]
    dx = new_empty(x.shape, x.dtype, x.device, fmt)
    dsmall = new_empty(small.shape, small.dtype, small.device)
    dk3 = new_empty(x.shape, x.dtype, x.device, fmt) if need_dk3 else None
    nsum = C if need_sums else 0
    if x.numel() == 0:
        zeros = torch.zeros(nsum, dtype=torch.float32, device=x.device)
        return dx, dsmall.zero_(), dk3, zeros, zeros.clone()
    # Per-program partial sums (rows of C floats), only when asked for: without, the kernel neither
    # accumulates nor stores them, and dx stands in for their (untouched) pointers.
    part = new_empty((2, grid[0] * grid[2], C), torch.float32, x.device) if need_sums else (dx, dx)
    ss, st, has_sa = _small_affine(small_scale, small_shift, C, x)
    _gate_bwd_kernel[grid](dy, x, k3, small, _vec(scale, C, x), _vec(shift, C, x), _vec(center, C, x), ss, st,
                           dx, dk3 if need_dk3 else dx, dsmall, part[0], part[1], tab, *scalars,
                           HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                           HAS_CENTER=center is not None, HAS_SMALL_AFFINE=has_sa, NEED_DK3=bool(need_dk3),
                           NEED_SUMS=bool(need_sums), **meta)
    if not need_sums:
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return dx, dsmall, dk3, empty, empty.clone()
    # Two separate reductions: the results must not be views of one tensor (custom ops forbid aliasing).
    return dx, dsmall, dk3, part[0].sum(dim=0), part[1].sum(dim=0)


@on_tensor_device
def gate_backward_k3(dy: torch.Tensor, x: torch.Tensor, small: torch.Tensor, k3: torch.Tensor,
                     p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, small_scale: Optional[torch.Tensor] = None,
                     small_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dk3 = p * dy * sigmoid(x + up(small)) + q * k3 + r, in k3's dtype and memory format."""
    x, small, (k3, dy), fmt, tab, grid, scalars, meta = _gate_setup(x, small, k3, dy.to(x.dtype))
    dk3 = new_empty(x.shape, x.dtype, x.device, fmt)
    if x.numel() == 0:
        return dk3
    C = x.shape[1]
    ss, st, has_sa = _small_affine(small_scale, small_shift, C, x)
    _gate_bwd_k3_kernel[grid](dy, x, k3, small, _vec(p, C, x), _vec(q, C, x), _vec(r, C, x), ss, st, dk3, tab,
                              *scalars, HAS_SMALL_AFFINE=has_sa, **meta)
    return dk3


_FINALIZE_BLOCK_C, _FINALIZE_BLOCK_Q = 64, 32  # the merge's tile: channels (contiguous) by programs


def _stats_chunks(nhw: int, block_p: int, c_blocks: int, device: torch.device) -> int:
    """Positions per program: enough programs to fill a GPU, few under the interpreter."""
    target = 2048 if device.type == "cuda" else 8
    q_progs = max(1, target // max(1, c_blocks))
    tiles = triton.cdiv(nhw, block_p)
    return block_p * triton.cdiv(tiles, min(tiles, q_progs))


@on_tensor_device
def channel_stats(t: torch.Tensor):
    """Per-channel (mean, biased var) over N, H, W in float32, exact per tile and merged with Chan's formula."""
    channels_last, fmt = _layout(t)
    t = t.contiguous(memory_format=fmt)
    N, C, H, W = t.shape
    nhw = N * H * W
    if nhw == 0 or C == 0:
        nan = torch.full((C,), float("nan"), dtype=torch.float32, device=t.device)
        return nan, nan.clone()
    block_c, block_p = _stats_blocks(C, channels_last)
    c_blocks = triton.cdiv(C, block_c)
    chunk = _stats_chunks(nhw, block_p, c_blocks, t.device)
    q_progs = triton.cdiv(nhw, chunk)
    grid = check_grid("channel_stats", (q_progs, c_blocks), f"a tensor of {C} channels")
    part = new_empty((2, q_progs, C), torch.float32, t.device)
    _channel_stats_kernel[grid](
        t, part[0], part[1], C, H * W, nhw, chunk,
        # 64-bit offsets from 2**31 elements, or where the last program's chunk end and loop counter
        # (past nhw by up to chunk + block_p) would pass it (a single-channel tensor just below 2**31)
        CHANNELS_LAST=channels_last, BIG=max(t.numel(), nhw + chunk + block_p) >= INT32_LIMIT,
        BLOCK_C=block_c, BLOCK_P=block_p,
        num_warps=_num_warps(block_c * block_p))
    # One more launch merges the programs' partials (not a dozen small torch operations).
    mean = new_empty((C,), torch.float32, t.device)
    var = new_empty((C,), torch.float32, t.device)
    _stats_finalize_kernel[(triton.cdiv(C, _FINALIZE_BLOCK_C),)](
        part[0], part[1], mean, var, C, q_progs, nhw, chunk, BLOCK_C=_FINALIZE_BLOCK_C, BLOCK_Q=_FINALIZE_BLOCK_Q,
        num_warps=_num_warps(_FINALIZE_BLOCK_C * _FINALIZE_BLOCK_Q))
    # A channel holding a NaN or an infinity gets NaN for both, as torch's CUDA BatchNorm (running
    # updates: inf - inf) gives; on CPU tensors (the interpreter) the mean torch's CPU BatchNorm gives,
    # the plain one (+-inf for infinities of one sign), and a NaN variance.
    if t.device.type == "cpu":
        bad = mean.isnan()
        if bool(bad.any()):
            mean = torch.where(bad, t.float().mean(dim=(0, 2, 3)), mean)
    return mean, var


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation entries
# ----------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_kernels():
    """Representative (name, kernel, signature, constexprs) of every kernel variant the launchers use.

    Shapes: SCNet-50's first stage (C=32, 56x56, r=4) and last (C=256, 7x7, h=w=1), both layouts,
    fp32 and bf16, and the constexpr flags each launcher sets. ``kernel_options(constexprs)`` gives
    the matching ``num_warps``.
    """
    entries = []

    def ptrs(names, ty):
        return {nm: ty for nm in names}

    gate_ints = {nm: "i32" for nm in ("C", "h", "w", "s_n", "s_c", "s_h", "s_w", "run_w")}
    # (N, C, H, W, h, w): the stage-1 and stage-4 shapes at batch 64
    shapes = ((64, 32, 56, 56, 14, 14), (64, 256, 7, 7, 1, 1))
    variants = [
        # (dtype, channels_last, shape index, flag set)
        (torch.float32, False, 0, 0),
        (torch.bfloat16, False, 1, 1),
        (torch.float32, True, 1, 1),
        (torch.bfloat16, True, 0, 0),
        (torch.bfloat16, False, 0, 1),  # NCHW uniform runs (RUN) in 16-bit too
        (torch.float32, False, 1, 0),  # and the NCHW table path in float32
    ]
    for dtype, cl, si, flags in variants:
        ty = "*" + _TRITON_DTYPE[dtype]
        N, C, H, W, h, w = shapes[si]
        bc, bb, br = _gate_blocks(N * h, C, w, max_run(W, w), cl)
        blocks = dict(CHANNELS_LAST=cl, BIG=False, BLOCK_C=bc, BLOCK_B=bb, BLOCK_R=br,
                      RUN=nchw_run(W, w, br, cl))
        tag = f"{'nhwc' if cl else 'nchw'}_{_TRITON_DTYPE[dtype]}_C{C}_{H}x{W}" + (
            f"_run{blocks['RUN']}" if blocks["RUN"] else "")

        sig = {**ptrs(("x_ptr", "k3_ptr", "small_ptr"), ty),
               **ptrs(("scale_ptr", "shift_ptr", "ss_ptr", "st_ptr"), "*fp32"),
               "y_ptr": ty, "tab_ptr": "*i32", **gate_ints}
        # flags 1: the training gate of both BatchNorms (k3's affine and the pooled branch's)
        const = dict(HAS_SCALE=bool(flags), HAS_SHIFT=bool(flags), HAS_SMALL_AFFINE=bool(flags), **blocks)
        entries.append((f"gate_fwd_{tag}_{'affine' if flags else 'plain'}", _gate_fwd_kernel,
                        {**sig, **{k: "constexpr" for k in const}}, const))

        sig = {**ptrs(("dy_ptr", "x_ptr", "k3_ptr", "small_ptr"), ty),
               **ptrs(("scale_ptr", "shift_ptr", "center_ptr", "ss_ptr", "st_ptr"), "*fp32"),
               **ptrs(("dx_ptr", "dk3_ptr", "dsmall_ptr"), ty), **ptrs(("part_g_ptr", "part_gk_ptr"), "*fp32"),
               "tab_ptr": "*i32", **gate_ints}
        # flags 0: the plain gate's backward (dk3, no affine, no sums), and the same with a trained affine
        # of k3 (its sums); 1: BN-train pass 1 (affines, center, sums, no dk3)
        for sums in ((True,) if flags else (False, True)):
            const = dict(HAS_SCALE=bool(flags) or sums, HAS_SHIFT=bool(flags) or sums, HAS_CENTER=bool(flags),
                         HAS_SMALL_AFFINE=bool(flags), NEED_DK3=not flags, NEED_SUMS=sums, **blocks)
            name = "bn_train" if flags else ("dk3_sums" if sums else "dk3")
            entries.append((f"gate_bwd_{tag}_{name}", _gate_bwd_kernel,
                            {**sig, **{k: "constexpr" for k in const}}, const))

        sig = {**ptrs(("dy_ptr", "x_ptr", "k3_ptr", "small_ptr"), ty),
               **ptrs(("p_ptr", "q_ptr", "r_ptr", "ss_ptr", "st_ptr"), "*fp32"),
               "dk3_ptr": ty, "tab_ptr": "*i32", **gate_ints}
        const = dict(HAS_SMALL_AFFINE=bool(flags), **blocks)
        entries.append((f"gate_bwd_k3_{tag}", _gate_bwd_k3_kernel,
                        {**sig, **{k: "constexpr" for k in const}}, const))

        bc, bp = _stats_blocks(C, cl)
        sig = {"t_ptr": ty, "mean_ptr": "*fp32", "m2_ptr": "*fp32", "C": "i32", "HW": "i32", "NHW": "i32",
               "chunk": "i32"}
        const = dict(CHANNELS_LAST=cl, BIG=False, BLOCK_C=bc, BLOCK_P=bp)
        entries.append((f"channel_stats_{'nhwc' if cl else 'nchw'}_{_TRITON_DTYPE[dtype]}_C{C}",
                        _channel_stats_kernel, {**sig, **{k: "constexpr" for k in const}}, const))
    sig = {"mean_ptr": "*fp32", "m2_ptr": "*fp32", "out_mean_ptr": "*fp32", "out_var_ptr": "*fp32", "C": "i32",
           "Q": "i32", "NHW": "i32", "chunk": "i32"}
    const = dict(BLOCK_C=_FINALIZE_BLOCK_C, BLOCK_Q=_FINALIZE_BLOCK_Q)
    entries.append(("stats_finalize", _stats_finalize_kernel, {**sig, **{k: "constexpr" for k in const}}, const))
    # the 64-bit path (2**31 elements or more) of the statistics over NCHW maps, whose channel offsets
    # are 64-bit there
    bc, bp = _stats_blocks(256, False)
    sig = {"t_ptr": "*bf16", "mean_ptr": "*fp32", "m2_ptr": "*fp32", "C": "i32", "HW": "i32", "NHW": "i64",
           "chunk": "i32"}
    const = dict(CHANNELS_LAST=False, BIG=True, BLOCK_C=bc, BLOCK_P=bp)
    entries.append(("channel_stats_nchw_bf16_C256_int64", _channel_stats_kernel,
                    {**sig, **{k: "constexpr" for k in const}}, const))
    return entries + _pool.aot_kernels() + _bn_relu.aot_kernels()
