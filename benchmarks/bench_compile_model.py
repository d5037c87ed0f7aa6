"""An SCNet training step under torch.compile on the CPU: the reference and the fused model, eager and
compiled (inductor), from NCHW and from channels_last batches, in one process with interleaved rounds.

    python benchmarks/bench_compile_model.py --threads 2
    python benchmarks/bench_compile_model.py --variants reference:compile,fused:compile,fused:compile:cl

A variant is model:mode[:cl]: model reference, fused, or scconv_only (the reference with only its SCConvs
fused); mode eager or compile; cl: the model and the batch channels_last. Every variant is built (its
first two steps, compilation included, are reported) before the rounds start; a round times each
variant in turn (the faster of two steps), in alternating order. SGD with momentum, random labels;
the allocator fixed as the harness does. Results: <out>/<name>.json and .md.
"""

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _ab, also when loaded as a module
from _ab import append_lines, parse_args, write_rows  # noqa: E402
from scnet_fused import bench, models  # noqa: E402
from scnet_fused.modules import SCConv  # noqa: E402

MODELS = ("reference", "fused", "scconv_only")
MODES = ("eager", "compile")


def _variant(spec):
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in MODELS or parts[1] not in MODES or parts[2:] not in ([], ["cl"]):
        raise ValueError(f"bad variant {spec!r} (model:mode[:cl], model one of {', '.join(MODELS)}, mode one "
                         f"of {', '.join(MODES)})")
    return parts[0], parts[1], parts[2:] == ["cl"]


def _extra(p):
    p.add_argument("--variants", default="reference:eager,reference:compile,fused:eager,fused:compile,"
                                         "fused:compile:cl,reference:compile:cl")
    p.add_argument("--model", default="scnet50", choices=("scnet50", "scnet101", "scnet50_v1d", "scnet101_v1d"))
    p.add_argument("--layers", default=None, help="blocks per stage, e.g. 1,1,1,1 (default: the model's)")
    p.add_argument("--image-size", type=int, default=224)


def _step(spec, args, x, target):
    kind, mode, cl = _variant(spec)
    kwargs = {} if args.layers is None else {"layers": tuple(int(v) for v in args.layers.split(","))}
    m = models.build(args.model, fused=kind == "fused", **kwargs)
    if kind == "scconv_only":
        for block in list(m.modules()):
            if hasattr(block, "scconv"):
                block.scconv = SCConv.adopt(block.scconv)
    fmt = torch.channels_last if cl else torch.contiguous_format
    m = m.to(memory_format=fmt).train()
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(m.parameters(), lr=0.1 * x.shape[0] / 256, momentum=0.9)
    run = torch.compile(m) if mode == "compile" else m

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), target).backward()
        opt.step()

    return step


def main(argv=None):
    args = parse_args(__doc__, "compile_model", argv, _extra)
    specs = [s for s in args.variants.split(",") if s]
    try:
        if not specs:
            raise ValueError("--variants names none")
        for s in specs:
            _variant(s)
        if args.layers is not None and not all(v.isdigit() and int(v) > 0 for v in args.layers.split(",")):
            raise ValueError(f"--layers must be positive block counts, e.g. 1,1,1,1, got {args.layers!r}")
    except ValueError as exc:
        print(f"bench_compile_model: error: {exc}", file=sys.stderr)
        return 2
    print("allocator: " + bench.pin_cpu_allocator(pin=True), file=sys.stderr)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    target = torch.randint(0, 1000, (args.batch_size,))
    steps, rows = {}, []
    for s in specs:
        step = _step(s, args, x, target)
        t0 = time.perf_counter()
        step()
        step()
        rows.append(dict(what="first two steps", variant=s, shape=f"{args.batch_size}x3x{args.image_size}",
                         median_ms=(time.perf_counter() - t0) * 1e3))
        steps[s] = step
    times = {s: [] for s in specs}
    for r in range(args.rounds):
        for s in (specs if r % 2 == 0 else specs[::-1]):
            ts = []
            for _ in range(2):
                t0 = time.perf_counter()
                steps[s]()
                ts.append((time.perf_counter() - t0) * 1e3)
            times[s].append(min(ts))
    for s in specs:
        rows.append(dict(what="training step", variant=s, shape=f"{args.batch_size}x3x{args.image_size}",
                         median_ms=statistics.median(times[s])))
    command = "python benchmarks/bench_compile_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_rows(rows, args.out, args.name, f"{args.model} training step on the CPU" + (
        ", eager and under torch.compile" if any(_variant(s)[1] == "compile" for s in specs) else ", eager"), command.strip(),
               args.rounds)
    base = specs[0]
    lines = ["", f"Per round (ms), and the speed against {base} round by round:", ""]
    for s in specs:
        ratios = [b / t for b, t in zip(times[base], times[s])]
        lines.append(f"- {s}: {', '.join(f'{t:.1f}' for t in times[s])}" + (
            f"; {min(ratios):.3f}x-{max(ratios):.3f}x (median {statistics.median(ratios):.3f}x)" if s != base else ""))
    append_lines(lines, args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
