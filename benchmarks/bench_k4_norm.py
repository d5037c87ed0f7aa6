"""A standalone SCConv's k4 BatchNorm in training on the CPU: ATen's BatchNorm (the module) against the
package's kernels (``_bn_train_ag``: the one-call BatchNorm + ReLU kernels without the ReLU, NCHW
channel by channel). Rows: the BatchNorm alone (forward + backward through autograd) and the fused
SCConv training step with either, the reference's step beside them, at the SCNet-50 stage shapes,
N = 8, float32. In one process, interleaved rounds.

    python benchmarks/bench_k4_norm.py --threads 2 --rounds 7

Results: <out>/<name>.json and .md.
"""

import sys

import torch
import torch.nn.functional as F

from _ab import add_rows, parse_args, write_rows
from scnet_fused import bench, modules
from scnet_fused.ops import _cpp

STAGES = ((32, 56), (64, 56), (64, 28), (128, 28), (128, 14), (256, 14), (256, 7))
_KERNELS = modules._bn_of


def _module_bn(bn, t):
    return bn(t)


def _with(bn_of, fn):
    def run():
        modules._bn_of = bn_of
        try:
            fn()
        finally:
            modules._bn_of = _KERNELS
    return run


def main(argv=None):
    args = parse_args(__doc__, "k4_norm", argv)
    if not _cpp.has_autograd_ops():  # (also loads the extension that registers the op)
        why = _cpp.unavailable_reason("cpu") or "this build lacks them"
        raise SystemExit(f"the compiled C++ autograd ops are not loaded ({why})")
    bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=True))
    N = args.batch_size
    rows = []
    for C, H in STAGES:
        t = torch.randn(N, C, H, H, requires_grad=True)
        dy = torch.randn(N, C, H, H)
        w, b = torch.rand(C, requires_grad=True), torch.randn(C, requires_grad=True)
        rm, rv = torch.zeros(C), torch.ones(C)

        def aten_bn():
            torch.autograd.grad(F.batch_norm(t, rm, rv, w, b, True, 0.1, 1e-5), (t, w, b), dy)

        def kernels_bn():
            torch.autograd.grad(torch.ops.scnet_fused._bn_train_ag(t, w, b, 1e-5)[0], (t, w, b), dy)

        add_rows(rows, "k4 BatchNorm, forward + backward", f"{N}x{C}x{H}x{H}",
                 {"ATen (module)": aten_bn, "package's kernels (_bn_train_ag)": kernels_bn}, args.rounds, 5)
        ref = bench.build_module("scconv", C, fused=False)
        fus = bench.build_module("scconv", C, fused=True, like=ref)
        x = torch.randn(N, C, H, H, requires_grad=True)

        def step(m):
            params = list(m.parameters())
            return lambda: torch.autograd.grad(m.train()(x), [x] + params, dy)

        fns = {"reference (eager)": step(ref), "fused, k4 BatchNorm as ATen's": _with(_module_bn, step(fus)),
               "fused, k4 BatchNorm as the package's kernels": _with(_KERNELS, step(fus))}
        add_rows(rows, "SCConv train step", f"{N}x{C}x{H}x{H}", fns, args.rounds, 3)
    write_rows(rows, args.out, args.name, f"A standalone SCConv's k4 BatchNorm in training on the CPU, N={N}",
               "python benchmarks/bench_k4_norm.py", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
