"""The package metadata: what `pip install` reads from pyproject.toml and setup.py, generated the way
pip's build front end asks for it (PEP 517 ``prepare_metadata_for_build_wheel``), without compiling."""

import email
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_metadata_has_the_license_and_entry_point(tmp_path):
    code = ("import sys, setuptools.build_meta as b\n"
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))\n")
    env = dict(os.environ, SCNET_FUSED_CUDA="0")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    dist_info = tmp_path / proc.stdout.strip().splitlines()[-1]
    meta = email.message_from_string((dist_info / "METADATA").read_text())
    assert re.sub(r"[-_.]+", "-", meta["Name"]).lower() == "scnet-fused"  # older setuptools normalise it
    # setuptools >= 77 writes an SPDX License-Expression, older ones the License text field.
    assert "MIT" in (meta.get("License-Expression"), meta.get("License")), meta.items()
    assert "scnet-fused = scnet_fused.__main__:main" in (dist_info / "entry_points.txt").read_text()
    # pyproject.toml's license fields were deprecated or refused depending on the setuptools version.
    assert "SetuptoolsDeprecationWarning" not in proc.stderr, proc.stderr[-4000:]


def test_the_source_distribution_carries_what_a_build_needs(tmp_path):
    """The sdist (what `python -m build` builds the wheel from, and what an index serves): every file
    under csrc/ (headers and CUDA sources included, whatever this machine builds), CMakeLists.txt,
    LICENSE, the tests; no compiled object or build folder."""
    import shutil
    import tarfile

    # From a copy of the tree without the checkout's egg-info: setuptools also packs the files an
    # earlier build listed there (its SOURCES.txt), which a clean tree does not have.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "results",
                                                              "*.so", "__pycache__"))
    code = "import sys, setuptools.build_meta as b\nprint(b.build_sdist(sys.argv[1]))\n"
    env = dict(os.environ, SCNET_FUSED_CUDA="0")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with tarfile.open(tmp_path / proc.stdout.strip().splitlines()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
            for d, _, files in os.walk(os.path.join(ROOT, "csrc")) for f in files}
    want |= {"CMakeLists.txt", "LICENSE", "setup.py", "pyproject.toml", "README.md", "tests/conftest.py"}
    assert any(n.endswith(".cuh") for n in want) and any(n.endswith(".cu") for n in want)
    assert not want - names, sorted(want - names)
    assert not [n for n in names if n.endswith((".so", ".o")) or n.startswith("build/")]


def test_an_extension_built_against_another_torch_says_so():
    """setup.py records the torch it compiles against; an import that fails under another torch (pip
    upgraded torch 2.10 to 2.14.1 after building against 2.10, to meet the dependency, and the
    extension then missed a symbol) names both versions and how to rebuild."""
    import torch

    from scnet_fused.ops import _cpp

    assert _cpp._built_against() == torch.__version__  # this checkout's build
    exc = ImportError("_C.so: undefined symbol: _ZN5torch8autograd10deleteNodeEPNS0_4NodeE")
    msg = _cpp._import_failure(exc, "2.10.0+cu128", "2.14.1+cu130")
    assert "deleteNode" in msg and "built against torch 2.10.0+cu128" in msg and "this is torch 2.14.1+cu130" in msg
    assert "pip install -e . --no-build-isolation" in msg
    for built in ("2.14.1+cu130", None):
        same = _cpp._import_failure(exc, built, "2.14.1+cu130")
        assert "deleteNode" in same and "built against" not in same


def test_import_under_an_older_torch_warns():
    """Below the supported torch (README, "Supported") the import says so once; at or above it, nothing."""
    import torch

    import scnet_fused

    code = ("import warnings, torch; torch.__version__ = {v!r}\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import scnet_fused\n"
            "print([str(x.message) for x in w if 'scnet_fused needs torch' in str(x.message)])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for version, warned in (("2.8.0+cu128", True), ("2.9.1+cu128", False), (torch.__version__, False)):
        out = subprocess.run([sys.executable, "-c", code.format(v=version)], cwd=root, capture_output=True,
                             text=True, check=True).stdout
        assert ("needs torch >= 2.9" in out and version in out) == warned, out
    assert scnet_fused.MIN_TORCH == (2, 9)
