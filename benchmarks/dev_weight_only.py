"""Weight-only INT8 / FP8 linears at small M on the GPU: the kernel alone, then the compiled product path.

    python benchmarks/dev_weight_only.py --csv weight_only.csv            # all 7 shapes, M in 1, 4, 16, 64
    python benchmarks/dev_weight_only.py --batches 1,4,16 --product-kernels auto --no-compiled-bf16 --diagnose
    python benchmarks/dev_weight_only.py --shapes quick --product-kernels auto    # 2 shapes, M in 1, 16

1. Correctness on the GPU: the small-M kernel against the float64 product of the dequantized weight (every scale
   layout, both formats, M in 1, 5, 16, an uneven 3-way K split and no split), the split-K arrival counters left
   at zero; every timed op launch is also checked against float64 at its real size (``sqnr`` column).
2. Kernel time (CUDA-graph replays, weights rotated past the L2; helpers shared with ``bench_linear.py``): bf16
   ``F.linear`` (eager; compiled too on the first shape), the op on per-row INT8 and FP8 weights, and at M = 64
   the dequantize + cuBLAS alternative. Achieved GB/s (weight + scales + x + y + bias) against the measured copy
   bandwidth. The autotuned configuration of each small-M launch is printed; ``--diagnose`` also times a few fixed
   configurations (INT8, 3072 -> 9216, M = 1 and 4) to show what the autotuner left on the table.
3. Product path on the first shape: ``lrq_ao.quantize_`` (RTN, weight-only INT8 / FP8 per-row) on a bf16
   ``nn.Linear`` with bias, ``torch.compile(fullgraph=True)``, ``kernel`` auto and triton, the backend each took.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import FLUX, T5, bench, compiled, copies_for, copy_bandwidth_gbs, machine_line  # noqa: E402

import lrq_ao  # noqa: E402
from lrq_ao import LearnedRoundingConfig  # noqa: E402
from lrq_ao.primitives import FP8_DTYPE, FormatSpec, dequantize, quantize_rtn, sqnr  # noqa: E402

BATCHES = [1, 4, 16, 64]
QUICK_SHAPES = [(3072, 9216), (15360, 3072)]
QDTYPES = {"int8": torch.int8, "fp8": FP8_DTYPE}
SMALL_M_SQNR_DB = 44.0  # exact dequantization: fp32 sums and bf16 output rounding only (~48 dB)


def check_correctness() -> None:
    """Every scale layout and format at fixed configurations (uneven 3-way split and no split), M in 1, 5, 16."""
    from lrq_ao.kernels import weight_only_gemm as wo

    configs = {
        "split3": {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 3},
        "split1": {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1},
    }
    worst = {}
    for name, qdtype in QDTYPES.items():
        for granularity in ("tensor", "row", "block"):
            for m, n, k in [(1, 3000, 3080), (5, 2944, 3200), (16, 1000, 4104)]:
                if granularity == "block":
                    n, k = n // 128 * 128, k // 128 * 128
                g = torch.Generator().manual_seed(m + n)
                w = torch.randn(n, k, generator=g) / k**0.5
                wq, ws, block_size = quantize_rtn(w, FormatSpec(qdtype, granularity, 128))
                x = torch.randn(m, k, generator=g).to(torch.bfloat16)
                bias = torch.randn(n, generator=g).to(torch.bfloat16)
                ref = x.double() @ dequantize(wq, ws, block_size).double().t() + bias.double()
                mode, sblock = wo.scale_mode(block_size, (n, k))
                for label, config in configs.items():
                    if label == "split1" and granularity != "row":
                        continue
                    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                    y = wo.small_m_linear(x.cuda(), wq.cuda(), ws.cuda(), mode, sblock, bias.cuda(), out, config)
                    db = sqnr(ref, y.cpu())
                    key = (name, granularity, label)
                    worst[key] = min(db, worst.get(key, 99.0))
                    assert db > SMALL_M_SQNR_DB, f"{key} {(m, n, k)}: {db:.1f} dB"
    torch.cuda.synchronize()
    leftover = sum(int(c.count_nonzero()) for c in wo._tile_counters.values())
    assert leftover == 0, f"split-K counters not reset: {leftover}"
    print(
        "correctness, worst SQNR (dB) vs float64 over M in 1, 5, 16: "
        + ", ".join(f"{'/'.join(key)} {db:.1f}" for key, db in sorted(worst.items()))
    )


def moved_bytes(m: int, n: int, k: int, weight_bytes: int) -> int:
    """The least a call must move: its weight (and scales) once, x, y and a bf16 bias."""
    return weight_bytes + 2 * (m * k + m * n + n)


def kernel_methods(k: int, n: int, m: int, with_compiled: bool) -> dict:
    """name -> (calls, weight + scale bytes, note, float64 reference of x or None)."""
    from lrq_ao.kernels.weight_only_gemm import dequantize_weight

    op = torch.ops.lrq_ao.weight_only_linear

    g = torch.Generator(device="cuda").manual_seed(k + n)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k**-0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    copies = [w] + [w.clone() for _ in range(copies_for(w.numel() * 2) - 1)]
    methods = {"bf16_eager": ([lambda x, w=w: F.linear(x, w, bias) for w in copies], 2 * n * k, "F.linear", None)}
    if with_compiled:
        modules = []
        for c in copies:
            module = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
            module.weight.data, module.bias.data = c, bias
            modules.append(compiled(module))
        methods["bf16_compiled"] = (modules, 2 * n * k, "inductor", None)
    for name, qdtype in QDTYPES.items():
        wq, ws, _ = quantize_rtn(w.float(), FormatSpec(qdtype, "row"))
        qcopies = [wq] + [wq.clone() for _ in range(copies_for(wq.numel()) - 1)]
        calls = [lambda x, q=q, s=ws: op(x, q, s, 1, k, bias) for q in qcopies]
        w_dq = (wq.double() * ws.double()).t()
        methods[f"lrq_{name}wo_op"] = (calls, n * k + 4 * n, "", lambda x, w_dq=w_dq: x.double() @ w_dq + bias.double())
        if m > 16:
            calls = [lambda x, q=q, s=ws: F.linear(x, dequantize_weight(q, s, (1, k), x.dtype), bias) for q in qcopies]
            methods[f"{name}_dequant_cublas"] = (calls, n * k + 4 * n, "", None)
    return methods


def product_methods(k: int, n: int, kernels: list[str]) -> dict:
    """The compiled nn.Linear through lrq_ao.quantize_ (RTN) for each kernel choice, and the backend it took."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=torch.bfloat16)
    probe = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    methods = {}
    for fmt in ("int8", "fp8_row"):
        for kernel in kernels:
            calls, backend = [], ""
            for _ in range(copies_for(n * k)):
                module = copy.deepcopy(linear)
                config = LearnedRoundingConfig(format=fmt, activation="weight_only", objective="rtn", kernel=kernel)
                lrq_ao.quantize_(module, config)
                backend = module.weight.describe(probe).splitlines()[0].rsplit(": ", 1)[1]
                calls.append(compiled(module))
            methods[f"lrq_{fmt}_wo_{kernel}"] = (calls, n * k + 4 * n, backend, None)
    return methods


def time_block(k, n, m, methods, copy_gbs, writer, label="", baseline=True) -> None:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, (calls, weight_bytes, note, reference) in methods.items():
        for call in calls:  # compile / autotune outside the timing
            y = call(x)
        if reference is not None:  # the autotuned launch at this real size, against float64
            note = f"sqnr {sqnr(reference(x), y):.1f} dB"
        torch.cuda.synchronize()
        results[name] = (bench(calls, x, slow=False), weight_bytes, note)
    best_bf16 = min(r[0][1] for name, r in results.items() if name.startswith("bf16")) if baseline else 0.0
    print(f"\n{k}->{n}  M={m} {label}")
    for name, ((p20, p50, p80), weight_bytes, note) in results.items():
        gbs = moved_bytes(m, n, k, weight_bytes) / (p50 * 1e-6) / 1e9
        ratio = best_bf16 / p50 if best_bf16 else float("nan")
        print(f"  {name:24s} {p50:8.1f} us  x{ratio:5.2f}  {gbs:6.0f} GB/s ({100 * gbs / copy_gbs:3.0f}%)  {note}")
        writer.writerow([k, n, m, name, round(p20, 2), round(p50, 2), round(p80, 2), round(ratio, 3), round(gbs)])


def diagnose_configs(copy_gbs: float, writer) -> None:
    """Fixed configurations (no autotuning) of the small-M kernel, INT8 per-row 3072 -> 9216, M = 1 and 4."""
    from lrq_ao.kernels import weight_only_gemm as wo

    k, n = FLUX[0]
    w = torch.randn(n, k, device="cuda") * k**-0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    wq, ws, _ = quantize_rtn(w, FormatSpec(torch.int8, "row"))
    qcopies = [wq] + [wq.clone() for _ in range(copies_for(wq.numel()) - 1)]
    for m in (1, 4):
        methods = {}
        for block_n, block_k, split_k in [(32, 128, 2), (32, 128, 4), (32, 256, 1), (32, 256, 4), (64, 128, 4)]:
            config = {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 4}

            def call(x, q, config=config):
                out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
                return wo.small_m_linear(x, q, ws, wo.SCALE_ROW, 1, bias, out, config)

            calls = [lambda x, q=q, call=call: call(x, q) for q in qcopies]
            methods[f"int8 {block_n}x{block_k} split{split_k}"] = (calls, n * k + 4 * n, "fixed config", None)
        time_block(k, n, m, methods, copy_gbs, writer, "(fixed small-M configurations)", baseline=False)


def chosen_configs() -> None:
    from lrq_ao.kernels import weight_only_gemm as wo

    print("\nsmall-M autotune choices, (N, K, M_BUCKET) weight dtype: BLOCK_N BLOCK_K SPLIT_K warps stages")
    for key, cfg in wo._small_m_tuned.cache.items():
        kw = cfg.kwargs
        weight_dtype = [d for d in key if "int8" in str(d) or "float8" in str(d)]
        choice = f"{kw['BLOCK_N']} {kw['BLOCK_K']} {kw['SPLIT_K']} {cfg.num_warps} {cfg.num_stages}"
        print(f"  {key[:3]} {weight_dtype}: {choice}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["all", "quick", "none"], default="all", help="quick: 2 shapes, M 1, 16")
    parser.add_argument("--product-kernels", default="auto,triton", help="kernel choices of the quantize_ path")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="M values (with --shapes all)")
    parser.add_argument("--no-compiled-bf16", action="store_true", help="skip the compiled bf16 baseline")
    parser.add_argument("--diagnose", action="store_true", help="fixed small-M configs at M = 1 and 4, 3072->9216")
    parser.add_argument("--csv", default=os.path.join(os.environ.get("OUT", "."), "weight_only.csv"))
    args = parser.parse_args()
    import torchao

    print(machine_line(f"torchao {torchao.__version__}"))
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    check_correctness()
    shapes = {"all": FLUX + T5, "quick": QUICK_SHAPES, "none": []}[args.shapes]
    batches = [int(m) for m in args.batches.split(",")] if args.shapes == "all" else [1, 16]
    with open(args.csv, "w", newline="") as f, torch.inference_mode():
        writer = csv.writer(f)
        writer.writerow(["K", "N", "M", "method", "p20_us", "median_us", "p80_us", "ratio_vs_bf16", "gbs"])
        for i, (k, n) in enumerate(shapes):
            for m in batches:
                with_compiled = i == 0 and m <= 16 and not args.no_compiled_bf16
                time_block(k, n, m, kernel_methods(k, n, m, with_compiled), copy_gbs, writer)
        chosen_configs()
        if args.diagnose:
            diagnose_configs(copy_gbs, writer)
        k, n = FLUX[0]
        product = product_methods(k, n, args.product_kernels.split(","))
        for m in (1, 16):
            methods = {"bf16_eager": kernel_methods(k, n, m, with_compiled=False)["bf16_eager"], **product}
            time_block(k, n, m, methods, copy_gbs, writer, "(compiled nn.Linear through lrq_ao.quantize_)")


if __name__ == "__main__":
    main()
