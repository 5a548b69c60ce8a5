"""``--verify``: reload a converted file with the independent ComfyUI reader and compare it with the input.

Checks that the quantized layers and their formats are exactly the planned ones, that every kept tensor is
byte-identical to the input, that every quantized layer dequantizes to the SQNR the converter reported, and that the
``_quantization_metadata`` header (when written) agrees with the per-layer markers.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from lrq_ao.convert import comfy_format as cf
from lrq_ao.convert.plan import ConversionPlan
from lrq_ao.convert.report import ConversionReport
from lrq_ao.convert.stream import read_tensor
from lrq_ao.primitives import sqnr

SQNR_TOLERANCE_DB = 0.01


def verify_output(plan: ConversionPlan, report: ConversionReport) -> dict[str, Any]:
    """Returns ``{"ok": bool, "problems": [...], "layers_checked": n, "tensors_checked": m}``; never raises for a
    bad output (problems are listed), only for an unreadable one (``ComfyFormatError``)."""
    from lrq_ao.convert.reader import read_comfy

    ckpt = read_comfy(report.output)
    problems: list[str] = []
    planned = {t.layer: t for t in plan.quantized}
    found = ckpt.formats()
    for layer in sorted(set(planned) ^ set(found)):
        where = "missing from the output" if layer in planned else "quantized but not planned"
        problems.append(f"layer {layer!r} is {where}")
    recorded = {r.layer: r.sqnr_db for r in report.layers}
    layers_checked = 0
    for layer, tp in planned.items():
        if layer not in found:
            continue
        if found[layer] != tp.format:
            problems.append(f"layer {layer!r}: format {found[layer]} written, {tp.format} planned")
        problems += _check_layer(plan, ckpt, layer, tp.name, recorded.get(layer))
        layers_checked += 1
    kept = [t.name for t in plan.tensors if t.action == "keep"]
    plain = set(ckpt.plain_keys())
    for name in kept:
        if name not in plain:
            problems.append(f"kept tensor {name!r} is missing from the output")
            continue
        a = read_tensor(plan.source.tensors[name])
        b = ckpt.get_tensor(name)
        if a.dtype != b.dtype or a.shape != b.shape or not _same_bytes(a, b):
            problems.append(f"kept tensor {name!r} differs from the input")
    removed = {t.name for t in plan.tensors if t.action == "remove"}
    for name in sorted(removed & plain):
        problems.append(f"tensor {name!r} should have been removed")
    problems += _check_header(ckpt, plan)
    return {
        "ok": not problems,
        "problems": problems,
        "layers_checked": layers_checked,
        "tensors_checked": len(kept),
        "reader": "lrq_ao.convert.reader.read_comfy",
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # reshape(-1) first: a 0-d tensor (a scalar kept as is) cannot be viewed as bytes of another element size
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _check_layer(plan: ConversionPlan, ckpt, layer: str, weight_name: str, recorded: float | None) -> list[str]:
    loaded = ckpt.load_layer(layer)
    original = read_tensor(plan.source.tensors[weight_name])
    value = sqnr(original, loaded.dequantize(torch.float32))
    loaded.qdata = None  # let the layer's data go before the next one is read
    if recorded is None:
        return [f"layer {layer!r} has no recorded SQNR"]
    if math.isinf(value) and math.isinf(recorded):
        return []
    if abs(value - recorded) > SQNR_TOLERANCE_DB:
        return [f"layer {layer!r}: reloaded SQNR {value:.3f} dB, converter reported {recorded:.3f} dB"]
    return []


def _check_header(ckpt, plan: ConversionPlan) -> list[str]:
    text = ckpt.metadata.get(cf.METADATA_KEY)
    if text is None:
        return [f"{cf.METADATA_KEY} header missing"] if plan.options.metadata_header and plan.quantized else []
    layers = json.loads(text).get("layers", {})
    if layers != plan.markers:
        return [f"{cf.METADATA_KEY} header disagrees with the planned per-layer markers"]
    return []
