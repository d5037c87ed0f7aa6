"""The first forward + backward of a compiled SCNet (torch.compile, inductor, CPU), each run in a process of
its own: what a training script pays for compilation every time it starts.

    python benchmarks/bench_compile_time.py --rounds 3
    python benchmarks/bench_compile_time.py --variants fused,fused:functions --layers 1,1,1,1

Variants: ``fused`` (the fused model as it compiles: its convolutions with backwards of their own enter
the graph as custom ops, ``scnet_fused.ops.compiled_convs``), ``fused:functions`` (the same model with
those convolutions as the autograd.Functions eager mode uses, which AOTAutograd's cache passes over) and
``reference``. Each variant first runs once untimed, so that inductor's and AOTAutograd's on-disk caches
hold what it compiles, as they do for a script's second start; then ``--rounds`` rounds run each
variant once, in alternating order. A run's time is from the compiled model's first call to the end of
its backward; it also reports AOTAutograd's cache outcome (hit, miss or bypass). Results:
<out>/<name>.json and .md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("fused", "fused:functions", "reference")


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="fused:functions,fused,reference")
    p.add_argument("--model", default="scnet50", choices=("scnet50", "scnet101", "scnet50_v1d", "scnet101_v1d"))
    p.add_argument("--layers", default=None, help="blocks per stage, e.g. 1,1,1,1 (default: the model's)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="compile_time")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _check(args):
    """The arguments' errors, before any process starts."""
    specs = [s for s in args.variants.split(",") if s]
    if not specs or any(s not in VARIANTS for s in specs):
        raise ValueError(f"--variants must name one or more of {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.layers is not None and not (len(args.layers.split(",")) == 4
                                        and all(v.isdigit() and int(v) > 0 for v in args.layers.split(","))):
        raise ValueError(f"--layers must be four positive block counts, e.g. 1,1,1,1, got {args.layers!r}")
    for name in ("batch_size", "rounds", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.image_size < 128:  # layer4's SCConv needs a 4 x 4 map
        raise ValueError(f"--image-size must be at least 128 (SCNet's last stage pools a 4 x 4 map), got "
                         f"{args.image_size}")
    return specs


def _child(args):
    """One measurement in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from scnet_fused import models
    import scnet_fused.modules

    if args.child == "fused:functions":
        scnet_fused.modules._compiled_graph = lambda: False
    kwargs = {} if args.layers is None else {"layers": tuple(int(v) for v in args.layers.split(","))}
    torch.manual_seed(0)
    m = models.build(args.model, fused=args.child != "reference", **kwargs).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    compiled = torch.compile(m)
    t0 = time.perf_counter()
    compiled(x).sum().backward()
    seconds = time.perf_counter() - t0
    counters = dict(torch._dynamo.utils.counters.get("aot_autograd", {}))
    cache = next((k.replace("autograd_cache_", "") for k in ("autograd_cache_hit", "autograd_cache_bypass",
                                                              "autograd_cache_miss") if counters.get(k)), "off")
    print(json.dumps(dict(variant=args.child, seconds=seconds, aot_cache=cache)))


def _run(args, variant):
    argv = [sys.executable, os.path.abspath(__file__), "--child", variant, "--model", args.model,
            "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--threads", str(args.threads)]
    if args.layers is not None:
        argv += ["--layers", args.layers]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{variant}: the measuring process failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = _args(argv)
    if args.child is not None:
        _child(args)
        return 0
    try:
        specs = _check(args)
    except ValueError as exc:
        print(f"bench_compile_time: error: {exc}", file=sys.stderr)
        return 2
    for s in specs:  # untimed: fills the on-disk caches
        _run(args, s)
    runs = {s: [] for s in specs}
    for r in range(args.rounds):
        for s in (specs if r % 2 == 0 else specs[::-1]):
            runs[s].append(_run(args, s))
    import torch

    from scnet_fused import bench

    device = bench.device_name(torch.device("cpu"))
    out = args.out or bench.default_out_dir(torch.device("cpu"))
    os.makedirs(out, exist_ok=True)
    shape = f"{args.batch_size}x3x{args.image_size}"
    rows = [dict(variant=s, shape=shape, median_s=statistics.median(v["seconds"] for v in runs[s]),
                 runs_s=[v["seconds"] for v in runs[s]], aot_cache=sorted({v["aot_cache"] for v in runs[s]}))
            for s in specs]
    versions = {"torch": torch.__version__, "python": sys.version.split()[0], "threads": args.threads}
    with open(os.path.join(out, f"{args.name}.json"), "w") as f:
        json.dump(dict(rows=rows, versions=versions, device=device, model=args.model, layers=args.layers), f, indent=1)
    command = "python benchmarks/bench_compile_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# {args.model}: the first compiled forward + backward, in a fresh process (CPU, inductor)", "",
             f"Device: {device}; torch {versions['torch']}, Python {versions['python']}, {args.threads} threads; "
             f"caches warm (one untimed run of each variant first), {args.rounds} rounds in alternating order. "
             f"`{command.strip()}`.", "",
             "| variant | shape | median s | runs s | AOTAutograd cache |", "|---|---|---:|---|---|"]
    lines += [f"| {r['variant']} | {r['shape']} | {r['median_s']:.1f} | {', '.join(f'{t:.1f}' for t in r['runs_s'])} "
              f"| {', '.join(r['aot_cache'])} |" for r in rows]
    with open(os.path.join(out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
