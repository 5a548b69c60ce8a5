"""Per-row W8A8 linear: per-token activation quantization + an INT8 / FP8 GEMM with the scales fused.

``y[m, n] = (sum_k xq[m, k] * wq[n, k]) * sx[m] * sw[n] + bias[n]``, accumulated in int32 (INT8, exact) or
float32 (FP8) over the whole K, rescaled once in the epilogue, bias added in float32, written in ``x.dtype``.
Against ``torch._int_mm`` this saves the int32 output round trip and the separate rescale kernel: the output is
written once, in bf16. Scales are per row (``(M, 1)`` / ``(N, 1)``) or per tensor (``(1, 1)``, read with stride
0), so per-tensor weights run here too. Operand tiles come through TMA descriptors when both operands are 16-byte
aligned (any K that is a multiple of 16, on Hopper), else through pointers with a masked K tail.

Ops: ``lrq_ao::row_scaled_gemm(xq, x_scale, wq, w_scale, bias, out_dtype_name)`` (quantized inputs given) and
``lrq_ao::row_scaled_linear(x, wq, w_scale, bias, act_granularity)`` (quantizes ``x`` first with
``lrq_ao::quantize_activation``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrq_ao.kernels._gemm_common import (
    CPU_CONFIG,
    W8A8_CONFIGS,
    autotune_bench,
    grid_1d,
    grouped_tile,
    prune_by_batch,
    w8a8_operands,
)
from lrq_ao.kernels._runtime import check_contiguous_last, check_device, launchable, m_bucket
from lrq_ao.kernels.act_quant import qdtype_name, quantize_activation_triton

OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@triton.jit
def _row_scaled_gemm_kernel(
    a_ptr,
    b_ptr,
    sa_ptr,
    sb_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    stride_sa,
    stride_sb,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    IS_INT: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``a_ptr`` / ``b_ptr`` are TMA descriptors when ``TMA`` (rows and K past the edge read as zero)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past the edge read a valid row (modulo) and are masked at the store.
    safe_m = offs_m % M
    safe_n = offs_n % N
    a_ptrs = a_ptr
    b_ptrs = b_ptr
    if not TMA:
        a_ptrs = a_ptr + safe_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + safe_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    if IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if TMA:
            a = a_ptr.load([pid_m * BLOCK_M, k0])
            b = b_ptr.load([pid_n * BLOCK_N, k0]).T
        else:
            k_mask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if IS_INT:
            acc += tl.dot(a, b, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc)
    sa = tl.load(sa_ptr + safe_m * stride_sa)
    sb = tl.load(sb_ptr + safe_n * stride_sb)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_row_scaled_gemm_tuned = triton.autotune(
    configs=W8A8_CONFIGS,
    do_bench=autotune_bench,
    key=["N", "K", "M_BUCKET", "HAS_BIAS", "IS_INT", "TMA"],
    prune_configs_by={"early_config_prune": prune_by_batch},
)(_row_scaled_gemm_kernel)


def _scale_stride(name: str, scale: torch.Tensor, rows: int, what: str) -> int:
    """Stride over rows of a ``(rows, 1)`` per-row or ``(1, 1)`` per-tensor scale."""
    if scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[1] != 1 or scale.shape[0] not in (1, rows):
        raise ValueError(
            f"{name}: {what} must be float32 of shape ({rows}, 1) or (1, 1), got {scale.dtype} {tuple(scale.shape)}"
        )
    return 0 if scale.shape[0] == 1 and rows != 1 else scale.stride(0)


def row_scaled_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(xq @ wq.T) * x_scale * w_scale.T + bias`` for quantized ``xq (M, K)`` and ``wq (N, K)`` of one dtype."""
    name = "lrq_ao::row_scaled_gemm"
    check_contiguous_last(name, "xq", xq)
    check_contiguous_last(name, "wq", wq)
    device = check_device(name, xq, wq, x_scale, w_scale)
    if xq.dtype != wq.dtype or xq.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"{name}: xq and wq must both be int8 or both float8_e4m3fn, got {xq.dtype}, {wq.dtype}")
    m, k = xq.shape
    n, k_w = wq.shape
    if k != k_w:
        raise ValueError(f"{name}: xq has K={k} but wq has K={k_w}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    stride_sa = _scale_stride(name, x_scale, m, "x_scale")
    stride_sb = _scale_stride(name, w_scale, n, "w_scale")
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0:
        return out
    (a, b), tma = w8a8_operands(xq, wq, CPU_CONFIG)
    args = (a, b, x_scale, w_scale, bias if bias is not None else out, out, m, n, k)
    args += (xq.stride(0), wq.stride(0), out.stride(0), stride_sa, stride_sb, m_bucket(m))
    meta = {"HAS_BIAS": bias is not None, "IS_INT": not xq.dtype.is_floating_point, "TMA": tma}
    if device.type == "cuda":
        _row_scaled_gemm_tuned[grid_1d(m, n)](*args, **meta)
    else:
        launchable(_row_scaled_gemm_kernel, device)[grid_1d(m, n)(CPU_CONFIG)](*args, **meta, **CPU_CONFIG)
    return out


def row_scaled_linear(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act_granularity: str = "row"
) -> torch.Tensor:
    """Quantize ``x (M, K)`` per row (or per tensor) to ``wq.dtype`` and run ``row_scaled_gemm``."""
    xq, x_scale = quantize_activation_triton(x, wq.dtype, act_granularity)
    return row_scaled_gemm(xq, x_scale, wq, w_scale, bias, x.dtype)


@torch.library.custom_op("lrq_ao::row_scaled_gemm", mutates_args=())
def row_scaled_gemm_op(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype_name: str,
) -> torch.Tensor:
    """Triton W8A8 GEMM with per-row / per-tensor scales and bias fused; see the module docstring."""
    return row_scaled_gemm(xq, x_scale, wq, w_scale, bias, out_dtype_from_name(out_dtype_name))


@row_scaled_gemm_op.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype_name):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype_from_name(out_dtype_name))


@torch.library.custom_op("lrq_ao::row_scaled_linear", mutates_args=())
def row_scaled_linear_op(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act_granularity: str
) -> torch.Tensor:
    """Dynamic per-row (or per-tensor) W8A8 linear on a 2-D ``x``: Triton activation quantization + GEMM."""
    return row_scaled_linear(x, wq, w_scale, bias, act_granularity)


@row_scaled_linear_op.register_fake
def _(x, wq, w_scale, bias, act_granularity):
    return x.new_empty((x.shape[0], wq.shape[0]))


def out_dtype_from_name(name: str) -> torch.dtype:
    """The output dtype an op's ``out_dtype_name`` argument names (the ops take dtypes as strings)."""
    if name not in OUT_DTYPES:
        raise ValueError(f"lrq_ao W8A8 GEMM: out_dtype_name must be one of {sorted(OUT_DTYPES)}, got {name!r}")
    return OUT_DTYPES[name]


__all__ = ["row_scaled_gemm", "row_scaled_linear", "qdtype_name"]
