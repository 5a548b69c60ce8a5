"""Pieces shared by the GEMM kernel families: tile scheduling and autotune configurations.

Autotune keys always contain ``M_BUCKET = ceil(log2(M))`` (see ``_runtime.m_bucket``) rather than ``M`` itself, so
a new batch size reuses the configuration of its power-of-two bucket. On CPU (the interpreter) a single small
configuration is used instead of autotuning.
"""

from __future__ import annotations

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


def config(block_m: int, block_n: int, block_k: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


# Int8 / FP8 operands: tensor-core tiles for large M, thin tiles for small M.
W8A8_CONFIGS = [
    config(128, 256, 128, 8, 3),
    config(128, 128, 128, 8, 4),
    config(128, 128, 64, 4, 4),
    config(64, 128, 128, 4, 4),
    config(64, 64, 128, 4, 4),
    config(16, 64, 256, 4, 4),
    config(32, 128, 128, 4, 4),
]

CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def autotune_bench(fn, quantiles=None, **_):
    """Shorter timing than Triton's default (25 ms warm-up, 100 ms): tuning a new (N, K, M bucket) stays ~1 s."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def grid_1d(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
