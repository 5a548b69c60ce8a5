"""Importing lrq_ao must not initialize CUDA, and must not need Triton.

``import torch._dynamo`` (which torchao pulls in) imports the ``triton`` package itself whenever it is installed,
so "triton not in sys.modules" cannot hold with Triton installed. What lrq_ao controls, and what these tests
check, is: (1) with Triton made unimportable, ``import lrq_ao`` and a quantized linear still work — nothing in
lrq_ao imports Triton eagerly; (2) no lrq_ao Triton kernel module is imported and CUDA is not initialized.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

IMPORTS = "import lrq_ao; import lrq_ao.layouts; import lrq_ao.api"

BLOCK_TRITON = """
import importlib.abc, sys
class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked by test_lean_import")
        return None
sys.meta_path.insert(0, _NoTriton())
"""


def _run(script: str) -> str:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # a fresh interpreter importing torch + torchao: ~10 s on 2 shared cores
def test_import_works_without_triton_and_does_not_initialize_cuda():
    script = BLOCK_TRITON + textwrap.dedent(
        f"""
        import torch
        {IMPORTS}
        assert "triton" not in sys.modules, "something imported triton"
        assert not torch.cuda.is_initialized()
        w = lrq_ao.layouts.Int8Tensor.from_hp(torch.randn(32, 64), "row")
        y = torch.nn.functional.linear(torch.randn(4, 64), w)
        assert y.shape == (4, 32)
        assert "triton" not in sys.modules and not torch.cuda.is_initialized()
        print("ok")
        """
    )
    assert _run(script).strip().endswith("ok")


@pytest.mark.slow
def test_import_loads_no_kernel_module_and_does_not_initialize_cuda():
    script = textwrap.dedent(
        f"""
        import sys, torch
        {IMPORTS}
        kernel_modules = sorted(m for m in sys.modules if m.startswith("lrq_ao.kernels."))
        assert kernel_modules == [], kernel_modules
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    assert _run(script).strip().endswith("ok")
