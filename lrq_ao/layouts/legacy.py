"""The old, dtype-keyed spellings of a weight's format, translated to a format object.

Before ``lrq_ao.formats`` a quantized weight was ``(qdata, scale, block_size)`` and its format was implied by
``qdata.dtype`` (FP8 e4m3fn or INT8) and the block size. ``make_weight_tensor``, ``Float8Tensor.from_qdata``,
``activation_mode_for(kind, dtype, ...)`` and checkpoints pickled before tensors carried ``fmt`` still speak that
way; :func:`legacy_format` names the 8-bit scaled format (``lrq_ao.formats.scaled``) they mean. The arithmetic of
that family reads the block size from the weight, not from the format, so any block size tiles correctly.
"""

from __future__ import annotations

import torch

from lrq_ao.formats.elements import element_for_dtype
from lrq_ao.formats.scaled import ScaledFormat


def legacy_format(qdtype: torch.dtype, block_size: tuple[int, int], shape) -> ScaledFormat:
    """The 8-bit scaled format of element ``qdtype`` whose group shape is ``block_size`` on a weight of ``shape``:
    per tensor ``(N, K)``, per row ``(1, K)``, otherwise block-wise with the block's K edge.

    Raises ``ValueError`` naming the known dtypes when no 8-bit element is stored as ``qdtype``.
    """
    element_for_dtype(qdtype)
    n, k = int(shape[0]), int(shape[1])
    bn, bk = int(block_size[0]), int(block_size[1])
    if (bn, bk) == (n, k):
        return ScaledFormat(qdtype, "tensor")
    if (bn, bk) == (1, k):
        return ScaledFormat(qdtype, "row")
    return ScaledFormat(qdtype, "block", bk)
