"""Kernel tests run the real Triton kernels: on CUDA when present, else through Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` is set per test with ``monkeypatch`` (autouse fixture below) rather than at import, so it
never leaks into other test folders that share a pytest-xdist worker. That is enough because
``lrq_ao.kernels._runtime`` reads the variable at call time and builds interpreted kernel copies itself,
whatever Triton was imported with.
"""

from __future__ import annotations

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
FP8_COMPUTE = not ON_CUDA or torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture(autouse=True)
def _triton_interpreter_on_cpu(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def needs_fp8_compute():
    return pytest.mark.skipif(not FP8_COMPUTE, reason="FP8 tensor-core math needs SM >= 8.9")


def scaled_randn(m: int, k: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Activations with a wide dynamic range across columns, one all-zero row, on the test device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)
    x[0] = 0.0
    return x.to(dtype).to(DEVICE)
