"""Where learned rounding spends its time on the GPU: the Triton block sweeps vs the PyTorch loops (GPTQ, greedy),
the calibrated default per Flux shape, a torch.profiler breakdown of the svd objective and its iteration sweep.

    OUT=. python3 benchmarks/dev_rounding_profile.py          # on a CUDA GPU; writes $OUT/profile.csv
    SMOKE=1 OUT=/tmp python3 benchmarks/dev_rounding_profile.py   # tiny shapes on CPU (a smoke test, not a measurement)

The numbers in DEVELOPMENT.md "Speed" (1024 x 1024 loop vs kernel, the svd profile, the iteration sweep) come from
this script; its H100 output is benchmarks/results/h100_rounding_profile.csv.
"""

import csv
import os
import time

import torch

from lrq_ao.config import LearnedRoundingConfig
from lrq_ao.primitives import FORMATS, dequantize, quantize_rtn
from lrq_ao.rounding import LinearStats, quantize_weight
from lrq_ao.rounding.gptq import gptq_indices
from lrq_ao.rounding.greedy import greedy_refine
from lrq_ao.rounding.grid import Grid, full_scale
from lrq_ao.rounding.objectives import Objective, output_objective, svd_rank, truncated_svd

SMOKE = os.environ.get("SMOKE") == "1"
dev = "cpu" if SMOKE else "cuda"
OUT = os.environ.get("OUT", "/tmp")
rows = []


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, *args, reps=1, **kwargs):
    """(result, seconds per call) after one warm-up call."""
    fn(*args, **kwargs)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        r = fn(*args, **kwargs)
    sync()
    return r, (time.perf_counter() - t0) / reps


def stats_for_k(k, tokens=4096):
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(tokens, k, device=dev, generator=gen) * torch.linspace(0.1, 4.0, k, device=dev)
    return LinearStats(x.T @ x / tokens, x.mean(0), tokens)


gen = torch.Generator().manual_seed(0)
print("== A: kernel vs loop, GPTQ + greedy (output objective), 1024x1024")
n = k = 128 if SMOKE else 1024
for fmt in ("fp8", "int8_block"):
    w = (torch.randn(n, k, generator=gen) * 0.02).to(dev)
    spec = FORMATS[fmt]
    _, scale, bs = quantize_rtn(w, spec)
    s = full_scale(scale, bs)
    grid = Grid(spec.qdtype, dev)
    st = stats_for_k(k)
    h = st.h
    obj = output_objective(h)
    res = {}
    for kern in (False, True):
        if kern and SMOKE:
            continue
        ig, tg = timed(gptq_indices, w, s, grid, h, kernel=kern)
        ir, tr = timed(greedy_refine, ig, w, s, grid, obj, passes=2, kernel=kern)
        lg = float(obj.loss(grid.values[ig] * s - w))
        lr = float(obj.loss(grid.values[ir] * s - w))
        res[kern] = (ig, ir)
        print(f"{fmt} kernel={kern}: gptq {tg * 1e3:.1f} ms obj {lg:.6g}; greedy x2 {tr * 1e3:.1f} ms obj {lr:.6g}")
        rows.append(dict(part="A", fmt=fmt, shape=f"{n}x{k}", what=f"gptq kernel={kern}", seconds=tg, obj=lg))
        rows.append(dict(part="A", fmt=fmt, shape=f"{n}x{k}", what=f"greedy kernel={kern}", seconds=tr, obj=lr))
    if True in res:
        gptq_diff = int((res[True][0] != res[False][0]).sum())
        greedy_diff = int((res[True][1] != res[False][1]).sum())
        print(f"  differing indices gptq {gptq_diff}, greedy {greedy_diff} of {n * k}")

SHAPES = (
    [(128, 256), (256, 128)]
    if SMOKE
    else [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]
)
print("== B: calibrated default (objective=output) quantize_weight seconds, with parts")
for fmt in ("fp8", "int8_block"):
    for shape in SHAPES:
        w = (torch.randn(*shape, generator=gen) * 0.02).to(dev)
        st = stats_for_k(shape[1])
        cfg = LearnedRoundingConfig(format=fmt, objective="output", device=dev)
        r, t = timed(quantize_weight, w, cfg, name="b", stats=st)
        spec = FORMATS[fmt]
        _, scale, bs = quantize_rtn(w, spec)
        s = full_scale(scale, bs)
        grid = Grid(spec.qdtype, dev)
        ig, tg = timed(gptq_indices, w, s, grid, st.h)
        obj = output_objective(st.h)
        _, tr = timed(greedy_refine, ig, w, s, grid, obj, passes=2)
        print(
            f"{fmt} {shape}: total {t:.3f} s (gptq {tg:.3f}, greedy {tr:.3f}) "
            f"obj rtn {r.report['objective_rtn']:.5g} -> {r.report['objective_final']:.5g}",
            flush=True,
        )
        rows.append(
            dict(
                part="B",
                fmt=fmt,
                shape="x".join(map(str, shape)),
                what="output total",
                seconds=t,
                obj=r.report["objective_final"],
            )
        )

print("== C: svd objective: SVD time, iteration sweep (exact objective)")
if not SMOKE:
    w = (torch.randn(3072, 12288, generator=gen) * 0.02).to(dev)
    cfg = LearnedRoundingConfig(format="fp8", objective="svd", relaxation="parallel", num_iter=20, device=dev)
    quantize_weight(w, cfg, name="p")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        quantize_weight(w, cfg, name="p")
        sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
FLUX = [(128, 256), (256, 128)] if SMOKE else [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288)]
ITERS = (5, 10) if SMOKE else (10, 20, 30, 50, 100)
for shape in FLUX:
    w = (torch.randn(*shape, generator=gen) * 0.02).to(dev)
    kk = svd_rank(*shape, 0.2, 256, 1280) if not SMOKE else 8
    (u, v), tsvd = timed(truncated_svd, w, kk)
    uf, _, vh = torch.linalg.svd(w, full_matrices=False)
    exact = Objective("svd", right=vh[:kk].T.contiguous(), left=uf[:, :kk].contiguous(), rank=kk)
    print(f"{shape}: truncated_svd {tsvd * 1e3:.1f} ms")
    for fmt in ("fp8", "int8_block"):
        q, sc, b = quantize_rtn(w, FORMATS[fmt])
        o_rtn = float(exact.loss(dequantize(q, sc, b) - w))
        line = f"  {fmt} rtn {o_rtn:.4f}"
        for it in ITERS:
            cfg = LearnedRoundingConfig(
                format=fmt,
                objective="svd",
                relaxation="parallel",
                num_iter=it,
                check_every=10,
                device=dev,
                **({"min_k": 4, "max_k": 8} if SMOKE else {}),
            )
            r, t = timed(quantize_weight, w, cfg, name="c")
            o = float(exact.loss(dequantize(r.qdata, r.scale, r.block_size) - w))
            line += f" | {it}: {o:.4f} {t * 1e3:.0f}ms"
            rows.append(
                dict(part="C", fmt=fmt, shape="x".join(map(str, shape)), what=f"svd iters={it}", seconds=t, obj=o)
            )
        print(line, flush=True)

with open(os.path.join(OUT, "profile.csv"), "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
