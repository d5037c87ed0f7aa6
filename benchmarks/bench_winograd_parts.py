"""The Winograd convolution's parts on the CPU, each implementation against the other: the 36 channel
sums as ``torch.bmm`` (MKL) and as the package's product kernel (``_wino_bmm``), forward (tiles x C by
C x K) and weight-gradient (K x tiles by tiles x C) orientation, at the products of the SCNet-50 stage
shapes; and the filter transforms (U = G g G^T, the flipped filters of the input gradient, the adjoint)
as the (36 x 9) matrix products they were and as the kernels that replaced them; and one convolution
forward (its filters' transform made beforehand) as the three passes (input transform, products,
output transform, each through memory) and as the one kernel (``_wino_conv``), beside ``F.conv2d``;
and a weight gradient from the two maps with its transforms through memory and made inside
(``_wino_wgrad_x``).

    python benchmarks/bench_winograd_parts.py --threads 2 [--out DIR]

Writes winograd_parts.{json,md}. Each pair is timed in interleaved rounds in one process; medians of
the rounds' medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import bench  # noqa: E402
from scnet_fused.ops import winograd  # noqa: E402


def _product_jobs(N, C, H, W):
    TH, TW = (H + 3) // 4, (W + 3) // 4
    T = N * TH * TW
    g = torch.Generator().manual_seed(0)
    v = torch.randn(36, T, C, generator=g)
    u = torch.randn(36, C, C, generator=g)
    z = torch.randn(36, T, C, generator=g)
    ops = torch.ops.scnet_fused
    flops = 2 * 36 * T * C * C
    return flops, {
        ("products forward", "torch.bmm"): lambda: torch.bmm(v, u),
        ("products forward", "kernel"): lambda: ops._wino_bmm(v, u, False),
        ("products weight gradient", "torch.bmm"): lambda: torch.bmm(z.transpose(1, 2), v),
        ("products weight gradient", "kernel"): lambda: ops._wino_bmm(z, v, True),
    }


def _conv_jobs(N, C, H, W):
    """One C -> C convolution of an NCHW map, the filters' transform made beforehand (as inference keeps it):
    three passes with the products as the kernel and as torch.bmm, the one kernel; beside the direct
    convolution and the one kernel that makes the transform inside (``_wino_conv_w``)."""
    TH, TW = (H + 3) // 4, (W + 3) // 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(C, C, 3, 3, generator=g)
    ops = torch.ops.scnet_fused
    u = ops._wino_filter(w, False, True)
    return {
        ("convolution forward", "F.conv2d"): lambda: torch.nn.functional.conv2d(x, w, None, padding=1),
        ("convolution forward", "three passes"):
            lambda: ops._wino_output_nhwc(ops._wino_bmm(ops._wino_input_nhwc(x, TH, TW), u, False), N, H, W, None, True),
        ("convolution forward", "three passes, torch.bmm"):
            lambda: ops._wino_output_nhwc(torch.bmm(ops._wino_input_nhwc(x, TH, TW), u), N, H, W, None, True),
        ("convolution forward", "one kernel"): lambda: ops._wino_conv(x, u, None),
        ("convolution forward", "made inside"): lambda: ops._wino_conv_w(x, w, None),
    }


def _inside_jobs(N, C, H, W):
    """A convolution from its filters (their transform made in each call, as in a training step) and a
    weight gradient from the two transforms: the kernels that make the filters' transform inside their
    task items (``_wino_conv_w``, ``_wino_wgrad``) against the separate kernels."""
    TH, TW = (H + 3) // 4, (W + 3) // 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(C, C, 3, 3, generator=g)
    ops = torch.ops.scnet_fused
    z, v = ops._wino_output_adjoint_nhwc(x, TH, TW), ops._wino_input_nhwc(x, TH, TW)
    return {
        ("from the filters forward", "F.conv2d"): lambda: torch.nn.functional.conv2d(x, w, None, padding=1),
        ("from the filters forward", "separate"): lambda: ops._wino_conv(x, ops._wino_filter(w, False, True), None),
        ("from the filters forward", "separate, three passes, torch.bmm"):
            lambda: ops._wino_output_nhwc(torch.bmm(ops._wino_input_nhwc(x, TH, TW), ops._wino_filter(w, False, True)),
                                          N, H, W, None, True),
        ("from the filters forward", "inside"): lambda: ops._wino_conv_w(x, w, None),
        ("from the filters weight gradient", "separate"): lambda: ops._wino_filter_adjoint(ops._wino_bmm(z, v, True)),
        ("from the filters weight gradient", "separate, torch.bmm"):
            lambda: ops._wino_filter_adjoint(torch.bmm(z.transpose(1, 2), v)),
        ("from the filters weight gradient", "inside"): lambda: ops._wino_wgrad(z, v),
    }


def _wgrad_jobs(N, C, H, W):
    """A weight gradient from the two maps (x and the output gradient): the two transforms through memory
    and the products (the package's kernel or torch.bmm) with the adjoint transform (as ``_weight_grad``
    runs it where the transforms-inside rule does not apply) against ``_wino_wgrad_x``, both transforms
    inside."""
    TH, TW = (H + 3) // 4, (W + 3) // 4
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(N, C, H, W, generator=g), torch.randn(N, C, H, W, generator=g)
    ops = torch.ops.scnet_fused

    def separate(products):
        def run():
            z, v = ops._wino_output_adjoint_nhwc(dy, TH, TW), ops._wino_input_nhwc(x, TH, TW)
            return ops._wino_filter_adjoint(products(z, v))
        return run

    return {
        ("weight gradient from the maps", "separate"): separate(lambda z, v: ops._wino_bmm(z, v, True)),
        ("weight gradient from the maps", "separate, torch.bmm"):
            separate(lambda z, v: torch.bmm(z.transpose(1, 2), v)),
        ("weight gradient from the maps", "inside"): lambda: ops._wino_wgrad_x(dy, x),
    }


def _filter_jobs(C):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(C, C, 3, 3, generator=g)
    du = torch.randn(36, C, C, generator=g)
    return {
        ("filter transform", "matrix product"): lambda: winograd._weight_transform_mm(w),
        ("filter transform", "kernel"): lambda: winograd._weight_transform(w),
        ("flipped filters", "matrix product"): lambda: winograd._weight_transform_mm(w.flip(2, 3).transpose(0, 1)),
        ("flipped filters", "kernel"): lambda: winograd._weight_transform(w, flip=True),
        ("filter adjoint", "matrix product"): lambda: winograd._weight_transform_adjoint_mm(du),
        ("filter adjoint", "kernel"): lambda: winograd._weight_transform_adjoint(du),
    }


_PARTS = ("products", "conv", "inside", "wgrad", "filters")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.3)
    ap.add_argument("--parts", default=",".join(_PARTS),
                    help=f"comma list of {', '.join(_PARTS)} (default: all)")
    ap.add_argument("--out", default=None)
    bench.add_machine_args(ap)
    args = ap.parse_args(argv)
    if not winograd._kernels_present():
        ap.error("the compiled CPU kernels with the Winograd transforms are not loaded")
    device, allocator = bench.machine_from_args(args)
    if device.type != "cpu":
        ap.error("the Winograd convolution runs on the CPU")
    shapes = bench.shapes_from_arg(ap, args.shapes)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(_PARTS))
    if unknown or not parts:
        ap.error(f"--parts: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(_PARTS)}")
    N = args.batch_size
    groups = []
    for C, H, W in shapes:
        where = bench.shape_str((N, C, H, W))
        if "products" in parts:
            flops, jobs = _product_jobs(N, C, H, W)
            groups.append((where, flops, jobs))
        for part, make in (("conv", _conv_jobs), ("inside", _inside_jobs), ("wgrad", _wgrad_jobs)):
            if part in parts:
                groups.append((where, None, make(N, C, H, W)))
    if "filters" in parts:
        for C in sorted({C for C, _, _ in shapes}):
            groups.append((f"{C}x{C}x3x3", None, _filter_jobs(C)))
    rows = []
    with bench.bench_environment():
        for where, flops, jobs in groups:
            samples = {k: [] for k in jobs}
            for r in range(max(1, args.rounds)):
                for key in (list(jobs) if r % 2 == 0 else list(reversed(list(jobs)))):
                    jobs[key]()
                    samples[key].append(bench.time_fn(jobs[key], device, min_run_time=args.min_run_time).median_ms)
            for (what, impl), ts in samples.items():
                ms = statistics.median(ts)
                rows.append(dict(op=what, provider=impl, shape=where, dtype="fp32", device=bench.device_name(device),
                                 versions=bench.versions(), median_ms=ms, rounds_ms=ts, allocator=allocator,
                                 gflops=None if flops is None else flops / ms / 1e6,
                                 auto_gemm="kernel" if winograd._gemm_kernel() else "bmm"))
            bench.log_stderr(f"{where}: " + ", ".join(f"{a} {b} {statistics.median(t):.3f} ms"
                                                      for (a, b), t in samples.items()))
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), "winograd_parts", markdown(rows))
    return 0


def markdown(rows) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# Winograd parts, each implementation against the other: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}, CPU kernels {v.get('cpu_isa')}; "
             f"`benchmarks/bench_winograd_parts.py`; fp32; {len(first['rounds_ms'])} interleaved rounds in one "
             f"process, median of the rounds' medians. Allocator: {first.get('allocator') or 'as configured'}. "
             f"On this machine the convolutions' products run as "
             f"{'the kernel' if first.get('auto_gemm') == 'kernel' else 'torch.bmm'} (the \"auto\" choice).", "",
             "The 36 channel sums of one convolution (N x C x H x W: the map; C -> C channels): forward, "
             "(tiles x C) @ (C x K); weight gradient, (K x tiles) @ (tiles x C).", "",
             "| N x C x H x W | products | torch.bmm ms | kernel ms | torch.bmm GFLOP/s | kernel GFLOP/s "
             "| kernel vs torch.bmm |",
             "|---|---|---:|---:|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["op"]), {})[r["provider"]] = r
    for (shape, op), t in by.items():
        if "torch.bmm" not in t:
            continue
        b, k = t["torch.bmm"], t["kernel"]
        lines.append(f"| {shape} | {op.replace('products ', '')} | {b['median_ms']:.3f} | {k['median_ms']:.3f} "
                     f"| {b['gflops']:.0f} | {k['gflops']:.0f} | {b['median_ms'] / k['median_ms']:.2f}x |")
    lines += ["", "One C -> C convolution forward of the NCHW map, its filters' transform made beforehand (as "
              "inference keeps it): the three passes (input transform, products, output transform, each result "
              "through memory) with the products as the kernel and as torch.bmm, and the one kernel "
              "(`_wino_conv`: a block of tiles at a time in cache); beside the direct `F.conv2d` and the one "
              "kernel that makes the transform inside (`_wino_conv_w`, nothing kept).", "",
              "| N x C x H x W | tiles | F.conv2d ms | three passes ms | three passes, torch.bmm ms "
              "| one kernel ms | made inside ms | fastest |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    names = ("F.conv2d", "three passes", "three passes, torch.bmm", "one kernel", "made inside")
    for (shape, op), t in by.items():
        if "one kernel" not in t:
            continue
        n, _, h, w = (int(d) for d in shape.split("x"))
        ms = [t[k]["median_ms"] for k in names]
        lines.append(f"| {shape} | {n * ((h + 3) // 4) * ((w + 3) // 4)} | "
                     + " | ".join(f"{m:.3f}" for m in ms) + f" | {names[ms.index(min(ms))]} |")
    lines += ["", "The filters' transform made in each call, as in a training step: a convolution forward from "
              "its filters (separate: `_wino_filter`, then `_wino_conv`; inside: `_wino_conv_w`, which transforms "
              "a part of the filters inside each task item; separate, torch.bmm: `_wino_filter`, then the three "
              "passes with torch.bmm), and the weight gradient from the transformed input and output gradient "
              "(separate: `_wino_bmm` or torch.bmm, then `_wino_filter_adjoint`; inside: `_wino_wgrad`). "
              "`auto` takes the inside kernels where the outputs are at least the tiles (forward) and the "
              "channels at least twice the tiles (weight gradient; where the products run as torch.bmm, only "
              "with a transformed input of at most 4096 tiles x input channels or a dU over 32 MiB). The "
              "weight gradient from the maps (x and the output gradient): separate, their transforms through "
              "memory, then `_wino_bmm` (or torch.bmm) and `_wino_filter_adjoint`; inside, `_wino_wgrad_x` "
              "(both transforms in cache, a run of tiles a task item, the runs' partial products added in "
              "order), which `auto` takes up to 64 x 64 channels and more than 64 tiles.", "",
              "| N x C x H x W | tiles | computes | F.conv2d ms | separate ms | separate, torch.bmm ms | inside ms "
              "| inside vs separate | inside vs separate, torch.bmm | inside vs F.conv2d |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (shape, op), t in by.items():
        if "inside" not in t:
            continue
        n, _, h, w = (int(d) for d in shape.split("x"))
        d = t["F.conv2d"]["median_ms"] if "F.conv2d" in t else None
        sep, ins = t["separate"]["median_ms"], t["inside"]["median_ms"]
        mkl = next((v["median_ms"] for k, v in t.items() if k.startswith("separate,")), None)
        lines.append(f"| {shape} | {n * ((h + 3) // 4) * ((w + 3) // 4)} | {op.replace('from the filters ', '')} "
                     f"| {_ms(d)} | {sep:.3f} | {_ms(mkl)} | {ins:.3f} | {sep / ins:.2f}x "
                     f"| {'-' if mkl is None else f'{mkl / ins:.2f}x'} | {'-' if d is None else f'{d / ins:.2f}x'} |")
    lines += ["", "The filter transforms (C x C x 3 x 3 filters -> 36 x C x C): as (36 x 9) matrix products "
              "(the flipped filters after a flip-transpose copy) and as kernels.", "",
              "| filters | transform | matrix product ms | kernel ms | kernel vs matrix product |",
              "|---|---|---:|---:|---:|"]
    for (shape, op), t in by.items():
        if "matrix product" not in t:
            continue
        m, k = t["matrix product"]["median_ms"], t["kernel"]["median_ms"]
        lines.append(f"| {shape} | {op} | {m:.3f} | {k:.3f} | {m / k:.2f}x |")
    return "\n".join(_without_empty_tables(lines)) + "\n"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _without_empty_tables(lines):
    """The lines less each table that got no rows (the parts not run) and the paragraph before it."""
    blocks, cur = [], []
    for line in lines + [""]:
        if line == "":
            blocks.append(cur)
            cur = []
        else:
            cur.append(line)
    keep = []
    for block in blocks:
        if len(block) == 2 and block[0].startswith("|") and block[1].startswith("|---"):
            keep.pop()  # its description
        else:
            keep.append(block)
    return [line for i, block in enumerate(keep) for line in ([""] if i else []) + block]


if __name__ == "__main__":
    sys.exit(main())
