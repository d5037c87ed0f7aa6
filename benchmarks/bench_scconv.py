"""Module benchmark: SCConv / SCBottleneck train step (forward + backward, BN training) and eval forward.

    python benchmarks/bench_scconv.py                                  # SCConv, every stage shape
    python benchmarks/bench_scconv.py --module bottleneck --mode train
    python benchmarks/bench_scconv.py --amp bf16 --channels-last       # the GPU configuration of PERF.md

Providers: eager (reference module), compile (torch.compile of it), triton / cuda / cpu (fused module
with that backend forced), compile_fused (torch.compile of the fused module). For SCBottleneck the
shape is the SCConv width C: the block's input is 8C x H x W.
"""

import argparse
import sys

import torch

from scnet_fused import _args, bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", type=_args.comma_list, default="scconv", help="scconv, bottleneck or both (comma list)")
    p.add_argument("--mode", type=_args.comma_list, default="train,eval", help="comma list of train, eval")
    p.add_argument("--providers", type=_args.comma_list, help="comma list (default: every available one)")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype")
    p.add_argument("--batch-size", type=_args.positive_int, default=8)
    p.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--default-malloc", action="store_true", help="CPU: keep glibc malloc's dynamic thresholds")
    p.add_argument("--min-run-time", type=_args.positive_float, default=0.5)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="scconv")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else bench.best_device()
        if device.type == "cpu":
            bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=not args.default_malloc))
        shapes = bench.shapes_from_arg(p, args.shapes)
        providers = args.providers
        amp = None if args.amp == "none" else bench.parse_dtype(args.amp)
        h = bench.Harness(device=device, batch_size=args.batch_size, min_run_time=args.min_run_time,
                          progress=bench.log_stderr)
        with bench.bench_environment():
            for module in args.module:
                for shape in shapes:
                    h.run_module(module, shape, modes=args.mode, providers=providers,
                                 channels_last=args.channels_last, amp=amp)
    except bench.BenchError as exc:
        print(f"bench_scconv: error: {exc}", file=sys.stderr)
        return 2
    out = args.out or bench.default_out_dir(device)
    paths = bench.write_results(h.rows, out, name=args.name, title=f"SCConv modules, N={args.batch_size}",
                                notes=h.skipped)
    print(bench.markdown_table(h.rows))
    print("wrote", ", ".join(v for v in paths.values() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
