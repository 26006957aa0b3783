"""Test set-up shared by every file.

Triton decides at decoration time whether kernels are compiled or interpreted, so TRITON_INTERPRET must be set
before anything imports triton. Without CUDA the suite interprets the kernels on the CPU; with CUDA it compiles
them and runs the tests marked ``cuda`` (run ``TRITON_INTERPRET=1 pytest -m interpret`` separately there).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (Triton's CPU interpreter)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "interpret" in item.keywords and not INTERPRET:
            item.add_marker(skip_interp)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure through the test id), so inputs are new every run."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value
