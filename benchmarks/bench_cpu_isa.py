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
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from scnet_fused import bench  # noqa: E402
from scnet_fused.ops import _cpp  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", help="comma list of builds, the first is the base of the ratios "
                                   "(default: every runnable one, least capable first)")
    bench.add_gate_rounds_args(ap, op="gate,gate_bn,avgpool,bn_relu", mode="forward,backward,full", rounds=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", bench.cpu_tag()))
    args = ap.parse_args(argv)

    runnable = list(reversed(_cpp.runnable_isas()))  # least capable first
    isas = args.isas.split(",") if args.isas else runnable
    missing = [i for i in isas if i not in runnable]
    if missing or not isas:
        print(f"bench_cpu_isa: not built or not runnable here: {', '.join(missing) or 'none given'} "
              f"(runnable: {', '.join(runnable)})", file=sys.stderr)
        return 2

    def run_spec(isa):
        return os.path.join(HERE, "bench_gate.py"), dict(os.environ, SCNET_FUSED_CPU_ISA=isa), None

    def check_row(isa, row):
        got = row["versions"].get("cpu_isa")
        return None if got == isa else f"bench_cpu_isa: a run asked for {isa} loaded {got}"

    try:
        rows = bench.gate_rounds(isas, args, run_spec, check_row)
    except bench.BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    bench.write_script_results({"isas": isas, "rounds": args.rounds, "rows": rows}, args.out, "cpu_isa",
                               markdown(rows, isas, args.rounds))
    return 0


def markdown(rows, isas, rounds) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# CPU kernel builds compared: {first['device']}", "",
             f"torch {v['torch']}, Python {v['python']}; {rounds} rounds, the builds alternating, each (round, "
             f"build) in a process of its own; ms = median of the rounds' medians; ratio = the "
             f"{isas[0]} build's time over the build's.", "",
             "| op | mode | N x C x H x W | dtype | " + " | ".join(f"{i} ms" for i in isas) + " | "
             + " | ".join(f"{i} vs {isas[0]}" for i in isas[1:]) + " |",
             "|---|---|---|---|" + "---:|" * (2 * len(isas) - 1)]
    for key, per in bench.rounds_by_label(rows).items():
        med = {i: statistics.median(per[i]) for i in isas if i in per}
        if len(med) != len(isas):
            continue
        lines.append(f"| {' | '.join(key)} | " + " | ".join(f"{med[i]:.3f}" for i in isas) + " | "
                     + " | ".join(f"{med[isas[0]] / med[i]:.2f}x" for i in isas[1:]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
