"""Training-mode BatchNorm backwards and forwards on the CPU, strategy against strategy in one process.

    python benchmarks/bench_bn_backward.py                  # the gate's; SCNet-50 stage shapes, N = 8, fp32
    python benchmarks/bench_bn_backward.py --shapes 64x56x56 --rounds 9
    python benchmarks/bench_bn_backward.py --op bn_relu     # BatchNorm + ReLU
    python benchmarks/bench_bn_backward.py --op gate_bn_forward
    python benchmarks/bench_bn_backward.py --op gate         # the gate without an affine to train
    python benchmarks/bench_bn_backward.py --op gate_bn,bn_relu   # several, one after the other

``--op gate_bn`` (default):

``sc_gate_bn_train``'s backward takes two passes. The first gives dx, dsmall and BatchNorm's
per-channel sums; BatchNorm's input gradient ``dk3 = scale * g + q * k3 + r`` needs those sums, so it
comes from a second pass. That pass can read dy, x, small and k3 again and recompute the sigmoid
(``gate_backward_k3``, the strategy of the GPU backends), or add ``q * k3 + r`` in place to the
``g * scale`` the first pass wrote (``add_channel_affine_``). Both read and write 8 full-size tensors
in all; the second skips a sigmoid per element. The cpu backend's one call ``gate_bn_train_backward``
does both passes channel by channel on NCHW tensors: each channel's k3 and g * scale are read the
second time from cache, 5 full-size tensors in all. Writes ``bn_backward.json`` and ``.md``.

``--op gate_bn_forward``: the forward of ``sc_gate_bn_train``: ``channel_stats``, the fold and
``gate_forward`` against the cpu backend's one call ``gate_bn_train_forward`` (NCHW channel by
channel: each channel's k3 read the second time from cache, 3 full-size tensors instead of 4). Writes
``bn_forward.json`` and ``.md``.

``--op gate``: the gate backward where no affine of k3 is trained (no BatchNorm, one whose statistics
are frozen, another norm layer before the gate): ``gate_backward`` with the per-channel sums (the
affine's gradients) against ``need_sums=False``, which skips them (the cpu backend's NCHW permute
kernels leave them out; the others drop them). Writes ``gate_backward_sums.json`` and ``.md``.

``--op bn_relu``: ``bn_relu_train``'s backward (kernels only, no autograd) three ways: ATen's
(``threshold_backward`` then ``native_batch_norm_backward``, what eager autograd runs), the two
primitives ``affine_relu_backward_sums`` and ``_apply`` with the per-channel algebra in ATen between
them, and the cpu backend's one call ``bn_relu_train_backward`` (NCHW channel by channel, each channel
read the second time from cache). Writes ``bn_relu_backward.json`` and ``.md``.

The strategies run on the same inputs, in interleaved rounds whose order alternates; a row's time is
the median of its rounds' medians. ``--channels-last`` adds ``_channels_last`` to the file names;
``--out`` is the folder (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import _args, bench  # noqa: E402
from scnet_fused.ops.sc_gate import bn_fold  # noqa: E402


def _gate_qr(t, sum_g, sum_gc):
    """BatchNorm's input gradient as q * k3 + r (p = scale), from the first pass's sums, in ATen."""
    q = -t["scale"] * t["invstd"] * (sum_gc * t["invstd"]) / t["m"]
    r = -q * t["center"] - t["scale"] * sum_g / t["m"]
    return q, r


def recompute(P, t):
    """Pass 1 without dk3, the algebra, pass 2 recomputing the gate."""
    _, _, _, sum_g, sum_gc = P.gate_backward(t["dy"], t["x"], t["small"], t["k3"], t["scale"], t["shift"],
                                             t["center"], False)
    q, r = _gate_qr(t, sum_g, sum_gc)
    return P.gate_backward_k3(t["dy"], t["x"], t["small"], t["k3"], t["scale"], q, r)


def from_g(P, t):
    """Pass 1 writing g * scale, the algebra, pass 2 adding q * k3 + r to it in place."""
    _, _, gs, sum_g, sum_gc = P.gate_backward(t["dy"], t["x"], t["small"], t["k3"], t["scale"], t["shift"],
                                              t["center"], True)
    q, r = _gate_qr(t, sum_g, sum_gc)
    return P.add_channel_affine_(gs, t["k3"], q, r)


def gate_with_sums(P, t):
    return P.gate_backward(t["dy"], t["x"], t["small"], t["k3"], None, None, None, True)[0]


def gate_without_sums(P, t):
    return P.gate_backward(t["dy"], t["x"], t["small"], t["k3"], None, None, None, True, need_sums=False)[0]


def gate_one_call(P, t):
    return P.gate_bn_train_backward(t["dy"], t["x"], t["small"], t["k3"], t["weight"], t["bias"], t["center"],
                                    t["var"], 1e-5)[2]


def gate_fwd_passes(P, t):
    """The statistics, the fold in ATen, the gate."""
    mean, var = P.channel_stats(t["k3"])
    _, scale, shift = bn_fold(t["weight"], t["bias"], mean, var, 1e-5)
    return P.gate_forward(t["x"], t["small"], t["k3"], scale, shift)


def gate_fwd_one_call(P, t):
    return P.gate_bn_train_forward(t["x"], t["small"], t["k3"], t["weight"], t["bias"], 1e-5)[0]


def bn_relu_aten(P, t):
    """ATen's kernels, as eager autograd runs them: the ReLU's mask, then BatchNorm's backward."""
    g = torch.ops.aten.threshold_backward(t["dy"], t["y"], 0)
    return torch.ops.aten.native_batch_norm_backward(g, t["t"], t["weight"], None, None, t["center"], t["invstd"],
                                                     True, 1e-5, [True, True, True])[0]


def bn_relu_two_passes(P, t):
    """BatchNorm folded, the sums, the per-channel algebra in ATen, the apply pass."""
    invstd, scale, shift = bn_fold(t["weight"], t["bias"], t["center"], t["var"], 1e-5)
    sum_g, sum_gc = P.affine_relu_backward_sums(t["dy"], t["t"], scale, shift, t["center"])
    q = -scale * invstd * (sum_gc * invstd) / t["m"]
    r = -q * t["center"] - scale * sum_g / t["m"]
    return P.affine_relu_backward_apply(t["dy"], t["t"], scale, shift, scale, q, r)


def bn_relu_one_call(P, t):
    return P.bn_relu_train_backward(t["dy"], t["t"], t["weight"], t["bias"], t["center"], t["var"], 1e-5)[0]


OPS = {
    "gate_bn": dict(strategies={"recompute": recompute, "from g": from_g, "one call": gate_one_call},
                    stem="bn_backward", out="dk3",
                    title="Training-mode BatchNorm gate backward on the CPU, three strategies",
                    legend="recompute: `gate_backward`, the per-channel algebra in ATen, `gate_backward_k3` (the "
                           "sigmoid twice); from g: `gate_backward` writing g * scale, the algebra, "
                           "`add_channel_affine_` in place; one call: `gate_bn_train_backward` (NCHW channel by "
                           "channel)."),
    "gate_bn_forward": dict(strategies={"two passes": gate_fwd_passes, "one call": gate_fwd_one_call},
                            stem="bn_forward", out="y", mode="forward",
                            title="Training-mode BatchNorm gate forward on the CPU, two strategies",
                            legend="two passes: `channel_stats`, `bn_fold` in ATen, `gate_forward`; one call: "
                                   "`gate_bn_train_forward` (NCHW channel by channel)."),
    "gate": dict(strategies={"with sums": gate_with_sums, "without sums": gate_without_sums},
                 stem="gate_backward_sums", out="dx",
                 title="Gate backward without an affine to train on the CPU, with and without the sums",
                 legend="with sums: `gate_backward` with its per-channel sums of g and g * k3 (the gradients of "
                        "k3's affine); without sums: the same call with `need_sums=False` (dx, dsmall and dk3 "
                        "the same, bit for bit)."),
    "bn_relu": dict(strategies={"aten": bn_relu_aten, "two passes": bn_relu_two_passes,
                                "one call": bn_relu_one_call}, stem="bn_relu_backward", out="dt",
                    title="Training-mode BatchNorm + ReLU backward on the CPU, three strategies",
                    legend="aten: `threshold_backward` then `native_batch_norm_backward` (eager autograd's "
                           "kernels); two passes: `bn_fold`, `affine_relu_backward_sums`, the per-channel algebra in ATen, "
                           "`affine_relu_backward_apply`; one call: `bn_relu_train_backward` (NCHW channel by "
                           "channel)."),
}


def make_inputs(op, N, C, H, W, dtype, fmt):
    g = torch.Generator().manual_seed(0)
    if op in ("gate_bn", "gate_bn_forward", "gate"):
        h, w = bench.pooled_hw(H, W)
        t = {k: torch.randn(N, C, H, W, generator=g).to(dtype).contiguous(memory_format=fmt)
             for k in ("x", "k3", "dy")}
        t["small"] = torch.randn(N, C, h, w, generator=g).to(dtype)
        var, mean = torch.var_mean(t["k3"].float(), dim=(0, 2, 3), unbiased=False)
        t["weight"], t["bias"], t["center"], t["var"] = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), mean, var
        t["m"] = float(N * H * W)
        t["invstd"], t["scale"], t["shift"] = bn_fold(t["weight"], t["bias"], mean, var, 1e-5)
        return t
    t = {k: torch.randn(N, C, H, W, generator=g).to(dtype).contiguous(memory_format=fmt) for k in ("t", "dy")}
    var, mean = torch.var_mean(t["t"].float(), dim=(0, 2, 3), unbiased=False)
    t["weight"], t["bias"], t["center"], t["var"] = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g), mean, var
    t["m"] = float(N * H * W)
    t["invstd"], scale, shift = bn_fold(t["weight"], t["bias"], mean, var, 1e-5)
    t["y"] = torch.relu(t["t"] * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)  # ATen's saved output
    t["y"] = t["y"].contiguous(memory_format=fmt)
    return t


def run_op(op, args, shapes, P, isa, allocator, dtype, fmt, N):
    """One op's strategies over the shapes, interleaved round by round; writes its JSON and Markdown."""
    device = torch.device("cpu")
    spec = OPS[op]
    strategies = spec["strategies"]
    names = tuple(strategies)
    rows = []
    for C, H, W in shapes:
        t = make_inputs(op, N, C, H, W, dtype, fmt)
        where = bench.shape_str((N, C, H, W))
        outs = [strategies[s](P, t).float() for s in names]
        base = outs[0].abs().max().clamp_min(1e-30)
        diffs = [((o - outs[0]).abs().max() / base).item() for o in outs]  # each against the first
        samples = {s: [] for s in names}
        with bench.bench_environment():
            for r in range(args.rounds):
                for s in (names if r % 2 == 0 else tuple(reversed(names))):
                    f = strategies[s]
                    samples[s].append(bench.time_cpu(lambda: f(P, t), args.min_run_time).median_ms)
        for s, diff in zip(names, diffs):
            ts = samples[s]
            rows.append(dict(op=op, mode=spec.get("mode", "backward"), strategy=s, shape=where, dtype=args.dtype,
                             channels_last=args.channels_last, device=bench.device_name(device),
                             versions=bench.versions(), cpu_isa=isa, threads=torch.get_num_threads(),
                             median_ms=statistics.median(ts), rounds_ms=ts, max_rel_diff=diff,
                             allocator=allocator))
        bench.log_stderr(f"{where}: " + ", ".join(f"{s}: {statistics.median(ts):.3f} ms" for s, ts in samples.items()))
    stem = spec["stem"] + ("_channels_last" if args.channels_last else "")
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), stem, markdown(rows, spec))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", default="gate_bn",
                    help=f"comma list of {', '.join(OPS)} (default gate_bn: its backward); each writes its own files")
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--batch-size", type=_args.positive_int, default=8)
    ap.add_argument("--rounds", type=_args.positive_int, default=5)
    ap.add_argument("--min-run-time", type=_args.positive_float, default=0.3)
    bench.add_cpu_kernel_args(ap)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ops = [o.strip() for o in args.op.split(",")]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"--op: unknown op(s) {', '.join(map(repr, bad))}; choose from {', '.join(OPS)}")
    shapes = bench.shapes_from_arg(ap, args.shapes)
    P, isa, allocator = bench.cpu_kernels_from_args(ap, args)
    dtype = bench.parse_dtype(args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    N = args.batch_size
    for op in ops:
        run_op(op, args, shapes, P, isa, allocator, dtype, fmt, N)
    return 0


def markdown(rows, spec) -> str:
    first = rows[0]
    v = first["versions"]
    names = tuple(spec["strategies"])
    layout = "channels_last" if first["channels_last"] else "contiguous"
    ref, last = names[0], names[-1]
    speedups = [f"{last} vs {n}" for n in names[:-1]]
    lines = [f"# {spec['title']}: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}, CPU kernels {first['cpu_isa']}, {first['threads']} threads; "
             f"`benchmarks/bench_bn_backward.py --op {first['op']}`; {first['dtype']}, {layout}; "
             f"{len(first['rounds_ms'])} interleaved rounds in one process, median of the rounds' medians. "
             f"Allocator: {first.get('allocator') or 'as configured'}.", "",
             f"{spec['legend']} max rel diff: the largest difference of {spec['out']} from {ref}'s, over the largest "
             f"|{spec['out']}|.", "",
             "| N x C x H x W | " + " | ".join(f"{n}: ms" for n in names) + " | " + " | ".join(speedups)
             + " | max rel diff |",
             "|---|" + "---:|" * (2 * len(names))]
    by = {}
    for r in rows:
        by.setdefault(r["shape"], {})[r["strategy"]] = r
    for shape, t in by.items():
        ms = [t[n]["median_ms"] for n in names]
        diff = max(t[n]["max_rel_diff"] for n in names)
        lines.append(f"| {shape} | " + " | ".join(f"{m:.3f}" for m in ms) + " | "
                     + " | ".join(f"{m / ms[-1]:.2f}x" for m in ms[:-1]) + f" | {diff:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
