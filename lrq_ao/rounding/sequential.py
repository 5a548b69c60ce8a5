"""Sequential quantization: each stage of linears is rounded against the float model, on the inputs the already
quantized stages actually produce.

Plain calibration rounds every layer for the float model's inputs. Here the model is quantized stage by stage
(a stage = the linears that read one input tensor, e.g. q/k/v), in forward order; before each stage the
calibration set runs through the float reference and the partially quantized model together, so each layer's
objective is its output error against the *float* model's output, ``‖(W + E) x_q − W x_ref‖`` — the rounding can
compensate part of the error that earlier layers left in its input. It costs one pass over the calibration set
per stage.

    report = quantize_sequential(model, LearnedRoundingConfig(format="int8"), batches,
                                 forward=lambda m, b: m(**b), token_mask=lambda b: b["attention_mask"])
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.rounding.calibration import calibrate

Forward = Callable[[nn.Module, Any], Any]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def linear_stages(model: nn.Module, batch: Any, forward: Forward = _default_forward, filter_fn=None) -> list[list[str]]:
    """Names of the (accepted) linears grouped by the input tensor they read, in the order they first run."""
    order: list[str] = []
    by_input: dict[int, list[str]] = {}
    keep_alive: list[torch.Tensor] = []
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (filter_fn is None or filter_fn(mod, name)):

            def hook(mod, args, name=name):
                x = args[0]
                if name in order:
                    return
                order.append(name)
                keep_alive.append(x)
                by_input.setdefault(id(x), []).append(name)

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    stages, placed = [], set()
    for name in order:
        if name in placed:
            continue
        group = next(g for g in by_input.values() if name in g)
        stages.append(group)
        placed.update(group)
    return stages


def quantize_sequential(
    model: nn.Module,
    config: LearnedRoundingConfig,
    batches: Sequence[Any],
    *,
    forward: Forward = _default_forward,
    token_mask: Callable[[Any], torch.Tensor | None] | None = None,
    filter_fn=None,
):
    """Quantize ``model`` in place, stage by stage, against a float copy of itself; returns the
    ``QuantizationReport`` of ``lrq_ao.quantize_`` for all stages. ``forward(model, batch)`` runs one batch
    (default: ``model(**batch)`` for dicts, ``model(*batch)`` for tuples); ``token_mask(batch)`` returns the
    (B, T) mask of tokens to calibrate on (None: every token). Linears that never run are quantized without
    calibration statistics, as ``quantize_`` would."""
    from lrq_ao.api import QuantizationReport, quantize_

    if not batches:
        raise ValueError("quantize_sequential needs at least one calibration batch")
    reference = copy.deepcopy(model).eval()
    stages = linear_stages(model, batches[0], forward, filter_fn)
    total = QuantizationReport()
    done: set[str] = set()
    for stage in stages:
        names = set(stage)
        accept = lambda m, n, names=names: n in names  # noqa: E731
        with calibrate(model, filter_fn=accept, reference=reference) as calib:
            for batch in batches:
                calib.token_mask = token_mask(batch) if token_mask is not None else None
                forward(reference, batch)
                forward(model, batch)
        part = quantize_(model, dataclasses.replace(config, calibration=calib), filter_fn=accept)
        total.layers.extend(part.layers)
        done.update(names)
    rest = lambda m, n: n not in done and (filter_fn is None or filter_fn(m, n))  # noqa: E731
    # Linears that never ran have no statistics: round them to nearest unless the objective needs no data.
    objective = "rtn" if config.objective in ("output", "act_svd") else config.objective
    part = quantize_(model, dataclasses.replace(config, calibration=None, objective=objective), filter_fn=rest)
    total.layers.extend(part.layers)
    total.skipped.extend((n, r) for n, r in part.skipped if r != "excluded by filter_fn")
    return total
