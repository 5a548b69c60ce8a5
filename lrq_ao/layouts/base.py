"""The tensor class of lrq_ao's quantized weights: one class holds any ``WeightFormat``.

A quantized weight is a ``__torch_dispatch__`` wrapper subclass (built on torchao's ``TorchAOBaseTensor``) that
holds the stored tensors of a ``lrq_ao.formats.QuantizedWeight`` and the format that reads them:

Inner tensors:
  qdata: the stored codes (``fmt.element.storage_dtype``): ``(N, K)``, or ``(N, K / 2)`` for packed 4-bit codes.
  scale: float32 grid ``(N // bn, K // bk)``.
  scale2: optional float32 scalar of a two-level format (``None`` otherwise; not flattened when absent).
  extra__<name>: further stored tensors the format keeps in ``QuantizedWeight.extra`` (``w4a8``'s ``s_channel``),
    flattened under these names; ``extra_names`` (an attribute) lists them. Row selections refuse a weight that has
    any (their row layout is the format's business); device moves, dtype changes, detach and clone keep them.
Attributes:
  block_size: ``(bn, bk)`` of this view of the weight; per-tensor ``(N, K)``, per-row ``(1, K)``, blocks ``(b, b)``,
    groups ``(1, g)``. A transpose swaps it, a row slice of a per-tensor weight shortens it.
  dtype: the high-precision dtype the tensor reports and ``dequantize()`` returns.
  fmt: the ``WeightFormat`` the codes are in (frozen, hashable: it travels through ``torch.compile`` as metadata).
  act: an ``ActivationMode`` (weight-only or dynamic activation quantization).
  kernel: a ``KernelChoice`` restricting which linear backends may run it.

The wrapper's shape is the logical ``(N, K)`` even when ``qdata`` is packed; its strides and storage offset are
``qdata``'s in units of codes (so an ``as_strided`` replay of a view, as ``torch.compile`` does for outputs that
alias inputs, means the same on the wrapper as on ``qdata``).

``weight_tensor(fmt, qw, dtype)`` builds one; the class comes from ``LAYOUTS`` (element name -> class):
``Float8Tensor`` and ``Int8Tensor`` for the FP8 e4m3fn and INT8 elements (named classes kept for the code and
checkpoints that know them), this class itself for every other element. Adding a format needs no class. The op
handlers are registered on this class (``lrq_ao.layouts.ops``, ``lrq_ao.layouts.linear``, imported by the package)
and found by every subclass through ``__torch_dispatch__`` / ``__torch_function__`` below, whatever the import order.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_flatten
from torchao.utils import TorchAOBaseTensor

from lrq_ao.formats import QuantizedWeight, WeightFormat
from lrq_ao.formats.base import check_2d, check_finite
from lrq_ao.formats.elements import ELEMENTS
from lrq_ao.formats.scaled import ScaledFormat
from lrq_ao.layouts.activation import WEIGHT_ONLY, ActivationMode, KernelChoice
from lrq_ao.layouts.legacy import legacy_format
from lrq_ao.layouts.registry import describe_selection, ensure_plugin_backends

HIGH_PRECISION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
EXTRA_PREFIX = "extra__"  # inner-tensor names of QuantizedWeight.extra (dynamo refuses dotted names)

# element name -> tensor class; filled by ``register_layout``. Elements not listed go to QuantizedWeightTensor.
LAYOUTS: dict[str, type[QuantizedWeightTensor]] = {}


def register_layout(cls: type[QuantizedWeightTensor]) -> type[QuantizedWeightTensor]:
    """Make ``weight_tensor`` build ``cls`` for formats whose element is ``cls.element_name``."""
    LAYOUTS[cls.element_name] = cls
    return cls


def tensor_class_for(fmt: WeightFormat) -> type[QuantizedWeightTensor]:
    """The class that holds weights of ``fmt``: the one registered for its element, else the generic class."""
    return LAYOUTS.get(fmt.element.name, QuantizedWeightTensor)


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


def codes_per_item(fmt: WeightFormat, qdata: torch.Tensor) -> int:
    """How many codes one stored item of ``qdata`` holds (2 for 4-bit codes packed in bytes, else 1)."""
    return max(1, 8 * qdata.element_size() // fmt.element.bits)


def logical_geometry(fmt: WeightFormat, qdata: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int], int]:
    """``(shape, strides, storage_offset)`` of the weight ``qdata`` stores, in codes: ``qdata``'s own for one code
    per item; for packed codes (stored along K, unit stride) K and the row stride scale by the codes per item."""
    r = codes_per_item(fmt, qdata)
    if r == 1:
        return tuple(qdata.shape), qdata.stride(), qdata.storage_offset()
    n, k_stored = qdata.shape
    return (n, k_stored * r), (qdata.stride(0) * r, 1), qdata.storage_offset() * r


class QuantizedWeightTensor(TorchAOBaseTensor):
    """A quantized weight of any format (see the module docstring for the inner tensors and attributes)."""

    element_name: ClassVar[str | None] = None  # the element a named subclass holds; None: any element
    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["block_size", "dtype", "fmt"]
    optional_tensor_data_names = ["scale2"]
    optional_tensor_attribute_names = ["act", "kernel"]

    def __new__(
        cls,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        block_size: tuple[int, int],
        dtype: torch.dtype,
        fmt: WeightFormat,
        scale2: torch.Tensor | None = None,
        act: ActivationMode | None = None,
        kernel: KernelChoice | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ):
        shape, strides, offset = logical_geometry(fmt, qdata)
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=strides, storage_offset=offset, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(
        self,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        block_size: tuple[int, int],
        dtype: torch.dtype,
        fmt: WeightFormat,
        scale2: torch.Tensor | None = None,
        act: ActivationMode | None = None,
        kernel: KernelChoice | None = None,
        extra: dict[str, torch.Tensor] | None = None,
    ):
        # Kept light on purpose: this also runs when torch.compile rebuilds the tensor from fake inner tensors.
        # Validation lives in ``weight_tensor``.
        self.qdata = qdata
        self.scale = scale
        self.scale2 = scale2
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.fmt = fmt
        self.act = WEIGHT_ONLY if act is None else act
        self.kernel = KernelChoice.AUTO if kernel is None else KernelChoice(kernel)
        extra = {} if extra is None else extra
        self.extra_names = tuple(sorted(extra))
        for key in self.extra_names:
            setattr(self, EXTRA_PREFIX + key, extra[key])

    @property
    def extra(self) -> dict[str, torch.Tensor]:
        """The format's further stored tensors by name (``QuantizedWeight.extra``); empty for most formats."""
        return {key: getattr(self, EXTRA_PREFIX + key) for key in self.extra_names}

    # ---- flatten / unflatten / rebuild with the extra tensors (torchao's base knows fixed names only) ---------

    def __tensor_flatten__(self):
        names, attrs = super().__tensor_flatten__()
        return names + [EXTRA_PREFIX + key for key in self.extra_names], attrs | {"extra_names": self.extra_names}

    @classmethod
    def __tensor_unflatten__(cls, inner, attrs, outer_size, outer_stride):
        extra = {key: inner[EXTRA_PREFIX + key] for key in attrs.get("extra_names", ())}
        return cls(
            inner["qdata"],
            inner["scale"],
            attrs["block_size"],
            attrs["dtype"],
            attrs["fmt"],
            inner.get("scale2"),
            act=attrs["act"],
            kernel=attrs["kernel"],
            extra=extra,
        )

    def _apply_fn_to_data(self, fn):
        scale2 = None if self.scale2 is None else fn(self.scale2)
        extra = {key: fn(value) for key, value in self.extra.items()}
        return type(self)(
            fn(self.qdata), fn(self.scale), self.block_size, self.dtype, self.fmt, scale2, self.act, self.kernel, extra
        )

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_hp(
        cls,
        w: torch.Tensor,
        layout: WeightFormat | tuple[int, int] | str = "row",
        *,
        block: int = 128,
        act: ActivationMode | None = None,
        kernel: KernelChoice | str | None = None,
        name: str = "weight",
    ) -> QuantizedWeightTensor:
        """Round-to-nearest quantization of a 2-D high-precision weight.

        ``layout`` is a ``WeightFormat`` (any format on the generic class; one of the class's element on a named
        class), or, on ``Float8Tensor`` / ``Int8Tensor``, a ``(bn, bk)`` block size or a granularity name
        (``"tensor"``, ``"row"``, ``"block"`` with edge ``block``) of the 8-bit scaled format of the class's element.
        The tensor keeps ``w.dtype``. Raises ``ValueError`` naming ``name`` for NaN/Inf, a non-2-D weight, a block
        that does not tile it, or a format of another element than the class stores.
        """
        check_2d(w.shape)
        check_high_precision_dtype(w.dtype, f"{cls.__name__}.from_hp({name})")
        if isinstance(layout, WeightFormat):
            fmt = layout
            if cls is not QuantizedWeightTensor and tensor_class_for(fmt) is not cls:
                raise ValueError(
                    f"{cls.__name__} stores {cls.element_name}, but the format asks for {fmt.element.name}"
                )
            qw = fmt.quantize(w, name)
        else:
            storage = cls._named_storage_dtype(f"from_hp({name})")
            if isinstance(layout, str):
                fmt = ScaledFormat(storage, layout, block)
                qw = fmt.quantize(w, name)
            else:
                block_size = _check_tiles(w.shape, layout, name)
                check_finite(w, name)
                fmt = legacy_format(storage, block_size, w.shape)
                scale, scale2 = fmt.compute_scales(w.float(), block_size)
                codes = fmt.round_values(w, scale, scale2, block_size)
                qw = QuantizedWeight(fmt.element.pack(codes), scale, block_size, scale2)
        return weight_tensor(fmt, qw, w.dtype, act=act, kernel=kernel, name=name)

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
        """Wrap 8-bit codes of the class's element (``Float8Tensor`` / ``Int8Tensor``) in the 8-bit scaled format
        of that element (``lrq_ao.layouts.legacy``) after checking they are coherent; ``weight_tensor`` is the
        spelling for any format. A floating ``scale`` of another dtype is converted to float32 (exact for
        bf16/fp16). Raises ``ValueError`` / ``TypeError`` naming ``name`` when dtypes, shapes or the block size do
        not match.
        """
        storage = cls._named_storage_dtype(f"from_qdata({name})")
        if qdata.dtype != storage:
            raise TypeError(f"{name}: {cls.__name__} needs qdata of dtype {storage}, got {qdata.dtype}")
        block_size = _check_tiles(qdata.shape, block_size, name)
        fmt = legacy_format(qdata.dtype, block_size, qdata.shape)
        return weight_tensor(fmt, QuantizedWeight(qdata, scale, block_size), dtype, act=act, kernel=kernel, name=name)

    @classmethod
    def _named_storage_dtype(cls, what: str) -> torch.dtype:
        if cls.element_name is None:
            raise TypeError(
                f"{cls.__name__}.{what}: the generic class holds any format; pass a WeightFormat (lrq_ao.formats) "
                f"or use lrq_ao.layouts.weight_tensor(fmt, qw, dtype)"
            )
        return ELEMENTS[cls.element_name].storage_dtype

    # ---- views of the data ----------------------------------------------------------------------------------

    @property
    def qdtype(self) -> torch.dtype:
        """The dtype of the stored codes (``fmt.element.storage_dtype``)."""
        return self.qdata.dtype

    def quantized_weight(self) -> QuantizedWeight:
        """The stored tensors as a ``lrq_ao.formats.QuantizedWeight`` (no copy)."""
        return QuantizedWeight(self.qdata, self.scale, self.block_size, self.scale2, self.extra)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``F.linear(x, ·)`` needs, as a plain tensor in ``dtype`` (default: the tensor's own dtype):
        ``fmt.dequantize_original``, exact float32 arithmetic, un-rotated for a rotating format.

        For the 8-bit scaled formats this is ``qdata.float() * scale`` (one float32 multiply per element, bit-identical
        to ``lrq_ao.primitives.dequantize``) with the scale broadcast over a ``(N/bn, bn, K/bk, bk)`` view
        (``lrq_ao.formats.base.broadcast_blocks``): no (N, K) float32 scale tensor is materialized and the compiler
        can fuse it into the matmul.
        """
        return self.fmt.dequantize_original(self.quantized_weight(), self.dtype if dtype is None else dtype)

    def dequantize_stored(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in the basis its codes are stored in (``fmt.dequantize``): what the linear backends multiply
        with ``fmt.rotate_input(x)``. Equal to ``dequantize()`` unless the format rotates."""
        return self.fmt.dequantize(self.quantized_weight(), self.dtype if dtype is None else dtype)

    @property
    def layout_name(self) -> str:
        return layout_name(self.shape, self.block_size)

    def describe(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> str:
        """Which linear backend an input like ``x`` would take, and why every other backend refused."""
        return describe_selection(x, self, bias)

    def __repr__(self) -> str:
        scale2 = "" if self.scale2 is None else f",\n  scale2={self.scale2}"
        scale2 += "".join(f",\n  extra.{key}={value}" for key, value in self.extra.items())
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, format={self.fmt.name}, "
            f"layout={self.layout_name}, block_size={self.block_size},\n  act={self.act}, kernel={self.kernel}, "
            f"device={self.device},\n  qdata={self.qdata},\n  scale={self.scale}{scale2})"
        )

    def _stable_hash_for_caching(self) -> str:
        """Metadata key for torch.compile's AOT autograd cache (values are graph inputs, not part of the key)."""
        parts = [type(self).__qualname__, self.shape, self.stride(), self.dtype, self.block_size, self.fmt]
        parts += [self.act, self.kernel]
        parts.append(self.extra_names)
        for inner in (self.qdata, self.scale, self.scale2, *self.extra.values()):
            if inner is not None:
                parts += [inner.dtype, inner.shape, inner.stride(), inner.storage_offset(), inner.device.type]
        return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__setstate__ = _setstate  # torchao's __init_subclass__ installs its own; ours also reads old pickles

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _handler(cls, "_ATEN_OP_TABLE", func)
        if handler is not None:
            return handler(func, types, args, {} if kwargs is None else kwargs)
        raise NotImplementedError(unsupported_op_message(func, args, kwargs or {}))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        handler = _handler(cls, "_TORCH_FN_TABLE", func)
        if handler is not None:
            return handler(func, types, args, {} if kwargs is None else kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _handler(cls: type, table_name: str, func: Any):
    """The handler of ``func``: every handler is registered on ``QuantizedWeightTensor`` (whose table also holds
    torchao's common ops), looked up there first so a subclass created before a handler was registered still sees
    it; then ``cls``'s own table (``None`` if neither has one)."""
    for klass in (QuantizedWeightTensor, *cls.__mro__):
        table = klass.__dict__.get(table_name, {}).get(klass, {})
        if func in table:
            return table[func]
    return None


def _setstate(self: QuantizedWeightTensor, state: dict[str, Any]) -> None:
    """``torch.load``: restore the state; a checkpoint pickled before tensors carried ``fmt`` / ``scale2`` gets the
    8-bit scaled format its ``qdata.dtype`` and block size mean (``lrq_ao.layouts.legacy``). Also registers the
    plug-in backends, since ``weight_tensor`` did not run."""
    torch._utils._set_obj_state(self, state)
    self.__dict__.setdefault("scale2", None)
    self.__dict__.setdefault("extra_names", ())
    if self.__dict__.get("act") is None:
        self.act = WEIGHT_ONLY
    if self.__dict__.get("kernel") is None:
        self.kernel = KernelChoice.AUTO
    if self.__dict__.get("fmt") is None:
        self.fmt = legacy_format(self.qdata.dtype, self.block_size, self.shape)
    ensure_plugin_backends()


QuantizedWeightTensor.__setstate__ = _setstate


def weight_tensor(
    fmt: WeightFormat,
    qw: QuantizedWeight,
    dtype: torch.dtype,
    act: ActivationMode | None = None,
    kernel: KernelChoice | str | None = None,
    *,
    name: str = "weight",
) -> QuantizedWeightTensor:
    """Wrap a quantized weight of format ``fmt`` in the tensor class that holds it (``tensor_class_for``).

    ``dtype`` is the high-precision dtype the tensor reports and dequantizes to; ``act`` the activation mode (default
    weight-only; see ``activation_mode_for``), ``kernel`` the backend family. A floating ``scale`` / ``scale2`` of
    another dtype is converted to float32. Raises ``TypeError`` / ``ValueError`` naming ``name`` when the stored
    tensors do not follow the format (dtype, packed shape, scale grid, finite non-negative scales, one device) or
    when ``act`` asks for dynamic activations of a format that has no 8-bit kernel dtype.
    """
    qdata, scale, scale2 = qw.qdata, qw.scale, qw.scale2
    element = fmt.element
    if qdata.dtype != element.storage_dtype:
        raise TypeError(f"{name}: format {fmt.name} stores qdata of dtype {element.storage_dtype}, got {qdata.dtype}")
    check_2d(qdata.shape)
    shape, _, _ = logical_geometry(fmt, qdata)
    if tuple(element.stored_shape(shape)) != tuple(qdata.shape):
        raise ValueError(f"{name}: qdata of shape {tuple(qdata.shape)} is not how {fmt.name} stores a weight")
    block_size = _check_tiles(shape, qw.block_size, name)
    check_high_precision_dtype(dtype, f"weight_tensor({name})")
    _check_scale(scale, shape, block_size, qdata.device, name)
    if scale2 is not None:
        _check_scale(scale2.reshape(1, 1), (1, 1), (1, 1), qdata.device, f"{name} (scale2)")
        scale2 = scale2.float().reshape(())
    if act is not None and not isinstance(act, ActivationMode):
        raise TypeError(f"{name}: act must be an ActivationMode, got {type(act).__name__}")
    if act is not None and act.is_dynamic and fmt.kernel_dtype is None:
        raise ValueError(
            f"{name}: format {fmt.name} has no 8-bit kernel dtype to quantize activations to; use weight-only "
            f"activations"
        )
    ensure_plugin_backends()
    cls = tensor_class_for(fmt)
    for key, value in qw.extra.items():
        if not isinstance(value, torch.Tensor) or value.device != qdata.device:
            raise ValueError(f"{name}: extra tensor {key!r} of format {fmt.name} must be a tensor on {qdata.device}")
    return cls(qdata, scale.float(), block_size, dtype, fmt, scale2, act=act, kernel=kernel, extra=dict(qw.extra))


def _check_scale(scale: torch.Tensor, shape, block_size: tuple[int, int], device: torch.device, name: str) -> None:
    n, k = shape
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
    if scale.device != device:
        raise ValueError(f"{name}: qdata is on {device} but scale is on {scale.device}")


def unsupported_op_message(func: Any, args: tuple, kwargs: dict) -> str:
    """Name the op and the layout of the first quantized tensor among the arguments."""
    leaves, _ = tree_flatten((args, kwargs))
    tensor = next((a for a in leaves if isinstance(a, QuantizedWeightTensor)), None)
    if tensor is None:
        return f"{func} is not supported by lrq_ao quantized tensors"
    return (
        f"{func} is not supported by {type(tensor).__name__} (layout {tensor.layout_name}, format {tensor.fmt.name}, "
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
