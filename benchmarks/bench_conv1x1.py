"""1x1 convolutions of channels_last float32 CPU maps: oneDNN (F.conv2d) against matrix products
(``scnet_fused.ops.conv1x1``: one torch.mm over the batch for the forward and one for each gradient).
Rows: every 1x1 convolution shape of SCNet-50 at N = 8 (conv1 of both branches stacked, conv3, the
downsample after subsampling), forward + backward through autograd as the fused modules run it and the
no-grad forward; then (unless --no-model) the fused scnet50 training step on channels_last 224 px
images with oneDNN, with the products where "auto" takes them (:data:`conv1x1.MIN_CHANNELS`) and
with the products everywhere. In one process, interleaved rounds.

    python benchmarks/bench_conv1x1.py --threads 2 --rounds 5
    python benchmarks/bench_conv1x1.py --threads 2 --rounds 9 --model-only --name conv1x1_model

Results: <out>/<name>.json and .md.
"""

import sys

import torch
import torch.nn.functional as F

from _ab import add_rows, parse_args, scnet50_jobs, write_rows
from scnet_fused import bench, modules
from scnet_fused.ops import conv1x1

CL = torch.channels_last
# (input channels, output channels, map size): SCNet-50's 1x1 convolutions, stage by stage: conv1 of both
# branches stacked (a stage's first block, then the others), conv3 (the downsample of the first stage
# has its shape), the downsample of a stage's first block (on the subsampled map)
SHAPES = ((64, 64, 56), (256, 64, 56), (64, 256, 56),
          (256, 128, 56), (512, 128, 28), (128, 512, 28), (256, 512, 28),
          (512, 256, 28), (1024, 256, 14), (256, 1024, 14), (512, 1024, 14),
          (1024, 512, 14), (2048, 512, 7), (512, 2048, 7), (1024, 2048, 7))


def _setting(mode, fn):
    def run():
        previous = conv1x1.set_conv1x1(mode)
        try:
            fn()
        finally:
            conv1x1.set_conv1x1(previous)
    return run


def _shape_rows(rows, N, rounds):
    for C, K, H in SHAPES:
        x = torch.randn(N, C, H, H).contiguous(memory_format=CL).requires_grad_()
        w = (0.05 * torch.randn(K, C, 1, 1)).requires_grad_()
        dy = torch.randn(N, K, H, H).contiguous(memory_format=CL)

        def train():
            y = modules._ParamConv.apply(x, (1, 1), (0, 0), (1, 1), 1, w)
            torch.autograd.grad(y, (x, w), dy)

        def infer():
            with torch.no_grad():
                if conv1x1.gemm_applies(x, (w,), 1, 0, 1, 1):
                    conv1x1.forward(x, w)
                else:
                    F.conv2d(x, w)

        shape = f"{N}x{C}x{H}x{H} -> {K}"
        add_rows(rows, "1x1 convolution, forward + backward", shape,
                 {"oneDNN": _setting("onednn", train), "matrix products": _setting("gemm", train)}, rounds, 5)
        add_rows(rows, "1x1 convolution, forward (no grad)", shape,
                 {"oneDNN": _setting("onednn", infer), "matrix products": _setting("gemm", infer)}, rounds, 5)


def _model_rows(rows, N, rounds):
    torch.manual_seed(0)
    m, _, step, _ = scnet50_jobs(N, channels_last=True)
    m.train()
    add_rows(rows, "scnet50 training step, channels_last", f"{N}x3x224x224",
             {"1x1 convolutions through oneDNN": _setting("onednn", step),
              "1x1 convolutions as matrix products where auto takes them": _setting("auto", step),
              "every 1x1 convolution as matrix products": _setting("gemm", step)}, rounds, 2)


def main(argv=None):
    args = parse_args(__doc__, "conv1x1", argv, extra=lambda p: p.add_argument(
        "--model-only", action="store_true", help="only the scnet50 training step rows"))
    bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=True))
    rows = []
    if not args.model_only:
        _shape_rows(rows, args.batch_size, args.rounds)
    if not args.no_model:
        _model_rows(rows, args.batch_size, args.rounds)
    write_rows(rows, args.out, args.name,
               f"1x1 convolutions of channels_last float32 maps on the CPU: oneDNN against matrix products, "
               f"N={args.batch_size}", "python benchmarks/bench_conv1x1.py", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
