"""The plain downsample's strided 1x1 convolution on the CPU: oneDNN's strided convolution against the
subsampled view x[:, :, ::s, ::s] at stride 1 (what the fused modules run), and the fused scnet50 with
either, in one process.

    python benchmarks/bench_downsample.py                  # convolution rows + scnet50 train step / eval forward
    python benchmarks/bench_downsample.py --no-model --rounds 9

Convolution rows: SCNet-50's three strided downsample convolutions at batch N (layer2-4's first
blocks), forward + backward (input and weight gradients) and inference forward; medians over
interleaved rounds. Model rows: the same fused scnet50 (224 px; the classifier runs channels_last maps
on the CPU) with the subsampled path on and off, and in training with the view's gradient from the
slices' own backward (NCHW whatever the input's layout) instead of ``modules._Subsample``'s.
Results: <out>/<name>.json and .md.
"""

import sys

import torch
import torch.nn.functional as F

from _ab import interleaved, parse_args, scnet50_jobs, write_rows
from scnet_fused import bench, modules


def main(argv=None):
    args = parse_args(__doc__, "downsample", argv)
    bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=True))
    N = args.batch_size
    rows = []
    for C, H in ((256, 56), (512, 28), (1024, 14)):
        x = torch.randn(N, C, H, H, requires_grad=True)
        w = (torch.randn(2 * C, C, 1, 1) * 0.05).requires_grad_()
        g = torch.randn(N, 2 * C, H // 2, H // 2)

        def train(sub, x=x, w=w, g=g):
            y = F.conv2d(x[:, :, ::2, ::2], w) if sub else F.conv2d(x, w, stride=2)
            torch.autograd.grad(y, (x, w), g)

        def infer(sub, x=x, w=w):
            with torch.no_grad():
                F.conv2d(x[:, :, ::2, ::2], w) if sub else F.conv2d(x, w, stride=2)

        for mode, fn in (("forward + backward", train), ("inference forward", infer)):
            fns = {"strided (oneDNN)": lambda fn=fn: fn(False), "subsampled, stride 1": lambda fn=fn: fn(True)}
            for k, ms in interleaved(fns, args.rounds, 3).items():
                rows.append(dict(what=f"1x1 conv {C}->{2 * C}, stride 2, {mode}", variant=k,
                                 shape=f"{N}x{C}x{H}x{H}", median_ms=ms))
    if not args.no_model:
        m, _, step, infer_model = scnet50_jobs(N)
        real, real_sub = modules._strided_1x1, modules._subsampled

        def slices(conv, x):  # the plain view, whose backward builds x's gradient NCHW
            sh, sw = modules._pair(conv.stride)
            return x[:, :, ::sh, ::sw]

        variants = {"train step": (("subsampled (as built)", real, real_sub),
                                   ("subsampled, the slices' own backward", real, slices),
                                   ("strided", lambda conv, x: False, real_sub)),
                    "eval forward": (("subsampled (as built)", real, real_sub),
                                     ("strided", lambda conv, x: False, real_sub))}
        try:
            for mode, fn, reps in (("train step", step, 2), ("eval forward", infer_model, 3)):
                m.train(mode == "train step")
                fns = {}
                for name, rule, sub in variants[mode]:
                    def run(rule=rule, sub=sub, fn=fn):
                        modules._strided_1x1, modules._subsampled = rule, sub
                        fn()
                    fns[name] = run
                for k, ms in interleaved(fns, args.rounds, reps).items():
                    rows.append(dict(what=f"scnet50 {mode}", variant=f"downsample: {k}", shape=f"{N}x3x224x224",
                                     median_ms=ms))
        finally:
            modules._strided_1x1, modules._subsampled = real, real_sub
    write_rows(rows, args.out, args.name, f"The downsample's strided 1x1 convolution on the CPU, N={N}", "python benchmarks/bench_downsample.py", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
