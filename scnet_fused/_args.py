"""argparse types shared by the command line and the benchmark scripts (no torch import)."""

from __future__ import annotations

import argparse
import math


def number(kind, minimum, inclusive, what):
    """An argparse type: ``kind(text)`` at least ``minimum`` (or above it when not ``inclusive``)."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (v >= minimum if inclusive else v > minimum) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


positive_int = number(int, 1, True, "a positive integer")
nonneg_int = number(int, 0, True, "a non-negative integer")
positive_float = number(float, 0.0, False, "a positive finite number")


def comma_list(text: str):
    """An argparse type: a comma-separated list of names, at least one (an empty one is an error rather
    than the defaults)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma list of one or more names, got {text!r}")
    return items
