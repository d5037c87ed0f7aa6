"""Shared test helpers: tolerance rule for low precision, backends available here, input makers."""

import re

import torch
import torch.nn.functional as F

from scnet_fused.ops import _dispatch, available


def interpreter_broken():
    """Why the Triton kernels cannot run on CPU tensors here (an interpreter run with an incompatible
    numpy, see ``_dispatch.interpreter_problem``), or None (a GPU, or an interpreter that works)."""
    if torch.cuda.is_available():
        return None
    return _dispatch.interpreter_problem()


def backends_here(include_reference=True):
    """The backends the CPU-tensor tests run: triton only where its interpreter works (the tests of
    the clear error an incompatible interpreter gives are in test_gate_ops.py)."""
    names = ["reference"] if include_reference else []
    for name in ("cpu", "triton"):
        if available(name) is None and not (name == "triton" and interpreter_broken()):
            names.append(name)
    return names


def eager_gate(x, small, k3):
    return k3 * torch.sigmoid(x + F.interpolate(small, size=x.shape[-2:], mode="nearest"))


def assert_close_rule(fused, ref64, eager_lowp, factor=2.0, atol=1e-3, what=""):
    """DESIGN.md's rule: |fused - ref64| <= factor * |eager - ref64| (max norms) + atol."""
    err_fused = (fused.double() - ref64).abs().max().item()
    err_eager = (eager_lowp.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    assert err_fused <= factor * err_eager + atol * scale, (
        f"{what}: fused error {err_fused:.3e} > {factor} x eager error {err_eager:.3e} + {atol * scale:.1e}")


def randn(*shape, channels_last=False, dtype=torch.float32, requires_grad=False, scale=1.0, shift=0.0):
    t = torch.randn(*shape, dtype=torch.float32) * scale + shift
    t = t.to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def kink_perturbed(x, n=2, rel=1e-5):
    """x and n copies of it with relative noise of `rel`: for checks that compare float32 gradients of a
    ReLU network with a float64 run. A pre-activation within float32 rounding of 0 (|z| ~ 1e-8 of the
    largest) lands on either side of the kink in two correct float32 implementations and moves that
    element's gradient by O(1); such ties are rare, so a check that holds on most of these inputs holds
    for the implementation, while a real error fails on all of them."""
    out = [x]
    for k in range(n):
        g = torch.Generator().manual_seed(1000 + k)
        out.append(x * (1 + rel * torch.randn(x.shape, generator=g, dtype=x.dtype)))
    return out


def randomize_norms(m):
    """Every BatchNorm in m: weight in [0.5, 1.5], bias in [-0.5, 0.5], running mean in [-0.2, 0.2] and
    running variance in [0.5, 2] (torch's global generator), so that no fold is the identity."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                if mod.weight is not None:
                    mod.weight.uniform_(0.5, 1.5)
                    mod.bias.uniform_(-0.5, 0.5)
                if mod.running_mean is not None:
                    mod.running_mean.uniform_(-0.2, 0.2)
                    mod.running_var.uniform_(0.5, 2.0)


def access_summary(acc):
    """'ld 128x3 32x24; st 128x1' from counts of global accesses by width ({"ld128": 3, "st128": 1}, or
    the SASS's {"LDG128": 3, ...}): loads first, widest first; '-' for none known."""
    if not acc:
        return "-"
    groups = {}
    for key, n in acc.items():
        op, width = re.fullmatch(r"([A-Za-z]+)(\d+)", key).groups()
        groups.setdefault(op, []).append((int(width), n))
    ops = sorted(groups, key=lambda op: not op.lower().startswith("ld"))
    return "; ".join(f"{op} " + " ".join(f"{w}x{n}" for w, n in sorted(groups[op], reverse=True)) for op in ops)
