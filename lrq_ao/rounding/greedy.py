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

import contextlib

import torch

from lrq_ao.rounding.gptq import use_sweep_kernel
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
    kernel: bool | None = None,
) -> torch.Tensor:
    """Coordinate-descent refinement of grid indices ``idx`` (N, K) under ``obj``; returns new indices.

    With ``neighbours_only`` every element stays within the two grid values around its original ``w / s``
    (``idx`` must start there). ``kernel``: sweep each block of columns in one Triton launch
    (``lrq_ao.kernels.rounding_sweep``; only for objectives with independent rows, ``P = I``); ``None`` means on
    CUDA when the objective allows it."""
    idx = idx.clone()
    w = w.float()
    s_full = scale_full.float()
    e = grid.values[idx] * s_full - w
    g = obj.grad_quad(e)
    m = obj.m
    k = w.shape[1]
    lo_all = grid.floor_index(w / s_full) if neighbours_only else None
    hi_all = (lo_all + 1).clamp(max=grid.last) if neighbours_only else None
    if obj.left is None and use_sweep_kernel(kernel, w.device):
        return _greedy_with_kernel(
            idx, g, s_full, m, grid, passes, block, (lo_all, hi_all) if neighbours_only else None
        )
    if kernel and obj.left is not None:
        raise ValueError(f"greedy_refine(kernel=True) needs an objective with independent rows, not {obj.name!r}")
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


def _greedy_with_kernel(idx, g, s_full, m, grid, passes, block, bounds):
    """``greedy_refine``'s loop with each block's column sweep in one launch; the update of the other columns is
    the same matrix product as in the PyTorch loop."""
    from lrq_ao.kernels.rounding_sweep import greedy_block

    idx, g, s_full, m = idx.contiguous(), g.contiguous(), s_full.contiguous(), m.contiguous()
    if bounds is not None:
        bounds = (bounds[0].contiguous(), bounds[1].contiguous())
    k = g.shape[1]
    for _ in range(passes):
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            delta = greedy_block(idx, g, s_full, m, grid.values, b0, b1, bounds)
            g_blk = g[:, b0:b1].clone()
            g += 2.0 * delta @ m[b0:b1, :]
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


STALL_TOLERANCE = 1e-4  # parallel_refine stops when a check window lowers the squared objective by less than this


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
    kernel: bool | None = None,
) -> torch.Tensor:
    """All elements move at once: each picks its best step under the separable model ``d·G + c·diag·d²`` and the
    whole move is kept only if the exact objective drops; ``c`` shrinks by 0.7 after a kept move and doubles after a
    rejected one (a backtracking majorization step: with many elements moving at once the true coupling is far
    larger than the diagonal, so ``c`` settles well above 1; factors of 2 find the narrow range of ``c`` where
    a few elements move, which a coarser factor jumps over on INT8 grids). Monotone, a few matrix products per
    iteration, and no host sync except every ``check_every`` iterations to stop early — the GPU-friendly
    alternative to ``greedy_refine``.

    ``idx``, ``w``, ``scale_full`` may carry a leading batch dimension (B same-shape layers, factors of ``obj``
    (B, N, k) / (B, K, k)): every layer keeps its own step scale ``c`` and accept test; the products become
    batched ones. On CUDA (or with ``kernel=True``) the proposal is one fused pass
    (``rounding_sweep.parallel_step``). With a factored objective (``‖Lᵀ E R‖``) the accept test and the gradient
    share ``Z = Lᵀ E R``, so the gradient ``2 L Z Rᵀ`` costs two thin products instead of ``E @ M`` with the
    K × K ``M``; on CUDA those two products run
    in TF32: the gradient only proposes moves, the accept test stays float32.
    """
    w = w.float()
    fused = use_sweep_kernel(kernel, w.device)
    factored = obj.right is not None and obj.linear is None
    if w.dim() == 3 and not factored:
        raise ValueError(f"parallel_refine on a batch of layers needs a factored objective (svd), not {obj.name!r}")
    e = grid.values[idx] * scale_full - w
    z = _projection(obj, e) if factored else None
    quad = _squared_norm(z) if factored else obj.loss(e).square()
    g = _grad_from_projection(obj, z) if factored else obj.grad_quad(e)
    p_diag = obj.p_diag if obj.p_diag is not None else torch.ones(w.shape[:-1], device=w.device)
    diag = None if fused else p_diag[..., :, None] * obj.m_diag[..., None, :]
    if fused:
        from lrq_ao.kernels.rounding_sweep import parallel_step

        idx, scale_full, p_diag = idx.to(torch.int32).contiguous(), scale_full.contiguous(), p_diag.contiguous()
        m_diag = obj.m_diag.contiguous()
    c = torch.full(w.shape[:-2], c0, device=w.device)  # one step scale per layer
    quad_at_check = quad
    for it in range(iterations):
        if fused:
            new_idx, e_new = parallel_step(idx, g, scale_full, e, p_diag, m_diag, c, grid.values)
        else:
            new_idx, d = _steps_all(idx, g, scale_full, c[..., None, None] * diag, grid)
            e_new = e + d
        z_new = _projection(obj, e_new) if factored else None
        quad_new = _squared_norm(z_new) if factored else obj.loss(e_new).square()
        accept = quad_new < quad
        keep = accept[..., None, None]
        idx = torch.where(keep, new_idx, idx)
        e = torch.where(keep, e_new, e)
        g_new = _grad_from_projection(obj, z_new) if factored else obj.grad_quad(e)
        g = torch.where(keep, g_new, g)
        quad = torch.where(accept, quad_new, quad)
        c = torch.where(accept, c * 0.7, c * 2.0).clamp(1e-3, 1e6)
        if (it + 1) % check_every == 0:
            # The only host sync, once per check: stop when no step is accepted any more (c saturates), or when
            # the last ``check_every`` iterations gained something but less than STALL_TOLERANCE of the squared
            # objective (a window that gained nothing is still searching for c); in a batch, every layer. Measured
            # on the GPU: FP8 weights reach their final objective to 4 digits within 10-20 iterations, then creep.
            stalled = (quad < quad_at_check) & (quad >= quad_at_check * (1.0 - STALL_TOLERANCE))
            if bool(((c >= 1e6) | stalled).all()):
                break
            quad_at_check = quad
    return idx.long()


def _squared_norm(z: torch.Tensor) -> torch.Tensor:
    """``‖Z‖²`` per layer (0-d for one layer, (B,) for a batch)."""
    return z.square().sum(dim=(-2, -1))


def _projection(obj: Objective, e: torch.Tensor) -> torch.Tensor:
    """``Z = Lᵀ E R`` (``E R`` without a left factor): ``loss(E) = ‖Z‖`` for a factored objective."""
    pe = e if obj.left is None else obj.left.mT @ e
    return pe @ obj.right


def _grad_from_projection(obj: Objective, z: torch.Tensor) -> torch.Tensor:
    """``2 L Z Rᵀ`` = ``grad_quad(E)`` for a factored objective, in TF32 on CUDA (it only proposes moves)."""
    with _tf32(z.is_cuda):
        zr = z @ obj.right.mT
        return 2.0 * (zr if obj.left is None else obj.left @ zr)


@contextlib.contextmanager
def _tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = saved or enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
