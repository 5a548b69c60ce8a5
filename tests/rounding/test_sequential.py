"""quantize_sequential: stages found by shared inputs, every linear quantized with drift-aware statistics, and the
end-to-end error on held-out inputs no worse than plain calibrated rounding by a wide margin."""

import torch
from torch import nn

from lrq_ao import LearnedRoundingConfig, calibrate, quantize_
from lrq_ao.primitives import sqnr
from lrq_ao.rounding.sequential import linear_stages, quantize_sequential


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
