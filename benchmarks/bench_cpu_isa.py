"""The CPU kernel builds against each other: the fused CPU ops timed with every instruction-set build
this CPU runs (scnet_fused._cpu_default / _cpu_avx2 / _cpu_avx512).

    python benchmarks/bench_cpu_isa.py                     # every runnable build, 3 rounds, stage shapes
    python benchmarks/bench_cpu_isa.py --isas avx2,avx512 --rounds 2 --op gate_bn --shapes 64x28x28

A process loads one build, so each (round, build) is a run of ``bench_gate.py --providers cpu`` in a
process of its own with ``SCNET_FUSED_CPU_ISA`` set; the builds take turns, in an order that
alternates between rounds, and a row's time is the median of its rounds' medians. Writes
``<out>/cpu_isa.json`` (the rounds' rows, ``cpu_isa`` in each row's versions) and ``cpu_isa.md``
(ms per build and each build's speed over the first one named).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from scnet_fused import bench  # noqa: E402
from scnet_fused.ops import _cpp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", help="comma list of builds, the first is the base of the ratios "
                                   "(default: every runnable one, least capable first)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--op", default="gate,gate_bn,avgpool,bn_relu")
    ap.add_argument("--mode", default="forward,backward,full")
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None, help="OMP threads of the runs (default: torch's)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu"))
    args = ap.parse_args(argv)

    runnable = list(reversed(_cpp.runnable_isas()))  # least capable first
    isas = args.isas.split(",") if args.isas else runnable
    missing = [i for i in isas if i not in runnable]
    if missing or not isas:
        print(f"bench_cpu_isa: not built or not runnable here: {', '.join(missing) or 'none given'} "
              f"(runnable: {', '.join(runnable)})", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for isa in (isas if r % 2 == 0 else list(reversed(isas))):
                name = f"r{r}_{isa}"
                cmd = [sys.executable, os.path.join(HERE, "bench_gate.py"), "--providers", "cpu", "--device", "cpu",
                       "--op", args.op, "--mode", args.mode, "--batch-size", str(args.batch_size),
                       "--min-run-time", str(args.min_run_time), "--out", tmp, "--name", name]
                if args.shapes:
                    cmd += ["--shapes", args.shapes]
                env = dict(os.environ, SCNET_FUSED_CPU_ISA=isa)
                if args.threads:
                    env["OMP_NUM_THREADS"] = str(args.threads)
                bench.log_stderr(f"round {r + 1}/{args.rounds}: {isa}")
                proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-4000:], file=sys.stderr)
                    return 1
                with open(os.path.join(tmp, f"{name}.json")) as f:
                    got = json.load(f)
                for row in (got["rows"] if isinstance(got, dict) else got):
                    if row["versions"].get("cpu_isa") != isa:
                        print(f"bench_cpu_isa: a run asked for {isa} loaded {row['versions'].get('cpu_isa')}",
                              file=sys.stderr)
                        return 1
                    row["round"] = r
                    rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_isa.json"), "w") as f:
        json.dump({"isas": isas, "rounds": args.rounds, "rows": rows}, f, indent=1)
    md = markdown(rows, isas, args.rounds)
    with open(os.path.join(args.out, "cpu_isa.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


def markdown(rows, isas, rounds) -> str:
    times = {}
    for row in rows:
        key = (row["op"], row["mode"], row["shape"], row["dtype"])
        times.setdefault(key, {}).setdefault(row["versions"]["cpu_isa"], []).append(row["median_ms"])
    first = rows[0]
    v = first["versions"]
    lines = [f"# CPU kernel builds compared: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}; {rounds} rounds, the builds alternating, each (round, "
             f"build) in a process of its own; ms = median of the rounds' medians; ratio = the "
             f"{isas[0]} build's time over the build's.", "",
             "| op | mode | N x C x H x W | dtype | " + " | ".join(f"{i} ms" for i in isas) + " | "
             + " | ".join(f"{i} vs {isas[0]}" for i in isas[1:]) + " |",
             "|---|---|---|---|" + "---:|" * (2 * len(isas) - 1)]
    for key, per in times.items():
        med = {i: statistics.median(per[i]) for i in isas if i in per}
        if len(med) != len(isas):
            continue
        lines.append(f"| {' | '.join(key)} | " + " | ".join(f"{med[i]:.3f}" for i in isas) + " | "
                     + " | ".join(f"{med[isas[0]] / med[i]:.2f}x" for i in isas[1:]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
