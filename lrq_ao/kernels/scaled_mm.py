"""``torch._scaled_mm`` as lrq_ao's FP8 linears call it: plain tensors in, no tensor class, no Triton.

Shared by the TORCH backend ``torch_scaled_mm`` and the Triton-quantized ``lrq_ao::fp8_scaled_mm_linear`` op, so
both end in the same cuBLAS call (and the same way around cuBLAS's missing row-wise kernels for K > N at small M).
Importing this module needs neither Triton nor CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# cuBLAS's FP8 GEMM without periodic promotion of the accumulator (torchao's inference default): on the H100 the
# row-wise GEMM at 4608 x 3072 x 9216 took 250 us without it, torchao's whole dynamic linear 240 us with it. The
# output SQNR against float64 did not move (28.6 dB for both at M = 256: activation rounding dominates).
SCALED_MM_FAST_ACCUM = True


# cuBLAS's row-wise (outer-vector scaled) FP8 GEMM finds no algorithm for K > N at small M:
# CUBLAS_STATUS_NOT_SUPPORTED from cublasLtMatmulAlgoGetHeuristic, for torchao's PerRow on the H100 at M = 1 and 16
# and for ours and torchao's on the H200 at M = 16 (torch 2.11, CUDA 13.0; 12288 -> 3072, 15360 -> 3072,
# 10240 -> 4096), while the same shapes ran at M >= 256 and the tensor-wise kernel ran at M = 1 and 16. M from 17
# to 255 was not measured, so below 256 such shapes take the tensor-wise kernel with unit scales instead.
ROWWISE_SCALED_MM_MIN_M = 256


def rowwise_scaled_mm_unsupported(m, n: int, k: int) -> bool:
    """Whether cuBLAS's row-wise FP8 GEMM is avoided for an ``(m, k) x (k, n)`` product (see above)."""
    return k > n and m < ROWWISE_SCALED_MM_MIN_M


def scale_output_torch(y: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias, out_dtype: torch.dtype):
    """``(y * x_scale) * w_scale + bias`` in float32, rounded once to ``out_dtype``: the epilogue of the unit-scale
    route for a float32 ``y (M, N)``; ``x_scale`` has M or 1 entries, ``w_scale`` N or 1."""
    y = y * x_scale.reshape(-1, 1) * w_scale.reshape(1, -1)
    return (y if bias is None else y + bias.float()).to(out_dtype)


ScaleOutput = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.dtype], torch.Tensor]


def scaled_mm_linear(
    xq,
    x_scale,
    wq,
    w_scale,
    rowwise: bool,
    bias,
    out_dtype: torch.dtype,
    scale_output: ScaleOutput = scale_output_torch,
) -> torch.Tensor:
    """``(xq * x_scale) @ (wq * w_scale).T + bias`` through ``torch._scaled_mm``, for FP8 ``xq (M, K)`` and
    ``wq (N, K)``, scales as ``quantize_activation`` and the weight layouts store them.

    Where the row-wise kernel is unavailable (``rowwise_scaled_mm_unsupported``) the tensor-wise one runs with unit
    scales and a float32 output, and ``scale_output`` applies the two scale vectors and the bias and rounds once:
    the row-wise product's arithmetic. Plain torch ops by default (Inductor fuses them inside ``torch.compile``);
    the Triton backend's opaque op passes its one-kernel epilogue instead: run eagerly, the plain ops were five more
    launches and held 12288 -> 3072 at M = 16 to 0.64x bf16 on the H200 (1.00x with the one kernel). Under
    ``torch.compile`` the test on M becomes a guard, so a graph serves either side of the threshold."""
    m, (n, k) = xq.shape[0], wq.shape
    wq_t = wq.contiguous().t()  # column-major (K, N), as cuBLAS wants the second operand
    bias = None if bias is None else bias.to(out_dtype)
    if rowwise and rowwise_scaled_mm_unsupported(m, n, k):
        one = x_scale.new_ones((1, 1))
        y = torch._scaled_mm(xq, wq_t, one, one, out_dtype=torch.float32, use_fast_accum=SCALED_MM_FAST_ACCUM)
        return scale_output(y, x_scale, w_scale, bias, out_dtype)
    x_scale, w_scale = scaled_mm_scales(x_scale, w_scale, rowwise, m, n)
    return torch._scaled_mm(
        xq, wq_t, scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=out_dtype, use_fast_accum=SCALED_MM_FAST_ACCUM
    )


def scaled_mm_scales(x_scale: torch.Tensor, w_scale: torch.Tensor, rowwise: bool, m, n: int):
    """The ``(scale_a, scale_b)`` that ``torch._scaled_mm`` takes: ``(1, 1)`` twice for its tensor-wise kernel,
    else ``(M, 1)`` and ``(1, N)``, contiguous, with a per-tensor side broadcast (cuBLAS takes no mix of kinds).
    Decided from the weight's metadata, never from M (symbolic under ``torch.compile(dynamic=True)``)."""
    if not rowwise:
        return x_scale.reshape(1, 1), w_scale.reshape(1, 1)
    return x_scale.reshape(-1, 1).expand(m, 1).contiguous(), w_scale.reshape(1, -1).expand(1, n).contiguous()
