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
