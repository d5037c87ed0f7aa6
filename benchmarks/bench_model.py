"""Model benchmark: SCNet training steps (synthetic data, SGD), reference vs fused, eager vs compiled.

    python benchmarks/bench_model.py --model scnet50 --batch-size 256 --amp bf16 --channels-last
    python benchmarks/bench_model.py --device cpu --batch-size 4 --image-size 128 --steps 2

Rows: median step time, images/s, time to the first step (compilation included) and CUDA peak memory.
"""

import argparse
import sys

import torch

from scnet_fused import _args, bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=_args.comma_list, default="scnet50", help="comma list of scnet50, scnet101, scnet50_v1d, scnet101_v1d")
    p.add_argument("--providers", type=_args.comma_list, default="eager,fused,compile,compile_fused",
                   help="comma list of eager, fused, compile, compile_fused")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--batch-size", type=_args.positive_int, default=32)
    p.add_argument("--image-size", type=_args.positive_int, default=224)
    p.add_argument("--steps", type=_args.positive_int, default=10)
    p.add_argument("--warmup", type=_args.nonneg_int, default=2)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--default-malloc", action="store_true", help="CPU: keep glibc malloc's dynamic thresholds")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="model")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device) if args.device else bench.best_device()
        bench.check_train_images(args.batch_size, args.image_size)
        if device.type == "cpu":
            bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=not args.default_malloc))
        amp = None if args.amp == "none" else bench.parse_dtype(args.amp)
        h = bench.Harness(device=device, batch_size=args.batch_size, progress=bench.log_stderr)
        with bench.bench_environment():
            for arch in args.model:
                h.run_model(arch, image_size=args.image_size, steps=args.steps, warmup=args.warmup,
                            providers=args.providers, channels_last=args.channels_last, amp=amp)
    except bench.BenchError as exc:
        print(f"bench_model: error: {exc}", file=sys.stderr)
        return 2
    if not h.rows:
        print("bench_model: error: nothing was measured (every provider was unavailable or failed: "
              + "; ".join(h.skipped) + ")", file=sys.stderr)
        return 1
    out = args.out or bench.default_out_dir(device)
    paths = bench.write_results(h.rows, out, name=args.name, title=f"SCNet training, N={args.batch_size}",
                                notes=h.skipped)
    print(bench.markdown_table(h.rows))
    print("wrote", ", ".join(v for v in paths.values() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
