"""One launch per block of columns for the column-sequential rounding sweeps: GPTQ and the exact greedy pass.

Both algorithms visit the input columns of a block (128 by default) one after another; the PyTorch versions in
``lrq_ao.rounding.gptq`` / ``greedy`` issue about ten small kernels per column, so on a GPU they are launch-bound
(4-24 s per Flux layer, measured). Given the column order the rows are independent, so here each program owns
``BLOCK_N`` rows and walks the block's columns itself, the block of ``W`` (GPTQ) or of the gradient ``G``
(greedy) held in registers; the update of the columns after the block stays one matrix product, in PyTorch.

Formulas (``v`` the sorted grid values, ``s`` the fixed scales, column ``i`` of the block):

* GPTQ (Frantar et al. 2022, with fixed scales): ``q = nearest(w_i / s_i)``, ``e = (w_i − v[q]·s_i) / U_ii``,
  ``w_j −= e·U_ij`` for ``j ≥ i`` (``U`` the upper Cholesky factor of ``H⁻¹``).
* greedy (``P = I``): each row takes the best of {stay, one grid step down, one up} under
  ``d·g_i + d²·M_ii``; then ``g_j += 2·d·M_ij`` for the block's columns.

The arithmetic is written in the same order as the PyTorch reference, so under Triton's interpreter (CPU tests)
the grid indices are bit-identical; on the GPU the compiler may fuse a multiply-add, which can flip a tie.
Nearest / floor grid indices use a binary search over ``v`` (``torch.searchsorted(right=True)`` semantics).
These are plain launchers, not ``torch.library`` ops: they run inside ``quantize_weight``, never under compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrq_ao.kernels._jit_helpers import add_combine
from lrq_ao.kernels._runtime import check_device, launchable

BLOCK_ROWS = 16  # rows per program: a 16 × 128 float32 tile is 16 registers per thread with 4 warps


@triton.jit
def _floor_index(x, values_ptr, NUM_VALUES, SEARCH_STEPS: tl.constexpr):
    """Index of the largest grid value ``<= x``, clamped to ``[0, NUM_VALUES − 1]`` (as ``Grid.floor_index``)."""
    lo = tl.zeros(x.shape, dtype=tl.int32)  # the count of values <= x lies in [lo, hi]
    hi = lo + NUM_VALUES
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(values_ptr + tl.minimum(mid, NUM_VALUES - 1))
        right = v <= x
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (v > x), mid, hi)
    return tl.minimum(tl.maximum(lo - 1, 0), NUM_VALUES - 1)


@triton.jit
def _nearest_index(x, values_ptr, NUM_VALUES, SEARCH_STEPS: tl.constexpr):
    """Index of the grid value nearest to ``x``, ties to the lower one (as ``Grid.nearest_index``)."""
    lo = _floor_index(x, values_ptr, NUM_VALUES, SEARCH_STEPS)
    hi = tl.minimum(lo + 1, NUM_VALUES - 1)
    v_lo = tl.load(values_ptr + lo)
    v_hi = tl.load(values_ptr + hi)
    take_hi = tl.abs(v_hi - x) < tl.abs(x - v_lo)
    return tl.where(take_hi, hi, lo)


@triton.jit
def _column_of(tile, cols, i):
    """Column ``i`` of a register tile (a masked sum: adding zeros is exact)."""
    return tl.reduce(tl.where((cols == i)[None, :], tile, 0.0), 1, add_combine)


@triton.jit
def _gptq_block_kernel(
    w_ptr,
    s_ptr,
    u_ptr,
    values_ptr,
    lo_ptr,
    hi_ptr,
    idx_ptr,
    err_ptr,
    N,
    b0,
    ncols,
    stride_w,
    stride_u,
    stride_err,
    NUM_VALUES,
    BOUNDED: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < ncols
    tile_mask = rmask[:, None] & cmask[None, :]
    w_tile = tl.load(w_ptr + rows[:, None] * stride_w + (b0 + cols)[None, :], mask=tile_mask, other=0.0)
    err_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for i in range(0, ncols):
        col_off = rows * stride_w + b0 + i
        col = _column_of(w_tile, cols, i)
        s = tl.load(s_ptr + col_off, mask=rmask, other=1.0)
        x = tl.div_rn(col, s)
        if BOUNDED:
            v_floor = tl.load(values_ptr + tl.load(lo_ptr + col_off, mask=rmask, other=0))
            v_ceil = tl.load(values_ptr + tl.load(hi_ptr + col_off, mask=rmask, other=0))
            x = tl.minimum(tl.maximum(x, v_floor), v_ceil)
        q = _nearest_index(x, values_ptr, NUM_VALUES, SEARCH_STEPS)
        tl.store(idx_ptr + col_off, q.to(tl.int64), mask=rmask)
        u_ii = tl.load(u_ptr + (b0 + i) * stride_u + b0 + i)
        err = tl.div_rn(col - tl.load(values_ptr + q) * s, u_ii)
        u_row = tl.load(u_ptr + (b0 + i) * stride_u + b0 + cols, mask=cmask & (cols >= i), other=0.0)
        w_tile = w_tile - err[:, None] * u_row[None, :]
        err_tile = tl.where((cols == i)[None, :], err[:, None], err_tile)
    tl.store(err_ptr + rows[:, None] * stride_err + cols[None, :], err_tile, mask=tile_mask)


@triton.jit
def _greedy_block_kernel(
    idx_ptr,
    g_ptr,
    s_ptr,
    m_ptr,
    values_ptr,
    lo_ptr,
    hi_ptr,
    delta_ptr,
    N,
    b0,
    ncols,
    stride_w,
    stride_m,
    stride_delta,
    NUM_VALUES,
    BOUNDED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < ncols
    tile_mask = rmask[:, None] & cmask[None, :]
    g_offs = rows[:, None] * stride_w + (b0 + cols)[None, :]
    g_tile = tl.load(g_ptr + g_offs, mask=tile_mask, other=0.0)
    delta_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for j in range(0, ncols):
        col_off = rows * stride_w + b0 + j
        g = _column_of(g_tile, cols, j)
        idx = tl.load(idx_ptr + col_off, mask=rmask, other=0)
        s = tl.load(s_ptr + col_off, mask=rmask, other=0.0)
        curv = tl.load(m_ptr + (b0 + j) * stride_m + b0 + j)
        if BOUNDED:
            lo = tl.load(lo_ptr + col_off, mask=rmask, other=0)
            hi = tl.load(hi_ptr + col_off, mask=rmask, other=0)
        else:
            lo = tl.zeros_like(idx)
            hi = lo + (NUM_VALUES - 1)
        cur = tl.load(values_ptr + idx, mask=rmask, other=0.0)
        best_idx = idx
        best_d = tl.zeros_like(cur)
        best_gain = tl.zeros_like(cur)
        for step in tl.static_range(2):
            cand = tl.minimum(tl.maximum(idx + (2 * step - 1), lo), hi)
            d = (tl.load(values_ptr + cand, mask=rmask, other=0.0) - cur) * s
            gain = d * g + d * d * curv
            better = gain < best_gain
            best_idx = tl.where(better, cand, best_idx)
            best_d = tl.where(better, d, best_d)
            best_gain = tl.where(better, gain, best_gain)
        tl.store(idx_ptr + col_off, best_idx, mask=rmask)
        delta_tile = tl.where((cols == j)[None, :], best_d[:, None], delta_tile)
        m_row = tl.load(m_ptr + (b0 + j) * stride_m + b0 + cols, mask=cmask, other=0.0)
        g_tile = g_tile + (2.0 * best_d)[:, None] * m_row[None, :]
    tl.store(g_ptr + g_offs, g_tile, mask=tile_mask)
    tl.store(delta_ptr + rows[:, None] * stride_delta + cols[None, :], delta_tile, mask=tile_mask)


def _search_steps(num_values: int) -> int:
    return int(num_values).bit_length()  # halvings that shrink [0, num_values] to one candidate


def _block_columns(name: str, b0: int, b1: int, k: int) -> tuple[int, int]:
    """(columns in ``[b0, b1)``, the power-of-two register tile that holds them)."""
    if not 0 <= b0 < b1 <= k:
        raise ValueError(f"{name}: column block [{b0}, {b1}) must be non-empty and lie in [0, {k})")
    return b1 - b0, triton.next_power_of_2(max(b1 - b0, 16))


def _bounds(bounds, like: torch.Tensor):
    if bounds is None:
        return like, like, False
    lo, hi = bounds
    return lo.contiguous(), hi.contiguous(), True


def gptq_block(
    w: torch.Tensor,
    s: torch.Tensor,
    u: torch.Tensor,
    values: torch.Tensor,
    idx: torch.Tensor,
    b0: int,
    b1: int,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Round columns ``[b0, b1)`` of ``w`` (N, K) with GPTQ error feedback inside the block; writes their grid
    indices into ``idx`` (N, K) int64 and returns the block's scaled errors (N, b1 − b0) for the trailing update
    ``w[:, b1:] −= err @ u[b0:b1, b1:]``. ``s`` (N, K) scales, ``u`` (K, K) upper Cholesky factor of ``H⁻¹``,
    ``values`` the sorted grid; ``bounds`` optional (lo, hi) index tensors (N, K) the value is clamped between.
    All contiguous float32 / int64 on one device."""
    name = "rounding_sweep.gptq_block"
    device = check_device(name, w, s, u, values, idx)
    n, k = w.shape
    ncols, block_k = _block_columns(name, b0, b1, k)
    err = torch.empty((n, ncols), dtype=torch.float32, device=device)
    lo, hi, bounded = _bounds(bounds, idx)
    launchable(_gptq_block_kernel, device)[(triton.cdiv(n, BLOCK_ROWS),)](
        w,
        s,
        u,
        values,
        lo,
        hi,
        idx,
        err,
        n,
        b0,
        ncols,
        w.stride(0),
        u.stride(0),
        err.stride(0),
        values.numel(),
        BOUNDED=bounded,
        SEARCH_STEPS=_search_steps(values.numel()),
        BLOCK_N=BLOCK_ROWS,
        BLOCK_K=block_k,
    )
    return err


def greedy_block(
    idx: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    m: torch.Tensor,
    values: torch.Tensor,
    b0: int,
    b1: int,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One greedy sweep over columns ``[b0, b1)`` for an objective with ``P = I``: updates ``idx`` (N, K) int64
    and the block's columns of the gradient ``g`` (N, K) in place, and returns the block's value changes
    ``delta`` (N, b1 − b0) for the update ``g += 2·delta @ m[b0:b1, :]`` of the other columns. ``m`` (K, K) is
    the objective's right matrix; the other arguments as in ``gptq_block``."""
    name = "rounding_sweep.greedy_block"
    device = check_device(name, idx, g, s, m, values)
    n, k = g.shape
    ncols, block_k = _block_columns(name, b0, b1, k)
    delta = torch.empty((n, ncols), dtype=torch.float32, device=device)
    lo, hi, bounded = _bounds(bounds, idx)
    launchable(_greedy_block_kernel, device)[(triton.cdiv(n, BLOCK_ROWS),)](
        idx,
        g,
        s,
        m,
        values,
        lo,
        hi,
        delta,
        n,
        b0,
        ncols,
        g.stride(0),
        m.stride(0),
        delta.stride(0),
        values.numel(),
        BOUNDED=bounded,
        BLOCK_N=BLOCK_ROWS,
        BLOCK_K=block_k,
    )
    return delta


@triton.jit
def _parallel_step_kernel(
    idx_ptr,
    g_ptr,
    s_ptr,
    e_ptr,
    p_diag_ptr,
    m_diag_ptr,
    c_ptr,
    values_ptr,
    new_idx_ptr,
    e_new_ptr,
    ROWS,
    ROWS_PER_LAYER,
    K,
    NUM_VALUES,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Rows of all layers are stacked: row r belongs to layer r // ROWS_PER_LAYER (its m_diag row and its c).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < ROWS
    mask = rmask[:, None] & (cols < K)[None, :]
    layer = rows // ROWS_PER_LAYER
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    p_diag = tl.load(p_diag_ptr + rows, mask=rmask, other=0.0)
    m_diag = tl.load(m_diag_ptr + layer[:, None] * K + cols[None, :], mask=mask, other=0.0)
    curv = tl.load(c_ptr + layer, mask=rmask, other=0.0)[:, None] * (p_diag[:, None] * m_diag)
    cur = tl.load(values_ptr + idx, mask=mask, other=0.0)
    best_idx = idx
    best_d = tl.zeros_like(cur)
    best_gain = tl.zeros_like(cur)
    for step in tl.static_range(2):
        cand = tl.minimum(tl.maximum(idx + (2 * step - 1), 0), NUM_VALUES - 1)
        d = (tl.load(values_ptr + cand, mask=mask, other=0.0) - cur) * s
        gain = d * g + curv * d * d
        better = gain < best_gain
        best_idx = tl.where(better, cand, best_idx)
        best_d = tl.where(better, d, best_d)
        best_gain = tl.where(better, gain, best_gain)
    tl.store(new_idx_ptr + offs, best_idx, mask=mask)
    tl.store(e_new_ptr + offs, tl.load(e_ptr + offs, mask=mask, other=0.0) + best_d, mask=mask)


def parallel_step(
    idx: torch.Tensor,
    g: torch.Tensor,
    s: torch.Tensor,
    e: torch.Tensor,
    p_diag: torch.Tensor,
    m_diag: torch.Tensor,
    c: torch.Tensor,
    values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal of ``parallel_refine`` in one pass over memory: every element's best of {stay, one grid step
    down, one up} under ``d·G + c·(p_r·m_j)·d²``. Returns ``(new_idx, e + d)``. ``idx`` ([B,] N, K) int32/int64,
    ``g``, ``s``, ``e`` ([B,] N, K) float32, ``p_diag`` ([B,] N), ``m_diag`` ([B,] K), ``c`` ([B]) float32 (read
    on the device: no host sync), all contiguous on one device; B same-shape layers share one launch."""
    device = check_device("rounding_sweep.parallel_step", idx, g, s, e, p_diag, m_diag, c, values)
    *_, n, k = idx.shape
    rows = idx.numel() // k
    new_idx = torch.empty_like(idx)
    e_new = torch.empty_like(e)
    block_n, block_k = 8, 256
    launchable(_parallel_step_kernel, device)[(triton.cdiv(rows, block_n), triton.cdiv(k, block_k))](
        idx,
        g,
        s,
        e,
        p_diag,
        m_diag,
        c,
        values,
        new_idx,
        e_new,
        rows,
        n,
        k,
        values.numel(),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return new_idx, e_new
