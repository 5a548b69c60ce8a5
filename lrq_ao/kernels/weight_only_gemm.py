"""Weight-only linear: bf16/fp16 activations times an INT8 / FP8 weight dequantized inside the GEMM.

``y = x @ dq(W).T + bias`` with ``dq(W) = wq * scale``, the weight read once, at 8 bits: at small M (decoding,
small batches) the product is memory-bound and that halves the bytes a bf16 weight costs. Three regimes, chosen by
the op itself on the concrete M at run time (backend selection never looks at the batch size):

* ``M <= SMALL_M_MAX`` (16): ``_small_m_kernel``, a split-K GEMV built for bandwidth. Operands are swapped
  (``y.T = W @ x.T``) so the weight is the wide MMA operand and all M rows fit one 16-row MMA column block; the
  K dimension is cut into ``SPLIT_K`` ranges so that even N = 3072 gives enough programs to keep every SM
  streaming. ``wq`` converts to ``x.dtype`` *exactly* (int8 and e4m3 values are representable in bf16 and fp16);
  FP8 weights with bf16 activations multiply in fp16 instead (``_fp16_columns``: e4m3 -> fp16 is one packed
  conversion, e4m3 -> bf16 two; on the H200 that took FP8 at M = 16 from 0.91-1.17x to 0.96-1.40x bf16). The
  scale multiplies the fp32 accumulator afterwards (per K block for block scales, once in the epilogue for
  per-row / per-tensor). Split partials go to an fp32 workspace; the last program of each column tile to arrive
  (an atomic counter per tile, reset by that program) adds them in split order, so the result is deterministic.
* ``SMALL_M_MAX < M <= FUSED_MAX_M`` (64): ``_weight_only_gemm_kernel``, a tiled GEMM that dequantizes each
  weight tile to ``x.dtype`` in registers.
* ``M > FUSED_MAX_M``: the weight is dequantized once (Triton pass) and cuBLAS runs the bf16 GEMM, because at
  large M converting the weight inside every output tile costs more than that pass.

Scale layouts: per tensor ``(1, 1)``, per row ``(N, 1)``, block ``(N // b, K // b)`` (``BLOCK_K`` divides ``b``,
so a K step reads one scale per output row). Ragged M, N and K are masked.

Op: ``lrq_ao::weight_only_linear(x, wq, w_scale, bn, bk, bias)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrq_ao.kernels._gemm_common import autotune_bench, config, grid_1d, grouped_tile
from lrq_ao.kernels._jit_helpers import max_combine
from lrq_ao.kernels._runtime import check_contiguous_last, check_device, launchable, m_bucket

SCALE_TENSOR, SCALE_ROW, SCALE_BLOCK = 0, 1, 2
# Up to this batch size the split-K GEMV runs (all rows in one 16-row MMA block).
SMALL_M_MAX = 16
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


# ---- small M: split-K GEMV on swapped operands ---------------------------------------------------------------

SMALL_M_BLOCK = 16  # the narrowest MMA operand Triton's tl.dot takes; every M <= SMALL_M_MAX fits one block
MAX_SPLIT_K = 8
MAX_TILE_COUNTERS = 4096  # column tiles a split launch may have (N <= 4096 * BLOCK_N); more -> no split
MIN_PROGRAMS, MAX_PROGRAMS = 128, 2048  # about one to sixteen programs per SM on an H100 (132 SMs)


def small_m_config(block_n: int, block_k: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages
    )


SMALL_M_CONFIGS = [
    small_m_config(block_n, block_k, split_k, warps, stages)
    for block_n, block_k, warps, stages in [
        (32, 128, 4, 4),
        (32, 256, 4, 4),
        (64, 128, 4, 4),
        (64, 256, 4, 3),
        (128, 128, 4, 4),
        (128, 256, 8, 3),
    ]
    for split_k in (1, 2, 4, 8)
]


def _prune_small_m(configs, named_args, **kwargs):
    """Keep the launches that fill the GPU without starving each split of K steps."""
    n, k = named_args["N"], named_args["K"]
    mode = kwargs.get("SCALE_MODE", named_args.get("SCALE_MODE"))
    scale_block = kwargs.get("SCALE_BLOCK", named_args.get("SCALE_BLOCK"))

    def programs(c):
        return triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"]

    def fits(c):
        block_k, split_k = c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        if mode == SCALE_BLOCK and scale_block % block_k:
            return False
        too_many_tiles = triton.cdiv(n, c.kwargs["BLOCK_N"]) > MAX_TILE_COUNTERS
        return split_k == 1 or not (too_many_tiles or k < 2 * split_k * block_k)

    usable = [c for c in configs if fits(c)]
    if not usable:
        return [small_m_config(32, scale_block if mode == SCALE_BLOCK else 128, 1, 4, 4)]
    kept = [c for c in usable if MIN_PROGRAMS <= programs(c) <= MAX_PROGRAMS]
    return kept or [max(usable, key=programs)]


@triton.jit
def _store_columns(c_ptr, bias_ptr, acc, offs_n, offs_m, safe_n, mask, stride_cm, HAS_BIAS: tl.constexpr):
    """Store the (BLOCK_N, BLOCK_M) accumulator, plus bias, as rows ``offs_m`` of ``c`` (the product's transpose)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + safe_n).to(tl.float32)[:, None]
    c_ptrs = c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp16_columns(xt):
    """A ``(BLOCK_K, M)`` bf16 tile of ``x.T`` as fp16, each column scaled by the power of two ``2**s`` that puts its
    largest magnitude in ``[2**14, 2**15)``, and ``2**-s`` per column to scale the products back.

    For FP8 weights: e4m3 -> fp16 is one packed conversion, e4m3 -> bf16 a second one per element. bf16 values
    carry 8 significant bits, fp16 11, so the scaled values are exact unless they fall more than 2**28 below their
    column's largest (fp16 subnormals), where they are rounded.
    """
    xf = xt.to(tl.float32)
    biased_exp = (tl.reduce(tl.abs(xf), 0, max_combine).to(tl.int32, bitcast=True) >> 23) & 0xFF
    s = tl.minimum(tl.maximum(141 - biased_exp, -100), 100)  # all-zero column: any s, 100 here
    up = ((s + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - s) << 23).to(tl.float32, bitcast=True)
    return (xf * up[None, :]).to(tl.float16), down


# M is not specialized: M == 1 would otherwise compile (and autotune) a separate kernel for no gain.
@triton.jit(do_not_specialize=["M"])
def _small_m_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    bias_ptr,
    c_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_cm,
    stride_sn,
    M_BUCKET,
    SPLIT_K,
    SCALE_MODE: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_F32: tl.constexpr = False,
    FP16_DOT: tl.constexpr = False,
):
    """``c.T[n-tile] = sum over this program's K range of wq[n-tile] @ x.T``, scaled; M <= 16.

    Program (pid_n, pid_k) streams a ``BLOCK_N x (K / SPLIT_K)`` slab of the weight exactly once.
    """
    BLOCK_M: tl.constexpr = 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    safe_n = offs_n % N
    m_valid = offs_m < M
    steps_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * steps_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + steps_per_split * BLOCK_K)
    w_ptrs = w_ptr + safe_n[:, None].to(tl.int64) * stride_wn + (k_begin + offs_k)[None, :]
    xt_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (k_begin + offs_k)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, tl.cdiv(k_end - k_begin, BLOCK_K)):
        k0 = k_begin + step * BLOCK_K
        # Compared with a multiple of 16 (K is, in practice), the mask keeps 16-byte vector loads.
        k_mask = offs_k < K - k0
        # Rows of x beyond M are masked, not re-read: at M = 1 that is 1/16 of the activation traffic.
        xt = tl.load(xt_ptrs, mask=k_mask[:, None] & m_valid[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
        if SCALE_MODE == 2:
            block_scale = tl.load(s_ptr + (safe_n // SCALE_BLOCK) * stride_sn + k0 // SCALE_BLOCK)
        if FP16_DOT:
            xt, column_down = _fp16_columns(xt)
            part = tl.dot(w.to(tl.float16), xt) * column_down[None, :]
            if SCALE_MODE == 2:
                part *= block_scale[:, None]
            acc += part
        else:
            if DOT_IN_F32:
                # Triton's interpreter mis-multiplies bfloat16 operands (and mis-converts int8 to bfloat16); the
                # values are exact in float32.
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            else:
                # int8 and e4m3 values are exact in bf16 / fp16: the scale is applied to the fp32 sums instead.
                w = w.to(xt.dtype)
            if SCALE_MODE == 2:
                acc += tl.dot(w, xt) * block_scale[:, None]
            else:
                acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        xt_ptrs += BLOCK_K
    if SCALE_MODE == 0:
        acc *= tl.load(s_ptr)
    elif SCALE_MODE == 1:
        acc *= tl.load(s_ptr + safe_n * stride_sn)[:, None]
    mask = (offs_n < N)[:, None] & m_valid[None, :]
    if SPLIT_K == 1:
        _store_columns(c_ptr, bias_ptr, acc, offs_n, offs_m, safe_n, mask, stride_cm, HAS_BIAS)
    else:
        # partial[split, m, n]
        p_ptrs = partial_ptr + (pid_k * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None]
        tl.store(p_ptrs, acc, mask=mask)
        # Every thread's partial must be written before the counter's release publishes it.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Last split of this column tile: add all partials in split order (deterministic), reset the counter.
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in range(0, SPLIT_K):
                p_ptrs = partial_ptr + (split * M + offs_m[None, :]).to(tl.int64) * N + offs_n[:, None]
                total += tl.load(p_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            _store_columns(c_ptr, bias_ptr, total, offs_n, offs_m, safe_n, mask, stride_cm, HAS_BIAS)
            tl.store(counter_ptr + pid_n, 0)


_small_m_tuned = triton.autotune(
    configs=SMALL_M_CONFIGS,
    do_bench=autotune_bench,
    key=["N", "K", "M_BUCKET", "SCALE_MODE", "SCALE_BLOCK", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_small_m},
)(_small_m_kernel)

_tile_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def tile_counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters for split launches on the current stream (each launch leaves them zero).

    One buffer per stream, so launches on concurrent streams never share counters.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    if key not in _tile_counters:
        _tile_counters[key] = torch.zeros(MAX_TILE_COUNTERS, dtype=torch.int32, device=device)
    return _tile_counters[key]


def cpu_config(k: int, mode: int, sblock: int) -> dict[str, int]:
    """The interpreter's configuration: up to 3 (uneven) K ranges, so CPU tests cover the split reduction."""
    block_k = min(32, sblock) if mode == SCALE_BLOCK else 32
    return {"BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": max(1, min(3, triton.cdiv(k, block_k) // 2))}


def small_m_linear(
    x, wq, w_scale, mode: int, sblock: int, bias, out, config: dict[str, int] | None = None, fp16_dot=None
):
    """Launch ``_small_m_kernel`` into ``out`` (M <= 16) and return it.

    On CUDA the configuration is autotuned unless ``config`` (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``, optionally
    ``num_warps`` / ``num_stages``) fixes it; on CPU (interpreter) ``config`` defaults to ``cpu_config``.
    ``fp16_dot`` (default: FP8 weights with bf16 activations) takes ``_fp16_columns``' fp16 MMA.
    """
    m, k = x.shape
    n = wq.shape[0]
    device = x.device
    args = (x, wq, w_scale, bias if bias is not None else out, out)
    sizes = (m, n, k, x.stride(0), wq.stride(0), out.stride(0), w_scale.stride(0), m_bucket(m))
    meta = {"SCALE_MODE": mode, "SCALE_BLOCK": sblock, "HAS_BIAS": bias is not None}
    meta["FP16_DOT"] = fp16_dot if fp16_dot is not None else (wq.dtype.is_floating_point and x.dtype == torch.bfloat16)
    counters = tile_counters(device)
    if device.type == "cuda" and config is None:
        partial = torch.empty((MAX_SPLIT_K, m, n), dtype=torch.float32, device=device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _small_m_tuned[grid](*args, partial, counters, *sizes, **meta)
        return out
    config = config or cpu_config(k, mode, sblock)
    if config["SPLIT_K"] > 1 and triton.cdiv(n, config["BLOCK_N"]) > MAX_TILE_COUNTERS:
        raise ValueError(f"small_m_linear: N={n} has more column tiles than {MAX_TILE_COUNTERS} split counters")
    partial = torch.empty((config["SPLIT_K"], m, n), dtype=torch.float32, device=device)
    grid = (triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
    launchable(_small_m_kernel, device)[grid](
        *args, partial, counters, *sizes, **meta, **config, DOT_IN_F32=device.type == "cpu" and not meta["FP16_DOT"]
    )
    return out


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
    if m <= SMALL_M_MAX:
        # Memory-bound: the split-K GEMV streams the 8-bit weight once across every SM.
        return small_m_linear(x, wq, w_scale, mode, sblock, bias, out)
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
