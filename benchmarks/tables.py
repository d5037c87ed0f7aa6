"""Summary tables (as in the top-level README) from a results JSON written by the harness.

    python benchmarks/tables.py benchmarks/results/cpu/results.json                 # fused = cpu
    python benchmarks/tables.py benchmarks/results/<gpu>/results.json --fused triton
    python benchmarks/tables.py results.json --compact                                # the README's form

One row per (op, mode, shape, dtype): eager, compile and the fused provider's median side by side,
with the ratios computed from those medians. Module rows (scconv, bottleneck) add the bytes saved for
backward (eager / fused). Nothing is rounded before the ratios are taken. ``--compact``: one row per
(op, shape, dtype) with the modes side by side (an op's forward and backward, a module's train step
and eval forward), and the modules' first calls (compile / fused) instead of the page faults.
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


def _modes_in(by_key, ops: Sequence[str]) -> List[str]:
    order = ("forward", "backward", "full", "train", "eval")
    present = {mode for (op, mode, _, _) in by_key if op in ops}
    return [m for m in order if m in present] + sorted(present.difference(order))


def compact_table(rows: Sequence[dict], fused: str, modules: bool) -> List[str]:
    """Rows per (op, shape, dtype); per mode ``eager / compile / fused`` ms and the two ratios."""
    by_key = {k: v for k, v in group(rows).items() if (k[0] in MODULES) == modules and fused in v}
    modes = _modes_in(by_key, [k[0] for k in by_key])
    if not modes:
        return []
    first = "op" if not modules else "module"
    head = f"| {first} | N x C x H x W | dtype | "
    head += " | ".join(f"{m} ms: eager / compile / {fused} | {m}: vs eager, vs compile" for m in modes)
    align = "|---|---|---|" + "---:|---:|" * len(modes)
    if modules:
        head += f" | first call ms, {modes[0]}: compile / {fused} | saved for backward, MB (eager / {fused})"
        align += "---:|---:|"
    lines = [head + " |", align]
    seen = []
    for (op, _, shape, dtype) in by_key:
        if (op, shape, dtype) not in seen:
            seen.append((op, shape, dtype))
    for op, shape, dtype in seen:
        cells = []
        for m in modes:
            by = by_key.get((op, m, shape, dtype), {})
            e, c, f = (by.get(p, {}).get("median_ms") for p in ("eager", "compile", fused))
            digits = 2 if modules else 3
            cells += [f"{_ms(e, digits)} / {_ms(c, digits)} / {_ms(f, digits)}", f"{_ratio(e, f)}, {_ratio(c, f)}"]
        if modules:
            by = by_key.get((op, modes[0], shape, dtype), {})
            fc, ff = (by.get(p, {}).get("first_ms") for p in ("compile", fused))
            cells.append(f"{_ms(fc, 0)} / {_ms(ff, 0)}")
            se, sf = (by.get(p, {}).get("saved_bytes") for p in ("eager", fused))
            cells.append("-" if se is None or sf is None else f"{_mb(se)} / {_mb(sf)}")
        lines.append(f"| {op} | {shape} | {dtype} | " + " | ".join(cells) + " |")
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
    ap.add_argument("--compact", action="store_true", help="one row per op and shape, the modes side by side")
    args = ap.parse_args(argv)
    rows: List[dict] = []
    for path in args.results:
        with open(path) as f:
            rows.extend(json.load(f))
    out = header(rows)
    if args.compact:
        ops, mods = compact_table(rows, args.fused, False), compact_table(rows, args.fused, True)
    else:
        ops, mods = op_table(rows, args.fused), module_table(rows, args.fused)
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
