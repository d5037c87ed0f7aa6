"""Shared by the in-process A/B benchmarks (bench_stem.py, bench_downsample.py,
bench_winograd_policy.py): their arguments, interleaved timing rounds and the JSON / Markdown rows
they write."""

import argparse
import json
import os
import statistics
import sys
import time

import torch

from scnet_fused import bench


def parse_args(doc, name, argv, extra=None):
    """The scripts' common arguments (``extra(parser)`` adds a script's own); applies --threads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=name)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def scnet50_jobs(N, channels_last=False):
    """A fused scnet50 (224 px inputs, batch N, SGD with momentum at 0.1 x N / 256; model and images
    channels_last if asked) and two callables: one training step and one eval forward; each leaves
    the model's train/eval mode as it found it (the caller sets it). Returns (model, image batch, step,
    infer)."""
    import torch.nn.functional as F

    from scnet_fused import models

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = models.scnet50(fused=True).to(memory_format=fmt)
    img = torch.randn(N, 3, 224, 224).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (N,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1 * N / 256, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(img), target).backward()
        opt.step()

    def infer():
        with torch.no_grad():
            m(img)

    return m, img, step, infer


def timed(fn, reps):
    """Mean wall time of ``reps`` calls after one untimed call, in ms."""
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def interleaved(fns, rounds, reps):
    """``{name: median ms}`` over ``rounds`` rounds, each timing every function, in alternating order."""
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            times[k].append(timed(fns[k], reps))
    return {k: statistics.median(v) for k, v in times.items()}


def add_rows(rows, what, shape, fns, rounds, reps):
    """Time ``fns`` (:func:`interleaved`) and append a row ``{what, variant, shape, median_ms}`` for each."""
    for k, ms in interleaved(fns, rounds, reps).items():
        rows.append(dict(what=what, variant=k, shape=shape, median_ms=ms))


def write_rows(rows, out, name, title, command, rounds):
    """Rows ``{what, variant, shape, median_ms}`` to <out>/<name>.json and .md (device and versions
    recorded); the Markdown is printed too."""
    device = bench.device_name(torch.device("cpu"))
    out = out or bench.default_out_dir(torch.device("cpu"))
    os.makedirs(out, exist_ok=True)
    versions = {"torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads()}
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(dict(rows=rows, versions=versions, device=device), f, indent=1)
    lines = [f"# {title}", "",
             f"Device: {device}; torch {versions['torch']}, Python {versions['python']}, {versions['threads']} "
             f"threads; {rounds} interleaved rounds, medians. `{command}`.", "",
             "| what | variant | shape | median ms |", "|---|---|---|---:|"]
    lines += [f"| {r['what']} | {r['variant']} | {r['shape']} | {r['median_ms']:.2f} |" for r in rows]
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def append_lines(lines, out, name):
    """Print ``lines`` and append them to <out>/<name>.md (after :func:`write_rows` wrote it)."""
    print("\n".join(lines))
    with open(os.path.join(out or bench.default_out_dir(torch.device("cpu")), f"{name}.md"), "a") as f:
        f.write("\n".join(lines) + "\n")

