"""Compile the CUDA sources for sm_80 and sm_90 without a GPU and check their resource use and code.

One device-only nvcc invocation per .cu (``--fatbin``: both -gencode targets through ptxas with
``-Xptxas -v``; the host side is compiled by the extension build of setup.py), the files in parallel,
an unchanged file's log and fatbin reused from build/ptxas; fails on a compile error or on any register
spill. The fatbin's SASS (``cuobjdump -sass``) gives each kernel's global loads and stores by width,
and the 16-byte vector paths must compile to 128-bit ones. The per-kernel report (registers, spills,
stack, shared memory, access widths) is written to benchmarks/results/cuda_resources.json and .md.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from _util import access_summary

from scnet_fused._toolkit import cuda_build_decision, find_cuda_home, toolkit_version
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CACHE = os.path.join(ROOT, "build", "ptxas")
ARCHS = ("80", "90")


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled):
    """'void scnet_fused::cuda::(anon)::pointwise_kernel<float, unsigned int, true, 4>(...)' -> 'pointwise_kernel<float, unsigned int, true, 4>'."""
    name = demangled.split("(")[0] if "(" in demangled and "<" not in demangled.split("(")[0][-1:] else demangled
    m = re.search(r"(\w+_kernel(<[^()]*>)?)", demangled)
    return m.group(1) if m else name


def cuobjdump():
    """A cuobjdump: Triton's bundled one, else the toolkit's, else PATH's (None: none here)."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    home = find_cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
        return os.path.join(home, "bin", "cuobjdump")
    return shutil.which("cuobjdump")


_SASS_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def access_widths(sass):
    """{(mangled kernel, arch): {"LDG128": n, "STG32": m, ...}}: the global loads and stores of each
    kernel in ``cuobjdump -sass`` output, by access width in bits (a bare LDG.E / STG.E is 32)."""
    out, arch, key = {}, None, None
    for line in sass.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            key = (m.group(1), arch)
            out[key] = {}
            continue
        if key is None:
            continue
        for m in re.finditer(r"\b(LDG|STG)\.E((?:\.[A-Z0-9_]+)*)", line):
            mods = m.group(2).split(".")[1:]
            width = _SASS_WIDTH.get(mods[-1], 32) if mods else 32
            name = f"{m.group(1)}{width}"
            out[key][name] = out[key].get(name, 0) + 1
    return out


def parse_ptxas(log, fatbin=None):
    rows = []
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": f"sm_{m.group(2)}", "registers": None, "spill_stores": 0,
                       "spill_loads": 0, "stack_bytes": 0, "smem_bytes": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem_bytes"] = int(s.group(1)) if s else 0
    names = demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kernel"] = short_name(names[r["mangled"]])
    tool = cuobjdump() if fatbin else None
    if tool:
        sass = subprocess.run([tool, "-sass", fatbin], capture_output=True, text=True, check=True).stdout
        widths = access_widths(sass)
        for r in rows:
            r["global_accesses"] = widths.get((r["mangled"], r["arch"]))
    return rows


def write_report(rows, nvcc_version):
    os.makedirs(RESULTS, exist_ok=True)
    payload = {"tool": "nvcc -Xptxas -v", "nvcc": nvcc_version, "torch": torch.__version__,
               "archs": [f"sm_{a}" for a in ARCHS], "kernels": rows}
    with open(os.path.join(RESULTS, "cuda_resources.json"), "w") as f:
        json.dump(payload, f, indent=1)
    lines = ["# CUDA kernel resources (static, from ptxas and the SASS)", "",
             f"nvcc: {nvcc_version}; archs: {', '.join(payload['archs'])}; no GPU needed. Global accesses: the "
             "SASS's global load (LDG) and store (STG) instructions by width in bits and count (`cuobjdump "
             "-sass`); 128 is a 16-byte vector.", "",
             "| source | kernel | arch | registers | spill stores (B) | spill loads (B) | stack (B) | smem (B) "
             "| global accesses |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("source", ""), r["kernel"], r["arch"])):
        lines.append(f"| {r.get('source', '')} | `{r['kernel']}` | {r['arch']} | {r['registers']} | "
                     f"{r['spill_stores']} | {r['spill_loads']} | {r['stack_bytes']} | {r['smem_bytes']} | "
                     f"{access_summary(r.get('global_accesses'))} |")
    with open(os.path.join(RESULTS, "cuda_resources.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _with_source(rows, src):
    for r in rows:
        r["source"] = os.path.basename(src)
    return rows


@functools.lru_cache(maxsize=1)  # the tests of one process share one compile and one disassembly
def compile_sources():
    """ptxas's rows for every kernel of csrc/cuda/*.cu and the nvcc version; None when there is nothing
    to compile or no toolkit (with the reason). A file's ptxas log is kept in build/ptxas under a
    hash of everything its compile reads from this repository, the flags, nvcc's and torch's versions,
    so an unchanged file is not compiled again (`python tests/test_cuda_build.py` fills the cache)."""
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not sources:
        return None, "no CUDA sources in csrc/cuda"
    if torch.version.cuda is None:  # a CPU build of torch ships no c10/cuda configuration header
        return None, f"torch {torch.__version__} is a CPU build: the CUDA kernels build only against a CUDA build"
    home = find_cuda_home()
    if home is None:
        return None, "no CUDA toolkit found (set CUDA_HOME to the toolkit root)"
    nvcc = os.path.join(home, "bin", "nvcc")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    flags = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-I", os.path.join(ROOT, "csrc"), "-I", tinc, "-I", os.path.join(tinc, "torch", "csrc", "api", "include"),
             "-I", os.path.join(home, "include")]
    for a in ARCHS:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    version = version[-1] if version else "unknown"
    headers = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.h")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")))
    os.makedirs(CACHE, exist_ok=True)

    def compile_one(src):
        h = hashlib.sha256()
        for path in [src] + headers:
            h.update(os.path.relpath(path, ROOT).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
        h.update("\0".join(flags + [version, torch.__version__, nvcc]).encode())
        stem = os.path.join(CACHE, f"{os.path.basename(src)}.{h.hexdigest()[:24]}")
        log_path, fatbin = stem + ".log", stem + ".fatbin"
        if os.path.exists(log_path) and os.path.exists(fatbin):
            with open(log_path) as f:
                return _with_source(parse_ptxas(f.read(), fatbin), src)
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([nvcc, "--fatbin", src, "-o", os.path.join(tmp, "out.fatbin")] + flags,
                                  capture_output=True, text=True, timeout=600)
            log = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"nvcc failed on {src}:\n{log[-6000:]}"
            os.replace(os.path.join(tmp, "out.fatbin"), fatbin + ".part")
        os.replace(fatbin + ".part", fatbin)
        with open(log_path + ".part", "w") as f:
            f.write(log)
        os.replace(log_path + ".part", log_path)
        return _with_source(parse_ptxas(log, fatbin), src)

    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        rows = [r for part in pool.map(compile_one, sources) for r in part]
    for r in rows:
        r.pop("mangled", None)
    return rows, version


def test_cuda_sources_compile_without_spills():
    rows, version = compile_sources()
    if rows is None:
        pytest.skip(version)
    write_report(rows, version)
    assert rows, "ptxas reported no kernels"
    for a in ARCHS:
        assert any(r["arch"] == f"sm_{a}" for r in rows), f"no kernel compiled for sm_{a}"
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills:\n" + "\n".join(
        f"{r['kernel']} {r['arch']}: {r['spill_stores']} B stores, {r['spill_loads']} B loads" for r in spilled)


# The kernel families with a vector path: (source, kernel name) -> instantiations whose last template
# argument is the vector width, 16 bytes (4 floats, 8 halves or bfloat16s).
VECTOR_FAMILIES = {("sc_gate_cuda.cu", "pointwise_kernel"), ("sc_gate_cuda.cu", "backward_cells_kernel"),
                   ("sc_pool_cuda.cu", "avgpool_fwd_kernel"), ("sc_pool_cuda.cu", "avgpool_bwd_kernel"),
                   ("sc_bn_relu_cuda.cu", "pointwise_kernel"),
                   # the NCHW reductions (64-bit offsets, no index template): they store per-block partials
                   ("sc_gate_cuda.cu", "stats_nchw_kernel"), ("sc_bn_relu_cuda.cu", "sums_kernel"),
                   # and the NHWC ones reading Packs of channels
                   ("sc_gate_cuda.cu", "stats_nhwc_pack_kernel"), ("sc_bn_relu_cuda.cu", "sums_nhwc_pack_kernel")}
_REDUCTIONS = {"stats_nchw_kernel", "sums_kernel", "stats_nhwc_pack_kernel", "sums_nhwc_pack_kernel"}
_VEC = {"float": 4, "c10::Half": 8, "c10::BFloat16": 8}


def _vector_instance(kernel):
    """(family name, dtype) of a 16-byte vector instantiation with 32-bit indices (or of a reduction,
    ``name<T, V>``), else None."""
    m = (re.fullmatch(r"(\w+)<(float|c10::Half|c10::BFloat16), unsigned int, .*, (\d+)>", kernel)
         or re.fullmatch(r"(\w+)<(float|c10::Half|c10::BFloat16), (\d+)>", kernel))
    return (m.group(1), m.group(2)) if m and int(m.group(3)) == _VEC[m.group(2)] else None


def test_cuda_vector_paths_compile_to_16_byte_accesses():
    """The vector instantiations (what every aligned tensor below 2^31 elements runs) read and write
    their full-size tensors with 128-bit instructions in the SASS (the reductions only read them): a
    Pack the compiler split into narrower accesses, or a vector path missing for a dtype, fails here.
    (The 64-bit-index
    instantiations are in the report, not asserted: see README.)"""
    rows, version = compile_sources()
    if rows is None:
        pytest.skip(version)
    if cuobjdump() is None:
        pytest.skip("no cuobjdump (Triton's bundled one or the toolkit's)")
    seen = set()
    for r in rows:
        inst = _vector_instance(r["kernel"])
        if inst is None or (r["source"], inst[0]) not in VECTOR_FAMILIES:
            continue
        seen.add((r["source"], inst[0], inst[1], r["arch"]))
        acc = r["global_accesses"]
        assert acc, f"{r['kernel']} ({r['source']}, {r['arch']}) has no global accesses in the SASS"
        nchw_pool = inst[0].startswith("avgpool_") and ", false, " in r["kernel"]
        # the NCHW pool forward writes one mean a thread (its vector is a window row), so only its loads
        # are vectors; its backward reads the pooled map (a value per r outputs), so only its stores are
        if not (nchw_pool and inst[0] == "avgpool_fwd_kernel") and inst[0] not in _REDUCTIONS:
            assert acc.get("STG128"), f"{r['kernel']} ({r['source']}, {r['arch']}) stores no 16-byte vector: {acc}"
        if not (nchw_pool and inst[0] == "avgpool_bwd_kernel"):
            assert acc.get("LDG128"), f"{r['kernel']} ({r['source']}, {r['arch']}) loads no 16-byte vector: {acc}"
    missing = {(src, fam, dt, f"sm_{a}") for src, fam in VECTOR_FAMILIES for dt in _VEC for a in ARCHS} - seen
    assert not missing, "no 16-byte vector instantiation of: " + ", ".join(map(str, sorted(missing)))


def test_the_extension_carries_sass_for_each_arch_and_ptx_for_newer_gpus():
    """The built scnet_fused._C: a cubin for every architecture it was compiled for (nvcc's
    __CUDA_ARCH_LIST__, ``_C.cuda_arch_list``), and the last one's PTX, which the driver compiles for
    GPUs newer than any of them (sm_100, sm_120); without it they would have no kernel image to load."""
    from scnet_fused.ops import _cpp

    if _cpp.unavailable_reason("cuda") is not None:
        pytest.skip(_cpp.unavailable_reason("cuda"))
    arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_env is not None and "+PTX" not in arch_env.upper():
        pytest.skip(f"TORCH_CUDA_ARCH_LIST={arch_env!r} asks for no PTX")
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (Triton's bundled one or the toolkit's)")
    from scnet_fused import _C

    archs = [int(a) // 10 for a in _C.cuda_arch_list.split(",")]
    assert archs, _C.cuda_arch_list
    listing = {}
    for kind in ("elf", "ptx"):
        out = subprocess.run([tool, f"--list-{kind}", _C.__file__], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        listing[kind] = out.stdout
    for src in ("sc_gate_cuda", "sc_pool_cuda", "sc_bn_relu_cuda"):
        for a in archs:
            assert f"{src}.sm_{a}.cubin" in listing["elf"], (src, a, listing["elf"])
        assert f"{src}.sm_{archs[-1]}.ptx" in listing["ptx"], (src, listing["ptx"])

    # What the driver does with that PTX on a Blackwell GPU, done here by the toolkit's ptxas: it must
    # assemble for the data-centre (sm_100) and the workstation (sm_120) parts, without spills on sm_100.
    # (nvcc 13.0's ptxas spills 4 to 12 bytes in four kernels for sm_120: README, "Build details".)
    home = find_cuda_home()
    ptxas = os.path.join(home, "bin", "ptxas") if home else None
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("no toolkit ptxas to assemble the PTX with")
    known = subprocess.run([ptxas, "--help"], capture_output=True, text=True, timeout=60).stdout
    targets = [t for t in ("sm_100", "sm_120") if f"'{t}'" in known]
    if not targets:
        pytest.skip("this toolkit's ptxas knows neither sm_100 nor sm_120")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([tool, "-xptx", "all", _C.__file__], cwd=tmp, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".ptx"))
        assert len(files) == 3, files
        for f in files:
            for t in targets:
                res = subprocess.run([ptxas, f"-arch={t}", "-v", f, "-o", os.devnull], cwd=tmp, capture_output=True,
                                     text=True, timeout=300)
                assert res.returncode == 0, f"{f} for {t}: {res.stderr[-2000:]}"
                spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
                assert spills, res.stderr[-2000:]
                if t == "sm_100":
                    assert all(a == "0" and b == "0" for a, b in spills), f"{f} for {t} spills: {set(spills)}"


if __name__ == "__main__":  # pragma: no cover
    rows, version = compile_sources()
    print(f"ptxas: {len(rows)} kernel entries ({version})" if rows is not None else f"ptxas: skipped ({version})")


def _fake_toolkit(root, version_define):
    os.makedirs(os.path.join(root, "include"))
    with open(os.path.join(root, "include", "cuda.h"), "w") as f:
        f.write(f"#ifndef CUDA_H\n#define CUDA_VERSION {version_define}\n#endif\n")
    return str(root)


def test_cuda_build_decision(tmp_path):
    """setup.py's choice: the kernels are built with a toolkit and a CUDA build of torch of the same major
    version; auto leaves them out, with a note naming both versions, where the majors differ (torch's
    extension builder refuses that mix: a CUDA 12.4 torch 2.6 with a CUDA 13.0 toolkit failed the whole
    build); SCNET_FUSED_CUDA=1 builds anyway and fails clearly without a toolkit or a CUDA torch."""
    t13 = _fake_toolkit(tmp_path / "cuda13", 13000)
    t12 = _fake_toolkit(tmp_path / "cuda12", 12040)
    assert toolkit_version(t13) == (13, 0) and toolkit_version(t12) == (12, 4)
    assert toolkit_version(str(tmp_path / "missing")) is None
    assert cuda_build_decision("", t13, "13.0") == (True, None)
    assert cuda_build_decision("", t12, "12.6") == (True, None)  # minor versions may differ (torch warns)
    built, note = cuda_build_decision("", t13, "12.4")
    assert not built and "CUDA 13.0" in note and "CUDA 12.4" in note and "SCNET_FUSED_CUDA=1" in note
    assert cuda_build_decision("1", t13, "12.4") == (True, None)
    assert cuda_build_decision("0", t13, "13.0") == (False, None)
    built, note = cuda_build_decision("", None, "13.0")
    assert not built and "no CUDA toolkit" in note
    assert not cuda_build_decision("", t13, None)[0]
    with pytest.raises(SystemExit, match="SCNET_FUSED_CUDA=1"):
        cuda_build_decision("1", None, "13.0")
    with pytest.raises(SystemExit, match="SCNET_FUSED_CUDA=1"):
        cuda_build_decision("1", t13, None)
