"""ComfyUI quantized-checkpoint format: format names, stored scale shapes and the JSON markers.

This module is the single place that knows how an lrq_ao weight (``qdata``, a 2-D float32 scale grid
``(N // bn, K // bk)`` and its ``block_size``; see :mod:`lrq_ao.primitives`) is laid out in a ComfyUI
``.safetensors`` file, and back. The writer (``lrq_ao.convert``) and the reader (:mod:`lrq_ao.convert.reader`)
both go through it, so the two directions cannot drift apart.

For a quantized linear whose module path is ``L`` a file holds:

* ``L.weight`` -- the quantized data in its native dtype (``F8_E4M3`` or ``I8``);
* ``L.weight_scale`` -- float32 scale, shaped per format (see :data:`COMFY_FORMATS`);
* ``L.comfy_quant`` -- a 1-D ``uint8`` tensor holding the UTF-8 JSON marker, e.g. ``{"format": "float8_e4m3fn"}``;
* optionally ``L.input_scale`` -- a float32 scalar static activation scale.

JSON serialization (decided to match, byte for byte, what ComfyUI's own ``state_dict()`` and the reference tool
``convert-to-quant`` 1.3.4 write): ``json.dumps`` with its default separators (``", "`` and ``": "``), ASCII output,
and the key order ``format, orig_dtype, orig_shape, group_size, full_precision_matrix_mult, per_row``; keys
that do not apply are left out. ``orig_dtype`` is written as ``str(torch_dtype)`` (``"torch.bfloat16"``), as the
reference tool does. The optional ``_quantization_metadata`` file header is
``json.dumps({"format_version": "1.0", "layers": {L: marker, ...}})`` whose per-layer entries are exactly the
per-layer markers, because ComfyUI regenerates the per-layer markers from the header when it is present.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from lrq_ao.primitives import FP8_DTYPE, FormatSpec, check_2d

# How a format stores its scale, relative to lrq_ao's 2-D grid ``(N // bn, K // bk)``.
SCALAR = "scalar"  # shape [] (one scale for the tensor)
COLUMN = "column"  # shape [out, 1] (one scale per row, broadcastable against [out, in])
VECTOR = "vector"  # shape [out] (one scale per row, 1-D)
GRID = "grid"  # shape [out / bs, in / bs], block size in the JSON "group_size"

METADATA_KEY = "_quantization_metadata"
METADATA_VERSION = "1.0"
MARKER_SUFFIX = ".comfy_quant"
WEIGHT_SUFFIX = ".weight"
SCALE_SUFFIX = ".weight_scale"
INPUT_SCALE_SUFFIX = ".input_scale"

# JSON keys in the order they are written; ``convrot`` keys are only read (lrq_ao does not write ConvRot).
MARKER_KEY_ORDER = ("format", "orig_dtype", "orig_shape", "group_size", "full_precision_matrix_mult", "per_row")
KNOWN_MARKER_KEYS = frozenset(MARKER_KEY_ORDER) | {"convrot", "convrot_groupsize", "params"}


class ComfyFormatError(ValueError):
    """A ComfyUI file or tensor that does not follow the format. The message names the file and/or tensor."""


@dataclass(frozen=True)
class ComfyFormat:
    """One ComfyUI quantization format.

    ``scale_layouts`` maps each lrq_ao granularity the format carries to how its scale is stored (``SCALAR``,
    ``COLUMN``, ``VECTOR`` or ``GRID``). ``stock`` says whether unmodified ComfyUI loads it (the others need the
    ComfyUI-QuantOps custom node). ``kitchen_layout`` names the comfy-kitchen layout class stock ComfyUI
    dequantizes it with (``None`` for custom-node formats).
    """

    name: str
    qdtype: torch.dtype
    scale_layouts: dict[str, str]
    stock: bool
    kitchen_layout: str | None = None

    @property
    def has_group_size(self) -> bool:
        return GRID in self.scale_layouts.values()


def _register(*formats: ComfyFormat) -> dict[str, ComfyFormat]:
    return {f.name: f for f in formats}


# Adding a format = one entry here.
COMFY_FORMATS: dict[str, ComfyFormat] = _register(
    ComfyFormat("float8_e4m3fn", FP8_DTYPE, {"tensor": SCALAR}, stock=True, kitchen_layout="TensorCoreFP8Layout"),
    ComfyFormat(
        "int8_tensorwise",
        torch.int8,
        {"row": COLUMN, "tensor": SCALAR},
        stock=True,
        kitchen_layout="TensorWiseINT8Layout",
    ),
    ComfyFormat("int8_blockwise", torch.int8, {"block": GRID}, stock=False),
    ComfyFormat("float8_e4m3fn_rowwise", FP8_DTYPE, {"row": VECTOR}, stock=False),
    ComfyFormat("float8_e4m3fn_blockwise", FP8_DTYPE, {"block": GRID}, stock=False),
)

# Formats ComfyUI knows but lrq_ao cannot represent; named so the reader can say so instead of "unknown".
UNSUPPORTED_COMFY_FORMATS = {
    "float8_e5m2": "lrq_ao stores FP8 weights as e4m3fn only",
    "mxfp8": "MXFP8 (E8M0 block-32 scales) is not an lrq_ao layout",
    "nvfp4": "NVFP4 (4-bit) is not an lrq_ao layout",
    "convrot_w4a4": "4-bit ConvRot is not an lrq_ao layout",
}


def comfy_format_for(spec: FormatSpec) -> ComfyFormat:
    """The ComfyUI format that stores weights of ``spec``; raises ``ComfyFormatError`` if none does."""
    for fmt in COMFY_FORMATS.values():
        if fmt.qdtype == spec.qdtype and spec.granularity in fmt.scale_layouts:
            return fmt
    raise ComfyFormatError(f"no ComfyUI format stores {spec}; supported: {describe_formats()}")


def get_comfy_format(name: Any, where: str = "") -> ComfyFormat:
    """Look up a ComfyUI format by name; raises ``ComfyFormatError`` (prefixed by ``where``) if unknown."""
    prefix = f"{where}: " if where else ""
    if isinstance(name, str) and name in COMFY_FORMATS:
        return COMFY_FORMATS[name]
    if isinstance(name, str) and name in UNSUPPORTED_COMFY_FORMATS:
        raise ComfyFormatError(f"{prefix}format {name!r} is not supported: {UNSUPPORTED_COMFY_FORMATS[name]}")
    raise ComfyFormatError(f"{prefix}unknown quantization format {name!r}; expected one of {sorted(COMFY_FORMATS)}")


def is_stock(spec: FormatSpec) -> bool:
    """Whether stock ComfyUI loads weights of ``spec`` (otherwise the ComfyUI-QuantOps node is needed)."""
    return comfy_format_for(spec).stock


def describe_formats() -> str:
    return ", ".join(
        f"{name} ({'stock' if f.stock else 'QuantOps node'}: {'/'.join(f.scale_layouts)})"
        for name, f in COMFY_FORMATS.items()
    )


# ----------------------------------------------------------------------------------------------------------------
# Scales: lrq_ao grid <-> stored weight_scale
# ----------------------------------------------------------------------------------------------------------------


def scale_to_comfy(scale: torch.Tensor, spec: FormatSpec, weight_shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """The ``weight_scale`` tensor to store for lrq_ao scale grid ``scale`` of a ``spec`` weight of ``weight_shape``.

    Returns a contiguous float32 tensor shaped as the ComfyUI format expects. Raises ``ComfyFormatError`` if the
    grid does not have the shape ``spec`` implies.
    """
    n, k = check_2d(weight_shape)
    bn, bk = spec.block_size_for((n, k))
    expected = (n // bn, k // bk)
    if tuple(scale.shape) != expected:
        raise ComfyFormatError(f"scale grid has shape {tuple(scale.shape)}, expected {expected} for {spec}")
    layout = comfy_format_for(spec).scale_layouts[spec.granularity]
    stored = {SCALAR: (), COLUMN: (n, 1), VECTOR: (n,), GRID: expected}[layout]
    return scale.detach().to(torch.float32).reshape(stored).contiguous()


def expected_scale_shapes(fmt: ComfyFormat, weight_shape: tuple[int, int], group_size: int | None) -> list[tuple]:
    """Every stored scale shape ``fmt`` allows for a weight of ``weight_shape`` (for error messages and checks)."""
    n, k = weight_shape
    shapes: list[tuple] = []
    for layout in fmt.scale_layouts.values():
        if layout == SCALAR:
            shapes += [(), (1,)]
        elif layout == COLUMN:
            shapes.append((n, 1))
        elif layout == VECTOR:
            shapes.append((n,))
        elif group_size:
            shapes.append((n // group_size, k // group_size))
        else:
            shapes.append(("out/group_size", "in/group_size"))
    return shapes


def scale_from_comfy(
    stored: torch.Tensor,
    fmt: ComfyFormat,
    weight_shape: tuple[int, int] | torch.Size,
    group_size: int | None = None,
    name: str = "weight_scale",
) -> tuple[FormatSpec, torch.Tensor, tuple[int, int]]:
    """Interpret a stored ``weight_scale`` of format ``fmt``: returns ``(spec, scale_grid, block_size)``.

    ``scale_grid`` is a float32 2-D tensor ``(N // bn, K // bk)`` as :mod:`lrq_ao.primitives` uses. Accepted
    shapes: ``[]`` or ``[1]`` for per-tensor, ``[out, 1]`` (INT8) or ``[out]`` (FP8 row-wise) for per-row, and
    ``[out / g, in / g]`` for block-wise with ``g`` = ``group_size`` (inferred from the shapes when the marker
    lacks it). Raises ``ComfyFormatError`` naming ``name`` for a non-float scale or any other shape.
    """
    n, k = check_2d(weight_shape)
    if not stored.dtype.is_floating_point or stored.dtype in (FP8_DTYPE, torch.float8_e5m2):
        raise ComfyFormatError(f"{name}: scale dtype {stored.dtype} is not a float scale for {fmt.name}")
    shape = tuple(stored.shape)
    granularity = _granularity_of_scale_shape(shape, fmt, n, k)
    if granularity is None:
        if shape == (n,) and fmt.name == "int8_tensorwise":
            # Written by some tools; lrq_ao can read it, but stock ComfyUI fails in the forward with it.
            granularity = "row"
        else:
            allowed = expected_scale_shapes(fmt, (n, k), group_size)
            raise ComfyFormatError(
                f"{name}: scale shape {list(shape)} does not fit format {fmt.name} for a weight of shape "
                f"[{n}, {k}]; expected one of {[list(s) for s in allowed]}"
            )
    block = 1
    if granularity == "block":
        block = _group_size_from_grid(shape, n, k, group_size, name)
    spec = FormatSpec(fmt.qdtype, granularity, block) if granularity == "block" else FormatSpec(fmt.qdtype, granularity)
    block_size = spec.block_size_for((n, k))
    grid = stored.detach().to(torch.float32).reshape(n // block_size[0], k // block_size[1])
    return spec, grid, block_size


def _granularity_of_scale_shape(shape: tuple, fmt: ComfyFormat, n: int, k: int) -> str | None:
    for granularity, layout in fmt.scale_layouts.items():
        if layout == SCALAR and shape in ((), (1,)):
            return granularity
        if layout == COLUMN and shape == (n, 1):
            return granularity
        if layout == VECTOR and shape == (n,):
            return granularity
        if layout == GRID and len(shape) == 2:
            return granularity
    return None


def _group_size_from_grid(shape: tuple, n: int, k: int, group_size: int | None, name: str) -> int:
    rows, cols = shape
    if group_size is None:
        # The marker lacks group_size: infer it, but only if the grid is a square tiling of the weight.
        if rows <= 0 or cols <= 0 or n % rows or k % cols or n // rows != k // cols:
            raise ComfyFormatError(
                f"{name}: block scale shape {list(shape)} is not a square tiling of weight [{n}, {k}] and the "
                f"marker has no group_size"
            )
        group_size = n // rows
    if n % group_size or k % group_size or (rows, cols) != (n // group_size, k // group_size):
        raise ComfyFormatError(
            f"{name}: block scale shape {list(shape)} does not match weight [{n}, {k}] with group_size "
            f"{group_size}; expected [{n // group_size}, {k // group_size}] and both dims divisible by it"
        )
    return group_size


# ----------------------------------------------------------------------------------------------------------------
# JSON markers
# ----------------------------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"torch.bfloat16"`` (the spelling the reference tool writes)."""
    return str(dtype)


def parse_dtype_name(text: Any, where: str = "") -> torch.dtype:
    """Inverse of :func:`dtype_name`; also accepts the bare ``"bfloat16"`` spelling."""
    name = text.removeprefix("torch.") if isinstance(text, str) else None
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ComfyFormatError(f"{where}: orig_dtype {text!r} is not a torch floating-point dtype name")
    return dtype


def make_marker(
    spec: FormatSpec,
    *,
    orig_dtype: torch.dtype | None = None,
    orig_shape: tuple[int, int] | None = None,
    full_precision_matrix_mult: bool = False,
) -> dict[str, Any]:
    """The ``.comfy_quant`` JSON object for a weight of ``spec``, keys in the documented order."""
    fmt = comfy_format_for(spec)
    marker: dict[str, Any] = {"format": fmt.name}
    if orig_dtype is not None:
        marker["orig_dtype"] = dtype_name(orig_dtype)
    if orig_shape is not None:
        marker["orig_shape"] = [int(d) for d in orig_shape]
    if spec.granularity == "block":
        marker["group_size"] = int(spec.block)
    if full_precision_matrix_mult:
        marker["full_precision_matrix_mult"] = True
    if fmt.name == "int8_tensorwise" and spec.granularity == "row":
        marker["per_row"] = True
    return marker


def marker_json(marker: dict[str, Any]) -> str:
    """Serialize a marker exactly as written to files (see the module docstring)."""
    return json.dumps(marker)


def encode_marker(marker: dict[str, Any]) -> torch.Tensor:
    """The 1-D ``uint8`` ``.comfy_quant`` tensor holding ``marker`` as UTF-8 JSON."""
    return torch.frombuffer(bytearray(marker_json(marker).encode("utf-8")), dtype=torch.uint8).clone()


def decode_marker(tensor: torch.Tensor, name: str = "comfy_quant") -> dict[str, Any]:
    """Parse a ``.comfy_quant`` tensor; raises ``ComfyFormatError`` naming ``name`` if it is not a JSON object."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ComfyFormatError(
            f"{name}: a .comfy_quant marker must be a 1-D uint8 tensor of UTF-8 JSON, got dtype {tensor.dtype} "
            f"and shape {list(tensor.shape)}"
        )
    try:
        marker = json.loads(tensor.numpy().tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ComfyFormatError(f"{name}: marker is not valid UTF-8 JSON ({exc})") from None
    return validate_marker(marker, name)


def validate_marker(marker: Any, name: str) -> dict[str, Any]:
    """Check a parsed marker's structure (a JSON object with a string ``format``; typed optional keys)."""
    if not isinstance(marker, dict):
        raise ComfyFormatError(f"{name}: marker must be a JSON object, got {type(marker).__name__}")
    marker = dict(marker)
    params = marker.pop("params", None)
    if isinstance(params, dict):
        # Older reference-tool files nest group_size under "params"; ComfyUI reads it from there too.
        for key, value in params.items():
            marker.setdefault(key, value)
    elif params is not None:
        raise ComfyFormatError(f"{name}: marker key 'params' must be an object, got {params!r}")
    if "format" not in marker:
        raise ComfyFormatError(f"{name}: marker has no 'format' key (ComfyUI requires it): {marker}")
    if not isinstance(marker["format"], str):
        raise ComfyFormatError(f"{name}: marker 'format' must be a string, got {marker['format']!r}")
    _check_optional(marker, "group_size", lambda v: _is_int(v) and v > 0, "a positive integer", name)
    _check_optional(marker, "full_precision_matrix_mult", lambda v: isinstance(v, bool), "true or false", name)
    _check_optional(marker, "per_row", lambda v: isinstance(v, bool), "true or false", name)
    _check_optional(
        marker,
        "orig_shape",
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(d) and d > 0 for d in v),
        "a list of two positive integers",
        name,
    )
    if marker.get("convrot"):
        raise ComfyFormatError(f"{name}: ConvRot (rotated) weights are not supported by lrq_ao")
    return marker


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_optional(marker: dict, key: str, ok, what: str, name: str) -> None:
    if key in marker and not ok(marker[key]):
        raise ComfyFormatError(f"{name}: marker key {key!r} must be {what}, got {marker[key]!r}")


# ----------------------------------------------------------------------------------------------------------------
# File header and whole-layer tensors
# ----------------------------------------------------------------------------------------------------------------


def metadata_header(layers: dict[str, dict[str, Any]]) -> str:
    """The ``_quantization_metadata`` header value for per-layer markers keyed by module path (no ``.weight``)."""
    for layer in layers:
        if layer.endswith(WEIGHT_SUFFIX):
            raise ComfyFormatError(
                f"header layer name {layer!r} ends in '.weight'; use the module path (ComfyUI would silently "
                f"leave that layer unquantized)"
            )
    return json.dumps({"format_version": METADATA_VERSION, "layers": layers})


def parse_metadata_header(text: Any, where: str = "_quantization_metadata") -> dict[str, dict[str, Any]]:
    """Parse and validate a ``_quantization_metadata`` header; returns its per-layer markers."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ComfyFormatError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise ComfyFormatError(f"{where}: header must be a JSON object with a 'layers' object")
    version = data.get("format_version", METADATA_VERSION)
    if not isinstance(version, str) or version.split(".")[0] != "1":
        raise ComfyFormatError(f"{where}: unsupported format_version {version!r}; lrq_ao reads version 1.x")
    layers = {}
    for layer, marker in data["layers"].items():
        if layer.endswith(WEIGHT_SUFFIX):
            raise ComfyFormatError(
                f"{where}: layer name {layer!r} ends in '.weight'; header layer names must be module paths "
                f"(ComfyUI would silently leave this layer unquantized)"
            )
        layers[layer] = validate_marker(marker, f"{where} layer {layer!r}")
    return layers


def layer_tensors(
    layer: str,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    spec: FormatSpec,
    *,
    orig_dtype: torch.dtype | None = None,
    orig_shape: tuple[int, int] | None = None,
    full_precision_matrix_mult: bool = False,
    input_scale: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor a ComfyUI file holds for quantized linear ``layer``, and its header marker.

    ``qdata``/``scale`` are lrq_ao's quantized data and 2-D scale grid for ``spec``. Returns
    ``({"L.weight", "L.weight_scale", "L.comfy_quant"[, "L.input_scale"]}, marker)``. Raises
    ``ComfyFormatError`` for a wrong qdata dtype, a scale grid of the wrong shape, or a name ending in ``.weight``.
    """
    if layer.endswith(WEIGHT_SUFFIX):
        raise ComfyFormatError(f"layer name {layer!r} must be the module path, without the trailing '.weight'")
    if qdata.dtype != spec.qdtype:
        raise ComfyFormatError(f"{layer}.weight: qdata dtype {qdata.dtype} does not match {spec}")
    marker = make_marker(
        spec, orig_dtype=orig_dtype, orig_shape=orig_shape, full_precision_matrix_mult=full_precision_matrix_mult
    )
    tensors = {
        layer + WEIGHT_SUFFIX: qdata.detach().contiguous(),
        layer + SCALE_SUFFIX: scale_to_comfy(scale, spec, qdata.shape),
        layer + MARKER_SUFFIX: encode_marker(marker),
    }
    if input_scale is not None:
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ComfyFormatError(f"{layer}.input_scale: must be a positive finite number, got {input_scale}")
        tensors[layer + INPUT_SCALE_SUFFIX] = torch.tensor(float(input_scale), dtype=torch.float32)
    return tensors, marker
