"""Construction, dequantization and validation of Float8Tensor / Int8Tensor."""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline

from lrq_ao.layouts import ActivationMode, Float8Tensor, Int8Tensor, KernelChoice, make_weight_tensor
from lrq_ao.primitives import FP8_DTYPE, MIN_SCALE, dequantize, format_spec, quantize_rtn, sqnr

CLASSES = {FP8_DTYPE: Float8Tensor, torch.int8: Int8Tensor}

# Dequantized-weight SQNR floors (dB) for a Gaussian (64, 96) weight, measured 31.5-43.5 dB; set ~2 dB below.
DEQUANT_FLOORS = {"fp8": 29, "fp8_row": 29, "fp8_block": 29, "int8_tensor": 38, "int8": 41, "int8_block": 39}


def _weight(dtype=torch.bfloat16, shape=(64, 96), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("fmt", sorted(DEQUANT_FLOORS))
def test_from_hp_matches_primitives_and_meets_floor(fmt):
    spec = format_spec(fmt, block=32)
    w = _weight()
    t = CLASSES[spec.qdtype].from_hp(w, spec)
    qdata, scale, block_size = quantize_rtn(w, spec)
    assert type(t) is CLASSES[spec.qdtype]
    assert t.dtype == torch.bfloat16 and t.shape == w.shape and t.block_size == block_size
    assert t.scale.dtype == torch.float32 and t.scale.shape == scale.shape
    assert torch.equal(t.qdata.view(torch.uint8), qdata.view(torch.uint8))
    assert torch.equal(t.scale, scale)
    assert sqnr(w.double(), t.dequantize(torch.float64)) >= DEQUANT_FLOORS[fmt]
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(t.dequantize(dtype), dequantize(qdata, scale, block_size, dtype))
        assert torch.equal(t.t().dequantize(dtype), dequantize(qdata, scale, block_size, dtype).t())


def test_dequantize_is_qdata_times_block_scale_in_float64():
    w = _weight(torch.float32, (4, 8))
    t = Int8Tensor.from_hp(w, (2, 4))
    expected = torch.empty(4, 8, dtype=torch.float64)
    for i in range(4):
        for j in range(8):
            expected[i, j] = float(t.qdata[i, j]) * float(t.scale[i // 2, j // 4])
    assert torch.allclose(t.dequantize(torch.float64), expected, rtol=1e-7, atol=0)
    assert t.dequantize().dtype == torch.float32


@pytest.mark.parametrize("cls", [Float8Tensor, Int8Tensor])
def test_all_zero_weight_gets_min_scale_and_zero_data(cls):
    t = cls.from_hp(torch.zeros(8, 16), "row")
    assert torch.all(t.scale == MIN_SCALE)
    assert torch.all(t.dequantize() == 0)


@pytest.mark.parametrize("cls", [Float8Tensor, Int8Tensor])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_raises_naming_tensor(cls, bad):
    w = _weight(torch.float32, (8, 16))
    w[3, 5] = bad
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        cls.from_hp(w, "row", name="blocks.0.attn.qkv.weight")


@pytest.mark.parametrize("cls", [Float8Tensor, Int8Tensor])
def test_block_layout_that_cannot_tile_raises(cls):
    with pytest.raises(ValueError, match="cannot tile"):
        cls.from_hp(_weight(torch.float32, (64, 80)), "block", block=32)
    with pytest.raises(ValueError, match="cannot tile"):
        cls.from_hp(_weight(torch.float32, (64, 80)), (32, 32))


def test_from_hp_rejects_spec_of_other_element_type():
    with pytest.raises(ValueError, match="Int8Tensor stores"):
        Int8Tensor.from_hp(_weight(), format_spec("fp8_row"))


def test_from_qdata_validates_dtype_and_scale_shape():
    qdata = torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(TypeError, match="needs qdata of dtype torch.float8_e4m3fn"):
        Float8Tensor.from_qdata(qdata, torch.ones(8, 1), (1, 16), torch.bfloat16)
    with pytest.raises(ValueError, match=r"must have shape \(8, 1\), got \(8,\)"):
        Int8Tensor.from_qdata(qdata, torch.ones(8), (1, 16), torch.bfloat16, name="lin.weight")
    with pytest.raises(TypeError, match="dequantizes to"):
        Int8Tensor.from_qdata(qdata, torch.ones(8, 1), (1, 16), torch.int8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_from_qdata_rejects_corrupt_scales(bad):
    scale = torch.ones(8, 1)
    scale[2, 0] = bad
    with pytest.raises(ValueError, match="lin.weight: the scale holds NaN, Inf or negative"):
        Int8Tensor.from_qdata(torch.zeros(8, 16, dtype=torch.int8), scale, (1, 16), torch.bfloat16, name="lin.weight")


def test_from_qdata_converts_half_scale_to_float32():
    t = Int8Tensor.from_qdata(torch.ones(4, 8, dtype=torch.int8), torch.full((4, 1), 0.5).half(), (1, 8), torch.float16)
    assert t.scale.dtype == torch.float32
    assert torch.equal(t.dequantize(), torch.full((4, 8), 0.5, dtype=torch.float16))


@pytest.mark.parametrize("qdtype", [FP8_DTYPE, torch.int8])
def test_make_weight_tensor_picks_class_from_qdata_dtype(qdtype):
    qdata = torch.zeros(4, 8).to(qdtype)
    act = ActivationMode("dynamic", "row")
    t = make_weight_tensor(qdata, torch.ones(4, 1), (1, 8), torch.bfloat16, act=act, kernel="emulated")
    assert type(t) is CLASSES[qdtype]
    assert t.act == act and t.kernel is KernelChoice.EMULATED


def test_make_weight_tensor_rejects_unknown_element_dtype():
    with pytest.raises(TypeError, match="no lrq_ao layout stores qdata of dtype torch.uint8"):
        make_weight_tensor(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 1), (1, 8), torch.float32)


def test_activation_mode_validates_and_round_trips():
    mode = ActivationMode("dynamic", "block", 64)
    assert ActivationMode.from_dict(mode.to_dict()) == mode
    with pytest.raises(ValueError, match="granularity"):
        ActivationMode("dynamic", "column")
    with pytest.raises(ValueError, match="kind"):
        ActivationMode("static")


def test_repr():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.0], [4.0, 3.0, -1.0, 2.0]])
    t = Int8Tensor.from_hp(w, "row", act=ActivationMode("dynamic", "row"))
    assert_expected_inline(
        repr(t),
        """\
Int8Tensor(shape=(2, 4), dtype=torch.float32, format=int8, layout=per-row, block_size=(1, 4),
  act=dynamic/row, kernel=auto, device=cpu,
  qdata=tensor([[  64, -127,   32,    0],
        [ 127,   95,  -32,   64]], dtype=torch.int8),
  scale=tensor([[0.0157],
        [0.0315]]))""",
    )


def test_checkpoint_pickled_before_tensors_carried_a_format_loads(tmp_path):
    """A tensor pickled by lrq_ao before ``fmt`` / ``scale2`` existed: its state is qdata, scale, block_size, act,
    kernel. Loading gives the 8-bit scaled format its dtype and block size mean (checked once against a real
    checkpoint written by the previous version, too)."""
    t = Int8Tensor.from_hp(_weight(), "block", block=32, act=ActivationMode("dynamic", "block", 32))
    old = Int8Tensor.from_hp(_weight(), "block", block=32, act=ActivationMode("dynamic", "block", 32))
    del old.__dict__["fmt"], old.__dict__["scale2"]
    torch.save(old, tmp_path / "old.pt")
    loaded = torch.load(tmp_path / "old.pt", weights_only=True)
    assert type(loaded) is Int8Tensor and loaded.fmt == format_spec("int8_block", 32) and loaded.scale2 is None
    assert loaded.act == t.act and torch.equal(loaded.dequantize(), t.dequantize())


def test_weight_tensor_and_quantized_weight_round_trip():
    from lrq_ao.layouts import weight_tensor

    fmt = format_spec("fp8_block", 32)
    qw = fmt.quantize(_weight(), "w")
    t = weight_tensor(fmt, qw, torch.bfloat16, kernel="torch")
    assert type(t) is Float8Tensor and t.fmt == fmt and t.kernel is KernelChoice.TORCH
    back = t.quantized_weight()
    assert back.qdata is t.qdata and back.block_size == qw.block_size and back.scale2 is None
    assert torch.equal(t.dequantize(torch.float32), fmt.dequantize(qw))
