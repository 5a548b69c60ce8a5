"""Learned-rounding time per layer on Flux shapes, against the reference tool, at equal or better objective value.

The objective is the reference tool's own: ``‖U_kᵀ (W_dq − W) V_k‖`` with its rank rule (top_p 0.2, min_k 256,
max_k 1280), evaluated for both results with the same exact top-k singular vectors (full SVD, not timed). The
reference is ``convert_to_quant`` 1.3.4's ``LearnedRoundingConverter`` with its CLI defaults (Prodigy, 4000
iterations, lr 1.0, plateau schedule); ours is ``lrq_ao.rounding.quantize_weight`` with the same objective and
the ``parallel`` relaxation (no calibration; ``--iters`` iterations, 20 by default: measured, both formats reach
their final objective to 4 digits in 20). The 12B projection sums our measured per-shape time over Flux.1's
linear layers (19 double blocks, 38 single blocks); "batched" times ``quantize_weights`` on ``--batch`` same-shape
layers at once and divides by their number.

    python benchmarks/bench_rounding_speed.py --device cuda --csv $OUT/speed.csv
    python benchmarks/bench_rounding_speed.py --device cpu --quick          # smoke test of the script
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import time

import torch

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.rounding import quantize_weight
from lrq_ao.rounding.objectives import Objective, svd_rank

FLUX_SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288)]
EXTRA_SHAPES = [(18432, 3072), (21504, 3072), (3072, 15360)]  # only timed for ours, for the projection
# Flux.1 linears per shape: double blocks (img + txt streams), single blocks.
FLUX_LAYERS = {
    (9216, 3072): 19 * 2 + 38,  # qkv (double, both streams) + single-block modulation
    (3072, 3072): 19 * 2,  # attention proj
    (12288, 3072): 19 * 2,  # mlp up
    (3072, 12288): 19 * 2,  # mlp down
    (18432, 3072): 19 * 2,  # double-block modulation
    (21504, 3072): 38,  # single-block linear1
    (3072, 15360): 38,  # single-block linear2
}
FORMATS = {"fp8": ("fp8", "tensor", None), "int8_block": ("int8_block", "block", 128)}
QUICK_SHAPES = [(256, 256), (512, 256)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def exact_svd_objective(w: torch.Tensor) -> Objective:
    k = svd_rank(*w.shape, 0.2, 256, 1280)
    u, _, vh = torch.linalg.svd(w.float(), full_matrices=False)
    return Objective("svd", right=vh[:k].T.float().contiguous(), left=u[:, :k].float().contiguous(), rank=k)


def run_reference(w: torch.Tensor, fmt: str, device: str, num_iter: int):
    os.environ.setdefault("TQDM_DISABLE", "1")
    from convert_to_quant.converters.learned_rounding import LearnedRoundingConverter

    _, mode, block = FORMATS[fmt]
    conv = LearnedRoundingConverter(
        optimizer="prodigy", num_iter=num_iter, lr=1.0, top_p=0.2, min_k=256, max_k=1280, lr_schedule="plateau",
        scaling_mode=mode, block_size=block or 128, target_format="int8" if fmt.startswith("int8") else "fp8",
        device=device,
    )  # fmt: skip
    sync(device)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, _, dequantized, _ = conv.convert(w)
    sync(device)
    return time.perf_counter() - t0, dequantized.float()


def svd_config(fmt: str, device: str, iterations: int) -> LearnedRoundingConfig:
    return LearnedRoundingConfig(
        format=fmt, objective="svd", relaxation="parallel", num_iter=iterations, check_every=10, device=device
    )


def run_ours(w: torch.Tensor, fmt: str, device: str, iterations: int):
    cfg = svd_config(fmt, device, iterations)
    sync(device)
    t0 = time.perf_counter()
    r = quantize_weight(w, cfg, name="bench")
    sync(device)
    seconds = time.perf_counter() - t0
    from lrq_ao.primitives import dequantize

    return seconds, dequantize(r.qdata, r.scale, r.block_size), r.report


def time_output_objective(w: torch.Tensor, fmt: str, device: str, tokens: int = 4096) -> float:
    """Seconds for the calibrated default (GPTQ + 2 greedy passes on tr(E H Eᵀ)) with H from synthetic inputs."""
    from lrq_ao.rounding import LinearStats

    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, w.shape[1], device=device, generator=gen)
    x = x * torch.linspace(0.1, 4.0, w.shape[1], device=device)  # uneven channels
    stats = LinearStats(x.T @ x / tokens, x.mean(0), tokens)
    cfg = LearnedRoundingConfig(format=fmt, objective="output", device=device)
    sync(device)
    t0 = time.perf_counter()
    quantize_weight(w, cfg, name="bench", stats=stats)
    sync(device)
    return time.perf_counter() - t0


def time_batched(shape: tuple[int, int], fmt: str, device: str, iterations: int, layers: int) -> tuple[float, int]:
    """Seconds per layer when ``layers`` same-shape weights go through ``quantize_weights`` together, and the batch
    size it used (smaller when the batch does not fit half the free GPU memory)."""
    from lrq_ao.rounding import quantize_weights

    gen = torch.Generator(device=device).manual_seed(2)
    weights = [torch.randn(*shape, device=device, generator=gen) * 0.02 for _ in range(layers)]
    sync(device)
    t0 = time.perf_counter()
    results = quantize_weights(weights, svd_config(fmt, device, iterations))
    sync(device)
    return (time.perf_counter() - t0) / layers, min(r.report.get("batch", 1) for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few reference iterations (smoke test)")
    ap.add_argument("--ref-iters", type=int, default=4000, help="reference iterations (its CLI default: 4000)")
    ap.add_argument("--iters", type=int, default=20, help="our parallel-refinement iterations (early-stops)")
    ap.add_argument("--batch", type=int, default=6, help="same-shape layers per batch for the batched timing (0: off)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-output", action="store_true", help="skip timing the calibrated (output) objective")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    dev = args.device
    shapes = QUICK_SHAPES if args.quick else FLUX_SHAPES
    extra = [] if args.quick else EXTRA_SHAPES
    ref_iters = min(args.ref_iters, 50) if args.quick else args.ref_iters
    if dev.startswith("cuda"):
        print(f"GPU {torch.cuda.get_device_name()}  torch {torch.__version__}  ", end="")
        with contextlib.suppress(ImportError):
            import triton

            print(f"triton {triton.__version__}", end="")
        print()
    gen = torch.Generator().manual_seed(0)
    # 512 x 512 takes the randomized SVD path (rank 256 + 10 < 512), as the Flux shapes do.
    warm = (torch.randn(512, 512, generator=gen) * 0.02).to(dev)
    for fmt in FORMATS:  # CUDA context, cuBLAS/cuSOLVER handles, the Triton kernels' compilation
        run_ours(warm, fmt, dev, 5)
        if not args.no_output:
            time_output_objective(warm, fmt, dev, tokens=256)
    rows, ours_time, out_time = [], {}, {}
    print(f"{'format':<11}{'shape':<13}{'rtn obj':>10}{'ref obj':>10}{'ours obj':>10}", end="")
    print(f"{'ref s':>8}{'ours s':>8}{'speedup':>9}{'output s':>10}")
    for fmt in FORMATS:
        for shape in shapes + extra:
            w = (torch.randn(*shape, generator=gen) * 0.02).to(dev)
            obj = exact_svd_objective(w)
            t_ours, dq_ours, rep = run_ours(w, fmt, dev, args.iters)
            ours_time[(fmt, shape)] = t_ours
            from lrq_ao.primitives import dequantize, quantize_rtn

            q, s, b = quantize_rtn(w, LearnedRoundingConfig(format=fmt).spec)
            obj_rtn = float(obj.loss(dequantize(q, s, b) - w))
            obj_ours = float(obj.loss(dq_ours - w))
            t_ref = obj_ref = float("nan")
            if shape not in extra and not args.no_reference:
                t_ref, dq_ref = run_reference(w, fmt, dev, ref_iters)
                obj_ref = float(obj.loss(dq_ref.to(dev) - w))
            speed = t_ref / t_ours
            t_out = float("nan") if args.no_output else time_output_objective(w, fmt, dev)
            out_time[(fmt, shape)] = t_out
            print(
                f"{fmt:<11}{'x'.join(map(str, shape)):<13}{obj_rtn:>10.4g}{obj_ref:>10.4g}{obj_ours:>10.4g}"
                f"{t_ref:>8.2f}{t_ours:>8.3f}{speed:>9.1f}{t_out:>10.3f}",
                flush=True,
            )
            rows.append({"format": fmt, "shape": "x".join(map(str, shape)), "rank": obj.rank, "obj_rtn": obj_rtn,
                         "obj_ref": obj_ref, "obj_ours": obj_ours, "ref_s": t_ref, "ours_s": t_ours,
                         "speedup": speed, "moved": rep["moved_fraction"], "output_s": t_out})  # fmt: skip
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    batched_time = {}
    if args.batch > 1:
        print(f"batched svd objective, {args.batch} same-shape layers per call: seconds per layer")
        for fmt in FORMATS:
            time_batched((512, 512), fmt, dev, args.iters, 2)  # warm-up: batched kernels and products
            for shape in shapes + extra:
                seconds, used = time_batched(shape, fmt, dev, args.iters, args.batch)
                batched_time[(fmt, shape)] = seconds
                print(f"{fmt:<11}{'x'.join(map(str, shape)):<13}{seconds:>8.3f}  (batch {used})", flush=True)
    if not args.quick:
        params = sum(shape[0] * shape[1] * n for shape, n in FLUX_LAYERS.items())
        for fmt in FORMATS:
            labelled = [("svd objective", ours_time), ("output objective", out_time)]
            labelled += [("svd objective, batched", batched_time)] if batched_time else []
            for label, times in labelled:
                total = sum(times[(fmt, shape)] * n for shape, n in FLUX_LAYERS.items())
                print(f"projection {fmt} {label}: {sum(FLUX_LAYERS.values())} Flux linears, {params / 1e9:.1f}B "
                      f"params: {total:.0f} s = {total / 60:.1f} min")  # fmt: skip


if __name__ == "__main__":
    main()
