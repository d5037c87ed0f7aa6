"""``/proc/cpuinfo``, read once per call: the benchmark harness names machines by it and the Winograd
convolution picks its matrix-product implementation by the CPU's vendor."""

from __future__ import annotations

from typing import Dict


def read(path: str = "/proc/cpuinfo") -> Dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (lower-case keys); empty where there is none."""
    info: Dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    info.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return info
