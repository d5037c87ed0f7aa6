"""The command line (info, check, bench, bad arguments) and the digits training example."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import _background
from _util import kink_perturbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI checks compiled backends here; Triton has its own tests
    env["SCNET_FUSED_POISON"] = "0"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "scnet_fused", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _script(name, *args):
    """A benchmark script's command line, its output folder left to the run ("{out}")."""
    return [os.path.join(ROOT, "benchmarks", f"{name}.py"), *args, "--out", "{out}"]


# two processes: four ops one after the other in the first, the channels_last variant of the default op
_BN_BACKWARD_EXTRA = (["--op", "gate_bn,gate_bn_forward,bn_relu,gate"],
                      ["--channels-last", "--default-malloc", "--threads", "1"])

# The script tests' processes, run in the background while the other tests run (tests/_background.py),
# the longest first.
BACKGROUND = {
    "first_step": [(_script("bench_first_step", "--shapes", "8x8x8", "--modes", "eval", "--batch-size", "2",
                            "--device", "cpu", "--threads", "1"), {"env": _env(), "timeout": 600})],
    "checkouts": [(_script("bench_checkouts", "--base", ROOT, "--rounds", "2", "--op", "gate", "--mode", "backward",
                           "--shapes", "5x13x14", "--batch-size", "2", "--min-run-time", "0.02", "--channels-last",
                           "--name", "ab"), {})],
    "winograd_parts": [(_script("bench_winograd_parts", "--shapes", "16x13x14,32x8x8", "--batch-size", "2",
                                "--rounds", "2", "--min-run-time", "0.02", "--device", "cpu", "--default-malloc"), {})],
    "bn_backward": [(_script("bench_bn_backward", "--shapes", "3x16x16,2x7x7", "--batch-size", "2", "--rounds", "2",
                              "--min-run-time", "0.02", *extra), {}) for extra in _BN_BACKWARD_EXTRA],
    "stream_stores": [(_script("bench_stream_stores", "--shapes", "3x16x16,2x7x7", "--batch-size", "2", "--rounds", "2",
                               "--min-run-time", "0.02"), {"env": dict(os.environ, SCNET_FUSED_CPU_STREAM="0")})],
    "route": [(_script("bench_route", "--shapes", "3x16x16,2x7x7", "--batch-size", "2", "--rounds", "2",
                       "--min-run-time", "0.02"), {})],
    "winograd": [(_script("bench_winograd", "--shapes", "16x13x14", "--batch-size", "2", "--rounds", "2",
                          "--min-run-time", "0.02", "--device", "cpu", "--default-malloc"), {})],
    "small_inference": [(_script("bench_small_inference", "--no-model", "--rounds", "1"), {})],
    "conv1_stack": [(_script("bench_conv1_stack", "--shapes", "16x9x7,512x4x4", "--batch-size", "2", "--rounds", "2",
                             "--min-run-time", "0.02", "--device", "cpu", "--default-malloc", "--amp", "bf16",
                             "--channels-last"), {})],
    "layout_step": [(_script("bench_layout_step", "--shapes", "5x13x14", "--batch-size", "2", "--rounds", "2",
                             "--min-run-time", "0.02", "--device", "cpu", "--default-malloc"), {})],
    "conv_layout": [(_script("bench_conv_layout", "--shapes", "5x9x7", "--batch-size", "2", "--rounds", "2",
                             "--min-run-time", "0.02", "--device", "cpu", "--default-malloc"), {})],
    "infer": [(_script("bench_infer", "--image-size", "128", "--batch-size", "1", "--rounds", "2", "--min-run-time",
                       "0.05", "--device", "cpu", "--default-malloc"), {})],
    "winograd_policy": [(_script("bench_winograd_policy", "--no-model", "--batch-size", "2", "--rounds", "1"), {})],
    "pooled_bn": [(_script("bench_pooled_bn", "--shapes", "8x9x7", "--batch-size", "2", "--rounds", "2",
                           "--min-run-time", "0.02", "--device", "cpu", "--default-malloc", "--amp", "bf16",
                           "--channels-last"), {})],
    "k4_norm": [(_script("bench_k4_norm", "--batch-size", "2", "--rounds", "1"), {})],
    "double_backward": [(_script("bench_double_backward", "--batch-size", "2", "--rounds", "1"), {})],
    "conv1x1": [(_script("bench_conv1x1", "--no-model", "--batch-size", "1", "--rounds", "1"), {})],
    "downsample": [(_script("bench_downsample", "--no-model", "--batch-size", "1", "--rounds", "1"), {})],
    "stem": [(_script("bench_stem", "--no-model", "--batch-size", "1", "--rounds", "1"), {})],
    "eager_layout": [(_script("bench_eager_layout", "--layers", "1,1,1,1", "--shapes", "2x128", "--eval-shapes",
                              "1x64", "--rounds", "2", "--reps", "1"), {})],
    "compile_model": [(_script("bench_compile_model", "--layers", "1,1,1,1", "--image-size", "64", "--batch-size", "2",
                               "--rounds", "1", "--variants", "reference:eager,fused:compile"), {"timeout": 600})],
}


def _bg(key):
    """``(completed processes, output folder)`` of the script runs of ``BACKGROUND[key]``."""
    return _background.result(key, BACKGROUND[key])


def test_info_runs():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    for word in ("torch", "backends:", "reference", "TRITON_INTERPRET", "archs"):
        assert word in r.stdout
    from scnet_fused.ops import _cpp

    if _cpp.unavailable_reason("cuda") is None:  # a CUDA build names the architectures it carries
        from scnet_fused import _C

        assert f"CUDA kernels compiled for compute capability {_cpp.arch_names(_C.cuda_arch_list)}" in r.stdout


def test_check_passes():
    from scnet_fused.ops import available

    backends = [b for b in ("cpu", "reference") if available(b) is None]
    r = _cli("check", "--backends", ",".join(backends), "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "FAIL" not in r.stdout


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--batch-size", "0"], "positive integer"),
    (["bench", "--dtype", "fp8"], "unknown dtype"),
    (["bench", "--ops", "nope"], "unknown op"),
    (["bench", "--shapes", "64x2x2"], "pooling_r"),
    (["train-bench", "--amp", "int4"], "invalid choice"),
    (["train-bench", "--device", "cpu", "--image-size", "96"], "need >= 97"),
    (["train-bench", "--device", "cpu", "--image-size", "128", "--lr", "0"], "positive finite number"),
    (["train-bench", "--device", "cpu", "--image-size", "128", "--lr", "nan"], "positive finite number"),
    (["train-bench", "--device", "cpu", "--batch-size", "1"], "at least 225 px"),
    (["bench", "--device", "cpu", "--ops", "model", "--batch-size", "1", "--image-size", "160"], "at least 225 px"),
    (["bench", "--ops", ",", "--shapes", "8x8x8"], "argument --ops: expected a comma list"),
    (["bench", "--ops", "", "--shapes", "8x8x8"], "argument --ops: expected a comma list"),
    (["bench", "--ops", "gate", "--shapes", ""], "argument --shapes: expected a comma list"),
    (["bench", "--ops", "gate", "--shapes", "8x8x8", "--providers", ""], "argument --providers: expected a comma list"),
    (["bench", "--ops", "gate", "--shapes", "8x8x8", "--modes", " , "], "argument --modes: expected a comma list"),
    (["bench", "--ops", "gate", "--shapes", "8x8x8", "--dtype", ""], "argument --dtype: expected a comma list"),
    (["bench", "--min-run-time", "inf"], "positive finite number"),
    (["train-bench", "--device", "cpu", "--image-size", "128", "--lr", "inf"], "positive finite number"),
    (["check", "--dtype", ","], "argument --dtype: expected a comma list"),
    (["check", "--backends", ""], "argument --backends: expected a comma list"),
    (["train-bench", "--device", "cpu", "--json", "/tmp"], "is a folder"),
    (["bench", "--providers", "fast"], "or fused"),
    (["bench", "--out", "/proc/no/such/folder"], "cannot create the folder"),
    (["train-bench", "--json", "/proc/no/such/folder/r.json"], "cannot create the folder"),
    (["bench", "--ops", "gate", "--shapes", "8x8x8", "--modes", "bogus"], "unknown mode 'bogus'"),
    (["bench", "--ops", "gate,scconv", "--shapes", "8x8x8", "--modes", "train"], "no mode of op 'gate'"),
    (["bench", "--ops", "scconv", "--shapes", "8x8x8", "--modes", "forward"], "no mode of op 'scconv'"),
    (["frobnicate"], "invalid choice"),
    (["check", "--backends", "nope"], "unknown backend"),
])
def test_bad_arguments(capsys, argv, needle):
    from scnet_fused.__main__ import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err
    assert "Traceback" not in err


def test_unwritable_json_target_fails_before_the_run(capsys):
    """A folder no file can be made in is refused before anything runs (as root, os.access said yes
    to /proc and the run failed at its end)."""
    from scnet_fused.__main__ import main

    code = main(["train-bench", "--device", "cpu", "--json", "/proc/x.json", "--batch-size", "2",
                 "--image-size", "97", "--steps", "1", "--warmup", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "cannot create a file there" in err or "not writable" in err


def test_a_bench_that_measures_nothing_keeps_an_earlier_file(tmp_path, capsys):
    """Every provider unavailable: an error naming why, and the results file of an earlier run as it was
    (it used to be overwritten with [])."""
    from scnet_fused.__main__ import main

    earlier = '[{"op": "gate", "median_ms": 1.0}]'
    (tmp_path / "results.json").write_text(earlier)
    code = main(["bench", "--device", "cpu", "--providers", "cuda", "--ops", "gate", "--shapes", "8x8x8",
                 "--modes", "forward", "--min-run-time", "0.01", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    # why: CPU tensors for the cuda backend, or (a CPU-only build) no CUDA kernels at all
    assert code != 0 and "nothing was measured" in err
    assert "needs CUDA tensors" in err or "built without CUDA kernels" in err
    assert (tmp_path / "results.json").read_text() == earlier


def test_bad_arguments_subprocess():
    r = _cli("bench", "--batch-size", "-3")
    assert r.returncode != 0
    assert "positive integer" in r.stderr and "Traceback" not in r.stderr
    r = _cli("train-bench", "--device", "cuda:0", "--steps", "1")
    if r.returncode != 0:  # no GPU here: a one-line error, not a traceback
        assert "Traceback" not in r.stderr and "error" in r.stderr


def test_train_bench_fits_its_batch(capsys):
    """train-bench's default learning rate (0.1 per 256 images) makes the loss on its fixed batch fall
    for the fused model and the reference, from the same first loss (the last ones are compared only
    loosely: a batch of four fits fast enough that the reference's own final loss moves by 6% between
    one thread and two); the CLI prints both losses and the rate."""
    from scnet_fused import bench
    from scnet_fused.__main__ import main

    with pytest.raises(bench.BenchError, match="learning rate"):  # refused before the model is built
        bench.train_benchmark("scnet50", device="cpu", lr=float("inf"))
    runs = {fused: bench.train_benchmark("scnet50", batch_size=4, image_size=97, steps=3, warmup=0,
                                         device="cpu", fused=fused, num_classes=10)
            for fused in (False, True)}
    for r in runs.values():
        assert r["lr"] == pytest.approx(0.1 * 4 / 256)
        assert r["final_loss"] < 0.8 * r["first_loss"], r
    assert runs[True]["first_loss"] == pytest.approx(runs[False]["first_loss"], rel=1e-4)
    assert runs[True]["final_loss"] == pytest.approx(runs[False]["final_loss"], rel=0.3)
    code = main(["train-bench", "--device", "cpu", "--batch-size", "2", "--image-size", "97", "--steps", "1",
                 "--warmup", "0", "--num-classes", "10", "--lr", "0.005", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "at the first step" in out and "lr 0.005" in out


def test_bench_quick_writes_rows(tmp_path, capsys):
    from scnet_fused import bench
    from scnet_fused.__main__ import main

    providers = ["eager"] + [p for p in ("cpu",) if bench.provider_reason(p, bench.torch.device("cpu"),
                                                                          bench.torch.float32) is None]
    code = main(["bench", "--quick", "--device", "cpu", "--shapes", "8x8x8", "--batch-size", "2",
                 "--ops", "gate,gate_bn", "--providers", ",".join(providers), "--min-run-time", "0.02",
                 "--out", str(tmp_path), "--quiet", "--default-malloc"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["op"], r["mode"], r["provider"]) for r in rows} == {
        (op, mode, p) for op in ("gate", "gate_bn") for mode in ("forward", "backward", "full") for p in providers}
    for r in rows:
        for key in bench.ROW_KEYS:
            assert key in r
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["bytes"] > 0 and r["gbps"] > 0 and r["shape"] == "2x8x8x8"
        assert r["peak_mem"] is None  # no CUDA memory on the CPU, and no made-up number
        assert r["versions"]["torch"]
        assert "malloc" in r["allocator"]
        assert r["faults_per_call"] is None or r["faults_per_call"] >= 0
    eager_fwd = [r for r in rows if r["provider"] == "eager" and r["mode"] == "forward"]
    assert all(r["speedup"] == 1.0 for r in eager_fwd)
    assert all(r["saved_bytes"] > 0 for r in eager_fwd)  # eager keeps the sigmoid and the sum
    md = (tmp_path / "results.md").read_text()
    assert "| op | mode | shape |" in md and "gate_bn" in md and "faults/call" in md and "Allocator:" in md


@pytest.mark.parametrize("mode", ["backward", "full"])
def test_bench_backward_rows_run_the_providers_backward(mode, monkeypatch):
    """A forced provider's backward row times that backend's backward: the row's forward (run once when the
    row is built) runs under the provider too, as the backward follows the forward's backend."""
    from scnet_fused import bench
    from scnet_fused.ops import _dispatch

    if bench.provider_reason("triton", bench.torch.device("cpu"), bench.torch.float32) is not None:
        pytest.skip("no triton provider here")
    tri = _dispatch._load("triton")
    calls = []
    real = tri.gate_backward
    monkeypatch.setattr(tri, "gate_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    h = bench.Harness(device="cpu", batch_size=1, min_run_time=0.001, warmup_ms=0, rep_ms=0)
    rows = h.run_op("gate", (2, 5, 4), modes=[mode], providers=["triton"])
    assert [r["provider"] for r in rows] == ["triton"] and calls


@pytest.mark.parametrize("env, pin, needle", [
    ({}, True, "fixed at 32 MiB"),
    ({}, False, "default, dynamic thresholds"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, True, "configured by the environment (MALLOC_TRIM_THRESHOLD_)"),
])
def test_bench_allocator_pinning(env, pin, needle):
    """The harness fixes glibc's thresholds for CPU timing, says so, and leaves a user's setting alone."""
    from scnet_fused import bench

    if bench._glibc()[0] is None:
        pytest.skip("not a glibc process: the allocator is left as configured")
    code = "\n".join([
        "import torch", "from scnet_fused import bench",
        f"print(bench.pin_cpu_allocator(pin={pin}))",
        "t = torch.empty(4 << 20)",  # 16 MiB: below the fixed mmap threshold
        "p = t.data_ptr()",
        "heap = [l.split()[0].split('-') for l in open('/proc/self/maps') if l.rstrip().endswith('[heap]')]",
        "print(any(int(a, 16) <= p < int(b, 16) for a, b in heap))"])
    clean = {k: v for k, v in os.environ.items() if k not in bench._MALLOC_ENV}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    note, in_heap = r.stdout.strip().splitlines()[-2:]
    assert needle in note
    if pin and not env and os.path.exists("/proc/self/maps"):
        # pinned, a 16 MiB block comes from the heap (kept and reused after free), not from a fresh mapping
        assert in_heap == "True"


def test_digits_example_fused_matches_reference():
    pytest.importorskip("sklearn")
    from scnet_fused import bench

    why = bench.fused_modules_reason()
    if why:
        pytest.skip(f"fused modules unavailable: {why}")
    spec = importlib.util.spec_from_file_location("train_digits", os.path.join(ROOT, "examples", "train_digits.py"))
    td = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(td)
    # 160 images: 128 for training, two steps of 64; every step's loss must agree.
    res = td.run(epochs=1, subset=160, log=lambda m: None)
    # The fused model's first-batch gradients are as close to float64 as the float32 reference's, on
    # the batch and two copies with 1e-5 relative noise, required on two of the three (a ReLU input
    # within rounding of 0 sends one of two correct float32 runs to the other side of the kink; the
    # measured case: 1.3e-2 against 5.0e-4 on the batch, 2.9e-3 against 2.9e-3 on the noisy copies).
    data = td.load_data(52, 160, 0)
    ref, fused = td.build_models(0, fused=True, reference_too=True)
    errs = [td.gradient_errors(ref, fused, xx, data[1][:64]) for xx in kink_perturbed(data[0][:64])]
    assert errs[0] == pytest.approx(res["first_step_grad"])  # the example reports the same check
    assert sum(e["fused_vs_fp64"] <= 2 * e["reference_vs_fp64"] + 1e-5 for e in errs) >= 2, errs
    f, r = res["fused"]["step_losses"], res["reference"]["step_losses"]
    assert len(f) == len(r) == 2
    for a, b in zip(f, r):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b))


def test_summary_tables_from_results(tmp_path, capsys):
    """benchmarks/tables.py puts eager, compile and the fused provider side by side, ratios from the medians."""
    spec = importlib.util.spec_from_file_location("tables", os.path.join(ROOT, "benchmarks", "tables.py"))
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    base = {"dtype": "fp32", "device": "test cpu", "versions": {"torch": "x"}, "allocator": "glibc test"}
    rows = [dict(base, op="gate", mode="forward", shape="8x32x56x56", provider=p, median_ms=m)
            for p, m in (("eager", 3.0), ("compile", 1.5), ("cpu", 0.5))]
    rows += [dict(base, op="scconv", mode="train", shape="8x32x56x56", provider=p, median_ms=m, saved_bytes=s,
                  faults_per_call=f)
             for p, m, s, f in (("eager", 20.0, 16.5e6, 10.0), ("compile", 22.0, 16.0e6, 0.0),
                                ("cpu", 16.0, 7.0e6, 2.0))]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rows))
    assert tables.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| gate | forward | 8x32x56x56 | fp32 | 3.000 | 1.500 | 0.500 | 6.00x | 3.00x |" in out
    assert "| scconv | train | 8x32x56x56 | fp32 | 20.00 | 22.00 | 16.00 | 1.25x | 1.38x | 16.5 / 7.0 | 10 / 2 |" in out
    assert "Allocator: glibc test." in out
    assert tables.main([str(path), "--fused", "triton"]) == 1  # no such rows: says so, exits non-zero
    capsys.readouterr()

    # --compact: an op's modes side by side in one row; a module's first calls (compile / fused)
    rows += [dict(base, op="gate", mode="backward", shape="8x32x56x56", provider=p, median_ms=m)
             for p, m in (("eager", 2.0), ("compile", 4.0), ("cpu", 1.0))]
    for r in rows:
        if r["op"] == "scconv":
            r["first_ms"] = {"eager": 30.0, "compile": 300.0, "cpu": 12.0}[r["provider"]]
    path.write_text(json.dumps(rows))
    assert tables.main([str(path), "--compact"]) == 0
    out = capsys.readouterr().out
    assert "| gate | 8x32x56x56 | fp32 | 3.000 / 1.500 / 0.500 | 6.00x, 3.00x | 2.000 / 4.000 / 1.000 | 2.00x, 4.00x |" in out
    assert "| scconv | 8x32x56x56 | fp32 | 20.00 / 22.00 / 16.00 | 1.25x, 1.38x | 300 / 12 | 16.5 / 7.0 |" in out


def test_module_rows_interleaved_rounds(tmp_path, capsys):
    """Module rows: every provider is timed in each round (order alternating), the row combines them;
    "fused" names the fused backend auto picks (cpu here)."""
    from scnet_fused import bench
    from scnet_fused.__main__ import main

    if bench.fused_modules_reason() is not None or bench.provider_reason(
            "cpu", bench.torch.device("cpu"), bench.torch.float32) is not None:
        pytest.skip("the fused modules need the compiled cpu backend")
    code = main(["bench", "--device", "cpu", "--ops", "scconv", "--shapes", "8x8x8", "--batch-size", "2",
                 "--providers", "eager,fused", "--min-run-time", "0.02", "--rounds", "3", "--out", str(tmp_path),
                 "--quiet", "--default-malloc", "--no-plot"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in ("train", "eval") for p in ("eager", "cpu")}
    for r in rows:
        assert r["rounds"] == 3 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert all(r["saved_bytes"] > 0 for r in rows if r["mode"] == "train")


def test_combine_rounds():
    from scnet_fused.bench import Timing, combine_rounds

    t = combine_rounds([Timing(2.0, 1.5, 2.5, 10, 4.0), Timing(4.0, 3.0, 5.0, 6, None), Timing(3.0, 2.9, 3.1, 4, 2.0)])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.runs, t.faults_per_call, t.rounds) == (3.0, 1.5, 5.0, 20, 3.0, 3)
    one = Timing(1.0, 0.9, 1.1, 5)
    assert combine_rounds([one]) is one


_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\nmodel\t\t: {m}\nmodel name\t: AMD EPYC Processor\n\n"


def test_cpu_results_folder_names_the_machine(tmp_path):
    """Two CPU generations that a virtual machine names alike get different default results folders, and
    the second processor's block of /proc/cpuinfo is not read into the first's."""
    import torch

    from scnet_fused import bench

    zen1, zen4 = tmp_path / "zen1", tmp_path / "zen4"
    zen1.write_text(_EPYC.format(f=23, m=1) + _EPYC.format(f=25, m=17))
    zen4.write_text(_EPYC.format(f=25, m=17) + _EPYC.format(f=23, m=1))
    tags = [bench.cpu_tag(bench._cpuinfo(str(p))) for p in (zen1, zen4)]
    assert tags == ["cpu-amd-epyc-f23m1", "cpu-amd-epyc-f25m17"]
    xeon = {"model name": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "cpu family": "6", "model": "106"}
    assert bench.cpu_tag(xeon) == "cpu-intel-xeon-platinum-8375c-f6m106"
    assert bench.cpu_tag({"model name": "Neoverse-V2"}) == "cpu-neoverse-v2"  # no family/model fields
    assert bench._cpuinfo(str(tmp_path / "absent")) == {}
    here = bench.default_out_dir(torch.device("cpu"))
    assert here.startswith(os.path.join("benchmarks", "results", "cpu-")) and here != os.path.join(
        "benchmarks", "results", "cpu")


@pytest.mark.background("infer")
def test_bench_infer_script():
    """benchmarks/bench_infer.py: both providers timed, their error against a float64 run recorded."""
    from scnet_fused import bench

    if bench.fused_modules_reason() is not None:
        pytest.skip(bench.fused_modules_reason())
    (r,), out = _bg("infer")
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "infer_scnet50.json").read_text())
    assert {row["provider"] for row in rows} == {"eager", "fused"}
    for row in rows:
        assert row["rounds"] == 2 and row["median_ms"] > 0 and 0 <= row["rel_err_vs_float64"] < 1e-3
    assert "| fused |" in (out / "infer_scnet50.md").read_text()


def _script_usage_errors(name, tmp_path, capsys, cases):
    """A benchmark script's argument errors, in this process (no interpreter start per case): each
    exits, or returns, with status 2 and a message naming the bad value. They are all found before
    the script sets up the machine or touches a kernel."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv, needle in cases:
        try:
            status = mod.main([*argv, "--out", str(tmp_path)])
        except SystemExit as exc:
            status = exc.code
        err = capsys.readouterr().err
        assert status == 2 and needle in err, (argv, status, err[-2000:])


def test_bench_model_script_usage_errors(tmp_path, capsys):
    """benchmarks/bench_model.py refuses images and batches an SCNet cannot train on before building a
    model (it used to skip every provider and write empty results)."""
    _script_usage_errors("bench_model", tmp_path, capsys, [
        (["--device", "cpu", "--image-size", "64"], "too small"),
        (["--device", "cpu", "--batch-size", "1", "--image-size", "160"], "at least 225 px"),
        (["--device", "cpu", "--batch-size", "0"], "positive integer"),
        (["--device", "cpu", "--steps", "-1"], "positive integer"),
        (["--device", "cpu", "--providers", ","], "one or more names")])


@pytest.mark.parametrize("script", ["bench_gate", "bench_scconv"])
def test_bench_gate_and_scconv_script_usage_errors(script, tmp_path, capsys):
    """An empty list is an error (it used to mean the defaults), as are a zero batch or run time."""
    _script_usage_errors(script, tmp_path, capsys, [
        (["--device", "cpu", "--shapes", ""], "bad shape"),
        (["--device", "cpu", "--providers", ""], "one or more names"),
        (["--device", "cpu", "--mode", ","], "one or more names"),
        (["--device", "cpu", "--batch-size", "0"], "positive integer"),
        (["--device", "cpu", "--min-run-time", "inf"], "positive finite number")])


def test_bench_cpu_isa_script(tmp_path, capsys):
    """benchmarks/bench_cpu_isa.py: each build runs in its own process and the rows say which one ran."""
    from scnet_fused.ops import _cpp

    if _cpp.cpu_isa() is None:
        pytest.skip("no CPU kernel build is loaded")
    isas = ["default", _cpp.cpu_isa()] if _cpp.cpu_isa() != "default" else ["default"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_cpu_isa.py"), "--isas", ",".join(isas),
                        "--rounds", "1", "--op", "gate", "--mode", "forward", "--shapes", "5x13x14",
                        "--batch-size", "2", "--min-run-time", "0.02", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "cpu_isa.json").read_text())
    ran = sorted((row["round"], row["versions"]["cpu_isa"]) for row in data["rows"])
    assert ran == sorted((0, isa) for isa in isas)
    md = (tmp_path / "cpu_isa.md").read_text()
    assert "| gate | forward | 2x5x13x14 | fp32 |" in md
    _script_usage_errors("bench_cpu_isa", tmp_path, capsys, [(["--isas", "sse9"], "sse9")])


@pytest.mark.background("checkouts")
def test_bench_checkouts_script(tmp_path, capsys):
    """benchmarks/bench_checkouts.py: both checkouts run in alternating rounds, each row says which one
    (here the same checkout twice), the layout asked for reaches the runs; a folder that is not a
    checkout of the package is refused."""
    from scnet_fused.ops import _cpp

    if _cpp.cpu_isa() is None:
        pytest.skip("no CPU kernel build is loaded")
    (r,), out = _bg("checkouts")
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "ab.json").read_text())
    assert sorted((row["round"], row["checkout"]) for row in data["rows"]) == [
        (0, "base"), (0, "head"), (1, "base"), (1, "head")]
    assert data["checkouts"]["base"]["path"] == data["checkouts"]["head"]["path"] == os.path.realpath(ROOT)
    assert all(row["commit"] == data["checkouts"]["base"]["commit"] != "" for row in data["rows"])
    assert all(row["channels_last"] is True for row in data["rows"])
    md = (out / "ab.md").read_text()
    assert "| gate | backward | 2x5x13x14 | fp32 |" in md and "inputs channels_last" in md
    # A folder that looks like a checkout but has no package of its own: its processes would import this
    # checkout's package, so both sides would time the same build. Refused before anything runs.
    fake = tmp_path / "fake"
    (fake / "benchmarks").mkdir(parents=True)
    (fake / "benchmarks" / "bench_gate.py").write_text("raise SystemExit(3)\n")
    _script_usage_errors("bench_checkouts", tmp_path, capsys,
                         [(["--base", str(tmp_path)], "not a checkout"), (["--base", str(fake)], "imports scnet_fused from"),
                          (["--base", ROOT, "--rounds", "0"], "--rounds")])


@pytest.mark.background("conv_layout")
def test_bench_conv_layout_script(tmp_path):
    """benchmarks/bench_conv_layout.py: both memory formats, both modes, GFLOP/s from the time."""
    (r,), out = _bg("conv_layout")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "conv_layout.json").read_text())
    assert sorted((row["provider"], row["mode"]) for row in rows) == [
        ("channels_last", "forward"), ("channels_last", "forward+backward"), ("nchw", "forward"),
        ("nchw", "forward+backward")]
    for row in rows:
        flops = 2 * 2 * 5 * 5 * 9 * 9 * 7 * (1 if row["mode"] == "forward" else 3)
        assert row["rounds"] == 2 and row["median_ms"] > 0 and row["to_channels_last_ms"] > 0
        assert row["gflops"] == pytest.approx(flops / (row["median_ms"] * 1e-3) / 1e9)
    assert "| 2x5x9x7 | forward+backward |" in (out / "conv_layout.md").read_text()
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_conv_layout.py"), "--shapes", "5x9",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "5x9" in bad.stderr


@pytest.mark.background("conv1_stack")
def test_bench_conv1_stack_script(tmp_path):
    """benchmarks/bench_conv1_stack.py: the stacked and separate entry convolutions, both modes, at a size
    where the module stacks them and one where it does not (the ``default`` column)."""
    from scnet_fused import bench

    if bench.fused_modules_reason() is not None:
        pytest.skip(bench.fused_modules_reason())
    script = os.path.join(ROOT, "benchmarks", "bench_conv1_stack.py")
    (r,), out = _bg("conv1_stack")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "conv1_stack.json").read_text())
    assert sorted((row["shape"], row["provider"], row["mode"]) for row in rows) == sorted(
        (shape, p, m) for shape in ("2x16x9x7", "2x512x4x4") for p in ("separate", "stacked")
        for m in ("inference", "train"))
    # x against the two weights: 2016 vs 64 elements stacks, 16384 vs 65536 does not
    assert {row["shape"]: row["default"] for row in rows} == {"2x16x9x7": "stacked", "2x512x4x4": "separate"}
    for row in rows:
        assert row["rounds"] == 2 and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["dtype"] == "bf16 autocast" and row["layout"] == "channels_last"
    md = (out / "conv1_stack.md").read_text()
    assert "| 2x16x9x7 | train |" in md and md.count("| separate |\n") == 2, md
    bad = subprocess.run([sys.executable, script, "--shapes", "12x9x7", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "multiple of 8" in bad.stderr


@pytest.mark.background("pooled_bn")
def test_bench_pooled_bn_script(tmp_path):
    """benchmarks/bench_pooled_bn.py: k2's BatchNorm inside the gate and as the module, three modes, and
    which of the two each setting actually ran (``k2_norm``)."""
    from scnet_fused import bench

    if bench.fused_modules_reason() is not None:
        pytest.skip(bench.fused_modules_reason())
    (r,), out = _bg("pooled_bn")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "pooled_bn.json").read_text())
    assert sorted((row["provider"], row["mode"]) for row in rows) == sorted(
        (p, m) for p in ("module", "gate") for m in ("train", "eval", "inference"))
    for row in rows:
        assert row["shape"] == "2x8x9x7" and row["k2_norm"] == row["provider"]
        assert row["rounds"] == 2 and 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["dtype"] == "bf16 autocast" and row["layout"] == "channels_last"
        assert (row["saved_bytes"] is not None and row["saved_bytes"] > 0) == (row["mode"] == "train")
    saved = {row["provider"]: row["saved_bytes"] for row in rows if row["mode"] == "train"}
    assert saved["gate"] < saved["module"]  # the normalized pooled map is not kept
    md = (out / "pooled_bn.md").read_text()
    assert "| 2x8x9x7 | train |" in md and md.count("| 2x8x9x7 |") == 3, md


@pytest.mark.background("layout_step")
def test_bench_layout_step_script(tmp_path):
    """benchmarks/bench_layout_step.py: reference and fused, each in both memory formats, in one process."""
    from scnet_fused import bench

    if bench.fused_modules_reason() is not None:
        pytest.skip(bench.fused_modules_reason())
    (r,), out = _bg("layout_step")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "layout_step.json").read_text())
    assert sorted((row["provider"], row["layout"]) for row in rows) == [
        ("eager", "channels_last"), ("eager", "nchw"), ("fused", "channels_last"), ("fused", "nchw")]
    for row in rows:
        assert len(row["rounds_ms"]) == 2 and row["median_ms"] > 0 and row["mode"] == "train"
        assert row["out_channels_last"] == (row["layout"] == "channels_last")  # each variant ran in its format
    assert "| 2x5x13x14 |" in (out / "layout_step.md").read_text()
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_layout_step.py"), "--shapes", "0x4x4",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "0x4x4" in bad.stderr




@pytest.mark.background("winograd")
def test_bench_winograd_script(tmp_path):
    """benchmarks/bench_winograd.py: the convolution both ways and the SCConv with each, in one process;
    --markdown-from rewrites the table from the JSON."""
    from scnet_fused import bench
    from scnet_fused.ops import winograd

    if bench.fused_modules_reason() is not None or not winograd._kernels_present():
        pytest.skip("no compiled CPU kernels")
    (r,), out = _bg("winograd")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "winograd.json").read_text())
    assert len(rows) == 12 and all(len(row["rounds_ms"]) == 2 and row["median_ms"] > 0 for row in rows)
    assert {(row["op"], row["provider"]) for row in rows} >= {("conv forward", "winograd"),
                                                              ("scconv train", "fused winograd"),
                                                              ("scconv train", "fused auto")}
    assert all(row["rel_error_winograd"] < 1e-4 for row in rows)
    md = (out / "winograd.md").read_text()
    assert md.count("| 2x16x13x14 |") == 3, md
    (out / "winograd.md").unlink()
    again = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_winograd.py"), "--markdown-from",
                            str(out / "winograd.json")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (out / "winograd.md").read_text() == md


@pytest.mark.background("stem")
def test_bench_stem_script():
    """benchmarks/bench_stem.py: the pool rows (ATen's kernels and the package's), JSON and Markdown."""
    from scnet_fused.ops import maxpool

    if not maxpool._kernel_ready():
        pytest.skip("no vectorized CPU kernel build")
    (r,), out = _bg("stem")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "stem.json").read_text())["rows"]
    assert len(rows) == 5 and all(row["median_ms"] > 0 and row["shape"] == "1x64x112x112" for row in rows)
    assert "| pool | scnet_fused NCHW, with indices | 1x64x112x112 |" in (out / "stem.md").read_text()


@pytest.mark.background("compile_model")
def test_bench_compile_model_script(tmp_path, capsys):
    """benchmarks/bench_compile_model.py: a small SCNet's training step, eager and compiled, JSON and
    Markdown with the rounds; bad variants refused before anything is built."""
    (r,), out = _bg("compile_model")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "compile_model.json").read_text())["rows"]
    assert [(row["what"], row["variant"]) for row in rows] == [
        ("first two steps", "reference:eager"), ("first two steps", "fused:compile"),
        ("training step", "reference:eager"), ("training step", "fused:compile")]
    assert all(row["median_ms"] > 0 and row["shape"] == "2x3x64" for row in rows)
    assert "- fused:compile: " in (out / "compile_model.md").read_text()
    _script_usage_errors("bench_compile_model", tmp_path, capsys, [
        (["--variants", "fused:jit"], "bad variant 'fused:jit'"),
        (["--variants", "mine:eager"], "bad variant 'mine:eager'"),
        (["--variants", "fused:eager:nhwc"], "bad variant"),
        (["--layers", "1,0,1,1"], "--layers")])


def test_bench_compile_time_script_usage_errors(tmp_path, capsys):
    """benchmarks/bench_compile_time.py refuses bad arguments before it starts a process. (Its runs are
    fresh processes that compile an SCNet, a minute or more of CPU even for a small one: measured by hand,
    benchmarks/results/cpu-xeon/compile_time.md, not run here.)"""
    _script_usage_errors("bench_compile_time", tmp_path, capsys, [
        (["--variants", "fused:jit"], "--variants must name"),
        (["--variants", ","], "--variants must name"),
        (["--layers", "1,0,1,1"], "--layers"),
        (["--layers", "1,1,1"], "--layers"),
        (["--rounds", "0"], "--rounds must be a positive integer"),
        (["--image-size", "64"], "at least 128")])


@pytest.mark.background("eager_layout")
def test_bench_eager_layout_script(tmp_path, capsys):
    """benchmarks/bench_eager_layout.py: a small fused SCNet's training step and eval forward with NCHW
    and channels_last maps, JSON and Markdown with the per-round ratios; bad arguments refused."""
    (r,), out = _bg("eager_layout")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "eager_layout.json").read_text())["rows"]
    assert [(row["what"], row["shape"], row["variant"]) for row in rows] == [
        (what, shape, v) for what, shape in (("training step", "2x3x128x128"), ("eval forward", "2x3x128x128"),
                                             ("eval forward", "1x3x64x64")) for v in ("nchw", "channels_last")]
    assert all(row["median_ms"] > 0 for row in rows)
    md = (out / "eager_layout.md").read_text()
    assert "- eval forward 1x3x64x64: " in md and "| training step | channels_last | 2x3x128x128 |" in md
    _script_usage_errors("bench_eager_layout", tmp_path, capsys, [
        (["--shapes", "8x"], "bad shape '8x'"),
        (["--shapes", "2x16"], "below the model's 32 px"),
        (["--modes", "infer"], "bad mode 'infer'"),
        (["--shapes", "1x128"], "batch size 1 at 128 px"),
        (["--layers", "1,1,1"], "--layers"),
        (["--reps", "0"], "at least 1")])


@pytest.mark.background("downsample")
def test_bench_downsample_script():
    """benchmarks/bench_downsample.py: the strided and subsampled 1x1 convolutions, JSON and Markdown."""
    (r,), out = _bg("downsample")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "downsample.json").read_text())["rows"]
    assert len(rows) == 12 and all(row["median_ms"] > 0 for row in rows)
    assert sorted({row["variant"] for row in rows}) == ["strided (oneDNN)", "subsampled, stride 1"]


@pytest.mark.background("winograd_policy")
def test_bench_winograd_policy_script():
    """benchmarks/bench_winograd_policy.py: the reference and the fused SCConv under each Winograd policy,
    JSON and Markdown; the policy setting is restored."""
    (r,), out = _bg("winograd_policy")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "winograd_policy.json").read_text())["rows"]
    assert len(rows) == 7 * 2 * 5 and all(row["median_ms"] > 0 for row in rows)
    assert sorted({row["variant"] for row in rows}) == [
        "fused, auto", "fused, auto, weight gradient inside wherever eligible", "fused, one kernel",
        "fused, three passes", "reference (eager)"]
    assert "| SCConv train step | fused, auto | 2x256x7x7 |" in (out / "winograd_policy.md").read_text()


@pytest.mark.background("double_backward")
def test_bench_double_backward_script():
    """benchmarks/bench_double_backward.py: the reference and the fused SCConv, with and without an
    input-gradient penalty, JSON and Markdown."""
    (r,), out = _bg("double_backward")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "double_backward.json").read_text())["rows"]
    assert len(rows) == 4 * 4 and all(row["median_ms"] > 0 for row in rows)
    assert sorted({row["variant"] for row in rows}) == [
        "fused, no penalty", "fused, penalty", "reference (eager), no penalty", "reference (eager), penalty"]
    assert "| SCConv train step | fused, penalty | 2x256x7x7 |" in (out / "double_backward.md").read_text()


@pytest.mark.background("k4_norm")
def test_bench_k4_norm_script():
    """benchmarks/bench_k4_norm.py: k4's BatchNorm alone and the SCConv step with either BatchNorm."""
    from scnet_fused.ops import _cpp

    if not _cpp.has_autograd_ops():
        pytest.skip("no compiled C++ autograd ops")
    (r,), out = _bg("k4_norm")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "k4_norm.json").read_text())["rows"]
    assert len(rows) == 7 * 5 and all(row["median_ms"] > 0 for row in rows)
    assert "| SCConv train step | fused, k4 BatchNorm as the package's kernels | 2x256x7x7 |" in \
        (out / "k4_norm.md").read_text()


@pytest.mark.background("conv1x1")
def test_bench_conv1x1_script():
    """benchmarks/bench_conv1x1.py: SCNet-50's 1x1 convolutions through oneDNN and as matrix products."""
    (r,), out = _bg("conv1x1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "conv1x1.json").read_text())["rows"]
    assert len(rows) == 15 * 2 * 2 and all(row["median_ms"] > 0 for row in rows)
    assert sorted({row["variant"] for row in rows}) == ["matrix products", "oneDNN"]
    assert "| 1x1 convolution, forward + backward | matrix products | 1x1024x7x7 -> 2048 |" in \
        (out / "conv1x1.md").read_text()


@pytest.mark.background("small_inference")
def test_bench_small_inference_script():
    """benchmarks/bench_small_inference.py: scnet50's blocks at inference, reference against fused with and
    without the small-map rule."""
    (r,), out = _bg("small_inference")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "small_inference.json").read_text())["rows"]
    assert len(rows) == 4 * 8 * 3 and all(row["median_ms"] > 0 for row in rows)
    assert "| layer4[1] eval forward (scnet50 at 2x3x128x128) | reference | 2x2048x4x4 |" in \
        (out / "small_inference.md").read_text()


@pytest.mark.background("winograd_parts")
def test_bench_winograd_parts_script(tmp_path, capsys):
    """benchmarks/bench_winograd_parts.py: the products, the convolutions, the weight gradients and the
    filter transforms, each implementation against the other."""
    from scnet_fused.ops import winograd

    if not winograd._kernels_present():
        pytest.skip("no compiled CPU kernels")
    (r,), made = _bg("winograd_parts")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((made / "winograd_parts.json").read_text())
    # 2 shapes x 2 orientations x 2 implementations, 2 shapes x 5 convolutions, 2 shapes x (4 forward + 3
    # weight gradient) from the filters, 2 shapes x 3 weight gradients from the maps, 2 filter sizes x 3
    # transforms x 2 implementations
    assert len(rows) == 8 + 10 + 14 + 6 + 12 and all(len(row["rounds_ms"]) == 2 and row["median_ms"] > 0 for row in rows)
    assert sorted(r["provider"] for r in rows if r["op"] == "weight gradient from the maps") == \
        sorted(["separate", "separate, torch.bmm", "inside"] * 2)
    assert sorted(r["provider"] for r in rows if r["op"].startswith("from the filters")) == \
        sorted(["F.conv2d", "separate", "separate, three passes, torch.bmm", "inside",
                "separate", "separate, torch.bmm", "inside"] * 2)
    assert all(row["gflops"] > 0 for row in rows if row["op"].startswith("products"))
    assert sorted(r["provider"] for r in rows if r["op"] == "convolution forward") == \
        sorted(["F.conv2d", "three passes", "three passes, torch.bmm", "one kernel", "made inside"] * 2)
    md = (made / "winograd_parts.md").read_text()
    assert md.count("| 2x16x13x14 |") == 6 and md.count("| 32x32x3x3 |") == 3, md
    assert "| 2x32x8x8 | 8 |" in md  # the convolutions' row, with its tiles
    # --parts (in this process): only the convolutions, the other tables left out; an unknown part refused
    out = tmp_path / "conv"
    spec = importlib.util.spec_from_file_location("bench_winograd_parts", os.path.join(ROOT, "benchmarks",
                                                                                       "bench_winograd_parts.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shapes", "32x8x8", "--batch-size", "2", "--rounds", "1", "--min-run-time", "0.02",
                     "--device", "cpu", "--default-malloc", "--parts", "conv", "--out", str(out)]) == 0
    rows = json.loads((out / "winograd_parts.json").read_text())
    assert len(rows) == 5 and {row["op"] for row in rows} == {"convolution forward"}
    md = (out / "winograd_parts.md").read_text()
    assert "| 2x32x8x8 | 8 |" in md and "GFLOP/s" not in md and "matrix product ms" not in md, md
    _script_usage_errors("bench_winograd_parts", tmp_path, capsys, [(["--parts", "conv,nope"], "unknown nope"),
                                                                   (["--parts", ","], "(none given)")])


@pytest.mark.background("bn_backward")
def test_bench_bn_backward_script(tmp_path, capsys):
    """benchmarks/bench_bn_backward.py: the strategies of the BatchNorm gate backward and forward and of
    the BatchNorm + ReLU backward, interleaved."""
    from scnet_fused.ops import _dispatch

    if _dispatch.available("cpu") is not None:
        pytest.skip(_dispatch.available("cpu"))
    gate = ("recompute", "from g", "one call")
    # (files' stem, strategies, which of the two processes wrote them)
    runs = [("bn_backward", gate, 0), ("bn_forward", ("two passes", "one call"), 0),
            ("bn_relu_backward", ("aten", "two passes", "one call"), 0),
            ("gate_backward_sums", ("with sums", "without sums"), 0), ("bn_backward_channels_last", gate, 1)]
    done, out = _bg("bn_backward")
    assert len(done) == len(_BN_BACKWARD_EXTRA)
    for r in done:
        assert r.returncode == 0, r.stderr[-3000:]
    for stem, strategies, proc in runs:
        extra = _BN_BACKWARD_EXTRA[proc]
        rows = json.loads((out / f"{stem}.json").read_text())
        assert sorted((row["shape"], row["strategy"]) for row in rows) == sorted(
            (s, k) for s in ("2x3x16x16", "2x2x7x7") for k in strategies)
        assert all(len(row["rounds_ms"]) == 2 and row["median_ms"] > 0 for row in rows)
        assert all(row["channels_last"] == ("--channels-last" in extra) for row in rows)
        assert all(row["mode"] == ("forward" if stem == "bn_forward" else "backward") for row in rows)
        assert all(row["threads"] == 1 and "fixed at 32 MiB" not in row["allocator"] for row in rows) or "--threads" not in extra
        # the strategies compute the same gradient (float32 rounding apart)
        assert all(row["max_rel_diff"] < 1e-5 for row in rows)
        if stem == "gate_backward_sums":  # the same dx bit for bit
            assert all(row["max_rel_diff"] == 0 for row in rows)
        md = (out / f"{stem}.md").read_text()
        assert "| 2x3x16x16 |" in md and "| 2x2x7x7 |" in md
        assert f"| {strategies[-1]} vs {strategies[0]} |" in md
    _script_usage_errors("bench_bn_backward", tmp_path, capsys,
                         [(["--shapes", "0x4x4"], "0x4x4"), (["--rounds", "0"], "--rounds"), (["--dtype", "fp64"], "fp64"),
                          (["--op", "relu"], "relu"), (["--op", "gate,"], "unknown op")])


@pytest.mark.background("stream_stores")
def test_bench_stream_stores_script(tmp_path, capsys):
    """benchmarks/bench_stream_stores.py: the three SCNET_FUSED_CPU_STREAM settings, interleaved in one
    process, for each op."""
    from scnet_fused.ops import _dispatch

    if _dispatch.available("cpu") is not None:
        pytest.skip(_dispatch.available("cpu"))
    (r,), out = _bg("stream_stores")  # run with SCNET_FUSED_CPU_STREAM=0: the script sets each itself
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "stream_stores.json").read_text())
    assert sorted({(row["shape"], row["mode"], row["stream"]) for row in rows}) == sorted(
        (s, m, k) for s in ("2x3x16x16", "2x2x7x7") for m in ("forward", "backward", "backward+dk3")
        for k in ("0", "auto", "1"))
    assert len(rows) == 18 and all(len(row["rounds_ms"]) == 2 and row["median_ms"] > 0 for row in rows)
    md = (out / "stream_stores.md").read_text()
    can = "yes" if rows[0]["cpu_isa"] in ("avx2", "avx512") else "no"
    assert f"| gate | backward | 2x3x16x16 | {can} |" in md and "| gate | forward | 2x2x7x7 | no |" in md
    _script_usage_errors("bench_stream_stores", tmp_path, capsys,
                         [(["--ops", "sideways"], "sideways"), (["--shapes", "0x4x4"], "0x4x4"), (["--rounds", "0"], "--rounds")])


@pytest.mark.background("route")
def test_bench_route_script(tmp_path, capsys, monkeypatch):
    """benchmarks/bench_route.py: the public gate ops with route's shortcut and without, interleaved in
    one process; refused where the shortcut would not be taken."""
    from scnet_fused.ops import _dispatch

    if _dispatch.available("cpu") is not None:
        pytest.skip(_dispatch.available("cpu"))
    (r,), out = _bg("route")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "route.json").read_text())
    assert sorted((row["shape"], row["op"], row["setting"]) for row in rows) == sorted(
        (s, o, k) for s in ("2x3x16x16", "2x2x7x7") for o in ("gate", "gate_bn") for k in ("shortcut", "full"))
    assert all(len(row["rounds_ms"]) == 2 and row["median_ms"] > 0 and row["input_sets"] >= 1 for row in rows)
    md = (out / "route.md").read_text()
    assert "| gate | forward | 2x3x16x16 |" in md and "| gate_bn | forward | 2x2x7x7 |" in md
    _script_usage_errors("bench_route", tmp_path, capsys,
                         [(["--ops", "sideways"], "sideways"), (["--shapes", "0x4x4"], "0x4x4"), (["--rounds", "0"], "--rounds")])
    monkeypatch.setenv("SCNET_FUSED_BACKEND", "cpu")  # set: select reads it, no shortcut to time
    _script_usage_errors("bench_route", tmp_path, capsys, [(["--shapes", "2x7x7"], "shortcut is not taken")])
    monkeypatch.delenv("SCNET_FUSED_BACKEND")
    monkeypatch.setenv("SCNET_FUSED_CPP_AUTOGRAD", "0")  # the torch.library path: no C++ op to time
    _script_usage_errors("bench_route", tmp_path, capsys, [(["--shapes", "2x7x7"], "shortcut is not taken")])


@pytest.mark.background("first_step")
def test_bench_first_step_script(tmp_path, capsys):
    """benchmarks/bench_first_step.py: each first call timed in a process of its own, compile with an
    empty inductor cache and again with the one that run filled; bad arguments refused before any run."""
    from scnet_fused import bench

    if bench.fused_modules_reason() is not None:
        pytest.skip(bench.fused_modules_reason())
    _script_usage_errors("bench_first_step", tmp_path, capsys, [
        (["--modes", "backward"], "unknown mode"),
        (["--shapes", "8x2x2"], "pooling_r"),
        (["--batch-size", "0"], "positive integer"),
        (["--device", "tpu"], "device"),
    ] + ([] if bench.torch.cuda.is_available() else [(["--device", "cuda"], "not available")]))
    (r,), out = _bg("first_step")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "first_step.json").read_text())
    assert len(rows) == 1 and rows[0]["mode"] == "eval" and rows[0]["shape"] == "2x8x8x8"
    for kind in ("eager", "fused", "compile_cold", "compile_warm"):
        assert rows[0][f"{kind}_ms"] > 0
    assert rows[0]["vs_compile_cold"] == pytest.approx(rows[0]["fused_ms"] / rows[0]["compile_cold_ms"])
    assert "| 2x8x8x8 | eval |" in (out / "first_step.md").read_text()
