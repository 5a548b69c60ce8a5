"""Optimizers and learning-rate schedules for the relaxation loop (``loop.py``).

* ``original``: the reference tool's update, a fixed-length step along the normalized gradient
  (``p ← p − lr · g / rms(g)``, so ``lr`` is in grid steps), with its plateau decay.
* ``adamw`` / ``radam``: ``torch.optim`` as is.
* ``prodigy``: ``prodigyplus.ProdigyPlusScheduleFree`` (package ``prodigy-plus-schedule-free``, extra
  ``lrq_ao[prodigy]``), used without its schedule-free averaging as the reference does.
"""

from __future__ import annotations

import math

import torch


class NormalizedStep(torch.optim.Optimizer):
    """``p ← p − lr · g / rms(g)``: a step of ``lr`` (root-mean-square over the tensor) along the gradient."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rms = p.grad.square().mean().sqrt().clamp_min(1e-30)
                p.add_(p.grad / rms, alpha=-group["lr"])
        return None


def prodigy_available() -> bool:
    try:
        import prodigyplus.prodigy_plus_schedulefree  # noqa: F401
    except ImportError:
        return False
    return True


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params``; raises ``ImportError`` saying what to install for ``prodigy``."""
    if name == "original":
        return NormalizedStep(params, lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr)
    if name == "prodigy":
        if not prodigy_available():
            raise ImportError(
                "optimizer='prodigy' needs the optional package prodigy-plus-schedule-free: "
                "pip install 'lrq_ao[prodigy]' (or choose optimizer='adamw')"
            )
        from prodigyplus.prodigy_plus_schedulefree import ProdigyPlusScheduleFree

        return ProdigyPlusScheduleFree(params, lr=lr, use_schedulefree=False)
    raise ValueError(f"unknown optimizer {name!r}; expected original, adamw, radam or prodigy")


def make_step_schedule(name: str, optimizer: torch.optim.Optimizer, num_iter: int):
    """Per-step schedule (``exponential``: down to 1% of ``lr`` at the end; ``cosine``: to 0), or None for
    ``none`` / ``plateau`` (plateau is applied at convergence checks by the loop)."""
    if name == "exponential":
        gamma = 0.01 ** (1.0 / max(num_iter, 1))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: gamma**i)
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * i / num_iter)))
    return None


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] *= factor
