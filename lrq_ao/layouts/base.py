"""The common base of lrq_ao's quantized weight tensors.

A quantized weight is a ``__torch_dispatch__`` wrapper subclass (built on torchao's ``TorchAOBaseTensor``) that
holds two plain tensors and four attributes:

Inner tensors:
  qdata: ``(N, K)`` quantized values (``torch.int8`` or ``torch.float8_e4m3fn``).
  scale: float32 grid ``(N // bn, K // bk)``: ``dequantized = qdata.float() * scale`` broadcast per block.
Attributes:
  block_size: ``(bn, bk)``; per-tensor ``(N, K)``, per-row ``(1, K)``, block-wise ``(b, b)``.
  dtype: the high-precision dtype the tensor reports and ``dequantize()`` returns.
  act: an ``ActivationMode`` (weight-only or dynamic activation quantization).
  kernel: a ``KernelChoice`` restricting which linear backends may run it.

One subclass exists per element type (``Float8Tensor``, ``Int8Tensor``); ``make_weight_tensor`` picks it from
``qdata.dtype`` through ``LAYOUTS`` (adding a format = one file + one ``register_layout`` call). The common op
handlers are registered on this base in ``lrq_ao.layouts.ops`` and ``lrq_ao.layouts.linear`` *before* the
subclasses are defined, because torchao copies a parent's op table into a subclass when the subclass is created.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_flatten
from torchao.utils import TorchAOBaseTensor

from lrq_ao.layouts.activation import WEIGHT_ONLY, ActivationMode, KernelChoice
from lrq_ao.primitives import (
    FormatSpec,
    check_2d,
    check_finite,
    compute_scale,
    quantize_rtn,
    quantize_with_scale,
)

HIGH_PRECISION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# element dtype -> tensor class; filled by ``register_layout``.
LAYOUTS: dict[torch.dtype, type[QuantizedWeightTensor]] = {}


def register_layout(cls: type[QuantizedWeightTensor]) -> type[QuantizedWeightTensor]:
    """Make ``make_weight_tensor`` build ``cls`` for ``qdata`` of dtype ``cls.qdtype``."""
    LAYOUTS[cls.qdtype] = cls
    return cls


def check_high_precision_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in HIGH_PRECISION_DTYPES:
        raise TypeError(
            f"{what}: the dtype of a quantized weight is the dtype it dequantizes to and must be one of "
            f"{HIGH_PRECISION_DTYPES}, got {dtype}; use .qdata to reach the quantized values"
        )


def layout_name(shape: tuple[int, int] | torch.Size, block_size: tuple[int, int]) -> str:
    """Human-readable granularity: ``per-tensor``, ``per-row`` or ``block bn x bk``."""
    n, k = int(shape[0]), int(shape[1])
    bn, bk = block_size
    if (bn, bk) == (n, k):
        return "per-tensor"
    if (bn, bk) == (1, k):
        return "per-row"
    return f"block {bn}x{bk}"


class QuantizedWeightTensor(TorchAOBaseTensor):
    """Base of ``Float8Tensor`` and ``Int8Tensor`` (see the module docstring for the inner tensors)."""

    qdtype: ClassVar[torch.dtype]
    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["block_size", "dtype"]
    optional_tensor_attribute_names = ["act", "kernel"]

    def __new__(
        cls,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        block_size: tuple[int, int],
        dtype: torch.dtype,
        act: ActivationMode | None = None,
        kernel: KernelChoice | None = None,
    ):
        # The wrapper mirrors qdata's strides and offset, so an as_strided replay of a view (torch.compile does
        # this for outputs that alias inputs) means the same thing on the wrapper as on qdata.
        return torch.Tensor._make_wrapper_subclass(
            cls,
            qdata.shape,
            strides=qdata.stride(),
            storage_offset=qdata.storage_offset(),
            dtype=dtype,
            device=qdata.device,
            requires_grad=False,
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        block_size: tuple[int, int],
        dtype: torch.dtype,
        act: ActivationMode | None = None,
        kernel: KernelChoice | None = None,
    ):
        # Kept light on purpose: this also runs when torch.compile rebuilds the tensor from fake inner tensors.
        # Validation lives in ``from_qdata``/``from_hp``.
        self.qdata = qdata
        self.scale = scale
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.act = WEIGHT_ONLY if act is None else act
        self.kernel = KernelChoice.AUTO if kernel is None else KernelChoice(kernel)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_hp(
        cls,
        w: torch.Tensor,
        layout: FormatSpec | tuple[int, int] | str = "row",
        *,
        block: int = 128,
        act: ActivationMode | None = None,
        kernel: KernelChoice | str | None = None,
        name: str = "weight",
    ) -> QuantizedWeightTensor:
        """Round-to-nearest quantization of a 2-D high-precision weight.

        ``layout`` is a ``FormatSpec`` (its element dtype must match the class), a ``(bn, bk)`` block size, or a
        granularity name (``"tensor"``, ``"row"``, ``"block"`` with edge ``block``). The tensor keeps ``w.dtype``.
        Raises ``ValueError`` naming ``name`` for NaN/Inf, a non-2-D weight or a block that does not tile it.
        """
        check_2d(w.shape)
        check_high_precision_dtype(w.dtype, f"{cls.__name__}.from_hp({name})")
        if isinstance(layout, str):
            layout = FormatSpec(cls.qdtype, layout, block)
        if isinstance(layout, FormatSpec):
            if layout.qdtype != cls.qdtype:
                raise ValueError(f"{cls.__name__} stores {cls.qdtype}, but the format asks for {layout.qdtype}")
            qdata, scale, block_size = quantize_rtn(w, layout, name)
        else:
            block_size = _check_tiles(w.shape, layout, name)
            check_finite(w, name)
            scale = compute_scale(w, cls.qdtype, block_size)
            qdata = quantize_with_scale(w, scale, cls.qdtype, block_size)
        return cls.from_qdata(qdata, scale, block_size, w.dtype, act=act, kernel=kernel, name=name)

    @classmethod
    def from_qdata(
        cls,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        block_size: tuple[int, int],
        dtype: torch.dtype,
        act: ActivationMode | None = None,
        kernel: KernelChoice | str | None = None,
        *,
        name: str = "weight",
    ) -> QuantizedWeightTensor:
        """Wrap already-quantized data (from learned rounding or a checkpoint) after checking it is coherent.

        A floating ``scale`` of another dtype is converted to float32 (exact for bf16/fp16). Raises ``ValueError``
        / ``TypeError`` naming ``name`` when dtypes, shapes or the block size do not match.
        """
        if qdata.dtype != cls.qdtype:
            raise TypeError(f"{name}: {cls.__name__} needs qdata of dtype {cls.qdtype}, got {qdata.dtype}")
        n, k = check_2d(qdata.shape)
        block_size = _check_tiles(qdata.shape, block_size, name)
        check_high_precision_dtype(dtype, f"{cls.__name__}.from_qdata({name})")
        if not scale.is_floating_point():
            raise TypeError(f"{name}: the scale must be a floating tensor, got {scale.dtype}")
        grid = (n // block_size[0], k // block_size[1])
        if tuple(scale.shape) != grid:
            raise ValueError(
                f"{name}: a scale for block_size {block_size} on a ({n}, {k}) weight must have shape {grid}, got "
                f"{tuple(scale.shape)}; reshape it to the 2-D grid (see lrq_ao.primitives)"
            )
        if not scale.is_meta and not bool(torch.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError(f"{name}: the scale holds NaN, Inf or negative values; the checkpoint is corrupt")
        if scale.device != qdata.device:
            raise ValueError(f"{name}: qdata is on {qdata.device} but scale is on {scale.device}")
        if act is not None and not isinstance(act, ActivationMode):
            raise TypeError(f"{name}: act must be an ActivationMode, got {type(act).__name__}")
        from lrq_ao.layouts.linear import ensure_plugin_backends

        ensure_plugin_backends()
        return cls(qdata, scale.float(), block_size, dtype, act=act, kernel=kernel)

    # ---- views of the data ----------------------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A plain tensor ``qdata.float() * scale`` in ``dtype`` (default: the tensor's own dtype).

        Bit-identical to ``lrq_ao.primitives.dequantize`` (one float32 multiply per element), but the scale is
        broadcast over a ``(N/bn, bn, K/bk, bk)`` view instead of being expanded to the full weight shape, so no
        (N, K) float32 scale tensor is materialized and the compiler can fuse it into the matmul.
        """
        n, k = self.qdata.shape
        bn, bk = self.block_size
        blocks = self.qdata.float().reshape(n // bn, bn, k // bk, bk)
        values = (blocks * self.scale.reshape(n // bn, 1, k // bk, 1)).reshape(n, k)
        return values.to(self.dtype if dtype is None else dtype)

    @property
    def layout_name(self) -> str:
        return layout_name(self.shape, self.block_size)

    def describe(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> str:
        """Which linear backend an input like ``x`` would take, and why every other backend refused."""
        from lrq_ao.layouts.linear import describe_selection

        return describe_selection(x, self, bias)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, layout={self.layout_name}, "
            f"block_size={self.block_size},\n  act={self.act}, kernel={self.kernel}, device={self.device},\n"
            f"  qdata={self.qdata},\n  scale={self.scale})"
        )

    def _stable_hash_for_caching(self) -> str:
        """Metadata key for torch.compile's AOT autograd cache (values are graph inputs, not part of the key)."""
        parts = [type(self).__qualname__, self.shape, self.stride(), self.dtype, self.block_size, self.act, self.kernel]
        for inner in (self.qdata, self.scale):
            parts += [inner.dtype, inner.shape, inner.stride(), inner.storage_offset(), inner.device.type]
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch.load rebuilds the wrapper without from_qdata: register plug-in backends here too.
        torch._utils._set_obj_state(self, state)
        for attr in self.optional_tensor_attribute_names:
            if attr not in self.__dict__:
                setattr(self, attr, None)
        if self.__dict__.get("act") is None:
            self.act = WEIGHT_ONLY
        if self.__dict__.get("kernel") is None:
            self.kernel = KernelChoice.AUTO
        from lrq_ao.layouts.linear import ensure_plugin_backends

        ensure_plugin_backends()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        table = cls._ATEN_OP_TABLE.get(cls, {})
        if func in table:
            return table[func](func, types, args, kwargs)
        raise NotImplementedError(unsupported_op_message(func, args, kwargs))


def unsupported_op_message(func: Any, args: tuple, kwargs: dict) -> str:
    """Name the op and the layout of the first quantized tensor among the arguments."""
    leaves, _ = tree_flatten((args, kwargs))
    tensor = next((a for a in leaves if isinstance(a, QuantizedWeightTensor)), None)
    if tensor is None:
        return f"{func} is not supported by lrq_ao quantized tensors"
    return (
        f"{func} is not supported by {type(tensor).__name__} (layout {tensor.layout_name}, "
        f"block_size={tensor.block_size}, qdata {tensor.qdtype}); call .dequantize() first if you need it"
    )


def _check_tiles(shape: torch.Size | tuple[int, int], block_size: tuple[int, int], name: str) -> tuple[int, int]:
    n, k = check_2d(shape)
    if len(block_size) != 2:
        raise ValueError(f"{name}: block_size must be a pair (bn, bk), got {block_size!r}")
    bn, bk = int(block_size[0]), int(block_size[1])
    if bn <= 0 or bk <= 0 or n % bn or k % bk:
        raise ValueError(
            f"{name}: block_size ({bn}, {bk}) cannot tile a weight of shape ({n}, {k}); both dimensions must be "
            f"multiples of the block; use a per-row layout or a block size that divides them"
        )
    return (bn, bk)


# Register the common op handlers and the linear handlers on the base before any subclass copies its table.
from lrq_ao.layouts import linear as _linear  # noqa: E402, F401
from lrq_ao.layouts import ops as _ops  # noqa: E402, F401
