"""Launch plumbing shared by the Triton kernel families; importing it needs neither Triton nor CUDA.

* ``triton_refusal()`` says why Triton cannot run here (``None`` when it can).
* ``launchable(kernel, device)`` returns the compiled kernel for CUDA tensors and an interpreted copy for CPU
  tensors. The copy is built from the kernel's Python source with every ``@triton.jit`` helper it reaches swapped
  for an interpreted one, so CPU tests run the very kernels the GPU runs even when Triton was imported before
  ``TRITON_INTERPRET=1`` was set (torchao imports Triton at ``import lrq_ao`` time, before any test conftest).
* ``m_bucket(m)`` is the autotune key for the batch dimension: ``ceil(log2(m))``, so a new batch size reuses the
  configuration tuned for its power-of-two bucket instead of re-tuning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import types

import torch

INTERPRET_ENV = "TRITON_INTERPRET"


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_requested() -> bool:
    """``TRITON_INTERPRET=1``: CPU tensors may run the Triton kernels through Triton's interpreter (tests only)."""
    return os.environ.get(INTERPRET_ENV, "0") == "1"


def triton_refusal(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (``None`` if they can)."""
    if not _triton_importable():
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpret_requested():
            return None
        return "CPU tensors run Triton kernels only through the interpreter (set TRITON_INTERPRET=1; tests only)"
    return f"Triton kernels run on CUDA devices, not {device.type}"


def fp8_compute_refusal(device: torch.device) -> str | None:
    """Why FP8 tensor-core math is unavailable on ``device`` (needs SM >= 8.9); the interpreter emulates it."""
    if device.type == "cpu":
        return None if interpret_requested() else "FP8 compute on CPU needs TRITON_INTERPRET=1 (tests only)"
    if device.type != "cuda":
        return f"FP8 compute needs a CUDA device, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"FP8 compute needs SM >= 8.9, this GPU is SM {major}.{minor}"
    return None


def m_bucket(m: int) -> int:
    """Autotune key for the batch dimension: ``ceil(log2(max(m, 1)))``."""
    return max(0, math.ceil(math.log2(max(int(m), 1))))


def check_device(name: str, *tensors: torch.Tensor) -> torch.device:
    """All ``tensors`` share one device; raise naming the op otherwise."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    reason = triton_refusal(device)
    if reason is not None:
        raise RuntimeError(f"{name}: {reason}")
    return device


def check_contiguous_last(name: str, tensor_name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(
            f"{name}: {tensor_name} must be a 2-D tensor with unit stride in its last dimension, got shape "
            f"{tuple(t.shape)} strides {t.stride()}; call .contiguous() first"
        )


def launchable(kernel, device: torch.device):
    """The object to index with a grid: the kernel itself on CUDA, an interpreted copy on CPU."""
    if device.type == "cuda":
        return kernel
    return _InterpretedLauncher(_interpreted(_raw_jit(kernel)))


class _InterpretedLauncher:
    """``launcher[grid](*args, **meta)`` runs the interpreted kernel with Triton's jit stdlib interpreted too."""

    def __init__(self, interpreted) -> None:
        self._interpreted = interpreted

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            with _interpreted_stdlib():
                return self._interpreted[grid](*args, **kwargs)

        return run


@contextlib.contextmanager
def _interpreted_stdlib():
    """Swap Triton's ``@jit`` standard library (``tl.zeros``, ``tl.max``, ...) for interpreted copies meanwhile.

    When Triton was imported without ``TRITON_INTERPRET=1`` those functions are compiled-only; the interpreter
    can run them only through such copies. Restored on exit, so compiled GPU launches are unaffected.
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    saved = []
    for owner in (tl, tl.standard, tl.tensor):
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                saved.append((owner, name, value))
                setattr(owner, name, _interpreted(value))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _raw_jit(kernel):
    """Strip ``triton.autotune`` / ``heuristics`` wrappers down to the ``@triton.jit`` function."""
    while not hasattr(kernel, "arg_names") or hasattr(kernel, "configs"):
        kernel = kernel.fn
    return kernel


@functools.cache
def _interpreted(jit_fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_rebind_to_interpreter(jit_fn.fn, {}))


def _rebind_to_interpreter(fn: types.FunctionType, memo: dict[int, object]) -> types.FunctionType:
    """A copy of ``fn`` whose globals map every ``@triton.jit`` helper to an interpreted copy (recursively)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if id(fn) in memo:
        return memo[id(fn)]
    new_globals = dict(fn.__globals__)
    copy = types.FunctionType(fn.__code__, new_globals, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__module__ = fn.__module__
    memo[id(fn)] = copy
    for name, value in fn.__globals__.items():
        if isinstance(value, JITFunction):
            new_globals[name] = InterpretedFunction(_rebind_to_interpreter(value.fn, memo))
    return copy
