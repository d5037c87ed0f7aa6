"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU, with no register spills
(asserted from triton 3.5 on, see SPILL_FREE_FROM), twice: with its integer arguments unknown, and
marked multiples of 16 as the JIT specializes them for most SCNet shapes (different code: vector
accesses, other registers). In the second form the channels_last variants, and the NCHW ones that
walk a flat index or whole rows, must load (the NCHW k2 pool: store) 64- or 128-bit vectors in the PTX
(``must_vectorize``); the NCHW gate kernels, which walk each pooled cell's run of columns, are reported.

With ``TRITON_INTERPRET=1`` set when a kernel is defined (conftest sets it on GPU-less machines),
``triton.jit`` returns an interpreter object that ``triton.compile`` cannot take, so the compilation
runs in fresh subprocesses (one per architecture, in parallel) with ``TRITON_INTERPRET=0`` and an empty
Triton cache. Each compiles the entries of ``scnet_fused.triton.sc_gate.aot_kernels()`` and reads the
resources of the cubin Triton produced (``cuobjdump --dump-resource-usage``: registers, stack frame,
local memory; ptxas puts spills in the stack frame) and the shared memory Triton launches it with.
The report goes to ``benchmarks/results/triton_resources.json`` and ``.md``.

Run by hand: ``python tests/test_aot_compile.py 90 out.json`` (one architecture), then
``python tests/test_aot_compile.py --report STEM sm80.json sm90.json`` writes ``benchmarks/results/STEM.*``
from such runs (the report of another Triton version, for instance).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

from _util import access_summary

ROOT = Path(__file__).resolve().parents[1]
# The Triton version from which no kernel spills registers (checked with 3.5.1, torch 2.9's, 3.6.0, the GPU
# machines', and 3.8.0). Triton 3.2.0 spills 8 bytes on sm_90 in 3 of the 114 compiles (affine_relu_sums on a channel
# slice, NCHW fp32 and bf16; the NHWC bf16 avgpool forward with 64-bit offsets): reported, not failed.
SPILL_FREE_FROM = (3, 5)
RESULTS = ROOT / "benchmarks" / "results"
ARCHS = (80, 90)


# ---------------------------------------------------------------------------------------------
# Compatibility shim over the triton versions we support (3.2 .. 3.8)
# ---------------------------------------------------------------------------------------------


def make_source(fn, signature: dict, constexprs: dict, ints16: bool = False):
    """``ASTSource`` for ``fn``: pointers marked 16-byte aligned (as the JIT specializes torch tensors);
    with ``ints16`` every integer argument marked a multiple of 16 too (as the JIT specializes one that
    is: the strides, sizes and counts of most SCNet shapes).

    The third argument is named ``constants`` in triton 3.2 and ``constexprs`` from 3.3 on (both keyed
    by argument name, with the constexpr arguments also listed in the signature as ``"constexpr"``):
    pass it positionally. Alignment hints are an ``AttrsDescriptor`` in 3.2, a dict from 3.3 on.
    """
    from triton.compiler import ASTSource

    ptr_idx = [fn.arg_names.index(k) for k, v in signature.items()
               if str(v).startswith("*") or (ints16 and v in ("i32", "i64"))]
    attrs = None
    try:
        from triton.backends.compiler import AttrsDescriptor  # triton 3.2
    except ImportError:
        attrs = {(i,): [["tt.divisibility", 16]] for i in ptr_idx}
    else:
        try:
            attrs = AttrsDescriptor.from_hints({(i,): 16 for i in ptr_idx})
        except Exception:  # pragma: no cover - hint format of an untested version
            attrs = None
    params = inspect.signature(ASTSource.__init__).parameters
    if "attrs" in params and attrs is not None:
        return ASTSource(fn, signature, constexprs, attrs)
    return ASTSource(fn, signature, constexprs)


def _tool(name: str):
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _resources(compiled, arch: int) -> dict:
    """Registers and stack/local bytes of the compiled cubin, shared memory from Triton's metadata."""
    res = {"shared_bytes": int(compiled.metadata.shared)}
    cuobjdump = _tool("cuobjdump")
    if cuobjdump:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        finally:
            os.unlink(f.name)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
        if m:
            res.update(registers=int(m.group(1)), spill_bytes=int(m.group(2)) + int(m.group(3)),
                       method="cuobjdump")
            return res
    # Fallback: ptxas -v on the PTX (may differ slightly from Triton's own ptxas flags).
    ptxas = _tool("ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    res.update(registers=int(regs.group(1)), spill_bytes=int(spills.group(1)) + int(spills.group(2)),
               method="ptxas -v")
    return res


_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*?)(\.v[248])?\.[bfsu](8|16|32|64)\b")


def ptx_accesses(ptx: str) -> dict:
    """The global loads and stores of a kernel's PTX by vector width in bits: ``{"ld128": n, "st32": m}``
    (``ld.global.v4.b32`` is 128, ``ld.global.b16`` 16)."""
    out: dict = {}
    for m in _PTX_ACCESS.finditer(ptx):
        lanes = int(m.group(3)[2:]) if m.group(3) else 1
        key = f"{m.group(1)}{lanes * int(m.group(4))}"
        out[key] = out.get(key, 0) + 1
    return out


# Variants whose full-size accesses must be vectors (64 or 128 bits a lane) once the JIT knows the
# integer arguments are multiples of 16: the loads of everything in channels_last and of the kernels
# that walk a flat index in NCHW, and of the NCHW gate kernels where the column runs are uniform
# (``_run4``: 56 -> 14 and 28 -> 7 px), and of the NCHW k2 pool forward that reads a window row as
# one vector (``_rowvec``). Otherwise the NCHW pool reads (forward) or writes (backward) r-element
# runs of rows: there its stores must be. The other NCHW gate variants walk each pooled
# cell's run of columns from the table, starts the compiler cannot know aligned (one element a lane,
# coalesced across lanes): reported.
def must_vectorize(variant: str):
    """"ld" or "st": which of the variant's global accesses must include 64- or 128-bit ones once the
    integer arguments are known multiples of 16; None: neither."""
    if variant.startswith("gate_") and "_nchw_" in variant and "_run" not in variant:
        return None
    if variant.startswith("avgpool_") and "_nchw_" in variant and not variant.endswith("_rowvec"):
        return "st"
    return "ld"


def compile_all(arch: int) -> list:
    """Compile every AOT entry for ``arch`` (run with TRITON_INTERPRET=0); one result row each."""
    import triton
    from triton.backends.compiler import GPUTarget

    from scnet_fused.triton import sc_gate

    rows = []
    for ints16 in (False, True):
        for name, fn, signature, constexprs in sc_gate.aot_kernels():
            options = sc_gate.kernel_options(constexprs)
            row = {"kernel": fn.__name__, "variant": name, "ints": "multiples of 16" if ints16 else "any",
                   "arch": f"sm_{arch}", "num_warps": options["num_warps"], "triton": triton.__version__}
            try:
                compiled = triton.compile(make_source(fn, signature, constexprs, ints16),
                                          target=GPUTarget("cuda", arch, 32), options=options)
                row.update(_resources(compiled, arch), accesses=ptx_accesses(compiled.asm["ptx"]), ok=True)
            except Exception as exc:  # reported, and failed, by the test
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------


def _write_report(rows: list, stem: str = "triton_resources") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Triton kernels: resources at compile time",
        "",
        "Compiled ahead of time without a GPU (`tests/test_aot_compile.py`, triton "
        f"{rows[0].get('triton', '?')}); registers and spill bytes (stack frame + local memory) of the cubin, "
        "shared memory as launched. Each variant twice: with the integer arguments unknown (any), and "
        "marked multiples of 16 as the JIT specializes them for most SCNet shapes. Global accesses: the "
        "PTX's global loads (ld) and stores (st) by width in bits and count (128: a 16-byte vector).",
        "",
        "| kernel | variant | integer args | arch | warps | registers | spill bytes | shared bytes "
        "| global accesses |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| `{r['kernel']}` | {r['variant']} | {r.get('ints', 'any')} | {r['arch']} | {r['num_warps']} |"
        if r.get("ok"):
            lines.append(f"{head} {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                         f"{access_summary(r.get('accesses'))} |")
        else:
            lines.append(f"{head} compile error | | | |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def test_aot_compile_sm80_sm90(tmp_path):
    pytest.importorskip("triton")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    if _tool("ptxas") is None:
        pytest.skip("no ptxas")

    procs = []
    for arch in ARCHS:
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / f"cache{arch}"),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        out = tmp_path / f"sm{arch}.json"
        procs.append((arch, out, subprocess.Popen([sys.executable, __file__, str(arch), str(out)], cwd=ROOT, env=env,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    rows = []
    for arch, out, proc in procs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{arch} compile script failed:\n{log[-4000:]}"
        rows += json.loads(out.read_text())

    rows.sort(key=lambda r: (r["kernel"], r["variant"], r.get("ints", ""), r["arch"]))
    _write_report(rows)
    failed = [f"{r['variant']} {r['arch']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "compile errors:\n" + "\n".join(failed)
    # the channels_last paths (and the flat NCHW ones) move vectors once the JIT knows the alignment
    scalar = []
    for r in rows:
        side = must_vectorize(r["variant"]) if r["ints"] == "multiples of 16" else None
        if side and not any(r["accesses"].get(f"{side}{w}") for w in (64, 128)):
            scalar.append(f"{r['variant']} {r['arch']}: {access_summary(r['accesses'])}")
    assert not scalar, f"no vector {side} where the alignment is known:\n" + "\n".join(scalar)
    # the row-vector pool forward reads every window row as one vector whatever the integers are (W = 56
    # or 28 is no multiple of 16): no load narrower than R = 4 elements
    narrow = [f"{r['variant']} {r['ints']} {r['arch']}: {access_summary(r['accesses'])}" for r in rows
              if r["variant"].endswith("_rowvec") and any(k in r["accesses"] for k in ("ld8", "ld16", "ld32"))]
    assert not narrow, "row-vector pool loads narrower than a row:\n" + "\n".join(narrow)
    spilled = [f"{r['variant']} {r['ints']} {r['arch']}: {r['spill_bytes']} bytes" for r in rows if r["spill_bytes"]]
    import triton

    from scnet_fused.ops._dispatch import _release

    if _release(triton.__version__) >= SPILL_FREE_FROM:
        assert not spilled, "register spills:\n" + "\n".join(spilled)
    elif spilled:  # an older Triton: compiled, and its spills reported (in the report files too)
        warnings.warn(f"triton {triton.__version__} spills registers (0 from triton "
                      f"{'.'.join(map(str, SPILL_FREE_FROM))} on): " + "; ".join(spilled))
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_gate_fwd_kernel", "_gate_bwd_kernel", "_gate_bwd_k3_kernel", "_channel_stats_kernel",
                       "_stats_finalize_kernel",
                       "_avgpool_fwd_kernel", "_avgpool_bwd_kernel", "_affine_relu_pointwise_kernel",
                       "_affine_relu_sums_kernel"}
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS}


if __name__ == "__main__":
    if sys.argv[1] == "--report":  # --report STEM sm80.json sm90.json: the report of per-arch runs
        _rows = [r for p in sys.argv[3:] for r in json.loads(Path(p).read_text())]
        _write_report(sorted(_rows, key=lambda r: (r["kernel"], r["variant"], r["arch"])), sys.argv[2])
    else:
        _arch, _out = int(sys.argv[1]), sys.argv[2]
        Path(_out).write_text(json.dumps(compile_all(_arch)))
