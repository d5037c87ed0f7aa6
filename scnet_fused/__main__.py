"""Command line: ``python -m scnet_fused {bench,train-bench,check,info}`` (also ``scnet-fused``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional, Sequence

from . import _args

PROG = "scnet-fused"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


_positive_int = _args.positive_int
_nonneg_int = _args.nonneg_int
_positive_float = _args.positive_float


def _device(text: str):
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu or cuda[:index])") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (use cpu or cuda[:index])")
    return dev


def _resolve_device(dev):
    import torch

    from . import bench

    if dev is None:
        return bench.best_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was given but no CUDA device is available (torch.cuda.is_available() is False)")
    return dev


def _err(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------

_BENCH_OPS = ("gate", "gate_bn", "avgpool", "bn_relu", "bn_add_relu", "scconv", "bottleneck", "model")


def _check_writable_dir(path: str, what: str) -> None:
    """Create ``path`` if needed and make sure files can be written there, before any measurement."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"{what} {path}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {path}: the folder is not writable")
    try:  # a file made and removed there: os.access says yes to root on folders no file can be made in
        fd, probe = tempfile.mkstemp(dir=path, prefix=".scnet-fused-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CLIError(f"{what} {path}: cannot create a file there ({exc.strerror or exc})") from None


def _three_digits(v: float) -> str:
    """A rate with three significant digits, also below 1 (0.0431, not 0.0)."""
    return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def _check_writable_file(path: str, what: str) -> None:
    """``path`` can be written as a file: its folder (created if needed) is writable, and it is not a
    folder or a file that cannot be replaced."""
    _check_writable_dir(os.path.dirname(os.path.abspath(path)), what)
    if os.path.isdir(path):
        raise CLIError(f"{what} {path}: is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CLIError(f"{what} {path}: the file is not writable")


def cmd_bench(args) -> int:
    import torch

    from . import bench

    device = _resolve_device(args.device)
    try:
        dtypes = [bench.parse_dtype(d) for d in args.dtype]
        shapes = [bench.parse_shape(s) for s in args.shapes] if args.shapes is not None else list(bench.stage_shapes(args.quick))
    except bench.BenchError as exc:
        raise CLIError(str(exc)) from None
    ops = args.ops
    if ops is None:
        ops = ["gate", "gate_bn"] if args.quick else ["gate", "gate_bn", "avgpool", "bn_relu", "bn_add_relu", "scconv"]
    for op in ops:
        if op not in _BENCH_OPS:
            raise CLIError(f"unknown op {op!r} in --ops; choose from {', '.join(_BENCH_OPS)}")
    modes = args.modes
    if modes is not None:
        for m in modes:
            if m not in bench.OP_MODES + bench.MODULE_MODES:
                raise CLIError(f"unknown mode {m!r} in --modes; choose from "
                               f"{', '.join(bench.OP_MODES + bench.MODULE_MODES)}")
        for op in ops:
            if op == "model":
                continue
            kinds = bench.OP_MODES if op in bench.OPS else bench.MODULE_MODES
            if not any(m in kinds for m in modes):
                raise CLIError(f"--modes {','.join(modes)} has no mode of op {op!r}; its modes are "
                               f"{', '.join(kinds)}")
    if "model" in ops:
        try:
            bench.check_train_images(args.batch_size, args.image_size)
        except bench.BenchError as exc:
            raise CLIError(str(exc)) from None
    providers = args.providers
    if providers:
        for p in providers:
            if p not in bench.PROVIDERS and p != "fused":
                raise CLIError(f"unknown provider {p!r}; choose from {', '.join(bench.PROVIDERS)} or fused "
                               "(the fused backend auto picks here)")
    if device.type == "cpu" and any(d != torch.float32 for d in dtypes):
        print(f"{PROG}: note: low-precision timings on the CPU are not a target; running them anyway",
              file=sys.stderr)
    out_dir = args.out or bench.default_out_dir(device)
    _check_writable_dir(out_dir, "--out")
    min_run_time = args.min_run_time or (0.2 if args.quick else 0.5)
    log = (lambda m: None) if args.quiet else bench.log_stderr
    notes: List[str] = []
    all_rows: List[dict] = []
    if device.type == "cpu":
        busy = bench.busy_warning()
        if busy:
            print(f"{PROG}: warning: {busy}", file=sys.stderr)
        log("allocator: " + bench.pin_cpu_allocator(pin=not args.default_malloc))

    def save(rows):
        if rows:  # (an earlier run's file stays until this run has measured something)
            bench.write_json(rows, os.path.join(out_dir, args.name + ".json"))

    with bench.bench_environment():
        for dtype in dtypes:
            h = bench.Harness(device=device, dtype=dtype, batch_size=args.batch_size, min_run_time=min_run_time,
                              threads=args.threads, progress=log, rounds=args.rounds,
                              on_row=lambda rows: save(all_rows + rows),
                              warmup_ms=args.warmup_ms or (10 if args.quick else 25),
                              rep_ms=args.rep_ms or (40 if args.quick else 100))
            if h.ceiling_gbps is None and any(op in bench.OPS for op in ops):
                h.measure_ceiling()
            # "fused": the backend auto picks for these tensors (the model rows' label)
            op_providers = None if providers is None else list(dict.fromkeys(
                p2 for p in providers
                for p2 in ([bench.auto_fused_backend(device, dtype) or "cpu"] if p == "fused" else [p])))
            log(f"device: {h._device_name}; dtype {bench.dtype_name(dtype)}; N={args.batch_size}; "
                f"providers: {', '.join(op_providers or bench.default_providers(device, dtype))}")
            for op in ops:
                if op == "model":
                    continue
                for shape in shapes:
                    log(f"-- {op} {bench.shape_str((args.batch_size,) + tuple(shape))} {bench.dtype_name(dtype)}")
                    if op in bench.OPS:
                        h.run_op(op, shape, modes=[m for m in (modes or bench.OP_MODES) if m in bench.OP_MODES],
                                 providers=op_providers, channels_last=args.channels_last)
                    else:
                        amp = None if dtype == torch.float32 else dtype
                        h.run_module(op, shape, modes=[m for m in (modes or bench.MODULE_MODES)
                                                       if m in bench.MODULE_MODES],
                                     providers=op_providers, channels_last=args.channels_last, amp=amp)
            if "model" in ops:
                model_provs = list(dict.fromkeys(p if p not in bench.FUSED_BACKENDS else "fused" for p in
                                                 (providers or ["eager", "compile", "fused", "compile_fused"])))
                h.run_model(args.model, image_size=args.image_size, steps=args.steps, providers=model_provs,
                            channels_last=args.channels_last, amp=None if dtype == torch.float32 else dtype)
            all_rows.extend(h.rows)
            notes.extend(h.skipped)
    if not all_rows:
        reasons = "; ".join(sorted(set(notes))) or "see the lines above"
        raise CLIError(f"nothing was measured, every provider was unavailable or failed ({reasons})")
    title = f"scnet_fused benchmark: {all_rows[0]['device']}, N={args.batch_size}"
    paths = bench.write_results(all_rows, out_dir, name=args.name, title=title, notes=sorted(set(notes)),
                                plot=not args.no_plot)
    print(bench.markdown_table(all_rows, title=None, notes=sorted(set(notes))))
    print("wrote " + ", ".join(p for p in paths.values() if p))
    return 0


# ------------------------------------------------------------------------------------------------
# train-bench
# ------------------------------------------------------------------------------------------------


def cmd_train_bench(args) -> int:
    import torch

    from . import bench

    amp = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]
    if args.json:
        _check_writable_file(args.json, "--json")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    distributed = world > 1
    device = _resolve_device(args.device)
    if distributed:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    allocator = bench.pin_cpu_allocator(pin=not args.default_malloc) if device.type == "cpu" else None
    try:
        with bench.bench_environment():
            res = bench.train_benchmark(args.model, batch_size=args.batch_size, amp=amp,
                                        channels_last=args.channels_last, compile=args.compile,
                                        fused=not args.reference, steps=args.steps, warmup=args.warmup,
                                        image_size=args.image_size, device=device,
                                        num_classes=args.num_classes, lr=args.lr, distributed=distributed,
                                        progress=None if args.quiet else bench.log_stderr)
    except bench.BenchError as exc:
        raise CLIError(str(exc)) from None
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    res["allocator"] = allocator
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        peak = "n/a (CPU)" if res["peak_mem"] is None else f"{res['peak_mem'] / 2**30:.2f} GiB"
        print(f"model {res['model']} ({'fused' if res['fused'] else 'reference'}{', compiled' if res['compile'] else ''})"
              f" on {res['device']}, world size {res['world_size']}")
        print(f"batch {res['batch_size']} x {res['image_size']}px, amp {res['amp']}, channels_last {res['channels_last']}")
        print(f"images/s: {_three_digits(res['images_per_s'])}  step: {res['median_ms']:.1f} ms "
              f"(p20 {res['p20_ms']:.1f}, p80 {res['p80_ms']:.1f})")
        print(f"time to first step: {res['first_step_ms'] / 1e3:.2f} s  peak memory: {peak}")
        print(f"loss {res['first_loss']:.4f} at the first step, {res['final_loss']:.4f} at the last "
              f"(SGD lr {res['lr']:g}, momentum 0.9, the same batch every step)")
        if allocator:
            print(f"allocator: {allocator}")
        if args.json:
            bench.write_json([res], args.json)
            print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------------

_CHECK_SHAPES = ((2, 8, 14, 14), (3, 5, 13, 25), (2, 16, 7, 7))
# op -> (eager function, fused function) in scnet_fused.bench
_CHECK_OPS = {"gate": ("eager_gate", "fused_gate"), "gate_bn": ("eager_gate_bn", "fused_gate_bn"),
              "gate_bn2": ("eager_gate_bn2", "fused_gate_bn2"),
              "avgpool": ("eager_avgpool", "fused_avgpool"), "bn_relu": ("eager_bn_relu", "fused_bn_relu"),
              "bn_relu_cat": ("eager_bn_relu_cat", "fused_bn_relu_cat"),
              "bn_add_relu": ("eager_bn_add_relu", "fused_bn_add_relu")}


def _check_one(backend_name: str, op: str, shape, dtype, device, channels_last: bool):
    """Max errors of one backend vs the float64 eager reference, and those of eager in ``dtype``."""
    import torch

    from . import bench
    from .ops import backend as force

    N, C, H, W = shape
    args64 = bench.make_gate_inputs(op, N, C, H, W, torch.float64, device, channels_last, seed=7)
    args64 = tuple(a.detach().requires_grad_(True) for a in args64)
    eager, fused = _CHECK_OPS[op]
    eager, fused = getattr(bench, eager), getattr(bench, fused)

    def run(fn, args, dy):
        y = fn(*args)
        grads = torch.autograd.grad(y, args, dy.to(y.dtype))
        return [y.detach()] + [g.detach() for g in grads]

    out_hw = bench.pooled_hw(H, W) if op == "avgpool" else (H, W)
    out_c = C + bench.cat_branch_channels(C) if op == "bn_relu_cat" else C
    dy64 = torch.randn(N, out_c, *out_hw, dtype=torch.float64, device=device,
                       generator=torch.Generator(device=device).manual_seed(3))
    low = tuple(a.detach().to(dtype if a.dim() == 4 else (torch.float32 if dtype == torch.float32 else dtype))
                .requires_grad_(True) for a in args64)
    # the reference: float64 on the inputs the others get (rounded to dtype), so a ReLU mask or a sign
    # near zero is decided on the same values, not on a rounding of the inputs
    args64 = tuple(a.detach().double().requires_grad_(True) for a in low)
    dy64 = dy64.to(dtype).double()
    ref = run(eager, args64, dy64)
    if channels_last:
        low = tuple(a.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
                    if a.dim() == 4 else a for a in low)
    base = run(eager, low, dy64.to(dtype))
    with force(backend_name):
        got = run(fused, low, dy64.to(dtype))
    names = {"gate": ["y", "dx", "dsmall", "dk3"], "gate_bn": ["y", "dx", "dsmall", "dk3", "dweight", "dbias"],
             "gate_bn2": ["y", "dx", "dsmall", "dk3", "dweight", "dbias", "dsmall_weight", "dsmall_bias"],
             "avgpool": ["y", "dx"], "bn_relu": ["y", "dt", "dweight", "dbias"],
             "bn_relu_cat": ["y", "dta", "dwa", "dba", "dtb", "dwb", "dbb"],
             "bn_add_relu": ["y", "dt", "dweight", "dbias", "dresidual"]}[op]
    out = []
    for name, r, b, g in zip(names, ref, base, got):
        if tuple(g.shape) != tuple(r.shape):
            out.append((name, float("inf"), 0.0, 1.0))
            continue
        scale = max(r.abs().max().item(), 1e-12)
        err = (g.double() - r).abs().max().item()
        e_eager = (b.double() - r).abs().max().item()
        nan = bool(torch.isnan(g).any())
        out.append((name, float("nan") if nan else err, e_eager, scale))
    return out


def cmd_check(args) -> int:
    import math

    import torch

    from . import bench
    from .ops import BACKENDS, available

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    device = _resolve_device(args.device)
    try:
        dtypes = [bench.parse_dtype(d) for d in args.dtype]
    except bench.BenchError as exc:
        raise CLIError(str(exc)) from None
    wanted = args.backends or [b for b in BACKENDS if b != "auto"]
    for b in wanted:
        if b not in BACKENDS or b == "auto":
            raise CLIError(f"unknown backend {b!r}; choose from {', '.join(x for x in BACKENDS if x != 'auto')}")
    runnable = []
    for b in wanted:
        why = bench.fused_backend_reason(b, device)
        if why is None:
            runnable.append(b)
        elif args.backends:
            raise CLIError(f"backend {b} cannot run on {device}: {why}")
        else:
            print(f"skip {b}: {why}")
    if not runnable:
        raise CLIError("no backend can run here")
    failures = 0
    print(f"parity vs the float64 eager reference on {bench.device_name(device)}")
    with bench.bench_environment():
        for b in runnable:
            for dtype in dtypes:
                for op in _CHECK_OPS:
                    for shape in _CHECK_SHAPES:
                        for cl in (False, True):
                            try:
                                res = _check_one(b, op, shape, dtype, device, cl)
                            except Exception as exc:
                                failures += 1
                                print(f"FAIL {b:<9} {op:<11} {bench.shape_str(shape):<11} {bench.dtype_name(dtype)} "
                                      f"{'CL' if cl else '  '}  {type(exc).__name__}: {exc}")
                                continue
                            worst = 0.0
                            ok = True
                            parts = []
                            for name, err, e_eager, scale in res:
                                # allowed: twice eager's own error in this dtype plus a small absolute slack
                                slack = (1e-5 if dtype == torch.float32 else 1e-2) * max(scale, 1.0)
                                lim = 2.0 * e_eager + slack
                                good = not math.isnan(err) and err <= lim
                                ok &= good
                                worst = max(worst, err / max(scale, 1e-12) if not math.isnan(err) else float("inf"))
                                parts.append(f"{name} {err:.1e}{'' if good else '!'}")
                            failures += 0 if ok else 1
                            print(f"{'PASS' if ok else 'FAIL'} {b:<9} {op:<11} {bench.shape_str(shape):<11} "
                                  f"{bench.dtype_name(dtype)} {'CL' if cl else '  '}  max abs err: {', '.join(parts)}")
    print(f"{'FAIL' if failures else 'PASS'}: {failures} failing case(s) over backends {', '.join(runnable)}")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------


def cmd_info(args) -> int:
    import platform

    import torch

    from . import bench
    from .ops import BACKENDS, available
    from .ops._dispatch import interpreter_problem

    v = bench.versions()
    print(f"scnet_fused {v['scnet_fused']}")
    print(f"python {v['python']} ({sys.executable})")
    print(f"torch {v['torch']} (CUDA {torch.version.cuda or 'none'}, cuDNN {v['cudnn'] or 'n/a'})")
    print(f"triton {v['triton'] or 'not installed'}")
    interp = os.environ.get("TRITON_INTERPRET")
    print(f"TRITON_INTERPRET: {interp if interp is not None else 'unset'}"
          f"{' (Triton kernels run on the CPU through the interpreter)' if interp not in (None, '', '0') else ''}")
    print(f"SCNET_FUSED_BACKEND: {os.environ.get('SCNET_FUSED_BACKEND', 'unset')}")
    print(f"CPU: {bench.cpu_model()}, {bench.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()} ({platform.machine()})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        print("GPU: none (torch.cuda.is_available() is False)")
    try:
        archs = torch.cuda.get_arch_list()
    except Exception:
        archs = []
    print(f"torch CUDA archs: {' '.join(archs) if archs else 'none'}")
    try:
        from . import _C

        from .ops import _cpp

        archs = getattr(_C, "cuda_arch_list", None)
        print(f"scnet_fused._C: {_C.__file__}; with_cuda={getattr(_C, 'with_cuda', '?')}"
              + (f" (CUDA kernels compiled for compute capability {_cpp.arch_names(archs)})" if archs else ""))
        print(f"CPU kernels: {_cpp.cpu_isa() or 'none loaded'} (built: {', '.join(_cpp.built_isas()) or 'none'}; "
              f"this CPU runs: {', '.join(i for i in _cpp.CPU_ISAS if _C.cpu_supports_isa(i))})")
    except Exception as exc:
        print(f"scnet_fused._C: not importable ({type(exc).__name__}: {exc})")
    print("backends:")
    interp_problem = interpreter_problem()
    for b in BACKENDS:
        if b == "auto":
            continue
        why = available(b)
        note = ""
        if why is None and b == "triton" and not torch.cuda.is_available():
            note = (" (runs through the interpreter on CPU tensors)" if interp not in (None, "", "0")
                    else " (needs CUDA tensors; TRITON_INTERPRET=1 runs it on CPU tensors)")
        if why is None and b == "triton" and interp_problem is not None:
            note = f" on CUDA tensors only: on CPU tensors {interp_problem}"
        if why is None and b == "cuda" and not torch.cuda.is_available():
            note = " (built; runs on CUDA tensors, and this machine has no GPU)"
        if why is None and b == "cuda" and torch.cuda.is_available():
            from .ops import _cpp

            problems = [p for p in (_cpp.cuda_device_problem(torch.device("cuda", i))
                                    for i in range(torch.cuda.device_count())) if p]
            if problems and len(problems) == torch.cuda.device_count():
                why = "; ".join(problems)
            elif problems:
                note = " on some GPUs only: " + "; ".join(problems)
        print(f"  {b:<10} {'available' + note if why is None else 'unavailable: ' + why}")
    why = bench.fused_modules_reason()
    print(f"fused modules (SCConv, SCBottleneck): {'available' if why is None else why}")
    dev = bench.best_device()
    print(f"benchmark providers on {dev.type}: {', '.join(bench.default_providers(dev, torch.float32))}")
    return 0


# ------------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="scnet_fused: fused self-calibrated convolution tools")
    sub = p.add_subparsers(dest="command", metavar="{bench,train-bench,check,info}")
    sub.required = True

    b = sub.add_parser("bench", help="benchmark the gate ops and modules on the best device present",
                       description="Time eager, torch.compile and the fused backends side by side; "
                                   "write JSON, Markdown and PNG results.")
    b.add_argument("--quick", action="store_true", help="one shape, short timing (about a minute on 2 CPU cores)")
    b.add_argument("--out", metavar="DIR", help="results folder (default benchmarks/results/<device>)")
    b.add_argument("--name", default="results", help="file name stem of the results (default: results)")
    b.add_argument("--ops", metavar="LIST", type=_args.comma_list, help=f"comma list of {', '.join(_BENCH_OPS)} "
                                                 "(default gate,gate_bn,avgpool,bn_relu,bn_add_relu,scconv; --quick: gate,gate_bn)")
    b.add_argument("--modes", metavar="LIST", type=_args.comma_list, help="op modes forward,backward,full and/or module modes train,eval")
    b.add_argument("--providers", metavar="LIST", type=_args.comma_list,
                   help="comma list of eager, compile, triton, cuda, cpu, compile_fused, or fused (the fused "
                        "backend auto picks here) (default: all available)")
    b.add_argument("--dtype", default="fp32", type=_args.comma_list, help="comma list of fp32, bf16, fp16 (modules: autocast)")
    b.add_argument("--batch-size", type=_positive_int, default=8, help="N (default 8)")
    b.add_argument("--shapes", metavar="LIST", type=_args.comma_list, help="comma list of CxHxW (default: SCNet-50 stage shapes)")
    b.add_argument("--channels-last", action="store_true")
    b.add_argument("--device", type=_device, help="cpu or cuda (default: cuda when present)")
    b.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
    b.add_argument("--min-run-time", type=_positive_float, help="CPU seconds per measurement (default 0.5; 0.2 with --quick)")
    b.add_argument("--warmup-ms", type=_positive_float, help="GPU warm-up per measurement (default 25; 10 with --quick)")
    b.add_argument("--rep-ms", type=_positive_float, help="GPU timed milliseconds per measurement (default 100; 40 with --quick)")
    b.add_argument("--model", default="scnet50", choices=("scnet50", "scnet101", "scnet50_v1d", "scnet101_v1d"),
                   help="model for --ops model")
    b.add_argument("--image-size", type=_positive_int, default=224)
    b.add_argument("--steps", type=_positive_int, default=5, help="timed training steps for --ops model")
    b.add_argument("--rounds", type=_positive_int,
                   help="module rows: timing rounds per provider, in alternating order (default 2 on a CPU, 1 on a GPU)")
    b.add_argument("--default-malloc", action="store_true",
                   help="CPU: leave glibc malloc's dynamic mmap/trim thresholds (default: fix them for the run, "
                        "so page faults do not depend on what ran before)")
    b.add_argument("--no-plot", action="store_true")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("train-bench", help="synthetic-data SGD training throughput of a whole SCNet",
                       description="images/s, peak memory and time to first step; under torchrun "
                                   "(WORLD_SIZE > 1) the model runs in DistributedDataParallel.")
    t.add_argument("--model", default="scnet50", choices=("scnet50", "scnet101", "scnet50_v1d", "scnet101_v1d"))
    t.add_argument("--batch-size", type=_positive_int, default=32, help="per-process batch size (default 32)")
    t.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"))
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--fused", action="store_true", default=True, help="fused SCConv modules (default)")
    g.add_argument("--reference", action="store_true", help="the pure-PyTorch reference model")
    t.add_argument("--steps", type=_positive_int, default=10, help="timed steps (default 10)")
    t.add_argument("--warmup", type=_nonneg_int, default=2, help="untimed steps first (default 2)")
    t.add_argument("--image-size", type=_positive_int, default=224, help="square images, px (default 224)")
    t.add_argument("--num-classes", type=_positive_int, default=1000, help="(default 1000)")
    t.add_argument("--lr", type=_args.positive_float, help="SGD learning rate (default: 0.1 x global batch / 256)")
    t.add_argument("--device", type=_device)
    t.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    t.add_argument("--default-malloc", action="store_true",
                   help="CPU: leave glibc malloc's dynamic thresholds (default: fix them, as bench does)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train_bench)

    c = sub.add_parser("check", help="parity of every available backend against the reference (seconds)",
                       description="Runs each backend's fused ops on small irregular shapes, NCHW and channels_last, "
                                   "against the float64 eager reference and prints PASS or FAIL per op, shape "
                                   "and layout (allowed: twice eager's own error in the dtype plus a small "
                                   "slack); exits non-zero on any failure.")
    c.add_argument("--backends", metavar="LIST", type=_args.comma_list, help="comma list of triton, cuda, cpu, reference "
                                                      "(default: every one that can run here)")
    c.add_argument("--dtype", default="fp32", type=_args.comma_list, help="comma list of fp32, bf16, fp16")
    c.add_argument("--device", type=_device)
    c.add_argument("--interpret", action="store_true",
                   help="run Triton kernels through the interpreter (CPU tensors; sets TRITON_INTERPRET=1)")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("info", help="versions, backends and why any is unavailable, compiled archs")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage and the message
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (ValueError, TypeError, RuntimeError, ImportError, OSError) as exc:
        _err(f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
