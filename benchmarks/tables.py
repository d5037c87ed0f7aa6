"""Summary tables (as in the top-level README) from a results JSON written by the harness.

    python benchmarks/tables.py benchmarks/results/cpu/results.json                 # fused = cpu
    python benchmarks/tables.py benchmarks/results/<gpu>/results.json --fused triton

One row per (op, mode, shape, dtype): eager, compile and the fused provider's median side by side,
with the ratios computed from those medians. Module rows (scconv, bottleneck) add the bytes saved for
backward (eager / fused). Nothing is rounded before the ratios are taken.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Sequence, Tuple

MODULES = ("scconv", "bottleneck")


def _ms(v: Optional[float], digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(num: Optional[float], den: Optional[float]) -> str:
    return "-" if not num or not den else f"{num / den:.2f}x"


def _mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def group(rows: Sequence[dict]) -> Dict[Tuple[str, str, str, str], Dict[str, dict]]:
    out: Dict[Tuple[str, str, str, str], Dict[str, dict]] = {}
    for r in rows:
        if r.get("median_ms") is None:
            continue
        key = (r["op"], r["mode"], r["shape"] + (" CL" if r.get("channels_last") else ""), r["dtype"])
        out.setdefault(key, {})[r["provider"]] = r
    return out


def op_table(rows: Sequence[dict], fused: str) -> List[str]:
    lines = [f"| op | mode | N x C x H x W | dtype | eager ms | compile ms | fused ({fused}) ms | vs eager | vs compile |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for (op, mode, shape, dtype), by in group(rows).items():
        if op in MODULES or fused not in by:
            continue
        e, c, f = (by.get(p, {}).get("median_ms") for p in ("eager", "compile", fused))
        lines.append(f"| {op} | {mode} | {shape} | {dtype} | {_ms(e, 3)} | {_ms(c, 3)} | {_ms(f, 3)} "
                     f"| {_ratio(e, f)} | {_ratio(c, f)} |")
    return lines


def module_table(rows: Sequence[dict], fused: str) -> List[str]:
    lines = [f"| module | mode | N x C x H x W | dtype | eager ms | compile ms | fused ({fused}) ms | vs eager "
             "| vs compile | saved for backward, MB (eager / fused) | faults/call (eager / fused) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (op, mode, shape, dtype), by in group(rows).items():
        if op not in MODULES or fused not in by:
            continue
        e, c, f = (by.get(p, {}).get("median_ms") for p in ("eager", "compile", fused))
        saved = "-"
        if by.get("eager", {}).get("saved_bytes") is not None and by[fused].get("saved_bytes") is not None:
            saved = f"{_mb(by['eager']['saved_bytes'])} / {_mb(by[fused]['saved_bytes'])}"
        faults = "-"
        fe, ff = by.get("eager", {}).get("faults_per_call"), by[fused].get("faults_per_call")
        if fe is not None and ff is not None:
            faults = f"{fe:.0f} / {ff:.0f}"
        lines.append(f"| {op} | {mode} | {shape} | {dtype} | {_ms(e, 2)} | {_ms(c, 2)} | {_ms(f, 2)} "
                     f"| {_ratio(e, f)} | {_ratio(c, f)} | {saved} | {faults} |")
    return lines


def header(rows: Sequence[dict]) -> List[str]:
    if not rows:
        return []
    r0 = rows[0]
    v = r0.get("versions") or {}
    lines = [f"{r0.get('device')}; torch {v.get('torch')}, triton {v.get('triton')}, Python {v.get('python')}."]
    ceil = next((r.get("ceiling_gbps") for r in rows if r.get("ceiling_gbps")), None)
    if ceil:
        lines.append(f"Copy bandwidth measured in the same run: {ceil:.1f} GB/s.")
    allocs = list(dict.fromkeys(r["allocator"] for r in rows if r.get("allocator")))
    if allocs:
        lines.append(f"Allocator: {'; '.join(allocs)}.")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="results JSON file(s) written by the harness")
    ap.add_argument("--fused", default="cpu", help="the fused provider to compare (cpu, triton, cuda, ...)")
    args = ap.parse_args(argv)
    rows: List[dict] = []
    for path in args.results:
        with open(path) as f:
            rows.extend(json.load(f))
    out = header(rows)
    ops = op_table(rows, args.fused)
    mods = module_table(rows, args.fused)
    for table in (ops, mods):
        if len(table) > 2:
            out += [""] + table
    if len(ops) <= 2 and len(mods) <= 2:
        print(f"no rows with provider {args.fused!r} in {', '.join(args.results)}", file=sys.stderr)
        return 1
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
