"""The one gradient loop for every relaxation, objective, optimizer and format.

The variable lives in *grid units* (the quantized value before the scale), so for every format the gradient
reaching it is ``∂L/∂Q = ∂L/∂W_dq · scale`` by the chain rule through ``W_dq = Q · scale``. Relaxations:

* ``continuous`` — the reference tool's method: optimize a free offset on top of round-to-nearest, keep the best
  continuous iterate, then re-round it to the nearest grid value. The loss it minimizes is never the loss of
  what is stored.
* ``ste`` — straight-through: the forward pass uses the nearest grid value of the latent, the backward pass is the
  identity; the loss is the loss of a representable weight at every step.
* ``sigmoid`` — AdaRound (Nagel et al., 2020): each element interpolates between its two grid neighbours with a
  rectified sigmoid, and a regularizer with an annealed exponent drives every choice to 0 or 1.

Every ``check_every`` steps (and only then: no host sync per step) the loop evaluates the *hard* (representable)
decision, keeps the best one seen, applies the plateau schedule and stops after ``patience`` checks without
improvement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lrq_ao.rounding.grid import Grid
from lrq_ao.rounding.objectives import Objective
from lrq_ao.rounding.optimizers import make_optimizer, make_step_schedule, scale_lr

RELAXATIONS = ("continuous", "ste", "sigmoid")

# AdaRound's stretch of the sigmoid and its regularizer's schedule.
_ZETA, _GAMMA = 1.1, -0.1
_BETA_START, _BETA_END, _WARMUP = 20.0, 2.0, 0.2


@dataclass(frozen=True)
class LoopSettings:
    relaxation: str
    optimizer: str
    lr: float
    lr_schedule: str
    num_iter: int
    check_every: int
    patience: int
    reg_weight: float = 0.01
    plateau_factor: float = 0.5


def default_lr(relaxation: str, optimizer: str) -> float:
    """Learning rates (grid units) that worked on MiniLM weights; see DEVELOPMENT.md "Learned rounding"."""
    if optimizer == "prodigy":
        return 1.0  # Prodigy estimates its own step size; lr is a multiplier, as in the reference tool
    if relaxation == "sigmoid":
        return 0.05 if optimizer != "original" else 0.5
    return 0.05 if optimizer != "original" else 0.1


class _Relaxation:
    """A differentiable map from the parameter to grid-unit values, and its hard decision."""

    def __init__(self, kind: str, idx0: torch.Tensor, x: torch.Tensor, grid: Grid) -> None:
        self.kind, self.grid = kind, grid
        v0 = grid.values[idx0]
        if kind == "continuous":
            self.base = v0
            self.param = torch.zeros_like(v0, requires_grad=True)
        elif kind == "ste":
            self.param = v0.clone().requires_grad_(True)
        elif kind == "sigmoid":
            self.lo = grid.floor_index(x)
            self.hi = (self.lo + 1).clamp(max=grid.last)
            v_lo, v_hi = grid.values[self.lo], grid.values[self.hi]
            self.v_lo, self.gap = v_lo, v_hi - v_lo
            frac = torch.where(self.gap > 0, (x - v_lo) / self.gap.clamp_min(1e-30), torch.zeros_like(x))
            frac = frac.clamp(0.01, 0.99)
            self.param = (-torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1)).requires_grad_(True)
        else:
            raise ValueError(f"unknown relaxation {kind!r}; expected one of {RELAXATIONS}")

    def soft_h(self) -> torch.Tensor:
        return (torch.sigmoid(self.param) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)

    def values(self) -> torch.Tensor:
        if self.kind == "continuous":
            return self.base + self.param
        if self.kind == "ste":
            hard = self.grid.values[self.grid.nearest_index(self.param.detach())]
            return self.param + (hard - self.param).detach()
        return self.v_lo + self.soft_h() * self.gap

    @torch.no_grad()
    def hard_index(self) -> torch.Tensor:
        if self.kind == "sigmoid":
            return torch.where(self.param >= 0, self.hi, self.lo)  # h >= 0.5 exactly when the logit >= 0
        if self.kind == "continuous":
            return self.grid.nearest_index(self.base + self.param)
        return self.grid.nearest_index(self.param)

    def regularizer(self, step: int, num_iter: int) -> torch.Tensor | None:
        if self.kind != "sigmoid":
            return None
        t = step / max(num_iter, 1)
        if t < _WARMUP:
            return None
        beta = _BETA_END + 0.5 * (_BETA_START - _BETA_END) * (1 + math.cos(math.pi * (t - _WARMUP) / (1 - _WARMUP)))
        return (1 - (2 * self.soft_h() - 1).abs().pow(beta)).mean()


def optimize_rounding(
    idx0: torch.Tensor, w: torch.Tensor, scale_full: torch.Tensor, grid: Grid, obj: Objective, cfg: LoopSettings
) -> tuple[torch.Tensor, dict]:
    """Run the relaxation loop from grid indices ``idx0``; returns the best hard indices seen and loop facts."""
    w = w.float()
    x = w / scale_full
    relax = _Relaxation(cfg.relaxation, idx0, x, grid)
    opt = make_optimizer(cfg.optimizer, [relax.param], cfg.lr)
    sched = make_step_schedule(cfg.lr_schedule, opt, cfg.num_iter)

    with torch.no_grad():
        best_idx = idx0.clone()
        best_loss = obj.loss(grid.values[idx0] * scale_full - w)
        norm = best_loss.clamp_min(1e-30)  # makes the regularizer weight scale-free
        # The reference keeps its best *continuous* iterate; track that too for relaxation="continuous".
        best_soft_loss, best_param = torch.full_like(best_loss, math.inf), relax.param.detach().clone()

    stale, steps = 0, 0
    last_soft_loss = best_soft_loss.clone()
    for step in range(cfg.num_iter):
        opt.zero_grad(set_to_none=True)
        loss = obj.loss(relax.values() * scale_full - w)
        reg = relax.regularizer(step, cfg.num_iter)
        total = loss / norm if reg is None else loss / norm + cfg.reg_weight * reg
        total.backward()
        if cfg.relaxation == "continuous":
            with torch.no_grad():
                better = loss.detach() < best_soft_loss
                best_soft_loss = torch.where(better, loss.detach(), best_soft_loss)
                best_param = torch.where(better, relax.param.detach(), best_param)
        opt.step()
        if sched is not None:
            sched.step()
        steps = step + 1
        if steps % cfg.check_every == 0 or steps == cfg.num_iter:
            with torch.no_grad():
                if cfg.relaxation == "continuous":
                    # Faithful to the reference: progress is judged on the continuous loss.
                    improved = bool(best_soft_loss < last_soft_loss)  # the only host sync, once per check
                    last_soft_loss = best_soft_loss.clone()
                else:
                    hard = relax.hard_index()
                    hard_loss = obj.loss(grid.values[hard] * scale_full - w)
                    improved = bool(hard_loss < best_loss)  # the only host sync, once per check
                    if improved:
                        best_loss, best_idx = hard_loss, hard
                stale = 0 if improved else stale + 1
                if not improved and cfg.lr_schedule == "plateau":
                    scale_lr(opt, cfg.plateau_factor)
                # AdaRound must run its annealing to the end; the others stop when they stall.
                if stale >= cfg.patience and cfg.relaxation != "sigmoid":
                    break
    if cfg.relaxation == "continuous" and steps > 0:
        # The reference re-rounds its best continuous iterate, whatever that does to the stored loss.
        best_idx = grid.nearest_index(relax.base + best_param)
    return best_idx, {"steps": steps}
