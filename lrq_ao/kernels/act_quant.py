"""Dynamic activation quantization kernels (FP8 e4m3fn or INT8), matching ``layouts.activation.quantize_activation``.

Per scale group ``scale = max(amax / qmax, 1e-8)`` (float32), ``xq = round(x / scale)`` exactly as the weight
rules in ``lrq_ao.primitives`` (IEEE division, ties to even, saturating), so results are bit-identical to the
PyTorch reference.

* ``row`` (one scale per token) and ``block`` (one scale per 1 x ``block`` group along K): a single pass. The grid
  is (row tiles, groups): each program owns ``ROWS`` rows of one group and holds them in registers between the amax
  and the cast; a group wider than ``MAX_ROW_TILE`` is read twice (amax pass, then cast pass; the second read
  should mostly hit L2, 2 bytes x K per row: not yet measured).
* ``tensor``: two launches, the fewest a grid-wide amax allows without a grid barrier: partial amaxes combined
  with ``atomic_max`` into one float32, then the cast pass, which also writes the scale.

Op: ``lrq_ao::quantize_activation(x, qdtype_name, granularity, block) -> (xq, scale)`` with ``scale`` shaped
``(1, 1)``, ``(M, 1)`` or ``(M, K // block)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrq_ao.kernels._jit_helpers import max_combine, quantize_values, scale_from_amax
from lrq_ao.kernels._runtime import check_contiguous_last, check_device, launchable
from lrq_ao.primitives import FP8_DTYPE, qmax_of

QDTYPES = {"float8_e4m3fn": FP8_DTYPE, "int8": torch.int8}
GRANULARITIES = ("tensor", "row", "block")
# Widest float32 tile one program holds: 4096 values on 4 warps is 32 per thread. A 16384-wide tile (the first
# version) put a whole 12288-wide row in registers, 128 values per thread, which spills.
MAX_ROW_TILE = 4096


@triton.jit
def _quantize_groups_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP_K,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
    ROWS: tl.constexpr,
    TILE_K: tl.constexpr,
    TWO_PASS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    group = tl.program_id(1)
    g0 = group * GROUP_K
    row_mask = rows < M
    if TWO_PASS:
        amax = tl.zeros((ROWS, TILE_K), dtype=tl.float32)
        for k0 in range(g0, g0 + GROUP_K, TILE_K):
            cols = k0 + tl.arange(0, TILE_K)
            mask = row_mask[:, None] & (cols < g0 + GROUP_K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = scale_from_amax(tl.reduce(amax, 1, max_combine), QMAX)
        for k0 in range(g0, g0 + GROUP_K, TILE_K):
            cols = k0 + tl.arange(0, TILE_K)
            mask = row_mask[:, None] & (cols < g0 + GROUP_K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
            q = quantize_values(x.to(tl.float32), scale[:, None], QMAX, IS_FP8)
            tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    else:
        cols = g0 + tl.arange(0, TILE_K)
        mask = row_mask[:, None] & (cols < g0 + GROUP_K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = scale_from_amax(tl.reduce(tl.abs(x), 1, max_combine), QMAX)
        q = quantize_values(x, scale[:, None], QMAX, IS_FP8)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows * stride_sm + group, scale, mask=row_mask)


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0)
    tl.atomic_max(amax_ptr, tl.reduce(tl.abs(x.to(tl.float32)), 0, max_combine))


@triton.jit
def _quantize_tensorwise_kernel(
    x_ptr, q_ptr, amax_ptr, s_ptr, numel, QMAX: tl.constexpr, IS_FP8: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    scale = scale_from_amax(tl.load(amax_ptr), QMAX)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(q_ptr + offs, quantize_values(x.to(tl.float32), scale, QMAX, IS_FP8), mask=mask)
    if pid == 0:
        tl.store(s_ptr, scale)


def _row_launch_shape(m: int, group_k: int) -> tuple[int, int, bool, int]:
    """(ROWS, TILE_K, TWO_PASS, num_warps): at most ``MAX_ROW_TILE`` elements per program keeps registers in check
    for any K.

    Groups are the grid's second axis, so 1 x 128 groups at M = 16, K = 12288 are 96 programs, not one program
    walking 96 groups in turn (the first version's shape). Two-pass rows take 8 warps: at M = 4608, K = 12288 on the
    H200 that is 69 us against 74 us with 4 (``benchmarks/dev_act_quant.py``; wider tiles were slower, 116-137 us).
    """
    tile_k = min(triton.next_power_of_2(group_k), MAX_ROW_TILE)
    rows = max(1, min(MAX_ROW_TILE // tile_k, triton.next_power_of_2(m)))
    two_pass = tile_k < group_k
    return rows, tile_k, two_pass, 8 if two_pass else 4


def quantize_activation_triton(
    x: torch.Tensor, qdtype: torch.dtype, granularity: str, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D activation ``(M, K)``; returns ``(xq, scale)`` as ``quantize_activation`` does.

    Raises ``ValueError`` for a non-2-D input, a granularity outside ``GRANULARITIES`` or a block that does not
    divide K.
    """
    name = "lrq_ao::quantize_activation"
    check_contiguous_last(name, "x", x)
    device = check_device(name, x)
    if granularity not in GRANULARITIES:
        raise ValueError(f"{name}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    m, k = x.shape
    qmax = qmax_of(qdtype)
    is_fp8 = qdtype.is_floating_point  # the codes' dtype, passed as data
    xq = torch.empty((m, k), dtype=qdtype, device=device)
    if granularity == "tensor":
        x = x.contiguous()
        amax = torch.zeros((1,), dtype=torch.float32, device=device)
        scale = torch.empty((1, 1), dtype=torch.float32, device=device)
        numel, tile = x.numel(), 4096
        grid = (max(1, triton.cdiv(numel, tile)),)
        launchable(_amax_kernel, device)[grid](x, amax, numel, BLOCK=tile)
        launchable(_quantize_tensorwise_kernel, device)[grid](
            x, xq, amax, scale, numel, QMAX=qmax, IS_FP8=is_fp8, BLOCK=tile
        )
        return xq, scale
    group_k = k if granularity == "row" else block
    if k % group_k:
        raise ValueError(f"{name}: activation block {block} does not divide K={k}")
    scale = torch.empty((m, k // group_k), dtype=torch.float32, device=device)
    if m == 0:
        return xq, scale
    rows, tile_k, two_pass, warps = _row_launch_shape(m, group_k)
    launchable(_quantize_groups_kernel, device)[(triton.cdiv(m, rows), k // group_k)](
        x,
        xq,
        scale,
        m,
        x.stride(0),
        xq.stride(0),
        scale.stride(0),
        group_k,
        QMAX=qmax,
        IS_FP8=is_fp8,
        ROWS=rows,
        TILE_K=tile_k,
        TWO_PASS=two_pass,
        num_warps=warps,
    )
    return xq, scale


def scale_shape(m: int, k: int, granularity: str, block: int) -> tuple[int, int]:
    if granularity == "tensor":
        return (1, 1)
    if granularity == "row":
        return (m, 1)
    return (m, k // block)


@torch.library.custom_op("lrq_ao::quantize_activation", mutates_args=())
def quantize_activation_op(
    x: torch.Tensor, qdtype_name: str, granularity: str, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton dynamic activation quantization; see the module docstring."""
    return quantize_activation_triton(x, qdtype_from_name(qdtype_name), granularity, block)


@quantize_activation_op.register_fake
def _(x: torch.Tensor, qdtype_name: str, granularity: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    xq = x.new_empty((m, k), dtype=qdtype_from_name(qdtype_name))
    return xq, x.new_empty(scale_shape(m, k, granularity, block), dtype=torch.float32)


def qdtype_from_name(name: str) -> torch.dtype:
    if name not in QDTYPES:
        raise ValueError(f"lrq_ao kernels: qdtype_name must be one of {sorted(QDTYPES)}, got {name!r}")
    return QDTYPES[name]


def qdtype_name(qdtype: torch.dtype) -> str:
    for name, dtype in QDTYPES.items():
        if dtype == qdtype:
            return name
    raise ValueError(f"lrq_ao kernels: unsupported quantized dtype {qdtype}; expected float8_e4m3fn or int8")
