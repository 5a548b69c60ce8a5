"""lrq_ao: learned-rounding 8-bit weight quantization with torch.compile-ready tensor subclasses.

Importing this package registers the tensor subclasses (so ``torch.load(weights_only=True)`` accepts them) and
tags torch.compile's caches with a digest of lrq_ao's dispatch code (``lrq_ao._compile_cache``), but neither imports
Triton nor initializes CUDA: kernels are built lazily on first use.
"""

# lrq_ao.layouts registers Float8Tensor / Int8Tensor and their attribute types with torch.serialization.
import lrq_ao.layouts  # noqa: F401
from lrq_ao._compile_cache import tag_compile_caches
from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.primitives import FORMATS, FormatSpec, format_spec

tag_compile_caches()  # compiled graphs cached by other lrq_ao code are not served again (see _compile_cache)

__all__ = [
    "FORMATS",
    "FormatSpec",
    "LearnedRoundingConfig",
    "format_spec",
    "quantize_",
    "quantize_sequential",
    "calibrate",
    "load_comfy",
    "load_comfy_into",
    "Float8Tensor",
    "Int8Tensor",
]

_LAZY = {
    "quantize_": "lrq_ao.api",
    "quantize_sequential": "lrq_ao.workflows.sequential",
    "calibrate": "lrq_ao.rounding.calibration",
    "load_comfy": "lrq_ao.convert.reader",
    "load_comfy_into": "lrq_ao.convert.reader",
    "Float8Tensor": "lrq_ao.layouts",
    "Int8Tensor": "lrq_ao.layouts",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lrq_ao' has no attribute {name!r}")
