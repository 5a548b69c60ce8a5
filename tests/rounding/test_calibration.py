"""Calibration: second moments and means against a float64 reference, shared inputs, token masks, paired
(drift) statistics, and the .safetensors round trip."""

import pytest
import torch
from torch import nn

from lrq_ao.rounding import Calibration, calibrate, stats_for


class Attn(nn.Module):
    """q/k/v read one tensor; o reads another."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), dim=-1) @ self.v(x)
        return self.o(torch.relu(a))


def _inputs(seed: int = 0, batches: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 8, generator=g) for _ in range(batches)]


def test_second_moment_mean_count_and_shared_inputs():
    torch.manual_seed(0)
    model = Attn()
    xs = _inputs()
    with torch.no_grad(), calibrate(model) as calib:
        for x in xs:
            model(x)
    rows = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    st = calib.stats("q")
    torch.testing.assert_close(st.h.double(), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.mean.double(), rows.mean(0), rtol=1e-5, atol=1e-6)
    assert st.count == 30
    assert calib.owner_of("k") == "q" and calib.owner_of("v") == "q" and calib.owner_of("o") == "o"
    assert calib.stats("k") is st  # one accumulator for the three projections
    assert calib.stats("o").count == 30 and not torch.allclose(calib.stats("o").h, st.h)


def test_token_mask_leaves_padding_out():
    model = Attn()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad(), calibrate(model) as calib:
        calib.token_mask = mask
        model(x)
    kept = x[mask.bool()].double()
    assert calib.stats("q").count == 8
    torch.testing.assert_close(calib.stats("q").h.double(), kept.T @ kept / 8, rtol=1e-5, atol=1e-6)


def test_paired_statistics_describe_the_drift_from_the_reference():
    torch.manual_seed(0)
    reference = Attn()
    model = Attn()
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        model.q.weight.add_(0.1)  # o's input drifts; q's does not
    xs = _inputs(1)
    got_ref, got_q = [], []
    h1 = reference.o.register_forward_pre_hook(lambda m, a: got_ref.append(a[0].reshape(-1, 8)))
    h2 = model.o.register_forward_pre_hook(lambda m, a: got_q.append(a[0].reshape(-1, 8)))
    with torch.no_grad(), calibrate(model, reference=reference) as calib:
        for x in xs:
            reference(x)
            model(x)
    h1.remove()
    h2.remove()
    xr, xq = torch.cat(got_ref).double(), torch.cat(got_q).double()
    d = xr - xq
    st = calib.stats("o")
    torch.testing.assert_close(st.h.double(), xq.T @ xq / xq.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.cross.double(), d.T @ xq / xq.shape[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.drift_h.double(), d.T @ d / xq.shape[0], rtol=1e-4, atol=1e-6)
    assert float(calib.stats("q").drift_h.abs().max()) == 0.0


def test_paired_half_statistics_cover_every_other_fitting_call():
    # Calls 3 and 6 are held out; the fitting calls 1, 2, 4, 5, 7 are numbered 1..5 and the odd ones (calls 1, 4, 7)
    # form the half that measures the noise of E[d xᵀ] (workflows.sequential.drift_trust_factor).
    torch.manual_seed(0)
    reference = Attn()
    model = Attn()
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        model.q.weight.add_(0.1)
    got_ref, got_q = [], []
    h1 = reference.o.register_forward_pre_hook(lambda m, a: got_ref.append(a[0].reshape(-1, 8)))
    h2 = model.o.register_forward_pre_hook(lambda m, a: got_q.append(a[0].reshape(-1, 8)))
    with torch.no_grad(), calibrate(model, reference=reference, holdout_every=3) as calib:
        for x in _inputs(2, batches=7):
            reference(x)
            model(x)
    h1.remove()
    h2.remove()
    half = [0, 3, 6]  # calls 1, 4, 7
    xr, xq = torch.cat([got_ref[i] for i in half]).double(), torch.cat([got_q[i] for i in half]).double()
    st = calib.stats("o")
    assert (st.count, st.count_half, st.count_holdout) == (50, 30, 20)
    torch.testing.assert_close(st.cross_half.double(), (xr - xq).T @ xq / xq.shape[0], rtol=1e-4, atol=1e-6)
    assert calib.stats("q").cross_half is not None and float(calib.stats("q").cross_half.abs().max()) == 0.0


def test_paired_order_is_enforced():
    model, reference = Attn(), Attn()
    with pytest.raises(RuntimeError, match="reference"), torch.no_grad(), calibrate(model, reference=reference):
        model(torch.randn(1, 3, 8))


def test_save_load_round_trip(tmp_path):
    model = Attn()
    with torch.no_grad(), calibrate(model) as calib:
        for x in _inputs():
            model(x)
    path = tmp_path / "stats.safetensors"
    calib.save(path)
    loaded = Calibration.load(path)
    assert loaded.names() == calib.names()
    for name in ("q", "k", "v", "o"):
        a, b = calib.stats(name), loaded.stats(name)
        assert torch.equal(a.h, b.h) and torch.equal(a.mean, b.mean) and a.count == b.count
    assert stats_for(str(path), "v").count == 30
    assert stats_for(None, "v") is None
    assert stats_for(loaded, "missing") is None
    with pytest.raises(ValueError, match="input features"):
        stats_for(loaded, "o", nn.Linear(4, 8))


def test_load_rejects_a_file_that_is_not_calibration(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an lrq_ao calibration file"):
        Calibration.load(path)


def test_model_without_linears_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear"), calibrate(nn.ReLU()):
        pass


def test_hooks_are_removed_after_the_block():
    model = Attn()
    with calibrate(model):
        pass
    assert not model.q._forward_pre_hooks and not model._forward_pre_hooks and not model._forward_hooks


def _fitting_and_heldout_rows(xs, every: int):
    """Rows of the forward calls numbered every, 2·every, … (from 1) and of the others, float64."""
    held = [x.reshape(-1, 8) for i, x in enumerate(xs, start=1) if i % every == 0]
    fit = [x.reshape(-1, 8) for i, x in enumerate(xs, start=1) if i % every != 0]
    return torch.cat(fit).double(), torch.cat(held).double()


def test_every_kth_forward_call_goes_only_to_the_heldout_accumulator():
    torch.manual_seed(0)
    model = Attn()
    xs = _inputs(2, batches=7)
    with torch.no_grad(), calibrate(model, holdout_every=3) as calib:
        for x in xs:
            model(x)
    fit, held = _fitting_and_heldout_rows(xs, 3)  # calls 3 and 6 are held out
    st = calib.stats("q")
    assert st.count == 50 and st.count_holdout == 20
    torch.testing.assert_close(st.h.double(), fit.T @ fit / 50, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.mean.double(), fit.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.h_holdout.double(), held.T @ held / 20, rtol=1e-5, atol=1e-6)
    assert calib.stats("v") is st and calib.stats("o").count_holdout == 20


def test_heldout_split_disabled_or_not_reached_leaves_no_heldout_statistics():
    model = Attn()
    with torch.no_grad(), calibrate(model, holdout_every=0) as off, calibrate(model, holdout_every=4) as short:
        for x in _inputs(batches=3):
            model(x)
    for calib in (off, short):
        assert calib.stats("q").h_holdout is None and calib.stats("q").count_holdout == 0
        assert calib.stats("q").count == 30
    for bad in (1, -2, 2.5):
        with pytest.raises(ValueError, match="holdout_every"), calibrate(model, holdout_every=bad):
            pass


def test_heldout_calls_respect_the_token_mask_and_skip_the_paired_statistics():
    torch.manual_seed(0)
    reference, model = Attn(), Attn()
    xs = _inputs(3, batches=4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    with torch.no_grad(), calibrate(model, reference=reference, holdout_every=2) as calib:
        for x in xs:
            calib.token_mask = mask
            reference(x)
            model(x)
    kept = [x[mask.bool()] for x in xs]
    held = torch.cat([kept[1], kept[3]]).double()
    st = calib.stats("q")
    assert st.count == 12 and st.count_holdout == 12
    torch.testing.assert_close(st.h_holdout.double(), held.T @ held / 12, rtol=1e-5, atol=1e-6)
    # q reads the model's input itself, which does not drift; the drift sums saw only the fitting calls.
    assert float(st.drift_h.abs().max()) == 0.0


def test_save_load_round_trips_the_heldout_part_and_reads_files_without_it(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = Attn()
    with torch.no_grad(), calibrate(model, holdout_every=2) as calib:
        for x in _inputs(batches=5):
            model(x)
    path = tmp_path / "stats.safetensors"
    calib.save(path)
    loaded = Calibration.load(path)
    assert loaded.holdout_every == 2
    for name in ("q", "o"):
        a, b = calib.stats(name), loaded.stats(name)
        assert torch.equal(a.h_holdout, b.h_holdout) and a.count_holdout == b.count_holdout == 20
        assert torch.equal(a.h, b.h) and a.count == b.count == 30
    # A file as written before the held-out split: no *_holdout tensors, no holdout_every in the header.
    old = tmp_path / "old.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "holdout_every"}
        save_file({k: f.get_tensor(k) for k in f.keys() if "holdout" not in k}, str(old), metadata=meta)  # noqa: SIM118
    from_old = Calibration.load(old)
    assert from_old.holdout_every == 0 and from_old.stats("q").h_holdout is None
    assert torch.equal(from_old.stats("q").h, calib.stats("q").h) and from_old.stats("q").count_holdout == 0
