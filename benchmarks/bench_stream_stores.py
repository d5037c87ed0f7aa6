"""The NCHW CPU gate kernels with normal stores against streaming (non-temporal) stores, in one process.

    python benchmarks/bench_stream_stores.py                     # SCNet-50 stage shapes, N = 8, 2 threads
    python benchmarks/bench_stream_stores.py --shapes 64x56x56 --rounds 9

``SCNET_FUSED_CPU_STREAM`` picks how the AVX2 / AVX-512 NCHW gate kernels store their full-size
outputs: ``0`` (the default) with normal stores, ``auto`` with streaming stores when the call's
tensors together exceed the last-level cache, ``1`` with streaming stores whatever the size (both
only where every vector is aligned: planes a multiple of the vector width). Streaming stores skip the
read a store to an uncached line costs, which pays where the kernels are bound by memory bandwidth
and not where they are bound by arithmetic; this measures which holds on this machine. The kernels
read the variable at every call, so the three settings run in one process, in interleaved rounds
whose order alternates; a row's time is the median of its rounds' medians. Writes
``stream_stores.json`` and ``.md`` under ``--out`` (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import _args, bench  # noqa: E402

MODES = ("0", "auto", "1")
VECTOR_WIDTH = {"avx512": 16, "avx2": 8}  # floats per vector of the builds that can stream
# name: (plane-sized tensors read and written, call)
OPS = {
    "forward": (3, lambda P, t: P.gate_forward(t["x"], t["small"], t["k3"], t["scale"], t["shift"])),
    "backward": (4, lambda P, t: P.gate_backward(t["dy"], t["x"], t["small"], t["k3"], t["scale"], t["shift"],
                                                 t["center"], False)),
    "backward+dk3": (5, lambda P, t: P.gate_backward(t["dy"], t["x"], t["small"], t["k3"], t["scale"],
                                                     t["shift"], t["center"], True)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--batch-size", type=_args.positive_int, default=8)
    ap.add_argument("--rounds", type=_args.positive_int, default=5)
    ap.add_argument("--min-run-time", type=_args.positive_float, default=0.3)
    bench.add_cpu_kernel_args(ap)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = bench.shapes_from_arg(ap, args.shapes)
    ops = args.ops.split(",")
    for op in ops:
        if op not in OPS:
            ap.error(f"unknown op {op!r}: choose from {', '.join(OPS)}")
    P, isa, allocator = bench.cpu_kernels_from_args(ap, args)
    device = torch.device("cpu")
    dtype = bench.parse_dtype(args.dtype)
    N = args.batch_size
    before = os.environ.get("SCNET_FUSED_CPU_STREAM")
    rows = []
    try:
        for C, H, W in shapes:
            h, w = bench.pooled_hw(H, W)
            g = torch.Generator().manual_seed(0)
            t = {k: torch.randn(N, C, H, W, generator=g).to(dtype) for k in ("x", "k3", "dy")}
            t["small"] = torch.randn(N, C, h, w, generator=g).to(dtype)
            t.update(scale=torch.rand(C, generator=g) + 0.5, shift=torch.randn(C, generator=g),
                     center=torch.randn(C, generator=g))
            where = bench.shape_str((N, C, H, W))
            for op in ops:
                streams, call = OPS[op]
                samples = {m: [] for m in MODES}
                with bench.bench_environment():
                    for r in range(args.rounds):
                        for m in (MODES if r % 2 == 0 else tuple(reversed(MODES))):
                            os.environ["SCNET_FUSED_CPU_STREAM"] = m
                            call(P, t)
                            samples[m].append(bench.time_cpu(lambda: call(P, t), args.min_run_time).median_ms)
                nbytes = streams * N * C * H * W * t["x"].element_size()
                width = VECTOR_WIDTH.get(isa)
                can = bool(width) and (H * W) % width == 0
                for m, ts in samples.items():
                    ms = statistics.median(ts)
                    rows.append(dict(op="gate", mode=op, stream=m, shape=where, dtype=args.dtype,
                                     device=bench.device_name(device), versions=bench.versions(), cpu_isa=isa,
                                     threads=torch.get_num_threads(), median_ms=ms, rounds_ms=ts,
                                     gbps=nbytes / ms / 1e6, can_stream=can, allocator=allocator))
                bench.log_stderr(f"{where} {op}: " + ", ".join(f"{m}: {statistics.median(ts):.3f} ms"
                                                               for m, ts in samples.items()))
    finally:
        if before is None:
            os.environ.pop("SCNET_FUSED_CPU_STREAM", None)
        else:
            os.environ["SCNET_FUSED_CPU_STREAM"] = before
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), "stream_stores", markdown(rows))
    return 0


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# NCHW CPU gate kernels, normal against streaming stores: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}, CPU kernels {first['cpu_isa']}, {first['threads']} threads; "
             f"`benchmarks/bench_stream_stores.py`; {first['dtype']}; {len(first['rounds_ms'])} interleaved rounds "
             "in one process, median of the rounds' medians; GB/s = the plane-sized tensors read and written over "
             f"the time. Allocator: {first.get('allocator') or 'as configured'}. `SCNET_FUSED_CPU_STREAM`: 0 normal "
             "stores (the default), auto streaming above the last-level cache, 1 streaming (aligned planes only).",
             "", "Where the planes are not a multiple of the vector width, no setting streams: those rows show "
             "this machine's noise.",
             "", "| op | mode | N x C x H x W | can stream | 0: ms | 0: GB/s | auto: ms | 1: ms | auto vs 0 | 1 vs 0 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault((r["mode"], r["shape"]), {})[r["stream"]] = r
    for (mode, shape), t in by.items():
        off, auto, on = t["0"]["median_ms"], t["auto"]["median_ms"], t["1"]["median_ms"]
        can = "yes" if t["0"]["can_stream"] else "no"
        lines.append(f"| gate | {mode} | {shape} | {can} | {off:.3f} | {t['0']['gbps']:.1f} | {auto:.3f} | {on:.3f} "
                     f"| {off / auto:.2f}x | {off / on:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
