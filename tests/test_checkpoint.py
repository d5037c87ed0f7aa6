"""Checkpoint loading: local files, wrappers, prefixes, every error case, no code execution."""

import hashlib
import os
import pickle

import pytest
import torch

import scnet_fused
from scnet_fused import checkpoint, models, reference as R
from scnet_fused.checkpoint import CheckpointError


@pytest.fixture(autouse=True)
def _restore_hub_dir():
    old = torch.hub.get_dir()
    yield
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def ref_state():
    torch.manual_seed(1)
    m = R.scnet50(num_classes=10)
    for buf_name, buf in m.named_buffers():
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    return m.state_dict()


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module_prefix"])
def test_round_trip_into_fused_model(tmp_path, ref_state, wrap):
    obj = ref_state
    if wrap == "state_dict":
        obj = {"state_dict": ref_state, "epoch": 3}
    elif wrap == "model":
        obj = {"model": ref_state}
    elif wrap == "module_prefix":
        obj = {f"module.{k}": v for k, v in ref_state.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    fused = models.scnet50(num_classes=10, pretrained=str(path))
    _same(fused.state_dict(), ref_state)
    plain = R.scnet50(num_classes=10, pretrained=str(path))
    _same(plain.state_dict(), ref_state)


def test_features_only_ignores_head(tmp_path, ref_state):
    path = tmp_path / "ckpt.pth"
    torch.save(ref_state, path)
    feats = models.scnet50(features_only=True, pretrained=str(path))
    assert "fc.weight" not in feats.state_dict()
    assert torch.equal(feats.state_dict()["layer4.2.conv3.weight"], ref_state["layer4.2.conv3.weight"])
    # stages not built (after the last selected map) are ignored too
    early = models.scnet50(features_only=True, out_indices=(1, 3), pretrained=str(path))
    assert "layer4.0.conv3.weight" not in early.state_dict()
    assert torch.equal(early.state_dict()["layer3.5.conv3.weight"], ref_state["layer3.5.conv3.weight"])


def test_missing_unexpected_and_mismatched_keys_are_listed(ref_state):
    state = dict(ref_state)
    del state["layer1.0.scconv.k2.1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["fc.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        scnet_fused.load_checkpoint(R.scnet50(num_classes=10), state)
    msg = str(err.value)
    assert "missing keys (1): layer1.0.scconv.k2.1.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "fc.bias: checkpoint (3,) vs model (10,)" in msg


def test_missing_file_and_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        scnet_fused.load_checkpoint(R.scnet50(), str(tmp_path / "nope.pth"))
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        scnet_fused.load_checkpoint(R.scnet50(), str(path))


def test_an_empty_or_wrongly_typed_pretrained_is_an_error():
    """pretrained="" named no file: an error, as any missing path is (it used to give random weights);
    a value that is neither a bool nor a path is a TypeError; None means no weights, as False does."""
    for ctor in (lambda **k: models.scnet50(features_only=True, out_indices=(1,), **k), R.scnet50):
        with pytest.raises(CheckpointError, match="not found"):
            ctor(pretrained="")
        with pytest.raises(TypeError, match="pretrained"):
            ctor(pretrained=0)
        assert isinstance(ctor(pretrained=None), torch.nn.Module)


def test_empty_file_and_hash_of_an_in_memory_state_are_clear_errors(tmp_path, ref_state):
    """A 0-byte file (an interrupted download) says so; sha256_prefix with a state_dict (no file bytes to
    hash) is refused instead of passing unchecked; a truncated file names its reason."""
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for prefix in (None, "deadbeef"):  # (an empty file's hash would not say why)
        with pytest.raises(CheckpointError, match="is empty"):
            scnet_fused.load_checkpoint(R.scnet50(num_classes=10), str(empty), sha256_prefix=prefix)
    with pytest.raises(CheckpointError, match="pass the checkpoint's path"):
        scnet_fused.load_checkpoint(R.scnet50(num_classes=10), ref_state, sha256_prefix="deadbeef")
    whole = tmp_path / "whole.pth"
    torch.save(ref_state, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"weights_only=True\): \S"):
        scnet_fused.load_checkpoint(R.scnet50(num_classes=10), str(cut))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        scnet_fused.load_checkpoint(R.scnet50(), str(path))
    assert not marker.exists()


def test_sha256_prefix_check(tmp_path, ref_state):
    path = tmp_path / "c.pth"
    torch.save(ref_state, path)
    digest = checkpoint._sha256(str(path))
    scnet_fused.load_checkpoint(R.scnet50(num_classes=10), str(path), sha256_prefix=digest[:8])
    with pytest.raises(CheckpointError, match="SHA-256"):
        scnet_fused.load_checkpoint(R.scnet50(num_classes=10), str(path), sha256_prefix="00000000" if digest[:8] != "00000000" else "11111111")


def test_check_hash_applies_to_a_file_path_too(tmp_path, monkeypatch, ref_state):
    """check_hash=True compares a local file with the published file's SHA-256 prefix whatever the file is
    called (a file named like the published one but with other contents is refused), through
    load_pretrained and through the model constructors; a matching prefix loads."""
    path = tmp_path / "scnet50-dc6a7e87.pth"
    torch.save(ref_state, path)
    for load in (lambda: checkpoint.load_pretrained(R.scnet50(num_classes=10), "scnet50", str(path), check_hash=True),
                 lambda: models.scnet50(num_classes=10, pretrained=str(path), check_hash=True),
                 lambda: R.scnet50(num_classes=10, pretrained=path, check_hash=True)):
        with pytest.raises(CheckpointError, match="SHA-256"):
            load()
    models.scnet50(num_classes=10, pretrained=str(path))  # not the default
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(checkpoint.PUBLISHED, "scnet50", f"scnet50-{digest[:8]}.pth")
    m = models.scnet50(num_classes=10, pretrained=str(path), check_hash=True)
    assert torch.equal(m.state_dict()["conv1.weight"], ref_state["conv1.weight"])
    with pytest.raises(CheckpointError, match="no hash"):
        models.scnet101_v1d(pretrained=str(path), check_hash=True)
    with pytest.raises(ValueError, match="check_hash"):
        models.scnet50(check_hash=True)


def test_files_without_batchnorm_counters_load(tmp_path, ref_state):
    """Checkpoints saved before BatchNorm had num_batches_tracked load, as nn.BatchNorm2d allows (the
    counters start from zero); any other missing key is still an error."""
    path = tmp_path / "old.pth"
    old = {k: v for k, v in ref_state.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(ref_state)
    torch.save(old, path)
    m = models.scnet50(num_classes=10, pretrained=str(path))
    assert torch.equal(m.state_dict()["layer2.1.bn3.running_var"], ref_state["layer2.1.bn3.running_var"])
    assert int(m.state_dict()["bn1.num_batches_tracked"]) == 0
    del old["layer2.1.bn3.running_var"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): layer2.1.bn3.running_var"):
        scnet_fused.load_checkpoint(R.scnet50(num_classes=10), old)


def test_pretrained_true_without_network_names_file_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    torch.hub.set_dir(str(tmp_path / "hub"))

    def offline(url, dst):
        raise OSError("network unreachable")

    monkeypatch.setattr(checkpoint, "_download", offline)
    with pytest.raises(CheckpointError) as err:
        models.scnet50(pretrained=True)
    msg = str(err.value)
    assert "scnet50-dc6a7e87.pth" in msg and checkpoint.cached_path("scnet50") in msg
    assert "https://backseason.oss-cn-beijing.aliyuncs.com/scnet/scnet50-dc6a7e87.pth" in msg


def test_pretrained_true_uses_the_cached_file(tmp_path, monkeypatch, ref_state):
    torch.hub.set_dir(str(tmp_path / "hub"))
    dst = checkpoint.cached_path("scnet50")
    os.makedirs(os.path.dirname(dst))
    state = R.scnet50().state_dict()
    torch.save(state, dst)
    monkeypatch.setattr(checkpoint, "_download", lambda url, d: pytest.fail("must not download"))
    m = models.scnet50(pretrained=True)
    _same(m.state_dict(), state)


def test_pretrained_true_downloads_into_cache(tmp_path, monkeypatch):
    torch.hub.set_dir(str(tmp_path / "hub"))
    state = R.scnet50_v1d().state_dict()
    seen = []

    def fake(url, dst):
        seen.append(url)
        torch.save(state, dst)

    monkeypatch.setattr(checkpoint, "_download", fake)
    m = models.scnet50_v1d(pretrained=True, fused=False)
    assert seen == ["https://backseason.oss-cn-beijing.aliyuncs.com/scnet/scnet50_v1d-4109d1e1.pth"]
    _same(m.state_dict(), state)


def test_no_published_weights_for_scnet101_v1d():
    with pytest.raises(CheckpointError, match="no published weights"):
        models.scnet101_v1d(pretrained=True)
    with pytest.raises(TypeError, match="pretrained must be"):
        models.scnet50(pretrained=3)
