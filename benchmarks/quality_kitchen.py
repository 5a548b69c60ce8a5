"""bench_quality.py's ``kitchen`` method and its per-format run settings (activation mode, rotation group).

``kitchen``: every encoder linear is quantized by comfy-kitchen 0.2.40's own quantizer for the format (its eager
backend, on CPU, given the float32 weight as is), the layer's tensors are taken from kitchen's ``state_dict`` under
ComfyUI's suffixes with the marker ComfyUI writes for them (``comfy/ops.py`` ``_quantized_weight_state_dict``, see
/work/shared/FORMAT.md), read back by the format's ComfyUI reader (``lrq_ao.formats.reader_for``) and installed with
``lrq_ao.layouts.weight_tensor`` under the run's activation mode. So a kitchen row runs through exactly the product
path the rounding methods' rows do; only the stored codes and scales are kitchen's.

Kitchen quantizers used (``QuantizedTensor.from_float(w, layout, **kw)``):

  int8          TensorWiseINT8Layout, per_channel=True (``quantize_int8_rowwise``: amax / 127 per row, RNE)
  int8_tensor   TensorWiseINT8Layout (``quantize_int8_tensorwise``)
  int8_convrot  TensorWiseINT8Layout, per_channel=True, convrot=True, convrot_groupsize=G
  fp8           TensorCoreFP8Layout (amax / 448 per tensor)
  mxfp8         TensorCoreMXFP8Layout (E8M0 power-of-two scale per 32, rounded up)
  nvfp4         TensorCoreNVFP4Layout (global amax / 2688, E4M3 scale per 16, E2M1 RNE)
  convrot_w4a4  TensorCoreConvRotW4A4Layout, convrot_groupsize=G (per-row absmax / 7, symmetric INT4)
  w4a8          AsymW4A8Int8Layout, group_size=16, convrot_groupsize=G (codebook chosen by a kurtosis gate, per-group
                scale by two ALS passes, fp8 relative group scales): kitchen's asym_w4a8_int8 quantizer

fp8_row, fp8_block and int8_block have no kitchen quantizer (its FP8 layout is per-tensor, its INT8 layout per-tensor or
per-row): "n/a".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.formats import FORMATS, WeightFormat, reader_for
from lrq_ao.layouts import KernelChoice, activation_mode_for, weight_tensor
from lrq_ao.quality.metrics import evaluate

KITCHEN = "kitchen"
# A shape every MiniLM encoder linear tiles like (K = 384 and 1536 are multiples of 64 and 16), to ask a format
# whether it has a dynamic activation mode before quantizing anything.
PROBE_SHAPE = (384, 384)


def _int8(fmt: WeightFormat) -> tuple[str, dict, dict]:
    return "TensorWiseINT8Layout", {"per_channel": True}, {"format": "int8_tensorwise"}


def _int8_tensor(fmt: WeightFormat) -> tuple[str, dict, dict]:
    return "TensorWiseINT8Layout", {}, {"format": "int8_tensorwise"}


def _int8_convrot(fmt: WeightFormat) -> tuple[str, dict, dict]:
    kw = {"per_channel": True, "convrot": True, "convrot_groupsize": fmt.block}
    return "TensorWiseINT8Layout", kw, {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": fmt.block}


def _fp8(fmt: WeightFormat) -> tuple[str, dict, dict]:
    return "TensorCoreFP8Layout", {}, {"format": "float8_e4m3fn"}


def _mxfp8(fmt: WeightFormat) -> tuple[str, dict, dict]:
    return "TensorCoreMXFP8Layout", {}, {"format": "mxfp8"}


def _nvfp4(fmt: WeightFormat) -> tuple[str, dict, dict]:
    return "TensorCoreNVFP4Layout", {}, {"format": "nvfp4"}


def _convrot_w4a4(fmt: WeightFormat) -> tuple[str, dict, dict]:
    kw = {"convrot_groupsize": fmt.block}
    return "TensorCoreConvRotW4A4Layout", kw, {"format": "convrot_w4a4", "convrot_groupsize": fmt.block}


def _w4a8(fmt: WeightFormat) -> tuple[str, dict, dict]:
    kw = {"group_size": fmt.group, "convrot_groupsize": fmt.block}
    return "AsymW4A8Int8Layout", kw, {"format": "asym_w4a8_int8"} | kw


# lrq_ao format name -> (kitchen layout name, its quantize kwargs, the ComfyUI marker) for that format object.
KITCHEN_QUANTIZERS: dict[str, Callable[[WeightFormat], tuple[str, dict, dict]]] = {
    "int8": _int8,
    "int8_tensor": _int8_tensor,
    "int8_convrot": _int8_convrot,
    "fp8": _fp8,
    "mxfp8": _mxfp8,
    "nvfp4": _nvfp4,
    "convrot_w4a4": _convrot_w4a4,
    "w4a8": _w4a8,
}


def run_fields(fmt_name: str, args: Any) -> dict:
    """Config fields every method of a run shares: the activation mode, and the rotation group of a rotating format
    (its default 256 does not divide MiniLM's K = 384, so ``quantize_`` would skip 30 of the 36 linears)."""
    if fmt_name not in FORMATS:
        raise SystemExit(f"--formats: unknown format {fmt_name!r}; expected names of {sorted(FORMATS)}")
    fields = {"activation": args.activation}
    if FORMATS[fmt_name].rotates:
        fields["block_size"] = args.rotation_group
    return fields


def run_format(fmt_name: str, args: Any) -> WeightFormat:
    """The format object a run of ``fmt_name`` quantizes to (the rotation group applied)."""
    return LearnedRoundingConfig(format=fmt_name, objective="rtn", **run_fields(fmt_name, args)).spec


def not_applicable(method: str, fmt_name: str, args: Any) -> str | None:
    """Why ``method`` cannot run on ``fmt_name`` under the run's activation mode (``None`` if it can)."""
    fmt = run_format(fmt_name, args)
    if args.activation == "dynamic":
        try:
            activation_mode_for("dynamic", fmt, fmt.block_size_for(PROBE_SHAPE), PROBE_SHAPE)
        except ValueError as e:
            return f"no dynamic activations: {e}"
    if method == KITCHEN and fmt_name not in KITCHEN_QUANTIZERS:
        return f"comfy-kitchen 0.2.40 has no {fmt.name} quantizer (FP8: per-tensor only; INT8: per-tensor or per-row)"
    return None


def kitchen_layer(w: torch.Tensor, fmt: WeightFormat, fmt_name: str, where: str):
    """Kitchen's quantizer on ``w``, read back through the format's ComfyUI reader: ``(format, QuantizedWeight)``.
    Raises ``RuntimeError`` if the reader returns another format than the run's (a marker or layout mismatch)."""
    from comfy_kitchen.tensor import QuantizedTensor

    layout, kwargs, marker = KITCHEN_QUANTIZERS[fmt_name](fmt)
    stored = QuantizedTensor.from_float(w, layout, **kwargs).state_dict("weight")
    tensors = {"." + key: tensor for key, tensor in stored.items()}
    read_fmt, qw = reader_for(marker["format"])(marker, tensors, where)
    if read_fmt.name != fmt.name or type(read_fmt) is not type(fmt):
        raise RuntimeError(f"{where}: kitchen's {layout} tensors read back as {read_fmt.name}, not {fmt.name}")
    return read_fmt, qw


def quantize_with_kitchen(load_model, model_fp, eval_batches, fmt_name: str, args: Any, rtn_db: float | None) -> dict:
    """Quantize a fresh model's encoder linears with kitchen's quantizer, print bench_quality's row and return it.

    "moved %" is the share of weights whose stored-basis value differs from lrq_ao's round-to-nearest."""
    cfg = LearnedRoundingConfig(format=fmt_name, objective="rtn", **run_fields(fmt_name, args))
    fmt = cfg.spec
    model_q = load_model()
    moved = []
    t0 = time.perf_counter()
    for name, module in model_q.named_modules():
        if not (name.startswith("encoder.") and isinstance(module, nn.Linear)):
            continue
        w = module.weight.detach()
        read_fmt, qw = kitchen_layer(w, fmt, fmt_name, name)
        rtn = fmt.dequantize(fmt.quantize(w, name))
        moved.append(float((read_fmt.dequantize(qw) != rtn).float().mean()))
        act = activation_mode_for(cfg.activation, read_fmt, qw.block_size, w.shape, cfg.activation_quant == "exact")
        qweight = weight_tensor(read_fmt, qw, w.dtype, act=act, kernel=KernelChoice(cfg.kernel), name=name)
        module.weight = nn.Parameter(qweight, requires_grad=False)
    seconds = time.perf_counter() - t0
    db = evaluate(model_fp, model_q, eval_batches).end_to_end_sqnr
    moved_pct = 100 * sum(moved) / len(moved)
    delta = "" if rtn_db is None else f"{db - rtn_db:+.2f}"
    print(f"{fmt_name:<13}{KITCHEN:<11}{db:>12.2f}{delta:>8}{moved_pct:>9.1f}{0:>9}{seconds:>9.1f}", flush=True)
    row = {"format": fmt_name, "method": KITCHEN, "e2e_sqnr_db": round(db, 3), "moved_pct": round(moved_pct, 2)}
    return row | {"kept_rtn_layers": 0, "seconds": round(seconds, 2)}
