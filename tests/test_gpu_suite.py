"""benchmarks/gpu_suite.sh, the one command a GPU machine runs: its shell syntax, and every scnet_fused
and benchmark command line in it read by that program's own argument parser (nothing is run), so a
renamed or mistyped flag fails here, on any machine, instead of costing a run on the GPU."""

import argparse
import importlib.util
import os
import re
import shlex
import subprocess

import pytest

from scnet_fused import __main__ as cli
from scnet_fused import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


class _Parsed(Exception):
    def __init__(self, args):
        super().__init__("parsed")
        self.args_ns = args


def _suite_commands():
    """(program, argv) of each `$PY -m scnet_fused ...` and `$PY benchmarks/....py ...` in the suite, with
    its shell variables ($T, $OUT, $MODEL_PROVIDERS) substituted as the script sets them."""
    text = open(SUITE).read().replace("\\\n", " ")
    t_opts = re.search(r'^T="([^"]*)"', text, re.M).group(1)
    providers = re.search(r"^MODEL_PROVIDERS=(\S+)", text, re.M).group(1)
    cmds = []
    for line in text.splitlines():
        m = re.search(r"\$PY (-m scnet_fused|benchmarks/\S+\.py) (.*)$", line)
        if not m:
            continue
        rest = m.group(2).replace("$T", t_opts).replace("$MODEL_PROVIDERS", providers)
        rest = rest.replace('"$OUT"', "/tmp/suite-out").replace("$OUT", "/tmp/suite-out")
        assert "$" not in rest, f"unsubstituted shell variable in: {line.strip()}"
        program = "scnet_fused" if m.group(1) == "-m scnet_fused" else m.group(1)
        cmds.append((program, shlex.split(rest)))
    return cmds


def test_suite_is_valid_shell():
    proc = subprocess.run(["bash", "-n", SUITE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_suite_names_what_exists():
    cmds = _suite_commands()
    programs = {p for p, _ in cmds}
    # info, check, four bench runs of the package's CLI, the model and inference benchmarks.
    assert sum(p == "scnet_fused" for p, _ in cmds) >= 6, cmds
    assert {"benchmarks/bench_model.py", "benchmarks/bench_infer.py"} <= programs, programs
    for p in programs - {"scnet_fused"}:
        assert os.path.isfile(os.path.join(ROOT, p)), p
    text = open(SUITE).read()
    for test_file in re.findall(r"tests/test_\w+\.py", text):
        assert os.path.isfile(os.path.join(ROOT, test_file)), test_file
    assert '"gpu: ' in open(os.path.join(ROOT, "pyproject.toml")).read()  # the -m gpu marker is declared


@pytest.mark.parametrize("program,argv", _suite_commands(), ids=lambda v: v if isinstance(v, str) else "-".join(v[:2]))
def test_suite_command_lines_parse(program, argv, monkeypatch):
    if program == "scnet_fused":
        try:
            ns = cli.build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"python -m scnet_fused {' '.join(argv)}: refused by its parser ({exc})")
        if ns.command == "bench":  # the values `bench` checks itself once it runs
            assert set(ns.ops) <= set(cli._BENCH_OPS), ns.ops  # the list options parse to lists
            assert set(ns.providers or ()) <= set(bench.PROVIDERS), ns.providers
            for d in ns.dtype:
                bench.parse_dtype(d)
        return
    # A benchmark script builds its parser inside main(): stop right after parse_args.
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    spec = importlib.util.spec_from_file_location("suite_script", os.path.join(ROOT, program))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(_Parsed):
        try:
            mod.main(argv)
        except SystemExit as exc:
            pytest.fail(f"{program} {' '.join(argv)}: refused by its parser ({exc})")
