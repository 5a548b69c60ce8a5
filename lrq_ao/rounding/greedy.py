"""Greedy coordinate rounding: move elements one grid step up or down while that lowers the objective exactly.

For a quadratic objective ``quad(E) = tr(Eᵀ P E M)`` (see ``objectives.py``) changing ``E[r, j]`` by ``d`` changes
``quad`` by ``d·G[r, j] + d²·P[r, r]·M[j, j]`` where ``G = 2 P E M``. A sweep visits the input columns in order;
for column ``j`` every row picks the best of {stay, one step down, one step up} on the grid. When ``P`` is the
identity (the ``output`` / ``act_svd`` objectives) rows are independent, so the column update is exact and the
objective never increases. When ``P`` couples rows (the ``svd`` objective) the column's total change
``dᵀg + M[j, j]·‖Lᵀ d‖²`` is computed exactly; if it is not negative the column uses the choice made with the
bound ``P ≼ I``, which cannot increase the objective either.

Column updates are applied lazily, as in GPTQ: inside a block of columns ``G`` is updated column by column for the
block only; the rest of ``G`` gets one matrix product per block.
"""

from __future__ import annotations

import torch

from lrq_ao.rounding.grid import Grid
from lrq_ao.rounding.objectives import Objective


def _best_step(
    idx_col: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    curv: torch.Tensor,
    grid: Grid,
    bounds: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For one column: the new grid index of every row and the change ``d`` of its dequantized value."""
    cur = grid.values[idx_col]
    best_idx, best_d = idx_col, torch.zeros_like(cur)
    best_gain = torch.zeros_like(cur)
    lo, hi = (0, grid.last) if bounds is None else bounds
    for step in (-1, 1):
        cand = torch.clamp(idx_col + step, lo, hi)
        d = (grid.values[cand] - cur) * s
        gain = d * g + d * d * curv  # change in quad; negative is better
        better = gain < best_gain
        best_idx = torch.where(better, cand, best_idx)
        best_d = torch.where(better, d, best_d)
        best_gain = torch.where(better, gain, best_gain)
    return best_idx, best_d


def greedy_refine(
    idx: torch.Tensor,
    w: torch.Tensor,
    scale_full: torch.Tensor,
    grid: Grid,
    obj: Objective,
    *,
    passes: int = 2,
    block: int = 128,
    neighbours_only: bool = False,
) -> torch.Tensor:
    """Coordinate-descent refinement of grid indices ``idx`` (N, K) under ``obj``; returns new indices.

    With ``neighbours_only`` every element stays within the two grid values around its original ``w / s``
    (``idx`` must start there)."""
    idx = idx.clone()
    w = w.float()
    s_full = scale_full.float()
    e = grid.values[idx] * s_full - w
    g = obj.grad_quad(e)
    m = obj.m
    k = w.shape[1]
    lo_all = grid.floor_index(w / s_full) if neighbours_only else None
    hi_all = (lo_all + 1).clamp(max=grid.last) if neighbours_only else None
    p_diag = obj.p_diag if obj.p_diag is not None else torch.ones(w.shape[0], device=w.device)
    for _ in range(passes):
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            delta = torch.zeros(w.shape[0], b1 - b0, device=w.device)
            for j in range(b0, b1):
                bounds = (lo_all[:, j], hi_all[:, j]) if neighbours_only else None
                new_idx, d = _best_step(idx[:, j], g[:, j], s_full[:, j], p_diag * m[j, j], grid, bounds)
                if obj.left is not None:
                    # Rows are coupled through P. Keep the per-row choice if the column's exact change is
                    # negative; otherwise take the choice made with curvature M[j, j] (P's largest eigenvalue is
                    # 1, so dᵀPd <= ‖d‖² and that choice can only lower the objective).
                    total = (d * g[:, j]).sum() + m[j, j] * (obj.left.T @ d).square().sum()
                    safe_idx, safe_d = _best_step(idx[:, j], g[:, j], s_full[:, j], m[j, j].expand_as(d), grid, bounds)
                    ok = total < 0
                    new_idx, d = torch.where(ok, new_idx, safe_idx), torch.where(ok, d, safe_d)
                pd = obj.apply_p(d)
                idx[:, j] = new_idx
                delta[:, j - b0] = d
                g[:, b0:b1] += 2.0 * pd[:, None] * m[j, b0:b1][None, :]
            g_blk = g[:, b0:b1].clone()
            g += 2.0 * obj.apply_p(delta) @ m[b0:b1, :]
            g[:, b0:b1] = g_blk
    return idx


def _steps_all(idx, g, s_full, curv, grid):
    """Every element's best of {stay, one step down, one step up} under the separable model ``d·G + curv·d²``."""
    cur = grid.values[idx]
    best_idx, best_d, best_gain = idx, torch.zeros_like(cur), torch.zeros_like(cur)
    for step in (-1, 1):
        cand = (idx + step).clamp(0, grid.last)
        d = (grid.values[cand] - cur) * s_full
        gain = d * g + curv * d * d
        better = gain < best_gain
        best_idx = torch.where(better, cand, best_idx)
        best_d = torch.where(better, d, best_d)
        best_gain = torch.where(better, gain, best_gain)
    return best_idx, best_d


def parallel_refine(
    idx: torch.Tensor,
    w: torch.Tensor,
    scale_full: torch.Tensor,
    grid: Grid,
    obj: Objective,
    *,
    iterations: int = 40,
    check_every: int = 10,
    c0: float = 1.0,
) -> torch.Tensor:
    """All elements move at once: each picks its best step under the separable model ``d·G + c·diag·d²`` and the
    whole move is kept only if the exact objective drops; ``c`` shrinks by 0.7 after a kept move and doubles after a
    rejected one (a backtracking majorization step: with many elements moving at once the true coupling is far
    larger than the diagonal, so ``c`` settles well above 1; factors of 2 find the narrow range of ``c`` where
    a few elements move, which a coarser factor jumps over on INT8 grids). Monotone, a few matrix products per
    iteration, and no host sync except every ``check_every`` iterations to stop early — the GPU-friendly
    alternative to ``greedy_refine``.
    """
    w = w.float()
    e = grid.values[idx] * scale_full - w
    quad = obj.loss(e).square()
    g = obj.grad_quad(e)
    p_diag = obj.p_diag if obj.p_diag is not None else torch.ones(w.shape[0], device=w.device)
    diag = p_diag[:, None] * obj.m_diag[None, :]
    c = torch.full((), c0, device=w.device)
    for it in range(iterations):
        new_idx, d = _steps_all(idx, g, scale_full, c * diag, grid)
        e_new = e + d
        quad_new = obj.loss(e_new).square()
        accept = quad_new < quad
        idx = torch.where(accept, new_idx, idx)
        e = torch.where(accept, e_new, e)
        g = torch.where(accept, obj.grad_quad(e), g)
        quad = torch.where(accept, quad_new, quad)
        c = torch.where(accept, c * 0.7, c * 2.0).clamp(1e-3, 1e6)
        if (it + 1) % check_every == 0 and bool(c >= 1e6):
            break
    return idx
