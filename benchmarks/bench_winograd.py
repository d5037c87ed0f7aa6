"""Winograd F(4x4, 3x3) against the direct convolution on the CPU: the 3x3 convolution alone and the
fused SCConv with each, in one process.

    python benchmarks/bench_winograd.py                       # SCNet-50 stage shapes, N = 8
    python benchmarks/bench_winograd.py --shapes 64x56x56 --rounds 5

Per shape (C -> C channels, padding 1, fp32, NCHW): the convolution's forward and forward + backward
(``F.conv2d`` against ``scnet_fused.ops.conv3x3_winograd``) with its error against float64, and the
SCConv training step and eval forward for the reference (eager), the fused module with
``set_conv_algorithm("direct")`` and with ``"auto"`` (the default: Winograd where the selection rule
takes it; the rows say where it did). Variants run in interleaved rounds whose order alternates; a
row's time is the median of its rounds' medians. Writes ``winograd.json`` and ``.md`` under ``--out``
(default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import scnet_fused  # noqa: E402
from scnet_fused import bench  # noqa: E402
from scnet_fused.ops import winograd  # noqa: E402


def _conv_jobs(x, w, dy):
    def fwd(conv):
        def fn():
            with torch.no_grad():
                return conv(x, w)
        return fn

    def fwd_bwd(conv):
        def fn():
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            return torch.autograd.grad(conv(xg, wg), [xg, wg], dy)
        return fn

    def direct(a, b):
        return F.conv2d(a, b, padding=1)

    def wino(a, b):
        return winograd.conv3x3_winograd(a, b)

    return {("conv forward", "direct"): fwd(direct), ("conv forward", "winograd"): fwd(wino),
            ("conv forward+backward", "direct"): fwd_bwd(direct), ("conv forward+backward", "winograd"): fwd_bwd(wino)}


def _module_job(module, x, dy, mode, algorithm):
    params = [p for p in module.parameters() if p.requires_grad]

    def fn():
        previous = scnet_fused.set_conv_algorithm(algorithm)
        try:
            if mode == "train":
                module.train()
                xg = x.detach().requires_grad_()
                return torch.autograd.grad(module(xg), [xg] + params, dy)
            module.eval()
            with torch.no_grad():
                return module(x)
        finally:
            scnet_fused.set_conv_algorithm(previous)
    return fn


def _error(x, w):
    want = F.conv2d(x.double(), w.double(), padding=1)
    scale = want.abs().max().item()
    direct = (F.conv2d(x, w, padding=1).double() - want).abs().max().item() / scale
    wino = (winograd.conv3x3_winograd(x, w).double() - want).abs().max().item() / scale
    return direct, wino


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--channels-last", action="store_true",
                    help="inputs, gradients and modules in channels_last (writes winograd_channels_last.*)")
    ap.add_argument("--markdown-from", metavar="JSON", help="only rewrite the .md of an earlier run's JSON")
    bench.add_machine_args(ap)
    args = ap.parse_args(argv)
    if args.markdown_from:
        import json

        with open(args.markdown_from) as f:
            rows = json.load(f)
        rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
        with open(os.path.splitext(args.markdown_from)[0] + ".md", "w") as f:
            f.write(markdown(rows))
        return 0
    shapes = bench.shapes_from_arg(ap, args.shapes)
    why = bench.fused_modules_reason()
    if why:
        ap.error(why)
    if not winograd._kernels_present():
        ap.error("the compiled CPU kernels with the Winograd transforms are not loaded")
    device, allocator = bench.machine_from_args(args)
    if device.type != "cpu":
        ap.error("the Winograd convolution runs on the CPU")
    N = args.batch_size
    rows = []
    for C, H, W in shapes:
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        x = torch.randn(N, C, H, W, generator=g).contiguous(memory_format=fmt)
        dy = torch.randn(N, C, H, W, generator=g).contiguous(memory_format=fmt)
        w = torch.randn(C, C, 3, 3, generator=g) * (2.0 / (9 * C)) ** 0.5
        err_direct, err_wino = _error(x, w)
        ref = bench.build_module("scconv", C, fused=False).to(memory_format=fmt)
        fused = bench.build_module("scconv", C, fused=True, like=ref).to(memory_format=fmt)
        # eval (autograd off): the modules keep the filters' transform between calls, which the rule counts
        applies = {cached: winograd.winograd_applies(x, w, (1, 1), (1, 1), (1, 1), 1, algorithm="auto", cached=cached)
                   for cached in (False, True)}
        jobs = _conv_jobs(x, w, dy)
        for mode in ("train", "eval"):
            jobs[(f"scconv {mode}", "eager")] = _module_job(ref, x, dy, mode, "direct")
            jobs[(f"scconv {mode}", "fused direct")] = _module_job(fused, x, dy, mode, "direct")
            jobs[(f"scconv {mode}", "fused winograd")] = _module_job(fused, x, dy, mode, "winograd")
            jobs[(f"scconv {mode}", "fused auto")] = _module_job(fused, x, dy, mode, "auto")
        samples = {k: [] for k in jobs}
        with bench.bench_environment():
            for r in range(max(1, args.rounds)):
                for key in (list(jobs) if r % 2 == 0 else list(reversed(list(jobs)))):
                    jobs[key]()
                    samples[key].append(bench.time_fn(jobs[key], device, min_run_time=args.min_run_time).median_ms)
        where = bench.shape_str((N, C, H, W))
        for (what, variant), ts in samples.items():
            rows.append(dict(op=what, provider=variant, shape=where, dtype="fp32", device=bench.device_name(device),
                             versions=bench.versions(), median_ms=statistics.median(ts), rounds_ms=ts,
                             allocator=allocator, auto_uses_winograd=applies[what == "scconv eval"],
                             rel_error_direct=err_direct,
                             rel_error_winograd=err_wino, layout="channels_last" if args.channels_last else "nchw",
                             winograd_gemm="kernel" if winograd._gemm_kernel() else "bmm"))
        bench.log_stderr(f"{where}: " + ", ".join(f"{a} {b} {statistics.median(t):.2f} ms" for (a, b), t in samples.items()))
    stem = "winograd_channels_last" if args.channels_last else "winograd"
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), stem, markdown(rows))
    return 0


_GEMM_WORDS = {"kernel": "this package's batched product kernel (`_wino_bmm`)", "bmm": "`torch.bmm`"}


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# Winograd F(4x4, 3x3) against the direct convolution: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}, CPU kernels {v.get('cpu_isa')}; "
             f"`benchmarks/bench_winograd.py`; fp32, {'channels_last' if first.get('layout') == 'channels_last' else 'NCHW'}, "
             f"C -> C 3x3 convolutions; {len(first['rounds_ms'])} "
             f"interleaved rounds in one process, median of the rounds' medians. "
             f"Allocator: {first.get('allocator') or 'as configured'}."
             + (f" Winograd products: {_GEMM_WORDS[first['winograd_gemm']]}." if first.get("winograd_gemm") else ""), "",
             "Convolution alone (`F.conv2d` against `conv3x3_winograd`, both gradients as Winograd too); "
             "error: largest |y - y64| over the largest |y64| "
             "(float64 direct convolution).", "",
             "| N x C x H x W | forward direct ms | forward Winograd ms | speed-up | fwd+bwd direct ms "
             "| fwd+bwd Winograd ms | speed-up | error direct | error Winograd |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault(r["shape"], {})[(r["op"], r["provider"])] = r
    for shape, t in by.items():
        fd, fw = t[("conv forward", "direct")]["median_ms"], t[("conv forward", "winograd")]["median_ms"]
        bd, bw = (t[("conv forward+backward", "direct")]["median_ms"],
                  t[("conv forward+backward", "winograd")]["median_ms"])
        r0 = t[("conv forward", "direct")]
        lines.append(f"| {shape} | {fd:.2f} | {fw:.2f} | {fd / fw:.2f}x | {bd:.2f} | {bw:.2f} | {bd / bw:.2f}x "
                     f"| {r0['rel_error_direct']:.1e} | {r0['rel_error_winograd']:.1e} |")
    lines += ["", "SCConv (reference = eager; fused with `set_conv_algorithm(\"direct\")`, with \"winograd\" "
              "(every eligible convolution, whatever the rule says) and with the default `\"auto\"`; \"auto takes "
              "Winograd\": the selection rule's answer for the C -> C convolutions at this shape, where auto "
              "and winograd run the same code and their difference is this machine's noise).", "",
              "| N x C x H x W | mode | eager ms | fused direct ms | fused winograd ms | fused auto ms "
              "| direct vs eager | winograd vs eager | auto vs eager | auto vs direct | auto takes Winograd |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for shape, t in by.items():
        for mode in ("train", "eval"):
            e = t[(f"scconv {mode}", "eager")]["median_ms"]
            d = t[(f"scconv {mode}", "fused direct")]["median_ms"]
            w = t.get((f"scconv {mode}", "fused winograd"))  # absent in runs before this column
            wm, wx = (f"{w['median_ms']:.2f}", f"{e / w['median_ms']:.2f}x") if w else ("-", "-")
            a = t[(f"scconv {mode}", "fused auto")]
            am = a["median_ms"]
            lines.append(f"| {shape} | {mode} | {e:.2f} | {d:.2f} | {wm} | {am:.2f} | {e / d:.2f}x | {wx} "
                         f"| {e / am:.2f}x | {d / am:.2f}x | {'yes' if a['auto_uses_winograd'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
