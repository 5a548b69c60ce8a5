"""Weight-only small-M GEMV: every fixed launch configuration of ``_small_m_kernel`` on every Flux / T5 shape.

    python benchmarks/dev_small_m_sweep.py --csv sweep.csv            # 7 shapes x M in 1, 16 x INT8, FP8 per-row
    python benchmarks/dev_small_m_sweep.py --compile-jobs 14 ...      # fill the disk cache in parallel first

Development probe for issue #3 (weight-only at M <= 16 >= 1.3x bf16): the autotuner times single launches
(``do_bench``) while the product is timed as CUDA-graph replays, and its picks varied between runs. This times each
configuration (``BLOCK_N`` x ``BLOCK_K`` x warps x stages, ``SPLIT_K`` in 1, 2, 4, 8) the way ``bench_linear.py``
times methods: a CUDA graph walking enough weight copies that every call reads its weight from HBM, replayed, the
median of the replays. Per (shape, M, dtype) it prints the five fastest configurations, the autotuned one and bf16
``F.linear``, and GB/s against the measured copy bandwidth; every row goes to the CSV.

Compiling ~100 kernel variants one by one takes minutes: ``--compile-jobs`` first launches each variant once in
worker processes (Triton's disk cache keeps the binaries), so the timing process only loads them.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import FLUX, T5, copies_for, copy_bandwidth_gbs, machine_line  # noqa: E402

from lrq_ao.primitives import FP8_DTYPE, FormatSpec, quantize_rtn  # noqa: E402

QDTYPES = {"int8": torch.int8, "fp8": FP8_DTYPE}
TILES = list(itertools.product((32, 64, 128), (128, 256, 512), ((4, 3), (4, 5), (8, 4))))
SPLITS = (1, 2, 4, 8)


def launch_config(block_n: int, block_k: int, warps_stages: tuple[int, int], split_k: int) -> dict:
    warps, stages = warps_stages
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "num_warps": warps, "num_stages": stages}


def run(x, wq, ws, bias, config: dict | None) -> torch.Tensor:
    from lrq_ao.kernels import weight_only_gemm as wo

    out = torch.empty((x.shape[0], wq.shape[0]), dtype=x.dtype, device=x.device)
    return wo.small_m_linear(x, wq, ws, wo.SCALE_ROW, 1, bias, out, config)


def graph_us(calls, replays: int = 7, target_ms: float = 2.0) -> float:
    """Median GPU microseconds per call over ``replays`` replays of a graph of about ``target_ms``."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls:
        call()
    end.record()
    torch.cuda.synchronize()
    repeat = max(1, int(target_ms / max(start.elapsed_time(end), 1e-3)))
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(repeat):
            for call in calls:
                call()
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (repeat * len(calls)))
    return sorted(times)[len(times) // 2]


def operands(k: int, n: int, m: int, qdtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(k + n)
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
    wq, ws, _ = quantize_rtn(w, FormatSpec(qdtype, "row"))
    qcopies = [wq] + [wq.clone() for _ in range(copies_for(wq.numel()) - 1)]
    wb = w.to(torch.bfloat16)
    bcopies = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2) - 1)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    return x, qcopies, ws, bias, bcopies


SHARED_MEMORY_BYTES = 220 * 1024  # Hopper allows 227 KB per block; leave room for Triton's own scratch


def fits_shared_memory(tile) -> bool:
    block_n, block_k, (_, stages) = tile
    return stages * (block_n * block_k + 16 * block_k * 2) <= SHARED_MEMORY_BYTES  # 8-bit weight + 16-row bf16 x


def usable(n: int, k: int, tile, split: int) -> bool:
    """Launches that fill the GPU, give each split at least two K steps and fit their pipeline in shared memory."""
    programs = triton.cdiv(n, tile[0]) * split
    return 64 <= programs <= 4096 and (split == 1 or k >= 2 * split * tile[1]) and fits_shared_memory(tile)


def compile_worker(names: list[str]) -> None:
    """Launch each named (dtype, tile, split-class) once on a small problem: fills Triton's disk cache."""
    for name in names:
        dtype, index, split = name.split(":")
        if fits_shared_memory(TILES[int(index)]):
            x, qcopies, ws, bias, _ = operands(3072, 3072, 16, QDTYPES[dtype])
            run(x, qcopies[0], ws, bias, launch_config(*TILES[int(index)], int(split)))
    torch.cuda.synchronize()


def precompile(jobs: int) -> None:
    names = [f"{d}:{i}:{s}" for d in QDTYPES for i in range(len(TILES)) for s in (1, 2)]
    chunks = [names[i::jobs] for i in range(jobs)]
    procs = [subprocess.Popen([sys.executable, __file__, "--compile-worker", *chunk]) for chunk in chunks if chunk]
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:
        raise SystemExit(f"precompile failed in {len(failed)} workers")


def gemv_calls(x, qcopies, ws, bias, config: dict | None) -> list:
    return [lambda q=q: run(x, q, ws, bias, config) for q in qcopies]


def sweep_case(k: int, n: int, m: int, dname: str, copy_gbs: float, writer) -> None:
    """Every usable configuration, the autotuned one and bf16 on one (shape, M, dtype)."""
    from lrq_ao.kernels import weight_only_gemm as wo

    qdtype = QDTYPES[dname]
    x, qcopies, ws, bias, bcopies = operands(k, n, m, qdtype)
    moved = n * k + 4 * n + 2 * (m * k + m * n + n)
    bf16 = graph_us([lambda w=w: F.linear(x, w, bias) for w in bcopies])
    rows = []
    for tile, split in itertools.product(TILES, SPLITS):
        if usable(n, k, tile, split):
            us = graph_us(gemv_calls(x, qcopies, ws, bias, launch_config(*tile, split)))
            rows.append((us, f"{tile[0]}x{tile[1]} w{tile[2][0]} s{tile[2][1]} split{split}"))
    auto = graph_us(gemv_calls(x, qcopies, ws, bias, None))
    picked = [
        c
        for key, c in wo._small_m_tuned.cache.items()
        if key[:3] == (n, k, wo.m_bucket(m)) and any(str(qdtype) in str(part) for part in key)
    ]
    kw = picked[-1].kwargs if picked else {}
    auto_name = f"auto {kw.get('BLOCK_N')}x{kw.get('BLOCK_K')} split{kw.get('SPLIT_K')}"
    rows.sort()
    print(f"\n{k}->{n} M={m} {dname}: bf16 {bf16:.1f} us; {len(rows)} configs")
    for us, name in rows[:5] + [(auto, auto_name)]:
        gbs = moved / (us * 1e-6) / 1e9
        print(f"  {name:32s} {us:7.1f} us  x{bf16 / us:5.2f}  {gbs:6.0f} GB/s ({100 * gbs / copy_gbs:3.0f}%)")
    for us, name in rows + [(auto, auto_name), (bf16, "bf16 F.linear")]:
        writer.writerow([k, n, m, dname, name, round(us, 2), round(bf16 / us, 3)])
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=os.path.join(os.environ.get("OUT", "."), "small_m_sweep.csv"))
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--shapes", nargs="+", help="KxN (in x out); default: the 7 Flux / T5 shapes")
    parser.add_argument("--compile-jobs", type=int, default=0, help="fill Triton's disk cache in N processes first")
    parser.add_argument("--compile-only", action="store_true", help="with --compile-jobs: fill the cache, no timing")
    parser.add_argument("--compile-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_worker:
        return compile_worker(args.compile_worker)
    if args.compile_jobs:
        precompile(args.compile_jobs)
        if args.compile_only:
            return None
    print(machine_line())
    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else FLUX + T5
    with open(args.csv, "w", newline="") as f, torch.inference_mode():
        writer = csv.writer(f)
        writer.writerow(["K", "N", "M", "dtype", "config", "median_us", "ratio_vs_bf16_eager"])
        for (k, n), m, dname in itertools.product(shapes, [int(m) for m in args.batches.split(",")], QDTYPES):
            sweep_case(k, n, m, dname, copy_gbs, writer)


if __name__ == "__main__":
    main()
