"""The weight-only linear at small M (split-K GEMV) and across its batch-size limits, against float64 references.

For M <= 16 the INT8 / FP8 weight is converted to bf16 / fp16 exactly and scaled in fp32, so the only error left
against the float64 product of the dequantized weight is fp32 accumulation and the output rounding (~48 dB for
bf16 output): the floor sits 4 dB under that. Above 16 rows the tiled kernel also rounds the dequantized weight
to bf16 (the 37 dB floor of ``test_gemm_kernels.py``).
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, ON_CUDA, scaled_randn

from lrq_ao.kernels import weight_only_gemm as wo
from lrq_ao.primitives import FP8_DTYPE, FormatSpec, dequantize, quantize_rtn, sqnr

SMALL_M_SQNR_DB = 44.0
TILED_SQNR_DB = 37.0
# (N, K): ragged against the CPU tile (16 x 32) for per-tensor / per-row; block layouts need multiples of the block.
RAGGED = {"tensor": (33, 65), "row": (40, 200), "block": (96, 160)}
REAL = [(1, 3072, 15360), (16, 9216, 3072), (4, 4096, 10240)]


def _weight(n: int, k: int, qdtype, granularity: str, seed: int = 1):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    q, s, block_size = quantize_rtn(w, FormatSpec(qdtype, granularity, 32))
    return q.to(DEVICE), s.to(DEVICE), block_size


def _bias(n: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEVICE)


def _reference(x, wq, ws, block_size, bias):
    y = x.double().cpu() @ dequantize(wq.cpu(), ws.cpu(), block_size).double().t()
    return (y if bias is None else y + bias.double().cpu()).to(x.device)


@pytest.mark.parametrize("qdtype", [torch.int8, FP8_DTYPE], ids=["int8", "fp8"])
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("m", [1, 7, 16, 17, 33])
def test_weight_only_linear_matches_float64(qdtype, granularity, m):
    n, k = RAGGED[granularity]
    x = scaled_randn(m, k, seed=m)
    wq, ws, block_size = _weight(n, k, qdtype, granularity)
    bias = _bias(n) if m != 7 else None
    y = wo.weight_only_linear(x, wq, ws, block_size, bias)
    assert y.dtype == x.dtype and y.shape == (m, n)
    floor = SMALL_M_SQNR_DB if m <= wo.SMALL_M_MAX else TILED_SQNR_DB
    assert sqnr(_reference(x, wq, ws, block_size, bias), y) > floor


@pytest.mark.skipif(not ON_CUDA, reason="real sizes run on CUDA only (the interpreter is too slow)")
@pytest.mark.parametrize("mnk", REAL, ids=str)
@pytest.mark.parametrize("qdtype", [torch.int8, FP8_DTYPE], ids=["int8", "fp8"])
def test_small_m_real_sizes(qdtype, mnk):
    """The autotuned launch (whatever split it picks) at real sizes; CUDA only."""
    m, n, k = mnk
    x = scaled_randn(m, k)
    wq, ws, block_size = _weight(n, k, qdtype, "row")
    bias = _bias(n)
    assert sqnr(_reference(x, wq, ws, block_size, bias), wo.weight_only_linear(x, wq, ws, block_size, bias)) > 44


def _rows_across_bf16_range(m: int, k: int) -> torch.Tensor:
    """bf16 activations whose rows span 1e-30 .. 1e30 (and one all-zero row): each is a column of the kernel's
    x.T tile, which the FP8 path scales into fp16 range by its own power of two."""
    x = scaled_randn(m, k, dtype=torch.float32, seed=3)
    gains = torch.tensor([1.0, 1e-30, 1e30, 1e-3, 1e4, 0.5, 1e20][:m], device=x.device)
    return (x * gains[:, None]).to(torch.bfloat16)


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_fp8_fp16_dot_keeps_every_row_magnitude(granularity):
    """FP8 weights, bf16 activations: the fp16 MMA path against float64, row by row (each row's own SQNR), with
    rows 60 orders of magnitude apart."""
    n, k = RAGGED[granularity]
    x = _rows_across_bf16_range(7, k)
    wq, ws, block_size = _weight(n, k, FP8_DTYPE, granularity)
    mode, sblock = wo.scale_mode(block_size, (n, k))
    out = torch.empty((7, n), dtype=torch.bfloat16, device=DEVICE)
    y = wo.small_m_linear(x, wq, ws, mode, sblock, None, out, fp16_dot=True)
    ref = _reference(x, wq, ws, block_size, None)
    assert torch.equal(y[0], torch.zeros_like(y[0]))  # the all-zero row (scaled_randn's row 0)
    for row in range(1, 7):
        assert sqnr(ref[row], y[row]) > SMALL_M_SQNR_DB, row


@pytest.mark.skipif(ON_CUDA, reason="on the GPU the two MMAs accumulate in different orders")
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
def test_fp8_fp16_dot_is_bit_identical_to_the_float32_dot_in_the_interpreter(granularity):
    """Every product is exact either way (scaling by powers of two, e4m3 and bf16 values exact in fp16 and fp32), so
    with the interpreter's float32 accumulation both paths give the same bits, split partials included."""
    n, k = RAGGED[granularity]
    x = _rows_across_bf16_range(7, k)
    wq, ws, block_size = _weight(n, k, FP8_DTYPE, granularity)
    mode, sblock = wo.scale_mode(block_size, (n, k))
    outs = [torch.empty((7, n), dtype=torch.bfloat16) for _ in range(2)]
    for out, fp16 in zip(outs, (True, False), strict=True):
        wo.small_m_linear(x, wq, ws, mode, sblock, _bias(n), out, fp16_dot=fp16)
    assert torch.equal(*outs)


def test_float16_activations():
    x = scaled_randn(5, 72, dtype=torch.float16)
    wq, ws, block_size = _weight(40, 72, FP8_DTYPE, "row")
    y = wo.weight_only_linear(x, wq, ws, block_size, _bias(40, torch.float16))
    assert y.dtype == torch.float16
    assert sqnr(_reference(x, wq, ws, block_size, _bias(40, torch.float16)), y) > 50  # fp16 output: ~60 dB


@pytest.mark.parametrize("qdtype", [torch.int8, FP8_DTYPE], ids=["int8", "fp8"])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_sum_is_exact(qdtype, split_k):
    """Small integers, unit scale, fp16 output: every partial and their sum are exact, whatever the split."""
    m, n, k = 5, 40, 200
    g = torch.Generator().manual_seed(split_k)
    x = torch.randint(-3, 4, (m, k), generator=g).to(torch.float16)
    wq = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)  # |sums| <= 3 * 7 * 200 < 2**11
    if qdtype == FP8_DTYPE:
        wq = wq.to(torch.float32).to(FP8_DTYPE)
    x, wq, one = x.to(DEVICE), wq.to(DEVICE), torch.ones(1, 1, device=DEVICE)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    config = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split_k}
    wo.small_m_linear(x, wq, one, wo.SCALE_TENSOR, 1, None, out, config)
    exact = x.double().cpu() @ wq.cpu().double().t()
    assert torch.equal(out.cpu().double(), exact)
    assert int(wo.tile_counters(x.device).count_nonzero()) == 0  # the last split of each tile reset its counter


def test_opcheck_tiled_path():
    """``test_gemm_kernels.test_opcheck_gemm_ops`` checks the small-M path (M = 5); this the tiled one."""
    x = scaled_randn(20, 64)
    wq, ws, _ = _weight(48, 64, torch.int8, "row")
    torch.library.opcheck(torch.ops.lrq_ao.weight_only_linear.default, (x, wq, ws, 1, 64, _bias(48)))
