"""``Int8Tensor``: the tensor class of every format whose element is symmetric INT8 (``int8``, ``int8_tensor``,
``int8_block``, and any later format with that element).

Inner tensors and attributes as ``lrq_ao.layouts.base.QuantizedWeightTensor``: ``qdata`` (int8, ``(N, K)``, values in
[-127, 127]), ``scale`` (float32 grid), ``block_size``, ``dtype``, ``fmt``, ``act``, ``kernel``. The format owns the
arithmetic; for the 8-bit scaled formats values are ``clamp(round_half_even(w / scale), ±127)``,
``scale = max(amax / 127, 1e-8)`` per block.
"""

from __future__ import annotations

import torch

from lrq_ao.formats.elements import INT8
from lrq_ao.layouts.base import QuantizedWeightTensor, register_layout


@register_layout
class Int8Tensor(QuantizedWeightTensor):
    """Symmetric INT8 weight; granularity is the ``block_size`` attribute and the format ``fmt``, not a class."""

    element_name = INT8.name


torch.serialization.add_safe_globals([Int8Tensor])
