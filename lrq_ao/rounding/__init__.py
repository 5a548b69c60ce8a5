"""Choosing the rounding of a weight: round-to-nearest or learned rounding under an objective.

``quantize_weight`` is the single entry point the API (``quantize_``) and the converter call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.primitives import quantize_rtn


@dataclass
class RoundedWeight:
    """A weight quantized with fixed scales: ``qdata`` (int8 or float8_e4m3fn, shape (N, K)), float32 ``scale``
    grid ``(N // bn, K // bk)``, the ``block_size`` (bn, bk), and a per-layer ``report`` dict."""

    qdata: torch.Tensor
    scale: torch.Tensor
    block_size: tuple[int, int]
    report: dict = field(default_factory=dict)


def quantize_weight(
    weight: torch.Tensor, config: LearnedRoundingConfig, *, name: str = "weight", stats=None
) -> RoundedWeight:
    """Quantize one 2-D weight as ``config`` says. ``stats`` are the layer's calibration statistics, if any.

    Raises ``ValueError`` naming ``name`` for NaN/Inf, a non-2-D weight, or a shape the block layout cannot tile.
    """
    qdata, scale, block_size = quantize_rtn(weight, config.spec, name)
    return RoundedWeight(qdata, scale, block_size, {"name": name, "objective": "rtn"})
