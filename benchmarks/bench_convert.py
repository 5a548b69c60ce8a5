"""Converter throughput on a Flux-size synthetic checkpoint (real Flux.1 key names and shapes, ~11.9B parameters).

Writes the bf16 checkpoint, evicts it from the page cache, measures the disk's cold sequential read rate, then runs
``lrq-convert --simple`` (round-to-nearest) in a fresh process and reports seconds, GB/s and peak host RAM. The
disk should be the limit: compare the conversion's input rate with the cold read rate.

    python benchmarks/bench_convert.py --device cuda --dir /tmp/bench --out results.csv
    python benchmarks/bench_convert.py --scale 0.0625 --device cpu       # a tiny run to try it on CPU
    python benchmarks/bench_convert.py --nproc 4 --rounding="--objective svd"   # learned rounding, 4 GPUs (torchrun)

``--scale`` multiplies the hidden width (3072) and MLP width; block counts (19 double, 38 single) stay real.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrq_ao.convert.stream import OutputEntry, StreamingWriter, layout_entries  # noqa: E402

GB = 1e9


def flux_shapes(scale: float = 1.0, double: int = 19, single: int = 38) -> dict[str, tuple[int, ...]]:
    """Flux.1-dev tensor names and shapes (BFL/ComfyUI layout), width scaled by ``scale``."""
    h = max(128, int(3072 * scale) // 128 * 128)
    mlp, head = 4 * h, 128
    s: dict[str, tuple[int, ...]] = {
        "img_in.weight": (h, 64),
        "img_in.bias": (h,),
        "txt_in.weight": (h, 4096),
        "txt_in.bias": (h,),
        "final_layer.linear.weight": (64, h),
        "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
        "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    for emb, width in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        s[f"{emb}.in_layer.weight"], s[f"{emb}.in_layer.bias"] = (h, width), (h,)
        s[f"{emb}.out_layer.weight"], s[f"{emb}.out_layer.bias"] = (h, h), (h,)
    for i in range(double):
        for side in ("img", "txt"):
            p = f"double_blocks.{i}.{side}"
            for name, shape in (
                (f"{p}_mod.lin", (6 * h, h)),
                (f"{p}_attn.qkv", (3 * h, h)),
                (f"{p}_attn.proj", (h, h)),
                (f"{p}_mlp.0", (mlp, h)),
                (f"{p}_mlp.2", (h, mlp)),
            ):
                s[name + ".weight"], s[name + ".bias"] = shape, (shape[0],)
            s[f"{p}_attn.norm.query_norm.scale"] = (head,)
            s[f"{p}_attn.norm.key_norm.scale"] = (head,)
    for i in range(single):
        p = f"single_blocks.{i}"
        for name, shape in (
            (f"{p}.linear1", (3 * h + mlp, h)),
            (f"{p}.linear2", (h, h + mlp)),
            (f"{p}.modulation.lin", (3 * h, h)),
        ):
            s[name + ".weight"], s[name + ".bias"] = shape, (shape[0],)
        s[f"{p}.norm.query_norm.scale"] = (head,)
        s[f"{p}.norm.key_norm.scale"] = (head,)
    return s


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], device: str) -> float:
    """Write random bf16 tensors (generated on ``device``) tensor by tensor; returns seconds including fsync."""
    entries, _ = layout_entries([OutputEntry(n, "BF16", shape) for n, shape in shapes.items()])
    t0 = time.perf_counter()
    writer = StreamingWriter(path, entries, {"bench": "flux-like synthetic"})
    gen = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02)
        writer.write(name, t.cpu())
    writer.finish()
    return time.perf_counter() - t0


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (no root needed) so the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_read_rate(path: Path, chunk: int = 64 << 20, limit: int = 8 << 30) -> float:
    """Sequential read rate of the first ``limit`` bytes after evicting the file from the page cache."""
    evict(path)
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while total < limit and (n := f.readinto(view)):
            total += n
    rate = total / (time.perf_counter() - t0)
    evict(path)
    return rate


def _vmhwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # the child has exited between polls
    return 0


def run_conversion(
    src: Path, dst: Path, device: str, report: Path, nproc: int = 1, rounding: tuple[str, ...] = ("--simple",)
) -> tuple[float, int, dict]:
    """Run lrq-convert in a fresh process. Returns (seconds, the child's peak RSS, report). The peak is polled from
    /proc (VmHWM of the child's own address space): ru_maxrss would include this parent's RSS, copied at fork.
    With ``nproc`` > 1 the conversion runs under torchrun (one rank per GPU); the peak is then torchrun's own."""
    launcher = [sys.executable, "-m", "lrq_ao.convert"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        launcher += ["-m", "lrq_ao.convert"]
    cmd = [
        *launcher, "-i", str(src), "-o", str(dst), *rounding, "--quiet",
        "--device", device, "--overwrite", "--report", str(report),
    ]  # fmt: skip
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _vmhwm(child.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"conversion failed:\n{child.stderr.read()}")
    return seconds, peak, json.loads(report.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="width multiplier (1.0 = Flux.1-dev size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", default="/tmp/lrq_bench_convert", help="folder for the input and output files")
    p.add_argument("--out", help="CSV file for the results row")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    p.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) for a torchrun conversion; 1 = one process")
    p.add_argument(
        "--rounding",
        default="--simple",
        help='lrq-convert rounding flags; write it with "=", e.g. --rounding="--objective svd --num_iter 100"',
    )
    args = p.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    src, dst, report = folder / "flux_synth_bf16.safetensors", folder / "flux_synth_fp8.safetensors", folder / "r.json"
    shapes = flux_shapes(args.scale)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"synthetic Flux checkpoint: {len(shapes)} tensors, {params / 1e9:.2f}B parameters", flush=True)
    write_s = write_checkpoint(src, shapes, args.device)
    in_bytes = src.stat().st_size
    print(
        f"wrote {in_bytes / GB:.1f} GB in {write_s:.1f} s ({in_bytes / write_s / GB:.2f} GB/s incl. fsync)", flush=True
    )
    read_rate = cold_read_rate(src)
    print(f"cold sequential read: {read_rate / GB:.2f} GB/s", flush=True)
    seconds, child_peak, rep = run_conversion(src, dst, args.device, report, args.nproc, tuple(args.rounding.split()))
    out_bytes = dst.stat().st_size
    row = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "scale": args.scale,
        "nproc": args.nproc,
        "rounding": args.rounding,
        "params_b": round(params / 1e9, 3),
        "layers_quantized": rep["totals"]["quantized_layers"],
        "input_gb": round(in_bytes / GB, 3),
        "output_gb": round(out_bytes / GB, 3),
        "convert_s": round(seconds, 2),
        "convert_in_gbps": round(in_bytes / seconds / GB, 3),
        "convert_in_plus_out_gbps": round((in_bytes + out_bytes) / seconds / GB, 3),
        "cold_read_gbps": round(read_rate / GB, 3),
        "write_gbps": round(in_bytes / write_s / GB, 3),
        "peak_rss_growth_mb": round((rep["totals"]["peak_rss_bytes"] or 0) / 2**20, 1),
        "child_peak_rss_mb": round(child_peak / 2**20, 1),  # imports and CUDA context included
        "largest_tensor_mb": round(max(torch.Size(s).numel() for s in shapes.values()) * 2 / 2**20, 1),
        "min_sqnr_db": rep["totals"]["min_sqnr_db"],
    }
    width = max(len(k) for k in row)
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerow(row)
    if not args.keep:
        src.unlink()
        dst.unlink()


if __name__ == "__main__":
    main()
