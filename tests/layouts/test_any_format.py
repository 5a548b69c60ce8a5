"""The tensor class holds any ``WeightFormat``: a packed 4-bit two-level toy format and a rotating INT8 toy format,
both defined here (the real NVFP4 / ConvRot formats live in ``lrq_ao.formats`` and have their own tests).

References are independent of the code under test: the packed codes are unpacked here nibble by nibble in float64,
the rotation is applied to a float64 weight by hand, and linears are compared with plain ``F.linear`` on the
dequantized weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

from lrq_ao.formats import FORMATS, FormatError, QuantizedWeight, WeightFormat, get_format
from lrq_ao.formats.base import MIN_SCALE, blocked_amax, check_2d
from lrq_ao.formats.elements import Element
from lrq_ao.formats.scaled import ScaledFormat
from lrq_ao.layouts import (
    ActivationMode,
    Int8Tensor,
    KernelChoice,
    QuantizedWeightTensor,
    activation_mode_for,
    reference_linear,
    register_safe_globals,
    registered_backends,
    select_linear_backend,
    tensor_class_for,
    weight_tensor,
)
from lrq_ao.primitives import sqnr

# ---- a packed 4-bit toy: codes -7..7, two per byte (low nibble first), (1, 16) groups, scale grid x scalar scale2


class ToyInt4(Element):
    name = "toy_int4"
    bits = 4
    storage_dtype = torch.uint8
    qmax = 7.0
    kernel_dtype = None

    def _all_values(self) -> torch.Tensor:
        return torch.arange(-7.0, 8.0)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x).clamp(-7, 7).to(torch.int8)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        nibbles = codes.to(torch.uint8) & 0xF
        return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)

    def unpack(self, stored: torch.Tensor) -> torch.Tensor:
        low, high = stored & 0xF, stored >> 4
        nibbles = torch.stack([low, high], dim=-1).reshape(stored.shape[0], -1).to(torch.int16)
        return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)


@dataclass(frozen=True)
class ToyPacked(WeightFormat):
    group: int = 16
    element: ClassVar[Element] = ToyInt4()
    comfy_name: ClassVar[str] = "toy"

    @property
    def name(self) -> str:
        return "toy_int4"

    def block_size_for(self, shape):
        n, k = check_2d(shape)
        if k % self.group:
            raise FormatError(f"K={k} is not a multiple of the group {self.group}")
        return (1, self.group)

    def compute_scales(self, w, block_size):
        per_group = (blocked_amax(w.float(), block_size) / self.element.qmax).clamp_min(MIN_SCALE)
        scale2 = per_group.max()
        return per_group / scale2, scale2

    def effective_scale(self, scale, scale2):
        return scale.float() * scale2.float()

    @property
    def _has_scale2(self) -> bool:
        return True


# ---- a rotating INT8 toy: per-row INT8 codes of W R, R = 2 x 2 rotations by ``angle`` on pairs along K


def _rotate_pairs(x: torch.Tensor, angle: float) -> torch.Tensor:
    """``x @ R`` with R block-diagonal [[c, s], [-s, c]]: (x0, x1) -> (c x0 - s x1, s x0 + c x1)."""
    c, s = math.cos(angle), math.sin(angle)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([c * x0 - s * x1, s * x0 + c * x1], dim=-1).reshape(x.shape)


@dataclass(frozen=True)
class ToyRotated(ScaledFormat):
    angle: float = 0.7
    kernels: bool = True  # False: the base default, kernel_dtype None for a rotating format

    @property
    def name(self) -> str:
        return "toy_rot_int8" if self.kernels else "toy_rot_int8_dequant"

    @property
    def rotates(self) -> bool:
        return True

    @property
    def kernel_dtype(self):
        return self.element.kernel_dtype if self.kernels else None

    def rotate_weight(self, w):
        return _rotate_pairs(w, self.angle)

    def unrotate_weight(self, w):
        return _rotate_pairs(w, -self.angle)

    def rotate_input(self, x):
        return _rotate_pairs(x, self.angle)


register_safe_globals(ToyPacked, ToyRotated)

N, K = 48, 80  # odd sizes: 3 x 16 rows, 5 groups of 16 along K


def _gaussian(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _packed_tensor(dtype=torch.float32, **kw) -> tuple[torch.Tensor, QuantizedWeightTensor]:
    w = _gaussian(N, K, seed=1)
    fmt = ToyPacked()
    return w, weight_tensor(fmt, fmt.quantize(w), dtype, **kw)


def _reference_dequant_packed(t: QuantizedWeightTensor) -> torch.Tensor:
    """Element by element: nibble j % 2 of byte j // 2, sign from bit 3, times the float32 effective scale
    ``scale[group] * scale2``; the product (a 4-bit integer times a float32) is exact in float64."""
    q = t.qdata.to(torch.int64)
    effective = (t.scale * t.scale2).double()  # the format's rule: one float32 scale per group
    out = torch.empty(N, K, dtype=torch.float64)
    for j in range(K):
        nibble = (q[:, j // 2] >> (4 * (j % 2))) & 0xF
        value = torch.where(nibble > 7, nibble - 16, nibble).double()
        out[:, j] = value * effective[:, j // 16]
    return out


# ---- the packed format ---------------------------------------------------------------------------------------


def test_packed_format_lands_in_the_generic_class_with_its_logical_shape():
    w, t = _packed_tensor()
    assert type(t) is QuantizedWeightTensor and t.fmt == ToyPacked()
    assert t.shape == (N, K) and t.stride() == (K, 1) and t.qdata.shape == (N, K // 2)
    assert t.qdata.dtype == torch.uint8 and t.scale.shape == (N, K // 16) and t.scale2.shape == ()
    qw = t.quantized_weight()
    assert qw.qdata is t.qdata and qw.scale is t.scale and qw.scale2 is t.scale2 and qw.block_size == (1, 16)
    assert "format=toy_int4" in repr(t) and "scale2=" in repr(t)


def test_packed_dequantize_is_exact_against_a_float64_unpacking():
    w, t = _packed_tensor()
    expected = _reference_dequant_packed(t)
    assert torch.equal(t.dequantize(torch.float64), expected.float().double())  # one float32 rounding
    assert t.dequantize().dtype == torch.float32
    # 4-bit codes, 16-wide groups, Gaussian weight: measured 21.4 dB
    assert sqnr(w.double(), t.dequantize(torch.float64)) > 19


def test_packed_linear_takes_the_dequantizing_path_and_says_so():
    _, t = _packed_tensor()
    x, bias = _gaussian(2, 3, K, seed=2), _gaussian(N, seed=3)
    backend, refusals = select_linear_backend(x, t, bias)
    assert backend.name == "torch_weight_only"
    assert "no kernel for format toy_int4" in dict(refusals)["torch_int_mm"]
    assert "dequantize + matmul (no kernel for format toy_int4)" in t.describe(x)
    torch.testing.assert_close(F.linear(x, t, bias), F.linear(x, t.dequantize(), bias), rtol=0, atol=0)
    emulated = weight_tensor(t.fmt, t.quantized_weight(), t.dtype, kernel="emulated")
    torch.testing.assert_close(F.linear(x, emulated, bias), F.linear(x, t, bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="kind 'triton'.*no kernel for format toy_int4"):
        F.linear(x, weight_tensor(t.fmt, t.quantized_weight(), t.dtype, kernel="triton"), bias)


def test_packed_format_has_no_dynamic_mode():
    fmt = ToyPacked()
    with pytest.raises(ValueError, match="format toy_int4 has no dynamic activation quantization"):
        activation_mode_for("dynamic", fmt, (1, 16), (N, K))
    w = _gaussian(N, K, seed=1)
    with pytest.raises(ValueError, match="w1: format toy_int4 has no 8-bit kernel dtype"):
        weight_tensor(fmt, fmt.quantize(w), torch.float32, act=ActivationMode("dynamic", "row"), name="w1")


def test_packed_flatten_unflatten_keeps_format_and_scale2():
    _, t = _packed_tensor()
    names, attrs = t.__tensor_flatten__()
    assert names == ["qdata", "scale", "scale2"] and attrs["fmt"] == ToyPacked()
    rebuilt = type(t).__tensor_unflatten__({n: getattr(t, n) for n in names}, attrs, t.shape, t.stride())
    assert type(rebuilt) is type(t) and rebuilt.shape == (N, K) and rebuilt.fmt == t.fmt
    assert torch.equal(rebuilt.dequantize(), t.dequantize())


def test_packed_save_load_weights_only(tmp_path):
    _, t = _packed_tensor(torch.bfloat16, act=None, kernel=KernelChoice.TORCH)
    torch.save({"w": t}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)["w"]
    assert type(loaded) is QuantizedWeightTensor and loaded.fmt == t.fmt and loaded.shape == (N, K)
    assert loaded.kernel is KernelChoice.TORCH and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.qdata, t.qdata) and torch.equal(loaded.scale2, t.scale2)
    assert torch.equal(loaded.dequantize(), t.dequantize())


def test_packed_views_rows_but_refuses_transposes():
    _, t = _packed_tensor()
    dq = t.dequantize()
    parts = {(16, N): t[16:], (16, 48): t.narrow(0, 16, 32), (16, 32): t.split(16)[1], (0, N): t.to(torch.float16)}
    for (start, end), part in parts.items():
        assert type(part) is QuantizedWeightTensor and part.shape == (end - start, K)
        torch.testing.assert_close(part.dequantize(torch.float32), dq[start:end], rtol=1e-3, atol=0)
    assert t[16:].storage_offset() == 16 * K  # in codes: byte offset 16 * K / 2
    assert torch.equal(torch.cat(t.split(16)).dequantize(), dq)
    for op in (lambda: t.t(), lambda: t.transpose(0, 1), lambda: _gaussian(3, N, seed=4) @ t):
        with pytest.raises(NotImplementedError, match="packs 4-bit codes along K"):
            op()
    other = weight_tensor(t.fmt, t.fmt.quantize(_gaussian(N, K, seed=9) * 3), t.dtype)
    with pytest.raises(ValueError, match="one second-level scale"):
        torch.cat([t, other])


def test_packed_tensor_as_compiled_input_and_output():
    _, t = _packed_tensor(torch.bfloat16)
    x = _gaussian(4, K, seed=5, dtype=torch.bfloat16)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def fn(x, weight):
        return F.linear(x, weight), weight[16:], weight.to(torch.float16)

    torch._dynamo.reset()
    y, rows, half = fn(x, t)
    torch.testing.assert_close(y, F.linear(x, t), rtol=0, atol=0)
    assert type(rows) is QuantizedWeightTensor and rows.fmt == t.fmt and rows.shape == (N - 16, K)
    assert torch.equal(rows.dequantize(), t.dequantize()[16:])
    assert half.dtype == torch.float16 and torch.equal(half.scale2, t.scale2)
    assert counter.frame_count == 1


def test_weight_tensor_checks_the_packed_shape():
    fmt = ToyPacked()
    qw = fmt.quantize(_gaussian(N, K, seed=1))
    bad = QuantizedWeight(qw.qdata.to(torch.int8), qw.scale, qw.block_size, qw.scale2)
    with pytest.raises(TypeError, match="w2: format toy_int4 stores qdata of dtype torch.uint8"):
        weight_tensor(fmt, bad, torch.float32, name="w2")
    with pytest.raises(ValueError, match=r"w3: a scale for block_size \(1, 16\)"):
        weight_tensor(
            fmt, QuantizedWeight(qw.qdata, qw.scale[:, :2], qw.block_size, qw.scale2), torch.float32, name="w3"
        )


# ---- the rotating format ---------------------------------------------------------------------------------------


def _rotated_tensor(kernels: bool, kind: str, kernel=None):
    w = _gaussian(N, K, seed=6)
    fmt = ToyRotated(torch.int8, "row", kernels=kernels)
    qw = fmt.quantize(w)
    act = activation_mode_for(kind, fmt, qw.block_size, w.shape)
    return w, qw, weight_tensor(fmt, qw, torch.float32, act=act, kernel=kernel)


def test_rotated_dequantize_is_in_the_models_basis():
    w, qw, t = _rotated_tensor(True, "weight_only")
    assert type(t) is Int8Tensor and t.fmt.rotates
    # independent: codes x scale in float64, then R^T applied by hand
    stored = qw.qdata.double() * qw.scale.double()
    c, s = math.cos(0.7), math.sin(0.7)
    expected = torch.empty_like(stored)
    expected[:, 0::2] = c * stored[:, 0::2] + s * stored[:, 1::2]
    expected[:, 1::2] = -s * stored[:, 0::2] + c * stored[:, 1::2]
    torch.testing.assert_close(t.dequantize(torch.float64), expected, rtol=1e-6, atol=1e-6)
    assert sqnr(w.double(), t.dequantize(torch.float64)) > 42  # INT8 per row: measured 44.4 dB
    with pytest.raises(NotImplementedError, match="stores codes rotated along K"):
        t.t()


@pytest.mark.parametrize("kernels", [True, False], ids=["int8-kernels", "dequantize-only"])
def test_rotated_weight_only_linear_equals_linear_on_dequantize_original(kernels):
    _, _, t = _rotated_tensor(kernels, "weight_only")
    x, bias = _gaussian(2, 5, K, seed=7), _gaussian(N, seed=8)
    torch.testing.assert_close(F.linear(x, t, bias), F.linear(x, t.dequantize(), bias), rtol=1e-5, atol=1e-5)
    emulated = weight_tensor(t.fmt, t.quantized_weight(), t.dtype, kernel="emulated")
    torch.testing.assert_close(F.linear(x, emulated, bias), F.linear(x, t.dequantize(), bias), rtol=1e-5, atol=1e-5)
    assert ("dequantize + matmul" in t.describe(x)) != kernels


def test_rotated_dynamic_linear_quantizes_the_rotated_activations():
    _, qw, t = _rotated_tensor(True, "dynamic")
    assert t.act == ActivationMode("dynamic", "row")
    x, bias = _gaussian(2, 5, K, seed=7), _gaussian(N, seed=8)
    y = F.linear(x, t, bias)
    # exactly the reference on rotate_input(x) and the stored-basis weight ...
    xr = _rotate_pairs(x, 0.7)
    stored = qw.qdata.float() * qw.scale
    assert torch.equal(y, reference_linear(xr, stored, torch.int8, t.act, bias))
    # ... which is F.linear(x, dequantize_original) up to the activations' INT8 rounding (measured 45.0 dB)
    assert sqnr(F.linear(x.double(), t.dequantize(torch.float64), bias.double()), y) > 42
    # the ordinary INT8 backend (torch._int_mm, which also runs on CPU) on the rotated input: the same product
    int_mm = next(b for b in registered_backends() if b.name == "torch_int_mm")
    torch.testing.assert_close(int_mm.run(xr, t, bias), y, rtol=1e-5, atol=1e-5)


def test_rotating_format_without_kernel_dtype_has_no_dynamic_mode():
    with pytest.raises(ValueError, match="no 8-bit kernel dtype"):
        _rotated_tensor(False, "dynamic")


def test_rotated_tensor_as_compiled_input():
    _, _, t = _rotated_tensor(True, "dynamic")
    x = _gaussian(3, K, seed=9)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: F.linear(x, w), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, t), F.linear(x, t))


# ---- every registered format that is not an 8-bit scaled one (MXFP8, NVFP4, ConvRot, ...) ---------------------

OTHER_FORMATS = sorted(name for name, fmt in FORMATS.items() if not isinstance(fmt, ScaledFormat))


@pytest.mark.parametrize("name", OTHER_FORMATS)
def test_registered_format_through_the_tensor_class(name, tmp_path):
    """Dequantize is the format's own ``dequantize_original``; weight-only linear (and dynamic where the format has
    it) is ``F.linear`` on that weight up to bf16 / activation rounding; save and load keep everything."""
    fmt = get_format(name)
    w = _gaussian(48, 256, seed=11)
    qw = fmt.quantize(w)
    x = _gaussian(2, 3, 256, seed=12, dtype=torch.bfloat16)
    kinds = ["weight_only"] + (["dynamic"] if fmt.kernel_dtype is not None else [])
    for kind in kinds:
        act = activation_mode_for(kind, fmt, qw.block_size, (48, 256))
        t = weight_tensor(fmt, qw, torch.bfloat16, act=act)
        assert type(t) is tensor_class_for(fmt) and t.shape == (48, 256) and t.fmt == fmt
        assert torch.equal(t.dequantize(torch.float32), fmt.dequantize_original(qw, torch.float32))
        y = F.linear(x, t)
        # bf16 output rounding alone is ~50 dB; INT8 dynamic activations measured 40-41 dB
        assert sqnr(F.linear(x.double(), t.dequantize(torch.float64)), y) > 38, kind
        torch.save(t, tmp_path / "t.pt")
        loaded = torch.load(tmp_path / "t.pt", weights_only=True)
        assert type(loaded) is type(t) and loaded.fmt == fmt and loaded.act == t.act
        assert torch.equal(loaded.dequantize(), t.dequantize())


# The rotating formats are here too: formats.convrot.hadamard builds the rotation from constants while compiling
# (a cached real tensor would enter the fake-tensor trace).
@pytest.mark.parametrize("name", OTHER_FORMATS)
def test_registered_format_compiles_with_the_tensor_as_input(name):
    fmt = get_format(name)
    qw = fmt.quantize(_gaussian(48, 256, seed=11))
    t = weight_tensor(fmt, qw, torch.bfloat16)
    x = _gaussian(2, 3, 256, seed=12, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: (F.linear(x, w), w.to(torch.float16)), backend="aot_eager", fullgraph=True)
    y, half = compiled(x, t)
    assert torch.equal(y, F.linear(x, t)) and type(half) is type(t) and half.fmt == fmt
    assert half.extra_names == t.extra_names and torch.equal(half.dequantize(), t.dequantize(torch.float16))


@pytest.mark.parametrize("name", [n for n in OTHER_FORMATS if get_format(n).quantize(_gaussian(48, 256, seed=0)).extra])
def test_extra_stored_tensors_travel_as_inner_tensors(name):
    """``QuantizedWeight.extra`` (w4a8's per-row ``s_channel``): flattened as ``extra__<name>``, kept by unflatten,
    device / dtype moves and clone, returned by ``quantized_weight()``; row selections refuse the weight."""
    fmt = get_format(name)
    qw = fmt.quantize(_gaussian(48, 256, seed=11))
    t = weight_tensor(fmt, qw, torch.bfloat16)
    names, attrs = t.__tensor_flatten__()
    assert names[:2] == ["qdata", "scale"] and {f"extra__{k}" for k in qw.extra} <= set(names)
    rebuilt = type(t).__tensor_unflatten__({n: getattr(t, n) for n in names}, attrs, t.shape, t.stride())
    for other in (rebuilt, t.clone(), t.to(torch.float32)):
        assert other.extra.keys() == qw.extra.keys()
        assert all(torch.equal(other.extra[k], v) for k, v in qw.extra.items())
    assert torch.equal(rebuilt.dequantize(), t.dequantize())
    assert all(t.quantized_weight().extra[k] is t.extra[k] for k in qw.extra)
    with pytest.raises(NotImplementedError, match="extra stored tensors"):
        t[16:]


@pytest.mark.parametrize("name", [n for n in OTHER_FORMATS if get_format(n).kernel_dtype is None])
def test_formats_without_kernel_dtype_refuse_dynamic_activations(name):
    """The dtype of dynamic activations is ``fmt.kernel_dtype``; a format without one is weight-only here, whether
    its ``dynamic_activation`` refuses (MXFP8, NVFP4) or names a pairing lrq_ao cannot yet quantize to (W4A8)."""
    fmt = get_format(name)
    qw = fmt.quantize(_gaussian(48, 256, seed=11))
    with pytest.raises(ValueError, match=f"format {name}"):
        activation_mode_for("dynamic", fmt, qw.block_size, (48, 256))
