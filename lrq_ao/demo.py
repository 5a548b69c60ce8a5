"""``make demo``: quantize the real MiniLM-L6 text encoder with every lrq_ao layout and show what it costs.

For each format the float32 model is copied and quantized with ``lrq_ao.quantize_``; the table gives the median and
worst weight SQNR over the 36 encoder linears, the end-to-end SQNR of the final hidden state on held-out text, the
worst cosine similarity between float and quantized sentence embeddings (mean-pooled, as all-MiniLM-L6-v2), and
the bytes of the linear weights (qdata + scales) against float32 and bfloat16. Then one quantized model runs one
forward under ``torch.compile(fullgraph=True)`` and is checked against its eager output. Then FP8 and INT8 are
quantized again with calibrated learned rounding and compared with round-to-nearest. Last, the packaged checkpoint
is converted to ComfyUI's stock formats with the converter (``lrq_ao.convert.convert_checkpoint``, the same code as
``lrq-convert``), verified, read back into a meta-device model with ``lrq_ao.load_comfy_into`` and run.

    python -m lrq_ao.demo                                # all six formats, then learned rounding (CPU: ~2 min)
    python -m lrq_ao.demo --objective svd --num-iter 100 # learned rounding without calibration data
    python -m lrq_ao.demo --objective output --calibrate # learned rounding on calibration text statistics

With an objective other than ``rtn`` the table adds the round-to-nearest end-to-end SQNR for comparison.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch

from lrq_ao.config import OBJECTIVES, LearnedRoundingConfig
from lrq_ao.primitives import FORMATS, sqnr
from lrq_ao.quality.baseline import fake_quantize_rtn
from lrq_ao.quality.metrics import QualityReport, evaluate, format_table, model_bytes
from lrq_ao.quality.minilm import MiniLM, encoder_linear_names, load_minilm
from lrq_ao.quality.texts import Batch, calibrate_on_text, evaluation_batches
from lrq_ao.rounding.objectives import needs_calibration

MB = 1e6


@dataclass
class DemoRow:
    format: str
    report: QualityReport
    linear_mb: float
    model_mb: float
    seconds: float
    model: MiniLM
    rtn_end_to_end_sqnr: float | None = None  # the round-to-nearest baseline, when another objective ran


def quantize_copy(model: MiniLM, config: LearnedRoundingConfig) -> tuple[MiniLM, float]:
    """A quantized deep copy of ``model`` and the seconds ``quantize_`` took."""
    from lrq_ao.api import quantize_

    quantized = copy.deepcopy(model)
    start = time.perf_counter()
    quantize_(quantized, config)
    return quantized, time.perf_counter() - start


def run_formats(model: MiniLM, args: argparse.Namespace, batches: list[Batch], calibration) -> list[DemoRow]:
    rows = []
    names = encoder_linear_names(model)
    for fmt in args.formats:
        config = LearnedRoundingConfig(
            format=fmt, objective=args.objective, num_iter=args.num_iter, calibration=calibration
        )
        quantized, seconds = quantize_copy(model, config)
        report = evaluate(model, quantized, batches, label=fmt)
        linear_mb, model_mb = model_bytes(quantized, names) / MB, model_bytes(quantized) / MB
        rtn = None
        if args.objective != "rtn":
            rtn = evaluate(model, fake_quantize_rtn(model, fmt), batches).end_to_end_sqnr
        rows.append(DemoRow(fmt, report, linear_mb, model_mb, seconds, quantized, rtn))
        print(f"  {fmt:<12} quantized in {seconds:5.1f} s", flush=True)
    return rows


def bfloat16_reference(model: MiniLM, batches: list[Batch]) -> QualityReport:
    """The same metrics for the encoder linears' weights rounded to bfloat16 (what a bf16 checkpoint keeps)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name in encoder_linear_names(rounded):
            weight = rounded.get_submodule(name).weight
            weight.copy_(weight.to(torch.bfloat16).float())
    return evaluate(model, rounded, batches, label="bfloat16")


def format_rows(rows: list[DemoRow], bf16: QualityReport, fp32_linear_mb: float, fp32_model_mb: float) -> str:
    header = (
        f"{'format':<12} {'weight dB (median)':>18} {'(min)':>7} {'end-to-end dB':>13} {'emb cos (min)':>13} "
        f"{'linears MB':>10} "
        f"{'model MB':>9} {'quantize s':>10}"
    )
    with_rtn = any(row.rtn_end_to_end_sqnr is not None for row in rows)
    if with_rtn:
        header += f" {'RTN end-to-end dB':>17}"
    lines = [header, "-" * len(header)]
    lines.append(
        f"{'float32':<12} {'inf':>18} {'inf':>7} {'inf':>13} {1:13.5f} {fp32_linear_mb:10.2f} {fp32_model_mb:9.2f}"
    )
    lines.append(
        f"{'bfloat16':<12} {bf16.median_weight_sqnr:18.2f} {bf16.min_weight_sqnr:7.2f} {bf16.end_to_end_sqnr:13.2f} "
        f"{bf16.embedding_cosine_min:13.5f} {fp32_linear_mb / 2:10.2f} {fp32_model_mb / 2:9.2f}"
    )
    for row in rows:
        r = row.report
        lines.append(
            f"{row.format:<12} {r.median_weight_sqnr:18.2f} {r.min_weight_sqnr:7.2f} {r.end_to_end_sqnr:13.2f} "
            f"{r.embedding_cosine_min:13.5f} {row.linear_mb:10.2f} {row.model_mb:9.2f} {row.seconds:10.1f}"
            + (f" {row.rtn_end_to_end_sqnr:17.2f}" if with_rtn else "")
        )
    return "\n".join(lines)


@dataclass
class CompiledRun:
    shape: tuple[int, int]
    first_call_s: float
    second_call_s: float
    eager_call_s: float
    sqnr_vs_eager: float
    sqnr_vs_float32: float

    def __str__(self) -> str:
        return (
            f"compiled forward (fullgraph) on a {self.shape} batch: first call {self.first_call_s:.1f} s (compiles), "
            f"second {self.second_call_s * 1e3:.1f} ms (eager {self.eager_call_s * 1e3:.1f} ms); SQNR vs eager "
            f"{self.sqnr_vs_eager:.1f} dB, vs float32 {self.sqnr_vs_float32:.2f} dB"
        )


LEARNED_FORMATS = ("fp8", "int8")


def learned_rounding_rows(model: MiniLM, batches: list[Batch], formats, calibration) -> list[str]:
    """Calibrated learned rounding (the defaults: ``objective="output"``) against round-to-nearest, end to end."""
    lines = [f"{'format':<12} {'RTN dB':>8} {'learned dB':>11} {'gain dB':>8} {'quantize s':>11}"]
    for fmt in formats:
        quantized, seconds = quantize_copy(model, LearnedRoundingConfig(format=fmt, calibration=calibration))
        learned = evaluate(model, quantized, batches, label=fmt).end_to_end_sqnr
        rtn = evaluate(model, fake_quantize_rtn(model, fmt), batches).end_to_end_sqnr
        lines.append(f"{fmt:<12} {rtn:>8.2f} {learned:>11.2f} {learned - rtn:>+8.2f} {seconds:>11.1f}")
    return lines


COMFY_FORMATS = ("float8_e4m3fn", "int8_tensorwise")


@torch.no_grad()
def comfy_round_trip(fp_model: MiniLM, batches: list[Batch], formats=COMFY_FORMATS) -> list[str]:
    """Convert the packaged checkpoint to each ComfyUI format, verify the file, load it back and measure it."""
    import tempfile
    from pathlib import Path

    from lrq_ao.convert import convert_checkpoint
    from lrq_ao.convert.reader import load_comfy_into
    from lrq_ao.quality.minilm import MiniLMConfig, minilm_dir

    lines = [f"{'ComfyUI format':<18} {'file MB':>8} {'verify':>7} {'quantized':>10} {'end-to-end dB':>14}"]
    with tempfile.TemporaryDirectory() as folder:
        for fmt in formats:
            out = Path(folder) / f"minilm_{fmt}.safetensors"
            report = convert_checkpoint(minilm_dir() / "model.safetensors", out, format=fmt, simple=True, verify=True)
            with torch.device("meta"):
                model = MiniLM(MiniLMConfig.from_json_file(minilm_dir() / "config.json"))
            loaded = load_comfy_into(model, out, strict=False, dtype=torch.float32)
            quality = evaluate(fp_model, model.eval(), batches, label=fmt)
            ok = "ok" if report.verify and report.verify["ok"] else "FAILED"
            lines.append(
                f"{fmt:<18} {out.stat().st_size / MB:>8.1f} {ok:>7} {len(loaded.quantized):>10} "
                f"{quality.end_to_end_sqnr:>14.2f}"
            )
    return lines


@torch.no_grad()
def compiled_forward(model: MiniLM, fp_model: MiniLM, batch: Batch) -> CompiledRun:
    """Run ``model`` under ``torch.compile(fullgraph=True)`` twice; compare with its eager output and with the
    float model (real tokens only)."""
    valid = batch.attention_mask.bool()
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    out = compiled(*batch)
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiled(*batch)
    second = time.perf_counter() - start
    start = time.perf_counter()
    eager = model(*batch)
    eager_s = time.perf_counter() - start
    return CompiledRun(
        shape=tuple(batch.input_ids.shape),
        first_call_s=first,
        second_call_s=second,
        eager_call_s=eager_s,
        sqnr_vs_eager=sqnr(eager[valid], out[valid]),
        sqnr_vs_float32=sqnr(fp_model(*batch)[valid], out[valid]),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lrq_ao.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), metavar="FORMAT")
    parser.add_argument("--objective", default="rtn", choices=OBJECTIVES, help="rounding objective (default: rtn)")
    parser.add_argument("--num-iter", type=int, default=LearnedRoundingConfig.num_iter, help="learned-rounding steps")
    parser.add_argument("--calibrate", action="store_true", help="collect statistics on the calibration split")
    parser.add_argument("--compile-format", default="int8", choices=list(FORMATS), help="format of the compiled run")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled forward")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-layer", action="store_true", help="also print every format's per-layer table")
    parser.add_argument("--no-comfy", action="store_true", help="skip the ComfyUI conversion round trip")
    parser.add_argument(
        "--learned-formats",
        nargs="*",
        default=list(LEARNED_FORMATS),
        choices=list(FORMATS),
        metavar="FORMAT",
        help="formats for the calibrated learned-rounding comparison (none: skip it; default: fp8 int8)",
    )
    args = parser.parse_args(argv)
    if needs_calibration(args.objective) and not args.calibrate:
        parser.error(f"--objective {args.objective} needs calibration statistics: add --calibrate")
    return args


def main(argv: list[str] | None = None) -> list[DemoRow]:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = load_minilm()
    batches = evaluation_batches(args.batch_size)
    names = encoder_linear_names(model)
    print(
        f"MiniLM-L6 (all-MiniLM-L6-v2): {len(names)} encoder linears quantized; evaluation split "
        f"{sum(int(b.attention_mask.sum()) for b in batches)} tokens; objective {args.objective}"
    )
    calibration = calibrate_on_text(model) if args.calibrate else None
    rows = run_formats(model, args, batches, calibration)
    if args.per_layer:
        for row in rows:
            print(f"\n{format_table(row.report)}")
    bf16 = bfloat16_reference(model, batches)
    print()
    print(format_rows(rows, bf16, model_bytes(model, names) / MB, model_bytes(model) / MB))
    print("(model MB includes the float32 embeddings, 47 MB of it the vocabulary table, which stay unquantized)")
    if not args.no_compile:
        done = {row.format: row.model for row in rows}
        if args.compile_format in done:
            quantized = done[args.compile_format]
        else:
            quantized, _ = quantize_copy(model, LearnedRoundingConfig(format=args.compile_format, objective="rtn"))
        print(f"\n{args.compile_format}: {compiled_forward(quantized, model, batches[0])}")
    if args.learned_formats:
        print("\nLearned rounding calibrated on the calibration split (disjoint from the evaluation split):")
        calib = calibration if calibration is not None else calibrate_on_text(model)
        print("\n".join(learned_rounding_rows(model, batches, args.learned_formats, calib)))
    if not args.no_comfy:
        print("\nThe packaged checkpoint through lrq-convert (round-to-nearest), read back by load_comfy_into:")
        print("\n".join(comfy_round_trip(model, batches)))
    return rows


if __name__ == "__main__":
    main()
