"""Loading the published SCNet checkpoints (and any state_dict of the same layout).

Loading never runs pickled code: files are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["PUBLISHED", "load_checkpoint", "load_pretrained", "published_url", "cached_path"]

_BASE_URL = "https://backseason.oss-cn-beijing.aliyuncs.com/scnet/"

# Files released with the paper. No scnet101_v1d weights were ever published.
PUBLISHED = {
    "scnet50": "scnet50-dc6a7e87.pth",
    "scnet50_v1d": "scnet50_v1d-4109d1e1.pth",
    "scnet101": "scnet101-44c5b751.pth",
}


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or matched to the model."""


def published_url(arch: str) -> str:
    if arch not in PUBLISHED:
        raise CheckpointError(
            f"no published weights exist for {arch!r} (published: {', '.join(sorted(PUBLISHED))}); "
            f"pass a local file path as pretrained= instead"
        )
    return _BASE_URL + PUBLISHED[arch]


def cached_path(arch: str) -> str:
    """Where ``pretrained=True`` keeps (and looks for) the published file: the torch hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", PUBLISHED[arch])


def _extract_state_dict(obj) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return _extract_state_dict(inner)
        if all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(
        "checkpoint holds no state_dict: expected a mapping of parameter names to tensors, "
        "optionally under a 'state_dict' or 'model' key"
    )


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    out = OrderedDict()
    for k, v in state.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _bn_counter(model: nn.Module, key: str) -> bool:
    """``key`` is the num_batches_tracked buffer of a BatchNorm in ``model``."""
    owner = key[: -len(".num_batches_tracked")]
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    return isinstance(module, nn.modules.batchnorm._NormBase)


def load_checkpoint(model: nn.Module, path_or_state: Union[str, os.PathLike, Mapping],
                    sha256_prefix: Optional[str] = None, ignore_prefixes: Sequence[str] = ()) -> nn.Module:
    """Load an SCNet checkpoint into ``model`` (reference or fused; the keys are the same).

    ``path_or_state`` is a file path or an in-memory state_dict. The file may hold a bare state_dict
    or one under ``"state_dict"`` / ``"model"``; a ``"module."`` prefix (DataParallel) is stripped.
    Missing, unexpected or mis-shaped keys raise :class:`CheckpointError` listing all of them (a
    BatchNorm's ``num_batches_tracked`` may be absent, as nn.BatchNorm2d's own loading allows: files from
    PyTorch before 0.4.1 have none).
    ``sha256_prefix``: when given, the file's SHA-256 must start with it. ``ignore_prefixes``: keys of
    the checkpoint to drop before matching (e.g. ``("fc.",)`` for a headless backbone).
    """
    if isinstance(path_or_state, Mapping):
        if sha256_prefix:
            raise CheckpointError("sha256_prefix checks a file's bytes: pass the checkpoint's path, not a state_dict")
        raw = path_or_state
    else:
        path = os.fspath(path_or_state)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes): an interrupted download or copy?")
        if sha256_prefix:
            digest = _sha256(path)
            if not digest.startswith(sha256_prefix.lower()):
                raise CheckpointError(
                    f"checkpoint {path} has SHA-256 {digest}, which does not start with {sha256_prefix!r}"
                )
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, unsafe globals, truncated files
            reason = str(exc) or f"{type(exc).__name__} (the file ends early: truncated?)"
            raise CheckpointError(f"could not read checkpoint {path} safely (weights_only=True): {reason}") from exc
    state = _strip_prefix(_extract_state_dict(raw))
    if ignore_prefixes:
        state = OrderedDict((k, v) for k, v in state.items() if not k.startswith(tuple(ignore_prefixes)))
    own = model.state_dict()
    # BatchNorm's num_batches_tracked: files saved before it existed (PyTorch < 0.4.1) lack it, and
    # nn.BatchNorm2d's own loading accepts that (its counter restarts from zero); so does this one
    missing = [k for k in own if k not in state and not (k.endswith(".num_batches_tracked") and _bn_counter(model, k))]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dst: str) -> None:
    """Fetch ``url`` to ``dst`` (atomic rename). Kept separate so tests can fake a failing network."""
    torch.hub.download_url_to_file(url, dst, hash_prefix=None, progress=True)


def wants_pretrained(pretrained) -> bool:
    """Whether a constructor's ``pretrained`` asks for weights: anything but False / None, so that an
    empty path or a wrong type reaches :func:`load_pretrained`'s error instead of a random model."""
    return not (pretrained is False or pretrained is None)


def load_pretrained(model: nn.Module, arch: str, pretrained, check_hash: bool = False,
                    ignore_prefixes: Sequence[str] = ()) -> nn.Module:
    """``pretrained=True``: the published file from the hub cache, downloaded on first use;
    ``pretrained="path.pth"``: that file. ``check_hash``: the file's SHA-256 must start with the hex
    digits of the published file's name for ``arch`` (``scnet50-dc6a7e87.pth``: dc6a7e87), whatever the
    file is called; not the default (no copy of the published files was at hand to confirm they honour
    the convention)."""
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be False, True or a file path, got {pretrained!r}")
    if check_hash and arch not in PUBLISHED:
        raise CheckpointError(f"check_hash: no published weights exist for {arch!r}, so there is no hash to "
                              f"check against (published: {', '.join(sorted(PUBLISHED))})")
    prefix = PUBLISHED[arch].rsplit("-", 1)[1].split(".")[0] if check_hash else None
    if pretrained is True:
        url = published_url(arch)
        dst = cached_path(arch)
        if not os.path.isfile(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                _download(url, dst)
            except Exception as exc:
                raise CheckpointError(
                    f"could not download {PUBLISHED[arch]} from {url} ({type(exc).__name__}: {exc}). "
                    f"Without a network, copy the file to {dst} or pass its path: "
                    f"{arch}(pretrained='/path/to/{PUBLISHED[arch]}')"
                ) from exc
        return load_checkpoint(model, dst, sha256_prefix=prefix, ignore_prefixes=ignore_prefixes)
    if isinstance(pretrained, (str, os.PathLike)):
        return load_checkpoint(model, pretrained, sha256_prefix=prefix, ignore_prefixes=ignore_prefixes)
    raise TypeError(f"pretrained must be False, True or a file path, got {pretrained!r}")
