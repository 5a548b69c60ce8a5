"""A Flux-like transformer block stack, compiled end to end: bf16 vs lrq_ao FP8 / INT8 vs torchao FP8.

    python benchmarks/bench_block.py --blocks 2 --tokens 4608 --csv block.csv

Real Flux dimensions (hidden 3072, MLP 12288, 24 heads of 128) with synthetic weights, 4096 image + 512 text
tokens (4608) in one sequence, single-stream style blocks: adaLN modulation from a conditioning vector
(``Linear(3072, 6*3072)`` at M = 1), LayerNorm, fused QKV projection, SDPA attention, output projection, GELU MLP.
Every ``nn.Linear`` is quantized (lrq_ao through ``lrq_ao.quantize_``, round-to-nearest; torchao through its
``quantize_``); the whole stack runs under ``torch.compile(fullgraph=True)``.

Every variant runs in its own worker process (``--jobs``, default: all at once), because compiling is most of the
wall time and the 16 cores of the lent GPU machine can compile them side by side; each worker prints when it
has compiled and when it has been timed, and its stderr is shown if it fails. When all run at once, none is timed
before every one has compiled (a directory of marker files), so no compiler competes for the CPU during timing.
The GPU is shared through a reader-writer file lock (``bench_linear.GpuLock``): building, compiling and the first
calls hold it shared, timing holds it exclusively, so nothing else runs on the GPU while a variant is timed.
``--gpu-lock FILE`` lets other benchmark processes share the same lock (their compilers are not held back).

Timing: ``triton.testing.do_bench`` median (the stack is milliseconds long, so Python overhead is hidden behind GPU
work). Quality: SQNR (dB) of the stack's output against the bf16 eager stack on the same input (each worker builds
the same seeded model and input, and computes that reference itself).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing
from bench_linear import GpuLock
from torch import nn

DIM, HEADS, MLP = 3072, 24, 12288


class FluxLikeBlock(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS, mlp: int = MLP) -> None:
        super().__init__()
        self.heads = heads
        self.modulation = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(vec)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + gate1 * self.proj(attn)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class BlockStack(nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(FluxLikeBlock() for _ in range(blocks))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, vec)
        return x


def init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
            nn.init.normal_(module.bias, std=0.02)
    for block in model.blocks:  # small gates keep the residual stream bounded through the stack
        block.modulation.weight.data.mul_(0.1)


def lrq_variant(model: nn.Module, fmt: str, kernel: str = "auto", quant: str = "exact") -> tuple[nn.Module, str]:
    import lrq_ao
    from lrq_ao import LearnedRoundingConfig

    quantized = copy.deepcopy(model)
    config = LearnedRoundingConfig(
        format=fmt, activation="dynamic", activation_quant=quant, objective="rtn", kernel=kernel
    )
    report = lrq_ao.quantize_(quantized, config)
    if report.skipped:
        raise RuntimeError(f"lrq_ao {fmt}: layers left unquantized: {report.skipped}")
    return quantized, (
        f"lrq_ao.quantize_(format={fmt!r}, activation='dynamic', activation_quant={quant!r}, kernel={kernel!r})"
    )


def torchao_variant(model: nn.Module, granularity: str) -> tuple[nn.Module, str]:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    quantized = copy.deepcopy(model)
    g = PerRow() if granularity == "row" else PerTensor()
    quantize_(quantized, Float8DynamicActivationFloat8WeightConfig(granularity=g))
    return quantized, f"torchao Float8DynamicActivationFloat8WeightConfig({type(g).__name__})"


VARIANTS = {
    "lrq_fp8": lambda m: lrq_variant(m, "fp8"),
    "lrq_fp8_row": lambda m: lrq_variant(m, "fp8_row"),
    "lrq_fp8_torch": lambda m: lrq_variant(m, "fp8", "torch"),
    "lrq_fp8_row_torch": lambda m: lrq_variant(m, "fp8_row", "torch"),
    "lrq_fp8_row_triton": lambda m: lrq_variant(m, "fp8_row", "triton"),
    "lrq_int8": lambda m: lrq_variant(m, "int8"),
    "lrq_int8_block": lambda m: lrq_variant(m, "int8_block"),
    "lrq_fp8_fast": lambda m: lrq_variant(m, "fp8", quant="fast"),
    "lrq_fp8_row_fast": lambda m: lrq_variant(m, "fp8_row", quant="fast"),
    "lrq_int8_fast": lambda m: lrq_variant(m, "int8", quant="fast"),
    "lrq_int8_block_fast": lambda m: lrq_variant(m, "int8_block", quant="fast"),
    "lrq_convrot": lambda m: lrq_variant(m, "int8_convrot"),  # W8A8, rotation group 256
    "ao_fp8_row": lambda m: torchao_variant(m, "row"),
    "ao_fp8_tensor": lambda m: torchao_variant(m, "tensor"),
}


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref = ref.double()
    err = torch.linalg.vector_norm(ref - y.double())
    return math.inf if err == 0 else float(20 * torch.log10(torch.linalg.vector_norm(ref) / err))


BASELINES = ("bf16_eager", "bf16_compiled")


def wait_for_all_compiled(barrier: str | None, name: str, count: int, limit_s: float = 300.0) -> None:
    """Mark this worker compiled and wait (sleeping) until ``count`` workers are, so no compiler competes for the
    CPU while a variant is timed: the stack is timed without CUDA graphs, so a starved launching thread would
    show up as GPU time."""
    if barrier is None:
        return
    open(os.path.join(barrier, name), "w").close()
    deadline = time.monotonic() + limit_s
    while len(os.listdir(barrier)) < count and time.monotonic() < deadline:
        time.sleep(0.5)


def kernel_profile(fn, calls: int = 5, top: int = 14) -> list[str]:
    """The GPU kernels of ``calls`` runs of ``fn`` by total device time, as lines: microseconds per run, launches per
    run, share of the run, name. Shows where two variants' time differs, kernel by kernel."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels)
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return [
        f"{e.self_device_time_total / calls:9.1f} us {e.count / calls:4.0f}x"
        f" {100 * e.self_device_time_total / total:5.1f}%  {e.key[:110]}"
        for e in kernels[:top]
    ] + [f"{total / calls:9.1f} us in all ({len(kernels)} kernels)"]


def run_variant(
    name: str, blocks: int, tokens: int, lock: GpuLock, barrier=None, count: int = 0, profile: bool = False
) -> dict:
    """Build, compile, time and score one variant in this process; progress lines go to stdout."""
    start = time.perf_counter()
    torch.manual_seed(0)
    with lock.shared(), torch.inference_mode():
        model = BlockStack(blocks).to("cuda", torch.bfloat16).eval()
        init_weights(model)
        x = torch.randn(1, tokens, DIM, device="cuda", dtype=torch.bfloat16)
        vec = torch.randn(1, DIM, device="cuda", dtype=torch.bfloat16)
        ref = model(x, vec)
        if name == "bf16_eager":
            fn, how = model, "nn.Module"
        elif name == "bf16_compiled":
            fn, how = torch.compile(model, fullgraph=True), "torch.compile"
        else:
            module, how = VARIANTS[name](model)
            del model
            fn = torch.compile(module, fullgraph=True)
        out = fn(x, vec)  # compile, autotune, warm up
        fn(x, vec)
    print(f"  [{name}] built and compiled after {time.perf_counter() - start:.0f} s", flush=True)
    wait_for_all_compiled(barrier, name, count)
    with lock.exclusive(), torch.inference_mode():
        p20, p50, p80 = triton.testing.do_bench(lambda: fn(x, vec), quantiles=[0.2, 0.5, 0.8], rep=300)
        kernels = kernel_profile(lambda: fn(x, vec)) if profile else []
    print(f"  [{name}] {p50:.2f} ms, timed after {time.perf_counter() - start:.0f} s", flush=True)
    print("".join(f"  [{name}] {line}\n" for line in kernels), end="", flush=True)
    return {"variant": name, "how": how, "p20_ms": p20, "median_ms": p50, "p80_ms": p80, "sqnr_db": sqnr(ref, out)}


def run_in_workers(args, names: list[str]) -> list[dict]:
    """One process per variant, at most ``args.jobs`` at a time; returns their rows in ``names`` order."""
    with tempfile.TemporaryDirectory() as tmp:
        lock = args.gpu_lock or os.path.join(tmp, "gpu.lock")
        barrier = os.path.join(tmp, "compiled")
        os.makedirs(barrier)
        together = len(names) if args.jobs >= len(names) else 0  # a barrier only when every worker runs at once
        env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "1"))
        pending, running, rows = list(names), [], {}
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                out = os.path.join(tmp, name)
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--blocks", str(args.blocks)]
                cmd += ["--tokens", str(args.tokens), "--gpu-lock", lock, "--csv", out + ".json"]
                cmd += ["--barrier", barrier, "--barrier-count", str(together)] if together else []
                cmd += ["--profile"] if args.profile else []
                log = open(out + ".log", "w")  # noqa: SIM115 - closed when the worker exits
                running.append((subprocess.Popen(cmd, stderr=log, env=env), log, name))  # progress on our stdout
            proc, log, name = running.pop(0)
            proc.wait()
            log.close()
            result = os.path.join(tmp, name + ".json")
            if proc.returncode == 0 and os.path.exists(result):
                with open(result) as f:
                    rows[name] = json.load(f)
                print(
                    f"  {name:<18} {rows[name]['median_ms']:8.2f} ms  sqnr {rows[name]['sqnr_db']:6.1f} dB", flush=True
                )
            else:
                with open(os.path.join(tmp, name + ".log")) as f:
                    tail = f.read().strip().splitlines()[-3:]
                print(f"  {name:<18} FAILED (exit {proc.returncode}): {' | '.join(tail)}", flush=True)
    return [rows[name] for name in names if name in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096 + 512)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=len(VARIANTS) + len(BASELINES), help="worker processes")
    parser.add_argument("--gpu-lock", help="lock file shared with other benchmark processes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # run this one variant, write its row as JSON
    parser.add_argument("--barrier", help=argparse.SUPPRESS)  # directory where workers mark themselves compiled
    parser.add_argument("--barrier-count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--csv", default="bench_block.csv")
    parser.add_argument("--profile", action="store_true", help="after timing, print each variant's top GPU kernels")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_block.py needs a CUDA GPU")
    torch._dynamo.config.recompile_limit = 64
    if args.worker:
        try:
            row = run_variant(
                args.worker,
                args.blocks,
                args.tokens,
                GpuLock(args.gpu_lock),
                args.barrier,
                args.barrier_count,
                args.profile,
            )
        except BaseException:
            if args.barrier:  # a failed worker still counts, or the others would wait for it
                open(os.path.join(args.barrier, args.worker), "w").close()
            raise
        with open(args.csv, "w") as f:
            json.dump(row, f)
        return
    import torchao

    print(
        f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"torchao {torchao.__version__} | python {platform.python_version()}"
    )
    rows = run_in_workers(args, [*BASELINES, *args.variants])
    best = min((r["median_ms"] for r in rows if r["variant"] in BASELINES), default=math.nan)
    print(f"\n{args.blocks} blocks x {args.tokens} tokens, median ms, speed-up vs best bf16 ({best:.2f} ms):")
    for r in rows:
        r["ratio_vs_bf16"] = best / r["median_ms"]
        print(
            f"  {r['variant']:<18} {r['median_ms']:8.2f} ms  x{r['ratio_vs_bf16']:.3f}  sqnr {r['sqnr_db']:6.1f} dB"
            f"  [{r['how']}]"
        )
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
