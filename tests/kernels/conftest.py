"""Kernel tests run the real Triton kernels: on CUDA when present, else through Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` is set per test with ``monkeypatch`` (autouse fixture below) rather than at import, so it
never leaks into other test folders that share a pytest-xdist worker. That is enough because
``lrq_ao.kernels._runtime`` reads the variable at call time and builds interpreted kernel copies itself,
whatever Triton was imported with.
"""

from __future__ import annotations

import pytest
from kernel_testing import ON_CUDA


@pytest.fixture(autouse=True)
def _triton_interpreter_on_cpu(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
