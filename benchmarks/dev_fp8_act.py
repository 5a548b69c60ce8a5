"""FP8 dynamic linear at large M: where the activation quantization's time goes (issue #3 development probe).

    python benchmarks/dev_fp8_act.py --shapes 3072x9216 12288x3072 --exactness --csv dev_fp8_act.csv

``--gpu-lock FILE`` shares the GPU with other benchmark processes (``bench_block.py --gpu-lock``): compiling
holds the lock shared, timing exclusively.

At M = 4608 on two Flux shapes, GPU time of CUDA-graph replays (``do_bench_cudagraph``, median; each method walks
enough weight copies to read > 2x the L2 per replay, as ``bench_linear.py`` does) of:

* bf16 eager / compiled, and ``torch._scaled_mm`` with the input quantized beforehand (tensor-wise and row-wise,
  row-wise also with ``use_fast_accum``: the GEMM alone, bias in the epilogue);
* torchao Float8DynamicActivationFloat8Weight PerRow / PerTensor, compiled;
* lrq_ao FP8 per-row and per-tensor weights with each kernel choice, compiled (``fullgraph=True, dynamic=True``)
  and eager, plus a per-tensor weight run with per-token activations (cuBLAS's row-wise kernel);
* ``fp32div``: the same plain-torch path with the reference's float32 divisions, to price the float64 ones.

``--exactness``: the compiled quantizations on CUDA (and eager CUDA ``quantize_activation``) compared byte for
byte with ``quantize_activation`` on CPU.
"""

from __future__ import annotations

import argparse
import csv
import platform

import torch
import torch.nn.functional as F
import triton
import triton.testing
from bench_linear import GpuLock, copies_for

from lrq_ao.layouts import ActivationMode, Float8Tensor
from lrq_ao.layouts.activation import quantize_activation, quantize_activation_fusable
from lrq_ao.primitives import FP8_DTYPE, FormatSpec, quantize_rtn

M = 4608
SHAPES = [(3072, 9216), (12288, 3072)]
QUICK = ("bf16_eager", "bf16_compiled", "lrq_row_auto", "ao_row", "lrq_tensor_torch", "ceil_rowwise_fast")
ROW, TENSOR = ActivationMode("dynamic", "row"), ActivationMode("dynamic", "tensor")


def compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=True)


def _linear(x, w, b):
    return F.linear(x, w, b)


def _fp32div_linear(x, wq, w_scale, b):
    xq, x_scale = quantize_activation(x, FP8_DTYPE, ROW)
    return torch._scaled_mm(xq, wq.t(), x_scale, w_scale, bias=b, out_dtype=torch.bfloat16)


def methods_for(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, quick: bool) -> dict:
    n, k = w.shape
    r = copies_for(n * k)
    ws = [w.clone() for _ in range(r)]
    lin_c = compiled(_linear)
    out = {
        "bf16_eager": [lambda x, w=w: F.linear(x, w, b) for w in ws],
        "bf16_compiled": [lambda x, w=w: lin_c(x, w, b) for w in ws],
    }
    xq_t, xs_t, _ = quantize_rtn(x, FormatSpec(FP8_DTYPE, "tensor"))
    xq_r, xs_r, _ = quantize_rtn(x, FormatSpec(FP8_DTYPE, "row"))
    wq_t, ws_t, _ = quantize_rtn(w, FormatSpec(FP8_DTYPE, "tensor"))
    wq_r, ws_r, _ = quantize_rtn(w, FormatSpec(FP8_DTYPE, "row"))
    wts = [wq_t.clone() for _ in range(r)]
    wrs = [wq_r.clone() for _ in range(r)]
    ws_r1 = ws_r.reshape(1, n).contiguous()
    out["ceil_tensorwise"] = [
        lambda _x, q=q: torch._scaled_mm(xq_t, q.t(), xs_t, ws_t, bias=b, out_dtype=torch.bfloat16) for q in wts
    ]
    out["ceil_rowwise"] = [
        lambda _x, q=q: torch._scaled_mm(xq_r, q.t(), xs_r, ws_r1, bias=b, out_dtype=torch.bfloat16) for q in wrs
    ]
    out["ceil_rowwise_fast"] = [
        lambda _x, q=q: torch._scaled_mm(
            xq_r, q.t(), xs_r, ws_r1, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True
        )
        for q in wrs
    ]
    fp32div = compiled(_fp32div_linear)
    out["fp32div_row_compiled"] = [lambda x, q=q: fp32div(x, q, ws_r1, b) for q in wrs]
    out.update(torchao_methods(w, b, r, quick))
    variants = {
        "lrq_row_torch": ("row", ROW, "torch", True),
        "lrq_row_auto": ("row", ROW, "auto", True),
        "lrq_row_triton": ("row", ROW, "triton", True),
        "lrq_tensor_torch": ("tensor", TENSOR, "torch", True),
        "lrq_tensor_triton": ("tensor", TENSOR, "triton", True),
        "lrq_tensorW_rowA_torch": ("tensor", ROW, "torch", True),
        "lrq_row_triton_eager": ("row", ROW, "triton", False),
        "lrq_row_torch_eager": ("row", ROW, "torch", False),
        "lrq_tensor_triton_eager": ("tensor", TENSOR, "triton", False),
    }
    for name, (layout, act, kernel, is_compiled) in variants.items():
        fn = lin_c if is_compiled else _linear
        qws = [Float8Tensor.from_hp(c, layout, act=act, kernel=kernel) for c in ws]
        out[name] = [lambda x, q=q, fn=fn: fn(x, q, b) for q in qws]
    if quick:
        out = {name: out[name] for name in QUICK}
    return out


def torchao_methods(w, b, r, quick: bool) -> dict:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    lin_c = compiled(_linear)
    out = {}
    for name, g in [("ao_row", PerRow()), ("ao_tensor", PerTensor())][: 1 if quick else 2]:
        weights = []
        for _ in range(r):
            mod = torch.nn.Linear(w.shape[1], w.shape[0], device="cuda", dtype=torch.bfloat16)
            mod.weight.data.copy_(w)
            quantize_(mod, Float8DynamicActivationFloat8WeightConfig(granularity=g))
            weights.append(mod.weight)
        out[name] = [lambda x, q=q: lin_c(x, q, b) for q in weights]
    return out


def time_calls(calls, x, lock: GpuLock) -> float:
    def run_all():
        for call in calls:
            call(x)

    with lock.shared():
        run_all()  # compile and warm up
    with lock.exclusive():
        return triton.testing.do_bench_cudagraph(run_all, rep=30, return_mode="median") * 1e3 / len(calls)


def exactness(k: int, n_fns: int = 2) -> list[tuple[str, int, int]]:
    """Compiled quantizations on CUDA vs ``quantize_activation`` on CPU, the oracle (eager CUDA divides by a Python
    scalar as a multiplication by its reciprocal, so its scales are not the reference's): (what, bytes, scales)."""
    g = torch.Generator(device="cuda").manual_seed(k)
    x = (torch.randn(M, k, device="cuda", generator=g) * torch.logspace(-2, 1, k, device="cuda")).bfloat16()
    rows = []
    for act in (ROW, TENSOR):
        q_ref, s_ref = quantize_activation(x.cpu(), FP8_DTYPE, act)
        fns = [("fusable", quantize_activation_fusable), ("fp32div", quantize_activation)][:n_fns]
        for name, fn in [*fns, ("eager_cuda_ref", None)]:
            if fn is None:
                q, s = quantize_activation(x, FP8_DTYPE, act)
            else:
                q, s = compiled(lambda t, fn=fn, act=act: fn(t, FP8_DTYPE, act))(x)
            bad_q = int((q.cpu().view(torch.uint8) != q_ref.view(torch.uint8)).sum())
            rows.append((f"{name}/{act.granularity} K={k}", bad_q, int((s.cpu() != s_ref).sum())))
    return rows


def compiled_auto_backend() -> str:
    """Which FP8 path ``kernel='auto'`` compiles to: the opaque Triton op or the fused TORCH backend."""
    from torch._inductor.utils import run_and_get_code

    w = Float8Tensor.from_hp(torch.randn(256, 128, device="cuda").bfloat16(), "row", act=ROW)
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    _, code = run_and_get_code(compiled(_linear), x, w, None)
    return "triton_fp8_scaled_mm (opaque op)" if "fp8_scaled_mm_linear" in "\n".join(code) else "torch_scaled_mm"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (in x out)")
    parser.add_argument("--exactness", action="store_true", help="also compare compiled quantizations byte by byte")
    parser.add_argument("--quick", action="store_true", help="the key methods only (one short device call)")
    parser.add_argument("--exactness-only", action="store_true", help="no timing")
    parser.add_argument("--gpu-lock", help="lock file shared with other benchmark processes")
    parser.add_argument("--csv", default="dev_fp8_act.csv")
    args = parser.parse_args(argv)
    import torchao

    torch._dynamo.config.recompile_limit = 256
    lock = GpuLock(args.gpu_lock)
    print(
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"torchao {torchao.__version__} | python {platform.python_version()} | M={M}"
    )
    rows = []
    with torch.inference_mode():
        if args.exactness:
            print("exactness vs quantize_activation on CPU (differing fp8 bytes, differing scales):")
            for k in (3072,) if args.quick else (3072, 12288):
                with lock.shared():
                    found = exactness(k, 1 if args.quick else 2)
                for what, bad_q, bad_s in found:
                    print(f"  {what:<24} {bad_q:>8} {bad_s:>6}", flush=True)
            print(f"compiled kernel='auto' FP8 row linear runs: {compiled_auto_backend()}", flush=True)
        for shape in [] if args.exactness_only else args.shapes:
            k, n = (int(v) for v in shape.split("x"))
            torch.manual_seed(0)
            w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
            b = (torch.randn(n, device="cuda") * 0.1).bfloat16()
            x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            results = {}
            with lock.shared():
                methods = methods_for(w, b, x, args.quick)
            print(f"\n{k}->{n} M={M}")
            for name, calls in methods.items():
                try:
                    us = results[name] = time_calls(calls, x, lock)
                except Exception as error:  # a probe that cannot run is a finding, not a crash
                    print(f"  {name}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
                    continue
                best = min(results[base] for base in ("bf16_eager", "bf16_compiled") if base in results)
                print(f"  {name:<26} {us:8.1f} us  x{best / us:.3f}", flush=True)
                rows.append({"K": k, "N": n, "M": M, "method": name, "median_us": round(us, 2)})
                rows[-1]["ratio_vs_bf16"] = round(best / us, 3)
            torch._dynamo.reset()
    if not rows:
        return
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
