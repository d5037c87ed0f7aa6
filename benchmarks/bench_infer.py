"""Whole-model inference: an SCNet's eval forward (no grad), reference against fused, timed in
interleaved rounds in one process.

    python benchmarks/bench_infer.py                                   # scnet50, batch 8, 224 px, best device
    python benchmarks/bench_infer.py --model scnet101 --batch-size 64 --amp bf16 --channels-last

Writes ``infer_<model>.json`` (one row per provider) and ``.md`` under ``--out`` (default
benchmarks/results/<device>). Random weights: the time does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scnet_fused import bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="scnet50", choices=bench.MODEL_NAMES)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per provider, order alternating")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="CPU seconds per round and provider")
    ap.add_argument("--out", default=None)
    bench.add_machine_args(ap)
    args = ap.parse_args(argv)

    device, allocator = bench.machine_from_args(args)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    models = {}
    for prov, fused in (("eager", False), ("fused", True)):
        models[prov] = bench.build_model(args.model, fused).to(device).to(memory_format=fmt).eval()
    models["fused"].load_state_dict(models["eager"].state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    x = x.contiguous(memory_format=fmt)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext

    def runner(m):
        def fn():
            with torch.no_grad(), ctx():
                return m(x)
        return fn

    outs = {p: runner(m)() for p, m in models.items()}  # also the first call of each
    # accuracy: both providers against the reference model run in float64 on the same input
    import copy

    ref64 = copy.deepcopy(models["eager"]).double()
    with torch.no_grad():
        out64 = ref64(x.double())
    del ref64
    scale = out64.abs().max().item()
    errors = {p: (o.double() - out64).abs().max().item() / scale for p, o in outs.items()}
    harness = bench.Harness(device=device, min_run_time=args.min_run_time, threads=args.threads, rounds=args.rounds)
    timings = harness._time_interleaved([(p, runner(m)) for p, m in models.items()], f"{args.model} eval")
    rows = []
    for prov, t in timings.items():
        rows.append({"op": args.model, "mode": "eval", "provider": prov, "batch_size": args.batch_size,
                     "image_size": args.image_size, "amp": args.amp, "channels_last": args.channels_last,
                     "median_ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms, "runs": t.runs,
                     "rounds": t.rounds, "faults_per_call": t.faults_per_call,
                     "images_per_s": args.batch_size / (t.median_ms * 1e-3), "rel_err_vs_float64": errors[prov],
                     "device": bench.device_name(device), "versions": bench.versions(), "allocator": allocator})
    eager = next((r for r in rows if r["provider"] == "eager"), None)
    for r in rows:
        r["speedup"] = eager["median_ms"] / r["median_ms"] if eager else None
    out = args.out or bench.default_out_dir(device)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"infer_{args.model}")
    bench.write_json(rows, stem + ".json")
    v = rows[0]["versions"]
    lines = [f"# {args.model} inference (eval forward, no grad)", "",
             f"Device: {rows[0]['device']}; torch {v.get('torch')}, triton {v.get('triton')}, Python {v.get('python')}.",
             f"Batch {args.batch_size}, {args.image_size} px, amp {args.amp}, channels_last {args.channels_last}; "
             f"{args.rounds} interleaved rounds per provider." + (f" Allocator: {allocator}." if allocator else ""),
             "Error: the largest |logit - float64 reference logit| over the largest |float64 logit| (random "
             "weights with untrained running statistics let activations grow through the network, so both "
             "providers' rounding is amplified alike).", "",
             "| provider | median ms | p20-p80 ms | images/s | vs eager | faults/call | error vs float64 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        faults = "-" if r["faults_per_call"] is None else f"{r['faults_per_call']:.0f}"
        lines.append(f"| {r['provider']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} "
                     f"| {r['images_per_s']:.2f} | {r['speedup']:.2f}x | {faults} | {r['rel_err_vs_float64']:.1e} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
