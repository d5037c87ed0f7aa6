"""The training-mode BatchNorm gate backward on the CPU: dk3 recomputed, or finished from g * scale.

    python benchmarks/bench_bn_backward.py                  # SCNet-50 stage shapes, N = 8, fp32
    python benchmarks/bench_bn_backward.py --shapes 64x56x56 --rounds 9

``sc_gate_bn_train``'s backward takes two passes. The first gives dx, dsmall and BatchNorm's
per-channel sums; BatchNorm's input gradient ``dk3 = scale * g + q * k3 + r`` needs those sums, so it
comes from a second pass. That pass can read dy, x, small and k3 again and recompute the sigmoid
(``gate_backward_k3``, the strategy of the GPU backends and of half-precision storage), or add
``q * k3 + r`` in place to the ``g * scale`` the first pass wrote (``add_channel_affine_``, what the
cpu backend does for float32). Both read and write the same number of full-size tensors in all; the
second skips a sigmoid per element. The two run in one process on the same inputs, in interleaved
rounds whose order alternates; a row's time is the median of its rounds' medians. Writes
``bn_backward.json`` and ``.md`` (``bn_backward_channels_last.*`` with ``--channels-last``) under
``--out`` (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import _args, bench  # noqa: E402


def recompute(P, t):
    """Pass 1 without dk3, pass 2 recomputing the gate."""
    P.gate_backward(t["dy"], t["x"], t["small"], t["k3"], t["scale"], t["shift"], t["center"], False)
    return P.gate_backward_k3(t["dy"], t["x"], t["small"], t["k3"], t["scale"], t["q"], t["r"])


def from_g(P, t):
    """Pass 1 writing g * scale, pass 2 adding q * k3 + r to it in place."""
    gs = P.gate_backward(t["dy"], t["x"], t["small"], t["k3"], t["scale"], t["shift"], t["center"], True)[2]
    return P.add_channel_affine_(gs, t["k3"], t["q"], t["r"])


STRATEGIES = {"recompute": recompute, "from g": from_g}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--batch-size", type=_args.positive_int, default=8)
    ap.add_argument("--rounds", type=_args.positive_int, default=5)
    ap.add_argument("--min-run-time", type=_args.positive_float, default=0.3)
    bench.add_cpu_kernel_args(ap)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = bench.shapes_from_arg(ap, args.shapes)
    P, isa, allocator = bench.cpu_kernels_from_args(ap, args)
    device = torch.device("cpu")
    dtype = bench.parse_dtype(args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    N = args.batch_size
    rows = []
    for C, H, W in shapes:
        h, w = bench.pooled_hw(H, W)
        g = torch.Generator().manual_seed(0)
        t = {k: torch.randn(N, C, H, W, generator=g).to(dtype).contiguous(memory_format=fmt)
             for k in ("x", "k3", "dy")}
        t["small"] = torch.randn(N, C, h, w, generator=g).to(dtype)
        for k in ("scale", "shift", "center", "q", "r"):
            t[k] = torch.randn(C, generator=g)
        where = bench.shape_str((N, C, H, W))
        a, b = (f(P, t).float() for f in STRATEGIES.values())
        diff = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
        samples = {s: [] for s in STRATEGIES}
        with bench.bench_environment():
            for r in range(args.rounds):
                for s in (STRATEGIES if r % 2 == 0 else tuple(reversed(STRATEGIES))):
                    f = STRATEGIES[s]
                    samples[s].append(bench.time_cpu(lambda: f(P, t), args.min_run_time).median_ms)
        for s, ts in samples.items():
            rows.append(dict(op="gate_bn", mode="backward", strategy=s, shape=where, dtype=args.dtype,
                             channels_last=args.channels_last, device=bench.device_name(device),
                             versions=bench.versions(), cpu_isa=isa, threads=torch.get_num_threads(),
                             median_ms=statistics.median(ts), rounds_ms=ts, max_rel_diff=diff,
                             allocator=allocator))
        bench.log_stderr(f"{where}: " + ", ".join(f"{s}: {statistics.median(ts):.3f} ms" for s, ts in samples.items()))
    stem = "bn_backward_channels_last" if args.channels_last else "bn_backward"
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), stem, markdown(rows))
    return 0


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    layout = "channels_last" if first["channels_last"] else "contiguous"
    lines = [f"# Training-mode BatchNorm gate backward on the CPU, two strategies: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}, CPU kernels {first['cpu_isa']}, {first['threads']} threads; "
             f"`benchmarks/bench_bn_backward.py`; {first['dtype']}, {layout}; {len(first['rounds_ms'])} interleaved "
             "rounds in one process, median of the rounds' medians. Allocator: "
             f"{first.get('allocator') or 'as configured'}.", "",
             "recompute: `gate_backward` then `gate_backward_k3` (the sigmoid twice); from g: `gate_backward` "
             "writing g * scale, then `add_channel_affine_` in place. max rel diff: the largest difference of "
             "the two dk3, over the largest |dk3|.", "",
             "| N x C x H x W | recompute: ms | from g: ms | speedup | max rel diff |",
             "|---|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault(r["shape"], {})[r["strategy"]] = r
    for shape, t in by.items():
        old, new = t["recompute"]["median_ms"], t["from g"]["median_ms"]
        lines.append(f"| {shape} | {old:.3f} | {new:.3f} | {old / new:.2f}x | {t['from g']['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
