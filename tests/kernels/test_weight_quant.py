"""The Triton weight quantizer is bit-identical to ``primitives.quantize_rtn`` (qdata bytes and scales)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, ON_CUDA

from lrq_ao.kernels.weight_quant import quantize_weight_triton
from lrq_ao.primitives import FP8_DTYPE, FormatSpec, quantize_rtn

# (shape, granularity, source dtype): awkward shapes on CPU, real Flux shapes on CUDA; block 32 where it tiles.
CASES = [
    ((7, 33), "tensor", torch.bfloat16),
    ((7, 33), "row", torch.float32),
    ((64, 96), "row", torch.bfloat16),
    ((64, 96), "block", torch.bfloat16),
    ((64, 96), "tensor", torch.float32),
]
if ON_CUDA:
    CASES += [((3072, 3072), g, torch.bfloat16) for g in ("tensor", "row", "block")]
    CASES += [((12288, 3072), "block", torch.float32)]


def _hard_weight(n: int, k: int, qdtype: torch.dtype) -> torch.Tensor:
    """Random weight plus exact rounding ties, a zero row, the saturation edge and FP8 subnormals."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, k)
    w[0] = 0.0
    qmax = 448.0 if qdtype == FP8_DTYPE else 127.0
    # Row 1: amax = qmax exactly, so scale = 1 and these values sit on ties of the target grid.
    ties = torch.tensor([0.5, 1.5, 2.5, -2.5, 17.0, 18.0, 0.0029296875, -0.0029296875, 300.0, -0.001953125])
    w[1] = 0.25
    w[1, : ties.numel()] = ties[: min(k, ties.numel())]
    w[1, -1] = qmax
    return w


@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[1]}-{str(c[2])[6:]}")
def test_bit_identical_to_reference(qdtype, case):
    shape, granularity, dtype = case
    w = _hard_weight(*shape, qdtype).to(dtype)
    spec = FormatSpec(qdtype, granularity, 32)
    q_ref, s_ref, block_size = quantize_rtn(w, spec)
    q, s = quantize_weight_triton(w.to(DEVICE), qdtype, block_size)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.cpu(), s_ref)


def test_rejects_block_that_does_not_tile():
    with pytest.raises(ValueError, match="does not tile"):
        quantize_weight_triton(torch.ones(48, 40, device=DEVICE), torch.int8, (32, 32))


def test_opcheck():
    w = _hard_weight(16, 32, torch.int8).to(DEVICE)
    torch.library.opcheck(torch.ops.lrq_ao.quantize_weight.default, (w, "int8", 1, 32))
    torch.library.opcheck(torch.ops.lrq_ao.quantize_weight.default, (w, "float8_e4m3fn", 16, 16))
