"""The fused bottleneck with conv1_a and conv1_b stacked into one convolution, against running them
one after the other (``SCBottleneck.stack_conv1 = False``), in one process.

    python benchmarks/bench_conv1_stack.py                    # SCNet-50 stage shapes, N = 8, best device
    python benchmarks/bench_conv1_stack.py --shapes 256x56x56 --rounds 6
    python benchmarks/bench_conv1_stack.py --batch-size 64 --amp bf16 --channels-last   # a GPU's setting

Per shape ``(C, H, W)`` (the bottleneck's input; planes = C / 4 as in SCNet-50's blocks after the
first of a stage, so conv1_a / conv1_b map C to C / 8 channels each): a training step (forward with
batch statistics + backward of a fixed output gradient, input gradient included) and an inference
forward (eval, no grad), in fp32 or under ``--amp`` autocast, NCHW or ``--channels-last``. The two
settings run on the same module and input in interleaved rounds (order alternating); a row's time is
the median of its rounds' medians, with the rounds' spread. "stacked" stacks at every size; the
module stacks only where x has at least half as many elements as the two weights (the ``default``
column says which it does at that size).
Writes ``conv1_stack.json`` and ``.md`` under ``--out`` (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import bench, modules, reference  # noqa: E402
from scnet_fused.modules import SCBottleneck  # noqa: E402

SETTINGS = {"separate": False, "stacked": True}
DEFAULT_SHAPES = "256x56x56,512x28x28,1024x14x14,2048x7x7"


def _jobs(block, x, dy, amp):
    def autocast():
        return bench.amp_context(x.device.type, amp)

    def train():
        block.train()
        xg = x.detach().requires_grad_()
        with autocast():
            out = block(xg)
        return torch.autograd.grad(out, [xg] + [p for p in block.parameters()], dy.to(out.dtype))

    def inference():
        block.eval()
        with torch.no_grad(), autocast():
            return block(x)

    return {"train": train, "inference": inference}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_module_ab_args(ap, DEFAULT_SHAPES, "comma list of CxHxW, the bottleneck's input (C a multiple of 8; "
                             f"default {DEFAULT_SHAPES})")
    args = ap.parse_args(argv)

    device, allocator = bench.machine_from_args(args)
    shapes = bench.shapes_from_arg(ap, args.shapes)
    for C, _, _ in shapes:
        if C % 8:
            ap.error(f"--shapes: C = {C} is not a multiple of 8 (planes = C / 4, two halves of planes / 2)")
    N = args.batch_size
    rows = []
    for C, H, W in shapes:
        torch.manual_seed(0)
        ref = reference.SCBottleneck(C, C // 4, norm_layer=nn.BatchNorm2d)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        block = SCBottleneck.adopt(ref).to(device, memory_format=fmt)
        x = torch.randn(N, C, H, W, device=device).contiguous(memory_format=fmt)
        dy = torch.randn(N, C, H, W, device=device).contiguous(memory_format=fmt)
        jobs = _jobs(block, x, dy, args.amp)

        def jobs_for(setting):
            block.stack_conv1 = SETTINGS[setting]
            return jobs

        default = "stacked" if modules._stack_pays(block.conv1_a, block.conv1_b, x) else "separate"
        pays = modules._stack_pays
        modules._stack_pays = lambda a, b, x: True  # measure the stacked convolution at every size
        try:
            samples = bench.interleaved_rounds(SETTINGS, jobs_for, args.rounds, device, args.min_run_time)
        finally:
            modules._stack_pays = pays
        where = bench.shape_str((N, C, H, W))
        for (setting, mode), ts in samples.items():
            rows.append(bench.module_ab_row("bottleneck", setting, mode, where, args, device, allocator, ts,
                                            default=default))
        bench.log_samples(where, samples)
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), "conv1_stack", markdown(rows))
    return 0


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# Bottleneck conv1_a + conv1_b stacked into one convolution: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}; `benchmarks/bench_conv1_stack.py`; {first['dtype']}, "
             f"{first['layout']}, "
             f"planes = C / 4; {first['rounds']} interleaved rounds in one process, median of the rounds' "
             f"medians (min-max of the rounds in brackets). Allocator: {first.get('allocator') or 'as configured'}.",
             "",
             "| N x C x H x W | mode | separate ms | stacked ms | stacked vs separate | default |",
             "|---|---|---:|---:|---:|---|"]
    for shape, mode, a, b in bench.setting_pairs(rows, "separate", "stacked"):
        lines.append(f"| {shape} | {mode} | {a['median_ms']:.2f} ({a['min_ms']:.2f}-{a['max_ms']:.2f}) | "
                     f"{b['median_ms']:.2f} ({b['min_ms']:.2f}-{b['max_ms']:.2f}) | "
                     f"{a['median_ms'] / b['median_ms']:.2f}x | {b.get('default', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
