"""Which Winograd convolution the fused modules run on the CPU: the three passes (transforms to memory,
the products between them), the one-kernel convolution everywhere, and "auto" (the default: the
one-kernel convolution where the products run as this package's kernel; where they run as torch.bmm,
as on an Intel CPU, per convolution: one kernel at most 64 channels, or in training at most 32 tiles or
16384 channel-tiles; three passes elsewhere, and at inference, with the filters' transform kept, for
more than 64 channels from 4 tiles up on maps up to 32 px wide); and "auto" with the weight gradient's
products kernel wherever the channels are at least twice the tiles (the rule where the products run
as the package's kernel; where they run as torch.bmm, "auto" takes it only for a transformed input of at
most 4096 tiles x input channels or a dU over 32 MiB). In one process, interleaved rounds.

    python benchmarks/bench_winograd_policy.py --threads 2                 # SCConv rows + scnet50
    python benchmarks/bench_winograd_policy.py --no-model --rounds 5

SCConv rows: the reference (eager) and the fused SCConv(C, C) at the SCNet-50 stage shapes, N = 8,
training step (forward + input and parameter gradients) and eval forward, under each policy
(SCNET_FUSED_WINOGRAD_FUSED=0 / 1 / auto, and auto with the weight gradient inside wherever
eligible, switched in the process). Model rows: the fused scnet50
(224 px) training step and eval forward under each policy. Results: <out>/<name>.json and .md.
"""

import sys

import torch

from _ab import interleaved, parse_args, scnet50_jobs, write_rows
from scnet_fused import bench
from scnet_fused.ops import winograd

# (name, SCNET_FUSED_WINOGRAD_FUSED, the largest transformed input (tiles x input channels) with which the
# weight gradient's products kernel runs where "auto" chose torch.bmm: as set, or a number large enough
# for the rule of the product kernel, wherever the channels are at least twice the tiles)
_AS_SET = winograd._BMM_WGRAD_INSIDE_MAX_V
POLICIES = (("three passes", "0", _AS_SET), ("one kernel", "1", _AS_SET), ("auto", "auto", _AS_SET),
            ("auto, weight gradient inside wherever eligible", "auto", 1 << 40))
STAGES = ((32, 56), (64, 56), (64, 28), (128, 28), (128, 14), (256, 14), (256, 7))


def _policy(setting, wgrad_v, fn):
    def run():
        winograd._fused_setting = setting
        winograd._BMM_WGRAD_INSIDE_MAX_V = wgrad_v
        fn()
    return run


def main(argv=None):
    args = parse_args(__doc__, "winograd_policy", argv)
    bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=True))
    N = args.batch_size
    gemm = "this package's kernel" if winograd._gemm_kernel() else "torch.bmm"
    rows = []
    saved = winograd._fused_setting
    try:
        for C, H in STAGES:
            ref = bench.build_module("scconv", C, fused=False)
            fus = bench.build_module("scconv", C, fused=True, like=ref)
            x = torch.randn(N, C, H, H, requires_grad=True)
            dy = torch.randn(N, C, H, H)

            def train(m):
                params = list(m.parameters())

                def fn():
                    m.train()
                    torch.autograd.grad(m(x), [x] + params, dy)
                return fn

            def infer(m):
                def fn():
                    m.eval()
                    with torch.no_grad():
                        m(x)
                return fn

            for mode, make in (("train step", train), ("eval forward", infer)):
                fns = {"reference (eager)": make(ref)}
                fns.update({f"fused, {name}": _policy(setting, v, make(fus)) for name, setting, v in POLICIES})
                for k, ms in interleaved(fns, args.rounds, 3).items():
                    rows.append(dict(what=f"SCConv {mode}", variant=k, shape=f"{N}x{C}x{H}x{H}", median_ms=ms))
        if not args.no_model:
            m, _, train_step, eval_forward = scnet50_jobs(N)

            def step():
                m.train()
                train_step()

            def infer_model():
                m.eval()
                eval_forward()

            for mode, fn, reps in (("train step", step, 2), ("eval forward", infer_model, 3)):
                fns = {f"fused, {name}": _policy(setting, v, fn) for name, setting, v in POLICIES}
                for k, ms in interleaved(fns, args.rounds, reps).items():
                    rows.append(dict(what=f"scnet50 {mode}", variant=k, shape=f"{N}x3x224x224", median_ms=ms))
    finally:
        winograd._fused_setting = saved
        winograd._BMM_WGRAD_INSIDE_MAX_V = _AS_SET
    write_rows(rows, args.out, args.name,
               f"Winograd policy of the fused modules on the CPU, N={N} (products between passes: {gemm})",
               "python benchmarks/bench_winograd_policy.py", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
