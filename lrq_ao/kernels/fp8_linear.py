"""Dynamic FP8 linear on cuBLAS: fused Triton activation quantization feeding ``torch._scaled_mm``.

cuBLAS's FP8 GEMM with given scales is the ceiling on Hopper (about 1.8x bf16 on Flux shapes at M=4608); what
eats into it is quantizing the activation. Here that is one Triton pass per row (``row``) or an amax pass plus a
cast pass (``tensor``), see ``act_quant``; the bias goes into ``_scaled_mm``'s epilogue.

Weight scales: per tensor ``(1, 1)`` or per row ``(N, 1)``. A per-tensor weight with per-row activations is
given to cuBLAS as a broadcast ``(1, N)`` row-wise scale (cuBLAS wants both operands of one kind). The GEMM call is
``kernels.scaled_mm.scaled_mm_linear``, shared with ``torch_scaled_mm``, so both FP8 backends give the same GEMM (and
the same way around cuBLAS's missing row-wise kernels for K > N at small M). On that route this op scales the
float32 product and adds the bias in one Triton kernel (``scale_output_triton``), where plain torch would launch
one elementwise kernel per operation inside this opaque op.

Inside ``torch.compile`` with ``kernel='auto'`` the TORCH backend runs instead (see ``layouts.triton_backends``):
this op is opaque to Inductor, while that backend's quantization fuses with the producer of the activation.

Op: ``lrq_ao::fp8_scaled_mm_linear(x, wq, w_scale, act_granularity, bias)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrq_ao.kernels._runtime import check_contiguous_last, check_device, launchable
from lrq_ao.kernels.act_quant import quantize_activation_triton
from lrq_ao.kernels.scaled_mm import scaled_mm_linear
from lrq_ao.primitives import FP8_DTYPE

ACT_GRANULARITIES = ("tensor", "row")


def scaled_mm_refusal(n: int, k: int) -> str | None:
    """Why ``torch._scaled_mm`` cannot take a weight of shape ``(n, k)`` (``None`` if it can)."""
    if n % 16 or k % 16:
        return f"torch._scaled_mm needs N and K divisible by 16, weight is ({n}, {k})"
    return None


@triton.jit
def _scale_output_kernel(
    y_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, XS_STRIDE, WS_STRIDE, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr
):
    """``out[m, n-tile] = (y * xs[m]) * ws[n] + bias[n]`` in float32, one row per program, rounded once on store.
    A per-tensor scale has stride 0."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs_n < N
    y = tl.load(y_ptr + row * N + offs_n, mask=mask, other=0.0)
    y = y * tl.load(xs_ptr + row * XS_STRIDE)
    y = y * tl.load(ws_ptr + offs_n * WS_STRIDE, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask)


def scale_output_triton(
    y: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``kernels.scaled_mm.scale_output_torch`` in one launch: float32 ``y (M, N)`` scaled per row by ``x_scale``
    (M or 1 entries) and per column by ``w_scale`` (N or 1), plus ``bias``, rounded to ``out_dtype``."""
    m, n = y.shape
    out = torch.empty((m, n), dtype=out_dtype, device=y.device)
    if m == 0:
        return out
    xs, ws = x_scale.reshape(-1), w_scale.reshape(-1)
    block_n = min(1024, triton.next_power_of_2(n))
    launchable(_scale_output_kernel, y.device)[(m, triton.cdiv(n, block_n))](
        y.contiguous(),
        xs,
        ws,
        bias if bias is not None else y,  # never read without HAS_BIAS
        out,
        m,
        n,
        int(xs.numel() != 1),
        int(ws.numel() != 1),
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
    )
    return out


def fp8_scaled_mm_linear(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, act_granularity: str, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x (M, K)`` quantized per ``act_granularity`` to FP8, times ``wq (N, K)``, scales and bias fused."""
    name = "lrq_ao::fp8_scaled_mm_linear"
    check_contiguous_last(name, "x", x)
    check_contiguous_last(name, "wq", wq)
    check_device(name, x, wq, w_scale)
    if wq.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: wq must be float8_e4m3fn, got {wq.dtype}")
    if act_granularity not in ACT_GRANULARITIES:
        raise ValueError(f"{name}: act_granularity must be one of {ACT_GRANULARITIES}, got {act_granularity!r}")
    n, k = wq.shape
    reason = scaled_mm_refusal(n, k)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    if w_scale.dtype != torch.float32 or w_scale.shape not in ((1, 1), (n, 1)):
        raise ValueError(f"{name}: w_scale must be float32 (1, 1) or ({n}, 1), got {w_scale.dtype} {w_scale.shape}")
    xq, x_scale = quantize_activation_triton(x, wq.dtype, act_granularity)
    rowwise = act_granularity == "row" or w_scale.shape[0] != 1
    return scaled_mm_linear(xq, x_scale, wq, w_scale, rowwise, bias, x.dtype, scale_output_triton)


@torch.library.custom_op("lrq_ao::fp8_scaled_mm_linear", mutates_args=())
def fp8_scaled_mm_linear_op(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, act_granularity: str, bias: torch.Tensor | None
) -> torch.Tensor:
    """Dynamic FP8 linear: Triton activation quantization + ``torch._scaled_mm``."""
    return fp8_scaled_mm_linear(x, wq, w_scale, act_granularity, bias)


@fp8_scaled_mm_linear_op.register_fake
def _(x, wq, w_scale, act_granularity, bias):
    return x.new_empty((x.shape[0], wq.shape[0]))
