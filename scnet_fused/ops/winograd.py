"""3x3 convolutions (stride 1, padding 1) as Winograd F(4x4, 3x3) on the CPU.

A 3x3 convolution of an (N, C, H, W) map is computed on 4x4 output tiles: each 6x6 input window d and
3x3 filter g are transformed (``V = B^T d B``, ``U = G g G^T``), multiplied element-wise and summed over
the input channels (36 matrix products, one per position of the 6x6 tile, by ``torch.bmm``), and
transformed back (``Y = A^T M A``). That is 36 multiplies per 16 outputs and input channel instead of
144: about 4x fewer floating-point operations than the direct convolution, for three memory-bound
transform passes (C++ kernels, ``csrc/cpu/sc_winograd_cpu.cpp``). Where the package's product kernel
runs, the three passes are one kernel (``_wino_conv``) that keeps a block of tiles' transforms and
products in cache (:func:`_fused`).

The backward is two more Winograd computations: the input gradient is the same convolution of the
output gradient with the flipped, transposed filters, and the weight gradient the 36 products
``Z V^T`` of the transformed output gradient (the adjoint of the output transform) with the
transformed input, mapped back through ``G``. The transformed input is recomputed in the backward,
not saved (it is 2.25x the input). At inference the filters' transform is kept between calls
(:func:`conv2d_cached`, used by the fused modules).

Numerics (float32): the transforms' coefficients (up to 8 and 1/24) cost precision: on random data the
largest error relative to the output's largest magnitude is about 5e-6 to 1.3e-5 (32 to 256 input
channels) against 3e-7 to 1e-6 for the direct convolution. cuDNN's Winograd algorithms trade the same
way. A NaN or infinity in the input reaches every output of the 4x4 tiles whose windows hold it (a
direct convolution: its 3x3 neighbourhood), and inputs of about 1e37 and more overflow in the
transforms' sums. ``set_conv_algorithm("direct")`` (or ``SCNET_FUSED_CONV=direct``) keeps the direct
convolution.

:func:`conv2d` is what the fused modules call for their convolutions: it takes this path where it is
enabled and pays (:func:`winograd_applies`), and ``F.conv2d`` everywhere else. Under torch.compile an
eligible convolution is one custom op of the graph, ``scnet_fused::conv3x3``, that takes the same
decision on the real tensors (see "Inside torch.compile" below).
"""

from __future__ import annotations

import operator
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch

__all__ = ["conv3x3_winograd", "conv2d", "conv2d_cached", "set_conv_algorithm", "get_conv_algorithm",
           "set_filter_cache", "winograd_applies"]

_ALGORITHMS = ("auto", "winograd", "direct")
_ENV = "SCNET_FUSED_CONV"


def _env_choice(name: str, choices) -> str:
    """The environment variable ``name`` (default and empty: the first choice), one of ``choices``."""
    value = os.environ.get(name, choices[0]).strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected {', '.join(choices[:-1])} or {choices[-1]}")
    return value


_algorithm = _env_choice(_ENV, _ALGORITHMS)


def set_conv_algorithm(name: str) -> str:
    """Choose how the fused modules run their eligible 3x3 convolutions on the CPU: ``"auto"`` (Winograd
    where :func:`winograd_applies` says it pays, the default), ``"winograd"`` (wherever it can run) or
    ``"direct"`` (always ``F.conv2d``). Returns the previous choice."""
    global _algorithm
    previous, _algorithm = _algorithm, _checked_choice("set_conv_algorithm", name, _ALGORITHMS)
    return previous


def _checked_choice(what: str, value, choices) -> str:
    """``value`` normalized (stripped, lower case); a ValueError naming ``what`` unless one of ``choices``."""
    value = str(value).strip().lower()
    if value not in choices:
        raise ValueError(f"{what}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def get_conv_algorithm() -> str:
    return _algorithm


# G of F(4x4, 3x3) (interpolation points 0, 1, -1, 2, -2 and infinity), and the 9 x 36 matrix that
# maps a flattened 3x3 filter to its flattened 6x6 transform: U[6 r + s] = sum_ij G[r, i] G[s, j] g[3 i + j].
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_KRON = torch.einsum("ri,sj->ijrs", _G, _G).reshape(9, 36).float()
_KRON_T = _KRON.t().contiguous()


# The filter transforms run as C++ kernels (``_wino_filter``, ``_wino_filter_adjoint``): G g G^T in its
# separable form, 16 filters a vector, written in the layout the matrix products read. As matrix
# products, (36 x 9) @ (9 x K C) and its transpose (the flipped filters after a flip-transpose copy),
# they took 3.5x to 9.6x as long (benchmarks/results/cpu-epyc/winograd_parts.md: at 256 channels 2.3,
# 3.4 and 2.7 ms against 0.46, 0.52 and 0.33 ms, per convolution and training step three of them).
# On the Intel Xeon MKL runs those products near its peak: there, at 256 channels, the transform took
# 0.39 ms against their 0.32, the flipped one 0.58 against 0.70, the adjoint 0.28 against 1.01, with
# each vector's 16 filters transposed in registers (gathered element by element the first two had
# taken 0.52 and 0.85 ms: benchmarks/results/cpu-xeon/winograd_parts_filters{,_gathered}.md).
# The products remain as the reference the tests check the kernels against.
def _weight_transform(weight: Tensor, flip: bool = False, in_major: bool = False) -> Tensor:
    """(K, C, 3, 3) float32 filters -> (36, K, C): U[xi] = (G g G^T)[xi] for every (k, c). ``flip``: the
    filters of the input gradient's convolution, flip(g, (2, 3)) transposed to (C, K, 3, 3): U (36, C, K).
    ``in_major``: the two channel axes swapped, input channels first (the products' right operand)."""
    return torch.ops.scnet_fused._wino_filter(weight, flip, in_major)


def _weight_transform_adjoint(du: Tensor) -> Tensor:
    """(36, K, C) -> (K, C, 3, 3): the gradient of the filters from the gradient of their transform."""
    return torch.ops.scnet_fused._wino_filter_adjoint(du)


def _weight_transform_mm(weight: Tensor) -> Tensor:
    """:func:`_weight_transform` (flip False) as one matrix product: the kernels' reference."""
    K, C = weight.shape[0], weight.shape[1]
    return torch.mm(_KRON_T, weight.reshape(K * C, 9).t()).view(36, K, C)


def _weight_transform_adjoint_mm(du: Tensor) -> Tensor:
    """:func:`_weight_transform_adjoint` as one matrix product: the kernel's reference."""
    K, C = du.shape[1], du.shape[2]
    return torch.mm(_KRON, du.reshape(36, K * C)).t().contiguous().view(K, C, 3, 3)


def _tiles(H: int, W: int):
    return (H + 3) // 4, (W + 3) // 4


def _is_nhwc(t: Tensor) -> bool:
    """Dense channels_last and not also dense NCHW: the layout whose kernels run for ``t``."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


# NCHW maps at most this wide run the channels_last kernels (which read an NCHW map a strip of rows at a
# time, transposed to channels_last in cache, and write the NCHW result). The NCHW kernels vectorize
# across the tiles of a tile row, 16 at a time:
# at 28 px a row has 7 tiles, at 14 px 4, at 7 px 2, and most lanes idle; the channels_last kernels
# vectorize across the channels. Measured (transforms alone, N = 8, 2 cores) on an AMD EPYC (Zen 4),
# when the route still made a channels_last copy of the map and an NCHW copy of the result: input +
# output transform 654 us NCHW against 461 us through channels_last, the two copies included, at
# 8x64x28x28; 874 against 304 at 8x128x14x14; 949 against 172 at 8x256x7x7; at 8x64x56x56 (14
# tiles a row) 2552 against 2734. On a Xeon the channels_last convolution alone was already faster
# than the NCHW one at these widths (0.83 against 1.17 ms forward at 8x64x28x28, 0.89 against 1.32 at
# 8x128x14x14: benchmarks/results/cpu-xeon/winograd*.md).
_NHWC_ROUTE_MAX_W = 32


def _nhwc_kernels(x: Tensor) -> bool:
    """Whether x's convolution runs the channels_last kernels: x is channels_last, or an NCHW map
    narrow enough to go through them (:data:`_NHWC_ROUTE_MAX_W`)."""
    return _is_nhwc(x) or x.shape[3] <= _NHWC_ROUTE_MAX_W


# The 36 channel sums run either as torch.bmm (MKL) or as this package's register-blocked kernel
# (``_wino_bmm``). Where MKL does not run its fast code, on an AMD EPYC (Zen 4), torch.bmm did 96-152
# GFLOP/s with two threads on the products of the SCNet-50 stage shapes and the kernel 106-198, 1.03x
# to 1.85x faster on the same inputs (benchmarks/results/cpu-epyc/winograd_parts.md); on the Intel
# Xeon MKL's products ran at 330-385 GFLOP/s, near the cores' peak. "auto" takes the kernel with the
# AVX-512 build on a CPU that is not Intel's; SCNET_FUSED_WINOGRAD_GEMM=bmm|kernel overrides (the
# kernel also runs in the other builds, vectorized with their width). The weight gradient of a wide
# NCHW map on the NCHW kernels keeps torch.bmm (both of its operands have the tiles as their contiguous
# axis, which the kernel does not read).
_GEMM_ENV = "SCNET_FUSED_WINOGRAD_GEMM"
_gemm_kernel_choice: Optional[bool] = None


def _cpu_vendor() -> str:
    from .._cpuinfo import read

    return read().get("vendor_id", "")


def _gemm_kernel() -> bool:
    """Whether the Winograd products run as ``_wino_bmm`` (else torch.bmm)."""
    global _gemm_kernel_choice
    if _gemm_kernel_choice is None:
        from . import _cpp

        value = _env_choice(_GEMM_ENV, ("auto", "bmm", "kernel"))
        if value == "auto":
            _gemm_kernel_choice = _cpp.cpu_isa() == "avx512" and _cpu_vendor() not in ("", "GenuineIntel")
        else:
            _gemm_kernel_choice = value == "kernel"
    return _gemm_kernel_choice


def _bmm(a: Tensor, b: Tensor, a_transposed: bool = False) -> Tensor:
    """``a @ b`` batched, or ``a^T @ b`` with ``a_transposed``; a and b dense (P, ., .)."""
    if _gemm_kernel():
        return torch.ops.scnet_fused._wino_bmm(a, b, a_transposed)
    return torch.bmm(a.transpose(1, 2) if a_transposed else a, b)


# The whole convolution as one kernel (``_wino_conv``): the input transform, the products (the kernel of
# _wino_bmm) and the output transform a block of 14 tiles at a time, the block's transformed input and
# products in cache; memory sees the map once and the result once. Against the three passes (each
# writing its result to memory: the transformed input and the products are 2.25x the map and the output
# each) on an AMD EPYC (Zen 4), one 3x3 convolution forward of an NCHW map, N = 8, the filters'
# transform made beforehand: 1.18x-1.65x faster at 8x32x56x56 to 8x256x14x14, even (0.99x-1.01x) at
# 8x128x14x14 and 8x256x7x7 (blocks of 16 there, the output channels split between them), where the
# products dominate (benchmarks/results/cpu-epyc/winograd_parts.md). It runs where the products run as
# the kernel (:func:`_gemm_kernel`); SCNET_FUSED_WINOGRAD_FUSED=0 keeps the three passes.
#
# Where "auto" runs the products as torch.bmm (the AVX-512 build on an Intel CPU, MKL near the cores'
# peak on large products), the one-kernel convolution still runs where the products are a small part
# of the work or too small for MKL to reach its rate: at most 64 channels (the convolution's smaller
# side, input or output), at most 32 tiles (7 px maps at N = 8), or, where the filters' transform is
# made in the call (training), at most 16384 channel-tiles (8x128x14x14). Measured on a 2-core Intel
# Xeon (AVX-512), N = 8 (benchmarks/results/cpu-xeon/winograd_policy.md: the fused SCConv with every
# convolution in three passes through torch.bmm, every one as one kernel, and this rule, interleaved in
# one process; training step / eval forward): 8x32x56x56 18.0 / 4.1 ms one kernel against 26.6 / 8.4
# three passes, 8x64x28x28 10.6 / 2.7 against 13.8 / 3.8, 8x256x7x7 10.4 / 3.1 against 13.3 / 4.0; but
# 8x128x28x28 38.7 / 8.0 against 33.1 / 7.2 and 8x256x14x14 34.3 / 9.6 against 29.8 / 7.8, and at
# 8x128x14x14 the eval forward with its transform kept 3.2 against 2.9. In the scnet50 training step
# (torch.profiler) the 8x128x14x14 convolutions took about 47 ms as one kernel against 80 ms in three
# passes (torch.bmm alone 45 ms), so there training takes the one kernel.
_FUSED_ENV = "SCNET_FUSED_WINOGRAD_FUSED"
_fused_setting: Optional[str] = None
_BMM_FUSED_MAX_CHANNELS = 64
_BMM_FUSED_MAX_TILES = 32
_BMM_FUSED_MAX_WORK = 16384  # channels x tiles, where the filters' transform is made in the call
_bmm_by_auto: Optional[bool] = None


def _fused(tiles: Optional[int] = None, channels: Optional[int] = None, kept: bool = False) -> bool:
    """Whether the forward (and the input gradient) runs as the one-kernel convolution: with the products
    as the kernel (:func:`_gemm_kernel`) always; where "auto" chose torch.bmm for them, for a convolution
    of ``tiles`` tiles and ``channels`` channels (the smaller of its input and output channels; both given)
    within :data:`_BMM_FUSED_MAX_CHANNELS` or :data:`_BMM_FUSED_MAX_TILES`, or, unless its filters'
    transform is ``kept`` between calls, :data:`_BMM_FUSED_MAX_WORK`; with it kept, only within the
    channels. The rule is symmetric in the channels, so a convolution's forward and both gradients choose
    alike."""
    global _fused_setting
    if _fused_setting is None:
        _fused_setting = _env_choice(_FUSED_ENV, ("auto", "0", "1"))
    if _fused_setting != "auto":
        return _fused_setting == "1"
    if _gemm_kernel():
        return True
    if tiles is None or channels is None or not _bmm_chosen_by_auto():
        return False
    if kept:  # (the transform kept: :data:`_BMM_KEPT_MIN_TILES`)
        return channels <= _BMM_FUSED_MAX_CHANNELS
    return (channels <= _BMM_FUSED_MAX_CHANNELS or tiles <= _BMM_FUSED_MAX_TILES
            or channels * tiles <= _BMM_FUSED_MAX_WORK)


def _bmm_chosen_by_auto() -> bool:
    """torch.bmm runs the products because "auto" chose it for an AVX-512 build (not because it was asked
    for, or for a build whose kernels are narrower)."""
    global _bmm_by_auto
    if _bmm_by_auto is None:
        from . import _cpp

        _bmm_by_auto = _env_choice(_GEMM_ENV, ("auto", "bmm", "kernel")) == "auto" and _cpp.cpu_isa() == "avx512"
    return _bmm_by_auto


def _conv_tiles(x: Tensor) -> int:
    TH, TW = _tiles(x.shape[2], x.shape[3])
    return x.shape[0] * TH * TW


# Few tiles next to the channels (7x7 and 14x14 maps of 128 and 256 channels at N = 8): the filters'
# transform U (36 x C x K) and the weight gradient's dU outweigh the map's transforms (36 x tiles x
# channels), and each went to memory and back between two passes. There the convolution transforms
# the filters inside its task items (``_wino_conv_w``: kNR output channels an item, their part of U in
# the item's cache), and the weight gradient's products and adjoint transform run as one kernel
# (``_wino_wgrad``: a block of filters, all 36 positions, transformed back in cache). On an AMD EPYC
# (Zen 4), N = 8, 2 threads, C -> C, the filters' transform made in each call as in a training step
# (benchmarks/results/cpu-epyc/winograd_parts.md): the convolution forward 2.44x the separate kernels at
# 8x256x7x7 (32 tiles), 1.33x at 8x256x14x14 and 0.95x at 8x128x14x14 (128 tiles), 0.43x-0.76x at 392
# and 1568 tiles (there U, made once, is read per block of tiles from the caches, while the inside
# kernel reads V once per part of the outputs); the weight gradient 1.95x at 8x256x7x7, 1.21x at
# 8x256x14x14, 1.17x at 8x128x14x14, 0.59x-1.00x at more tiles (each item reads all 36 positions of the
# transformed input). In place in a training step, a convolution's forward and both gradients as
# Winograd (8 interleaved rounds in one process): with the filters inside wherever the outputs are at
# least the tiles, against twice the tiles, 4.00 against 4.42 ms and 4.19 against 4.78 (two runs) at
# 8x128x14x14, 8.40 against 9.38 at 8x192x14x14, 0.75 against 0.87 at 4x64x14x14, 0.24 against 0.25 at
# 8x32x7x7; the weight gradient inside wherever the channels are at least twice the tiles, against 4x,
# 13.18 against 13.58 ms at 8x256x14x14. So: the outputs at least the tiles for the convolution, the
# channels at least twice the tiles for the weight gradient; both only where the product kernel runs
# (:func:`_fused`).
def _filters_inside(tiles: int, k_out: int, c_in: int) -> bool:
    return _fused(tiles, min(k_out, c_in)) and k_out >= tiles


# Where "auto" runs the products as torch.bmm (an Intel CPU), the weight gradient inside was slower than
# its separate form (torch.bmm, then the adjoint transform, dU through memory) once the transformed input
# passed about 600 KiB: a thread reads the whole of it again for every block of 14 filters, presumably
# from L2 (2 MiB a core on the Xeon measured, shared with z and dU's block) only up to about that size
# (the VM exposed no cache counters to confirm it). So there the kernel runs where the transformed
# input is at most :data:`_BMM_WGRAD_INSIDE_MAX_V` tiles x input channels (36 x 4096 floats, 576 KiB),
# or where dU is over glibc's largest mmap threshold (32 MiB: torch.bmm's output is then mapped afresh
# and faulted in by every call). Measured on a 2-core Intel Xeon, 2 threads
# (benchmarks/results/cpu-xeon/winograd_parts_inside_n*.md, five interleaved rounds; separate with
# torch.bmm / inside, ms): 8x128x7x7 (32 tiles x 128 channels = 4096) 0.309 / 0.286, 4x256x7x7 0.782 /
# 0.725, 2x512x7x7 2.93 / 2.27, 1x256x7x7 0.744 / 0.465; but 6x256x7x7 (6144) 1.017 / 1.082, 8x256x7x7
# 1.126 / 1.576, 8x384x7x7 2.25 / 3.67, 8x448x7x7 2.87 / 3.83; with dU over 32 MiB 8x512x7x7 14.98 /
# 7.53 and 4x512x7x7 3.14 / 3.83 (the faults vary: 12.30 ms in that run through the package's product
# kernel). In place, the fused SCConv training step at 8x256x7x7 ran 11.60 ms against 12.26 with the
# kernel, eager 14.64 (winograd_policy_wgrad.md, 40 interleaved rounds in one process).
# A second Xeon (model 167) had it the other way at 8x256x7x7 in an A/B loop: the training step 4-6%
# faster with the kernel (9.52-9.72 against 10.12-10.15 ms), though in the benchmark harness on that
# shape no difference showed beyond the rounds' spread (1.26x / 1.30x eager with it, 1.27x / 1.29x
# without). Then the product kernel prefetched its rows (gemm_block): the kernel's loads of the
# transformed input, rows a matrix row apart, were where its stalls fell. On that Xeon the weight
# gradient alone, separate with torch.bmm / inside, ms: 24 tiles x 256 channels 0.87 / 0.64-0.68,
# 32 x 256 0.93-1.01 / 0.82-0.84, 40 x 256 1.04-1.12 / 0.98-1.07, 48 x 256 1.17-1.23 / 1.40 (a
# reduction of 48 tiles suits torch.bmm), 32 x 384 2.03-2.14 / 1.73-1.81; the 8x256x7x7 training step
# in one process, 40 interleaved rounds: 10.26 ms inside against 11.15 separate (per-round ratio 0.924,
# eager 13.79), and the benchmark harness on that shape 1.31x / 1.34x eager inside against 1.26x /
# 1.21x separate (benchmarks/results/HISTORY.md). So the bound is now 8192 (32 tiles of 256 channels,
# 16 of 512); the first Xeon's figures above predate the prefetch. SCNET_FUSED_WINOGRAD_WGRAD=inside
# (the kernel wherever eligible) or separate (never) overrides the rule; "auto" is the rule. The two
# forms' sums differ in the last bits (torch.bmm's order against the kernel's), so the choice is fixed,
# never made by timing at run time.
_BMM_WGRAD_INSIDE_MAX_V = 8192  # tiles x input channels
_BMM_WGRAD_INSIDE_MIN_DU = 32 << 20  # bytes of dU (36 K C float32)
_WGRAD_ENV = "SCNET_FUSED_WINOGRAD_WGRAD"
_wgrad_setting: Optional[str] = None


def _wgrad_inside(tiles: int, k: int, c: int) -> bool:
    global _wgrad_setting
    if not (_fused(tiles, min(k, c)) and 2 * tiles <= min(k, c)):
        return False
    if _wgrad_setting is None:
        _wgrad_setting = _env_choice(_WGRAD_ENV, ("auto", "inside", "separate"))
    if _wgrad_setting != "auto":
        return _wgrad_setting == "inside"
    if _gemm_kernel() or _fused_setting != "auto":
        return True
    return tiles * c <= _BMM_WGRAD_INSIDE_MAX_V or 36 * k * c * 4 > _BMM_WGRAD_INSIDE_MIN_DU


# Few channels and many tiles (the 56 and 28 px maps of 32 and 64 channels): the weight gradient's two
# transforms, 36 / 16 the size of dy and of x, went to memory whole and came back for the products.
# ``_wino_wgrad_x`` makes them inside instead, a run of about 64 tiles a task item, each run's products
# into a partial dU (36 K C floats) of its own, the partials added in run order (so the result does not
# depend on the thread count). On an AMD EPYC (Zen 4), N = 8, 2 threads, C -> C, against the separate
# transforms and products (benchmarks/results/cpu-epyc/winograd_parts_wgrad.md, 5 interleaved rounds in
# one process): 1.52x at 8x32x56x56 (1.16 against 1.76 ms), 1.10x at 8x64x56x56, 1.09x at 8x64x28x28
# (and in a 10-round loop 1.52x at 8x32x14x14, 1.25x at 8x64x14x14); from 128 channels the partials
# leave room for one run only, and it ran 0.50x-0.58x. So: at most 64 x 64
# channels, and more than 64 tiles (two runs or more); only with the product kernel (:func:`_fused`).
# The fused SCConv training step with it against without (interleaved rounds in one process): 1.098x at
# 8x32x56x56 (13.77 against 15.11 ms, 12 of 12 rounds), 1.066x at 8x64x28x28 (14 of 16), 1.035x at
# 8x64x56x56 (6 of 6).
def _wgrad_runs(tiles: int, k: int, c: int) -> bool:
    return _fused(tiles, min(k, c)) and k * c <= 64 * 64 and tiles > 64


def _in_major(x: Tensor, channels: int, kept: bool = False) -> bool:
    """The layout of the filters' transform x's convolution (``channels``: the smaller of its input and
    output channels; ``kept``: the transform kept between calls) reads: (36, C, K) (True) or (36, K, C)."""
    return _fused(_conv_tiles(x), channels, kept) or _nhwc_kernels(x)


def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], flip: bool = False,
             u: Optional[Tensor] = None) -> Tensor:
    """The convolution of x (dense NCHW or channels_last: the output in the same layout) with the 3x3
    filters ``weight`` (K, C, 3, 3), or with ``flip`` with flip(weight)^T (the input gradient's); or
    with their transform ``u`` already made (``_weight_transform(weight, flip, _in_major(x, min(K, C), True))``)."""
    N, _, H, W = x.shape
    TH, TW = _tiles(H, W)
    tiles = N * TH * TW
    K, C = (weight.shape[0], weight.shape[1]) if u is None else (u.shape[1], u.shape[2])  # either order
    if u is None and _filters_inside(tiles, C if flip else K, K if flip else C):
        return torch.ops.scnet_fused._wino_conv_w(x, weight, bias, flip)
    kept = u is not None
    in_major = _in_major(x, min(K, C), kept)
    if u is None:
        u = _weight_transform(weight, flip, in_major)  # (36, C, K), or (36, K, C)
    if _fused(tiles, min(K, C), kept):
        return torch.ops.scnet_fused._wino_conv(x, u, bias)
    if in_major:  # an NCHW x is read in place and y written NCHW by the same kernels
        v = torch.ops.scnet_fused._wino_input_nhwc(x, TH, TW)  # (36, T, C)
        return torch.ops.scnet_fused._wino_output_nhwc(_bmm(v, u), N, H, W, bias, not _is_nhwc(x))
    v = torch.ops.scnet_fused._wino_input(x, TH, TW)  # (36, C, T)
    return torch.ops.scnet_fused._wino_output(_bmm(u, v), N, H, W, bias)


def _weight_grad(grad_out: Tensor, x: Tensor) -> Tensor:
    """The filters' gradient; grad_out and x in one layout. The channels_last kernels (which read NCHW in
    place too) where x's convolution uses them (:func:`_in_major`): with the one-kernel convolution at
    every width (8x32x56x56: 1.98 against 2.07 ms, 8x64x56x56: 5.67 against 6.37, the product kernel
    reading the transformed output gradient transposed in place against torch.bmm on the NCHW
    transforms' layout; AMD EPYC, 2 threads)."""
    H, W = x.shape[-2:]
    TH, TW = _tiles(H, W)
    if _in_major(x, min(grad_out.shape[1], x.shape[1])):
        if _wgrad_runs(x.shape[0] * TH * TW, grad_out.shape[1], x.shape[1]):
            return torch.ops.scnet_fused._wino_wgrad_x(grad_out, x)
        z = torch.ops.scnet_fused._wino_output_adjoint_nhwc(grad_out, TH, TW)  # (36, T, K)
        v = torch.ops.scnet_fused._wino_input_nhwc(x, TH, TW)  # (36, T, C)
        if _wgrad_inside(z.shape[1], z.shape[2], v.shape[2]):
            return torch.ops.scnet_fused._wino_wgrad(z, v)
        return _weight_transform_adjoint(_bmm(z, v, a_transposed=True))
    z = torch.ops.scnet_fused._wino_output_adjoint(grad_out, TH, TW)  # (36, K, T)
    v = torch.ops.scnet_fused._wino_input(x, TH, TW)  # (36, C, T)
    return _weight_transform_adjoint(torch.bmm(z, v.transpose(1, 2)))


def _aten_backward(grad_out: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_weight: bool):
    """``(grad_x, grad_weight)`` of the direct convolution (padding 1), ATen's (differentiable again)."""
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [need_input, need_weight, False])
    return grad_x, grad_w


def conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_weight: bool):
    """``(grad_x, grad_weight)`` of ``conv3x3_winograd(x, weight)`` (None where not needed), both as
    Winograd; grad_out is read in x's layout, grad_x comes in it. With grad mode on (a backward run
    with create_graph) ATen's convolution backward instead, which autograd differentiates again (the
    Winograd kernels have no derivative of their own)."""
    if torch.is_grad_enabled():
        return _aten_backward(grad_out, x, weight, need_input, need_weight)
    if torch.compiler.is_compiling():
        return _graph_conv_backward(grad_out, x, weight, need_input, need_weight)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last if _is_nhwc(x) else torch.contiguous_format)
    grad_x = grad_w = None
    if need_input:  # conv3x3(grad_out, flip(weight)^T)
        grad_x = _forward(grad_out, weight, None, flip=True)
    if need_weight:
        grad_w = _weight_grad(grad_out, x)
    return grad_x, grad_w


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # differentiable again under create_graph (conv_backward)
        x, weight = ctx.saved_tensors
        grad_x, grad_w = conv_backward(grad_out, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_b = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    if x.dim() != 4:
        raise ValueError(f"conv3x3_winograd: expected an (N, C, H, W) input, got {x.dim()} dimensions")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"conv3x3_winograd: expected (K, C, 3, 3) filters, got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv3x3_winograd: the filters take {weight.shape[1]} channels, the input has {x.shape[1]}")
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device.type != "cpu":
            raise ValueError(f"conv3x3_winograd: the {name} is on {t.device}; the Winograd path runs on the CPU")
        if t.dtype != torch.float32:
            raise TypeError(f"conv3x3_winograd: the {name} is {t.dtype}; the Winograd path is float32")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv3x3_winograd: bias must have {weight.shape[0]} elements, got {tuple(bias.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"conv3x3_winograd: empty spatial size {tuple(x.shape[2:])}")


def conv3x3_winograd(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for 3x3 filters (stride 1, no dilation, one group) by
    Winograd F(4x4, 3x3) on the CPU, float32, differentiable in x, weight and bias. NCHW and
    channels_last inputs are read in place (each layout has its kernels) and the output has the
    input's layout; any other strides are copied to NCHW first. An empty batch gives an empty output.
    Where the fused ops take standard operators (``standard_ops_only``: traces, exports, torch.func
    transforms, forward-mode AD) and under torch.export it is ``F.conv2d``; under torch.compile the
    graph op ``scnet_fused::conv3x3``, which runs this (or ``F.conv2d`` where :func:`winograd_applies`
    says no)."""
    if _dispatch.fx_symbolic(x):  # torch.fx symbolic tracing: one node, the op
        return _dispatch.fx_record(conv3x3_winograd, 1, x, weight, bias)
    _check(x, weight, bias)
    if not _kernels_present():
        from . import _cpp

        raise RuntimeError("conv3x3_winograd: the compiled CPU kernels are not loaded ("
                           f"{_cpp.unavailable_reason('cpu') or 'this build lacks the Winograd transforms'})")
    if torch.compiler.is_compiling():  # one op of the graph (no guard on the sizes), or F.conv2d for an export
        if _dispatch.exporting() or torch.onnx.is_in_onnx_export():
            return F.conv2d(x, weight, bias, padding=1)
        return torch.ops.scnet_fused.conv3x3(x, weight, bias)
    if x.shape[0] == 0 or weight.shape[0] == 0:
        return F.conv2d(x, weight, bias, padding=1)
    from ._dispatch import standard_ops_only

    if standard_ops_only():  # a trace or export records, a torch.func transform, a forward-mode AD level
        return F.conv2d(x, weight, bias, padding=1)
    if not _is_nhwc(x):
        x = x.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return _WinogradConv.apply(x, weight, bias)
    return _forward(x, weight.detach(), None if bias is None else bias.detach())


def winograd_applies(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                     algorithm: Optional[str] = None, cached: bool = False) -> bool:
    """Whether :func:`conv2d` runs this convolution (forward and both gradients) as Winograd
    F(4x4, 3x3): a CPU float32 input, dense NCHW or channels_last, 3x3 filters of the same dtype,
    stride 1, padding 1, no dilation, one group, no autocast, plain eager (:func:`_plain_eager`), the
    compiled kernels present; and under ``"auto"``, the AVX-512 build of the kernels and enough
    channels and tiles (:func:`_auto`): where the measured gain holds. ``cached``: the filters' transform
    is kept between calls (:func:`conv2d_cached`), which lets fewer tiles pay. Under torch.compile:
    whether the convolution becomes the graph op (:func:`_graph_op_applies`), whose body asks this
    again on the real tensors."""
    if torch.compiler.is_compiling():  # the size rule moves into the graph op's body
        return _graph_op_applies(x, weight, stride, padding, dilation, groups, algorithm)
    algorithm = _algorithm if algorithm is None else algorithm
    if algorithm == "direct" or not _plain_eager(x, weight):
        return False
    if not (_eligible(x, weight, stride, padding, dilation, groups) and x.numel() > 0 and weight.shape[0] > 0
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
        return False
    if algorithm == "winograd":
        return True
    return _auto(x, weight, cached and _cache_enabled)


def _eligible(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    """The conditions no size enters (so a compiled graph fixes them anyway): a CPU float32 4-D input,
    3x3 float32 filters taking its channels, stride 1, padding 1, no dilation, one group, no autocast,
    the compiled kernels present."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() == 4 and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3)
            and weight.shape[1] == x.shape[1] and groups == 1 and tuple(stride) == (1, 1)
            and tuple(padding) == (1, 1) and tuple(dilation) == (1, 1)
            and not torch.is_autocast_enabled("cpu") and _kernels_present())


# "auto": measured on a 2-core AVX-512 Xeon at N = 8 (benchmarks/results/cpu-xeon/winograd.md and
# winograd_channels_last.md: C -> C convolutions alone and the SCConv training step and eval forward at
# the SCNet-50 stage shapes; the convolutions also at the pooled maps of k2). The matrix products (which
# run near the cores' peak) shrink with C K and the transforms (memory-bound) only with C + K, so the
# gain grows with the channels; the filter transforms (4x the filters) and fixed costs need enough tiles
# to spread over; and where H or W is not a multiple of 4 part of each edge tile computes padding. The
# rule: at least 64 channels and 64 tiles, and channels x tiles x (the useful fraction of the tiles'
# outputs) above a threshold per layout. NCHW (16384): in 8x64x28x28 (1.3x forward), 8x128x16x16
# (1.3x), 8x256x14x14 (1.5x); out 8x64x14x14 (0.8x), 8x64x21x21 (0.8x: 23% padding), 8x128x14x14
# (1.0x). channels_last, whose transforms vectorize across the channels without splitting columns
# (4096): the convolution alone 1.5x-2.1x forward from 64 channels at 14 to 56 px and 1.2x at
# 8x64x14x14. Out in both: 8x256x7x7 (32 tiles: 1.3x alone in channels_last, but the SCConv training
# step lost, 0.76x) and 32 channels (8x32x56x56: 1.2x forward alone, 0.95x-0.96x inside the SCConv;
# 8x32x28x28 0.8x; with 32 channels the weight gradient alone was faster direct too). "auto" takes
# Winograd only with the AVX-512 build, where this was measured (the other builds split the NCHW tile
# columns with scalar code). NCHW maps that run the channels_last kernels (:func:`_nhwc_kernels`, up
# to 32 px wide) take the channels_last threshold: on an AMD EPYC (Zen 4), with those kernels, the
# filter-transform kernels and the product kernel, 8x128x14x14 NCHW ran 1.16x forward and 1.36x
# forward + backward alone, and the SCConv training step 1.19x its direct self (benchmarks/results/
# cpu-epyc/winograd.md). 8x256x7x7 (32 tiles) ran 1.09x / 1.21x alone there but its SCConv step with
# Winograd did not gain (0.96x eager against 0.99x direct), so 7 px stays out.
_AUTO_MIN_CHANNELS = 64
_AUTO_MIN_TILES = 64
_AUTO_MIN_WORK = {False: 16384, True: 4096}  # by kernels: the channels_last ones?
# With the one-kernel convolution (:func:`_fused`), measured on the AMD EPYC (Zen 4), N = 8, the fused
# SCConv forced to Winograd against its direct self (benchmarks/results/cpu-epyc/winograd.md): with 32
# channels, where the three-pass Winograd had lost, it gained at 56, 28 and 14 px, training 1.21x /
# 1.15x / 1.09x and eval 1.35x / 1.48x / 1.75x; 8x64x14x14 1.21x / 1.46x. At 7 px (32 tiles) training
# lost, 0.97x / 0.80x / 0.85x at 64 / 128 / 256 channels: the three filter transforms of a step (4x the
# filters each) weigh as much as the products there; eval, its transforms kept between calls
# (:func:`conv2d_cached`), gained 1.55x / 1.61x / 1.13x. 8x256x4x4 (8 tiles) eval was even (0.98x).
# So: 32 channels; 64 tiles, or 16 with the transform kept; and at least half of the tiles' outputs
# inside the map (below that the products do more multiplies than the direct convolution's). With the
# filters transformed inside the convolution and the weight gradient (:func:`_filters_inside`; measured
# when it took at least twice as many outputs as tiles), the 7 px SCConv training steps gained too,
# forced Winograd against direct interleaved in one process (four rounds): 1.29x / 1.28x / 1.22x at
# 8x256x7x7 / 8x128x7x7 / 8x64x7x7; so 16 tiles suffice there as well.
# Where "auto" runs the products as torch.bmm (:func:`_fused`) and the filters' transform is kept between
# calls, a convolution of more than 64 channels runs the three passes from 4 tiles up, on the kernels
# that read maps up to 32 px wide as channels_last (:func:`_nhwc_kernels`; wider NCHW maps keep the rule
# above). The transform read from memory once per call by torch.bmm (MKL near the cores' peak) beat
# the transform made inside the call and the direct convolution at every size measured from 4 tiles
# with at least half of the tiles' outputs inside the map, and the one kernel (which reads it once per
# block of tiles) at all of them but 8x96x7x7 (0.163 against 0.155 ms), on a 2-core Xeon (AVX-512),
# C -> C, the map NCHW (benchmarks/results/cpu-xeon/winograd_kept_n{8,1,2}.md and winograd_kept_small.md,
# `bench_winograd_parts.py --parts conv`, five interleaved rounds in one process), ms, three passes
# through torch.bmm / the one kernel reading the kept transform / the transform made inside / F.conv2d:
# 8x256x7x7 0.80 / 1.25 / 1.20 / 1.60 (the
# kept transform was read by the one kernel there before, and the inference cache left it to be made
# inside), 8x128x7x7 0.24 / 0.33 / 0.32 / 0.44, 8x256x4x4 0.30 / 0.41 / 0.49 / 0.65, 1x512x7x7 1.18 /
# 1.41 / 2.67 / 1.70, 1x256x14x14 0.63 / 1.13 / 0.99 / 1.29, 8x256x14x14 2.66 / 4.52 / 4.74 / 5.85; at 64
# channels the one kernel stays ahead (8x64x7x7: 0.086 / 0.074). At one tile the kept transform's read
# alone can outweigh the direct convolution (1x512x4x4: 0.84 against 0.59 ms, though 1x256x4x4 gained,
# 0.23 against 0.28); 2 tiles gained on the direct convolution in the three cases measured (2x512x4x4
# 1.05 against 1.36, 2x256x4x4 0.32 against 0.42, 2x128x4x4 0.066 against 0.195), 4 and more in all with at least
# half of the tiles' outputs inside the map (4x512x4x4 1.05 against 1.76, 1x512x8x8 1.10 against 1.85;
# but 1x512x5x5, 25 of 64 outputs inside, 1.14 against 0.94): 4 for a margin.
_BMM_KEPT_MIN_TILES = 4
_FUSED_MIN_CHANNELS = 32
_FUSED_MIN_TILES = {False: 64, True: 16}  # by whether the filters' transform is kept between calls
# Where the convolution makes the filters' transform inside itself, 8 tiles (k2's 3x3 pooled maps of
# 14 px layers at N = 8): a 3x3 convolution's forward + both gradients in place, Winograd against
# direct (AMD EPYC, 2 threads, five interleaved rounds): 0.51 against 0.63 ms at 8x128x3x3, 1.50
# against 1.61 at 8x256x3x3, 1.51 against 2.38 at 8x256x4x4, 0.28 against 0.38 at 8x64x3x3; inference
# even or better but at 8x256x3x3 (0.44 against 0.38 ms).
_INSIDE_MIN_TILES = 8


def _kept_through_bmm(x: Tensor, tiles: int, channels: int) -> bool:
    """Whether a kept filters' transform of x's convolution (``tiles`` tiles, ``channels`` the smaller of
    its input and output channels) is read by the three passes with torch.bmm chosen by "auto" for the
    products, on the channels_last kernels (:data:`_BMM_KEPT_MIN_TILES`)."""
    return _bmm_chosen_by_auto() and _nhwc_kernels(x) and not _fused(tiles, channels, kept=True)


def _auto(x: Tensor, weight: Tensor, cached: bool = False) -> bool:
    if not _auto_isa():
        return False
    H, W = x.shape[2], x.shape[3]
    TH, TW = _tiles(H, W)
    channels = min(x.shape[1], weight.shape[0])
    tiles = x.shape[0] * TH * TW
    useful = (H * W) / (16 * TH * TW)
    if _fused(tiles, channels, cached):
        if _filters_inside(tiles, weight.shape[0], x.shape[1]):
            enough = tiles >= _INSIDE_MIN_TILES
        else:
            enough = tiles >= _FUSED_MIN_TILES[cached]
        return channels >= _FUSED_MIN_CHANNELS and enough and useful >= 0.5
    if cached and _kept_through_bmm(x, tiles, channels):
        return channels >= _AUTO_MIN_CHANNELS and tiles >= _BMM_KEPT_MIN_TILES and useful >= 0.5
    nhwc = _nhwc_kernels(x)
    work = channels * tiles * useful
    return channels >= _AUTO_MIN_CHANNELS and tiles >= _AUTO_MIN_TILES and work >= _AUTO_MIN_WORK[nhwc]


@torch.compiler.assume_constant_result  # (under torch.compile: asked at trace time, a constant)
def _auto_isa() -> bool:
    from . import _cpp

    return _cpp.cpu_isa() == "avx512"


def _plain_eager(x: Tensor, weight: Tensor) -> bool:
    """Eager PyTorch on real tensors: not under torch.compile / torch.export (there the graph op stands
    for the decision: :func:`_graph_op_applies`), not while torch.jit.trace or an ONNX export
    records, not inside a torch.func transform or a forward-mode AD level, no tensor subclass."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False
    from ._dispatch import _forward_ad_active, _functorch_active

    return not (_functorch_active() or _forward_ad_active())


_present: Optional[bool] = None


@torch.compiler.assume_constant_result  # (under torch.compile: asked at trace time, a constant)
def _kernels_present() -> bool:
    global _present
    if _present is None:
        from . import _cpp

        ops = ("_wino_input", "_wino_output", "_wino_output_adjoint")
        _present = all(_cpp.has_kernel(op + layout, "CPU") for op in ops for layout in ("", "_nhwc")) and \
            all(_cpp.has_kernel(op, "CPU") for op in ("_wino_filter", "_wino_filter_adjoint", "_wino_bmm", "_wino_conv", "_bits_digest",
                                                     "_wino_conv_w", "_wino_wgrad", "_wino_wgrad_x"))
    return _present


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``, as Winograd where
    :func:`winograd_applies`."""
    if winograd_applies(x, weight, _pair(stride), _pair(padding), _pair(dilation), groups):
        return conv3x3_winograd(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# Inference keeps the filters' transform of a convolution between calls (:func:`conv2d_cached`): it is
# 4x the filters, and made on every call it cost 0.12 ms per 128x128 and 0.47 ms per 256x256 filter bank
# (benchmarks/results/cpu-epyc/winograd_parts.md), two or three per SCConv. The SCConv's eval forward
# with the cache against without it, interleaved in one process (AMD EPYC, 2 threads, N = 8): 1.05x at
# 8x64x28x28, 1.09x at 8x128x28x28, 1.13x at 8x128x14x14, 1.21x at 8x256x14x14. An entry holds the
# tensors it was made from and a fingerprint of each (:func:`_fingerprint`: dtype, shape, strides and a
# 64-bit digest of the bytes), and serves a call only while every source is the same object with the
# same fingerprint, checked on every call: version counters alone would miss edits made through
# ``.data``, which leave the parameter's counter as it was (EMA updates and weight surgery do this).
# Any other value (an optimizer step, load_state_dict of other values, an in-place edit however made,
# a new tensor assigned, a module moved or cast) makes it be remade. The entries live as long as their
# modules (weak keys).
# SCNET_FUSED_WINOGRAD_CACHE=0, or set_filter_cache(False), turns it off.
_filter_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_cache_enabled = os.environ.get("SCNET_FUSED_WINOGRAD_CACHE", "1").strip() != "0"
# Not kept where the convolution transforms the filters inside its task items (:func:`_filters_inside`)
# and the transform is large: read back from memory on every call it cost more than making it again in
# the cores' caches. The SCConv's eval forward (AMD EPYC, 2 threads, N = 8), kept against made inside:
# 8x256x7x7 1.18x against 1.43x eager, 8x256x14x14 1.61x against 1.81x (9.4 MB transforms); but
# 8x128x7x7 1.46x against 1.24x (2.4 MB). Between the two sizes: 4 MiB.
_CACHE_MAX_BYTES = 4 << 20


def _made_inside(x: Tensor, weight: Tensor) -> bool:
    """Whether x's convolution with ``weight`` is better served by transforming the filters inside it than
    by a kept transform (:data:`_CACHE_MAX_BYTES`)."""
    if x.dim() != 4 or weight.dim() != 4:
        return False
    TH, TW = _tiles(x.shape[2], x.shape[3])
    K, C = weight.shape[0], weight.shape[1]
    tiles = x.shape[0] * TH * TW
    return (36 * K * C * 4 > _CACHE_MAX_BYTES and _filters_inside(tiles, K, C)
            and not _kept_through_bmm(x, tiles, min(K, C)))


def set_filter_cache(enabled: bool) -> bool:
    """Turn the inference cache of the filters' transforms on or off (off also empties it); returns the
    previous setting."""
    global _cache_enabled
    numpy_bool = type(enabled).__module__ == "numpy" and type(enabled).__name__ in ("bool", "bool_")
    integer = not isinstance(enabled, torch.Tensor) and hasattr(type(enabled), "__index__")  # (numpy's too)
    if not (isinstance(enabled, bool) or numpy_bool or integer and operator.index(enabled) in (0, 1)):
        raise ValueError(f"set_filter_cache: expected True or False, got {enabled!r}")
    previous, _cache_enabled = _cache_enabled, bool(enabled)
    if not _cache_enabled:
        _filter_cache.clear()
    return previous


def _fingerprint(t: Tensor) -> tuple:
    """What identifies ``t``'s value for the cache: its dtype, shape, strides and a 64-bit digest of its
    bytes (``_bits_digest``, csrc/ops.cpp: one read of the tensor, at about memory speed)."""
    return t.dtype, tuple(t.shape), t.stride(), torch.ops.scnet_fused._bits_digest(t.detach())


class _Entry:
    __slots__ = ("sources", "prints", "in_major", "u", "bias")

    def __init__(self, sources, in_major: bool, u: Tensor, bias: Optional[Tensor]):
        self.sources = sources
        self.prints = tuple(_fingerprint(t) if isinstance(t, Tensor) else None for t in sources)
        self.in_major, self.u, self.bias = in_major, u, bias

    def matches(self, sources, in_major: bool) -> bool:
        if in_major != self.in_major or len(sources) != len(self.sources):
            return False
        for t, old in zip(sources, self.sources):  # the same objects and numbers first (cheap)
            if isinstance(t, Tensor) or isinstance(old, Tensor):
                if t is not old:
                    return False
            elif t != old:
                return False
        return all(_fingerprint(t) == fp for t, fp in zip(sources, self.prints) if fp is not None)


def centre_taps(weight: Tensor) -> Tensor:
    """``weight[:, :, 1, 1]`` of the (K, C, 3, 3) filters, as one select of the flattened taps (its
    backward zero-fills one weight-sized tensor). Not kept between calls: checking that the filters are
    unchanged reads them whole, as taking the taps does."""
    return weight.flatten(2)[:, :, 4]


def _cacheable(sources) -> bool:
    # inference tensors keep no version counter
    return all(not (isinstance(t, Tensor) and t.is_inference()) for t in sources)


def conv2d_cached(owner: torch.nn.Module, x: Tensor, sources: tuple, make, stride, padding, dilation,
                  groups: int, fallback=None) -> Tensor:
    """:func:`conv2d` of the filters and bias ``make()`` returns, made from ``sources`` (the tensors and
    numbers they depend on, the filters first): at inference (autograd off) on the Winograd path, with
    their transform kept for ``owner`` while the sources are unchanged. Where Winograd does not apply,
    ``fallback()`` if given, else ``F.conv2d``."""
    weight = sources[0]
    keep = (_cache_enabled and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and _cacheable(sources) and not _made_inside(x, weight))
    if winograd_applies(x, weight, _pair(stride), _pair(padding), _pair(dilation), groups, cached=keep):
        if not keep:
            weight, bias = make()
            return conv3x3_winograd(x, weight, bias)
        in_major = _in_major(x, min(weight.shape[0], weight.shape[1]), kept=True)
        entry = _filter_cache.get(owner)
        if entry is None or not entry.matches(sources, in_major):
            weight, bias = make()
            _check(x, weight, bias)
            entry = _Entry(sources, in_major, _weight_transform(weight.detach(), False, in_major),
                           None if bias is None else bias.detach())
            _filter_cache[owner] = entry
        return _forward(x, None, entry.bias, u=entry.u)  # x: dense NCHW or channels_last (winograd_applies)
    if fallback is not None:
        return fallback()
    weight, bias = make()
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ----------------------------------------------------------------------------------------------
# Inside torch.compile: the convolution as a custom op of the compiled graph
# ----------------------------------------------------------------------------------------------
# Dynamo cannot trace the Winograd path (its kernels have no fake-tensor forms, and the size rule would
# put guards on the sizes), so under torch.compile an eligible convolution enters the graph as one
# opaque op, ``scnet_fused::conv3x3`` (and ``conv3x3_backward`` for its gradients), whose body runs on
# the real tensors and takes the same decision as eager (:func:`winograd_applies`, the size rule
# included): Winograd where it pays, ``F.conv2d`` / ATen's convolution backward elsewhere. Its outputs
# have fixed layouts whatever the body chose (the input's memory format for the output and the input
# gradient, contiguous filters' gradients), as the graph's fake tensors say. torch.export keeps
# ``F.conv2d`` (an exported program runs without this package where it can).


def _graph_op_applies(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                      algorithm: Optional[str] = None) -> bool:
    """Under torch.compile (not torch.export): whether ``conv2d(x, weight, ...)`` enters the graph as
    ``scnet_fused::conv3x3``, whose body applies the size rule. Only what the graph fixes anyway is
    asked here (:func:`_eligible`, the algorithm, the kernels' build), so no guard on the sizes is
    added."""
    algorithm = _algorithm if algorithm is None else algorithm
    if algorithm == "direct" or _dispatch.exporting() or torch.onnx.is_in_onnx_export():
        return False
    return _eligible(x, weight, stride, padding, dilation, groups) and (algorithm == "winograd" or _auto_isa())


def _graph_format(x: Tensor) -> torch.memory_format:
    """The graph op's output layout for an input like ``x`` (the Winograd kernels' rule: channels_last
    for a dense channels_last map that is not also dense NCHW, else NCHW; also the layout of the
    strided downsample's input gradient, ``modules._Subsample``)."""
    return torch.channels_last if _is_nhwc(x) else torch.contiguous_format


def _in_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t`` with exactly the strides of ``torch.empty(t.shape, memory_format=fmt)`` (a copy only where
    they differ: size-1 dimensions leave several strides dense)."""
    if t.stride() == _dense_strides(t.shape, fmt):
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)
    return out.copy_(t)


def _dense_strides(shape, fmt: torch.memory_format):
    """The strides ``torch.empty(shape, memory_format=fmt)`` gets (4-D)."""
    return torch.empty(shape, device="meta", memory_format=fmt).stride()


def _winograd_at_run(x: Tensor, weight: Tensor) -> bool:
    """The eager decision on the real tensors: the graph op's body."""
    return winograd_applies(x, weight, (1, 1), (1, 1), (1, 1), 1)


@torch.library.custom_op("scnet_fused::conv3x3", mutates_args=())
def _conv3x3_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    _check(x, weight, bias)
    fmt = _graph_format(x)
    if _winograd_at_run(x, weight):
        with torch.no_grad():
            y = _forward(x, weight, bias)
    else:
        y = F.conv2d(x, weight, bias, padding=1)
    return _in_format(y, fmt)


@_conv3x3_op.register_fake
def _(x, weight, bias):
    _check(x, weight, bias)
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_graph_format(x))


@torch.library.custom_op("scnet_fused::conv3x3_backward", mutates_args=())
def _conv3x3_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, need_input: bool,
                         need_weight: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_weight); an empty tensor for one not asked for."""
    _check(x, weight, None)
    fmt = _graph_format(x)
    if _winograd_at_run(x, weight):  # (the forward's decision: the same x)
        with torch.no_grad():
            grad_x, grad_w = conv_backward(grad_out, x, weight, need_input, need_weight)
    else:
        grad_x, grad_w = _aten_backward(grad_out, x, weight, need_input, need_weight)
    grad_x = _in_format(grad_x, fmt) if need_input else x.new_empty(0)
    grad_w = _in_format(grad_w, torch.contiguous_format) if need_weight else weight.new_empty(0)
    return grad_x, grad_w


@_conv3x3_backward_op.register_fake
def _(grad_out, x, weight, need_input, need_weight):
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_graph_format(x)) \
        if need_input else x.new_empty(0)
    return grad_x, (weight.new_empty(weight.shape) if need_weight else weight.new_empty(0))


def _graph_conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, need_input: bool, need_weight: bool):
    grad_x, grad_w = torch.ops.scnet_fused.conv3x3_backward(grad_out, x, weight, need_input, need_weight)
    return grad_x if need_input else None, grad_w if need_weight else None


def _conv3x3_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _conv3x3_bwd(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():  # create_graph: ATen's backward, differentiable again
        grad_x, grad_w = _aten_backward(grad_out, x, weight, need_input, need_weight)
    else:
        grad_x, grad_w = _graph_conv_backward(grad_out, x, weight, need_input, need_weight)
    grad_b = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


_conv3x3_op.register_autograd(_conv3x3_bwd, setup_context=_conv3x3_setup)
