import os

# Before any Triton kernel is defined: run Triton on the CPU, and poison every output buffer.
if os.environ.get("SCNET_FUSED_TEST_NO_INTERPRET", "0") == "0":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SCNET_FUSED_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
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
