import os

import torch  # noqa: E402  (defines no Triton kernel)

# Before any Triton kernel is defined: without a GPU, run Triton on the CPU through its interpreter.
# Poison every output buffer so an element a kernel forgets to write fails the parity tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SCNET_FUSED_POISON", "1")
# The parity tests hold the fused modules to float32-tight agreement with the reference: they run the
# direct convolutions. The Winograd convolutions (less precise by design, ~1e-5 relative) have their
# own tests (test_winograd.py), which choose the algorithm themselves.
os.environ.setdefault("SCNET_FUSED_CONV", "direct")

import pytest  # noqa: E402


def pytest_collection_finish(session):
    """Queue the selected script tests' processes to run beside the other tests (tests/_background.py),
    in the order their module's ``BACKGROUND`` lists them."""
    option = session.config.option
    if option.collectonly or getattr(option, "setuponly", False) or getattr(option, "setupplan", False):
        return
    import _background

    keys = {}
    for item in session.items:
        mark = item.get_closest_marker("background")
        if mark is not None:
            keys.setdefault(item.module, set()).add(mark.args[0])
    for module, selected in keys.items():
        for key, runs in module.BACKGROUND.items():
            if key in selected:
                _background.start(key, runs)


def pytest_sessionfinish(session):
    import _background

    _background.stop()


def pytest_collection_modifyitems(config, items):
    # The tests whose script runs go to the background (tests/_background.py) run last: by then their
    # processes have had the rest of the session to finish.
    items[:] = [i for i in items if i.get_closest_marker("background") is None] + \
        [i for i in items if i.get_closest_marker("background") is not None]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _recompute_at_every_size(monkeypatch):
    """The fused SCConv recomputes its gate output in k4's backward only for outputs of at least
    ``modules.RECOMPUTE_MIN_ELEMENTS`` elements; the suite's small shapes would all take the other
    path, so the tests run with the threshold at 0 (test_modules checks the threshold itself)."""
    from scnet_fused import modules

    monkeypatch.setattr(modules, "RECOMPUTE_MIN_ELEMENTS", 0)
    yield


@pytest.fixture(autouse=True)
def _fused_inference_at_every_size(monkeypatch):
    """At inference the fused modules run the reference computation on small maps (below
    ``modules.BOTTLENECK_INFERENCE_MIN_ELEMENTS`` / ``SCCONV_INFERENCE_MIN_ELEMENTS``); the suite's small
    shapes would all take it, so the tests run the fused paths at every size (test_modules checks the
    thresholds themselves)."""
    from scnet_fused import modules

    monkeypatch.setattr(modules, "BOTTLENECK_INFERENCE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(modules, "SCCONV_INFERENCE_MIN_ELEMENTS", 0)
    yield
