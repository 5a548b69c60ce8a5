"""Per-token FP8 activation quantization at M = 4608: the Triton pass's launch shapes against Inductor's fused code.

    python benchmarks/dev_act_quant.py --csv act_quant.csv

Development probe for issue #3 (the Flux-like block stack). In the compiled stack the GELU output (K = 12288) is
quantized by one Inductor reduction kernel that recomputes the GELU in its two loops; the profile showed ~190 us per
call, against ~73 us for the GELU alone and ~40 us for one read and one write of the activation. This times, per
K in 3072 and 12288 (CUDA-graph replays, median; ``dev_small_m_sweep.graph_us``):

* ``triton`` launch shapes of ``act_quant._quantize_groups_kernel`` (rows per program, tile width, warps; the
  current rule's shape is marked), bit-identical to the reference by construction;
* compiled ``quantize_activation`` (fast: the reference ops left to Inductor) and ``quantize_activation_fusable``
  (exact), alone and after a tanh GELU, and the GELU alone;
* the GELU followed by the Triton pass inside one compiled graph (the op is opaque, so the GELU is its own kernel).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dev_small_m_sweep import graph_us  # noqa: E402

from lrq_ao.kernels import act_quant  # noqa: E402
from lrq_ao.layouts.activation import ActivationMode, quantize_activation, quantize_activation_fusable  # noqa: E402
from lrq_ao.primitives import FP8_DTYPE, qmax_of  # noqa: E402

M = 4608
FAST, EXACT = ActivationMode("dynamic", "row", exact=False), ActivationMode("dynamic", "row")


def triton_shape(x, rows: int, tile_k: int, warps: int):
    m, k = x.shape
    xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)

    def call():
        act_quant._quantize_groups_kernel[(triton.cdiv(m, rows), 1)](
            x, xq, scale, m, x.stride(0), xq.stride(0), scale.stride(0), k,
            QMAX=qmax_of(FP8_DTYPE), IS_FP8=True, ROWS=rows, TILE_K=tile_k, TWO_PASS=tile_k < k, num_warps=warps,
        )  # fmt: skip

    return call


def gelu_then_triton(x):
    return torch.ops.lrq_ao.quantize_activation(F.gelu(x, approximate="tanh"), "float8_e4m3fn", "row", 128)


def methods(x) -> dict:
    k = x.shape[1]
    current = act_quant._row_launch_shape(M, k)
    found = {}
    for rows, tile_k, warps in [(1, 4096, 4), (1, 4096, 8), (1, 2048, 4), (1, 8192, 8), (1, 16384, 16), (2, 4096, 8),
                                (4, 1024, 4), (1, triton.next_power_of_2(k), 8)]:  # fmt: skip
        label = f"triton rows{rows} tile{tile_k} w{warps}" + (" (current)" if (rows, tile_k) == current[:2] else "")
        found.setdefault(label, triton_shape(x, rows, tile_k, warps))
    compiled = {
        "compiled fast": lambda x: quantize_activation(x, FP8_DTYPE, FAST),
        "compiled exact": lambda x: quantize_activation_fusable(x, FP8_DTYPE, EXACT),
        "gelu alone": lambda x: F.gelu(x, approximate="tanh"),
        "gelu + fast": lambda x: quantize_activation(F.gelu(x, approximate="tanh"), FP8_DTYPE, FAST),
        "gelu + exact": lambda x: quantize_activation_fusable(F.gelu(x, approximate="tanh"), FP8_DTYPE, EXACT),
        "gelu + triton op": gelu_then_triton,
    }
    for name, fn in compiled.items():
        fn = torch.compile(fn, fullgraph=True)
        found[name] = lambda fn=fn: fn(x)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=os.path.join(os.environ.get("OUT", "."), "act_quant.csv"))
    args = parser.parse_args()
    import lrq_ao.kernels

    lrq_ao.kernels.load_all()
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    with open(args.csv, "w", newline="") as f, torch.inference_mode():
        writer = csv.writer(f)
        writer.writerow(["M", "K", "method", "median_us", "gbs_read_write"])
        for k in (3072, 12288):
            x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            moved = M * k * 3  # bf16 read + fp8 write
            print(f"\nM={M} K={k}")
            for name, call in methods(x).items():
                us = graph_us([call])
                print(f"  {name:34s} {us:8.1f} us  {moved / us / 1e3:6.0f} GB/s")
                writer.writerow([M, k, name, round(us, 2), round(moved / us / 1e3)])
                sys.stdout.flush()


if __name__ == "__main__":
    main()
