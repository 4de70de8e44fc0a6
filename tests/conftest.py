"""Test setup: without a CUDA device the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton is imported (it is read when @triton.jit runs), so this
happens before anything imports torch or the kernels.
"""

import os

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
