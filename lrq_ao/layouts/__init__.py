"""Quantized weight tensors, their activation modes and linear backends.

``weight_tensor(fmt, qw, dtype)`` wraps a ``lrq_ao.formats.QuantizedWeight`` of any format in its tensor class
(``Float8Tensor``, ``Int8Tensor``, or the generic ``QuantizedWeightTensor`` for every other element);
``make_weight_tensor(qdata, scale, block_size, dtype)`` is the older spelling for 8-bit codes. Importing this
package registers the op handlers on the tensor class (``ops``, ``linear``) and the classes, attribute types and
format classes with ``torch.serialization`` so that ``torch.load(..., weights_only=True)`` accepts checkpoints
holding them.

Modules, bottom to top (no module imports one above it): ``legacy`` (old dtype-keyed spellings -> formats),
``activation`` (modes, reference activation quantization), ``registry`` (linear backends and their selection),
``base`` (the tensor class), ``ops`` (view / copy / device handlers), ``linear`` (built-in backends, matmul
handlers), ``float8`` / ``int8`` (named classes), ``triton_backends`` and ``packed_backends`` (loaded lazily by
the registry).
"""

from __future__ import annotations

import torch

import lrq_ao.layouts.linear  # noqa: F401  (registers the linear handlers and the built-in backends)
import lrq_ao.layouts.ops  # noqa: F401  (registers the view / copy / device handlers)
from lrq_ao.formats import FORMATS, QuantizedWeight, WeightFormat
from lrq_ao.formats.elements import ELEMENTS, element_for_dtype
from lrq_ao.layouts.activation import (
    ActivationMode,
    KernelChoice,
    activation_mode_for,
    dequantize_activation,
    emulated_linear,
    quantize_activation,
    reference_linear,
)
from lrq_ao.layouts.base import LAYOUTS, QuantizedWeightTensor, register_layout, tensor_class_for, weight_tensor
from lrq_ao.layouts.float8 import Float8Tensor
from lrq_ao.layouts.int8 import Int8Tensor
from lrq_ao.layouts.legacy import legacy_format
from lrq_ao.layouts.registry import (
    LinearBackend,
    register_linear_backend,
    registered_backends,
    select_linear_backend,
    unregister_linear_backend,
)


def register_safe_globals(*types: type) -> None:
    """Let ``torch.load(..., weights_only=True)`` rebuild ``types`` (format classes and the like held by tensors)."""
    torch.serialization.add_safe_globals(list(types))


register_safe_globals(ActivationMode, KernelChoice, QuantizedWeightTensor, QuantizedWeight)
register_safe_globals(*{type(fmt) for fmt in FORMATS.values()})


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
    """Wrap 8-bit codes in the 8-bit scaled format their dtype and block size mean (``lrq_ao.layouts.legacy``).

    Raises ``TypeError`` naming ``name`` if no 8-bit element is stored as ``qdata.dtype``; use ``weight_tensor``
    for any other format.
    """
    try:
        element_for_dtype(qdata.dtype)
    except ValueError:
        known = sorted(str(ELEMENTS[element_name].storage_dtype) for element_name in LAYOUTS)
        raise TypeError(
            f"{name}: no lrq_ao layout stores qdata of dtype {qdata.dtype}; known: {known} (for any other format "
            f"use weight_tensor(fmt, qw, dtype))"
        ) from None
    fmt = legacy_format(qdata.dtype, block_size, qdata.shape)
    return weight_tensor(
        fmt, QuantizedWeight(qdata, scale, tuple(block_size)), dtype, act=act, kernel=kernel, name=name
    )


__all__ = [
    "LAYOUTS",
    "ActivationMode",
    "Float8Tensor",
    "Int8Tensor",
    "KernelChoice",
    "LinearBackend",
    "QuantizedWeightTensor",
    "WeightFormat",
    "activation_mode_for",
    "dequantize_activation",
    "emulated_linear",
    "make_weight_tensor",
    "quantize_activation",
    "reference_linear",
    "register_layout",
    "register_linear_backend",
    "register_safe_globals",
    "registered_backends",
    "select_linear_backend",
    "tensor_class_for",
    "unregister_linear_backend",
    "weight_tensor",
]
