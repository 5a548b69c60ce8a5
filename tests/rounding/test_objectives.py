"""Objectives: gradients checked by finite differences (INT8 chain rule through the scale), the closed-form
single-element change used by greedy rounding, and the act_svd → output limit."""

import math

import pytest
import torch
from rounding_testing import real_stats, real_weight

from lrq_ao.config import OBJECTIVES, LearnedRoundingConfig
from lrq_ao.primitives import compute_scale, expand_scale
from lrq_ao.rounding import resolve_method
from lrq_ao.rounding.objectives import (
    OBJECTIVE_KINDS,
    act_svd_objective,
    needs_calibration,
    output_objective,
    svd_objective,
    svd_rank,
)


def _objective(kind: str, w: torch.Tensor):
    if kind == "svd":
        return svd_objective(w, top_p=0.2, min_k=4, max_k=8)
    return output_objective(real_stats(w.shape[1]).h)


@pytest.mark.parametrize("kind", ["svd", "output"])
def test_int8_gradient_wrt_q_is_dequant_gradient_times_scale(kind):
    torch.manual_seed(0)
    w = real_weight(16, 128).double()
    block = (1, 128)
    s = expand_scale(compute_scale(w, torch.int8, block), block).double()
    obj = _objective(kind, w.float())
    obj.m = obj.m.double()
    if obj.right is not None:
        obj.right, obj.left = obj.right.double(), obj.left.double()
    q = torch.round(w / s) + torch.rand_like(w) - 0.5  # a continuous point near the rounding
    q.requires_grad_(True)
    loss = obj.loss(q * s - w)
    (grad_q,) = torch.autograd.grad(loss, q)
    w_dq = (q.detach() * s).requires_grad_(True)
    (grad_w,) = torch.autograd.grad(obj.loss(w_dq - w), w_dq)
    torch.testing.assert_close(grad_q, grad_w * s)
    # Finite differences along a few coordinates agree with the autograd direction and size.
    for r, c in [(0, 0), (3, 17), (15, 127)]:
        eps = 1e-4
        qp, qm = q.detach().clone(), q.detach().clone()
        qp[r, c] += eps
        qm[r, c] -= eps
        fd = (obj.loss(qp * s - w) - obj.loss(qm * s - w)) / (2 * eps)
        assert math.isclose(float(fd), float(grad_q[r, c]), rel_tol=1e-4, abs_tol=1e-9)


@pytest.mark.parametrize("kind", ["svd", "output"])
def test_single_element_change_is_closed_form(kind):
    torch.manual_seed(0)  # svd_lowrank draws random probes; unseeded, the result depended on the tests run before
    w = real_weight(16, 128)
    obj = _objective(kind, w)
    # Seeded: the check is a float32 difference of two squared losses, whose rounding depends on the draw.
    e = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 1e-3
    g = obj.grad_quad(e)
    p_diag = obj.p_diag if obj.p_diag is not None else torch.ones(w.shape[0])
    for r, c, d in [(0, 0, 2e-3), (5, 60, -1e-3), (15, 127, 5e-4)]:
        e2 = e.clone()
        e2[r, c] += d
        actual = obj.loss(e2.double().float()) ** 2 - obj.loss(e) ** 2
        predicted = d * g[r, c] + d * d * p_diag[r] * obj.m[c, c]
        assert math.isclose(float(actual), float(predicted), rel_tol=2e-3, abs_tol=1e-12)


def test_grad_quad_matches_autograd():
    w = real_weight(16, 128)
    obj = _objective("svd", w)
    e = (torch.randn_like(w) * 1e-3).requires_grad_(True)
    (auto,) = torch.autograd.grad(obj.loss(e) ** 2, e)
    torch.testing.assert_close(obj.grad_quad(e.detach()), auto, rtol=1e-4, atol=1e-4 * float(auto.abs().max()))


def test_act_svd_at_full_rank_is_the_output_objective():
    h = real_stats(64).h
    e = torch.randn(8, 64) * 1e-3
    full = act_svd_objective(h, top_p=1.0, min_k=64, max_k=64)
    assert full.rank == 64
    torch.testing.assert_close(full.loss(e), output_objective(h).loss(e), rtol=1e-4, atol=0)
    low = act_svd_objective(h, top_p=0.05, min_k=4, max_k=4)
    assert low.rank == 4 and float(low.loss(e)) <= float(output_objective(h).loss(e)) * (1 + 1e-5)


def test_svd_rank_rule_matches_reference_defaults():
    # convert-to-quant 1.3.4 CLI: top_p 0.2, min_k 256, max_k 1280.
    assert svd_rank(3072, 3072, 0.2, 256, 1280) == 614
    assert svd_rank(3072, 12288, 0.2, 256, 1280) == 614
    assert svd_rank(384, 1536, 0.2, 256, 1280) == 256
    assert svd_rank(16, 8, 0.2, 256, 1280) == 8


def test_svd_objective_projects_onto_the_top_singular_subspace():
    torch.manual_seed(0)  # svd_lowrank draws random probes; unseeded, the result depended on the tests run before
    w = real_weight(32, 128)
    obj = svd_objective(w, top_p=0.1, min_k=4, max_k=4)
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    e = torch.randn_like(w) * 1e-3
    ref = torch.linalg.norm(u[:, :4].T @ e.double() @ vh[:4].T)
    # The objective's subspace comes from a randomized truncated SVD (svd_lowrank): close to the exact one, not equal.
    assert math.isclose(float(obj.loss(e)), float(ref), rel_tol=1e-2)


def test_the_config_offers_exactly_the_objectives_of_the_table():
    assert ("auto", *OBJECTIVE_KINDS) == OBJECTIVES
    assert [name for name in OBJECTIVE_KINDS if needs_calibration(name)] == ["output", "act_svd"]
    assert not needs_calibration("auto")


@pytest.mark.parametrize("has_stats", [False, True])
def test_auto_resolves_through_the_table(has_stats):
    objective, init, relaxation = resolve_method(LearnedRoundingConfig(), has_stats=has_stats)
    assert objective == ("output" if has_stats else "rtn")
    assert (init, relaxation) == (
        (OBJECTIVE_KINDS[objective].default_init, OBJECTIVE_KINDS[objective].default_relaxation)
    )
    assert resolve_method(LearnedRoundingConfig(objective="svd"), has_stats) == ("svd", "rtn", "parallel")
    explicit = LearnedRoundingConfig(objective="act_svd", init="rtn", relaxation="ste")
    assert resolve_method(explicit, has_stats) == ("act_svd", "rtn", "ste")
