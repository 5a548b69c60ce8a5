"""ConvRot activation rotation + per-token INT8 quantization: the fused Triton pass against rotating first.

    python benchmarks/dev_rotate_quant.py [--group 256] [--csv rotate_quant.csv]

Development probe for the issue "INT8 ConvRot end to end". Per M in {1, 16, 1024, 4608} and K in {3072, 12288,
15360} (bf16 activations), CUDA-graph replays (``triton.testing.do_bench_cudagraph``, p20 / p50 / p80 in us):

* ``fused``: ``lrq_ao::rotate_quant_int8`` (``kernels.rotate_quant``), one read of x, one write of the codes;
* ``rotate+quant``: kitchen's way, ``x.view(M, K / G, G) @ H`` in bf16 then ``lrq_ao::quantize_activation``
  (per row INT8): the rotated activation goes through memory once more;
* ``quant only``: ``lrq_ao::quantize_activation`` without rotation, the floor the fused pass can reach.

GB/s counts the bytes a single pass must move (read x, write int8 codes and float32 scales) and is set against the
device-to-device copy bandwidth measured in the same run. The fused result is checked bit-identical to
``rotate_quantize_activation_reference`` on every shape first.
"""

from __future__ import annotations

import argparse
import csv

import torch
import triton
import triton.testing

from lrq_ao.formats.convrot import hadamard
from lrq_ao.kernels import act_quant, rotate_quant  # noqa: F401  (registers both ops)
from lrq_ao.kernels.rotate_quant import rotate_quantize_activation_reference

MS = (1, 16, 1024, 4608)
KS = (3072, 12288, 15360)
QUANTILES = [0.2, 0.5, 0.8]


def timed_us(fn) -> list[float]:
    return [t * 1e3 for t in triton.testing.do_bench_cudagraph(fn, quantiles=QUANTILES)]


def copy_gbps() -> float:
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench_cudagraph(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def methods(x: torch.Tensor, group: int) -> dict:
    m, k = x.shape
    h = hadamard(group, x.dtype, x.device)
    return {
        "fused": lambda: torch.ops.lrq_ao.rotate_quant_int8(x, group),
        "rotate+quant": lambda: torch.ops.lrq_ao.quantize_activation(
            torch.matmul(x.view(m, k // group, group), h).view(m, k), "int8", "row", 128
        ),
        "quant only": lambda: torch.ops.lrq_ao.quantize_activation(x, "int8", "row", 128),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=256)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | G={args.group}")
    copy = copy_gbps()
    print(f"copy bandwidth (512 MiB D2D): {copy:.0f} GB/s")
    print(f"{'M':>5} {'K':>6} {'method':<13} {'p20 us':>8} {'p50 us':>8} {'p80 us':>8} {'GB/s':>7} {'% copy':>7}")
    rows = []
    for m in MS:
        for k in KS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s = torch.ops.lrq_ao.rotate_quant_int8(x, args.group)
            q_ref, s_ref = rotate_quantize_activation_reference(x, args.group)
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref), f"fused pass differs from reference at {m}x{k}"
            moved = m * k * (x.element_size() + 1) + m * 4
            for name, fn in methods(x, args.group).items():
                p20, p50, p80 = timed_us(fn)
                gbps = moved / (p50 * 1e-6) / 1e9
                pct = 100 * gbps / copy
                print(f"{m:>5} {k:>6} {name:<13} {p20:>8.1f} {p50:>8.1f} {p80:>8.1f} {gbps:>7.0f} {pct:>6.0f}%")
                rows.append(dict(m=m, k=k, method=name, p20_us=p20, p50_us=p50, p80_us=p80, gbps=gbps, pct_copy=pct))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
