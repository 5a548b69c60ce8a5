"""Weight formats: one file per format family owns every rule of its formats (see ``lrq_ao.formats.base``).

``FORMATS`` maps the lrq_ao format names (``LearnedRoundingConfig.format``, ``lrq-convert --format``) to format
objects; :func:`get_format` looks one up and applies a block size where the format has blocks. Adding a format =
its file (a ``WeightFormat`` subclass, its ComfyUI reader) + its test + one line in ``_FAMILIES`` below.
"""

from __future__ import annotations

import dataclasses
import importlib

from lrq_ao.formats.base import FormatError, QuantizedWeight, WeightFormat
from lrq_ao.formats.comfy import ComfyFormatError, reader_for
from lrq_ao.formats.elements import ELEMENTS, Element, element_for_dtype

# Format families, in the order their names are listed. Each module defines ``FORMATS: dict[str, WeightFormat]``.
_FAMILIES = (
    "lrq_ao.formats.scaled",
    "lrq_ao.formats.convrot",
    "lrq_ao.formats.convrot_w4a4",
    "lrq_ao.formats.mxfp8",
    "lrq_ao.formats.nvfp4",
    "lrq_ao.formats.w4a8",
)

FORMATS: dict[str, WeightFormat] = {}
for _module in _FAMILIES:
    FORMATS.update(importlib.import_module(_module).FORMATS)


def get_format(name: str | WeightFormat, block_size: int | None = None) -> WeightFormat:
    """The format called ``name`` (a ``WeightFormat`` passes through), with ``block_size`` applied where the format
    has blocks. ``ValueError`` for an unknown name, or a block size given to a format without blocks."""
    if isinstance(name, WeightFormat):
        fmt = name
    elif name in FORMATS:
        fmt = FORMATS[name]
    else:
        raise ValueError(f"unknown format {name!r}; expected one of {sorted(FORMATS)}")
    if block_size is None:
        return fmt
    if not fmt.has_blocks:
        raise ValueError(f"format {fmt.name} has no block size to choose; leave block_size unset")
    return dataclasses.replace(fmt, block=int(block_size))


__all__ = [
    "ELEMENTS",
    "FORMATS",
    "ComfyFormatError",
    "Element",
    "FormatError",
    "QuantizedWeight",
    "WeightFormat",
    "element_for_dtype",
    "get_format",
    "reader_for",
]
