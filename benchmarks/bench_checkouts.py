"""Two builds of the package against each other: the fused CPU ops timed with this checkout and with
another one (an older commit, say), each with its compiled extension built in place.

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/bench_checkouts.py --base /tmp/base
    python benchmarks/bench_checkouts.py --base /tmp/base --op gate --mode backward --shapes 64x56x56 --rounds 3

Each (round, checkout) is a run of that checkout's own ``benchmarks/bench_gate.py --providers cpu``
in a process of its own, started in the checkout with it first on ``PYTHONPATH``; a probe checks
that the process imports the package from there. The checkouts take turns, in an order that
alternates between rounds, and a row's time is the median of its rounds' medians. Writes
``<out>/<name>.json`` (the rounds' rows, each with its checkout's label and commit) and
``<name>.md`` (ms per checkout and the speed of this one over the base).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from scnet_fused import bench  # noqa: E402


def commit_of(path: str) -> str:
    """``git describe``-style identity of a checkout: its commit, with ``-dirty`` for local changes."""
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _env(path: str, threads) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def imported_from(path: str, threads=None) -> str:
    """The folder a process started in ``path`` imports scnet_fused from."""
    proc = subprocess.run([sys.executable, "-c", "import os, scnet_fused; print(os.path.dirname(os.path.dirname("
                           "os.path.abspath(scnet_fused.__file__))))"],
                          cwd=path, env=_env(path, threads), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scnet_fused does not import in {path}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the other checkout (its extension built in place)")
    ap.add_argument("--head", default=ROOT, help="the checkout compared with it (default: this one)")
    bench.add_gate_rounds_args(ap, op="gate,gate_bn", mode="forward,backward", rounds=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", bench.cpu_tag()))
    ap.add_argument("--name", default="checkouts")
    args = ap.parse_args(argv)

    sides = {}
    for label, path in (("base", args.base), ("head", args.head)):
        path = os.path.realpath(path)
        if not os.path.isfile(os.path.join(path, "benchmarks", "bench_gate.py")):
            ap.error(f"--{label} {path}: not a checkout of this package (no benchmarks/bench_gate.py)")
        try:
            got = os.path.realpath(imported_from(path, args.threads))
        except RuntimeError as exc:
            print(f"bench_checkouts: {exc}", file=sys.stderr)
            return 2
        if got != path:
            print(f"bench_checkouts: a process started in {path} imports scnet_fused from {got}; build the "
                  f"extension in place there (python setup.py build_ext --inplace; not pip install -e, which would "
                  f"point this environment's install at it)", file=sys.stderr)
            return 2
        sides[label] = {"path": path, "commit": commit_of(path)}
    if sides["base"]["path"] == sides["head"]["path"]:
        bench.log_stderr("bench_checkouts: --base and --head are the same checkout")

    def run_spec(label):
        path = sides[label]["path"]
        return os.path.join(path, "benchmarks", "bench_gate.py"), _env(path, None), path

    try:
        rows = bench.gate_rounds(["base", "head"], args, run_spec)
    except bench.BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    for row in rows:
        row.update(checkout=row["label"], commit=sides[row["label"]]["commit"])
    bench.write_script_results({"checkouts": sides, "rounds": args.rounds, "rows": rows}, args.out, args.name,
                               markdown(rows, sides, args.rounds))
    return 0


def markdown(rows, sides, rounds) -> str:
    first = rows[0]
    v = first["versions"]
    lines = [f"# Two builds compared: {first['device']}", "",
             f"base `{sides['base']['commit']}`, head `{sides['head']['commit']}`; torch {v['torch']}, Python "
             f"{v['python']}, CPU kernels {v.get('cpu_isa', '?')}; inputs "
             f"{'channels_last' if first.get('channels_last') else 'contiguous (NCHW)'}; {rounds} rounds, the "
             f"checkouts alternating, "
             f"each (round, checkout) in a process of its own; ms = median of the rounds' medians; "
             f"head vs base = base's time over head's.", "",
             "| op | mode | N x C x H x W | dtype | base ms | head ms | head vs base | base rounds ms | head rounds ms |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for key, per in bench.rounds_by_label(rows).items():
        if "base" not in per or "head" not in per:
            continue
        b, h = statistics.median(per["base"]), statistics.median(per["head"])
        lines.append(f"| {' | '.join(key)} | {b:.3f} | {h:.3f} | {b / h:.2f}x | "
                     f"{', '.join(f'{t:.3f}' for t in per['base'])} | {', '.join(f'{t:.3f}' for t in per['head'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
