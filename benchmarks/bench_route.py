"""The public gate ops on CPU tensors with ``route``'s shortcut and without it, in one process.

    python benchmarks/bench_route.py                       # gate and gate_bn forward, stage shapes, N = 8
    python benchmarks/bench_route.py --shapes 256x7x7 --rounds 15

Every public op asks ``scnet_fused.ops._dispatch.route`` which path a call takes. In the common eager
CPU call it answers which backend ``auto`` picks from a few attribute reads (``_plain_cpu_call``);
otherwise it asks the backend selection (``select``: the backend blocks, $SCNET_FUSED_BACKEND, the
order of the backends). Between two calls a kernel
streams megabytes through the caches and evicts the Python objects a lookup touches, so a lookup that
takes a few microseconds in a tight loop costs tens between kernels. This times the public forward
(``sc_gate``, ``sc_gate_bn_train``: the checks, ``route``, the C++ autograd op) with the shortcut and
with it turned off (the full answer, the same path taken), on input sets rotated out of the caches as
the harness does, in interleaved rounds whose order alternates; a row's time is the median of its
rounds' medians. Writes ``route.json`` and ``.md`` under ``--out`` (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import _args, bench  # noqa: E402
from scnet_fused.ops import _dispatch  # noqa: E402

OPS = {"gate": bench.fused_gate, "gate_bn": bench.fused_gate_bn}
SETTINGS = ("shortcut", "full")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    ap.add_argument("--batch-size", type=_args.positive_int, default=8)
    ap.add_argument("--rounds", type=_args.positive_int, default=9)
    ap.add_argument("--min-run-time", type=_args.positive_float, default=0.3)
    bench.add_cpu_kernel_args(ap)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = bench.shapes_from_arg(ap, args.shapes)
    ops = args.ops.split(",")
    for op in ops:
        if op not in OPS:
            ap.error(f"unknown op {op!r}: choose from {', '.join(OPS)}")
    _, isa, allocator = bench.cpu_kernels_from_args(ap, args)
    probe = torch.ones(1, 1, 1, 1)
    if not (_dispatch._plain_cpu_call(probe) and _dispatch.route(probe) == _dispatch.CPP):
        ap.error("route's shortcut is not taken here (a backend block, $SCNET_FUSED_BACKEND or "
                 "$SCNET_FUSED_CPP_AUTOGRAD set, or no C++ autograd ops)")
    device = torch.device("cpu")
    N = args.batch_size
    shortcut = _dispatch._plain_cpu_call
    rows = []
    try:
        for C, H, W in shapes:
            where = bench.shape_str((N, C, H, W))
            for op in ops:
                make = lambda seed: bench.make_gate_inputs(op, N, C, H, W, torch.float32, device, seed=seed)  # noqa: E731
                first = make(0)
                n_sets = bench.n_sets_for(sum(t.numel() * t.element_size() for t in first), device)
                sets = [first] + [make(i) for i in range(1, n_sets)]
                f = OPS[op]
                step = bench.cycle([lambda a=a: f(*a) for a in sets])
                samples = {s: [] for s in SETTINGS}
                with bench.bench_environment():
                    for r in range(args.rounds):
                        for s in (SETTINGS if r % 2 == 0 else tuple(reversed(SETTINGS))):
                            _dispatch._plain_cpu_call = shortcut if s == "shortcut" else (lambda x: False)
                            assert _dispatch.route(first[0]) == _dispatch.CPP
                            samples[s].append(bench.time_cpu(step, args.min_run_time).median_ms)
                _dispatch._plain_cpu_call = shortcut
                for s, ts in samples.items():
                    rows.append(dict(op=op, mode="forward", setting=s, shape=where, dtype="fp32",
                                     device=bench.device_name(device), versions=bench.versions(), cpu_isa=isa,
                                     threads=torch.get_num_threads(), median_ms=statistics.median(ts), rounds_ms=ts,
                                     input_sets=n_sets, allocator=allocator))
                bench.log_stderr(f"{where} {op}: " + ", ".join(f"{s}: {statistics.median(ts):.3f} ms"
                                                               for s, ts in samples.items()))
    finally:
        _dispatch._plain_cpu_call = shortcut
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), "route", markdown(rows))
    return 0


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# The public gate ops with and without route's shortcut: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}, CPU kernels {first['cpu_isa']}, {first['threads']} threads; "
             f"`benchmarks/bench_route.py`; fp32, contiguous, the forward with inputs that require grad; "
             f"{len(first['rounds_ms'])} interleaved rounds in one process, median of the rounds' medians; input "
             f"sets rotated out of the caches. Allocator: {first.get('allocator') or 'as configured'}.", "",
             "shortcut: `route` answers the plain eager CPU call from a few attribute reads; full: the same "
             "answer from the backend selection. Both take the same path (the C++ autograd op).", "",
             "| op | mode | N x C x H x W | input sets | full: ms | shortcut: ms | shortcut vs full | saved us |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["shape"]), {})[r["setting"]] = r
    for (op, shape), t in by.items():
        full, short = t["full"]["median_ms"], t["shortcut"]["median_ms"]
        lines.append(f"| {op} | forward | {shape} | {t['full']['input_sets']} | {full:.3f} | {short:.3f} "
                     f"| {full / short:.2f}x | {1000 * (full - short):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
