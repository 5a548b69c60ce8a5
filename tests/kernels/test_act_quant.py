"""Triton activation quantization is bit-identical to ``layouts.activation.quantize_activation``."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import ON_CUDA, scaled_randn

from lrq_ao.kernels.act_quant import quantize_activation_triton
from lrq_ao.layouts.activation import ActivationMode, quantize_activation
from lrq_ao.primitives import FP8_DTYPE

# (M, K, granularity): M in {1, 7, 33}, K not a multiple of the tile; a row wider than one tile (two passes, also
# just past it); block groups over a grid of several row tiles x several groups, the last row tile ragged.
CASES = [(m, k, g) for m, k in [(1, 96), (7, 33), (33, 64)] for g in ("tensor", "row")]
CASES += [(1, 96, "block"), (33, 64, "block"), (130, 96, "block"), (2, 17000, "row"), (3, 4100, "row")]
if ON_CUDA:
    CASES += [(4608, 3072, g) for g in ("tensor", "row", "block")] + [(16, 15360, "row"), (5, 20000, "tensor")]
    CASES += [(4608, 12288, "row"), (16, 12288, "block")]  # the two-pass row and the many-group grid at Flux sizes


@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_bit_identical_to_reference(qdtype, case):
    m, k, granularity = case
    block = 32
    x = scaled_randn(m, k, seed=m + k)
    q_ref, s_ref = quantize_activation(x.cpu(), qdtype, ActivationMode("dynamic", granularity, block))
    q, s = quantize_activation_triton(x, qdtype, granularity, block)
    assert s.shape == s_ref.shape
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


def test_block_must_divide_k():
    with pytest.raises(ValueError, match="does not divide K"):
        quantize_activation_triton(scaled_randn(2, 48), torch.int8, "block", 32)


def test_opcheck():
    x = scaled_randn(5, 64)
    for args in [(x, "int8", "row", 128), (x, "float8_e4m3fn", "tensor", 128), (x, "int8", "block", 32)]:
        torch.library.opcheck(torch.ops.lrq_ao.quantize_activation.default, args)
