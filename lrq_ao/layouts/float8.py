"""``Float8Tensor``: the tensor class of every format whose element is FP8 e4m3fn (``fp8``, ``fp8_row``,
``fp8_block``, and any later format with that element).

Inner tensors and attributes as ``lrq_ao.layouts.base.QuantizedWeightTensor``: ``qdata`` (float8_e4m3fn, ``(N, K)``),
``scale`` (float32 grid), ``block_size``, ``dtype``, ``fmt``, ``act``, ``kernel``. The format owns the arithmetic;
for the 8-bit scaled formats values are ``clamp(w / scale, ±448)`` cast with round-to-nearest-even,
``scale = max(amax / 448, 1e-8)`` per block.
"""

from __future__ import annotations

import torch

from lrq_ao.formats.elements import FP8_E4M3
from lrq_ao.layouts.base import QuantizedWeightTensor, register_layout


@register_layout
class Float8Tensor(QuantizedWeightTensor):
    """FP8 e4m3fn weight; granularity is the ``block_size`` attribute and the format ``fmt``, not a class."""

    element_name = FP8_E4M3.name


torch.serialization.add_safe_globals([Float8Tensor])
