"""truncated_svd (the svd objective's factors): the randomized subspace iteration with CholeskyQR2 finds the top
singular subspace as well as torch.svd_lowrank with the same q and power iterations, against an exact float64 SVD;
a weight of lower rank than k falls back to the exact SVD."""

import torch
from rounding_testing import real_weight

from lrq_ao.rounding.objectives import svd_rank, truncated_svd


def _mean_cos2(basis: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between two k-dimensional subspaces (1 = identical)."""
    return float((torch.linalg.svdvals(exact.T @ basis.double()) ** 2).mean())


def _orthonormality_error(x: torch.Tensor) -> float:
    return float((x.T.double() @ x.double() - torch.eye(x.shape[1], dtype=torch.float64)).abs().max())


def test_finds_the_top_subspace_as_well_as_svd_lowrank_on_a_real_weight():
    w = real_weight(384, 1536, "encoder.layer.0.output.dense")
    k = svd_rank(*w.shape, 0.2, 64, 1280)
    u_ex, s_ex, vh_ex = torch.linalg.svd(w.double(), full_matrices=False)
    torch.manual_seed(0)
    u, v = truncated_svd(w, k)
    torch.manual_seed(0)
    u_lr, _, v_lr = torch.svd_lowrank(w, q=k + 10, niter=4)
    assert _orthonormality_error(u) < 1e-5 and _orthonormality_error(v) < 1e-5
    for ours, theirs, exact in ((u, u_lr[:, :k], u_ex[:, :k]), (v, v_lr[:, :k], vh_ex[:k].T)):
        assert _mean_cos2(ours, exact) >= _mean_cos2(theirs, exact) - 0.01
    # u_i, v_i are a matched pair: u_iᵀ W v_i is the i-th singular value.
    top = (u.T.double() @ w.double() @ v.double()).diagonal()
    torch.testing.assert_close(top[:10], s_ex[:10], rtol=1e-3, atol=0)


def test_a_weight_of_lower_rank_than_k_falls_back_to_the_exact_svd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 3, generator=g) @ torch.randn(3, 300, generator=g) * 0.02
    u, v = truncated_svd(w, 20)
    assert _orthonormality_error(u) < 1e-5 and _orthonormality_error(v) < 1e-5
    u_ex, _, vh_ex = torch.linalg.svd(w.double(), full_matrices=False)
    assert _mean_cos2(u[:, :3], u_ex[:, :3]) > 0.999 and _mean_cos2(v[:, :3], vh_ex[:3].T) > 0.999
