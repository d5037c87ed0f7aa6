"""The fused SCNet classifier on the CPU, eager, from an NCHW batch: its maps kept NCHW
(``cpu_channels_last = False``) against converted to channels_last (``True``), training step and eval
forward, over batch and image sizes, in one process with interleaved rounds. This is the measurement
behind the ``"auto"`` rule of :attr:`scnet_fused.models.SCNet.cpu_channels_last`.

    python benchmarks/bench_eager_layout.py --threads 2
    python benchmarks/bench_eager_layout.py --shapes 8x224,2x128 --modes eval --rounds 5

Each shape and mode builds one model (the same weights for both variants) and times the two variants
in alternating order; a round's time for a variant is the mean of ``--reps`` calls after one untimed
call. The training step is SGD with momentum on random labels (both variants train the same model;
its weights move a little between rounds, which does not change the time). The allocator is fixed as
the harness does. Results: <out>/<name>.json and .md, with the ratio NCHW / channels_last round by round.
"""

import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _ab, also when loaded as a module
from _ab import append_lines, parse_args, timed, write_rows  # noqa: E402
from scnet_fused import bench, models  # noqa: E402

VARIANTS = {"nchw": False, "channels_last": True}
MODES = ("train", "eval")


def _extra(p):
    p.add_argument("--shapes", default="8x224,4x224,2x224,4x160,2x128",
                   help="batch x image size, comma-separated (e.g. 8x224,2x128)")
    p.add_argument("--eval-shapes", default="1x224,1x192,2x160,1x160,8x128,4x128,1x128",
                   help="more shapes for the eval forward only (batches a training BatchNorm cannot take)")
    p.add_argument("--modes", default="train,eval")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--model", default="scnet50", choices=("scnet50", "scnet101", "scnet50_v1d", "scnet101_v1d"))
    p.add_argument("--layers", default=None, help="blocks per stage, e.g. 1,1,1,1 (default: the model's)")


def _shape(text):
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"bad shape {text!r} (batch x image size, e.g. 8x224)")
    n, s = int(parts[0]), int(parts[1])
    if s < 32:
        raise ValueError(f"image size {s} is below the model's 32 px stride")
    return n, s


def _jobs(model, layers, mode, n, size):
    torch.manual_seed(0)
    m = models.build(model, fused=True, **({} if layers is None else {"layers": layers}))
    x = torch.randn(n, 3, size, size)
    target = torch.randint(0, 1000, (n,))
    opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

    def make(policy):
        def train():
            m.cpu_channels_last = policy
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), target).backward()
            opt.step()

        def infer():
            m.cpu_channels_last = policy
            with torch.no_grad():
                m(x)

        return train if mode == "train" else infer

    m.train(mode == "train")
    return {k: make(v) for k, v in VARIANTS.items()}


def main(argv=None):
    args = parse_args(__doc__, "eager_layout", argv, _extra)
    try:
        shapes = [_shape(s) for s in args.shapes.split(",") if s]
        eval_shapes = [_shape(s) for s in args.eval_shapes.split(",") if s]
        modes = [s for s in args.modes.split(",") if s]
        if not shapes or not modes:
            raise ValueError("--shapes and --modes must name at least one each")
        for mo in modes:
            if mo not in MODES:
                raise ValueError(f"bad mode {mo!r} (one of {', '.join(MODES)})")
        if args.rounds < 1 or args.reps < 1:
            raise ValueError("--rounds and --reps must be at least 1")
        layers = None
        if args.layers is not None:
            if not all(v.isdigit() and int(v) > 0 for v in args.layers.split(",")) or len(args.layers.split(",")) != 4:
                raise ValueError(f"--layers must be four positive block counts, e.g. 1,1,1,1, got {args.layers!r}")
            layers = tuple(int(v) for v in args.layers.split(","))
        if "train" in modes:
            for n, size in shapes:
                bench.check_train_images(n, size)
    except bench.BenchError as exc:
        print(f"bench_eager_layout: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"bench_eager_layout: error: {exc}", file=sys.stderr)
        return 2
    print("allocator: " + bench.pin_cpu_allocator(pin=True), file=sys.stderr)
    rows, lines = [], ["", "Per round, NCHW / channels_last (above 1: channels_last faster):", ""]
    for mode in modes:
        for n, size in shapes + (eval_shapes if mode == "eval" else []):
            fns = _jobs(args.model, layers, mode, n, size)
            times = {k: [] for k in fns}
            for r in range(args.rounds):
                for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    times[k].append(timed(fns[k], args.reps))
            shape = f"{n}x3x{size}x{size}"
            what = "training step" if mode == "train" else "eval forward"
            for k in fns:
                rows.append(dict(what=what, variant=k, shape=shape, median_ms=statistics.median(times[k])))
            ratios = [a / b for a, b in zip(times["nchw"], times["channels_last"])]
            lines.append(f"- {what} {shape}: {', '.join(f'{r:.3f}' for r in ratios)} "
                         f"(median {statistics.median(ratios):.3f})")
            print(f"{what} {shape}: nchw {rows[-2]['median_ms']:.1f} ms, channels_last {rows[-1]['median_ms']:.1f} ms",
                  file=sys.stderr, flush=True)
    command = "python benchmarks/bench_eager_layout.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_rows(rows, args.out, args.name, f"fused {args.model} eager on the CPU: NCHW maps against channels_last",
               command.strip(), args.rounds)
    append_lines(lines, args.out, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
