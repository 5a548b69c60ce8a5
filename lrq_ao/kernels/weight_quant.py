"""Weight quantization kernel: round-to-nearest FP8 e4m3fn / INT8 with per-tensor, per-row or block scales.

Bit-identical to ``lrq_ao.primitives.quantize_rtn``: per scale group ``scale = max(amax / qmax, 1e-8)`` in
float32, ``x = w / scale`` (IEEE division), INT8 ``clamp(round_half_even(x), +-127)``, FP8
``clamp(x, +-448)`` rounded to the e4m3fn grid (ties to even). The converter uses it for large weights on GPU.

One program owns one scale group ``(bn, bk)`` and walks it in ``(SUB_N, SUB_K)`` tiles twice: once for the
amax, once to quantize. A per-tensor weight gets its scale from a torch reduction first (one group would leave
the GPU idle) and the kernel then runs over row groups with that scale given.

Op: ``lrq_ao::quantize_weight(w, qdtype_name, bn, bk) -> (qdata, scale)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrq_ao.kernels._jit_helpers import max_combine, quantize_values, scale_from_amax
from lrq_ao.kernels._runtime import check_contiguous_last, check_device, launchable
from lrq_ao.primitives import FP8_DTYPE, MIN_SCALE, qmax_of

QDTYPES = {"float8_e4m3fn": FP8_DTYPE, "int8": torch.int8}


@triton.jit
def _quantize_weight_kernel(
    w_ptr,
    q_ptr,
    s_ptr,
    N,
    K,
    stride_wn,
    stride_qn,
    GROUP_N,
    GROUP_K,
    stride_sn,
    stride_sk,
    QMAX: tl.constexpr,
    IS_FP8: tl.constexpr,
    COMPUTE_SCALE: tl.constexpr,
    SUB_N: tl.constexpr,
    SUB_K: tl.constexpr,
):
    gn = tl.program_id(0)
    gk = tl.program_id(1)
    row0 = gn * GROUP_N
    col0 = gk * GROUP_K
    s_off = gn * stride_sn + gk * stride_sk
    if COMPUTE_SCALE:
        amax = tl.zeros((SUB_N, SUB_K), dtype=tl.float32)
        for dn in range(0, GROUP_N, SUB_N):
            for dk in range(0, GROUP_K, SUB_K):
                rows = row0 + dn + tl.arange(0, SUB_N)
                cols = col0 + dk + tl.arange(0, SUB_K)
                mask = ((dn + tl.arange(0, SUB_N)) < GROUP_N)[:, None] & ((dk + tl.arange(0, SUB_K)) < GROUP_K)[None, :]
                w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
                amax = tl.maximum(amax, tl.abs(w.to(tl.float32)))
        block_amax = tl.reduce(tl.reduce(amax, 1, max_combine), 0, max_combine)
        scale = scale_from_amax(block_amax, QMAX)
        tl.store(s_ptr + s_off, scale)
    else:
        scale = tl.load(s_ptr + s_off)
    for dn in range(0, GROUP_N, SUB_N):
        for dk in range(0, GROUP_K, SUB_K):
            rows = row0 + dn + tl.arange(0, SUB_N)
            cols = col0 + dk + tl.arange(0, SUB_K)
            mask = ((dn + tl.arange(0, SUB_N)) < GROUP_N)[:, None] & ((dk + tl.arange(0, SUB_K)) < GROUP_K)[None, :]
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0.0)
            q = quantize_values(w.to(tl.float32), scale, QMAX, IS_FP8)
            tl.store(q_ptr + rows[:, None] * stride_qn + cols[None, :], q, mask=mask)


def _sub_tile(group_n: int, group_k: int) -> tuple[int, int]:
    sub_k = min(triton.next_power_of_2(group_k), 1024)
    sub_n = max(1, min(triton.next_power_of_2(group_n), 4096 // sub_k))
    return sub_n, sub_k


def quantize_weight_triton(
    w: torch.Tensor, qdtype: torch.dtype, block_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight with the Triton kernel. Returns ``(qdata, scale)`` as ``primitives.quantize_rtn``.

    Raises ``ValueError`` for a non-2-D weight, a block size that does not tile it, or an unsupported dtype.
    NaN/Inf checking is the caller's job (``primitives.check_finite``), as in ``quantize_rtn``.
    """
    name = "lrq_ao::quantize_weight"
    check_contiguous_last(name, "weight", w)
    device = check_device(name, w)
    n, k = w.shape
    bn, bk = block_size
    if n % bn or k % bk:
        raise ValueError(f"{name}: block size {block_size} does not tile weight shape ({n}, {k})")
    qmax = qmax_of(qdtype)
    qdata = torch.empty((n, k), dtype=qdtype, device=device)
    compute_scale = (bn, bk) != (n, k) or n == 1
    if compute_scale:
        scale = torch.empty((n // bn, k // bk), dtype=torch.float32, device=device)
        groups, strides = (bn, bk), (scale.stride(0), scale.stride(1))
    else:
        scale = (w.abs().amax().float() / qmax).clamp_min(MIN_SCALE).reshape(1, 1)
        groups, strides = (1, k), (0, 0)
    sub_n, sub_k = _sub_tile(*groups)
    grid = (n // groups[0], k // groups[1])
    launchable(_quantize_weight_kernel, device)[grid](
        w,
        qdata,
        scale,
        n,
        k,
        w.stride(0),
        qdata.stride(0),
        groups[0],
        groups[1],
        strides[0],
        strides[1],
        QMAX=qmax,
        IS_FP8=qdtype == FP8_DTYPE,
        COMPUTE_SCALE=compute_scale,
        SUB_N=sub_n,
        SUB_K=sub_k,
    )
    return qdata, scale


@torch.library.custom_op("lrq_ao::quantize_weight", mutates_args=())
def quantize_weight_op(w: torch.Tensor, qdtype_name: str, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton round-to-nearest weight quantization; ``qdtype_name`` is ``float8_e4m3fn`` or ``int8``."""
    return quantize_weight_triton(w, _qdtype(qdtype_name), (bn, bk))


@quantize_weight_op.register_fake
def _(w: torch.Tensor, qdtype_name: str, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    qdata = w.new_empty((n, k), dtype=_qdtype(qdtype_name))
    return qdata, w.new_empty((n // bn, k // bk), dtype=torch.float32)


def _qdtype(name: str) -> torch.dtype:
    if name not in QDTYPES:
        raise ValueError(f"lrq_ao::quantize_weight: qdtype_name must be one of {sorted(QDTYPES)}, got {name!r}")
    return QDTYPES[name]
