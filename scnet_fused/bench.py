"""Benchmark harness: timing, memory, the byte/FLOP model, result rows and their writers.

Used by the CLI (``python -m scnet_fused bench`` / ``train-bench``), by the scripts in
``benchmarks/`` and by the pytest-benchmark suite. Everything here measures; nothing asserts.

Timing
    GPU: ``triton.testing.do_bench`` (CUDA events, warm-up first, L2 flushed between runs) or, without
    Triton, CUDA events around each run; the function under test cycles through several input sets
    whose total size exceeds twice the L2 cache, so memory-bound ops are not timed out of cache.
    CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` with a fixed thread count; the median,
    20th and 80th percentiles are taken over its per-block measurements.
Memory
    ``peak_mem``: CUDA only, ``torch.cuda.max_memory_allocated`` during one call minus what was
    allocated just before it (the call's own footprint). None on the CPU: no honest number exists there.
    ``saved_bytes``: bytes of the unique storages that autograd saves for backward during one forward
    (``torch.autograd.graph.saved_tensors_hooks``), not counting parameters and the inputs.
Byte model (shared/PERF.md)
    ``bytes``: the fewest bytes the op must move (the fused path's full-size passes plus the pooled
    map), the same for every provider of a row group, so ``gbps = bytes / time`` is an effective
    bandwidth comparable across providers and ``pct_of_ceiling`` compares it with a large tensor copy
    measured in the same run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _args
from ._cpuinfo import read as cpuinfo_read

# SCNet-50 SCConv input shapes (C, H, W) at 224 x 224 (shared/SPEC.md).
STAGE_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (32, 56, 56), (64, 56, 56), (64, 28, 28), (128, 28, 28), (128, 14, 14), (256, 14, 14), (256, 7, 7),
)
QUICK_SHAPES: Tuple[Tuple[int, int, int], ...] = ((64, 28, 28),)
POOLING_R = 4

PROVIDERS = ("eager", "compile", "triton", "cuda", "cpu", "compile_fused")
FUSED_BACKENDS = ("triton", "cuda", "cpu")
OP_MODES = ("forward", "backward", "full")
MODULE_MODES = ("train", "eval")
OPS = ("gate", "gate_bn", "avgpool", "bn_relu", "bn_add_relu")
MODULES = ("scconv", "bottleneck")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
ROW_KEYS = ("op", "provider", "mode", "shape", "dtype", "device", "versions", "median_ms", "p20_ms", "p80_ms",
            "bytes", "gbps", "pct_of_ceiling", "peak_mem", "saved_bytes", "speedup")


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (bad shape, unknown provider, missing component)."""


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    key = name.strip().lower()
    if key not in DTYPES:
        raise BenchError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16")
    return DTYPES[key]


def parse_shape(text: str) -> Tuple[int, int, int]:
    """``"64x28x28"`` -> (64, 28, 28) (C, H, W)."""
    parts = re.split(r"[x,]", text.strip().lower())
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise BenchError(f"bad shape {text!r}: expected CxHxW with positive integers, e.g. 64x28x28")
    if vals[1] < POOLING_R or vals[2] < POOLING_R:
        raise BenchError(f"bad shape {text!r}: H and W must be at least pooling_r={POOLING_R}")
    return vals  # type: ignore[return-value]


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


# ------------------------------------------------------------------------------------------------
# Environment: device name, versions
# ------------------------------------------------------------------------------------------------


_cpuinfo = cpuinfo_read  # the first processor's fields of /proc/cpuinfo


def cpu_model(info: Optional[Dict[str, str]] = None) -> str:
    info = _cpuinfo() if info is None else info
    return info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_count()} cores, {torch.get_num_threads()} threads)"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_tag(info: Optional[Dict[str, str]] = None) -> str:
    """A folder name for this CPU: its model name and, where the kernel reports them, its family and
    model numbers (virtual machines often name different generations alike, e.g. ``AMD EPYC``)."""
    info = _cpuinfo() if info is None else info
    name = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b|@.*$", " ", cpu_model(info), flags=re.IGNORECASE)
    tag = "cpu-" + (_slug(name) or "unknown")
    family, model = info.get("cpu family", ""), info.get("model", "")
    if family.isdigit() and model.isdigit():
        tag += f"-f{family}m{model}"
    return tag


def device_tag(device: torch.device) -> str:
    """A folder-friendly name of the device: e.g. ``cpu-amd-epyc-f25m17`` or ``nvidia-h100-80gb-hbm3``.
    Distinct machines get distinct folders, so a run on one never overwrites another's results."""
    if device.type != "cuda":
        return cpu_tag()
    return _slug(torch.cuda.get_device_name(device))


def triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def versions() -> Dict[str, Optional[str]]:
    from . import __version__

    cudnn = None
    try:
        v = torch.backends.cudnn.version() if torch.cuda.is_available() else None
        cudnn = str(v) if v else None
    except Exception:
        pass
    try:
        from .ops import _cpp

        cpu_isa = _cpp.cpu_isa()
    except Exception:  # no extension, or a bad $SCNET_FUSED_CPU_ISA
        cpu_isa = None
    return {"torch": torch.__version__, "triton": triton_version(), "cuda": torch.version.cuda,
            "cudnn": cudnn, "python": platform.python_version(), "scnet_fused": __version__,
            "cpu_isa": cpu_isa}


def load_average() -> Optional[float]:
    """The 1-minute load average (CPU rows record it: a busy machine makes CPU timings unreliable)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_warning() -> Optional[str]:
    """A warning when other processes already keep the CPU cores busy, else None."""
    load = load_average()
    if load is not None and load > cpu_count() - 0.5:
        return (f"the 1-minute load average is {load:.1f} on {cpu_count()} cores before starting: other processes "
                f"are running and CPU timings will be noisy (OpenMP threads wait on descheduled peers)")
    return None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # the largest value glibc accepts on 64-bit
_TRIM_THRESHOLD_OFF = (1 << 31) - 1
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
               "GLIBC_TUNABLES", "LD_PRELOAD")
_allocator_note: Optional[str] = None


def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None, None
    version.restype = ctypes.c_char_p
    return libc, version().decode()


def pin_cpu_allocator(pin: bool = True) -> str:
    """Fix glibc malloc's large-block policy for CPU timing; returns a line describing the allocator.

    glibc serves blocks above its mmap threshold with fresh pages and hands freed memory back to the
    OS above its trim threshold; both thresholds move with what the process freed earlier. A
    training step that allocates its activations then pays page faults whose number depends on the
    history of the process (measured on this package's 2-core machine: the same SCBottleneck eval
    forward at 8x256x56x56 took 30 ms or 55 ms with about 18,000 minor faults per call, depending on
    which benchmarks ran before it). ``mallopt`` with fixed thresholds (32 MiB, trimming off) keeps
    freed blocks in the heap, as the caching allocators (jemalloc, tcmalloc) do. Left alone when
    ``pin`` is False, when the process is not on glibc, or when the user configured malloc already
    (``MALLOC_*_`` / ``GLIBC_TUNABLES`` / ``LD_PRELOAD`` in the environment).
    """
    global _allocator_note
    libc, version = _glibc()
    if libc is None:
        _allocator_note = "the C library's malloc (not glibc), as configured"
        return _allocator_note
    user = [k for k in _MALLOC_ENV if os.environ.get(k)]
    if user:
        _allocator_note = f"glibc {version} malloc as configured by the environment ({', '.join(user)})"
    elif not pin:
        _allocator_note = f"glibc {version} malloc with its default, dynamic thresholds"
    elif libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                               _TRIM_THRESHOLD_OFF):
        _allocator_note = (f"glibc {version} malloc, mmap threshold fixed at 32 MiB and trimming off "
                           f"(mallopt, set by the harness; --default-malloc leaves glibc's dynamic thresholds)")
    else:
        _allocator_note = f"glibc {version} malloc (mallopt refused the fixed thresholds; defaults kept)"
    return _allocator_note


def minor_faults() -> Optional[int]:
    """Minor page faults of this process so far (None where getrusage is not available)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except (ImportError, OSError, AttributeError):
        return None


def best_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def add_machine_args(ap) -> None:
    """``--device``, ``--threads`` and ``--default-malloc`` of a benchmark script (see :func:`machine_from_args`)."""
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--default-malloc", action="store_true", help="CPU: keep glibc malloc's dynamic thresholds")


def machine_from_args(args) -> Tuple[torch.device, Optional[str]]:
    """The device a script measures on and, on a CPU, the allocator note (the thresholds fixed unless
    ``--default-malloc``) with the thread count set from ``--threads``."""
    device = torch.device(args.device) if args.device else best_device()
    allocator = pin_cpu_allocator(pin=not args.default_malloc) if device.type == "cpu" else None
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    return device, allocator


def add_cpu_kernel_args(ap) -> None:
    """The machine arguments of a script that times the cpu backend's primitives (CPU only: no ``--device``)."""
    ap.add_argument("--threads", type=_args.positive_int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc malloc's dynamic mmap/trim thresholds (default: fix them for the run)")


def cpu_kernels_from_args(ap, args):
    """The cpu backend's primitives for a script of ``add_cpu_kernel_args``: ``(primitives, isa,
    allocator note)``, with the allocator pinned (unless ``--default-malloc``) and the thread count
    set; ``ap.error`` when the backend is unavailable."""
    from .ops import _dispatch

    why = _dispatch.available("cpu")
    if why:
        ap.error(f"the cpu backend is unavailable: {why}")
    from .ops._cpp import Primitives, cpu_isa

    allocator = pin_cpu_allocator(pin=not args.default_malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    return Primitives("cpu"), cpu_isa(), allocator


def shapes_from_arg(ap, text: Optional[str]) -> List[Tuple[int, int, int]]:
    """A script's ``--shapes`` (comma list of CxHxW; the stage shapes when None); a bad one is ``ap.error``."""
    try:
        return [parse_shape(s) for s in text.split(",")] if text is not None else list(STAGE_SHAPES)
    except BenchError as exc:
        ap.error(str(exc))


# --amp of the module-level A/B scripts: the autocast dtype (none: fp32).
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_module_ab_args(ap, shapes_default: str, shapes_help: str) -> None:
    """The arguments of a script that times two settings of a fused module side by side
    (:func:`interleaved_rounds`): shapes, batch, autocast, layout, rounds, machine."""
    ap.add_argument("--shapes", default=shapes_default, help=shapes_help)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--amp", choices=sorted(AMP_DTYPES), default="none", help="autocast dtype (default: none, fp32)")
    ap.add_argument("--channels-last", action="store_true", help="module and input in channels_last")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--out", default=None)
    add_machine_args(ap)


def amp_context(device_type: str, amp: str):
    """autocast to ``AMP_DTYPES[amp]`` on ``device_type``, or nothing for ``none``."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def module_ab_row(op: str, setting: str, mode: str, where: str, args, device: torch.device, allocator, ts,
                  **extra) -> dict:
    """A result row of such a script: one setting and mode at one shape, from its rounds' medians ``ts``."""
    return dict(op=op, provider=setting, mode=mode, shape=where,
                dtype="fp32" if args.amp == "none" else f"{args.amp} autocast",
                layout="channels_last" if args.channels_last else "NCHW", device=device_name(device),
                versions=versions(), median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts),
                rounds=len(ts), allocator=allocator, **extra)


def interleaved_rounds(settings, jobs_for, rounds: int, device: torch.device, min_run_time: float):
    """A script's side-by-side timing in one process: per round, each setting in turn (the order
    reversed every other round), each of ``jobs_for(setting)``'s ``{mode: fn}`` called once, then
    timed. Returns ``{(setting, mode): [median ms of each round]}``; logs each pair's median."""
    samples = {}
    for r in range(max(1, rounds)):
        for setting in (list(settings) if r % 2 == 0 else list(reversed(settings))):
            for mode, fn in jobs_for(setting).items():
                fn()
                samples.setdefault((setting, mode), []).append(
                    time_fn(fn, device, min_run_time=min_run_time).median_ms)
    return samples


def log_samples(where: str, samples) -> None:
    log_stderr(f"{where}: " + ", ".join(f"{k[0]} {k[1]} {statistics.median(v):.3f} ms" for k, v in samples.items()))


def setting_pairs(rows, first: str, second: str):
    """``(shape, mode, row of first, row of second)`` for each (shape, mode) of an interleaved-rounds
    script's rows where both settings (the rows' ``provider``) were measured, in the rows' order."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["shape"], r["mode"]), {})[r["provider"]] = r
    for (shape, mode), per in by.items():
        if first in per and second in per:
            yield shape, mode, per[first], per[second]


def write_script_results(rows, out: str, stem: str, markdown: str) -> None:
    """``<out>/<stem>.json`` (``rows``: the rows, or a dict holding them) and ``<stem>.md``
    (``markdown``), which is also printed."""
    os.makedirs(out, exist_ok=True)
    write_json(rows, os.path.join(out, f"{stem}.json"))
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def add_gate_rounds_args(ap, op: str, mode: str, rounds: int) -> None:
    """The arguments of a script that runs ``benchmarks/bench_gate.py --providers cpu`` in rounds."""
    ap.add_argument("--rounds", type=_args.positive_int, default=rounds)
    ap.add_argument("--op", default=op)
    ap.add_argument("--mode", default=mode)
    ap.add_argument("--shapes", help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    ap.add_argument("--batch-size", type=_args.positive_int, default=8)
    ap.add_argument("--min-run-time", type=_args.positive_float, default=0.5)
    ap.add_argument("--threads", type=_args.positive_int, default=None,
                    help="OMP threads of the runs (default: torch's)")
    ap.add_argument("--channels-last", action="store_true", help="inputs in channels_last")


def gate_rounds(labels: Sequence[str], args, run_spec: Callable[[str], Tuple[str, dict, Optional[str]]],
                check_row: Optional[Callable[[str, dict], Optional[str]]] = None) -> List[dict]:
    """``benchmarks/bench_gate.py --providers cpu`` once per (round, label) of ``args.rounds`` rounds,
    each in a process of its own, the labels taking turns in an order that alternates between rounds.
    ``run_spec(label)`` gives the script to run, its environment and its working folder; ``check_row``
    an error message for a row that did not run as the label asked (or None). Returns the rows, each
    with ``round`` and ``label`` added; raises :class:`BenchError` when a run fails."""
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label in (labels if r % 2 == 0 else list(reversed(labels))):
                script, env, cwd = run_spec(label)
                name = f"r{r}_{label}"
                cmd = [sys.executable, script, "--providers", "cpu", "--device", "cpu", "--op", args.op, "--mode",
                       args.mode, "--batch-size", str(args.batch_size), "--min-run-time", str(args.min_run_time),
                       "--out", tmp, "--name", name]
                if args.shapes:
                    cmd += ["--shapes", args.shapes]
                if args.channels_last:
                    cmd.append("--channels-last")
                if args.threads:
                    env = dict(env, OMP_NUM_THREADS=str(args.threads))
                log_stderr(f"round {r + 1}/{args.rounds}: {label}")
                proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
                if proc.returncode != 0:
                    raise BenchError(f"{label}, round {r + 1}: bench_gate.py failed:\n{proc.stdout[-4000:]}")
                with open(os.path.join(tmp, f"{name}.json")) as f:
                    got = json.load(f)
                for row in (got["rows"] if isinstance(got, dict) else got):
                    problem = check_row(label, row) if check_row else None
                    if problem:
                        raise BenchError(problem)
                    row.update(round=r, label=label)
                    rows.append(row)
    return rows


def rounds_by_label(rows: List[dict]) -> Dict[Tuple[str, str, str, str], Dict[str, List[float]]]:
    """The rows' median times grouped by (op, mode, shape, dtype), then by label, in round order."""
    times: Dict[Tuple[str, str, str, str], Dict[str, List[float]]] = {}
    for row in rows:
        key = (row["op"], row["mode"], row["shape"], row["dtype"])
        times.setdefault(key, {}).setdefault(row["label"], []).append(row["median_ms"])
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def bench_environment():
    """No NaN poisoning of kernel outputs while timing (it adds a pass); restored afterwards."""
    old = os.environ.get("SCNET_FUSED_POISON")
    os.environ["SCNET_FUSED_POISON"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SCNET_FUSED_POISON", None)
        else:
            os.environ["SCNET_FUSED_POISON"] = old


def raise_compile_limits() -> None:
    """Each shape gets its own compiled graph: keep dynamo from falling back to eager after 8 of them."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 512))


def _compiled(f, **kwargs):
    """torch.compile(f, **kwargs) with the compile limits raised (dynamo is imported only here: runs
    without a compile provider do not pay its import)."""
    raise_compile_limits()
    return torch.compile(f, **kwargs)


def _reset_compiled() -> None:
    """Drops dynamo's compiled graphs, if dynamo was ever imported."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    faults_per_call: Optional[float] = None  # CPU: minor page faults per timed call
    rounds: int = 1


def combine_rounds(ts: Sequence["Timing"]) -> "Timing":
    """One Timing from several rounds of the same measurement: the median of the rounds' medians,
    the lowest p20 and highest p80 (the spread over all rounds), runs and faults over all of them."""
    if len(ts) == 1:
        return ts[0]
    faults = [t.faults_per_call for t in ts if t.faults_per_call is not None]
    return Timing(_quantile([t.median_ms for t in ts], 0.5), min(t.p20_ms for t in ts), max(t.p80_ms for t in ts),
                  sum(t.runs for t in ts), sum(faults) / len(faults) if faults else None, len(ts))


def _quantile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def cycle(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs ``fns`` in turn (rotating input sets)."""
    if len(fns) == 1:
        return fns[0]
    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] = i + 1 if i + 1 < len(fns) else 0
        return fns[i]()

    return step


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        est = max(int(rep_ms / max(med, 1e-3)), 1)
        return Timing(float(med), float(p20), float(p80), est)
    # CUDA events around each run, after a warm-up.
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(int(warmup_ms / one), 1)):
        fn()
    n = max(int(rep_ms / one), 5)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    torch.cuda.synchronize()
    for i in range(n):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8), n)


def time_cpu(fn: Callable[[], object], min_run_time: float = 0.5, threads: Optional[int] = None) -> Timing:
    from torch.utils.benchmark import Timer

    threads = threads or torch.get_num_threads()
    calls = [0]

    def counted():
        calls[0] += 1
        return fn()

    f0 = minor_faults()
    m = Timer(stmt="fn()", globals={"fn": counted}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time)
    f1 = minor_faults()
    times = [t * 1e3 for t in m.times]
    faults = (f1 - f0) / calls[0] if f0 is not None and f1 is not None and calls[0] else None
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8),
                  int(m.number_per_run * len(m.times)), faults)


def time_fn(fn: Callable[[], object], device: torch.device, *, min_run_time: float = 0.5,
            threads: Optional[int] = None, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    if device.type == "cuda":
        return time_cuda(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return time_cpu(fn, min_run_time=min_run_time, threads=threads)


def first_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, synchronized: for a fresh compiled function, the time to first result."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def copy_ceiling_gbps(device: torch.device, nbytes: Optional[int] = None, *, min_run_time: float = 0.5,
                      threads: Optional[int] = None) -> float:
    """Copy bandwidth of this device (bytes read plus bytes written per second), in GB/s."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, min_run_time=min_run_time, threads=threads)
    gbps = 2 * n * 4 / (t.median_ms * 1e-3) / 1e9
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return gbps


def rotation_target_bytes(device: torch.device) -> int:
    """Total size the rotated input sets should exceed: twice the L2 on a GPU, 64 MB on a CPU."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
        return max(2 * int(l2), 100 << 20)
    return 64 << 20


def n_sets_for(set_bytes: int, device: torch.device, max_sets: int = 16) -> int:
    return int(min(max(math.ceil(rotation_target_bytes(device) / max(set_bytes, 1)), 1), max_sets))


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (st.device.type, st.data_ptr()), st.nbytes()
    except Exception:  # tensors without storage (wrapper subclasses)
        return None, 0


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of unique storages saved for backward while ``fn`` runs, not counting ``exclude``."""
    skip = set()
    for t in exclude:
        if isinstance(t, torch.Tensor):
            key, _ = _storage_key(t)
            if key is not None:
                skip.add(key)
    seen: Dict[object, int] = {}

    def pack(t):
        key, nb = _storage_key(t)
        if key is not None and key not in skip:
            seen[key] = nb
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return int(sum(seen.values()))


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """CUDA bytes allocated by one call above what was live before it; None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


# ------------------------------------------------------------------------------------------------
# Byte and FLOP model (shared/PERF.md)
# ------------------------------------------------------------------------------------------------

# Full-size passes (one read or write of an N x C x H x W tensor) of the fused path (the minimum) and of
# eager PyTorch. Backward of the plain gate: one pass reading dy, x, k3 and writing dx, dk3.
PASSES = {
    ("gate", "forward"): (3, 9),
    ("gate", "backward"): (5, 12),
    ("gate", "full"): (8, 21),
    ("gate_bn", "forward"): (4, 12),
    ("gate_bn", "backward"): (8, 14),
    ("gate_bn", "full"): (12, 26),
    # the k2 average pool: read x (write 1/r^2) forward, write dx (read 1/r^2) backward; ATen moves the same
    ("avgpool", "forward"): (1, 1),
    ("avgpool", "backward"): (1, 1),
    ("avgpool", "full"): (2, 2),
    # training BatchNorm + ReLU: statistics (1) + normalise-and-ReLU (2) forward; sums (2) + dt (3)
    # backward. Eager: batch_norm (3) + relu (2); relu backward (3) + BatchNorm backward (5).
    ("bn_relu", "forward"): (3, 5),
    ("bn_relu", "backward"): (5, 8),
    ("bn_relu", "full"): (8, 13),
    # BatchNorm + residual addition + ReLU (a bottleneck's end): statistics (1) + one pass reading t and
    # the residual and writing y (3) forward; backward one pass reading dy, y, t and writing g (the
    # residual's gradient) with the sums (4) + dt from g and t (3). The CPU's channel-by-channel path
    # re-reads g and t from cache (5 from memory); the Triton and CUDA backward, and the CPU's
    # channels_last one, write g in a pass of its own and read it again for the sums (8). Eager:
    # batch_norm (3) + add (3) + relu (2); relu backward (3) + BatchNorm backward (5).
    ("bn_add_relu", "forward"): (4, 8),
    ("bn_add_relu", "backward"): (7, 8),
    ("bn_add_relu", "full"): (11, 16),
}
# FLOPs per element (exp counted as one): add, sigmoid (neg, exp, add, div), mul; BN adds an FMA
# and the statistics (2); backward recomputes the sigmoid and forms dx, dk3 (and the BN sums).
FLOPS_PER_ELEMENT = {
    ("gate", "forward"): 6, ("gate", "backward"): 11, ("gate", "full"): 17,
    ("gate_bn", "forward"): 10, ("gate_bn", "backward"): 20, ("gate_bn", "full"): 30,
    ("avgpool", "forward"): 1, ("avgpool", "backward"): 1, ("avgpool", "full"): 2,
    ("bn_relu", "forward"): 5, ("bn_relu", "backward"): 9, ("bn_relu", "full"): 14,
    ("bn_add_relu", "forward"): 6, ("bn_add_relu", "backward"): 9, ("bn_add_relu", "full"): 15,
}


def pooled_hw(H: int, W: int, r: int = POOLING_R) -> Tuple[int, int]:
    return H // r, W // r


def gate_model(op: str, mode: str, N: int, C: int, H: int, W: int, itemsize: int,
               r: int = POOLING_R) -> Dict[str, int]:
    """Minimum bytes, eager-path bytes and FLOPs of one gate op call in ``mode``."""
    fused, eager = PASSES[(op, mode)]
    full = N * C * H * W
    h, w = pooled_hw(H, W, r)
    small = N * C * h * w
    # pooled map: read in the forward; read and its gradient written in the backward (the pool:
    # written in the forward, its gradient read in the backward)
    if op in ("bn_relu", "bn_add_relu"):
        small_passes = 0
    elif op == "avgpool":
        small_passes = {"forward": 1, "backward": 1, "full": 2}[mode]
    else:
        small_passes = {"forward": 1, "backward": 2, "full": 3}[mode]
    return {
        "passes": fused,
        "eager_passes": eager,
        "bytes": (fused * full + small_passes * small) * itemsize,
        "eager_bytes": (eager * full + small_passes * small) * itemsize,
        "flops": FLOPS_PER_ELEMENT[(op, mode)] * full,
    }


def conv_flops(N: int, C_in: int, C_out: int, H: int, W: int, k: int = 3, groups: int = 1) -> int:
    return 2 * N * H * W * C_out * (C_in // groups) * k * k


def scconv_flops(N: int, C: int, H: int, W: int, stride: int = 1, r: int = POOLING_R) -> int:
    """Forward FLOPs of the three convolutions of an SCConv (the gate is negligible next to them)."""
    h, w = pooled_hw(H, W, r)
    Ho, Wo = (H + stride - 1) // stride, (W + stride - 1) // stride
    return conv_flops(N, C, C, H, W) + conv_flops(N, C, C, h, w) + conv_flops(N, C, C, Ho, Wo)


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------


def fused_modules_reason() -> Optional[str]:
    """None when the fused SCConv / SCBottleneck modules are importable, else why not."""
    try:
        import scnet_fused as pkg
        from . import reference
    except Exception as exc:  # pragma: no cover
        return f"scnet_fused does not import ({type(exc).__name__}: {exc})"
    for name in ("SCConv", "SCBottleneck"):
        cls = getattr(pkg, name, None)
        if cls is None:
            return f"scnet_fused.{name} (the fused module) is not available in this build"
        if cls is getattr(reference, name):
            return f"scnet_fused.{name} is the reference module, not a fused one"
    return None


def fused_backend_reason(name: str, device: torch.device) -> Optional[str]:
    from .ops import _dispatch

    why = _dispatch.available(name)
    if why is not None:
        return why
    return _dispatch._device_ok(name, device)


def auto_fused_backend(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The fused backend the ``auto`` choice uses for these tensors, or None when it would fall back."""
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in order:
        if fused_backend_reason(name, device) is None:
            return name
    return None


def provider_reason(provider: str, device: torch.device, dtype: torch.dtype, level: str = "op") -> Optional[str]:
    """None when ``provider`` can run at ``level`` ('op', 'module', 'model') on ``device``, else why not."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})"
    if provider == "eager":
        return None
    if provider == "compile":
        return None
    if level in ("module", "model"):
        why = fused_modules_reason()
        if why:
            return why
    if provider == "compile_fused":
        if auto_fused_backend(device, dtype) is None:
            return f"no fused backend for {device.type} tensors"
        return None
    if provider == "triton" and device.type == "cpu":
        why = fused_backend_reason("triton", device)
        if why is None:
            return None
        return "triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1, far too slow to time)"
    return fused_backend_reason(provider, device)


def default_providers(device: torch.device, dtype: torch.dtype, level: str = "op") -> List[str]:
    out = []
    for p in PROVIDERS:
        if p == "triton" and device.type == "cpu":
            continue  # interpreted Triton is a correctness tool, not something to time
        if provider_reason(p, device, dtype, level) is None:
            out.append(p)
    return out


@contextlib.contextmanager
def provider_context(provider: str):
    from .ops import backend

    if provider in FUSED_BACKENDS:
        with backend(provider):
            yield
    else:
        yield


def _wrap_ctx(provider: str, fn: Callable[[], object]) -> Callable[[], object]:
    if provider not in FUSED_BACKENDS:
        return fn

    def run():
        with provider_context(provider):
            return fn()

    return run


# ------------------------------------------------------------------------------------------------
# Op level: the gate and the BN-training gate
# ------------------------------------------------------------------------------------------------


def eager_gate(x: torch.Tensor, small: torch.Tensor, k3: torch.Tensor) -> torch.Tensor:
    return k3 * torch.sigmoid(x + F.interpolate(small, size=x.shape[-2:], mode="nearest"))


def eager_gate_bn(x, small, k3, weight, bias, eps: float = 1e-5):
    k = F.batch_norm(k3, None, None, weight, bias, training=True, momentum=0.1, eps=eps)
    return eager_gate(x, small, k)


def eager_gate_bn2(x, small, k3, weight, bias, small_weight, small_bias, eps: float = 1e-5):
    s = F.batch_norm(small, None, None, small_weight, small_bias, training=True, momentum=0.1, eps=eps)
    return eager_gate_bn(x, s, k3, weight, bias, eps)


def eager_avgpool(x):
    return F.avg_pool2d(x, POOLING_R, POOLING_R)


def fused_avgpool(x):
    from .ops import sc_avgpool

    return sc_avgpool(x, POOLING_R)


def eager_bn_relu(t, weight, bias, eps: float = 1e-5):
    return F.relu(F.batch_norm(t, None, None, weight, bias, training=True, momentum=0.1, eps=eps))


def fused_bn_relu(t, weight, bias, eps: float = 1e-5):
    from .ops.bn_relu import bn_relu_train

    return bn_relu_train(t, weight, bias, eps)[0]


def eager_bn_add_relu(t, weight, bias, residual, eps: float = 1e-5):
    return F.relu(F.batch_norm(t, None, None, weight, bias, training=True, momentum=0.1, eps=eps) + residual)


def fused_bn_add_relu(t, weight, bias, residual, eps: float = 1e-5):
    from .ops.bn_relu import bn_add_relu_train

    return bn_add_relu_train(t, weight, bias, residual, eps)[0]


def cat_branch_channels(C: int) -> int:
    """Channels of the second branch in the bn_relu_cat check and benchmark inputs (unequal halves)."""
    return C // 2 + 1


def eager_bn_relu_cat(ta, wa, ba, tb, wb, bb, eps: float = 1e-5):
    return torch.cat([eager_bn_relu(ta, wa, ba, eps), eager_bn_relu(tb, wb, bb, eps)], dim=1)


def fused_bn_relu_cat(ta, wa, ba, tb, wb, bb, eps: float = 1e-5):
    from .ops.bn_relu import bn_relu_cat_train

    return bn_relu_cat_train(ta, wa, ba, tb, wb, bb, eps, eps)[0]


def fused_gate(x, small, k3):
    from .ops import sc_gate

    return sc_gate(x, small, k3)


def fused_gate_bn(x, small, k3, weight, bias, eps: float = 1e-5):
    from .ops import sc_gate_bn_train

    return sc_gate_bn_train(x, small, k3, weight, bias, eps)[0]


def fused_gate_bn2(x, small, k3, weight, bias, small_weight, small_bias, eps: float = 1e-5):
    from .ops import sc_gate_bn2_train

    return sc_gate_bn2_train(x, small, k3, weight, bias, eps, small_weight, small_bias, eps)[0]


def make_gate_inputs(op: str, N: int, C: int, H: int, W: int, dtype: torch.dtype, device: torch.device,
                     channels_last: bool = False, requires_grad: bool = True, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h, w = pooled_hw(H, W)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
        if channels_last and len(shape) == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(requires_grad)

    if op == "avgpool":
        return (rnd(N, C, H, W),)
    def bn_branch(c):
        t = rnd(N, c, H, W)
        weight = (1 + 0.1 * torch.randn(c, generator=g)).to(device=device, dtype=torch.float32)
        bias = (0.1 * torch.randn(c, generator=g)).to(device=device, dtype=torch.float32)
        if dtype != torch.float32:  # as gate_bn: eager batch_norm takes one dtype on the CPU
            weight, bias = weight.to(dtype), bias.to(dtype)
        return (t, weight.requires_grad_(requires_grad), bias.requires_grad_(requires_grad))

    if op == "bn_relu":
        return bn_branch(C)
    if op == "bn_add_relu":
        return bn_branch(C) + (rnd(N, C, H, W),)
    if op == "bn_relu_cat":
        return bn_branch(C) + bn_branch(cat_branch_channels(C))
    x, small, k3 = rnd(N, C, H, W), rnd(N, C, h, w), rnd(N, C, H, W)
    if op == "gate":
        return (x, small, k3)

    def affine():
        weight = (1 + 0.1 * torch.randn(C, generator=g)).to(device=device, dtype=torch.float32)
        bias = (0.1 * torch.randn(C, generator=g)).to(device=device, dtype=torch.float32)
        if dtype != torch.float32:
            weight, bias = weight.to(dtype), bias.to(dtype)
        return (weight.requires_grad_(requires_grad), bias.requires_grad_(requires_grad))

    # gate_bn2: the pooled map's BatchNorm too (weight and bias after k3's)
    return (x, small, k3) + affine() + (affine() if op == "gate_bn2" else ())


def _gate_callable(op: str, provider: str, compiled: Dict[str, Callable]) -> Callable:
    base = {"gate": (eager_gate, fused_gate), "gate_bn": (eager_gate_bn, fused_gate_bn),
            "avgpool": (eager_avgpool, fused_avgpool), "bn_relu": (eager_bn_relu, fused_bn_relu),
            "bn_add_relu": (eager_bn_add_relu, fused_bn_add_relu)}[op]
    if provider == "eager":
        return base[0]
    if provider == "compile":
        if "compile" not in compiled:
            compiled["compile"] = _compiled(base[0], dynamic=False)
        return compiled["compile"]
    if provider == "compile_fused":
        if "compile_fused" not in compiled:
            compiled["compile_fused"] = _compiled(base[1], dynamic=False)
        return compiled["compile_fused"]
    return base[1]


def _grad_inputs(args):
    return tuple(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class Harness:
    """Holds the run's settings, its measured copy ceiling and the rows measured so far."""

    device: torch.device = field(default_factory=best_device)
    dtype: torch.dtype = torch.float32
    batch_size: int = 8
    min_run_time: float = 0.5
    threads: Optional[int] = None
    warmup_ms: float = 25
    rep_ms: float = 100
    progress: Optional[Callable[[str], None]] = None
    rows: List[dict] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    ceiling_gbps: Optional[float] = None
    on_row: Optional[Callable[[List[dict]], None]] = None
    rounds: Optional[int] = None  # module rows: timing rounds per provider, order alternating

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.rounds is None:  # module rows: two interleaved rounds on a (noisy, shared) CPU
            self.rounds = 2 if self.device.type == "cpu" else 1
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("a CUDA device was asked for but torch.cuda.is_available() is False")
        if self.device.type == "cpu":
            if self.threads:
                torch.set_num_threads(self.threads)
            self.threads = torch.get_num_threads()
        if self.batch_size < 1:
            raise BenchError(f"batch size must be >= 1, got {self.batch_size}")
        self._device_name = device_name(self.device)
        self._versions = versions()

    # -- helpers --
    def log(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)

    def time(self, fn: Callable[[], object]) -> Timing:
        return time_fn(fn, self.device, min_run_time=self.min_run_time, threads=self.threads,
                       warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)

    def _time_interleaved(self, jobs: Sequence[Tuple[str, Callable[[], object]]], label: str) -> Dict[str, Timing]:
        """Time the providers of one row group in ``rounds`` rounds, alternating their order (A B, then
        B A, ...), so that a slow spell of a shared machine or the state one provider leaves behind
        does not land on one provider only; a provider's row combines its rounds (:func:`combine_rounds`)."""
        samples: Dict[str, List[Timing]] = {prov: [] for prov, _ in jobs}
        failed: set = set()
        for r in range(max(1, self.rounds or 1)):
            for prov, fn in (jobs if r % 2 == 0 else list(reversed(jobs))):
                if prov in failed:
                    continue
                try:
                    samples[prov].append(self.time(fn))
                except Exception as exc:
                    failed.add(prov)
                    self._skip(f"{label} {prov}", f"{type(exc).__name__}: {exc}")
        return {prov: combine_rounds(ts) for prov, ts in samples.items() if ts and prov not in failed}

    def measure_ceiling(self) -> float:
        if self.ceiling_gbps is None:
            self.log("measuring copy bandwidth (the ceiling)...")
            self.ceiling_gbps = copy_ceiling_gbps(self.device, min_run_time=self.min_run_time, threads=self.threads)
            self.log(f"copy bandwidth: {self.ceiling_gbps:.1f} GB/s")
        return self.ceiling_gbps

    def _row(self, **kw) -> dict:
        row = {k: None for k in ROW_KEYS}
        row.update(device=self._device_name, versions=self._versions, dtype=dtype_name(self.dtype))
        if self.device.type == "cpu":
            row["loadavg_1m"] = load_average()
            row["allocator"] = _allocator_note or pin_cpu_allocator(pin=False)
        row.update(kw)
        if row.get("bytes") and row.get("median_ms"):
            row["gbps"] = row["bytes"] / (row["median_ms"] * 1e-3) / 1e9
            if self.ceiling_gbps:
                row["pct_of_ceiling"] = 100.0 * row["gbps"] / self.ceiling_gbps
                row["ceiling_gbps"] = self.ceiling_gbps
        return row

    def _add_group(self, group: List[dict]) -> None:
        if not group:
            return
        add_speedups(group)
        for r in group:
            self.log(format_progress(r))
        self.rows.extend(group)
        if self.on_row is not None:
            self.on_row(self.rows)

    def _skip(self, what: str, why: str) -> None:
        msg = f"skip {what}: {why}"
        self.skipped.append(msg)
        self.log(msg)

    def _providers(self, providers: Optional[Sequence[str]], level: str) -> List[str]:
        if providers is None:
            return default_providers(self.device, self.dtype, level)
        out = []
        for p in providers:
            why = provider_reason(p, self.device, self.dtype, level)
            if why:
                self._skip(f"{level} provider {p}", why)
            else:
                out.append(p)
        return out

    # -- op level --
    def run_op(self, op: str, shape: Sequence[int], modes: Sequence[str] = OP_MODES,
               providers: Optional[Sequence[str]] = None, channels_last: bool = False) -> List[dict]:
        if op not in OPS:
            raise BenchError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
        for m in modes:
            if m not in OP_MODES:
                raise BenchError(f"unknown op mode {m!r}; choose from {', '.join(OP_MODES)}")
        self.measure_ceiling()
        C, H, W = (int(s) for s in shape)
        N = self.batch_size
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        provs = self._providers(providers, "op")
        model_full = gate_model(op, "full", N, C, H, W, itemsize)
        # one set: inputs + output + dy + gradients, about model_full passes
        n_sets = n_sets_for(model_full["eager_bytes"], self.device)
        sets = [make_gate_inputs(op, N, C, H, W, self.dtype, self.device, channels_last, seed=i)
                for i in range(n_sets)]
        out_hw = pooled_hw(H, W) if op == "avgpool" else (H, W)
        dys = [torch.randn(N, C, *out_hw, device=self.device, dtype=self.dtype) for _ in range(n_sets)]
        if channels_last:
            dys = [d.contiguous(memory_format=torch.channels_last) for d in dys]
        groups: Dict[str, List[dict]] = {m: [] for m in modes}
        _reset_compiled()
        compiled: Dict[str, Callable] = {}
        for prov in provs:
            f = _gate_callable(op, prov, compiled)
            try:
                with provider_context(prov):
                    first = first_call_ms(lambda: f(*sets[0]), self.device)
                    saved = saved_tensor_bytes(lambda: f(*sets[0]), exclude=sets[0])
            except Exception as exc:
                self._skip(f"{op} {shape_str((N, C, H, W))} {prov}", f"{type(exc).__name__}: {exc}")
                continue
            for mode in modes:
                try:
                    with provider_context(prov):  # a backward row's forward too: its backward runs there
                        fns = self._op_fns(f, mode, sets, dys)
                    fn = _wrap_ctx(prov, cycle(fns))
                    t = self.time(fn)
                    pk = peak_memory(_wrap_ctx(prov, fns[0]), self.device)
                except Exception as exc:
                    self._skip(f"{op} {mode} {shape_str((N, C, H, W))} {prov}", f"{type(exc).__name__}: {exc}")
                    continue
                model = gate_model(op, mode, N, C, H, W, itemsize)
                groups[mode].append(self._row(
                    op=op, provider=prov, mode=mode, shape=shape_str((N, C, H, W)),
                    median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, bytes=model["bytes"],
                    flops=model["flops"], passes=model["passes"], eager_passes=model["eager_passes"],
                    peak_mem=pk, saved_bytes=saved, first_ms=first, runs=t.runs, input_sets=n_sets,
                    faults_per_call=t.faults_per_call,
                    channels_last=channels_last, backend=self._backend_of(prov), level="op"))
        out = []
        for mode in modes:
            self._add_group(groups[mode])
            out.extend(groups[mode])
        del sets, dys
        return out

    def _backend_of(self, prov: str) -> Optional[str]:
        if prov in FUSED_BACKENDS:
            return prov
        if prov == "compile_fused":
            return auto_fused_backend(self.device, self.dtype)
        return None

    @staticmethod
    def _op_fns(f: Callable, mode: str, sets, dys) -> List[Callable[[], object]]:
        fns = []
        for args, dy in zip(sets, dys):
            gin = _grad_inputs(args)
            if mode == "forward":
                fns.append(lambda f=f, args=args: f(*args))
            elif mode == "full":
                def full(f=f, args=args, gin=gin, dy=dy):
                    return torch.autograd.grad(f(*args), gin, dy)
                fns.append(full)
            else:
                y = f(*args)

                def bwd(y=y, gin=gin, dy=dy):
                    return torch.autograd.grad(y, gin, dy, retain_graph=True)
                fns.append(bwd)
        return fns

    # -- module level --
    def run_module(self, module: str, shape: Sequence[int], modes: Sequence[str] = MODULE_MODES,
                   providers: Optional[Sequence[str]] = None, channels_last: bool = False,
                   amp: Optional[torch.dtype] = None) -> List[dict]:
        """SCConv (input C x H x W) or SCBottleneck (width C: input 8C x H x W) train step / eval forward.

        With ``amp`` the module runs in float32 under autocast to that dtype (``self.dtype`` is ignored).
        """
        if module not in MODULES:
            raise BenchError(f"unknown module {module!r}; choose from {', '.join(MODULES)}")
        for m in modes:
            if m not in MODULE_MODES:
                raise BenchError(f"unknown module mode {m!r}; choose from {', '.join(MODULE_MODES)}")
        C, H, W = (int(s) for s in shape)
        N = self.batch_size
        provs = self._providers(providers, "module")
        ref = build_module(module, C, fused=False).to(self.device)
        cin = C if module == "scconv" else 8 * C
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        ref = ref.to(memory_format=fmt)
        in_dtype = self.dtype if amp is None else torch.float32
        ref = ref.to(in_dtype)
        itemsize = torch.empty((), dtype=in_dtype).element_size()
        set_bytes = 6 * N * cin * H * W * itemsize
        n_sets = n_sets_for(set_bytes, self.device, max_sets=8)
        g = torch.Generator(device="cpu").manual_seed(0)
        xs = [torch.randn(N, cin, H, W, generator=g).to(self.device, in_dtype).contiguous(memory_format=fmt)
              for _ in range(n_sets)]
        with torch.no_grad():
            ref.eval()  # a batch of one cannot run BatchNorm in training mode
            out_shape = ref(xs[0][:1]).shape[1:]
            ref.train()
        dys = [torch.randn((N,) + tuple(out_shape), generator=g).to(self.device, amp or in_dtype)
               .contiguous(memory_format=fmt) for _ in range(n_sets)]
        flops = scconv_flops(N, C, H, W)
        groups: Dict[str, List[dict]] = {m: [] for m in modes}
        _reset_compiled()
        amp_ctx = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
        built = []
        for prov in provs:
            try:
                fused = prov not in ("eager", "compile")
                m = build_module(module, C, fused=fused, like=ref).to(self.device, in_dtype).to(memory_format=fmt)
                runner = _compiled(m, dynamic=False) if prov in ("compile", "compile_fused") else m
            except Exception as exc:
                self._skip(f"{module} {prov}", f"{type(exc).__name__}: {exc}")
                continue
            built.append((prov, m, runner, [p for p in m.parameters() if p.requires_grad]))
        where = shape_str((N, cin, H, W))
        for mode in modes:
            jobs = []  # (provider, timed callable, first call ms, saved bytes, peak bytes)
            for prov, m, runner, params in built:
                try:
                    if mode == "train":
                        m.train()
                        xg = [x.detach().requires_grad_(True) for x in xs]

                        def make(x, dy, runner=runner, params=params):
                            def step():
                                with amp_ctx():
                                    out = runner(x)
                                return torch.autograd.grad(out, [x] + params, dy.to(out.dtype))
                            return step
                        fns = [make(x, dy) for x, dy in zip(xg, dys)]
                        saved_fn = (lambda runner=runner, x=xg[0]: _amp_call(amp_ctx, runner, x))
                    else:
                        m.eval()
                        xg = xs

                        def make(x, dy, runner=runner):
                            def step():
                                with torch.no_grad(), amp_ctx():
                                    return runner(x)
                            return step
                        fns = [make(x, dy) for x, dy in zip(xg, dys)]
                        saved_fn = None
                    first = first_call_ms(_wrap_ctx(prov, fns[0]), self.device)
                    saved = None
                    if saved_fn is not None:
                        with provider_context(prov):
                            saved = saved_tensor_bytes(saved_fn, exclude=[xg[0]] + list(m.parameters())
                                                       + list(m.buffers()))
                    pk = peak_memory(_wrap_ctx(prov, fns[0]), self.device)
                except Exception as exc:
                    self._skip(f"{module}_{mode} {where} {prov}", f"{type(exc).__name__}: {exc}")
                    continue
                jobs.append((prov, _wrap_ctx(prov, cycle(fns)), first, saved, pk))
            timings = self._time_interleaved([(prov, fn) for prov, fn, _, _, _ in jobs], f"{module}_{mode} {where}")
            for prov, _, first, saved, pk in jobs:
                t = timings.get(prov)
                if t is None:
                    continue
                groups[mode].append(self._row(
                    op=module, provider=prov, mode=mode, shape=where,
                    dtype=dtype_name(in_dtype) if amp is None else f"amp-{dtype_name(amp)}",
                    median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                    flops=flops * (3 if mode == "train" else 1) if module == "scconv" else None,
                    peak_mem=pk, saved_bytes=saved, first_ms=first, runs=t.runs, input_sets=n_sets,
                    faults_per_call=t.faults_per_call, rounds=t.rounds,
                    channels_last=channels_last, backend=self._backend_of(prov), level="module"))
        out = []
        for mode in modes:
            self._add_group(groups[mode])
            out.extend(groups[mode])
        return out

    # -- model level --
    def run_model(self, arch: str = "scnet50", image_size: int = 224, steps: int = 5, warmup: int = 2,
                  providers: Sequence[str] = ("eager", "fused"), channels_last: bool = False,
                  amp: Optional[torch.dtype] = None) -> List[dict]:
        """Training steps of a whole model; providers: eager, fused, compile, compile_fused."""
        group = []
        for prov in providers:
            fused = prov in ("fused", "compile_fused")
            if fused:
                why = fused_modules_reason()
                if why:
                    self._skip(f"model {arch} {prov}", why)
                    continue
            try:
                res = train_benchmark(arch, batch_size=self.batch_size, amp=amp, channels_last=channels_last,
                                      compile=prov.startswith("compile"), fused=fused, steps=steps,
                                      warmup=warmup, image_size=image_size, device=self.device,
                                      progress=self.progress)
            except Exception as exc:
                self._skip(f"model {arch} {prov}", f"{type(exc).__name__}: {exc}")
                continue
            group.append(self._row(
                op=arch, provider=prov, mode="train", shape=shape_str((self.batch_size, 3, image_size, image_size)),
                dtype="fp32" if amp is None else f"amp-{dtype_name(amp)}",
                median_ms=res["median_ms"], p20_ms=res["p20_ms"], p80_ms=res["p80_ms"],
                peak_mem=res["peak_mem"], images_per_s=res["images_per_s"], first_ms=res["first_step_ms"],
                runs=res["steps"], channels_last=channels_last, level="model",
                backend=auto_fused_backend(self.device, torch.float32) if fused else None))
        self._add_group(group)
        return group


def _amp_call(amp_ctx, runner, x):
    with amp_ctx():
        return runner(x)


def add_speedups(group: List[dict]) -> None:
    """``speedup`` = eager median / median, ``speedup_vs_compile`` = compile median / median, per group."""
    by = {r["provider"]: r for r in group}
    eager = by.get("eager")
    comp = by.get("compile")
    for r in group:
        r["speedup"] = eager["median_ms"] / r["median_ms"] if eager and r.get("median_ms") else None
        r["speedup_vs_compile"] = comp["median_ms"] / r["median_ms"] if comp and r.get("median_ms") else None


def format_progress(r: dict) -> str:
    s = f"{r['op']:<10} {r['mode']:<8} {r['shape']:<14} {r['dtype']:<8} {r['provider']:<13} " \
        f"{r['median_ms']:9.3f} ms"
    if r.get("gbps"):
        s += f"  {r['gbps']:8.1f} GB/s"
    if r.get("speedup"):
        s += f"  {r['speedup']:5.2f}x eager"
    return s


# ------------------------------------------------------------------------------------------------
# Modules and models
# ------------------------------------------------------------------------------------------------


def build_module(kind: str, C: int, fused: bool, like: Optional[nn.Module] = None) -> nn.Module:
    """An SCConv(C, C, stride 1) or an SCBottleneck(8C, 2C) (width C), reference or fused, weights of ``like``."""
    from . import reference

    if fused:
        why = fused_modules_reason()
        if why:
            raise BenchError(why)
        import scnet_fused as pkg

        ns = pkg
    else:
        ns = reference
    torch.manual_seed(0)
    if kind == "scconv":
        m = ns.SCConv(C, C, stride=1, padding=1, dilation=1, groups=1, pooling_r=POOLING_R,
                      norm_layer=nn.BatchNorm2d)
    elif kind == "bottleneck":
        m = ns.SCBottleneck(8 * C, 2 * C)
    else:
        raise BenchError(f"unknown module {kind!r}")
    if like is None:
        _randomize_bn(m)
    else:
        m.load_state_dict({k: v.detach().float().cpu() for k, v in like.state_dict().items()})
    return m


def _randomize_bn(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(1 + 0.1 * torch.rand(mod.running_var.shape, generator=g))


MODEL_NAMES = ("scnet50", "scnet101", "scnet50_v1d", "scnet101_v1d")


def build_model(arch: str, fused: bool, num_classes: int = 1000) -> nn.Module:
    if arch not in MODEL_NAMES:
        raise BenchError(f"unknown model {arch!r}; choose from {', '.join(MODEL_NAMES)}")
    if not fused:
        from . import reference

        return getattr(reference, arch)(num_classes=num_classes)
    why = fused_modules_reason()
    try:
        from . import models
    except Exception as exc:
        raise BenchError(f"scnet_fused.models is not available ({type(exc).__name__}: {exc})") from None
    ctor = getattr(models, arch, None)
    if ctor is None:
        raise BenchError(f"scnet_fused.models has no {arch}")
    if why:
        raise BenchError(why)
    return ctor(fused=True, num_classes=num_classes)


def check_train_images(batch_size: int, image_size: int) -> None:
    """A clear error, before any model is built, for images an SCNet cannot train on: the last stage's map
    (ceil(size / 32) px) under the SCConvs' 4x4 average pool, and a batch whose pooled map there leaves
    a training BatchNorm one value per channel (batch 1 below 225 px)."""
    last = -(-image_size // 32)
    if last < 4:
        raise BenchError(f"image size {image_size} is too small for SCNet: the last stage's map would be "
                         f"{last} px, below the 4 px its SCConvs pool to one (need >= 97)")
    if batch_size * (last // 4) ** 2 < 2:
        raise BenchError(f"batch size {batch_size} at {image_size} px leaves the last stage's pooled map "
                         f"{last // 4}x{last // 4}: one value per channel, which a training BatchNorm cannot "
                         "normalise; use a batch of at least 2 or images of at least 225 px")


def train_benchmark(arch: str = "scnet50", batch_size: int = 32, amp: Optional[torch.dtype] = None,
                    channels_last: bool = False, compile: bool = False, fused: bool = True, steps: int = 10,
                    warmup: int = 2, image_size: int = 224, device: Optional[torch.device] = None,
                    num_classes: int = 1000, lr: Optional[float] = None, distributed: bool = False,
                    progress: Optional[Callable[[str], None]] = None) -> dict:
    """Synthetic-data SGD training of an SCNet: images/s, step-time quantiles, peak memory, first step.

    Every step trains on the same random batch, so the loss falls as the model fits it: a check that
    the run trains, next to its speed. ``lr`` defaults to the published recipe's 0.1 at 256 images
    scaled linearly to the global batch (0.1 * world * batch_size / 256); at 0.1 a batch of a few
    images made the losses grow chaotically instead.
    """
    device = torch.device(device) if device is not None else best_device()
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise BenchError("batch size and steps must be >= 1 and warmup >= 0")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise BenchError(f"the learning rate must be a positive number, got {lr}")
    check_train_images(batch_size, image_size)
    torch.manual_seed(0)
    model = build_model(arch, fused, num_classes).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    world = 1
    if distributed:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        world = dist.get_world_size()
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    runner = _compiled(model) if compile else model
    if lr is None:
        lr = 0.1 * world * batch_size / 256
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    use_scaler = amp == torch.float16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device).contiguous(memory_format=fmt)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        if amp is not None:
            with torch.autocast(device.type, dtype=amp):
                loss = loss_fn(runner(images), labels)
        else:
            loss = loss_fn(runner(images), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    loss = step()
    sync(device)
    first = (time.perf_counter() - t0) * 1e3
    first_loss = float(loss.item())
    if progress:
        progress(f"{arch} first step {first:.0f} ms (loss {loss.item():.3f})")
    for _ in range(warmup):
        step()
    times = []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    med = _quantile(times, 0.5)
    return {"model": arch, "fused": fused, "compile": compile, "batch_size": batch_size, "world_size": world,
            "amp": dtype_name(amp) if amp is not None else "none", "channels_last": channels_last,
            "image_size": image_size, "steps": steps, "median_ms": med, "p20_ms": _quantile(times, 0.2),
            "p80_ms": _quantile(times, 0.8), "images_per_s": world * batch_size / (med * 1e-3),
            "first_step_ms": first, "peak_mem": peak, "lr": lr, "first_loss": first_loss,
            "final_loss": float(loss.item()),
            "device": device_name(device), "versions": versions()}


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o)
    if isinstance(o, torch.device):
        return str(o)
    return repr(o)


def write_json(rows: List[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def _fmt(v, spec: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _mb(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def markdown_table(rows: List[dict], title: Optional[str] = None, notes: Sequence[str] = ()) -> str:
    lines = []
    if title:
        lines += [f"# {title}", ""]
    if rows:
        r0 = rows[0]
        v = r0.get("versions") or {}
        lines.append(f"Device: {r0.get('device')}; torch {v.get('torch')}, triton {v.get('triton')}, "
                     f"CUDA {v.get('cuda')}, Python {v.get('python')}.")
        ceil = next((r.get("ceiling_gbps") for r in rows if r.get("ceiling_gbps")), None)
        if ceil:
            lines.append(f"Measured copy bandwidth (the ceiling): {ceil:.1f} GB/s.")
        loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
        if loads:
            lines.append(f"1-minute load average while measuring: {min(loads):.1f} to {max(loads):.1f}.")
        allocs = list(dict.fromkeys(r["allocator"] for r in rows if r.get("allocator")))
        if allocs:
            lines.append(f"Allocator: {'; '.join(allocs)}.")
        rounds = sorted({r["rounds"] for r in rows if (r.get("rounds") or 1) > 1})
        if rounds:
            lines.append(f"Module rows: {'/'.join(map(str, rounds))} timing rounds per provider in alternating "
                         f"order; median of the rounds' medians, p20-p80 over all rounds.")
        lines.append("")
    lines.append("| op | mode | shape | dtype | provider | median ms | p20-p80 ms | GB/s | % ceiling "
                 "| vs eager | vs compile | saved MiB | peak MiB | first call ms | faults/call |")
    lines.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        extra = ""
        if r.get("images_per_s"):
            extra = f" ({r['images_per_s']:.1f} img/s)"
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['shape']}{' CL' if r.get('channels_last') else ''} | {r['dtype']} "
            f"| {r['provider']}{'/' + r['backend'] if r.get('backend') and r['provider'] == 'compile_fused' else ''} "
            f"| {_fmt(r['median_ms'], '.3f')}{extra} | {_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')} "
            f"| {_fmt(r.get('gbps'), '.1f')} | {_fmt(r.get('pct_of_ceiling'), '.1f')} "
            f"| {_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('speedup_vs_compile'), '.2f')} "
            f"| {_mb(r.get('saved_bytes'))} | {_mb(r.get('peak_mem'))} | {_fmt(r.get('first_ms'), '.0f')} "
            f"| {_fmt(r.get('faults_per_call'), '.0f')} |")
    if notes:
        lines += ["", "Not measured:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_markdown(rows: List[dict], path: str, title: Optional[str] = None, notes: Sequence[str] = ()) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(markdown_table(rows, title, notes))
    return path


def write_plot(rows: List[dict], path: str, title: Optional[str] = None) -> Optional[str]:
    """Speedup over eager per shape and provider, one panel per (op, mode, dtype); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    panels: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r.get("speedup") is None:
            continue
        panels.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    if not panels:
        return None
    n = len(panels)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (key, prs) in zip(axes.flat, panels.items()):
        shapes = list(dict.fromkeys(r["shape"] for r in prs))
        provs = list(dict.fromkeys(r["provider"] for r in prs))
        width = 0.8 / max(len(provs), 1)
        for i, p in enumerate(provs):
            ys = []
            for s in shapes:
                m = [r["speedup"] for r in prs if r["provider"] == p and r["shape"] == s]
                ys.append(m[0] if m else 0.0)
            ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(shapes))], ys, width, label=p)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs eager")
        ax.set_title(" / ".join(key), fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rows: List[dict], out_dir: str, name: str = "results", title: Optional[str] = None,
                  notes: Sequence[str] = (), plot: bool = True) -> Dict[str, Optional[str]]:
    """``<out_dir>/<name>.json``, ``.md`` and ``.png``."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    out = {"json": write_json(rows, base + ".json"), "md": write_markdown(rows, base + ".md", title, notes)}
    if plot:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["png"] = write_plot(rows, base + ".png", title)
    return out


def default_out_dir(device: torch.device) -> str:
    return os.path.join("benchmarks", "results", device_tag(device))


def today() -> str:
    return datetime.date.today().isoformat()


def stage_shapes(quick: bool = False) -> Tuple[Tuple[int, int, int], ...]:
    return QUICK_SHAPES if quick else STAGE_SHAPES


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
