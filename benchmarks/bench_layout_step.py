"""The SCConv training step in NCHW against channels_last, reference and fused, in one process.

    python benchmarks/bench_layout_step.py                      # SCNet-50 stage shapes, N = 8, best device
    python benchmarks/bench_layout_step.py --shapes 32x56x56 --rounds 5 --mode eval

``python -m scnet_fused bench --channels-last`` compares providers within one memory format; which
format to train in is a comparison across formats, and on a shared machine two separate runs drift
apart by more than the difference (the same fused NCHW step measured 22.8 and 17.6 ms in two
processes an hour apart on the 2-core Xeon). Here the four variants (reference / fused, module + input + output
gradient all NCHW or all channels_last) run in one process, in interleaved rounds whose order
alternates; a row's time is the median of its rounds' medians. Writes ``layout_step.json`` and ``.md``
under ``--out`` (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import bench  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _step(module, x, dy, mode):
    params = [p for p in module.parameters() if p.requires_grad]
    if mode == "train":
        module.train()

        def fn():
            xg = x.detach().requires_grad_()
            return torch.autograd.grad(module(xg), [xg] + params, dy)
    else:
        module.eval()

        def fn():
            with torch.no_grad():
                return module(x)
    return fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--mode", default="train", choices=("train", "eval"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    bench.add_machine_args(ap)
    args = ap.parse_args(argv)
    shapes = bench.shapes_from_arg(ap, args.shapes)
    why = bench.fused_modules_reason()
    if why:
        ap.error(why)
    device, allocator = bench.machine_from_args(args)
    N = args.batch_size
    rows = []
    for C, H, W in shapes:
        ref = bench.build_module("scconv", C, fused=False)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, C, H, W, generator=g).to(device)
        dy = torch.randn(N, C, H, W, generator=g).to(device)
        jobs, out_cl = {}, {}
        for layout, fmt in LAYOUTS.items():
            for prov in ("eager", "fused"):
                m = bench.build_module("scconv", C, fused=prov == "fused", like=ref).to(device, memory_format=fmt)
                xf = x.contiguous(memory_format=fmt)
                with torch.no_grad():  # the format the module's output really has (recorded in the rows)
                    out_cl[(prov, layout)] = m.eval()(xf).is_contiguous(memory_format=torch.channels_last)
                jobs[(prov, layout)] = _step(m, xf, dy.contiguous(memory_format=fmt), args.mode)  # sets the mode
        samples = {k: [] for k in jobs}
        with bench.bench_environment():
            for r in range(max(1, args.rounds)):
                for key in (list(jobs) if r % 2 == 0 else list(reversed(list(jobs)))):
                    jobs[key]()
                    samples[key].append(bench.time_fn(jobs[key], device, min_run_time=args.min_run_time).median_ms)
        where = bench.shape_str((N, C, H, W))
        for (prov, layout), ts in samples.items():
            rows.append(dict(op="scconv", provider=prov, layout=layout, mode=args.mode, shape=where, dtype="fp32",
                             device=bench.device_name(device), versions=bench.versions(),
                             median_ms=statistics.median(ts), rounds_ms=ts, allocator=allocator,
                             out_channels_last=out_cl[(prov, layout)]))
        bench.log_stderr(f"{where}: " + ", ".join(f"{p} {l} {statistics.median(t):.2f} ms"
                                                   for (p, l), t in samples.items()))
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), "layout_step", markdown(rows))
    return 0


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# SCConv {first['mode']} step, NCHW against channels_last: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}, CPU kernels {v.get('cpu_isa')}; "
             f"`benchmarks/bench_layout_step.py`; fp32; {len(first['rounds_ms'])} interleaved rounds in one "
             f"process, median of the rounds' medians. Allocator: {first.get('allocator') or 'as configured'}.",
             "", "| N x C x H x W | eager NCHW ms | eager channels_last ms | fused NCHW ms | fused channels_last ms "
             "| eager: channels_last vs NCHW | fused: channels_last vs NCHW | fused channels_last vs eager NCHW |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault(r["shape"], {})[(r["provider"], r["layout"])] = r["median_ms"]
    for shape, t in by.items():
        en, ec, fn, fc = (t[("eager", "nchw")], t[("eager", "channels_last")], t[("fused", "nchw")],
                          t[("fused", "channels_last")])
        lines.append(f"| {shape} | {en:.2f} | {ec:.2f} | {fn:.2f} | {fc:.2f} | {en / ec:.2f}x | {fn / fc:.2f}x "
                     f"| {en / fc:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
