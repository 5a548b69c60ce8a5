"""The one-launch-per-block GPTQ and greedy sweeps (``lrq_ao.kernels.rounding_sweep``) choose bit-identical grid
indices to the PyTorch loops they replace, on awkward shapes (a partial last block, rows not a multiple of the
program's rows), for both grids, with and without the neighbour bounds."""

import pytest
import torch
from kernel_testing import DEVICE, ON_CUDA

from lrq_ao.primitives import FORMATS, quantize_rtn
from lrq_ao.rounding.gptq import gptq_indices
from lrq_ao.rounding.greedy import greedy_refine, parallel_refine
from lrq_ao.rounding.grid import Grid, full_scale
from lrq_ao.rounding.objectives import Objective, output_objective, svd_objective

# The CPU interpreter matches the PyTorch loop bit for bit; compiled GPU code may fuse a multiply-add and flip a
# rare tie, so on CUDA a handful of differing indices is allowed.
MAX_DIFFERENT = 0 if not ON_CUDA else 8
# Small blocks keep the interpreter quick and still give a partial last block (K = 40).
BLOCK = 32


def _layer(fmt: str, n: int = 20, k: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(256, k, generator=g) * torch.linspace(0.1, 3.0, k)
    x[:, 5] = 0.0  # a dead input
    x = x + 0.3 * x.roll(1, dims=1)  # correlated neighbours: GPTQ's feedback matters
    h = x.T @ x / x.shape[0]
    spec = FORMATS[fmt]
    _, scale, block_size = quantize_rtn(w, spec)
    grid = Grid(spec.qdtype, DEVICE)
    return w.to(DEVICE), full_scale(scale, block_size).to(DEVICE), grid, h.to(DEVICE)


def _assert_same(kernel_idx: torch.Tensor, loop_idx: torch.Tensor) -> None:
    different = int((kernel_idx != loop_idx).sum())
    assert different <= MAX_DIFFERENT, f"{different} of {loop_idx.numel()} grid indices differ from the loop"


# Each case costs ~3 s in the interpreter: both grids, each with and without the bounds across the two sweeps.
@pytest.mark.parametrize("fmt,neighbours_only", [("fp8", False), ("int8", True)])
def test_gptq_kernel_matches_the_loop(fmt, neighbours_only):
    w, s, grid, h = _layer(fmt)
    args = dict(damp=0.01, act_order=True, neighbours_only=neighbours_only, block=BLOCK)
    loop = gptq_indices(w, s, grid, h, kernel=False, **args)
    kernel = gptq_indices(w, s, grid, h, kernel=True, **args)
    assert (loop != grid.nearest_index(w / s)).any(), "GPTQ must differ from round-to-nearest for this test"
    _assert_same(kernel, loop)


@pytest.mark.parametrize("fmt,neighbours_only", [("fp8", True), ("int8", False)])
def test_greedy_kernel_matches_the_loop(fmt, neighbours_only):
    w, s, grid, h = _layer(fmt, seed=1)
    start = gptq_indices(w, s, grid, h, kernel=False, neighbours_only=neighbours_only, block=BLOCK)
    obj = output_objective(h, 0.01)
    loop = greedy_refine(start, w, s, grid, obj, passes=2, block=BLOCK, neighbours_only=neighbours_only, kernel=False)
    kernel = greedy_refine(start, w, s, grid, obj, passes=2, block=BLOCK, neighbours_only=neighbours_only, kernel=True)
    assert (loop != start).any(), "the greedy passes must move something for this test to mean anything"
    _assert_same(kernel, loop)


def test_greedy_kernel_refuses_row_coupled_objectives():
    w, s, grid, _ = _layer("fp8", n=32, k=64)
    obj = svd_objective(w, 0.2, 4, 8)
    idx = grid.nearest_index(w / s)
    with pytest.raises(ValueError, match="independent rows"):
        greedy_refine(idx, w, s, grid, obj, passes=1, kernel=True)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_fused_parallel_step_matches_the_loop(fmt):
    w, s, grid, _ = _layer(fmt, n=24, k=40, seed=2)
    obj = svd_objective(w, 0.2, 4, 8)
    start = grid.nearest_index(w / s)
    loop = parallel_refine(start, w, s, grid, obj, iterations=8, check_every=4, kernel=False)
    fused = parallel_refine(start, w, s, grid, obj, iterations=8, check_every=4, kernel=True)
    assert (loop != start).any(), "the refinement must move something for this test to mean anything"
    _assert_same(fused, loop)


def test_fused_parallel_step_matches_the_loop_on_a_batch_of_layers():
    layers = [_layer("fp8", n=16, k=40, seed=seed) for seed in (3, 4)]
    grid = layers[0][2]
    w, s = torch.stack([lay[0] for lay in layers]), torch.stack([lay[1] for lay in layers])
    objs = [svd_objective(lay[0], 0.2, 4, 8) for lay in layers]
    obj = Objective("svd", right=torch.stack([o.right for o in objs]), left=torch.stack([o.left for o in objs]), rank=8)
    start = grid.nearest_index(w / s)
    loop = parallel_refine(start, w, s, grid, obj, iterations=8, check_every=4, kernel=False)
    fused = parallel_refine(start, w, s, grid, obj, iterations=8, check_every=4, kernel=True)
    assert all((loop[i] != start[i]).any() for i in range(2))
    _assert_same(fused, loop)
