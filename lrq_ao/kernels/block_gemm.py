"""Block-wise W8A8 linear: activations in 1 x ``block`` groups, weights in ``block`` x ``block`` blocks.

``y[m, n] = sum_kb (sum_{k in kb} xq[m, k] * wq[n, k]) * sx[m, kb] * sw[n // block, kb] + bias[n]``

Each K step covers exactly one block (``BLOCK_K == block``): the int8 x int8 product is accumulated in int32 by the
tensor cores (float32 for FP8), then rescaled by both scales and added to a float32 accumulator, the scheme of
DeepSeek-V3's FP8 GEMM (arXiv:2412.19437, section 3.3) with INT8 operands. The rescale runs on the CUDA cores
between tensor-core steps, so its instruction count per element is the cost that matters: the int32 partial is
converted with ``int32_to_float32_exact`` (an add and a subtract instead of Hopper's slow I2F), and a tile no wider
than a weight block (``BLOCK_N <= block``) has one weight scale per K step, so the rescale is one multiply-add by a
per-row factor. The activation is quantized right before the GEMM by ``lrq_ao::quantize_activation`` (one pass,
``block`` granularity). Any block in {32, 64, 128, 256} that divides K and N; M is ragged (TMA reads zeros past the
last row, pointer loads a valid row; the store is masked).

Ops: ``lrq_ao::block_scaled_gemm(xq, x_scale, wq, w_scale, block, bias, out_dtype_name)`` and
``lrq_ao::block_scaled_linear(x, wq, w_scale, block, bias)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrq_ao.kernels._gemm_common import (
    CPU_CONFIG,
    autotune_bench,
    grid_1d,
    grouped_tile,
    int32_to_float32_exact,
    prune_by_batch,
    set_descriptor_boxes,
    w8a8_operands,
)
from lrq_ao.kernels._runtime import check_contiguous_last, check_device, launchable, m_bucket
from lrq_ao.kernels.act_quant import quantize_activation_triton
from lrq_ao.kernels.row_gemm import out_dtype_from_name

BLOCKS = (32, 64, 128, 256)

# BLOCK_K is the quantization block, fixed by the launcher; these configs tune the M and N tiles. A 128 x 128 tile
# on 8 warps holds the float32 accumulator and the int32 partial in 128 registers per thread; 128 x 256 needs 256.
# The rescale after each block's product waits for the tensor cores, and they idle while it runs: tiles of 64 x 128
# or 128 x 64 on 4 warps leave room for two or three programs per SM, whose products and rescales interleave.
BLOCK_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=set_descriptor_boxes
    )
    for bm, bn, w, s in [
        (128, 128, 8, 3),
        (128, 128, 8, 4),
        (128, 64, 4, 3),
        (128, 64, 4, 4),
        (64, 128, 4, 3),
        (64, 128, 4, 4),
        (64, 256, 8, 3),
        (64, 64, 4, 4),
        (32, 128, 4, 4),
        (16, 64, 4, 4),
        (16, 128, 4, 4),
    ]
]


def _prune(configs, named_args, **kwargs):
    block_k = kwargs.get("BLOCK_K", named_args.get("BLOCK_K"))
    # Two operand tiles per stage must fit the 228 KB of Hopper shared memory.
    fits = [c for c in configs if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * block_k * c.num_stages <= 200_000]
    return prune_by_batch(fits, named_args, big_m_rows=64)


@triton.jit
def _block_scaled_gemm_kernel(
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
    stride_sam,
    stride_sbn,
    M_BUCKET,
    HAS_BIAS: tl.constexpr,
    IS_INT: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``a_ptr`` / ``b_ptr`` are TMA descriptors when ``TMA``; ``BLOCK_K`` is the quantization block."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    safe_m = offs_m % M
    safe_n = offs_n % N
    a_ptrs = a_ptr
    b_ptrs = b_ptr
    if not TMA:
        a_ptrs = a_ptr + safe_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + safe_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    sa_ptrs = sa_ptr + safe_m * stride_sam
    ONE_WEIGHT_BLOCK: tl.constexpr = BLOCK_N <= BLOCK_K
    if ONE_WEIGHT_BLOCK:
        sb_ptr = sb_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_sbn
    else:
        sb_ptrs = sb_ptr + (safe_n // BLOCK_K) * stride_sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
        if TMA:
            a = a_ptr.load([pid_m * BLOCK_M, kb * BLOCK_K])
            b = b_ptr.load([pid_n * BLOCK_N, kb * BLOCK_K]).T
        else:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if IS_INT:
            partial = int32_to_float32_exact(tl.dot(a, b, out_dtype=tl.int32))
        else:
            partial = tl.dot(a, b)
        sa = tl.load(sa_ptrs + kb)
        if ONE_WEIGHT_BLOCK:
            acc = tl.fma(partial, (sa * tl.load(sb_ptr + kb))[:, None], acc)
        else:
            acc = tl.fma(partial, sa[:, None] * tl.load(sb_ptrs + kb)[None, :], acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_block_scaled_gemm_tuned = triton.autotune(
    configs=BLOCK_CONFIGS,
    do_bench=autotune_bench,
    key=["N", "K", "M_BUCKET", "HAS_BIAS", "IS_INT", "TMA", "BLOCK_K"],
    prune_configs_by={"early_config_prune": _prune},
)(_block_scaled_gemm_kernel)


def block_scaled_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    block: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Block-scaled ``xq (M, K) @ wq (N, K).T``; ``x_scale (M, K // block)``, ``w_scale (N // block, K // block)``."""
    name = "lrq_ao::block_scaled_gemm"
    check_contiguous_last(name, "xq", xq)
    check_contiguous_last(name, "wq", wq)
    check_contiguous_last(name, "x_scale", x_scale)
    check_contiguous_last(name, "w_scale", w_scale)
    device = check_device(name, xq, wq, x_scale, w_scale)
    if xq.dtype != wq.dtype or xq.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"{name}: xq and wq must both be int8 or both float8_e4m3fn, got {xq.dtype}, {wq.dtype}")
    m, k = xq.shape
    n, k_w = wq.shape
    if block not in BLOCKS or k % block or n % block or k != k_w:
        raise ValueError(
            f"{name}: block {block} must be one of {BLOCKS} and divide N={n} and K={k} (wq has K={k_w}); use a "
            f"per-row layout for this shape"
        )
    if x_scale.shape != (m, k // block) or w_scale.shape != (n // block, k // block):
        raise ValueError(
            f"{name}: expected x_scale {(m, k // block)} and w_scale {(n // block, k // block)}, got "
            f"{tuple(x_scale.shape)} and {tuple(w_scale.shape)}"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    if m == 0:
        return out
    cpu_tile = {key: v for key, v in CPU_CONFIG.items() if key != "BLOCK_K"}
    (a, b), tma = w8a8_operands(xq, wq, dict(cpu_tile, BLOCK_K=block))
    args = (a, b, x_scale, w_scale, bias if bias is not None else out, out, m, n, k)
    args += (xq.stride(0), wq.stride(0), out.stride(0), x_scale.stride(0), w_scale.stride(0), m_bucket(m))
    meta = {"HAS_BIAS": bias is not None, "IS_INT": not xq.dtype.is_floating_point, "TMA": tma, "BLOCK_K": block}
    if device.type == "cuda":
        _block_scaled_gemm_tuned[grid_1d(m, n)](*args, **meta)
    else:
        launchable(_block_scaled_gemm_kernel, device)[grid_1d(m, n)(cpu_tile)](*args, **meta, **cpu_tile)
    return out


def block_scaled_linear(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, block: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """Quantize ``x (M, K)`` in 1 x ``block`` groups to ``wq.dtype`` and run ``block_scaled_gemm``."""
    if block not in BLOCKS:
        raise ValueError(f"lrq_ao::block_scaled_linear: block {block} must be one of {BLOCKS}")
    xq, x_scale = quantize_activation_triton(x, wq.dtype, "block", block)
    return block_scaled_gemm(xq, x_scale, wq, w_scale, block, bias, x.dtype)


@torch.library.custom_op("lrq_ao::block_scaled_gemm", mutates_args=())
def block_scaled_gemm_op(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    block: int,
    bias: torch.Tensor | None,
    out_dtype_name: str,
) -> torch.Tensor:
    """Triton block-scaled W8A8 GEMM; see the module docstring."""
    return block_scaled_gemm(xq, x_scale, wq, w_scale, block, bias, out_dtype_from_name(out_dtype_name))


@block_scaled_gemm_op.register_fake
def _(xq, x_scale, wq, w_scale, block, bias, out_dtype_name):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype_from_name(out_dtype_name))


@torch.library.custom_op("lrq_ao::block_scaled_linear", mutates_args=())
def block_scaled_linear_op(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, block: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """Dynamic block-wise W8A8 linear on a 2-D ``x``: Triton activation quantization + block-scaled GEMM."""
    return block_scaled_linear(x, wq, w_scale, block, bias)


@block_scaled_linear_op.register_fake
def _(x, wq, w_scale, block, bias):
    return x.new_empty((x.shape[0], wq.shape[0]))
