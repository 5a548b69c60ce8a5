"""``Int8Tensor``: a symmetric INT8 weight with per-tensor, per-row or 2-D block scales (default block 128).

Inner tensors ``qdata`` (int8, ``(N, K)``, values in [-127, 127]) and ``scale`` (float32 grid
``(N // bn, K // bk)``); attributes ``block_size``, ``dtype``, ``act``, ``kernel`` (see ``lrq_ao.layouts.base``).
Values are ``clamp(round_half_even(w / scale), ±127)``, ``scale = max(amax / 127, 1e-8)`` per block.
"""

from __future__ import annotations

import torch

from lrq_ao.layouts.base import QuantizedWeightTensor, register_layout


@register_layout
class Int8Tensor(QuantizedWeightTensor):
    """Symmetric INT8 weight; granularity is the ``block_size`` attribute, not a separate class."""

    qdtype = torch.int8


torch.serialization.add_safe_globals([Int8Tensor])
