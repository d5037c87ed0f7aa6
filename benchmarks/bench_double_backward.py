"""A training step with a gradient penalty on the input (create_graph=True, then a second backward):
the reference SCConv (eager) against the fused one, and the same two without the penalty, at the
SCNet-50 stage shapes, N = 8. Under create_graph the fused ops recompute themselves in standard
operators (scnet_fused/ops/_double.py), so the penalised step is not expected to be faster than the
reference's: this measures what it costs. In one process, interleaved rounds.

    python benchmarks/bench_double_backward.py --threads 2 --rounds 5

Step: out = m(x); g = d sum(out^2) / dx (create_graph); (sum(out^2) + sum(g^2)).backward().
Without the penalty: sum(out^2).backward(). Results: <out>/<name>.json and .md.
"""

import sys

import torch

from _ab import add_rows, parse_args, write_rows
from scnet_fused import bench

STAGES = ((32, 56), (64, 28), (128, 14), (256, 7))


def _step(m, x, penalty):
    def fn():
        m.train()
        xi = x.detach().requires_grad_()
        out = m(xi)
        loss = out.square().sum()
        if penalty:
            (g,) = torch.autograd.grad(loss, xi, create_graph=True)
            loss = loss + g.square().sum()
        loss.backward()
    return fn


def main(argv=None):
    args = parse_args(__doc__, "double_backward", argv)
    bench.log_stderr("allocator: " + bench.pin_cpu_allocator(pin=True))
    N = args.batch_size
    rows = []
    for C, H in STAGES:
        ref = bench.build_module("scconv", C, fused=False)
        fus = bench.build_module("scconv", C, fused=True, like=ref)
        x = torch.randn(N, C, H, H)
        fns = {"reference (eager), penalty": _step(ref, x, True), "fused, penalty": _step(fus, x, True),
               "reference (eager), no penalty": _step(ref, x, False), "fused, no penalty": _step(fus, x, False)}
        add_rows(rows, "SCConv train step", f"{N}x{C}x{H}x{H}", fns, args.rounds, 3)
    write_rows(rows, args.out, args.name, f"SCConv training step with an input-gradient penalty, N={N}",
               "python benchmarks/bench_double_backward.py", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
