"""Pieces shared by the GEMM kernel families: tile scheduling, operand loading, autotune configurations.

Autotune keys always contain ``M_BUCKET = ceil(log2(M))`` (see ``_runtime.m_bucket``) rather than ``M`` itself, so
a new batch size reuses the configuration of its power-of-two bucket. On CPU (the interpreter) a single small
configuration is used instead of autotuning.

The W8A8 kernels load their operand tiles either through TMA tensor descriptors (``a.load([m, k])``: the copy engine
fills shared memory, out-of-bounds rows read as zero) or through plain pointers; ``tma_operands`` decides per call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to a (pid_m, pid_n) tile, ``GROUP_M`` row tiles at a time for L2 reuse."""
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    return pid_m, pid_n


@triton.jit
def int32_to_float32_exact(x):
    """Exact float32 of an int32 with ``|x| <= 2**22``: one integer add and one float subtract.

    ``0x4B400000`` is the float32 ``1.5 * 2**23``, whose mantissa step is 1: adding ``x`` to its bit pattern gives
    the float ``1.5 * 2**23 + x``. A plain ``.to(tl.float32)`` is an I2F conversion, which Hopper issues at 1/8 of
    the float32 rate; in the block-scaled GEMM, converting every K step's int32 partial that way cost more than the
    tensor-core product itself.
    """
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


def config(
    block_m: int, block_n: int, block_k: int, warps: int, stages: int, group_m: int = 8, pre_hook=None
) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
        pre_hook=pre_hook,
    )


# TMA needs 16-byte aligned bases and row strides (``TensorDescriptor`` asserts it); Hopper or newer.
TMA_ALIGN = 16


def tma_operands(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the ``(M, K)`` and ``(N, K)`` 1-byte operands can be read through TMA descriptors on their device."""
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    return all(t.data_ptr() % TMA_ALIGN == 0 and t.stride(0) * t.element_size() % TMA_ALIGN == 0 for t in (a, b))


def w8a8_operands(a: torch.Tensor, b: torch.Tensor, tile: dict) -> tuple[tuple, bool]:
    """``((a, b), False)`` as pointers, or ``((a_desc, b_desc), True)``: TMA descriptors with ``tile``'s boxes.

    Under autotuning ``set_descriptor_boxes`` resets the boxes to each configuration's tile before it runs.
    """
    if not tma_operands(a, b):
        return (a, b), False
    from triton.tools.tensor_descriptor import TensorDescriptor

    box_a, box_b = [tile["BLOCK_M"], tile["BLOCK_K"]], [tile["BLOCK_N"], tile["BLOCK_K"]]
    return (TensorDescriptor.from_tensor(a, box_a), TensorDescriptor.from_tensor(b, box_b)), True


def set_descriptor_boxes(nargs: dict) -> None:
    """Autotune ``pre_hook``: give the operand descriptors the box of the configuration about to run."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    a, b = nargs["a_ptr"], nargs["b_ptr"]
    if isinstance(a, TensorDescriptor):
        a.block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        b.block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


# Int8 / FP8 operands (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): tensor-core tiles for large M, thin tiles for
# small M. ``prune_by_batch`` keeps the ones that suit the M bucket, so each bucket compiles and times only a few.
W8A8_CONFIGS = [
    config(bm, bn, bk, w, s, pre_hook=set_descriptor_boxes)
    for bm, bn, bk, w, s in [
        (128, 256, 128, 8, 3),
        (128, 256, 128, 8, 4),
        (256, 128, 128, 8, 3),
        (128, 128, 128, 8, 4),
        (128, 128, 128, 4, 4),
        (64, 256, 128, 4, 3),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
        (32, 128, 128, 4, 4),
        (16, 64, 256, 4, 4),
        (16, 128, 128, 4, 4),
    ]
]


def prune_by_batch(configs, named_args, big_m_rows: int = 128, **kwargs):
    """Tile heights that suit the batch: <= 64 rows up to M = 64, 64-128 up to 1024, >= ``big_m_rows`` beyond."""
    bucket = named_args["M_BUCKET"]
    if bucket <= 6:
        low, high = 16, max(16, 2**bucket)
    elif bucket <= 10:
        low, high = 64, 128
    else:
        low, high = big_m_rows, 256
    kept = [c for c in configs if low <= c.kwargs["BLOCK_M"] <= high]
    return kept or configs


CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def autotune_bench(fn, quantiles=None, **_):
    """Shorter timing than Triton's default (25 ms warm-up, 100 ms): tuning a new (N, K, M bucket) stays ~1 s."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def grid_1d(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
