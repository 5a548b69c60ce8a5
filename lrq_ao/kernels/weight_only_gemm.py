"""Weight-only linear: bf16/fp16 activations times an INT8 / FP8 weight dequantized inside the GEMM.

``y = x @ dq(W).T + bias`` with ``dq(W) = (wq.float() * scale).to(x.dtype)`` formed tile by tile in registers,
so the weight is read once, at 8 bits: at small M (decoding, small batches) the product is memory-bound and that
halves the bytes a bf16 weight costs. Choosing this op never depends on the batch size: above ``FUSED_MAX_M``
rows the op itself (on the concrete M, at run time) dequantizes the weight in one Triton pass and calls cuBLAS,
because at large M converting the weight inside every output tile costs more than that pass.

Scale layouts: per tensor ``(1, 1)``, per row ``(N, 1)``, block ``(N // b, K // b)`` (``BLOCK_K`` divides ``b``,
so a K step reads one scale per output row). Ragged M, N and K are masked.

Op: ``lrq_ao::weight_only_linear(x, wq, w_scale, bn, bk, bias)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrq_ao.kernels._gemm_common import autotune_bench, config, grid_1d, grouped_tile
from lrq_ao.kernels._runtime import check_contiguous_last, check_device, launchable, m_bucket

SCALE_TENSOR, SCALE_ROW, SCALE_BLOCK = 0, 1, 2
# Above this batch size the weight is dequantized once and cuBLAS runs the bf16 GEMM (see weight_only_linear).
FUSED_MAX_M = 64

WEIGHT_ONLY_CONFIGS = [
    # thin M tiles: memory-bound decoding / small batches
    config(16, 16, 256, 4, 4, group_m=1),
    config(16, 32, 256, 4, 4, group_m=1),
    config(16, 64, 128, 4, 5, group_m=1),
    config(16, 32, 512, 4, 3, group_m=1),
    config(32, 64, 128, 4, 4),
    # compute-bound: large M
    config(64, 128, 64, 4, 4),
    config(128, 128, 64, 8, 4),
    config(128, 256, 64, 8, 3),
]

CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}


def _prune(configs, named_args, **kwargs):
    mode = kwargs.get("SCALE_MODE", named_args.get("SCALE_MODE"))
    scale_block = kwargs.get("SCALE_BLOCK", named_args.get("SCALE_BLOCK"))
    if mode != SCALE_BLOCK:
        return configs
    kept = [c for c in configs if scale_block % c.kwargs["BLOCK_K"] == 0]
    return kept or [config(16, 32, scale_block, 4, 4, group_m=1)]


@triton.jit
def _weight_only_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_cm,
    stride_sn,
    M_BUCKET,
    SCALE_MODE: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_IN_F32: tl.constexpr = False,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    safe_m = offs_m % M
    safe_n = offs_n % N
    x_ptrs = x_ptr + safe_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + safe_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    if SCALE_MODE == 0:
        scale = tl.load(s_ptr)
    elif SCALE_MODE == 1:
        scale = tl.load(s_ptr + safe_n * stride_sn)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if SCALE_MODE == 2:
            scale = tl.load(s_ptr + (safe_n // SCALE_BLOCK) * stride_sn + k0 // SCALE_BLOCK)[None, :]
        w_dq = (w.to(tl.float32) * scale).to(x.dtype)
        if DOT_IN_F32:
            # Triton's interpreter mis-multiplies bfloat16 operands; the values are exact in float32.
            acc = tl.dot(x.to(tl.float32), w_dq.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w_dq, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_weight_only_gemm_tuned = triton.autotune(
    configs=WEIGHT_ONLY_CONFIGS,
    do_bench=autotune_bench,
    key=["N", "K", "M_BUCKET", "SCALE_MODE", "SCALE_BLOCK", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune},
)(_weight_only_gemm_kernel)


@triton.jit
def _dequantize_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    N,
    K,
    stride_wn,
    stride_on,
    stride_sn,
    SCALE_MODE: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * TILE_N + tl.arange(0, TILE_N)
    offs_k = tl.program_id(1) * TILE_K + tl.arange(0, TILE_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    safe_n = offs_n % N
    if SCALE_MODE == 0:
        scale = tl.load(s_ptr)
    elif SCALE_MODE == 1:
        scale = tl.load(s_ptr + safe_n * stride_sn)[:, None]
    else:
        k_blocks = (offs_k % K) // SCALE_BLOCK
        scale = tl.load(s_ptr + (safe_n // SCALE_BLOCK)[:, None] * stride_sn + k_blocks[None, :])
    out = (w.to(tl.float32) * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], out, mask=mask)


def dequantize_weight(
    wq: torch.Tensor, w_scale: torch.Tensor, block_size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``(wq.float() * scale).to(dtype)`` in one pass (1 byte read, 2 written per element)."""
    n, k = wq.shape
    mode, sblock = scale_mode(block_size, (n, k))
    device = check_device("lrq_ao weight dequantization", wq, w_scale)
    out = torch.empty((n, k), dtype=dtype, device=device)
    tile_n, tile_k = 32, 128
    grid = (triton.cdiv(n, tile_n), triton.cdiv(k, tile_k))
    launchable(_dequantize_kernel, device)[grid](
        wq,
        w_scale,
        out,
        n,
        k,
        wq.stride(0),
        out.stride(0),
        w_scale.stride(0),
        SCALE_MODE=mode,
        SCALE_BLOCK=sblock,
        TILE_N=tile_n,
        TILE_K=tile_k,
    )
    return out


def scale_mode(block_size: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """(SCALE_MODE, SCALE_BLOCK) for a weight ``block_size``; raises ``ValueError`` for unsupported layouts."""
    n, k = shape
    bn, bk = block_size
    if (bn, bk) == (n, k):
        return SCALE_TENSOR, 1
    if (bn, bk) == (1, k):
        return SCALE_ROW, 1
    if bn == bk and bn >= 16 and n % bn == 0 and k % bk == 0:
        return SCALE_BLOCK, bn
    raise ValueError(
        f"lrq_ao::weight_only_linear: block_size {block_size} for weight {shape} is not per-tensor, per-row or "
        f"square block-wise (block >= 16 dividing both dims)"
    )


def weight_only_linear(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, block_size: tuple[int, int], bias: torch.Tensor | None
) -> torch.Tensor:
    """``x (M, K) @ dq(wq (N, K)).T + bias`` in ``x.dtype`` (bfloat16 or float16)."""
    name = "lrq_ao::weight_only_linear"
    check_contiguous_last(name, "x", x)
    check_contiguous_last(name, "wq", wq)
    device = check_device(name, x, wq, w_scale)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: x must be bfloat16 or float16 for the tensor cores, got {x.dtype}")
    if wq.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"{name}: wq must be int8 or float8_e4m3fn, got {wq.dtype}")
    m, k = x.shape
    n, k_w = wq.shape
    if k != k_w:
        raise ValueError(f"{name}: x has K={k} but wq has K={k_w}")
    mode, sblock = scale_mode(block_size, (n, k))
    bn, bk = block_size
    if w_scale.dtype != torch.float32 or w_scale.shape != (n // bn, k // bk):
        raise ValueError(f"{name}: w_scale must be float32 {(n // bn, k // bk)}, got {w_scale.dtype} {w_scale.shape}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if m > FUSED_MAX_M:
        # Compute-bound: converting the weight inside every output tile costs more than one dequantization pass
        # (N*K*3 bytes) followed by cuBLAS. Decided here on the concrete M, never at backend selection.
        w = dequantize_weight(wq, w_scale, block_size, x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    out = torch.empty((m, n), dtype=x.dtype, device=device)
    if m == 0:
        return out
    args = (x, wq, w_scale, bias if bias is not None else out, out, m, n, k)
    args += (x.stride(0), wq.stride(0), out.stride(0), w_scale.stride(0), m_bucket(m))
    meta = {"SCALE_MODE": mode, "SCALE_BLOCK": sblock, "HAS_BIAS": bias is not None}
    if device.type == "cuda":
        _weight_only_gemm_tuned[grid_1d(m, n)](*args, **meta)
    else:
        cpu = dict(CPU_CONFIG, BLOCK_K=min(CPU_CONFIG["BLOCK_K"], sblock) if mode == SCALE_BLOCK else 32)
        launchable(_weight_only_gemm_kernel, device)[grid_1d(m, n)(cpu)](*args, **meta, **cpu, DOT_IN_F32=True)
    return out


@torch.library.custom_op("lrq_ao::weight_only_linear", mutates_args=())
def weight_only_linear_op(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bn: int, bk: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """Triton weight-only linear with in-kernel dequantization; see the module docstring."""
    return weight_only_linear(x, wq, w_scale, (bn, bk), bias)


@weight_only_linear_op.register_fake
def _(x, wq, w_scale, bn, bk, bias):
    return x.new_empty((x.shape[0], wq.shape[0]))
