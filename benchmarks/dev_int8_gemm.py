"""INT8 W8A8 GEMM kernels on the GPU (dev benchmark for the row / block kernels): kernel time under CUDA graphs.

    python3 benchmarks/dev_int8_gemm.py --out DIR [--shapes 3072x9216,12288x3072] [--ms 16,1024,4608,16384]
                                         [--baseline DIR] [--jobs 12]

For each ``in -> out`` shape and batch M, one bias-carrying linear, in one run:

* ``bf16``: ``F.linear``; ``int_mm``: ``torch._int_mm`` on pre-quantized int8 operands, int32 out, no rescale
  (cuBLAS; M > 16 only);
* ``row_gemm`` / ``block_gemm``: our GEMMs on pre-quantized operands (``block_gemm_ptr``: pointer loads instead of
  TMA), ``row_linear`` / ``block_linear``: activation quantization + GEMM, the product path (``act_row`` /
  ``act_block``: the quantization pass alone);
* with ``--baseline DIR`` (a folder holding ``old_common.py``, ``old_row_gemm.py``, ``old_block_gemm.py``: the
  previous kernels with their op registrations cut off), ``*_old`` rows time the previous kernels in the same run.

Timing: ``triton.testing.do_bench_cudagraph`` median; every timed call runs ``R`` weight copies so the weights
read per replay exceed twice the 50 MB L2 (each GEMM reads its weight from HBM). Autotuning happens before capture;
``--jobs`` first compiles every configuration the autotuner may try in worker processes (compilation only, the GPU
stays idle), so the main process finds them in Triton's cache. SQNR (dB): ``sqnr`` against the float64 product of
the unquantized bf16 layer, ``sqnr_dq`` against the float64 product of the dequantized operands (the kernel's own
error: accumulation and output rounding). Writes ``int8_gemm.csv`` and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import math
import multiprocessing as mp
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from lrq_ao.kernels import _gemm_common, block_gemm, row_gemm
from lrq_ao.kernels.act_quant import quantize_activation_triton
from lrq_ao.layouts.activation import ActivationMode, dequantize_activation
from lrq_ao.primitives import FormatSpec, dequantize, quantize_rtn, sqnr

BLOCK = 128
L2_BYTES = 50 * 2**20


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def load_baseline(folder: str | None):
    if not folder:
        return None, None
    sys.path.insert(0, os.path.abspath(folder))
    return importlib.import_module("old_row_gemm"), importlib.import_module("old_block_gemm")


@contextlib.contextmanager
def pointer_operands():
    """Force the pointer-load path of the W8A8 kernels (the TMA check says no)."""
    saved = _gemm_common.tma_operands
    _gemm_common.tma_operands = lambda a, b: False
    try:
        yield
    finally:
        _gemm_common.tma_operands = saved


class Case:
    """Inputs of one (shape, M): bf16 x, R weight copies quantized per row and in 128-blocks, their scales."""

    def __init__(self, k: int, n: int, m: int, copies: int, empty: bool = False):
        g = torch.Generator(device="cuda").manual_seed(m + n + k)
        self.m, self.n, self.k = m, n, k
        if empty:  # shapes and dtypes only (compilation workers)
            self.x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
            self.bias = torch.empty(n, device="cuda", dtype=torch.bfloat16)
            self.w = []
            nb, kb = n // BLOCK, k // BLOCK
            self.row = [(torch.empty(n, k, device="cuda", dtype=torch.int8), torch.empty(n, 1, device="cuda"))]
            self.blk = [(torch.empty(n, k, device="cuda", dtype=torch.int8), torch.empty(nb, kb, device="cuda"))]
            self.xq_row, self.xs_row = (
                torch.empty(m, k, device="cuda", dtype=torch.int8),
                torch.empty(m, 1, device="cuda"),
            )
            self.xq_blk, self.xs_blk = self.xq_row, torch.empty(m, kb, device="cuda")
            return
        x = torch.randn(m, k, device="cuda", generator=g) * torch.logspace(-1, 1, k, device="cuda")
        self.x = x.to(torch.bfloat16)
        self.bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
        self.w = [(torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(torch.bfloat16) for _ in range(copies)]
        self.row = [quantize_rtn(w.float(), FormatSpec(torch.int8, "row"))[:2] for w in self.w]
        self.blk = [quantize_rtn(w.float(), FormatSpec(torch.int8, "block", BLOCK))[:2] for w in self.w]
        self.xq_row, self.xs_row = quantize_activation_triton(self.x, torch.int8, "row")
        self.xq_blk, self.xs_blk = quantize_activation_triton(self.x, torch.int8, "block", BLOCK)


def methods(case: Case, old_row, old_block) -> dict:
    """name -> (callable on one weight copy index, output kind); output kind None: no SQNR."""
    c = case
    out: dict = {
        "bf16": (lambda i: F.linear(c.x, c.w[i], c.bias), "bf16"),
        "act_row": (lambda i: quantize_activation_triton(c.x, torch.int8, "row"), None),
        "act_block": (lambda i: quantize_activation_triton(c.x, torch.int8, "block", BLOCK), None),
        "row_gemm": (lambda i: row_gemm.row_scaled_gemm(c.xq_row, c.xs_row, *c.row[i], c.bias, torch.bfloat16), "row"),
        "row_linear": (lambda i: row_gemm.row_scaled_linear(c.x, *c.row[i], c.bias), "row"),
        "block_gemm": (
            lambda i: block_gemm.block_scaled_gemm(c.xq_blk, c.xs_blk, *c.blk[i], BLOCK, c.bias, torch.bfloat16),
            "block",
        ),
        "block_gemm_ptr": (lambda i: _with_pointers(lambda: out["block_gemm"][0](i)), "block"),
        "block_linear": (lambda i: block_gemm.block_scaled_linear(c.x, *c.blk[i], BLOCK, c.bias), "block"),
    }
    if c.m > 16:
        out["int_mm"] = (lambda i: torch._int_mm(c.xq_row, c.row[i][0].t()), None)
    if old_row is not None:
        out["row_gemm_old"] = (
            lambda i: old_row.row_scaled_gemm(c.xq_row, c.xs_row, *c.row[i], c.bias, torch.bfloat16),
            "row",
        )
        out["block_gemm_old"] = (
            lambda i: old_block.block_scaled_gemm(c.xq_blk, c.xs_blk, *c.blk[i], BLOCK, c.bias, torch.bfloat16),
            "block",
        )
    return out


def _with_pointers(fn):
    with pointer_operands():
        return fn()


# ---- parallel compilation -----------------------------------------------------------------------------------


class _Recorder:
    """Stands in for an autotuned kernel: records the launcher's arguments instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((args, meta))


def _tuned_targets(old_row, old_block):
    """(name, module, attribute of the autotuned kernel, launcher taking a Case, prune, force pointers)."""
    targets = [
        ("row", row_gemm, "_row_scaled_gemm_tuned", "row", _gemm_common.prune_by_batch, False),
        ("block", block_gemm, "_block_scaled_gemm_tuned", "block", block_gemm._prune, False),
        ("block_ptr", block_gemm, "_block_scaled_gemm_tuned", "block", block_gemm._prune, True),
    ]
    if old_row is not None:
        targets += [
            ("row_old", old_row, "_row_scaled_gemm_tuned", "row", None, False),
            ("block_old", old_block, "_block_scaled_gemm_tuned", "block", old_block._prune, False),
        ]
    return targets


def _record_launch(module, attr, kind, case: Case, pointers: bool):
    tuned = getattr(module, attr)
    recorder = _Recorder()
    setattr(module, attr, recorder)
    try:
        with pointer_operands() if pointers else contextlib.nullcontext():
            if kind == "row":
                module.row_scaled_gemm(case.xq_row, case.xs_row, *case.row[0], case.bias, torch.bfloat16)
            else:
                module.block_scaled_gemm(case.xq_blk, case.xs_blk, *case.blk[0], BLOCK, case.bias, torch.bfloat16)
    finally:
        setattr(module, attr, tuned)
    return tuned, recorder.calls[0]


def _compile_task(task):
    try:
        return _compile_one(*task)
    except Exception as exc:
        return f"{task[1]}[{task[2]}] failed: {type(exc).__name__}: {str(exc)[:200]}"


def _compile_one(baseline, target_name, config_index, cases):
    old_row, old_block = load_baseline(baseline)
    target = {t[0]: t for t in _tuned_targets(old_row, old_block)}[target_name]
    _, module, attr, kind, prune, pointers = target
    done, t0 = 0, time.time()
    for k, n, m in cases:
        case = Case(k, n, m, 1, empty=True)
        tuned, (args, meta) = _record_launch(module, attr, kind, case, pointers)
        cfg = tuned.configs[config_index]
        named = dict(zip(tuned.fn.arg_names, args))
        if prune is not None and cfg not in prune(tuned.configs, named, **meta):
            continue
        full = dict(named, **meta, **cfg.kwargs)
        if cfg.pre_hook is not None:
            cfg.pre_hook(full)
        try:
            tuned.fn.warmup(*args, grid=(1,), **meta, **cfg.all_kwargs())
            done += 1
        except Exception as exc:  # out of shared memory etc.: the autotuner skips these too
            return f"{target_name}[{config_index}] {type(exc).__name__}: {str(exc)[:120]}"
    return f"{target_name}[{config_index}] compiled {done} in {time.time() - t0:.1f}s"


def precompile(baseline, cases, jobs: int) -> None:
    old_row, old_block = load_baseline(baseline)
    tasks = []
    for name, module, attr, *_ in _tuned_targets(old_row, old_block):
        for i in range(len(getattr(module, attr).configs)):
            tasks.append((baseline, name, i, cases))
    t0 = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool:
        for line in pool.imap_unordered(_compile_task, tasks):
            print("  precompile", line, flush=True)
    print(f"precompiled {len(tasks)} (target, config) pairs in {time.time() - t0:.1f}s", flush=True)


# ---- timing -------------------------------------------------------------------------------------------------


def time_us(fn, copies: int) -> float:
    def run_all():
        for i in range(copies):
            fn(i)

    run_all()  # autotune before capture
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(run_all, rep=30, return_mode="median")
    return ms * 1000.0 / copies


def references(case: Case):
    """float64 products: of the unquantized bf16 layer, and of the dequantized row / block operands (copy 0)."""
    bias = case.bias.double()
    true = case.x.double() @ case.w[0].double().t() + bias
    x_row = (case.xq_row.double() * case.xs_row.double()).float()
    w_row = dequantize(*case.row[0], (1, case.k))
    mode = ActivationMode("dynamic", "block", BLOCK)
    x_blk = dequantize_activation(case.xq_blk, case.xs_blk, mode)
    w_blk = dequantize(*case.blk[0], (BLOCK, BLOCK))
    dq = {
        "row": x_row.double() @ w_row.double().t() + bias,
        "block": x_blk.double() @ w_blk.double().t() + bias,
        "bf16": true,
    }
    return true, dq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="3072x9216,12288x3072,3072x21504", help="in x out, comma separated")
    parser.add_argument("--ms", default="16,1024,4608,16384")
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--out", default=".")
    parser.add_argument("--only", default="", help="comma-separated method names (default: all)")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)
    ms = [int(v) for v in args.ms.split(",")]
    only = set(filter(None, args.only.split(",")))
    props = torch.cuda.get_device_properties(0)
    print(
        f"GPU {props.name} | torch {torch.__version__} | triton {triton.__version__} | python "
        f"{platform.python_version()}",
        flush=True,
    )
    if args.jobs:
        precompile(args.baseline, [(k, n, m) for k, n in shapes for m in ms], args.jobs)
    old_row, old_block = load_baseline(args.baseline)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "int8_gemm.csv")
    for k, n in shapes:
        copies = max(1, math.ceil(2 * L2_BYTES / (n * k)))
        for m in ms:
            case = Case(k, n, m, copies)
            true, dq = references(case)
            bf16_us = None
            print(f"\n{k}->{n}  M={m}  (R={copies} weight copies)", flush=True)
            for name, (fn, kind) in methods(case, old_row, old_block).items():
                if only and name not in only and name != "bf16":
                    continue
                t0 = time.time()
                try:
                    us = time_us(fn, copies)
                except Exception as exc:
                    print(f"  {name:16s} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                bf16_us = us if name == "bf16" else bf16_us
                tops = 2 * m * n * k / us / 1e6
                s_true = s_dq = float("nan")
                if kind is not None:
                    y = fn(0)
                    s_true, s_dq = sqnr(true, y), sqnr(dq[kind], y)
                row = {
                    "in": k, "out": n, "M": m, "method": name, "us": round(us, 2),
                    "x_bf16": round(bf16_us / us, 3), "TOPS": round(tops, 1),
                    "sqnr": round(s_true, 1), "sqnr_dq": round(s_dq, 1), "wall_s": round(time.time() - t0, 1),
                }  # fmt: skip
                rows.append(row)
                print(
                    f"  {name:16s} {us:9.1f} us  x{row['x_bf16']:<6} {tops:7.1f} TOPS  sqnr {s_true:5.1f}  "
                    f"sqnr_dq {s_dq:5.1f}  ({row['wall_s']} s)",
                    flush=True,
                )
                with open(csv_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
            del case, true, dq
            torch.cuda.empty_cache()
    for label, tuned in (("row", row_gemm._row_scaled_gemm_tuned), ("block", block_gemm._block_scaled_gemm_tuned)):
        for key, cfg in tuned.cache.items():
            print(f"best {label} {key}: {cfg}")
    print(f"\nwrote {csv_path}")


if __name__ == "__main__":
    main()
