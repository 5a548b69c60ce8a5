"""``quantize_(model, config)``: replace every eligible ``nn.Linear`` weight by a quantized tensor.

Each group of same-shape weights goes through ``lrq_ao.rounding.quantize_weights`` (round-to-nearest or learned
rounding, with each layer's calibration statistics when ``config.calibration`` holds them; the rounding decides
which weights it rounds together), each result is wrapped by
``make_weight_tensor`` with the activation mode and kernel choice of the config, and replaces ``module.weight`` as a
frozen parameter. A bias correction returned by the rounding (``bias ← bias − bias_delta``) is applied, creating
a zero bias if the layer had none. Layers that cannot take the format (a block that does not tile the weight, a
weight on the meta device, one already quantized) are left as they are and listed with the reason in the returned
report: never quantized under a different layout than the one asked for.

``LearnedRoundingConfig`` is also registered with torchao, so ``torchao.quantization.quantize_(model, config)``
works; that path returns no report (torchao's API returns nothing) and warns for each layer it leaves alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchao.quantization.transform_module import register_quantize_module_handler

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.layouts import KernelChoice, QuantizedWeightTensor, activation_mode_for, weight_tensor
from lrq_ao.primitives import sqnr

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class QuantizationReport:
    """What ``quantize_`` did: one dict per quantized layer (the rounding's report plus layout facts) and the
    ``(name, reason)`` of every ``nn.Linear`` it left alone. ``str(report)`` is a table."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        header = ("layer", "shape", "format", "activation", "objective", "SQNR dB", "out dB RTN", "out dB", "moved %")
        header += ("seconds",)
        rows = [header] + [_layer_row(layer) for layer in self.layers]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.layers)} quantized, {len(self.skipped)} skipped")
        # Why say it: the held-out columns are easy to mistake for the (optimistic) fitted output SQNR.
        lines.append("SQNR dB: weight; out dB: layer output on held-out calibration calls, round-to-nearest and final")
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _layer_row(layer: dict[str, Any]) -> tuple[str, ...]:
    moved = layer.get("moved_fraction")
    seconds = layer.get("seconds")
    return (
        str(layer.get("name", "")),
        "x".join(str(d) for d in layer.get("shape", ())),
        str(layer.get("format", "")),
        str(layer.get("activation", "")),
        str(layer.get("objective", "")),
        _fmt(layer.get("weight_sqnr_db"), "{:.2f}"),
        _fmt(layer.get("output_sqnr_heldout_rtn_db"), "{:.2f}"),
        _fmt(layer.get("output_sqnr_heldout_db"), "{:.2f}"),
        "-" if moved is None else f"{100 * moved:.1f}",
        _fmt(seconds, "{:.2f}"),
    )


def _fmt(value: float | None, pattern: str) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else pattern.format(value)


def skip_reason(module: nn.Module, config: LearnedRoundingConfig) -> str | None:
    """Why ``module`` cannot take ``config``'s format (``None`` if it can). Only ``nn.Linear`` is considered."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    weight = module.weight
    if isinstance(weight, QuantizedWeightTensor):
        return f"already quantized ({type(weight).__name__}, {weight.layout_name})"
    if weight.is_meta:
        return "weight is on the meta device; load real weights before quantizing"
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {weight.dtype} is not float32/bfloat16/float16"
    return config.spec.refusal(weight.shape)


def quantize_module(module: nn.Linear, config: LearnedRoundingConfig, name: str, stats: Any = None) -> dict:
    """Quantize one eligible linear in place; returns its report row. NaN/Inf weights raise ``ValueError``."""
    from lrq_ao.rounding import quantize_weight

    weight = module.weight.detach()
    result = quantize_weight(weight, config, name=f"{name}.weight" if name else "weight", stats=stats)
    return install_rounded(module, config, name, result)


def install_rounded(module: nn.Linear, config: LearnedRoundingConfig, name: str, result: Any) -> dict:
    """Replace ``module.weight`` by the quantized tensor of ``result`` (a ``RoundedWeight`` of that weight), apply
    its bias correction, and return the layer's report row."""
    weight = module.weight.detach()
    exact = config.activation_quant == "exact"
    fmt = config.spec
    act = activation_mode_for(config.activation, fmt, result.block_size, weight.shape, exact)
    qw = result.quantized_weight()
    qweight = weight_tensor(fmt, qw, weight.dtype, act=act, kernel=KernelChoice(config.kernel), name=name or "weight")
    _apply_bias_delta(module, getattr(result, "bias_delta", None), weight)
    module.weight = nn.Parameter(qweight, requires_grad=False)
    layer = dict(result.report)
    layer.update(name=name, shape=tuple(weight.shape), format=config.format, block_size=result.block_size)
    layer.update(activation=str(act), kernel=config.kernel)
    if "weight_sqnr_db" not in layer:
        layer["weight_sqnr_db"] = sqnr(weight, qweight.dequantize(torch.float32))
    return layer


def _apply_bias_delta(module: nn.Linear, bias_delta: torch.Tensor | None, weight: torch.Tensor) -> None:
    if bias_delta is None:
        return
    if module.bias is None:
        old = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    else:
        old = module.bias.detach()
    new = (old.float() - bias_delta.to(device=old.device, dtype=torch.float32)).to(old.dtype)
    module.bias = nn.Parameter(new, requires_grad=False if module.bias is None else module.bias.requires_grad)


def quantize_(model: nn.Module, config: LearnedRoundingConfig, filter_fn: FilterFn | None = None) -> QuantizationReport:
    """Quantize, in place, every ``nn.Linear`` of ``model`` that ``filter_fn(module, name)`` accepts (default:
    all) and whose weight the format can hold. Returns a ``QuantizationReport``.

    The weights go to ``lrq_ao.rounding.quantize_weights`` one (shape, device, dtype) group at a time, which rounds
    same-shape weights together where its method allows (the svd objective with the parallel relaxation, without
    calibration data).

    Raises ``ValueError`` naming the weight if one holds NaN/Inf, and ``TypeError`` if ``config`` is not a
    ``LearnedRoundingConfig``.
    """
    if not isinstance(config, LearnedRoundingConfig):
        raise TypeError(f"quantize_ needs a LearnedRoundingConfig, got {type(config).__name__}")
    report = QuantizationReport()
    todo: list[tuple[str, nn.Linear]] = []  # the layers to quantize, in model order
    ties: list[tuple[nn.Linear, nn.Linear]] = []  # (module, the earlier module whose weight it shares)
    first_of: dict[int, tuple[str, nn.Linear]] = {}  # id(original weight) -> the layer that quantizes it
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            report.skipped.append((name, "excluded by filter_fn"))
            continue
        if id(module.weight) in first_of:  # a tied weight is quantized once and stays tied
            first, owner = first_of[id(module.weight)]
            ties.append((module, owner))
            report.skipped.append((name, f"shares its weight with {first}, quantized there"))
            continue
        reason = skip_reason(module, config)
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        first_of[id(module.weight)] = (name, module)
        todo.append((name, module))
    report.layers = _quantize_by_shape(todo, config)
    for module, owner in ties:
        module.weight = owner.weight
    return report


def _quantize_by_shape(todo: list[tuple[str, nn.Linear]], config: LearnedRoundingConfig) -> list[dict]:
    """Round each (shape, device, dtype) group of weights with one ``quantize_weights`` call and install the results
    group by group (so only one group's new tensors exist beside the old weights); rows come back in model order."""
    from lrq_ao.rounding import quantize_weights, stats_for

    groups: dict[tuple, list[int]] = {}
    for i, (_, module) in enumerate(todo):
        w = module.weight
        groups.setdefault((tuple(w.shape), str(w.device), w.dtype), []).append(i)
    rows: list[dict | None] = [None] * len(todo)
    for members in groups.values():
        weights = [todo[i][1].weight.detach() for i in members]
        names = [f"{todo[i][0]}.weight" for i in members]
        stats = [stats_for(config.calibration, *todo[i]) for i in members]
        results = quantize_weights(weights, config, names=names, stats=stats)
        del weights
        for i, result in zip(members, results):
            name, module = todo[i]
            rows[i] = install_rounded(module, config, name, result)
    return rows


@register_quantize_module_handler(LearnedRoundingConfig)
def _torchao_handler(module: nn.Module, config: LearnedRoundingConfig, **kwargs) -> nn.Module:
    """torchao's per-module entry: torchao passes no module name, so calibration cannot be matched here."""
    if config.calibration is not None:
        raise ValueError(
            "torchao.quantization.quantize_ does not tell handlers the module's name, so calibration statistics "
            "cannot be matched to layers; call lrq_ao.quantize_(model, config) for calibrated quantization"
        )
    reason = skip_reason(module, config)
    if reason is not None:
        warnings.warn(f"lrq_ao: left a {type(module).__name__} unquantized: {reason}", stacklevel=2)
        return module
    quantize_module(module, config, "", None)
    return module
