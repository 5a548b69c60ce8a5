"""GPU check of the fused ConvRot pass against its reference: how many codes and scales differ, and by how much.

python3 benchmarks/dev_convrot_check.py
"""

from __future__ import annotations

import torch

from lrq_ao.formats.convrot import rotate_exact
from lrq_ao.kernels import load_all
from lrq_ao.kernels.rotate_quant import rotate_quantize_activation_reference, rotate_quantize_activation_triton


def main() -> None:
    load_all()
    torch.manual_seed(0)
    print("dtype      M      K     G  codes!=  max|dq|  scales!=  max rel ds  rot(torch cuda)==rot(cpu)")
    for dtype in (torch.bfloat16, torch.float32):
        for m, k, g in [(1, 64, 16), (16, 3072, 256), (16, 256, 256), (16, 64, 16), (4, 12288, 256), (4, 1024, 1024)]:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            q, s = rotate_quantize_activation_triton(x, g)
            qr, sr = rotate_quantize_activation_reference(x, g)
            d = (q.int() - qr.int()).abs()
            rel = ((s - sr).abs() / sr).max()
            same_rot = torch.equal(rotate_exact(x, g).cpu(), rotate_exact(x.cpu(), g))
            print(
                f"{str(dtype)[6:]:9} {m:3} {k:6} {g:5} {int((d > 0).sum()):7} {int(d.max()):8} "
                f"{int((s != sr).sum()):9} {float(rel):11.2e}  {same_rot}"
            )


if __name__ == "__main__":
    main()
