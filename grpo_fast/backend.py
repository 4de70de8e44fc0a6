"""Which implementation runs: the Triton kernels on CUDA (or interpreted under TRITON_INTERPRET=1),
the chunked torch path everywhere else."""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when `t` should go through a Triton kernel."""
    return HAS_TRITON and (t.is_cuda or (interpreted() and t.device.type == "cpu"))
