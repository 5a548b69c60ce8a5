"""Single quantized ``nn.Linear`` (with bias) under ``torch.compile(fullgraph=True)``: lrq_ao vs bf16 vs peers.

    python benchmarks/bench_linear.py --shapes flux t5 --csv linear.csv

For every shape (in_features -> out_features) and batch size M, in the same run:

* baselines: eager bf16 and compiled bf16 ``nn.Linear``; ratios are against the faster of the two;
* ceilings: ``torch._scaled_mm`` (FP8, per-tensor scales, inputs quantized beforehand) and ``torch._int_mm``
  (INT8, inputs quantized beforehand, no rescale: M > 16 only);
* torchao 0.18: Float8DynamicActivationFloat8Weight (PerTensor, PerRow), Float8WeightOnly, Int8WeightOnly,
  Int8DynamicActivationInt8Weight, each ``quantize_``-d and compiled;
* lrq_ao through the product path: ``lrq_ao.quantize_`` (round-to-nearest) on the ``nn.Linear``, compiled, with
  the backend each one took (``weight.describe``).

Timing: ``triton.testing.do_bench`` (L2 flushed before every call, so a weight is read from HBM each time, and the
flush hides Python launch overhead behind GPU work), median with p20/p80. Columns: median us, ratio to the best
bf16, TFLOP/s, for M <= 16 achieved GB/s (weight + scales + x + y) against the measured copy bandwidth, and the
output SQNR (dB) of each method against the float64 product of the unquantized bf16 layer (at M = 256).
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import platform
import sys
import time

import torch
import triton
import triton.testing

FLUX = [(3072, 9216), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
T5 = [(4096, 10240), (10240, 4096)]
SHAPE_SETS = {"flux": FLUX, "t5": T5}
BATCHES = [1, 16, 256, 1024, 4608, 16384]
SQNR_M = 256

LRQ_METHODS = {
    "lrq_fp8dq": ("fp8", "dynamic"),
    "lrq_fp8dq_row": ("fp8_row", "dynamic"),
    "lrq_int8dq": ("int8", "dynamic"),
    "lrq_int8dq_block": ("int8_block", "dynamic"),
    "lrq_fp8wo": ("fp8_row", "weight_only"),
    "lrq_int8wo": ("int8", "weight_only"),
}


def compiled(module: torch.nn.Module):
    return torch.compile(module, fullgraph=True, dynamic=True)


# Every compiled nn.Linear shares the code object of Linear.forward: one cache entry per method and shape.
torch._dynamo.config.recompile_limit = 512
torch._dynamo.config.accumulated_recompile_limit = 8192


def torchao_methods(linear: torch.nn.Linear) -> dict:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    configs = {
        "ao_fp8dq_tensor": Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
        "ao_fp8dq_row": Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "ao_fp8wo": Float8WeightOnlyConfig(),
        "ao_int8wo": Int8WeightOnlyConfig(),
        "ao_int8dq": Int8DynamicActivationInt8WeightConfig(),
    }
    methods = {}
    for name, config in configs.items():
        module = copy.deepcopy(linear)
        quantize_(module, config)
        methods[name] = (compiled(module), module.weight, f"torchao {type(module.weight).__name__}")
    return methods


def lrq_methods(linear: torch.nn.Linear, x_probe: torch.Tensor, only: list[str] | None = None) -> dict:
    import lrq_ao
    from lrq_ao import LearnedRoundingConfig

    methods = {}
    for name, (fmt, activation) in LRQ_METHODS.items():
        if only and name not in only:
            continue
        module = copy.deepcopy(linear)
        config = LearnedRoundingConfig(format=fmt, activation=activation, objective="rtn", kernel="auto")
        report = lrq_ao.quantize_(module, config)
        if report.skipped:
            raise RuntimeError(f"{name}: quantize_ skipped the layer: {report.skipped}")
        backend = module.weight.describe(x_probe).splitlines()[0].rsplit(": ", 1)[1]
        methods[name] = (compiled(module), module.weight, backend)
    return methods


def ceiling_methods(linear: torch.nn.Linear, x: torch.Tensor) -> dict:
    """Pre-quantized inputs: only the GEMM is timed."""
    from lrq_ao.primitives import FormatSpec, quantize_rtn

    w = linear.weight.detach()
    wq8, ws8, _ = quantize_rtn(w, FormatSpec(torch.float8_e4m3fn, "tensor"))
    xq8, xs8, _ = quantize_rtn(x, FormatSpec(torch.float8_e4m3fn, "tensor"))
    bias = linear.bias.detach()
    methods = {
        "scaled_mm_ceiling": (
            lambda _x: torch._scaled_mm(xq8, wq8.t(), xs8, ws8, bias=bias, out_dtype=torch.bfloat16),
            None,
            "torch._scaled_mm, x pre-quantized",
        )
    }
    if x.shape[0] > 16:
        wqi, _, _ = quantize_rtn(w, FormatSpec(torch.int8, "row"))
        xqi, _, _ = quantize_rtn(x, FormatSpec(torch.int8, "row"))
        wqi_t = wqi.t()
        methods["int_mm_ceiling"] = (lambda _x: torch._int_mm(xqi, wqi_t), None, "torch._int_mm int32 out, no rescale")
    return methods


def weight_bytes(weight) -> int:
    if weight is None:
        return 0
    inner = [getattr(weight, n) for n in getattr(weight, "tensor_data_names", []) if hasattr(weight, n)]
    if not inner:
        return weight.numel() * weight.element_size()
    return sum(t.numel() * t.element_size() for t in inner)


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref = ref.double()
    err = torch.linalg.vector_norm(ref - y.double())
    return math.inf if err == 0 else float(20 * torch.log10(torch.linalg.vector_norm(ref) / err))


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench(fn, x) -> tuple[float, float, float]:
    p20, p50, p80 = triton.testing.do_bench(lambda: fn(x), quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100)
    return p20 * 1e3, p50 * 1e3, p80 * 1e3


def run_shape(k: int, n: int, batches: list[int], copy_gbs: float, only: list[str] | None, writer, rows) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(linear.weight, std=k**-0.5)
    torch.nn.init.normal_(linear.bias, std=0.1)
    probe = torch.randn(SQNR_M, k, device="cuda", dtype=torch.bfloat16)
    methods = {
        "bf16_eager": (linear, linear.weight, "F.linear"),
        "bf16_compiled": (compiled(linear), linear.weight, ""),
    }
    methods["bf16_compiled"] = (methods["bf16_compiled"][0], linear.weight, "inductor")
    methods.update(torchao_methods(linear) if not only or any(o.startswith("ao_") for o in only) else {})
    methods.update(lrq_methods(linear, probe, [o for o in only or [] if o.startswith("lrq_")] or None))
    if only:
        methods = {name: m for name, m in methods.items() if name in only or name.startswith("bf16")}
    ref = probe.double() @ linear.weight.detach().double().t() + linear.bias.detach().double()
    quality = {}
    with torch.inference_mode():
        for name, (fn, _, _) in methods.items():
            quality[name] = sqnr(ref, fn(probe))
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timed = dict(methods)
            timed.update(ceiling_methods(linear, x) if not only or "ceilings" in only else {})
            results = {}
            for name, (fn, weight, backend) in timed.items():
                t0 = time.perf_counter()
                try:
                    fn(x)  # compile / autotune outside the timing
                    torch.cuda.synchronize()
                except Exception as error:  # a peer that cannot run this M is a result, not a crash
                    print(f"  {name}: FAILED at M={m}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
                    continue
                setup_s = time.perf_counter() - t0
                results[name] = (*bench(fn, x), weight, backend, setup_s)
            best_bf16 = min(results["bf16_eager"][1], results["bf16_compiled"][1])
            for name, (p20, p50, p80, weight, backend, setup_s) in results.items():
                flops = 2 * m * n * k
                moved = weight_bytes(weight) + 2 * (m * k + m * n + n)
                row = {
                    "K": k,
                    "N": n,
                    "M": m,
                    "method": name,
                    "backend": backend,
                    "p20_us": round(p20, 2),
                    "median_us": round(p50, 2),
                    "p80_us": round(p80, 2),
                    "ratio_vs_bf16": round(best_bf16 / p50, 3),
                    "tflops": round(flops / (p50 * 1e-6) / 1e12, 1),
                    "gbs": round(moved / (p50 * 1e-6) / 1e9, 0) if m <= 16 and weight is not None else "",
                    "pct_copy_bw": round(100 * moved / (p50 * 1e-6) / 1e9 / copy_gbs, 0)
                    if m <= 16 and weight is not None
                    else "",
                    "sqnr_db": round(quality[name], 1) if name in quality else "",
                    "setup_s": round(setup_s, 1),
                }
                writer.writerow(row)
                rows.append(row)
            print_block(k, n, m, rows[-len(results) :])
            sys.stdout.flush()


def print_block(k: int, n: int, m: int, rows: list[dict]) -> None:
    print(f"\n{k}->{n}  M={m}")
    for r in rows:
        extra = f" {r['gbs']:>6} GB/s ({r['pct_copy_bw']}%)" if r["gbs"] != "" else ""
        print(
            f"  {r['method']:<18} {r['median_us']:>9.1f} us  x{r['ratio_vs_bf16']:<6} {r['tflops']:>6} TF/s"
            f"  sqnr {r['sqnr_db']!s:>5}{extra}  [{r['backend']}]"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["flux", "t5"], help="flux, t5, or KxN (in x out)")
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    parser.add_argument("--only", nargs="+", help="method names to keep (bf16 baselines are always kept)")
    parser.add_argument("--csv", default="bench_linear.csv")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear.py needs a CUDA GPU")
    import torchao

    print(
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"torchao {torchao.__version__} | python {platform.python_version()}"
    )
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    rows: list[dict] = []
    with open(args.csv, "w", newline="") as f:
        writer = None
        for shape_set in args.shapes:
            shapes = SHAPE_SETS.get(shape_set) or [tuple(int(v) for v in shape_set.split("x"))]
            for k, n in shapes:
                if writer is None:
                    writer = _LazyWriter(f)
                run_shape(k, n, args.batches, copy_gbs, args.only, writer, rows)
                torch._dynamo.reset()


class _LazyWriter:
    """A DictWriter that takes its header from the first row."""

    def __init__(self, f) -> None:
        self.f = f
        self.writer = None

    def writerow(self, row: dict) -> None:
        if self.writer is None:
            self.writer = csv.DictWriter(self.f, fieldnames=list(row))
            self.writer.writeheader()
        self.writer.writerow(row)
        self.f.flush()


if __name__ == "__main__":
    main()
