"""The ComfyUI container rules every format shares, and the registry of per-format readers.

Per-format rules (name, marker keys, stored tensors) live in the format files; this leaf holds what they share:
tensor-name suffixes, the error type, ``orig_dtype`` spelling, the marker key order, and ``register_reader`` /
``reader_for``, through which a ComfyUI format name found in a file is turned back into an lrq_ao format.

A reader is ``reader(marker, tensors, where) -> (WeightFormat, QuantizedWeight)``: ``marker`` the validated
``.comfy_quant`` JSON object, ``tensors`` the layer's stored tensors by suffix (``.weight``, ``.weight_scale``,
``.weight_scale_2`` where present), ``where`` the layer name for messages. It raises ``ComfyFormatError`` naming
the tensor for anything that does not follow the format. While a file is validated (``lrq_ao.convert.reader``'s
``read_comfy``, which reads no weight data), ``.weight`` holds zero codes of the stored dtype and shape (a broadcast
view); loading the layer calls the reader again with the data, so checks of the weight's values bite then.

One ComfyUI name can carry several lrq_ao formats told apart by a marker key (``int8_tensorwise`` with
``"convrot": true`` is ConvRot, without it plain INT8): a format file registers such a *variant* reader with
``register_reader(name, reader, when=predicate)``; :func:`reader_for` returns a reader that tries the variants whose
predicate accepts the marker, in registration order, before the name's plain reader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lrq_ao.formats.base import FormatError, QuantizedWeight, WeightFormat

WEIGHT_SUFFIX = ".weight"
SCALE_SUFFIX = ".weight_scale"
SCALE2_SUFFIX = ".weight_scale_2"
INPUT_SCALE_SUFFIX = ".input_scale"
MARKER_SUFFIX = ".comfy_quant"

# JSON keys in the order they are written (matching ComfyUI's own state_dict() and convert_to_quant 1.3.4);
# a key a format writes that is not listed here follows these in the order the format gives.
MARKER_KEY_ORDER = ("format", "orig_dtype", "orig_shape", "group_size", "full_precision_matrix_mult", "per_row")


class ComfyFormatError(FormatError):
    """A ComfyUI file or tensor that does not follow the format. The message names the file and/or tensor."""


Reader = Callable[[dict[str, Any], dict[str, torch.Tensor], str], tuple[WeightFormat, QuantizedWeight]]
MarkerTest = Callable[[dict[str, Any]], bool]
READERS: dict[str, Reader] = {}
# Readers of one ComfyUI name that apply only to markers their test accepts (tried before the plain reader).
VARIANTS: dict[str, list[tuple[MarkerTest, Reader]]] = {}
# Formats ComfyUI (core or the QuantOps node) knows that no lrq_ao format file reads, with the reason, so the reader
# says so instead of "unknown". A format file that registers a reader for one of these names removes it from here.
UNSUPPORTED: dict[str, str] = {
    "float8_e5m2": "lrq_ao stores FP8 weights as e4m3fn only",
    "mxfp8": "no lrq_ao format reads MXFP8 (E8M0 block-32 scales)",
    "nvfp4": "no lrq_ao format reads NVFP4 (4-bit E2M1 with E4M3 block-16 scales)",
    "convrot_w4a4": "no lrq_ao format reads 4-bit ConvRot",
    "asym_w4a8_int8": "no lrq_ao format reads 4-bit W4A8 codebook weights",
}


def register_reader(comfy_name: str, reader: Reader, when: MarkerTest | None = None) -> None:
    """Register the reader of ComfyUI format ``comfy_name``; with ``when``, a variant reader for the markers
    ``when(marker)`` accepts."""
    if when is None:
        READERS[comfy_name] = reader
    else:
        VARIANTS.setdefault(comfy_name, []).append((when, reader))
    UNSUPPORTED.pop(comfy_name, None)


def _dispatching(comfy_name: str) -> Reader:
    def read(marker: dict[str, Any], tensors: dict[str, torch.Tensor], where: str):
        for when, reader in VARIANTS[comfy_name]:
            if when(marker):
                return reader(marker, tensors, where)
        if comfy_name in READERS:
            return READERS[comfy_name](marker, tensors, where)
        raise ComfyFormatError(f"{where}{MARKER_SUFFIX}: no lrq_ao reader accepts the {comfy_name!r} marker {marker}")

    return read


def register_unsupported(comfy_name: str, why: str) -> None:
    if comfy_name not in READERS:
        UNSUPPORTED[comfy_name] = why


def reader_for(comfy_name: Any, where: str = "") -> Reader:
    """The reader of ComfyUI format ``comfy_name`` (dispatching on the marker where variants are registered);
    ``ComfyFormatError`` (prefixed by ``where``) if none."""
    prefix = f"{where}: " if where else ""
    if isinstance(comfy_name, str) and comfy_name in VARIANTS:
        return _dispatching(comfy_name)
    if isinstance(comfy_name, str) and comfy_name in READERS:
        return READERS[comfy_name]
    if isinstance(comfy_name, str) and comfy_name in UNSUPPORTED:
        raise ComfyFormatError(f"{prefix}format {comfy_name!r} is not supported: {UNSUPPORTED[comfy_name]}")
    known = sorted(set(READERS) | set(VARIANTS))
    raise ComfyFormatError(f"{prefix}unknown quantization format {comfy_name!r}; expected one of {known}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"torch.bfloat16"`` (the spelling the reference tool writes)."""
    return str(dtype)


def ordered_marker(comfy_name: str, fields: dict[str, Any], **common: Any) -> dict[str, Any]:
    """A marker with ``format`` first, the common keys (``orig_dtype``, ``orig_shape``,
    ``full_precision_matrix_mult``; ``None`` / ``False`` left out) and the format's ``fields``, in
    ``MARKER_KEY_ORDER`` and then the format's own order."""
    merged = {k: v for k, v in common.items() if v is not None and v is not False}
    merged.update(fields)
    marker: dict[str, Any] = {"format": comfy_name}
    for key in MARKER_KEY_ORDER[1:]:
        if key in merged:
            marker[key] = merged.pop(key)
    marker.update(merged)
    return marker


def require(tensors: dict[str, torch.Tensor], suffix: str, where: str) -> torch.Tensor:
    """The stored tensor ``where + suffix``; ``ComfyFormatError`` naming it if the file lacks it."""
    if suffix not in tensors:
        raise ComfyFormatError(f"{where}{suffix}: missing (the layer's .comfy_quant marker says it is quantized)")
    return tensors[suffix]
