"""Rounding objectives: quadratic forms of the weight error ``E = W_dq - W`` (shape (N, K), weight units).

Every objective here is ``loss(E) = ‖Lᵀ E R‖_F`` with an optional left factor ``L`` (N × a) and a right factor
``R`` (K × b). Reporting the norm (not its square) matches what the reference tool prints; minimizing either is
the same problem. Writing ``P = L Lᵀ`` (identity when ``L`` is None) and ``M = R Rᵀ``:

* ``quad(E) = tr(Eᵀ P E M)``, its gradient ``2 P E M``,
* changing one element ``E[r, j]`` by ``d`` changes ``quad`` by ``d·G[r, j] + d²·P[r, r]·M[j, j]``.

The last line is what makes greedy/coordinate rounding cheap and exact (see ``greedy.py``).

Objectives:
* ``svd`` (the reference tool's): ``L = U_k``, ``R = V_k`` from a truncated SVD of ``W`` itself.
* ``output``: the layer-output error on calibration inputs, ``E[‖E x‖²] = tr(E H Eᵀ)`` with ``H = E[x xᵀ]``;
  ``L = None``, ``M = H``.
* ``act_svd``: ``output`` restricted to the top-k eigen-directions of ``H`` (``M = V_k Λ_k V_kᵀ``); with full rank
  it *is* ``output``, with small k it protects only the dominant input directions.

``OBJECTIVE_KINDS`` (at the end) is the one table of objectives that every other module asks: whether one needs
calibration statistics, what ``init`` / ``relaxation`` ``auto`` mean for it, and how to build it for a layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lrq_ao.rounding.calibration import LinearStats


def svd_rank(n: int, k: int, top_p: float, min_k: int, max_k: int) -> int:
    """The reference tool's rank rule: ``clamp(floor(top_p · min(n, k)), min_k, max_k)``, at most ``min(n, k)``."""
    max_rank = min(n, k)
    return min(max_k, max(min_k, int(math.floor(top_p * max_rank))), max_rank)


@dataclass
class Objective:
    """``‖Lᵀ E R‖`` with ``P = L Lᵀ`` and ``M = R Rᵀ`` precomputed (see the module docstring)."""

    name: str
    right: torch.Tensor | None  # R (K × b), or None when only M is kept (``output``: M = H)
    left: torch.Tensor | None = None  # L (N × a) or None for the identity
    rank: int = 0
    m: torch.Tensor | None = None  # M = R Rᵀ (K × K); computed from R when not given (not for a batch)
    # Optional linear part (only with left=None): quad(E) − 2⟨E, B⟩ + c, for inputs that drifted (see output_objective).
    linear: torch.Tensor | None = None
    const: torch.Tensor | float = 0.0

    def __post_init__(self) -> None:
        if self.m is None and self.right.dim() == 2:
            self.m = self.right @ self.right.T
        # A batch of same-shape layers (factors with a leading batch dimension, only for parallel_refine) never
        # forms the (B, K, K) M: its diagonal is all the proposal needs.
        self.m_diag = self.m.diagonal().clone() if self.m is not None else (self.right * self.right).sum(dim=-1)
        self.p_diag = None if self.left is None else (self.left * self.left).sum(dim=-1)

    def loss(self, e: torch.Tensor) -> torch.Tensor:
        """``‖Lᵀ E R‖`` (differentiable; a 0-d tensor, no host sync)."""
        pe = e if self.left is None else self.left.T @ e
        if self.right is not None and self.linear is None:
            return torch.linalg.vector_norm(pe @ self.right)
        quad = ((pe @ self.m) * pe).sum()
        if self.linear is not None:
            quad = quad - 2 * (e * self.linear).sum() + self.const
        return quad.clamp_min(0).sqrt()

    def apply_p(self, d: torch.Tensor) -> torch.Tensor:
        """``P @ d`` for a column or matrix ``d`` with N rows."""
        return d if self.left is None else self.left @ (self.left.T @ d)

    def grad_quad(self, e: torch.Tensor) -> torch.Tensor:
        """Gradient of ``loss(E)²``: ``2 P E M`` (minus ``2 B`` with a linear part)."""
        g = 2.0 * self.apply_p(e @ self.m)
        return g if self.linear is None else g - 2.0 * self.linear


def truncated_svd(w: torch.Tensor, k: int, niter: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k left/right singular vectors of ``w`` (N, K), or of each of a batch (B, N, K): the reference's
    randomized subspace iteration (``q = k + 10`` columns, ``niter = 4`` power iterations, as its ``svd_lowrank``
    call), falling back to a full SVD when the rank is nearly full or the randomized basis is rank-deficient."""
    n, kk = w.shape[-2:]
    if k + 10 >= min(n, kk):
        return _exact_top(w, k)
    if n < kk:  # iterate on the tall orientation, as svd_lowrank does
        v, u, ok = _randomized_svd(w.float().mT, k, k + 10, niter)
    else:
        u, v, ok = _randomized_svd(w.float(), k, k + 10, niter)
    if ok.dim() == 0:
        return (u, v) if bool(ok) else _exact_top(w, k)  # the one host sync
    for i in (~ok).nonzero().flatten().tolist():
        u[i], v[i] = _exact_top(w[i], k)
    return u, v


def _exact_top(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u[..., :k].contiguous(), vh[..., :k, :].mT.contiguous()


def _randomized_svd(w: torch.Tensor, k: int, q: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko, Martinsson & Tropp (2011), Algorithm 4.4 (subspace iteration), then the small SVD of ``Qᵀ W``.

    What ``torch.svd_lowrank`` does, with two changes for the GPU, where its Householder QRs of the tall (·, q)
    bases and its SVD of the wide ``Qᵀ W`` took 60 % of a Flux layer's learned rounding (measured, H100): the bases
    are orthonormalized by CholeskyQR2 (two Gram matrices in float64: matrix products and a q × q Cholesky), and
    the small SVD comes from the q × q eigendecomposition of ``B Bᵀ`` in float64. Batched over leading dimensions.
    Returns ``(U_k, V_k, ok)``, ``ok`` a device bool per matrix, False when a Gram matrix was singular or ``σ_k``
    is noise (a weight of rank < k)."""
    infos = []

    def orthonormal(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        for _ in range(2):  # the second pass restores the orthogonality the first loses to rounding
            r, info = torch.linalg.cholesky_ex(x.mT @ x, upper=True)
            infos.append(info)
            x = torch.linalg.solve_triangular(r, x, upper=True, left=False)
        return x.float()

    probe = torch.randn(*w.shape[:-2], w.shape[-1], q, device=w.device, dtype=w.dtype)
    basis = orthonormal(w @ probe)
    for _ in range(niter):
        basis = orthonormal(w @ orthonormal(w.mT @ basis))
    b = (basis.mT @ w).double()  # (q, K): W ≈ Q B
    evals, evecs = torch.linalg.eigh(b @ b.mT)  # ascending; B = Ub Σ Vᵀ with Ub = evecs, Σ² = evals
    top = evecs[..., -k:].flip(-1)
    sigma = evals[..., -k:].flip(-1).clamp_min(0).sqrt()
    u = (basis.double() @ top).float().contiguous()
    v = ((b.mT @ top) / sigma.clamp_min(1e-300)[..., None, :]).float().contiguous()
    # Below ~1e-5·σ₁ a singular value is float32 noise and its V column (Bᵀu / σ) is not to be trusted.
    ok = (torch.stack(infos) == 0).all(dim=0) & (sigma[..., -1] > 1e-5 * sigma[..., 0])
    return u, v, ok


def svd_objective(w: torch.Tensor, top_p: float, min_k: int, max_k: int) -> Objective:
    k = svd_rank(*w.shape, top_p, min_k, max_k)
    u, v = truncated_svd(w, k)
    return Objective("svd", right=v, left=u, rank=k)


def output_objective(
    h: torch.Tensor,
    damp: float = 0.0,
    *,
    w: torch.Tensor | None = None,
    cross: torch.Tensor | None = None,
    drift_h: torch.Tensor | None = None,
) -> Objective:
    """``sqrt(tr(E (H + damp·mean(diag H)·I) Eᵀ))``: the RMS layer-output error on the calibration inputs, with an
    optional ridge that pulls towards plain weight error where the calibration data says little.

    With drift statistics (inputs ``x`` of the partially quantized model, ``d = x_ref − x``): the error against
    the *float* model's output, ``E‖(W + E) x − W x_ref‖² = tr(E H Eᵀ) − 2⟨E, W·E[d xᵀ]⟩ + tr(W E[d dᵀ] Wᵀ)``.
    """
    h = h.float()
    if damp > 0:
        h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], device=h.device)
    if cross is None:
        return Objective("output", right=None, rank=h.shape[0], m=h)
    w = w.float()
    linear = w @ cross.float()
    const = ((w @ drift_h.float()) * w).sum()
    return Objective("output", right=None, rank=h.shape[0], m=h, linear=linear, const=const)


def act_svd_objective(h: torch.Tensor, top_p: float, min_k: int, max_k: int) -> Objective:
    """The top-k eigen-directions of ``H`` weighted by ``sqrt(eigenvalue)``: the rank-k part of ``output``."""
    kk = h.shape[0]
    k = svd_rank(kk, kk, top_p, min_k, max_k)
    evals, evecs = torch.linalg.eigh(h.double())
    top = torch.argsort(evals, descending=True)[:k]
    r = (evecs[:, top] * evals[top].clamp_min(0).sqrt()).float()
    return Objective("act_svd", right=r, rank=k)


def _build_svd(w: torch.Tensor, h: torch.Tensor | None, stats: LinearStats | None, config: Any) -> Objective:
    return svd_objective(w, config.top_p, config.min_k, config.max_k)


def _build_output(w: torch.Tensor, h: torch.Tensor | None, stats: LinearStats | None, config: Any) -> Objective:
    if stats.cross is None or not config.compensate_drift:
        return output_objective(h, config.objective_damp)
    cross, drift_h = stats.cross.to(device=w.device), stats.drift_h.to(device=w.device)
    return output_objective(h, config.objective_damp, w=w, cross=cross, drift_h=drift_h)


def _build_act_svd(w: torch.Tensor, h: torch.Tensor | None, stats: LinearStats | None, config: Any) -> Objective:
    return act_svd_objective(h, config.top_p, config.min_k, config.max_k)


Builder = Callable[[torch.Tensor, torch.Tensor | None, LinearStats | None, Any], Objective]


@dataclass(frozen=True)
class ObjectiveKind:
    """One value of ``LearnedRoundingConfig.objective`` (besides ``auto``) and what it implies.

    ``needs_calibration``: built from the layer's calibration ``H``, so it cannot run without statistics.
    ``default_init`` / ``default_relaxation``: what ``init="auto"`` / ``relaxation="auto"`` resolve to (measured,
    DEVELOPMENT.md "Learned rounding": GPTQ then column-exact greedy on the calibration-aware objectives; the
    parallel backtracking step on the row-coupled svd objective). ``build(w, h, stats, config)`` returns the
    layer's ``Objective`` from the float32 weight, the shrunk and checked ``H`` (None when not
    ``needs_calibration``), the statistics and the config; None for ``rtn``, which rounds to nearest and learns
    nothing."""

    name: str
    needs_calibration: bool
    default_init: str
    default_relaxation: str
    build: Builder | None


OBJECTIVE_KINDS: dict[str, ObjectiveKind] = {
    kind.name: kind
    for kind in (
        ObjectiveKind("rtn", needs_calibration=False, default_init="rtn", default_relaxation="none", build=None),
        ObjectiveKind(
            "svd", needs_calibration=False, default_init="rtn", default_relaxation="parallel", build=_build_svd
        ),
        ObjectiveKind(
            "output", needs_calibration=True, default_init="gptq", default_relaxation="greedy", build=_build_output
        ),
        ObjectiveKind(
            "act_svd", needs_calibration=True, default_init="gptq", default_relaxation="greedy", build=_build_act_svd
        ),
    )
}


def needs_calibration(objective: str) -> bool:
    """Whether a ``LearnedRoundingConfig.objective`` value cannot run without calibration statistics (``auto``
    can: it means ``rtn`` then). Raises ``KeyError`` for an unknown name."""
    return objective != "auto" and OBJECTIVE_KINDS[objective].needs_calibration
