"""End-to-end quality of learned rounding on the real MiniLM-L6 weights with real English text.

For each format and method, quantize the 36 encoder linears and report the SQNR (dB) of the final hidden state
against float32 on the held-out evaluation sentences (calibration sentences are disjoint). Methods:

  rtn          round-to-nearest
  ref          the reference tool's method: SVD-projected objective on W, continuous offset, re-rounded at the end,
               no fallback (convert-to-quant 1.3.4's algorithm with its rank rule; fewer iterations than its 4000)
  ref_aware    the same SVD objective, rounding-aware (parallel backtracking flips on representable values)
  act_svd      the SVD objective made data-aware: top-k eigen-directions of the input second moment H
  gptq         GPTQ-style error feedback on the fixed-scale grid (activation order, 1% damping)
  ours         GPTQ start + exact greedy coordinate refinement of tr(E H Eᵀ), H shrunk towards its diagonal
               by K / (K + calibration tokens)
  ours_seq     ``ours`` run stage by stage (q/k/v, attention output, intermediate, output of each layer) on the
               partially quantized model's inputs, against the float model's outputs (drift-aware objective, the
               drift scaled per layer by its James-Stein trust; ``--drift-trust`` fixes it); each calibration batch
               runs once (``--sequential-replay``: re-run the model for every stage). ``lrq_ao.quantize_sequential``

  kitchen      comfy-kitchen 0.2.40's own quantizer for the format (eager, on the float32 weight), its tensors read
               back through the format's ComfyUI reader (``lrq_ao.formats.reader_for``) and installed with
               ``lrq_ao.layouts.weight_tensor``; "n/a" with the reason where kitchen has no quantizer for the format

Quantization goes through the product path, ``lrq_ao.quantize_`` (weight-only, float32 activations on CPU), so
the numbers isolate rounding. ``--activation dynamic`` runs the format's own dynamic activation pairing
(``activation_mode_for``; W8A8 for the INT8 / FP8 formats) through the same path; a format without one prints "n/a"
with its reason. ``--formats`` takes every name of ``lrq_ao.formats.FORMATS``; the rotating formats (ConvRot INT8,
ConvRot W4A4, W4A8) use ``--rotation-group`` (default 64: MiniLM's K = 384 is not a multiple of 256).

    python benchmarks/bench_quality.py                       # all formats, all methods (~4 min on 1 core)
    python benchmarks/bench_quality.py --formats fp8 --methods rtn,ours --csv out.csv
    python benchmarks/bench_quality.py --formats int8,int8_convrot --methods rtn,kitchen,gptq,ours --activation dynamic
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time

import torch
from quality_kitchen import KITCHEN, not_applicable, quantize_with_kitchen, run_fields

from lrq_ao.api import quantize_
from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.quality.metrics import evaluate
from lrq_ao.quality.minilm import load_minilm
from lrq_ao.quality.texts import calibration_batches, evaluation_batches
from lrq_ao.rounding import calibrate
from lrq_ao.rounding.objectives import needs_calibration
from lrq_ao.workflows.sequential import quantize_sequential

FORMATS = ("fp8", "fp8_row", "int8", "int8_block")
METHODS = ("rtn", "ref", "ref_aware", "act_svd", "gptq", "ours", "ours_seq")


def method_config(method: str, fmt: str, ref_iters: int) -> dict:
    # int8_block: MiniLM's 384 / 1536 dimensions are multiples of 128.
    base = {"format": fmt, "block_size": 128}
    if method == "rtn":
        return base | {"objective": "rtn"}
    if method == "ref":
        return base | {
            "objective": "svd",
            "relaxation": "continuous",
            "optimizer": "original",
            "lr_schedule": "plateau",
            "num_iter": ref_iters,
            "fallback_to_rtn": False,
        }
    if method == "ref_aware":
        return base | {"objective": "svd", "relaxation": "parallel", "num_iter": 100}
    if method == "act_svd":
        return base | {"objective": "act_svd", "init": "rtn", "relaxation": "greedy", "top_p": 0.2, "min_k": 16}
    if method == "gptq":
        # Plain GPTQ (1% damping, activation order, the calibration H as is), no refinement.
        return base | {"objective": "output", "init": "gptq", "greedy_passes": 0, "shrinkage": 0.0}
    if method in ("ours", "ours_seq"):
        return base | {"objective": "output", "init": "gptq", "relaxation": "greedy", "shrinkage": -1.0}
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS + (KITCHEN,)}")


def parse_overrides(items: list[str]) -> dict:
    """``["shrinkage=0.05", "greedy_passes=1"]`` → typed config overrides (JSON values, else strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def forward(model, batch):
    return model(*batch)


def token_mask(batch):
    return batch.attention_mask


def quantize_model(
    model,
    cfg: LearnedRoundingConfig,
    calib_batches,
    sequential: bool,
    holdout_every: int = 5,
    sequential_replay: bool = False,
    drift_trust: float | None = None,
):
    """Quantize the encoder linears through the product path (``lrq_ao.quantize_``); returns per-layer reports."""
    only_encoder = lambda m, n: n.startswith("encoder.")  # noqa: E731
    if sequential:
        return quantize_sequential(
            model,
            cfg,
            calib_batches,
            forward=forward,
            token_mask=token_mask,
            filter_fn=only_encoder,
            holdout_every=holdout_every,
            cache_inputs=not sequential_replay,
            drift_trust=drift_trust,
        ).layers
    calib = None
    if needs_calibration(cfg.objective):
        with torch.no_grad(), calibrate(model, filter_fn=only_encoder, holdout_every=holdout_every) as calib:
            for batch in calib_batches:
                calib.token_mask = token_mask(batch)
                forward(model, batch)
    return quantize_(model, dataclasses.replace(cfg, calibration=calib), filter_fn=only_encoder).layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ref-iters", type=int, default=100, help="iterations for the reference method (it uses 4000)")
    ap.add_argument("--quick", action="store_true", help="few sentences; a smoke run, not a measurement")
    ap.add_argument("--csv", default=None)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a LearnedRoundingConfig field for every learned method (e.g. shrinkage=0.05, greedy_passes=1)",
    )
    ap.add_argument("--activation", default="weight_only", choices=("weight_only", "dynamic"))
    ap.add_argument("--rotation-group", type=int, default=64, help="rotation group of the rotating formats")
    ap.add_argument("--show-layer", default=None, help="also print this layer's fitted and held-out output SQNR")
    ap.add_argument("--holdout-every", type=int, default=5, help="calibrate(holdout_every=...); 0 fits on all calls")
    ap.add_argument(
        "--sequential-replay",
        action="store_true",
        help="ours_seq re-runs the model for every stage (cache_inputs=False) instead of running each batch once",
    )
    ap.add_argument(
        "--drift-trust",
        type=float,
        default=None,
        help="ours_seq: compensate this fraction of the input drift (default: the James-Stein rule per layer)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    calib_batches, eval_batches = calibration_batches(), evaluation_batches()
    if args.quick:
        calib_batches, eval_batches = calib_batches[:2], eval_batches[:2]
    model_fp = load_minilm()
    rows = []
    print(f"{'format':<13}{'method':<11}{'e2e SQNR dB':>12}{'vs RTN':>8}{'moved %':>9}{'kept RTN':>9}{'seconds':>9}")
    for fmt in args.formats.split(","):
        rtn_db = None
        for method in args.methods.split(","):
            if reason := not_applicable(method, fmt, args):
                print(f"{fmt:<13}{method:<11}{'n/a':>12}  {reason}", flush=True)
                continue
            if method == KITCHEN:
                rows.append(quantize_with_kitchen(load_minilm, model_fp, eval_batches, fmt, args, rtn_db))
                continue
            overrides = parse_overrides(args.set) if method != "rtn" else {}
            fields = method_config(method, fmt, args.ref_iters) | run_fields(fmt, args)
            cfg = LearnedRoundingConfig(**(fields | overrides))
            model_q = load_minilm()
            t0 = time.perf_counter()
            reports = quantize_model(
                model_q,
                cfg,
                calib_batches,
                method == "ours_seq",
                args.holdout_every,
                args.sequential_replay,
                args.drift_trust,
            )
            seconds = time.perf_counter() - t0
            db = evaluate(model_fp, model_q, eval_batches).end_to_end_sqnr
            rtn_db = db if method == "rtn" else rtn_db
            moved = 100 * sum(r["moved_fraction"] for r in reports) / len(reports)
            kept = sum(bool(r["kept_rtn"]) for r in reports) if method != "rtn" else 0
            delta = "" if rtn_db is None else f"{db - rtn_db:+.2f}"
            print(f"{fmt:<13}{method:<11}{db:>12.2f}{delta:>8}{moved:>9.1f}{kept:>9}{seconds:>9.1f}", flush=True)
            trust = sorted(r["drift_trust"] for r in reports if r.get("drift_trust") is not None)
            if trust:
                print(
                    f"    drift trust per layer: min {trust[0]:.3f}, median {trust[len(trust) // 2]:.3f}, "
                    f"max {trust[-1]:.3f}",
                    flush=True,
                )
            for r in reports:
                if r["name"] == args.show_layer:
                    keys = ("output_sqnr_db", "output_sqnr_heldout_rtn_db", "output_sqnr_heldout_db")
                    print("    " + ", ".join(f"{k}={r.get(k)}" for k in keys), flush=True)
            rows.append(
                {
                    "format": fmt,
                    "method": method,
                    "e2e_sqnr_db": round(db, 3),
                    "moved_pct": round(moved, 2),
                    "kept_rtn_layers": kept,
                    "seconds": round(seconds, 2),
                }
            )
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
