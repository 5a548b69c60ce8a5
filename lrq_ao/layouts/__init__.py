"""Quantized weight tensors (``Float8Tensor``, ``Int8Tensor``), their activation modes and linear backends.

Importing this package registers the classes and their attribute types with ``torch.serialization`` so that
``torch.load(..., weights_only=True)`` accepts checkpoints holding them.
"""

from __future__ import annotations

import torch

from lrq_ao.layouts.activation import (
    ActivationMode,
    KernelChoice,
    activation_mode_for,
    dequantize_activation,
    emulated_linear,
    quantize_activation,
)
from lrq_ao.layouts.base import LAYOUTS, QuantizedWeightTensor, register_layout
from lrq_ao.layouts.float8 import Float8Tensor
from lrq_ao.layouts.int8 import Int8Tensor
from lrq_ao.layouts.linear import (
    LinearBackend,
    register_linear_backend,
    registered_backends,
    select_linear_backend,
    unregister_linear_backend,
)

torch.serialization.add_safe_globals([ActivationMode, KernelChoice])


def make_weight_tensor(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int],
    dtype: torch.dtype,
    act: ActivationMode | None = None,
    kernel: KernelChoice | str | None = None,
    *,
    name: str = "weight",
) -> QuantizedWeightTensor:
    """Wrap quantized data in the tensor class registered for ``qdata.dtype`` (``LAYOUTS``).

    Raises ``TypeError`` naming ``name`` if no layout stores that element dtype.
    """
    cls = LAYOUTS.get(qdata.dtype)
    if cls is None:
        raise TypeError(
            f"{name}: no lrq_ao layout stores qdata of dtype {qdata.dtype}; known: {sorted(map(str, LAYOUTS))}"
        )
    return cls.from_qdata(qdata, scale, block_size, dtype, act=act, kernel=kernel, name=name)


__all__ = [
    "LAYOUTS",
    "ActivationMode",
    "Float8Tensor",
    "Int8Tensor",
    "KernelChoice",
    "LinearBackend",
    "QuantizedWeightTensor",
    "activation_mode_for",
    "dequantize_activation",
    "emulated_linear",
    "make_weight_tensor",
    "quantize_activation",
    "register_layout",
    "register_linear_backend",
    "registered_backends",
    "select_linear_backend",
    "unregister_linear_backend",
]
