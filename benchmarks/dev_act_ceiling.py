"""The end-to-end SQNR a W8A8 run of bench_quality.py can reach at best: float weights, activations quantized only.

    python benchmarks/dev_act_ceiling.py                       # int8, int8_convrot, fp8_row
    python benchmarks/dev_act_ceiling.py --formats int8_convrot --rotation-group 16

Development probe for issue 15 (INT8 ConvRot, W8A8 with dynamic activations). Every encoder linear of MiniLM-L6 keeps
its float32 weight; a forward pre-hook replaces its input ``x`` by what the format's dynamic activation mode computes
from it, taken back to the float basis: ``x_rot = fmt.rotate_input(x)`` (identity for the unrotated formats), the
format's activation mode (``activation_mode_for("dynamic", ...)``: per token for these formats) quantized and
dequantized with ``lrq_ao.layouts.activation.quantize_activation`` (the reference the product path's exact mode is
bit-identical to), then un-rotated (``x_rot Hblkᵀ``; ``Hblk`` is orthogonal). The weight error is zero, so the SQNR
of the final hidden state against float32 on bench_quality's evaluation split is the ceiling that no rounding of the
weight alone can pass (the two errors are nearly independent, so their noise powers add). Emulated with hooks, not
the product path's linear: float32 matmul of dequantized activations, which is what the CPU path computes up to
summation order.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.layouts import activation_mode_for
from lrq_ao.layouts.activation import quantize_activation
from lrq_ao.quality.metrics import evaluate
from lrq_ao.quality.minilm import load_minilm
from lrq_ao.quality.texts import evaluation_batches


def activation_round_trip(fmt, x: torch.Tensor) -> torch.Tensor:
    """``x`` after the format's dynamic activation quantization, dequantized and rotated back to ``x``'s basis."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).float()
    xr = fmt.rotate_input(x2d) if fmt.rotates else x2d
    mode = activation_mode_for("dynamic", fmt, fmt.block_size_for((1, shape[-1])), (1, shape[-1]))
    xq, scale = quantize_activation(xr, fmt.kernel_dtype, mode)
    if mode.granularity == "block":
        scale = scale.repeat_interleave(mode.block, dim=1)
    back = xq.float() * scale
    if fmt.rotates:
        back = fmt.unrotate_weight(back)  # x_rot Hblkᵀ, the same per-group product as for a weight
    return back.reshape(shape).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="int8,int8_convrot,fp8_row")
    ap.add_argument("--rotation-group", type=int, default=64)
    args = ap.parse_args()
    model_fp, eval_batches = load_minilm(), evaluation_batches()
    for name in args.formats.split(","):
        block = {"block_size": args.rotation_group} if LearnedRoundingConfig(format=name).spec.rotates else {}
        fmt = LearnedRoundingConfig(format=name, **block).spec
        model = load_minilm()
        for layer, module in model.named_modules():
            if layer.startswith("encoder.") and isinstance(module, nn.Linear):
                module.register_forward_pre_hook(lambda m, args, fmt=fmt: (activation_round_trip(fmt, args[0]),))
        db = evaluate(model_fp, model, eval_batches).end_to_end_sqnr
        print(f"{name:<13} float weights, dynamic activations only: {db:.2f} dB", flush=True)


if __name__ == "__main__":
    main()
