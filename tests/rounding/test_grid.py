"""The rounding grid: every representable value, exact neighbours, and round-to-nearest identical to primitives."""

import pytest
import torch
from rounding_testing import real_weight

from lrq_ao.primitives import FP8_DTYPE, compute_scale, quantize_with_scale
from lrq_ao.rounding.grid import Grid


def test_fp8_grid_is_every_finite_e4m3_value_once():
    grid = Grid(FP8_DTYPE)
    v = grid.values
    assert v.numel() == 253  # 256 patterns − 2 NaNs − the duplicate zero
    assert bool((v[1:] > v[:-1]).all())
    assert torch.equal(v.to(FP8_DTYPE).float(), v)
    assert v.max().item() == 448.0 and v.min().item() == -448.0
    assert v[v > 0].min().item() == 2.0**-9  # smallest subnormal


def test_int8_grid_is_symmetric_integers():
    v = Grid(torch.int8).values
    assert torch.equal(v, torch.arange(-127, 128, dtype=torch.float32))


@pytest.mark.parametrize("qdtype", [torch.int8, FP8_DTYPE])
def test_floor_index_brackets_every_value(qdtype):
    grid = Grid(qdtype)
    top = grid.values[-1].item()
    x = torch.linspace(-top, top, 10001) + torch.randn(10001) * 0.01
    x = x.clamp(-top, top)
    lo = grid.floor_index(x)
    assert bool((grid.values[lo] <= x).all())
    hi = (lo + 1).clamp(max=grid.last)
    inside = lo < grid.last
    assert bool((grid.values[hi][inside] > x[inside]).all())


@pytest.mark.parametrize("qdtype", [torch.int8, FP8_DTYPE])
@pytest.mark.parametrize("block_size", [(32, 128), (1, 128), (32, 32)])
def test_rtn_index_reproduces_primitives_bit_for_bit(qdtype, block_size):
    w = real_weight(32, 128)
    scale = compute_scale(w, qdtype, block_size)
    grid = Grid(qdtype)
    idx = grid.rtn_index(w, scale, block_size)
    expected = quantize_with_scale(w, scale, qdtype, block_size)
    assert torch.equal(grid.to_qdata(idx).float(), expected.float())


def test_index_of_rejects_values_off_the_grid():
    with pytest.raises(ValueError, match="not on the quantization grid"):
        Grid(torch.int8).index_of(torch.tensor([0.5]))
