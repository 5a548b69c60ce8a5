"""lrq_ao: learned-rounding 8-bit weight quantization with torch.compile-ready tensor subclasses.

Importing this package registers the tensor subclasses (so ``torch.load(weights_only=True)`` accepts them) and
tags torch.compile's caches with a digest of lrq_ao's dispatch code (``lrq_ao._compile_cache``), but neither imports
Triton nor initializes CUDA: kernels are built lazily on first use.
"""

import logging


class _DropImportNoise(logging.Filter):
    """Drops two log lines that importing torchao prints on every start and that say nothing to an lrq_ao user,
    re-logging them on the ``lrq_ao`` logger at DEBUG (``logging.getLogger("lrq_ao").setLevel("DEBUG")`` shows them):

    * torchao's ``Failed to load .../torchao/_C*.so``: its optional C++ kernels (MXFP8, CUTLASS) built for another
      torch or Python; lrq_ao never calls them (its kernels are Triton and PyTorch).
    * torch's ``<enum 'KernelPreference'> is an Enum subclass ... register_constant() ... deprecated``: a note to
      torchao's developers about a call torchao makes at import.

    Any other record of these loggers passes untouched.
    """

    def __init__(self, test):
        super().__init__()
        self.test = test

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge: let it through
            return True
        if self.test(message):
            logging.getLogger("lrq_ao").debug("(dropped at import) %s: %s", record.name, message)
            return False
        return True


def _torchao_so_noise(message: str) -> bool:
    return message.startswith("Failed to load ") and "/torchao/_C" in message and ".so" in message


def _pytree_enum_noise(message: str) -> bool:
    return "is an Enum subclass and is now natively supported" in message and "register_constant()" in message


logging.getLogger("torchao").addFilter(_DropImportNoise(_torchao_so_noise))
logging.getLogger("torch.utils._pytree").addFilter(_DropImportNoise(_pytree_enum_noise))

# lrq_ao.layouts registers Float8Tensor / Int8Tensor and their attribute types with torch.serialization.
import lrq_ao.layouts  # noqa: E402, F401
from lrq_ao._compile_cache import tag_compile_caches  # noqa: E402
from lrq_ao.config import LearnedRoundingConfig  # noqa: E402
from lrq_ao.primitives import FORMATS, FormatSpec, format_spec  # noqa: E402

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
