"""The registry of linear backends: a leaf that the tensor class, the built-in backends and the Triton backends import.

A ``LinearBackend`` names its ``KernelChoice`` family, a ``supports(x, weight, bias)`` that returns ``None`` when it
can run the input or a sentence saying why not, ``run(x, weight, bias)``, and optionally ``note(x, weight, traced)``,
a line ``describe`` adds about the route it takes for this input (``traced``: selected as a ``torch.compile`` call).
``select_linear_backend`` honours ``weight.kernel``: ``AUTO`` takes the usable backend of highest priority; ``TORCH``
/ ``EMULATED`` / ``TRITON`` only consider that family and raise, listing every refusal, if none fits. No backend is
tried and abandoned on failure: the choice is made from declarations, never from exceptions.

Selection reads dtypes, devices, static sizes (K, N) and the weight's metadata (its format above all), never the
batch size M, which is symbolic under ``torch.compile(dynamic=True)``. The built-in backends register from
``lrq_ao.layouts.linear``; the Triton ones from ``lrq_ao.layouts.triton_backends`` and (packed 4-bit codes)
``lrq_ao.layouts.packed_backends``, imported at the first eager selection or construction (``ensure_plugin_backends``),
never at ``import lrq_ao``: they reach ``lrq_ao.kernels``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lrq_ao.layouts.activation import KernelChoice

# A quantized weight tensor (``lrq_ao.layouts.base.QuantizedWeightTensor``). Not imported, even for type checking:
# base imports this module, and the registry needs only the tensor's attributes (fmt, kernel, act, shape).
QuantizedWeightTensor = Any

PLUGIN_MODULES = ("lrq_ao.layouts.triton_backends", "lrq_ao.layouts.packed_backends")

Supports = Callable[[torch.Tensor, "QuantizedWeightTensor", "torch.Tensor | None"], "str | None"]
Run = Callable[[torch.Tensor, "QuantizedWeightTensor", "torch.Tensor | None"], torch.Tensor]
Note = Callable[[torch.Tensor, "QuantizedWeightTensor", bool], "str | None"]


@dataclass(frozen=True)
class LinearBackend:
    """One way to run ``y = x @ W.T + bias`` for a quantized ``W``.

    supports(x, weight, bias) -> None if usable, else the reason it refuses.
    run(x, weight, bias) -> the output, shape ``(*x.shape[:-1], N)`` in ``x.dtype``. ``x`` arrives in the basis the
        weight's codes are stored in (``weight.fmt.rotate_input`` in ``x.dtype``, for a rotating format) unless
        ``rotates_input``.
    note(x, weight, traced) -> an extra line for ``describe`` (the route taken for this input), or None.
    rotates_input: the backend receives ``x`` as given and applies the format's rotation itself (fused into its
        activation quantization, or in float32 before quantizing); otherwise ``quantized_linear`` rotates ``x`` first.
    """

    name: str
    kernel: KernelChoice
    supports: Supports
    run: Run
    note: Note | None = None
    rotates_input: bool = False


_BACKENDS: list[tuple[int, LinearBackend]] = []
_plugins_loaded = False


def register_linear_backend(backend: LinearBackend, priority: int) -> None:
    """Add (or replace, by name) a backend; a higher ``priority`` wins under ``KernelChoice.AUTO``."""
    _BACKENDS[:] = [(p, b) for p, b in _BACKENDS if b.name != backend.name]
    _BACKENDS.append((priority, backend))
    _BACKENDS.sort(key=lambda pb: -pb[0])


def unregister_linear_backend(name: str) -> None:
    """Remove the backend called ``name`` (no error if absent)."""
    _BACKENDS[:] = [(p, b) for p, b in _BACKENDS if b.name != name]


def registered_backends() -> list[LinearBackend]:
    """Backends in priority order (highest first)."""
    return [b for _, b in _BACKENDS]


def ensure_plugin_backends() -> None:
    """Import the optional backend modules once, outside compiled code (an import cannot be traced)."""
    global _plugins_loaded
    if _plugins_loaded or torch.compiler.is_compiling():
        return
    _plugins_loaded = True
    for module in PLUGIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def select_linear_backend(
    x: torch.Tensor, weight: QuantizedWeightTensor, bias: torch.Tensor | None = None
) -> tuple[LinearBackend, list[tuple[str, str]]]:
    """The backend that will run ``F.linear(x, weight, bias)`` and the ``(name, reason)`` of each refusal.

    Raises ``ValueError`` for mismatched shapes and ``RuntimeError`` listing the refusals if no backend allowed by
    ``weight.kernel`` can run it.
    """
    ensure_plugin_backends()
    _check_linear_shapes(x, weight, bias)
    wanted = weight.kernel
    refusals: list[tuple[str, str]] = []
    for backend in registered_backends():
        if wanted is not KernelChoice.AUTO and backend.kernel is not wanted:
            continue
        reason = backend.supports(x, weight, bias)
        if reason is None:
            return backend, refusals
        refusals.append((backend.name, reason))
    detail = "; ".join(f"{name}: {reason}" for name, reason in refusals) or "no backend of that kind is registered"
    raise RuntimeError(
        f"no linear backend of kind {wanted.value!r} can run a {type(weight).__name__} ({weight.fmt.name}, "
        f"{weight.layout_name}, act={weight.act}) on {x.device} with {x.dtype} input: {detail}. Set kernel='auto' "
        f"to fall back to the best usable backend"
    )


def describe_selection(x: torch.Tensor, weight: QuantizedWeightTensor, bias: torch.Tensor | None = None) -> str:
    """The backend an input like ``x`` takes when run, every refusal, the backends' notes on their route, and a line
    naming the backend inside ``torch.compile`` when that differs (selected as a traced call: a fake copy of ``x``)."""
    backend, refusals = select_linear_backend(x, weight, bias)
    lines = [
        f"{type(weight).__name__} {weight.fmt.name} {weight.layout_name} act={weight.act} kernel={weight.kernel}: "
        f"{backend.name}"
    ]
    lines += [f"  {name} refused: {reason}" for name, reason in refusals]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_x = mode.from_tensor(x)
        traced, _ = select_linear_backend(fake_x, weight, bias)
    if traced.name != backend.name:
        lines.append(f"  under torch.compile: {traced.name}")
    notes = [backend.note(x, weight, False) if backend.note else None]
    notes.append(traced.note(x, weight, True) if traced.note else None)
    notes += [rotation_note(x, weight, chosen) for chosen in (backend, traced)]
    lines += [f"  {n}" for i, n in enumerate(notes) if n is not None and n not in notes[:i]]
    return "\n".join(lines)


def rotation_note(x: torch.Tensor, weight: QuantizedWeightTensor, backend: LinearBackend) -> str | None:
    """``describe``'s line on how a rotating format's ``x`` reaches a backend that does not rotate it itself."""
    if not weight.fmt.rotates or backend.rotates_input:
        return None
    dtype = str(x.dtype).removeprefix("torch.")
    return f"{weight.fmt.name}: x rotated first (fmt.rotate_input, in {dtype}), then {backend.name}"


def _check_linear_shapes(x: torch.Tensor, weight: QuantizedWeightTensor, bias: torch.Tensor | None) -> None:
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: input has {x.shape[-1]} features but the quantized weight expects {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"linear: bias must have shape ({n},), got {tuple(bias.shape)}")
