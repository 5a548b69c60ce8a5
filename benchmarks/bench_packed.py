"""Packed 4-bit weight-only linears (NVFP4, ConvRot W4A4) at small M on the GPU, against bf16 and INT8 weight-only.

    python benchmarks/bench_packed.py --csv packed.csv                  # 5 Flux / T5 shapes, M = 1 and 16
    python benchmarks/bench_packed.py --shapes 3072x3072 --batches 1 --no-module

Shapes are ``KxN`` (in_features x out_features): 3072x3072, 3072x12288, 12288x3072 (Flux), 4096x10240, 10240x4096
(T5). For every shape and M, in the same run:

* ``bf16_eager`` / ``bf16_compiled``: ``F.linear`` and ``torch.compile(nn.Linear)``; ratios are to the faster;
* ``nvfp4``: ``lrq_ao::packed_weight_only_linear`` on NVFP4 codes (round to nearest), group scales float32 as the
  format stores them (0.75 byte per weight); ``nvfp4_fp8scale``: the same codes with fp8 group scales (0.5625 byte
  per weight: what storing the scales as fp8 would give);
* ``convrot_w4a4``: the op on ConvRot W4A4 codes (rotation group 256), ``x`` rotated beforehand (0.5 byte per weight);
* at M = 1, ``*_mma``: the same ops with the MMA kernel forced instead of the GEMV (does the GEMV pay?);
* ``int8wo``: ``lrq_ao::weight_only_linear`` on INT8 per-row codes, the existing 8-bit path (format ``int8``);
* ``nvfp4_module`` / ``convrot_w4a4_module`` (unless ``--no-module``): a compiled ``nn.Linear`` holding the quantized
  tensor, ``kernel='auto'``: backend selection, ConvRot's input rotation and bias included, as a model runs it.

First, correctness at the real size: every op's output against the float64 product of its format's dequantized
weight (``sqnr`` column, dB). Timing: ``bench_linear.bench`` (CUDA-graph replays; each method walks through enough
weight copies to exceed twice the L2, so weights come from HBM), median us per call with p20 / p80, ratio to the best
bf16, and achieved GB/s (weight + scales + x + y + bias) against the measured device copy bandwidth. Prints the GPU,
the versions and the autotuned configurations; writes every row to the CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (4096, 10240), (10240, 4096)]
BATCHES = [1, 16]
W4A4_GROUP = 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (in x out)")
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES, help="M values (the kernel is for M <= 16)")
    parser.add_argument("--no-compiled-bf16", action="store_true", help="skip the compiled bf16 baseline")
    parser.add_argument("--no-module", action="store_true", help="skip the compiled nn.Linear product path")
    parser.add_argument("--csv", default=os.path.join(os.environ.get("OUT", "."), "bench_packed.csv"))
    return parser.parse_args(argv)


def commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown commit"


# ---- methods: name -> (calls, weight + scale bytes, float64 reference of x or None, note) ----------------------------


def packed_args(fmt, qw):
    element = fmt.element
    table, even_high = list(element.nibble_values), element.even_code_high
    return qw.qdata, qw.scale, qw.scale2, qw.block_size[1], table, even_high


def packed_methods(name, fmt, qw, bias, m: int, fp8_scale: bool = False) -> dict:
    """The op on ``qw``'s codes (stored basis), GEMV / MMA as the op picks it, and the MMA forced at M = 1."""
    from bench_linear import copies_for

    from lrq_ao.kernels import packed_gemm as pg

    qdata, scale, scale2, group, table, even_high = packed_args(fmt, qw)
    if fp8_scale:
        scale = scale.to(torch.float8_e4m3fn)  # exact: NVFP4 group scales are fp8 values
    nbytes = qdata.numel() + scale.numel() * scale.element_size() + 4
    copies = [(qdata, scale)] + [(qdata.clone(), scale.clone()) for _ in range(copies_for(nbytes) - 1)]
    stored = fmt.dequantize(qw).double()

    def reference(x):
        return x.double() @ stored.t() + bias.double()

    def op_calls(gemv):
        def call(x, q, s):
            if gemv is None:
                return pg.packed_weight_only_linear(x, q, s, scale2, group, table, even_high, bias)
            out = torch.empty((x.shape[0], q.shape[0]), dtype=x.dtype, device=x.device)
            return pg.small_m_packed_linear(x, q, s, scale2, group, table, even_high, bias, out, gemv=gemv)

        return [lambda x, q=q, s=s: call(x, q, s) for q, s in copies]

    methods = {name: (op_calls(None), nbytes, reference, "op (GEMV at M = 1)")}
    if m == 1:
        methods[f"{name}_mma"] = (op_calls(False), nbytes, reference, "MMA kernel forced")
    return methods


def module_method(name, fmt, qw, linear) -> dict:
    """A compiled ``nn.Linear`` holding the quantized tensor (``kernel='auto'``), as a model runs it."""
    from bench_linear import compiled, copies_for

    from lrq_ao.layouts import weight_tensor

    nbytes = qw.qdata.numel() + qw.scale.numel() * 4 + 4
    modules = []
    for _ in range(copies_for(nbytes)):
        module = torch.nn.Linear(
            linear.in_features, linear.out_features, device=linear.weight.device, dtype=torch.bfloat16
        )
        module.bias.data = linear.bias.data
        copy = type(qw)(qw.qdata.clone(), qw.scale.clone(), qw.block_size, qw.scale2)
        module.weight = torch.nn.Parameter(weight_tensor(fmt, copy, torch.bfloat16, kernel="auto"), requires_grad=False)
        modules.append(compiled(module))
    original = fmt.dequantize_original(qw).double()

    def reference(x):
        return x.double() @ original.t() + linear.bias.double()

    probe = torch.zeros(1, linear.in_features, device=linear.weight.device, dtype=torch.bfloat16)
    backend = modules[0].weight.describe(probe).splitlines()[0].rsplit(": ", 1)[1]
    return {f"{name}_module": (modules, nbytes, reference, f"compiled nn.Linear, {backend}")}


def int8_method(w, bias) -> dict:
    from bench_linear import copies_for

    from lrq_ao.primitives import FormatSpec, dequantize, quantize_rtn

    wq, ws, block_size = quantize_rtn(w.float(), FormatSpec(torch.int8, "row"))
    copies = [wq] + [wq.clone() for _ in range(copies_for(wq.numel()) - 1)]
    op = torch.ops.lrq_ao.weight_only_linear
    calls = [lambda x, q=q: op(x, q, ws, 1, w.shape[1], bias) for q in copies]
    w_dq = dequantize(wq, ws, block_size).double()

    def reference(x):
        return x.double() @ w_dq.t() + bias.double()

    return {"int8wo": (calls, wq.numel() + 4 * ws.numel(), reference, "lrq_ao::weight_only_linear, per row")}


def bf16_methods(linear, with_compiled: bool) -> dict:
    from bench_linear import compiled, copies_for

    w, bias = linear.weight.detach(), linear.bias.detach()
    copies = [w] + [w.clone() for _ in range(copies_for(2 * w.numel()) - 1)]
    methods = {"bf16_eager": ([lambda x, c=c: F.linear(x, c, bias) for c in copies], 2 * w.numel(), None, "F.linear")}
    if with_compiled:
        modules = []
        for c in copies:
            module = torch.nn.Linear(
                linear.in_features, linear.out_features, device=linear.weight.device, dtype=torch.bfloat16
            )
            module.weight.data, module.bias.data = c, bias
            modules.append(compiled(module))
        methods["bf16_compiled"] = (modules, 2 * w.numel(), None, "torch.compile(nn.Linear)")
    return methods


# ---- one shape ---------------------------------------------------------------------------------------------------


def run_shape(k: int, n: int, batches: list[int], args, copy_gbs: float, writer) -> None:
    from lrq_ao.formats import get_format

    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(linear.weight, std=k**-0.5)
    torch.nn.init.normal_(linear.bias, std=0.1)
    w, bias = linear.weight.detach(), linear.bias.detach()
    nvfp4 = get_format("nvfp4")
    w4a4 = get_format("convrot_w4a4", block_size=W4A4_GROUP)
    q_nvfp4, q_w4a4 = nvfp4.quantize(w), w4a4.quantize(w)
    for m in batches:
        methods = bf16_methods(linear, with_compiled=not args.no_compiled_bf16)
        methods.update(packed_methods("nvfp4", nvfp4, q_nvfp4, bias, m))
        methods.update(packed_methods("nvfp4_fp8scale", nvfp4, q_nvfp4, bias, m, fp8_scale=True))
        methods.update(packed_methods("convrot_w4a4", w4a4, q_w4a4, bias, m))
        methods.update(int8_method(w, bias))
        if not args.no_module:
            methods.update(module_method("nvfp4", nvfp4, q_nvfp4, linear))
            methods.update(module_method("convrot_w4a4", w4a4, q_w4a4, linear))
        time_block(k, n, m, methods, w4a4, copy_gbs, writer)


def time_block(k, n, m, methods, w4a4, copy_gbs, writer) -> None:
    from bench_linear import bench

    from lrq_ao.primitives import sqnr

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x_rotated = w4a4.rotate_input(x).to(x.dtype)  # the op on ConvRot codes multiplies the rotated input
    results = {}
    with torch.inference_mode():
        for name, (calls, nbytes, reference, note) in methods.items():
            xin = x_rotated if name in ("convrot_w4a4", "convrot_w4a4_mma") else x
            for call in calls:  # compile / autotune outside the timing
                y = call(xin)
            db = sqnr(reference(xin), y) if reference is not None else float("nan")
            torch.cuda.synchronize()
            results[name] = (bench(calls, xin, slow=False), nbytes, db, note)
    best_bf16 = min(r[0][1] for name, r in results.items() if name.startswith("bf16"))
    print(f"\n{k} -> {n}  M={m}")
    header = f"{'median us':>10s} {'p20-p80':>13s} {'vs bf16':>8s} {'GB/s':>6s} {'of copy':>7s} {'sqnr':>6s}"
    print(f"  {'method':24s} {header}")
    for name, ((p20, p50, p80), nbytes, db, note) in results.items():
        moved = nbytes + 2 * (m * k + m * n + n)
        gbs = moved / (p50 * 1e-6) / 1e9
        ratio = best_bf16 / p50
        print(
            f"  {name:24s} {p50:10.1f} {p20:6.1f}-{p80:6.1f} {ratio:7.2f}x {gbs:6.0f} {100 * gbs / copy_gbs:6.0f}% "
            f"{db:6.1f}  {note}"
        )
        times = [round(t, 2) for t in (p20, p50, p80)]
        writer.writerow([k, n, m, name, *times, round(ratio, 3), round(gbs), round(db, 1), note])


def print_configs() -> None:
    from lrq_ao.kernels import packed_gemm as pg

    print("\nautotuned packed-kernel configurations, (N, K, M_BUCKET, ...): BLOCK_N BLOCK_K SPLIT_K warps stages")
    for label, tuned in (("gemv", pg._gemv_tuned), ("mma", pg._mma_tuned)):
        for key, cfg in tuned.cache.items():
            kw = cfg.kwargs
            print(
                f"  {label} {key[:3]}: {kw['BLOCK_N']} {kw['BLOCK_K']} {kw['SPLIT_K']} {cfg.num_warps} {cfg.num_stages}"
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_packed.py times GPU kernels and needs a CUDA GPU (--help works anywhere)")
    from bench_linear import copy_bandwidth_gbs, machine_line

    import lrq_ao.kernels

    lrq_ao.kernels.load_all()
    print(machine_line(f"lrq_ao {commit()}"))
    print("command: python " + " ".join([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])]))
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["K", "N", "M", "method", "p20_us", "median_us", "p80_us", "ratio_vs_bf16", "gbs", "sqnr_db", "note"]
        )
        for k, n in shapes:
            run_shape(k, n, args.batches, args, copy_gbs, writer)
    print_configs()
    print(f"\nCSV: {args.csv}")


if __name__ == "__main__":
    main()
