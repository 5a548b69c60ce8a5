"""Single quantized ``nn.Linear`` (with bias) under ``torch.compile(fullgraph=True)``: lrq_ao vs bf16 vs peers.

    python benchmarks/bench_linear.py --shapes flux t5 --csv linear.csv
    python benchmarks/bench_linear.py --only lrq_convrot_dq lrq_convrot_wo ck_convrot lrq_int8dq lrq_int8wo

For every shape (in_features -> out_features) and batch size M, in the same run:

* baselines: eager bf16 and compiled bf16 ``nn.Linear``; ratios are against the faster of the two;
* ceilings: ``torch._scaled_mm`` (FP8, per-tensor scales, inputs quantized beforehand) and ``torch._int_mm``
  (INT8, inputs quantized beforehand, no rescale: M > 16 only);
* torchao 0.18: Float8DynamicActivationFloat8Weight (PerTensor, PerRow), Float8WeightOnly, Int8WeightOnly,
  Int8DynamicActivationInt8Weight, each ``quantize_``-d and compiled;
* lrq_ao through the product path: ``lrq_ao.quantize_`` (round-to-nearest) on the ``nn.Linear``, compiled, with
  the backend each one took (``weight.describe``);
* INT8 ConvRot (rotation group 256) among them: ``lrq_convrot_dq`` (W8A8: fused rotate + quantize pass, then the
  INT8 row GEMM), ``lrq_convrot_wo`` (weight-only: x rotated, then the weight-only INT8 kernels); and the peer
  ``ck_convrot``, comfy-kitchen's own ConvRot INT8 linear (its quantizer, ``F.linear`` on its ``QuantizedTensor``,
  eager as ComfyUI runs it, through the fastest kitchen backend that loads: cuda, then triton, then eager), skipped
  with a line when ``comfy_kitchen`` cannot be imported.

Timing: GPU time of CUDA-graph replays (``triton.testing.do_bench_cudagraph``), median with p20/p80. Each method
is built ``R`` times (separate weights) and one graph calls all copies, ``R`` chosen so the weights read per replay
exceed twice the 50 MB L2: every call reads its weight from HBM, as in a real model. Graphs remove the Python /
launch overhead that otherwise dominates at small M (a compiled tensor-subclass linear costs 0.2-0.6 ms of CPU
time per call), so the table compares kernels; see RESULTS.md for what that overhead means without graphs.
Columns: median us per call, ratio to the best bf16, TFLOP/s, for M <= 16 achieved GB/s (weight + scales + x + y)
against the measured copy bandwidth, and the output SQNR (dB) of each method against the float64 product of the
unquantized bf16 layer (at M = 256).

``--jobs N`` runs the shapes in N worker processes so their compilation and autotuning overlap (most of the run's
wall time). The GPU is shared through a reader-writer file lock: building, compiling and warming up hold it shared,
timing holds it exclusively (and synchronizes first), so no other process has work on the GPU while a method is
timed. Each worker's table is printed in shape order at the end, and the CSVs are merged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import fcntl
import importlib.util
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
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
    "lrq_fp8dq": ("fp8", "dynamic", "auto"),
    "lrq_fp8dq_row": ("fp8_row", "dynamic", "auto"),
    "lrq_fp8dq_row_torch": ("fp8_row", "dynamic", "torch"),
    "lrq_int8dq": ("int8", "dynamic", "auto"),
    "lrq_int8dq_torch": ("int8", "dynamic", "torch"),
    "lrq_int8dq_block": ("int8_block", "dynamic", "auto"),
    "lrq_fp8wo": ("fp8_row", "weight_only", "auto"),
    "lrq_fp8wo_torch": ("fp8_row", "weight_only", "torch"),
    "lrq_int8wo": ("int8", "weight_only", "auto"),
    "lrq_fp8dq_fast": ("fp8", "dynamic", "auto", "fast"),
    "lrq_fp8dq_row_fast": ("fp8_row", "dynamic", "auto", "fast"),
    "lrq_int8dq_fast": ("int8", "dynamic", "auto", "fast"),
    "lrq_int8dq_block_fast": ("int8_block", "dynamic", "auto", "fast"),
    "lrq_convrot_dq": ("int8_convrot", "dynamic", "auto"),  # rotation group 256 (the config's default block size)
    "lrq_convrot_wo": ("int8_convrot", "weight_only", "auto"),
}
CK_CONVROT_GROUP = 256  # kitchen's default, and the rotation group int8_convrot takes at the default block_size
L2_BYTES = 50 * 2**20
SLOW_CALL_S = 0.05  # a peer slower than this per call is timed with a few plain calls instead of graphs


class GpuLock:
    """Reader-writer lock over a file: many processes may compile (shared), one may time (exclusive)."""

    def __init__(self, path: str | None) -> None:
        self.file = open(path, "a+") if path else None  # noqa: SIM115 - held for the process's life

    @contextlib.contextmanager
    def _held(self, mode: int):
        if self.file is None:
            yield
            return
        fcntl.flock(self.file, mode)
        try:
            torch.cuda.synchronize()  # our work only starts once we hold the lock ...
            yield
            torch.cuda.synchronize()  # ... and is finished before we let go
        finally:
            fcntl.flock(self.file, fcntl.LOCK_UN)

    def shared(self):
        return self._held(fcntl.LOCK_SH)

    def exclusive(self):
        return self._held(fcntl.LOCK_EX)


def compiled(module: torch.nn.Module):
    return torch.compile(module, fullgraph=True, dynamic=True)


# Every compiled nn.Linear shares the code object of Linear.forward: one cache entry per method and shape.
torch._dynamo.config.recompile_limit = 512
torch._dynamo.config.accumulated_recompile_limit = 8192


def copies_for(weight_nbytes: int) -> int:
    """How many weight copies one timed graph walks through so their bytes exceed twice the L2."""
    return max(1, math.ceil(2 * L2_BYTES / max(weight_nbytes, 1)))


def torchao_methods(linear: torch.nn.Linear, only) -> dict:
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
        "ao_fp8dq_tensor": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
        "ao_fp8dq_row": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "ao_fp8wo": Float8WeightOnlyConfig,
        "ao_int8wo": Int8WeightOnlyConfig,
        "ao_int8dq": Int8DynamicActivationInt8WeightConfig,
    }

    def build(make_config):
        module = copy.deepcopy(linear)
        quantize_(module, make_config())
        return compiled(module), module.weight

    methods = {}
    for name, make_config in configs.items():
        if only and name not in only:
            continue
        first, weight = build(make_config)
        calls = [first] + [build(make_config)[0] for _ in range(copies_for(weight_bytes(weight)) - 1)]
        methods[name] = (calls, weight, f"torchao {type(weight).__name__}")
    return methods


def lrq_methods(linear: torch.nn.Linear, x_probe: torch.Tensor, only) -> dict:
    import lrq_ao
    from lrq_ao import LearnedRoundingConfig

    def build(fmt, activation, kernel, quant="exact"):
        module = copy.deepcopy(linear)
        config = LearnedRoundingConfig(
            format=fmt, activation=activation, activation_quant=quant, objective="rtn", kernel=kernel
        )
        report = lrq_ao.quantize_(module, config)
        if report.skipped:
            raise RuntimeError(f"quantize_ skipped the layer ({fmt}, {activation}): {report.skipped}")
        return compiled(module), module.weight

    methods = {}
    for name, spec in LRQ_METHODS.items():
        if only and name not in only:
            continue
        first, weight = build(*spec)
        backend = compiled_backend(weight.describe(x_probe))
        calls = [first] + [build(*spec)[0] for _ in range(copies_for(weight_bytes(weight)) - 1)]
        methods[name] = (calls, weight, backend)
    return methods


def kitchen_methods(linear: torch.nn.Linear, x_probe: torch.Tensor, only) -> dict:
    """``ck_convrot``: comfy-kitchen's ConvRot INT8 linear, eager (ComfyUI's path), or nothing if kitchen is absent."""
    if only and "ck_convrot" not in only:
        return {}
    if importlib.util.find_spec("comfy_kitchen") is None:
        print("  ck_convrot: skipped, comfy_kitchen is not importable (put kitchen's package on PYTHONPATH)")
        return {}
    from importlib.metadata import version

    import comfy_kitchen
    from comfy_kitchen.tensor.base import QuantizedTensor

    w, bias = linear.weight.detach(), linear.bias.detach()
    kwargs = {"is_weight": True, "per_channel": True, "convrot": True, "convrot_groupsize": CK_CONVROT_GROUP}
    first = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", **kwargs)
    weights = [first] + [
        QuantizedTensor.from_float(w, "TensorWiseINT8Layout", **kwargs)
        for _ in range(copies_for(first._qdata.nbytes) - 1)
    ]
    chosen = comfy_kitchen.registry.get_capable_backend(
        "int8_linear",
        {
            "x": x_probe,
            "weight": first._qdata,
            "weight_scale": first._params.scale,
            "bias": bias,
            "out_dtype": x_probe.dtype,
            "convrot": True,
            "convrot_groupsize": CK_CONVROT_GROUP,
        },
    )
    calls = [lambda x, qt=qt: torch.nn.functional.linear(x, qt, bias) for qt in weights]
    label = f"comfy-kitchen {version('comfy-kitchen')} int8_linear convrot G={CK_CONVROT_GROUP} [{chosen}], eager"
    return {"ck_convrot": (calls, first._qdata, label)}


def compiled_backend(described: str) -> str:
    """The backend a compiled graph runs: describe()'s 'under torch.compile' line when it differs from eager."""
    lines = described.splitlines()
    compiled_line = [line for line in lines if line.strip().startswith("under torch.compile")]
    return (compiled_line or lines)[0].rsplit(": ", 1)[1]


def bf16_methods(linear: torch.nn.Linear) -> dict:
    copies = [linear] + [copy.deepcopy(linear) for _ in range(copies_for(weight_bytes(linear.weight)) - 1)]
    return {
        "bf16_eager": (copies, linear.weight, "F.linear"),
        "bf16_compiled": ([compiled(c) for c in copies], linear.weight, "inductor"),
    }


def ceiling_methods(linear: torch.nn.Linear, x: torch.Tensor) -> dict:
    """Pre-quantized inputs: only the GEMM is timed."""
    from lrq_ao.primitives import FormatSpec, quantize_rtn

    w = linear.weight.detach()
    bias = linear.bias.detach()
    wq8, ws8, _ = quantize_rtn(w, FormatSpec(torch.float8_e4m3fn, "tensor"))
    xq8, xs8, _ = quantize_rtn(x, FormatSpec(torch.float8_e4m3fn, "tensor"))
    fp8_weights = [wq8.clone() for _ in range(copies_for(wq8.numel()))]
    methods = {
        "scaled_mm_ceiling": (
            [
                lambda _x, wq=wq: torch._scaled_mm(xq8, wq.t(), xs8, ws8, bias=bias, out_dtype=torch.bfloat16)
                for wq in fp8_weights
            ],
            None,
            "torch._scaled_mm, x pre-quantized",
        )
    }
    if x.shape[0] > 16:
        wqi, _, _ = quantize_rtn(w, FormatSpec(torch.int8, "row"))
        xqi, _, _ = quantize_rtn(x, FormatSpec(torch.int8, "row"))
        int8_weights = [wqi.clone() for _ in range(copies_for(wqi.numel()))]
        methods["int_mm_ceiling"] = (
            [lambda _x, wq=wq: torch._int_mm(xqi, wq.t()) for wq in int8_weights],
            None,
            "torch._int_mm int32 out, no rescale",
        )
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


def machine_line(*versions: str) -> str:
    """The GPU, its SM count and the versions a result depends on, as every benchmark prints it first."""
    props = torch.cuda.get_device_properties(0)
    parts = [f"GPU {props.name} ({props.multi_processor_count} SMs)", f"torch {torch.__version__}"]
    return " | ".join([*parts, f"triton {triton.__version__}", *versions, f"python {platform.python_version()}"])


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench(calls: list, x: torch.Tensor, slow: bool) -> tuple[float, float, float]:
    """(p20, p50, p80) GPU microseconds per call; see the module docstring."""

    def run_all():
        for call in calls:
            call(x)

    if slow:
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[0](x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        times.sort()
        return times[0], times[1], times[2]
    p20, p50, p80 = triton.testing.do_bench_cudagraph(run_all, rep=50, quantiles=[0.2, 0.5, 0.8])
    return tuple(t * 1e3 / len(calls) for t in (p20, p50, p80))


def run_shape(
    k: int, n: int, batches: list[int], copy_gbs: float, only: list[str] | None, writer, rows, lock: GpuLock
) -> None:
    torch.manual_seed(0)
    with lock.shared():
        linear = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(linear.weight, std=k**-0.5)
        torch.nn.init.normal_(linear.bias, std=0.1)
        probe = torch.randn(SQNR_M, k, device="cuda", dtype=torch.bfloat16)
        methods = bf16_methods(linear)
        methods.update(torchao_methods(linear, only))
        methods.update(lrq_methods(linear, probe, only))
        methods.update(kitchen_methods(linear, probe, only))
        ref = probe.double() @ linear.weight.detach().double().t() + linear.bias.detach().double()
    quality = {}
    with torch.inference_mode():
        with lock.shared():
            for name, (calls, _, _) in methods.items():
                quality[name] = sqnr(ref, calls[0](probe))
        for m in batches:
            with lock.shared():
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                timed = dict(methods)
                timed.update(ceiling_methods(linear, x) if not only or "ceilings" in only else {})
                ready, setup = warm_up(timed, x, m)
            results = {}
            with lock.exclusive():
                for name in ready:
                    calls, weight, backend = timed[name]
                    try:
                        t0 = time.perf_counter()
                        calls[0](x)
                        torch.cuda.synchronize()
                        slow = time.perf_counter() - t0 > SLOW_CALL_S
                        times = bench(calls, x, slow)
                    except Exception as error:  # e.g. a path that cannot be captured in a CUDA graph
                        print(f"  {name}: FAILED timing M={m}: {type(error).__name__}: {str(error)[:160]}")
                        continue
                    results[name] = (*times, weight, backend + (" (plain timing)" if slow else ""), setup[name])
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


def warm_up(timed: dict, x: torch.Tensor, m: int) -> tuple[list[str], dict[str, float]]:
    """Compile / autotune every method for this input outside the timing; a peer that cannot run is a result."""
    ready, setup = [], {}
    for name, (calls, _, _) in timed.items():
        try:
            t0 = time.perf_counter()
            for call in calls:
                call(x)
            torch.cuda.synchronize()
            setup[name] = time.perf_counter() - t0
            ready.append(name)
        except Exception as error:
            print(f"  {name}: FAILED at M={m}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
    return ready, setup


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
    parser.add_argument("--only", nargs="+", help="method names to keep, 'ceilings' for both (bf16 always kept)")
    parser.add_argument("--csv", default="bench_linear.csv")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (shapes compile in parallel)")
    parser.add_argument("--gpu-lock", help="lock file shared with other benchmark processes (e.g. bench_block.py)")
    parser.add_argument("--worker-dir", help="keep the workers' logs and CSVs here (they survive a timeout)")
    parser.add_argument("--lock", help=argparse.SUPPRESS)  # set by the parent for its workers
    parser.add_argument("--copy-gbs", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear.py needs a CUDA GPU")
    import torchao

    shapes = [s for name in args.shapes for s in (SHAPE_SETS.get(name) or [tuple(int(v) for v in name.split("x"))])]
    if args.lock is None:
        print(machine_line(f"torchao {torchao.__version__}"))
    copy_gbs = args.copy_gbs or copy_bandwidth_gbs()
    if args.lock is None:
        print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    if args.jobs > 1 and len(shapes) > 1:
        run_in_workers(args, shapes, copy_gbs)
        return
    lock = GpuLock(args.lock or args.gpu_lock)
    rows: list[dict] = []
    with open(args.csv, "w", newline="") as f:
        writer = _LazyWriter(f)
        for k, n in shapes:
            run_shape(k, n, args.batches, copy_gbs, args.only, writer, rows, lock)
            torch._dynamo.reset()


def run_in_workers(args, shapes: list[tuple[int, int]], copy_gbs: float) -> None:
    """One worker process per group of shapes; their tables are printed and their CSVs merged in shape order, also
    when the run is interrupted (SIGINT / SIGTERM): a timed-out run still reports the rows it finished."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    groups = [shapes[i :: args.jobs] for i in range(min(args.jobs, len(shapes)))]
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.worker_dir or scratch
        os.makedirs(tmp, exist_ok=True)
        lock = args.gpu_lock or os.path.join(tmp, "gpu.lock")
        env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "2"))
        workers = []
        for i, group in enumerate(groups):
            out = os.path.join(tmp, f"w{i}")
            cmd = [sys.executable, os.path.abspath(__file__), "--shapes", *[f"{k}x{n}" for k, n in group]]
            cmd += ["--batches", *map(str, args.batches), "--csv", out + ".csv", "--lock", lock]
            cmd += ["--copy-gbs", str(copy_gbs)] + (["--only", *args.only] if args.only else [])
            log = open(out + ".log", "w")  # noqa: SIM115 - closed after the worker exits
            workers.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, out))
        failed = 0
        try:
            for proc, log, _ in workers:
                failed += proc.wait() != 0
                log.close()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from timeout(1): keep what the workers measured so far
            print("interrupted: stopping the workers; their rows so far follow", flush=True)
            for proc, log, _ in workers:
                proc.terminate()
                proc.wait()
                log.close()
            failed = len(workers)
        merged = []
        for _, _, out in workers:
            with open(out + ".log") as f:
                print(f.read(), end="")
            if os.path.exists(out + ".csv") and os.path.getsize(out + ".csv"):
                with open(out + ".csv", newline="") as f:
                    merged.extend(row for row in csv.DictReader(f) if None not in row.values())  # no cut-off rows
        order = {shape: i for i, shape in enumerate(shapes)}
        merged.sort(key=lambda r: (order[(int(r["K"]), int(r["N"]))], int(r["M"])))
        if merged:
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(merged[0]))
                writer.writeheader()
                writer.writerows(merged)
        if failed:
            raise SystemExit(f"{failed} worker(s) failed: see their output above")


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
