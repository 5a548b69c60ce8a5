"""quantize_sequential: stages found by shared inputs, every linear quantized with drift-aware statistics, and the
end-to-end error on held-out inputs no worse than plain calibrated rounding by a wide margin; the cached path (each
batch run once, paused at every stage) gives exactly the rounding of the path that re-runs the model per stage."""

import threading

import pytest
import torch
from torch import nn

from lrq_ao import LearnedRoundingConfig, calibrate, quantize_, quantize_sequential
from lrq_ao.primitives import sqnr
from lrq_ao.rounding.calibration import LinearStats
from lrq_ao.workflows.sequential import drift_trust_factor, linear_stages


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8, dim=-1) @ self.v(x)
        x = x + self.o(a)
        return x + self.down(torch.relu(self.up(x)))


def _data(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 3.0, 32)  # uneven channels, as real activations are
    return [(torch.randn(2, 16, 32, generator=g) * scales,) for _ in range(n)]


def test_stages_group_shared_inputs_in_forward_order():
    model = Block()
    assert linear_stages(model, _data(0, 1)[0]) == [["q", "k", "v"], ["o"], ["up"], ["down"]]


def test_sequential_quantizes_every_linear_against_the_float_model():
    torch.manual_seed(0)
    model = Block().eval()
    reference = Block().eval()
    reference.load_state_dict(model.state_dict())
    calib, held = _data(1), _data(2)
    cfg = LearnedRoundingConfig(format="int8", objective="output")
    with torch.no_grad():
        report = quantize_sequential(model, cfg, calib)
    assert sorted(layer["name"] for layer in report.layers) == ["down", "k", "o", "q", "up", "v"]
    assert all(not layer["kept_rtn"] for layer in report.layers)

    rtn = Block().eval()
    rtn.load_state_dict(reference.state_dict())
    quantize_(rtn, LearnedRoundingConfig(format="int8", objective="rtn"))
    with torch.no_grad():
        x = torch.cat([b[0] for b in held])
        y, y_seq, y_rtn = reference(x), model(x), rtn(x)
    assert sqnr(y, y_seq) > sqnr(y, y_rtn)


def test_plain_calibration_path_matches_the_contract():
    model = Block().eval()
    with torch.no_grad(), calibrate(model) as calib:
        for (x,) in _data(3):
            model(x)
    report = quantize_(model, LearnedRoundingConfig(format="fp8", calibration=calib))
    assert {layer["objective"] for layer in report.layers} == {"output"}
    assert all(layer["objective_final"] <= layer["objective_rtn"] for layer in report.layers)


def _quantized_block(cache_inputs: bool, holdout_every: int = 3, fmt: str = "fp8") -> tuple[Block, list[dict]]:
    torch.manual_seed(0)
    model = Block().eval()
    cfg = LearnedRoundingConfig(format=fmt, objective="output")
    report = quantize_sequential(model, cfg, _data(4, n=7), cache_inputs=cache_inputs, holdout_every=holdout_every)
    return model, report.layers


def _dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_cached_stage_inputs_give_the_rounding_of_rerunning_the_prefix(fmt):
    # Same tensors, accumulated in the same order: the rounding must be identical, not merely close.
    cached, cached_layers = _quantized_block(cache_inputs=True, fmt=fmt)
    replayed, replayed_layers = _quantized_block(cache_inputs=False, fmt=fmt)
    for name, w in _dequantized_weights(replayed).items():
        assert torch.equal(_dequantized_weights(cached)[name], w), name
    for a, b in zip(cached_layers, replayed_layers, strict=True):
        assert (a["name"], a["objective_final"], a["output_sqnr_heldout_db"]) == (
            b["name"],
            b["objective_final"],
            b["output_sqnr_heldout_db"],
        )
    assert all(layer["output_sqnr_heldout_db"] is not None for layer in cached_layers)  # the held-out split ran


def test_cached_path_is_deterministic_and_leaves_no_thread_behind():
    threads_before = threading.active_count()
    first, _ = _quantized_block(cache_inputs=True)
    second, _ = _quantized_block(cache_inputs=True)
    for name, w in _dequantized_weights(first).items():
        assert torch.equal(_dequantized_weights(second)[name], w), name
    assert threading.active_count() == threads_before


class Twice(nn.Module):
    """One linear applied twice per forward pass: its input cannot be paired with the float model's once."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.head(self.inner(torch.relu(self.inner(x))))


def test_a_linear_run_twice_is_refused_with_the_way_out():
    cfg = LearnedRoundingConfig(format="int8", objective="output")
    with pytest.raises(ValueError, match="inner.*twice.*lrq_ao.calibrate"):
        quantize_sequential(Twice().eval(), cfg, _data(5, n=2))


def test_a_failing_forward_pass_is_reported_and_stops_every_paused_pass():
    threads_before = threading.active_count()
    batches = [(x, False) for (x,) in _data(6, n=3)] + [(None, True)]

    def forward(model, batch):
        x, fail = batch
        if fail:
            raise KeyError("no input in this batch")
        return model(x)

    cfg = LearnedRoundingConfig(format="int8", objective="output")
    with pytest.raises(RuntimeError, match="forward pass failed.*no input in this batch"):
        quantize_sequential(Block().eval(), cfg, batches, forward=forward)
    assert threading.active_count() == threads_before


def _drift_stats(x: torch.Tensor, d: torch.Tensor, halves: bool = False) -> LinearStats:
    n = x.shape[0]
    st = LinearStats(x.T @ x / n, x.mean(0), n, cross=d.T @ x / n, drift_h=d.T @ d / n, drift_mean=d.mean(0))
    if halves:  # what calibration records: E[d xᵀ] over half of the calls
        st.cross_half, st.count_half = d[: n // 2].T @ x[: n // 2] / (n // 2), n // 2
    return st


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drift_trust_follows_how_much_of_the_drift_the_input_explains(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 4000, 32
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, k, dtype=torch.float64)
    w = torch.randn(32, k, generator=g, dtype=torch.float64)
    explained = x @ torch.randn(k, k, generator=g, dtype=torch.float64).T * 0.05  # drift linear in the input
    unexplained = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05  # drift independent of the input
    # Fully explained: only the K/n estimation share is shrunk away; pure noise: nothing is worth compensating.
    assert drift_trust_factor(w, _drift_stats(x, explained)) > 0.98
    assert drift_trust_factor(w, _drift_stats(x, unexplained)) < 0.1
    # A mix: the fewer rows, the noisier the estimate of the explained part, the less it is trusted.
    mixed = explained + 8 * unexplained
    trust = [drift_trust_factor(w, _drift_stats(x[:rows], mixed[:rows])) for rows in (250, 1000, 4000)]
    assert 0.5 < trust[0] < trust[1] < trust[2] < drift_trust_factor(w, _drift_stats(x, explained))


@pytest.mark.parametrize("seed", [0, 1])
def test_drift_noise_from_split_halves_holds_for_heavy_tailed_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 4000, 32
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, k, dtype=torch.float64)
    w = torch.randn(32, k, generator=g, dtype=torch.float64)
    explained = x @ torch.randn(k, k, generator=g, dtype=torch.float64).T * 0.05
    unexplained = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05
    mixed = explained[:1000] + 8 * unexplained[:1000]
    # Independent Gaussian rows: the split-half noise agrees with the closed form.
    closed, split = (drift_trust_factor(w, _drift_stats(x[:1000], mixed, halves)) for halves in (False, True))
    assert abs(closed - split) < 0.03
    # Outlier tokens (a heavy-tailed scale per row) carrying drift that the input does not explain: the closed
    # form, which assumes d and x independent, trusts that noise; the split halves see it for what it is.
    tail = torch.exp(1.5 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    closed, split = (drift_trust_factor(w, _drift_stats(x * tail, unexplained * tail, h)) for h in (False, True))
    assert split < 0.1 < 0.5 < closed
