"""Peak host memory of a conversion stays near a few of the largest tensors, not the checkpoint size."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lrq_ao.convert.stream import OutputEntry, StreamingWriter, layout_entries

ROWS, COLS, COUNT = 1024, 1024, 128  # 128 bf16 weights of 2 MiB: a 256 MiB checkpoint
ALLOWED_PEAK = 64 * 2**20  # a quarter of the file


def write_big_checkpoint(path):
    """Written tensor by tensor so the test process itself never holds the whole checkpoint."""
    names = [f"blocks.{i}.mlp.fc{i % 2}.weight" for i in range(COUNT)]
    entries, _ = layout_entries([OutputEntry(n, "BF16", (ROWS, COLS)) for n in names])
    writer = StreamingWriter(path, entries, {})
    g = torch.Generator().manual_seed(0)
    for name in names:
        writer.write(name, torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16))
    writer.finish()


@pytest.mark.slow
def test_peak_rss_is_bounded_by_a_few_tensors(tmp_path):
    src = tmp_path / "big.safetensors"
    write_big_checkpoint(src)
    size = src.stat().st_size
    assert size >= 4 * ALLOWED_PEAK
    report = tmp_path / "r.json"
    args = ["-i", str(src), "-o", str(tmp_path / "o.safetensors"), "--simple", "--int8", "--quiet"]
    with open(tmp_path / "stderr.txt", "w") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "lrq_ao.convert", *args, "--report", str(report)],
            stderr=err,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
    # ru_maxrss is no use here: Linux carries the parent's RSS at fork into the child's maxrss across exec.
    assert child.wait() == 0, (tmp_path / "stderr.txt").read_text()
    rep = json.loads(report.read_text())
    peak = rep["totals"]["peak_rss_bytes"]  # VmHWM during the streaming loop minus VmRSS when it started
    print(f"peak RSS growth {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB checkpoint")
    assert peak is not None and 0 < peak < ALLOWED_PEAK, f"peak RSS grew by {peak / 2**20:.0f} MiB"
    assert rep["totals"]["quantized_layers"] == COUNT
