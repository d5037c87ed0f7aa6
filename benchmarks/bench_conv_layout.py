"""SCConv's 3x3 convolutions in NCHW against channels_last, and the cost of converting between them.

    python benchmarks/bench_conv_layout.py                    # SCNet-50 stage shapes, N = 8, best device
    python benchmarks/bench_conv_layout.py --shapes 32x56x56 --rounds 3

The convolutions are most of an SCConv training step on a CPU, so their speed in each memory format
decides how the fused module compares with ``torch.compile`` (inductor converts the convolutions to
channels_last). Per shape ``(C, H, W)``: ``conv2d(x, w, padding=1)`` with C -> C channels, forward (no
grad) and forward + backward (gradients of x and w), with x, w and the output gradient all NCHW or all
channels_last; GFLOP/s from 2 * N * C * C * 9 * H * W per direction (three directions for forward +
backward); and one conversion of x to channels_last (``x.contiguous(memory_format=channels_last)``).
Layouts are timed in interleaved rounds (order alternating); a row's time is the median of its rounds'
medians. Writes ``conv_layout.json`` and ``.md`` under ``--out`` (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import bench  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _jobs(N, C, H, W, device, fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g).to(device).contiguous(memory_format=fmt).requires_grad_()
    w = (0.05 * torch.randn(C, C, 3, 3, generator=g)).to(device).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(N, C, H, W, generator=g).to(device).contiguous(memory_format=fmt)

    def forward():
        with torch.no_grad():
            return F.conv2d(x, w, padding=1)

    def train():
        return torch.autograd.grad(F.conv2d(x, w, padding=1), [x, w], dy)

    return {"forward": forward, "forward+backward": train}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--out", default=None)
    bench.add_machine_args(ap)
    args = ap.parse_args(argv)

    device, allocator = bench.machine_from_args(args)
    shapes = bench.shapes_from_arg(ap, args.shapes)
    N = args.batch_size
    rows = []
    for C, H, W in shapes:
        jobs = {name: _jobs(N, C, H, W, device, fmt) for name, fmt in LAYOUTS.items()}
        samples = bench.interleaved_rounds(LAYOUTS, jobs.__getitem__, args.rounds, device, args.min_run_time)
        x = torch.randn(N, C, H, W).to(device)
        conv_ms = bench.time_fn(lambda: x.contiguous(memory_format=torch.channels_last), device,
                                min_run_time=args.min_run_time).median_ms
        flops = 2 * N * C * C * 9 * H * W
        where = bench.shape_str((N, C, H, W))
        for (layout, mode), ts in samples.items():
            ms = statistics.median(ts)
            f = flops * (3 if mode != "forward" else 1)
            rows.append(dict(op="conv3x3", provider=layout, mode=mode, shape=where, dtype="fp32",
                             device=bench.device_name(device), versions=bench.versions(), median_ms=ms,
                             gflops=f / (ms * 1e-3) / 1e9, rounds=len(ts), to_channels_last_ms=conv_ms,
                             allocator=allocator))
        bench.log_samples(where, samples)
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), "conv_layout", markdown(rows))
    return 0


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# 3x3 convolutions, NCHW against channels_last: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}; `benchmarks/bench_conv_layout.py`; C -> C channels, "
             f"padding 1, fp32; {first['rounds']} interleaved rounds, median of the rounds' medians. "
             f"Allocator: {first.get('allocator') or 'as configured'}.", "",
             "| N x C x H x W | mode | NCHW ms | channels_last ms | NCHW GFLOP/s | channels_last GFLOP/s "
             "| channels_last vs NCHW | x to channels_last ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for shape, mode, a, b in bench.setting_pairs(rows, "nchw", "channels_last"):
        lines.append(f"| {shape} | {mode} | {a['median_ms']:.3f} | {b['median_ms']:.3f} | {a['gflops']:.0f} | "
                     f"{b['gflops']:.0f} | {a['median_ms'] / b['median_ms']:.2f}x | {a['to_channels_last_ms']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
