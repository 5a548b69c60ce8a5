"""The ComfyUI container as the converter and the reader see it: marker JSON, the file header, one layer's tensors.

Per-format rules (ComfyUI name, marker keys, stored tensors, reading them back) belong to the format objects of
:mod:`lrq_ao.formats`, and the rules every format shares (tensor-name suffixes, marker key order, the reader
registry) to :mod:`lrq_ao.formats.comfy`. This module adds what a whole file needs around them, so the writer
(``lrq_ao.convert``) and the reader (:mod:`lrq_ao.convert.reader`) cannot drift apart.

For a quantized linear whose module path is ``L`` a file holds:

* the format's tensors (:meth:`~lrq_ao.formats.base.WeightFormat.comfy_tensors`): ``L.weight`` (the quantized data
  in its native dtype), ``L.weight_scale`` and, for two-level formats, ``L.weight_scale_2``;
* ``L.comfy_quant`` -- a 1-D ``uint8`` tensor holding the UTF-8 JSON marker, e.g. ``{"format": "float8_e4m3fn"}``;
* optionally ``L.input_scale`` -- a float32 scalar static activation scale.

JSON serialization (decided to match, byte for byte, what ComfyUI's own ``state_dict()`` and the reference tool
``convert-to-quant`` 1.3.4 write): ``json.dumps`` with its default separators (``", "`` and ``": "``), ASCII output,
and the key order of :data:`lrq_ao.formats.comfy.MARKER_KEY_ORDER` (``format, orig_dtype, orig_shape, group_size,
full_precision_matrix_mult, per_row``, then any key a format adds); keys that do not apply are left out.
``orig_dtype`` is written as ``str(torch_dtype)`` (``"torch.bfloat16"``), as the reference tool does. The optional
``_quantization_metadata`` file header is ``json.dumps({"format_version": "1.0", "layers": {L: marker, ...}})``
whose per-layer entries are exactly the per-layer markers, because ComfyUI regenerates the per-layer markers from
the header when it is present.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from lrq_ao.formats.base import QuantizedWeight, WeightFormat
from lrq_ao.formats.comfy import (
    INPUT_SCALE_SUFFIX,
    MARKER_KEY_ORDER,
    MARKER_SUFFIX,
    SCALE2_SUFFIX,
    SCALE_SUFFIX,
    WEIGHT_SUFFIX,
    ComfyFormatError,
    dtype_name,
    ordered_marker,
)

METADATA_KEY = "_quantization_metadata"
METADATA_VERSION = "1.0"

__all__ = [
    "INPUT_SCALE_SUFFIX",
    "MARKER_KEY_ORDER",
    "MARKER_SUFFIX",
    "METADATA_KEY",
    "SCALE2_SUFFIX",
    "SCALE_SUFFIX",
    "WEIGHT_SUFFIX",
    "ComfyFormatError",
    "decode_marker",
    "dtype_name",
    "encode_marker",
    "layer_marker",
    "layer_tensors",
    "marker_json",
    "metadata_header",
    "parse_dtype_name",
    "parse_metadata_header",
    "validate_marker",
]


# ----------------------------------------------------------------------------------------------------------------
# JSON markers
# ----------------------------------------------------------------------------------------------------------------


def parse_dtype_name(text: Any, where: str = "") -> torch.dtype:
    """Inverse of :func:`dtype_name`; also accepts the bare ``"bfloat16"`` spelling."""
    name = text.removeprefix("torch.") if isinstance(text, str) else None
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ComfyFormatError(f"{where}: orig_dtype {text!r} is not a torch floating-point dtype name")
    return dtype


def layer_marker(
    fmt: WeightFormat,
    shape: tuple[int, int],
    *,
    orig_dtype: torch.dtype | None = None,
    orig_shape: tuple[int, int] | None = None,
    full_precision_matrix_mult: bool = False,
) -> dict[str, Any]:
    """The ``.comfy_quant`` JSON object for a ``shape`` weight of ``fmt``: the format's name and its own keys
    (:meth:`~lrq_ao.formats.base.WeightFormat.comfy_marker_fields`) with the common ones, in the documented order.
    Raises ``FormatError`` if ``fmt`` cannot store ``shape``."""
    return ordered_marker(
        fmt.comfy_name,
        fmt.comfy_marker_fields(fmt.block_size_for(shape), shape),
        orig_dtype=None if orig_dtype is None else dtype_name(orig_dtype),
        orig_shape=None if orig_shape is None else [int(d) for d in orig_shape],
        full_precision_matrix_mult=full_precision_matrix_mult,
    )


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


def logical_shape(fmt: WeightFormat, qw: QuantizedWeight) -> tuple[int, int]:
    """The ``(N, K)`` weight ``qw`` stands for: its stored codes' rows, and their columns times the codes per byte
    (``qdata`` is ``(N, K)``, or ``(N, K * bits / 8)`` for packed sub-byte elements)."""
    rows, cols = qw.qdata.shape
    return int(rows), int(cols) * 8 // fmt.element.bits


def layer_tensors(
    layer: str,
    fmt: WeightFormat,
    qw: QuantizedWeight,
    *,
    orig_dtype: torch.dtype | None = None,
    orig_shape: tuple[int, int] | None = None,
    full_precision_matrix_mult: bool = False,
    input_scale: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor a ComfyUI file holds for quantized linear ``layer``, and its header marker.

    ``qw`` is the layer quantized in ``fmt``. Returns ``({"L.weight", "L.weight_scale"[, "L.weight_scale_2"],
    "L.comfy_quant"[, "L.input_scale"]}, marker)``: the format's tensors (``fmt.comfy_tensors``) under the layer's
    name, the marker, the optional input scale. Raises ``ComfyFormatError`` for qdata of another dtype than the
    format stores, a scale grid of the wrong shape, a bad input scale, or a name ending in ``.weight``.
    """
    if layer.endswith(WEIGHT_SUFFIX):
        raise ComfyFormatError(f"layer name {layer!r} must be the module path, without the trailing '.weight'")
    if qw.qdata.dtype != fmt.element.storage_dtype:
        raise ComfyFormatError(
            f"{layer}.weight: qdata dtype {qw.qdata.dtype} does not match {fmt.describe()} "
            f"(stores {fmt.element.storage_dtype})"
        )
    shape = logical_shape(fmt, qw)
    marker = layer_marker(
        fmt, shape, orig_dtype=orig_dtype, orig_shape=orig_shape, full_precision_matrix_mult=full_precision_matrix_mult
    )
    tensors = {layer + suffix: t for suffix, t in fmt.comfy_tensors(qw, shape).items()}
    tensors[layer + MARKER_SUFFIX] = encode_marker(marker)
    if input_scale is not None:
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ComfyFormatError(f"{layer}.input_scale: must be a positive finite number, got {input_scale}")
        tensors[layer + INPUT_SCALE_SUFFIX] = torch.tensor(float(input_scale), dtype=torch.float32)
    return tensors, marker
