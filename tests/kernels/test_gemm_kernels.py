"""W8A8 (row, block), weight-only and FP8 ``_scaled_mm`` linears against float64 references.

Integer accumulation is checked bit-exact (unit scales, float32 output, sums below 2**24); outputs in bf16 are
checked by SQNR against the float64 product of the *dequantized* operands, so the only error left is the
kernel's own (accumulation order, bf16 output rounding, and for weight-only the bf16 dequantized weight):
the floors below sit ~5 dB under what the float32-accumulating PyTorch emulation reaches on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, ON_CUDA, needs_fp8_compute, scaled_randn

from lrq_ao.kernels._gemm_common import tma_operands
from lrq_ao.kernels.act_quant import quantize_activation_triton
from lrq_ao.kernels.block_gemm import block_scaled_gemm, block_scaled_linear
from lrq_ao.kernels.fp8_linear import fp8_scaled_mm_linear, scale_output_triton
from lrq_ao.kernels.row_gemm import row_scaled_gemm, row_scaled_linear
from lrq_ao.kernels.weight_only_gemm import weight_only_linear
from lrq_ao.layouts.activation import ActivationMode, dequantize_activation
from lrq_ao.primitives import FP8_DTYPE, FormatSpec, dequantize, quantize_rtn, sqnr

QDTYPES = [pytest.param(torch.int8, id="int8"), pytest.param(FP8_DTYPE, id="fp8", marks=needs_fp8_compute())]
# (M, N, K): M in {1, 7, 33}; N, K not multiples of the CPU tile (32) for the unblocked kernels.
SMALL = [(1, 40, 72), (7, 33, 65), (33, 64, 96)]
REAL = [(16, 3072, 3072), (4608, 3072, 3072), (1024, 3072, 15360), (257, 12288, 3072)] if ON_CUDA else []
BLOCKED = [(1, 64, 64, 32), (7, 64, 128, 64), (33, 96, 64, 32)]
REAL_BLOCKED = [(4608, 3072, 3072, 128), (33, 3072, 12288, 128), (100, 4096, 1024, 256)] if ON_CUDA else []
OUTPUT_SQNR_DB = 40.0  # bf16 output rounding alone gives ~48 dB
WEIGHT_ONLY_SQNR_DB = 37.0  # plus the bf16 rounding of the dequantized weight


def _weight(n: int, k: int, qdtype, granularity: str, block: int = 32, seed: int = 1):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    q, s, block_size = quantize_rtn(w, FormatSpec(qdtype, granularity, block))
    return q.to(DEVICE), s.to(DEVICE), block_size


def _bias(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16).to(DEVICE)


def _reference(x_dq: torch.Tensor, w_dq: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x_dq.double() @ w_dq.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("mnk", SMALL, ids=str)
def test_row_gemm_accumulates_exactly(qdtype, mnk):
    m, n, k = mnk
    g = torch.Generator().manual_seed(m)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if qdtype == FP8_DTYPE:
        xq, wq = (xq.float() / 4).to(qdtype), (wq.float() / 4).to(qdtype)
    one = torch.ones(1, 1, device=DEVICE)
    out = row_scaled_gemm(xq.to(DEVICE), one, wq.to(DEVICE), one, None, torch.float32)
    exact = xq.double() @ wq.double().t()
    if qdtype == FP8_DTYPE and ON_CUDA:
        # Hopper's FP8 tensor cores accumulate with fewer than 32 bits (DeepSeek-V3, section 3.3.2): close only.
        assert sqnr(exact, out.cpu()) > 60.0
    else:
        assert torch.equal(out.cpu().double(), exact)


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("mnk", SMALL[1:] + REAL, ids=str)
def test_row_scaled_linear(qdtype, granularity, mnk):
    m, n, k = mnk
    x = scaled_randn(m, k)
    wq, ws, block_size = _weight(n, k, qdtype, granularity)
    bias = _bias(n)
    y = row_scaled_linear(x, wq, ws, bias, "row")
    xq, xs = quantize_activation_triton(x, qdtype, "row")
    ref = _reference(xq.float() * xs, dequantize(wq, ws, block_size), bias)
    assert y.dtype == x.dtype and y.shape == (m, n)
    assert sqnr(ref, y) > OUTPUT_SQNR_DB


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("mnkb", BLOCKED + REAL_BLOCKED, ids=str)
def test_block_scaled_linear(qdtype, mnkb):
    m, n, k, block = mnkb
    x = scaled_randn(m, k)
    wq, ws, block_size = _weight(n, k, qdtype, "block", block)
    bias = _bias(n)
    y = block_scaled_linear(x, wq, ws, block, bias)
    xq, xs = quantize_activation_triton(x, qdtype, "block", block)
    x_dq = dequantize_activation(xq, xs, ActivationMode("dynamic", "block", block))
    ref = _reference(x_dq, dequantize(wq, ws, block_size), bias)
    assert sqnr(ref, y) > OUTPUT_SQNR_DB


def test_block_gemm_accumulates_each_block_exactly():
    """Unit scales and small integers: every per-block int32 partial and their float32 sum are exact."""
    g = torch.Generator().manual_seed(0)
    xq = torch.randint(-15, 16, (33, 64), generator=g, dtype=torch.int8)
    wq = torch.randint(-15, 16, (64, 64), generator=g, dtype=torch.int8)
    ones_x, ones_w = torch.ones(33, 2, device=DEVICE), torch.ones(2, 2, device=DEVICE)
    out = block_scaled_gemm(xq.to(DEVICE), ones_x, wq.to(DEVICE), ones_w, 32, None, torch.float32)
    assert torch.equal(out.cpu().double(), xq.double() @ wq.double().t())


def test_block_gemm_converts_extreme_partials_exactly():
    """Per-block int32 partials at the edge of the exact float32 conversion: +-2**22 and 256 * 127 * 127."""
    signs = torch.tensor([1, -1, 1, -1], dtype=torch.int8)[:, None]
    xq = torch.cat([torch.full((4, 256), -128, dtype=torch.int8), signs.repeat(1, 256) * 127], dim=1)
    wq = torch.cat([torch.full((256, 256), -128, dtype=torch.int8), torch.full((256, 256), 127, dtype=torch.int8)], 1)
    wq[128:, 256:] = -127
    ones_x, ones_w = torch.ones(4, 2, device=DEVICE), torch.ones(1, 2, device=DEVICE)
    out = block_scaled_gemm(xq.to(DEVICE), ones_x, wq.to(DEVICE), ones_w, 256, None, torch.float32)
    assert torch.equal(out.cpu().double(), xq.double() @ wq.double().t())


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values one byte past a 16-byte boundary with an odd row stride: TMA refuses, pointers load it."""
    padded = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=t.dtype, device=t.device)
    padded[:, 1:] = t
    return padded[:, 1:]


@pytest.mark.parametrize("kind", ["row", "block"])
def test_tma_and_pointer_loads_agree(kind):
    """Aligned operands go through TMA descriptors, misaligned ones through pointers: same bits out."""
    m, n, k = 33, 64, 96
    g = torch.Generator().manual_seed(5)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEVICE)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEVICE)
    bias = _bias(n)
    if kind == "row":
        xs, ws = torch.rand(m, 1, generator=g).to(DEVICE), torch.rand(n, 1, generator=g).to(DEVICE)
        run = lambda a, b: row_scaled_gemm(a, xs, b, ws, bias, torch.float32)  # noqa: E731
    else:
        xs, ws = torch.rand(m, k // 32, generator=g).to(DEVICE), torch.rand(n // 32, k // 32, generator=g).to(DEVICE)
        run = lambda a, b: block_scaled_gemm(a, xs, b, ws, 32, bias, torch.float32)  # noqa: E731
    assert tma_operands(xq, wq) and not tma_operands(_misaligned(xq), _misaligned(wq))
    aligned, misaligned = run(xq, wq), run(_misaligned(xq), _misaligned(wq))
    assert torch.equal(aligned, misaligned)
    if kind == "row":
        ref = _reference(xq.double().cpu() * xs.cpu().double(), wq.double().cpu() * ws.cpu().double(), bias.cpu())
        assert sqnr(ref, aligned.cpu()) > 120.0


@pytest.mark.parametrize("qdtype", [torch.int8, FP8_DTYPE], ids=["int8", "fp8"])
@pytest.mark.parametrize(
    "case",
    [((1, 40, 72), "row"), ((7, 33, 65), "tensor"), ((33, 64, 96), "block"), ((70, 64, 96), "block")]
    + [(s, "row") for s in REAL],
)
def test_weight_only_linear(qdtype, case):
    (m, n, k), granularity = case
    x = scaled_randn(m, k)
    wq, ws, block_size = _weight(n, k, qdtype, granularity)
    bias = _bias(n)
    y = weight_only_linear(x, wq, ws, block_size, bias)
    ref = _reference(x, dequantize(wq, ws, block_size), bias)
    assert sqnr(ref, y) > WEIGHT_ONLY_SQNR_DB


# (7, 48, 64) and (33, 32, 96): K > N at M < 256, cuBLAS's unit-scale route with our scale_output_triton epilogue
# wherever the product is row-wise; on CUDA 12288 -> 3072 at M = 16 as well.
FP8_CASES = [(7, 48, 64), (33, 32, 96)] + REAL[:2] + ([(16, 3072, 12288)] if ON_CUDA else [])


@needs_fp8_compute()
@pytest.mark.parametrize("weight_gran, act_gran", [("tensor", "tensor"), ("tensor", "row"), ("row", "row")])
@pytest.mark.parametrize("mnk", FP8_CASES, ids=str)
def test_fp8_scaled_mm_linear(weight_gran, act_gran, mnk):
    m, n, k = mnk
    x = scaled_randn(m, k)
    wq, ws, block_size = _weight(n, k, FP8_DTYPE, weight_gran)
    bias = _bias(n)
    y = fp8_scaled_mm_linear(x, wq, ws, act_gran, bias)
    xq, xs = quantize_activation_triton(x, FP8_DTYPE, act_gran)
    assert sqnr(_reference(xq.float() * xs, dequantize(wq, ws, block_size), bias), y) > OUTPUT_SQNR_DB


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("x_rows, w_rows, with_bias", [(True, True, True), (False, True, False), (True, False, True)])
@pytest.mark.parametrize("m, n", [(1, 40), (7, 1100), (33, 64)] + ([(16, 3072)] if ON_CUDA else []), ids=str)
def test_scale_output_rounds_the_float64_epilogue_once(m, n, x_rows, w_rows, with_bias, out_dtype):
    """``(y * xs) * ws + bias`` rounded once to the output dtype: within one output ulp of float64 (per-row and
    per-tensor scales; N = 1100 spans two column tiles, the second ragged)."""
    g = torch.Generator().manual_seed(m + n)
    y = (torch.randn(m, n, generator=g) * 300).to(DEVICE)
    xs = (torch.rand(m if x_rows else 1, 1, generator=g) + 0.5).to(DEVICE)
    ws = (torch.rand(n if w_rows else 1, 1, generator=g) / 100).to(DEVICE)
    bias = _bias(n).to(out_dtype) if with_bias else None
    out = scale_output_triton(y, xs, ws, bias, out_dtype)
    ref = y.double() * xs.double().reshape(-1, 1) * ws.double().reshape(1, -1)
    ref = ref if bias is None else ref + bias.double()
    finfo = torch.finfo(out_dtype)
    ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(finfo.tiny))))  # one ulp at ref
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert ((out.double() - ref).abs() <= ulp).all()


def test_errors_name_the_problem():
    wq, ws, block_size = _weight(64, 64, torch.int8, "block")
    with pytest.raises(ValueError, match="block 48 must be one of"):
        block_scaled_linear(scaled_randn(2, 64), wq, ws, 48, None)
    with pytest.raises(ValueError, match="x has K=32 but wq has K=64"):
        weight_only_linear(scaled_randn(2, 32), wq, ws, block_size, None)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        weight_only_linear(scaled_randn(2, 64, dtype=torch.float32), wq, ws, block_size, None)


def test_opcheck_gemm_ops():
    x = scaled_randn(5, 64)
    bias = _bias(64)
    wq, ws, _ = _weight(64, 64, torch.int8, "row")
    wb, wbs, _ = _weight(64, 64, torch.int8, "block")
    xq, xs = quantize_activation_triton(x, torch.int8, "row")
    ops = torch.ops.lrq_ao
    checks = [
        (ops.row_scaled_gemm.default, (xq, xs, wq, ws, bias, "bfloat16")),
        (ops.row_scaled_linear.default, (x, wq, ws, None, "row")),
        (ops.block_scaled_linear.default, (x, wb, wbs, 32, bias)),
        (ops.weight_only_linear.default, (x, wq, ws, 1, 64, bias)),
    ]
    xbq, xbs = quantize_activation_triton(x, torch.int8, "block", 32)
    checks.append((ops.block_scaled_gemm.default, (xbq, xbs, wb, wbs, 32, None, "float32")))
    for op, args in checks:
        torch.library.opcheck(op, args)


@needs_fp8_compute()
def test_opcheck_fp8_op():
    x = scaled_randn(5, 64)
    wf, wfs, _ = _weight(64, 64, FP8_DTYPE, "row")
    wk, wks, _ = _weight(48, 64, FP8_DTYPE, "row")  # K > N: the unit-scale route and its Triton epilogue
    # opcheck's schema test compares inputs with float ops that torch lacks for float8 tensors (CPU and CUDA).
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for args in [(x, wf, wfs, "row", _bias(64)), (x, wk, wks, "row", _bias(48))]:
        torch.library.opcheck(torch.ops.lrq_ao.fp8_scaled_mm_linear.default, args, test_utils=utils)
