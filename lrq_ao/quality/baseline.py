"""Round-to-nearest reference for the harness, built only from ``lrq_ao.primitives``: fake-quantized MiniLM copies
(weights replaced by ``dequantize(quantize_rtn(w))``) and the measured per-format floors.

This is independent of the tensor subclasses and of ``quantize_``, so it is the oracle the floors are tested
against and the baseline learned rounding must beat.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch
from torch import nn

from lrq_ao.primitives import FORMATS, FormatSpec, dequantize, format_spec, quantize_rtn
from lrq_ao.quality.metrics import QualityReport, evaluate, weight_sqnr
from lrq_ao.quality.minilm import encoder_linear_names
from lrq_ao.quality.texts import Batch


def rtn_dequantized(weight: torch.Tensor, spec: FormatSpec, name: str = "weight") -> torch.Tensor:
    """``dequantize(quantize_rtn(weight))`` in the weight's dtype."""
    qdata, scale, block_size = quantize_rtn(weight.detach(), spec, name)
    return dequantize(qdata, scale, block_size, weight.dtype)


@torch.no_grad()
def fake_quantize_rtn(model: nn.Module, fmt: str | FormatSpec) -> nn.Module:
    """A deep copy of ``model`` whose encoder linear weights are round-to-nearest quantized then dequantized."""
    spec = format_spec(fmt) if isinstance(fmt, str) else fmt
    fake = copy.deepcopy(model)
    for name in encoder_linear_names(fake):
        linear = fake.get_submodule(name)
        linear.weight.copy_(rtn_dequantized(linear.weight, spec, name=f"{name}.weight"))
    return fake


def rtn_weight_sqnrs(model: nn.Module, fmt: str | FormatSpec) -> dict[str, float]:
    """Weight SQNR (dB) of round-to-nearest for each encoder linear."""
    spec = format_spec(fmt) if isinstance(fmt, str) else fmt
    result = {}
    for name in encoder_linear_names(model):
        w = model.get_submodule(name).weight
        result[name] = weight_sqnr(w, rtn_dequantized(w, spec, name=f"{name}.weight"))
    return result


@dataclass(frozen=True)
class Floor:
    """Round-to-nearest quality of one format on the real MiniLM weights."""

    format: str
    median_weight_sqnr: float
    min_weight_sqnr: float
    end_to_end_sqnr: float
    embedding_cosine_min: float


def measure_rtn_floors(
    model: nn.Module, formats: tuple[str, ...] = tuple(FORMATS), batches: list[Batch] | None = None
) -> list[Floor]:
    """Median/min weight SQNR over the encoder linears and end-to-end SQNR (evaluation split) for each format."""
    floors = []
    for fmt in formats:
        sqnrs = list(rtn_weight_sqnrs(model, fmt).values())
        report: QualityReport = evaluate(model, fake_quantize_rtn(model, fmt), batches, label=fmt)
        floors.append(
            Floor(fmt, statistics.median(sqnrs), min(sqnrs), report.end_to_end_sqnr, report.embedding_cosine_min)
        )
    return floors


def format_floors(floors: list[Floor]) -> str:
    lines = [f"{'format':<12} {'median weight dB':>16} {'min weight dB':>13} {'end-to-end dB':>13} {'min emb cos':>11}"]
    lines += [
        f"{f.format:<12} {f.median_weight_sqnr:16.2f} {f.min_weight_sqnr:13.2f} {f.end_to_end_sqnr:13.2f} "
        f"{f.embedding_cosine_min:11.5f}"
        for f in floors
    ]
    return "\n".join(lines)
