"""Op benchmark: eager vs torch.compile vs the fused backends, forward / backward / full.

    python benchmarks/bench_gate.py                       # gate, BN-train gate, k2 pool, BN+ReLU; all stage shapes
    python benchmarks/bench_gate.py --op gate_bn --mode full --dtype bf16 --batch-size 64
    python benchmarks/bench_gate.py --shapes 64x28x28 --providers eager,cpu --out /tmp/gate

Rows (speed, effective bandwidth against the measured copy ceiling, saved-for-backward bytes, peak
memory) go to <out>/gate.json, gate.md and gate.png.
"""

import argparse
import os
import sys

import torch

from scnet_fused import _args, bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", type=_args.comma_list, default="gate,gate_bn,avgpool,bn_relu", help="comma list of gate, gate_bn, avgpool, bn_relu")
    p.add_argument("--mode", type=_args.comma_list, default="forward,backward,full", help="comma list of forward, backward, full")
    p.add_argument("--providers", type=_args.comma_list, help="comma list (default: every available one)")
    p.add_argument("--dtype", type=_args.comma_list, default="fp32", help="comma list of fp32, bf16, fp16")
    p.add_argument("--batch-size", type=_args.positive_int, default=8)
    p.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--default-malloc", action="store_true", help="CPU: keep glibc malloc's dynamic thresholds")
    p.add_argument("--min-run-time", type=_args.positive_float, default=0.5, help="CPU seconds per measurement")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    p.add_argument("--name", default="gate")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else bench.best_device()
        if device.type == "cpu":
            bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=not args.default_malloc))
        shapes = bench.shapes_from_arg(p, args.shapes)
        providers = args.providers
        rows, notes = [], []
        with bench.bench_environment():
            for dt in args.dtype:
                h = bench.Harness(device=device, dtype=bench.parse_dtype(dt), batch_size=args.batch_size,
                                  min_run_time=args.min_run_time, progress=bench.log_stderr)
                for op in args.op:
                    for shape in shapes:
                        h.run_op(op, shape, modes=args.mode, providers=providers,
                                 channels_last=args.channels_last)
                rows += h.rows
                notes += h.skipped
    except bench.BenchError as exc:
        print(f"bench_gate: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or bench.default_out_dir(device)
    paths = bench.write_results(rows, out, name=args.name, title=f"gate ops, N={args.batch_size}", notes=notes)
    print(bench.markdown_table(rows))
    print("wrote", ", ".join(v for v in paths.values() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
