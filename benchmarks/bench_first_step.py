"""Time to the first SCConv step in a fresh process: the fused module against the eager reference and
``torch.compile`` of it, with inductor's caches empty (a first compilation) and as that run left them.

    python benchmarks/bench_first_step.py                       # stage shapes, train and eval, best device
    python benchmarks/bench_first_step.py --shapes 64x56x56 --modes train --device cpu --threads 2

Each number is one process started for it: import, module construction, then the wall time of the first
call (training: forward and both gradients; eval: the forward under no_grad), synchronized. A first
training step of any module pays torch's own one-time imports in its first backward (about 0.3-0.4 s on
a 2-core CPU: ``torch.autograd.grad`` loads the symbolic-shapes module and sympy), which the eager row
shows. The compiled rows get a cache directory of their own (``TORCHINDUCTOR_CACHE_DIR``), empty for "cold" and
the one the cold run left for "warm", so neither depends on what this machine compiled before. The
module harness (``python -m scnet_fused bench``) times first calls inside its one long process instead,
where the fused kernels are loaded and inductor's caches warm. Writes ``first_step.json`` and ``.md``
under ``--out`` (default benchmarks/results/<device>).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("train", "eval")
KINDS = ("eager", "fused", "compile_cold", "compile_warm")


def child(argv) -> int:
    """One first call, printed as JSON: ``--child KIND C H W MODE BATCH DEVICE THREADS``."""
    kind, C, H, W, mode, batch, device, threads = argv
    import torch

    from scnet_fused import bench

    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    device = torch.device(device)
    C, H, W, batch = int(C), int(H), int(W), int(batch)
    ref = bench.build_module("scconv", C, fused=False)
    m = bench.build_module("scconv", C, fused=kind == "fused", like=ref).to(device)
    run = torch.compile(m, dynamic=False) if kind.startswith("compile") else m
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, C, H, W, generator=g).to(device)
    dy = torch.randn(batch, C, H, W, generator=g).to(device)
    params = [p for p in m.parameters() if p.requires_grad]
    bench.sync(device)
    t0 = time.perf_counter()
    if mode == "train":
        m.train()
        x.requires_grad_(True)
        torch.autograd.grad(run(x), [x] + params, dy)
    else:
        m.eval()
        with torch.no_grad():
            run(x)
    bench.sync(device)
    print(json.dumps({"first_ms": (time.perf_counter() - t0) * 1e3}))
    return 0


def first_call(kind, shape, mode, args, cache_dir) -> float:
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    C, H, W = shape
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, str(C), str(H), str(W), mode,
           str(args.batch_size), args.device, str(args.threads or 0)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} {mode} {C}x{H}x{W}: the child process failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["first_ms"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    from scnet_fused import _args, bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--modes", default="train,eval", help="comma list of train, eval")
    ap.add_argument("--batch-size", type=_args.positive_int, default=8)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--threads", type=_args.positive_int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--timeout", type=_args.positive_int, default=900, help="seconds per child process")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = bench.shapes_from_arg(ap, args.shapes)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"unknown mode {','.join(bad) or '(none)'}; choose from {', '.join(MODES)}")
    try:
        device = bench.torch.device(args.device) if args.device else bench.best_device()
    except RuntimeError:
        ap.error(f"unknown device {args.device!r} (use cpu or cuda[:index])")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not bench.torch.cuda.is_available()):
        ap.error(f"device {device} is not available here (cpu, or cuda with a CUDA device)")
    args.device = str(device)
    why = bench.fused_modules_reason()
    if why is not None:
        ap.error(f"the fused modules cannot run here: {why}")

    rows = []
    for shape in shapes:
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="scnet_fused_inductor_") as cache:
                t = {kind: first_call(kind, shape, mode, args, cache) for kind in KINDS}
            C, H, W = shape
            row = {"op": "scconv", "mode": mode, "shape": bench.shape_str((args.batch_size, C, H, W)),
                   **{f"{kind}_ms": t[kind] for kind in KINDS},
                   "vs_compile_cold": t["fused"] / t["compile_cold"], "vs_compile_warm": t["fused"] / t["compile_warm"],
                   "device": bench.device_name(device), "versions": bench.versions(),
                   "threads": args.threads}
            rows.append(row)
            bench.log_stderr(f"first step {row['shape']} {mode}: eager {t['eager']:.0f} ms, fused {t['fused']:.0f} "
                             f"ms, compile {t['compile_cold']:.0f} ms cold / {t['compile_warm']:.0f} ms warm")
    v = rows[0]["versions"]
    lines = ["# Time to the first SCConv step, fresh processes", "",
             f"Device: {rows[0]['device']}; torch {v.get('torch')}, triton {v.get('triton')}, "
             f"Python {v.get('python')}; threads {args.threads or 'torch default'}.",
             "One process per number: the wall time of the first call after import and construction. "
             "compile: torch.compile(reference), its inductor cache directory empty (cold) or as the cold "
             "run left it (warm).", "",
             "| N x C x H x W | mode | eager ms | fused ms | compile cold ms | compile warm ms | fused / cold "
             "| fused / warm |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['eager_ms']:.0f} | {r['fused_ms']:.0f} "
                     f"| {r['compile_cold_ms']:.0f} | {r['compile_warm_ms']:.0f} | {r['vs_compile_cold']:.3f} "
                     f"| {r['vs_compile_warm']:.3f} |")
    bench.write_script_results(rows, args.out or bench.default_out_dir(device), "first_step", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
