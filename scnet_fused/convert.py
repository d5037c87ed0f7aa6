"""``convert(model)``: swap every SCConv / SCBottleneck-compatible submodule for the fused one (and an
SCNet stem's max pool for the package's, as the fused models have it)."""

from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Tuple

from torch import nn

from .modules import MaxPool2d, SCBottleneck, SCConv, _adopted

__all__ = ["convert", "convert_with_report", "is_scconv_like", "is_bottleneck_like"]


def _is_seq(m, n: int) -> bool:
    return isinstance(m, nn.Sequential) and len(m) == n


def is_scconv_like(m: nn.Module) -> bool:
    """The SCConv layout of the paper: k2 = (AvgPool2d, Conv2d, norm), k3 = k4 = (Conv2d, norm)."""
    k2, k3, k4 = (getattr(m, a, None) for a in ("k2", "k3", "k4"))
    return (_is_seq(k2, 3) and isinstance(k2[0], nn.AvgPool2d) and isinstance(k2[1], nn.Conv2d)
            and _is_seq(k3, 2) and isinstance(k3[0], nn.Conv2d)
            and _is_seq(k4, 2) and isinstance(k4[0], nn.Conv2d)
            and k3[0].in_channels == k3[0].out_channels
            and k3[0].stride in (1, (1, 1)))


def is_bottleneck_like(m: nn.Module) -> bool:
    """The SCBottleneck layout: conv1_a/b, bn1_a/b, k1, scconv, conv3, bn3, relu (downsample optional)."""
    names = ("conv1_a", "bn1_a", "conv1_b", "bn1_b", "k1", "scconv", "conv3", "bn3", "relu")
    return all(isinstance(getattr(m, a, None), nn.Module) for a in names) and is_scconv_like(m.scconv)


def _layout_forward(m: nn.Module) -> bool:
    """``m`` computes with its layout's forward: the class that defines ``forward`` does not override a
    ``forward`` of a base class other than nn.Module (a subclass of the reference SCConv or SCBottleneck
    with a forward of its own computes something else, which the fused module would not), and no
    ``forward`` is set on the instance."""
    if "forward" in m.__dict__:
        return False
    owner = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
    return not any("forward" in base.__dict__ for base in owner.__mro__[1:] if base not in (nn.Module, object))


def convert_with_report(model: nn.Module, inplace: bool = False) -> Tuple[nn.Module, List[Tuple[str, str, str]]]:
    """Like :func:`convert`, also returning ``[(qualified name, old class, new class), ...]``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report: List[Tuple[str, str, str]] = []
    # a module held in several places (twice in one container, or by two parents) becomes one fused module
    done: Dict[int, nn.Module] = {}

    def swap(parent_name: str, module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = done[id(module)] = _swapped(parent_name, module)
        if new is not module:
            return new
        for name, child in list(new._modules.items()):  # every slot, also a module held twice
            if child is None:
                continue
            qual = f"{parent_name}.{name}" if parent_name else name
            replaced = swap(qual, child)
            if replaced is not child:
                setattr(new, name, replaced)
        pool = getattr(new, "maxpool", None)
        if type(pool) is nn.MaxPool2d and isinstance(getattr(new, "layer1", None), nn.Module):
            # an SCNet's (ResNet-style) stem pool: the package's NCHW kernel, ATen's results (no state;
            # its arguments, hooks and attributes carried over)
            new.maxpool = _adopted(MaxPool2d, pool)
            report.append((f"{parent_name}.maxpool" if parent_name else "maxpool", type(pool).__qualname__,
                           "scnet_fused.modules.MaxPool2d"))
        return new

    def _swapped(parent_name: str, module: nn.Module) -> nn.Module:
        """The fused module for ``module`` itself, or ``module`` (its children are the caller's)."""
        if isinstance(module, (SCConv, SCBottleneck)):  # fused already (a subclass of ours too)
            return module
        bottleneck, scconv = is_bottleneck_like(module), is_scconv_like(module)
        if not (bottleneck or scconv):
            return module
        own = module if not _layout_forward(module) else (
            module.scconv if bottleneck and not _layout_forward(module.scconv) else None)
        if own is not None:
            what = "" if own is module else f"its scconv ({type(own).__qualname__}) "
            if own is not module:
                done[id(own)] = own  # named here: no second warning for it
            warnings.warn(f"scnet_fused.convert: {parent_name or '<root>'} ({type(module).__qualname__}) has the "
                          f"{'SCBottleneck' if bottleneck else 'SCConv'} layout but {what}has a forward of its own "
                          "(overriding its base class's, or set on the instance), which the fused module would not "
                          "run; left as it is (its other submodules are converted)")
            return module
        if bottleneck:
            report.append((parent_name or "<root>", type(module).__qualname__, "scnet_fused.SCBottleneck"))
            report.append((f"{parent_name}.scconv" if parent_name else "scconv",
                           type(module.scconv).__qualname__, "scnet_fused.SCConv"))
            return SCBottleneck.adopt(module)
        report.append((parent_name or "<root>", type(module).__qualname__, "scnet_fused.SCConv"))
        return SCConv.adopt(module)

    return swap("", model), report


def convert(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Replace every SCConv / SCBottleneck-compatible submodule of ``model`` with the fused one.

    Compatible means the module tree of the paper's classes (the reference's, the published
    ``scnet.py``'s, or any module with the same attributes and forward; a subclass whose ``forward``
    overrides its base class's computes something else, and is left as it is with a warning, its
    submodules converted). A module held in several places becomes one fused module. A module with ``layer1`` and
    an ``nn.MaxPool2d`` named ``maxpool`` (an SCNet's stem) gets :class:`scnet_fused.modules.MaxPool2d`
    there, whose results are ATen's bit for bit. Weights, buffers, device and dtype are kept (the fused
    modules take over the same submodules), so the state_dict is unchanged; so are every submodule's
    train/eval mode (a frozen BatchNorm in a training model stays frozen) and the replaced modules' own
    hooks and attributes (the hook handles the caller holds still remove them). A replaced module whose
    class is not the reference's (a subclass, the published file's class) becomes an instance of a class
    deriving from the fused class (first) and its own, so its methods and class attributes stay and
    ``isinstance`` against its class holds; such models pickle (where the class can be imported, as
    the original model's pickling needed too) and deep-copy. A class made inside a function (not found
    again by name), or with a metaclass, an ``__init_subclass__``, its own ``__new__``, ``__setattr__``
    or ``__reduce__``, a property or slots gets the plain fused class instead (combining would run or
    bypass the user's hooks, or let a descriptor shadow the attributes the fused module sets).
    ``inplace=False`` converts a deep copy; ``inplace=True`` replaces the submodules inside ``model``
    itself, except where ``model`` is itself an SCConv or SCBottleneck (an object cannot become another):
    there the fused module is a new object, sharing ``model``'s submodules and parameters. Use the
    returned module either way. ``verbose`` prints what was replaced.
    """
    new, report = convert_with_report(model, inplace=inplace)
    if verbose:
        print(f"scnet_fused.convert: replaced {len(report)} module(s)")
        for name, old, cls in report:
            print(f"  {name}: {old} -> {cls}")
    return new
