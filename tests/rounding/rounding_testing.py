"""Shared helpers of the rounding tests: small slices of the real MiniLM-L6 weights and real activation statistics."""

from __future__ import annotations

import functools

import torch

from lrq_ao.quality.minilm import load_minilm, load_state_dict_from_package
from lrq_ao.quality.texts import calibration_batches

LAYER = "encoder.layer.0.intermediate.dense"  # 1536 × 384, input = attention output after LayerNorm


@functools.lru_cache(maxsize=1)
def _state() -> dict[str, torch.Tensor]:
    return load_state_dict_from_package()


def real_weight(rows: int = 32, cols: int = 128, name: str = LAYER) -> torch.Tensor:
    """A (rows, cols) slice of a real MiniLM weight, float32."""
    return _state()[f"{name}.weight"][:rows, :cols].float().clone()


@functools.lru_cache(maxsize=1)
def real_inputs(n_batches: int = 2) -> torch.Tensor:
    """Real inputs (tokens, 384) of ``LAYER`` from calibration sentences, padding tokens removed."""
    model = load_minilm()
    captured: list[torch.Tensor] = []
    masks = []
    handle = model.get_submodule(LAYER).register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    with torch.no_grad():
        for batch in calibration_batches()[:n_batches]:
            masks.append(batch.attention_mask.bool())
            model(*batch)
    handle.remove()
    return torch.cat([x[m] for x, m in zip(captured, masks)])


def real_stats(cols: int = 128):
    """``LinearStats`` of the first ``cols`` input features of ``LAYER`` on real text."""
    from lrq_ao.rounding import LinearStats

    x = real_inputs()[:, :cols].double()
    return LinearStats((x.T @ x / x.shape[0]).float(), x.mean(0).float(), x.shape[0])
