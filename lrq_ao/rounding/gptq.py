"""GPTQ-style rounding with error feedback, on the format's grid with the FIXED scales.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (2022):
quantize one input column at a time and spread its output error over the not-yet-quantized columns through the
Cholesky factor of ``H⁻¹`` (``H = E[x xᵀ]``, damped), optionally in "activation order" (largest ``H_jj`` first).
Unlike the paper we never recompute scales: column ``j`` is rounded to the nearest grid value of
``w_j / s_j`` with the stored scale column ``s_j``, so the result is representable with the scales that the
checkpoint will hold (per-tensor, per-row or block-wise alike).
"""

from __future__ import annotations

import torch

from lrq_ao.rounding.grid import Grid


def use_sweep_kernel(kernel: bool | None, device: torch.device) -> bool:
    """Whether the column sweeps run as Triton launches: asked for explicitly, or by default on CUDA (the PyTorch
    loop is launch-bound there: ~10 small kernels per column)."""
    return device.type == "cuda" if kernel is None else kernel


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹``, raising the damping until it factors."""
    k = h.shape[0]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal().mean().clamp_min(1e-12)
    for attempt in range(6):
        lam = damp * (10**attempt)
        chol, info = torch.linalg.cholesky_ex(h + lam * mean_diag * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the calibration second-moment matrix H is not positive definite even with heavy damping")


def gptq_indices(
    w: torch.Tensor,
    scale_full: torch.Tensor,
    grid: Grid,
    h: torch.Tensor,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block: int = 128,
    neighbours_only: bool = False,
    kernel: bool | None = None,
) -> torch.Tensor:
    """Grid indices (N, K) chosen by GPTQ error feedback. ``scale_full`` is the (N, K) expanded scale.

    With ``neighbours_only`` every element stays on one of the two grid values around its original ``w / s``
    (the error-fed value is clamped into that interval before rounding). ``kernel``: run each block of columns
    as one Triton launch (``lrq_ao.kernels.rounding_sweep``) instead of the PyTorch loop; ``None`` means on CUDA."""
    w = w.float().clone()
    s = scale_full.float()
    h = h.float().clone()
    k = w.shape[1]
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0  # an input that never fires carries no error: keep its column, feed nothing back
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=w.device)
    w, s, h = w[:, perm], s[:, perm], h[perm][:, perm]
    lo_all = grid.floor_index(w / s)
    hi_all = (lo_all + 1).clamp(max=grid.last)
    hinv = _inverse_cholesky_upper(h, damp)

    idx = torch.empty(w.shape, dtype=torch.long, device=w.device)
    if use_sweep_kernel(kernel, w.device):
        from lrq_ao.kernels.rounding_sweep import gptq_block

        w, s, hinv = w.contiguous(), s.contiguous(), hinv.contiguous()
        bounds = (lo_all.contiguous(), hi_all.contiguous()) if neighbours_only else None
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            err_blk = gptq_block(w, s, hinv, grid.values, idx, b0, b1, bounds)
            w[:, b1:] -= err_blk @ hinv[b0:b1, b1:]
        out = torch.empty_like(idx)
        out[:, perm] = idx
        return out
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w_blk = w[:, b0:b1].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = w_blk[:, i]
            x = col / s[:, b0 + i]
            if neighbours_only:
                x = x.clamp(grid.values[lo_all[:, b0 + i]], grid.values[hi_all[:, b0 + i]])
            q = grid.nearest_index(x)
            idx[:, b0 + i] = q
            err = (col - grid.values[q] * s[:, b0 + i]) / hinv_blk[i, i]
            w_blk[:, i:] -= err[:, None] * hinv_blk[i, i:][None, :]
            err_blk[:, i] = err
        w[:, b1:] -= err_blk @ hinv[b0:b1, b1:]
    out = torch.empty_like(idx)
    out[:, perm] = idx
    return out
