"""The fused SCConv with k2's BatchNorm applied inside the gate kernels, against running it as the module
on the pooled map (``SCConv.fuse_k2_norm = False``), in one process.

    python benchmarks/bench_pooled_bn.py                    # SCNet-50's SCConv shapes, N = 8, best device
    python benchmarks/bench_pooled_bn.py --shapes 32x56x56 --rounds 6 --batch-size 2
    python benchmarks/bench_pooled_bn.py --batch-size 64 --amp bf16 --channels-last   # a GPU's setting

Per shape ``(C, H, W)`` (the SCConv's input and output, pooling_r = 4): a training step (forward with
batch statistics + backward of a fixed output gradient, input and parameter gradients), an eval
forward with autograd recording, and an inference forward (eval, no grad). ``gate``: the module as it
is (training: the pooled map's statistics, its BatchNorm applied where the gate kernels read the map,
its backward from the gate's dsmall; eval: folded into per-channel constants of the gate kernels).
``module``: k2's BatchNorm as nn.BatchNorm2d on the pooled map, the gate reading its output (at
inference folded into k2's convolution where the size rule allows). Both settings run on the same
module and input in interleaved rounds (order alternating); a row's time is the median of its rounds'
medians, with the rounds' spread; and per setting the bytes autograd keeps for backward in a training
forward. Writes ``pooled_bn.json`` and ``.md`` under ``--out`` (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import bench, modules, reference  # noqa: E402
from scnet_fused.modules import SCConv  # noqa: E402

SETTINGS = ("module", "gate")
DEFAULT_SHAPES = "32x56x56,64x28x28,128x14x14,256x7x7"


def _jobs(conv, x, dy, amp):
    def autocast():
        return bench.amp_context(x.device.type, amp)

    params = list(conv.parameters())

    def train():
        conv.train()
        xg = x.detach().requires_grad_()
        with autocast():
            out = conv(xg)
        return torch.autograd.grad(out, [xg] + params, dy.to(out.dtype))

    def eval_forward():
        conv.eval()
        with autocast():
            return conv(x.detach().requires_grad_())

    def inference():
        conv.eval()
        with torch.no_grad(), autocast():
            return conv(x)

    return {"train": train, "eval": eval_forward, "inference": inference}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_module_ab_args(ap, DEFAULT_SHAPES, f"comma list of CxHxW (default {DEFAULT_SHAPES})")
    args = ap.parse_args(argv)

    device, allocator = bench.machine_from_args(args)
    shapes = bench.shapes_from_arg(ap, args.shapes)
    N = args.batch_size
    state = {"setting": "gate", "where": {}}
    takes = modules._gate_takes_norm

    def recording(norm, small):  # whether the gate took k2's norm (the module runs where it is not asked)
        took = takes(norm, small)
        state["where"].setdefault(state["setting"], set()).add("gate" if took else "module")
        return took

    modules._gate_takes_norm = recording
    rows = []
    try:
        for C, H, W in shapes:
            torch.manual_seed(0)
            ref = reference.SCConv(C, C, 1, 1, 1, 1, 4, nn.BatchNorm2d)
            fmt = torch.channels_last if args.channels_last else torch.contiguous_format
            conv = SCConv.adopt(ref).to(device, memory_format=fmt)
            x = torch.randn(N, C, H, W, device=device).contiguous(memory_format=fmt)
            dy = torch.randn(N, C, H, W, device=device).contiguous(memory_format=fmt)
            jobs = _jobs(conv, x, dy, args.amp)

            def jobs_for(setting):
                state["setting"] = setting
                conv.fuse_k2_norm = setting == "gate"
                return jobs

            state["where"] = {}
            samples = bench.interleaved_rounds(SETTINGS, jobs_for, args.rounds, device, args.min_run_time)
            saved = {}
            for setting in SETTINGS:  # bytes autograd keeps for backward in a training forward
                jobs_for(setting)
                conv.train()
                xg = x.detach().requires_grad_()
                saved[setting] = bench.saved_tensor_bytes(lambda: conv(xg), exclude=list(conv.parameters()) + [xg])
            where = bench.shape_str((N, C, H, W))
            for (setting, mode), ts in samples.items():
                rows.append(bench.module_ab_row(
                    "scconv", setting, mode, where, args, device, allocator, ts,
                    saved_bytes=saved[setting] if mode == "train" else None,
                    k2_norm="+".join(sorted(state["where"].get(setting) or {"module"}))))
            bench.log_samples(where, samples)
    finally:
        modules._gate_takes_norm = takes
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), "pooled_bn", markdown(rows))
    return 0


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# SCConv: k2's BatchNorm inside the gate kernels against the module: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}; `benchmarks/bench_pooled_bn.py`; {first['dtype']}, "
             f"{first['layout']}, pooling_r = 4; {first['rounds']} interleaved rounds in one process, median of the "
             f"rounds' medians (min-max of the rounds in brackets). Allocator: "
             f"{first.get('allocator') or 'as configured'}.", "",
             "| N x C x H x W | mode | module ms | gate ms | gate vs module | saved for backward, MiB (module / gate) |",
             "|---|---|---:|---:|---:|---|"]
    for shape, mode, a, b in bench.setting_pairs(rows, "module", "gate"):
        saved = "-" if a.get("saved_bytes") is None else \
            f"{a['saved_bytes'] / 2**20:.2f} / {b['saved_bytes'] / 2**20:.2f}"
        lines.append(f"| {shape} | {mode} | {a['median_ms']:.3f} ({a['min_ms']:.3f}-{a['max_ms']:.3f}) | "
                     f"{b['median_ms']:.3f} ({b['min_ms']:.3f}-{b['max_ms']:.3f}) | "
                     f"{a['median_ms'] / b['median_ms']:.2f}x | {saved} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
