"""Shared helpers of the kernel tests (a uniquely named module: every test folder may have its own conftest)."""

from __future__ import annotations

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
FP8_COMPUTE = not ON_CUDA or torch.cuda.get_device_capability() >= (8, 9)


def needs_fp8_compute():
    return pytest.mark.skipif(not FP8_COMPUTE, reason="FP8 tensor-core math needs SM >= 8.9")


def scaled_randn(m: int, k: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Activations with a wide dynamic range across columns, one all-zero row, on the test device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)
    x[0] = 0.0
    return x.to(dtype).to(DEVICE)
