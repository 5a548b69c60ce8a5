"""``Float8Tensor``: an FP8 e4m3fn weight with per-tensor, per-row or 2-D block scales.

Inner tensors ``qdata`` (float8_e4m3fn, ``(N, K)``) and ``scale`` (float32 grid ``(N // bn, K // bk)``);
attributes ``block_size``, ``dtype``, ``act``, ``kernel`` (see ``lrq_ao.layouts.base``). Values are
``clamp(w / scale, ±448)`` cast with round-to-nearest-even, ``scale = max(amax / 448, 1e-8)`` per block.
"""

from __future__ import annotations

import torch

from lrq_ao.layouts.base import QuantizedWeightTensor, register_layout
from lrq_ao.primitives import FP8_DTYPE


@register_layout
class Float8Tensor(QuantizedWeightTensor):
    """FP8 e4m3fn weight; granularity is the ``block_size`` attribute, not a separate class."""

    qdtype = FP8_DTYPE


torch.serialization.add_safe_globals([Float8Tensor])
