"""The contract every quantized weight layout passes, for 6 formats x {weight_only, dynamic}.

``LayoutContract`` is reusable: a new layout subclasses it with its own ``CASES`` (format name, activation kind)
and inherits every check. Accuracy is checked as SQNR of the linear output against a float64 reference computed
with the original (unquantized) weight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrq_ao.layouts import (
    ActivationMode,
    Float8Tensor,
    Int8Tensor,
    QuantizedWeightTensor,
    activation_mode_for,
    make_weight_tensor,
)
from lrq_ao.primitives import format_spec, quantize_rtn, sqnr

N, K, BLOCK = 64, 96, 32
FORMATS = ("fp8", "fp8_row", "fp8_block", "int8_tensor", "int8", "int8_block")

# Linear-output SQNR floors (dB) vs float64 with the original weight, bf16 activations (2, 3, 96), Gaussian data.
# Measured on this seed: FP8 weight-only 31.0-31.4, FP8 dynamic 28.4-29.3, INT8 weight-only 40.9-42.8,
# INT8 dynamic 39.5-41.0 (bf16 rounding of the output costs ~0.3 dB). Floors sit ~2 dB below.
SQNR_FLOORS = {
    ("fp8", "weight_only"): 29,
    ("fp8_row", "weight_only"): 29,
    ("fp8_block", "weight_only"): 29,
    ("fp8", "dynamic"): 26,
    ("fp8_row", "dynamic"): 26,
    ("fp8_block", "dynamic"): 26,
    ("int8_tensor", "weight_only"): 38,
    ("int8", "weight_only"): 39,
    ("int8_block", "weight_only"): 38,
    ("int8_tensor", "dynamic"): 37,
    ("int8", "dynamic"): 37,
    ("int8_block", "dynamic"): 37,
}


def _gaussian(*shape, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


class LayoutContract:
    """Checks shared by every layout. A subclass named ``Test...`` provides a ``case`` fixture yielding
    ``(format, activation kind, hp weight, quantized tensor)`` and may override ``make``."""

    @staticmethod
    def make(fmt: str, kind: str, hp: torch.Tensor) -> QuantizedWeightTensor:
        spec = format_spec(fmt, BLOCK)
        qdata, scale, block_size = quantize_rtn(hp, spec)
        act = activation_mode_for(kind, spec.qdtype, block_size, hp.shape)
        return make_weight_tensor(qdata, scale, block_size, hp.dtype, act=act)

    # ---- structure ---------------------------------------------------------------------------------------

    def test_flatten_unflatten_round_trip(self, case):
        _, _, _, t = case
        names, attrs = t.__tensor_flatten__()
        assert names == ["qdata", "scale"]
        rebuilt = type(t).__tensor_unflatten__({n: getattr(t, n) for n in names}, attrs, t.shape, t.stride())
        assert type(rebuilt) is type(t) and rebuilt.block_size == t.block_size and rebuilt.dtype == t.dtype
        assert rebuilt.act == t.act and rebuilt.kernel == t.kernel
        assert torch.equal(rebuilt.dequantize(), t.dequantize())

    def test_move_to_meta_keeps_layout(self, case):
        _, _, _, t = case
        m = t.to("meta")
        assert type(m) is type(t) and m.device.type == "meta" and m.qdata.is_meta and m.scale.is_meta
        assert m.block_size == t.block_size and m.dtype == t.dtype and m.act == t.act

    def test_to_dtype_changes_dequantized_dtype(self, case):
        _, _, _, t = case
        h = t.to("cpu", torch.float16)
        assert type(h) is type(t) and h.dtype == torch.float16 and h.dequantize().dtype == torch.float16
        assert torch.equal(h.qdata.view(torch.uint8), t.qdata.view(torch.uint8))
        assert torch.equal(h.dequantize(), t.dequantize(torch.float32).to(torch.float16))
        assert t.to(t.dtype) is t
        with pytest.raises(TypeError, match="dequantizes to"):
            t.to(torch.int8)

    def test_transpose_transposes_scale_grid_and_block(self, case):
        _, _, _, t = case
        for tt in (t.t(), t.transpose(0, 1), t.permute(1, 0), t.mT):
            assert type(tt) is type(t) and tt.shape == (K, N)
            assert tt.block_size == t.block_size[::-1] and tt.scale.shape == t.scale.shape[::-1]
            assert torch.equal(tt.dequantize(), t.dequantize().t())
        assert torch.equal(t.t().t().dequantize(), t.dequantize())

    def test_detach_clone_alias_contiguous(self, case):
        _, _, _, t = case
        for out in (t.detach(), t.clone(), torch.ops.aten.alias(t), t.contiguous(), t.t().contiguous().t()):
            assert type(out) is type(t) and out.block_size == t.block_size
            assert torch.equal(out.dequantize(), t.dequantize())
        assert t.clone().qdata.data_ptr() != t.qdata.data_ptr()

    def test_copy_(self, case):
        fmt, kind, hp, t = case
        dst = self.make(fmt, kind, _gaussian(N, K, seed=2))
        dst.copy_(t)
        assert torch.equal(dst.dequantize(), t.dequantize())
        plain = torch.empty(N, K, dtype=torch.float32)
        plain.copy_(t)
        assert torch.equal(plain, t.dequantize(torch.float32))
        with pytest.raises(ValueError, match="does not requantize"):
            dst.copy_(hp)
        with pytest.raises(ValueError, match="layouts differ"):
            dst.copy_(self.make(fmt, kind, _gaussian(N - BLOCK, K, seed=3)))

    def test_row_selection_along_output_dim(self, case):
        _, _, _, t = case
        dq = t.dequantize()
        rows = torch.arange(BLOCK, 2 * BLOCK)
        for part in (t[BLOCK:], t.narrow(0, BLOCK, BLOCK), t.index_select(0, rows), t[-BLOCK:]):
            assert type(part) is type(t) and part.shape == (BLOCK, K)
            assert torch.equal(part.dequantize(), dq[BLOCK:])
        if t.block_size[0] not in (1, N):  # block-wise: only whole blocks can be cut out
            with pytest.raises(ValueError, match="multiples of"):
                t[1:BLOCK]
            with pytest.raises(ValueError, match="whole blocks"):
                t.index_select(0, torch.tensor([0, 2]))
        with pytest.raises(NotImplementedError, match="input dimension"):
            t[:, :BLOCK]

    def test_split_and_cat_along_output_dim(self, case):
        fmt, kind, _, t = case
        dq = t.dequantize()
        pieces = t.split(BLOCK)
        assert [p.shape[0] for p in pieces] == [BLOCK, BLOCK]
        assert all(type(p) is type(t) for p in pieces)
        assert torch.equal(torch.cat([p.dequantize() for p in pieces]), dq)
        assert all(torch.equal(a.dequantize(), b.dequantize()) for a, b in zip(t.chunk(2), pieces))
        fused = torch.cat(pieces)
        assert type(fused) is type(t) and torch.equal(fused.dequantize(), dq)
        if t.block_size[0] == N:  # per-tensor pieces keep their own scales: the result is honestly block-wise
            assert fused.layout_name == f"block {BLOCK}x{K}" and fused.scale.shape == (2, 1)
        else:
            assert fused.block_size == t.block_size and torch.equal(fused.scale, t.scale)
        other = self.make(fmt, "weight_only" if kind == "dynamic" else "dynamic", _gaussian(N, K, seed=9))
        with pytest.raises(ValueError, match="needs one class, block size"):
            torch.cat([t, other])

    def test_view_same_shape_only(self, case):
        _, _, _, t = case
        assert torch.equal(t.view(N, K).dequantize(), t.dequantize())
        assert torch.equal(t.reshape(-1, K).dequantize(), t.dequantize())
        with pytest.raises(NotImplementedError, match="view"):
            t.view(K, N)

    def test_pinning(self, case):
        _, _, _, t = case
        assert not t.is_pinned()
        if torch.cuda.is_available():  # pinning needs a CUDA host allocator
            p = t.pin_memory()
            assert type(p) is type(t) and p.is_pinned()

    def test_unsupported_op_names_op_and_layout(self, case):
        _, _, _, t = case
        with pytest.raises(NotImplementedError, match=rf"aten\.exp.*{type(t).__name__} \(layout {t.layout_name}"):
            torch.exp(t)
        with pytest.raises(NotImplementedError, match=r"aten\.add\.Tensor"):
            t + 1

    # ---- arithmetic ------------------------------------------------------------------------------------------

    def test_linear_sqnr_vs_float64(self, case):
        fmt, kind, hp, t = case
        x = _gaussian(2, 3, K, seed=4)
        bias = _gaussian(N, seed=5)
        reference = x.double() @ hp.double().t() + bias.double()
        for y in (F.linear(x, t, bias), torch.ops.aten.linear(x, t, bias)):
            assert y.shape == (2, 3, N) and y.dtype == x.dtype
            assert sqnr(reference, y) >= SQNR_FLOORS[(fmt, kind)]

    def test_matmul_spellings_agree_with_linear(self, case):
        _, _, _, t = case
        x = _gaussian(5, K, seed=6)
        bias = _gaussian(N, seed=7)
        y = F.linear(x, t)
        assert torch.equal(x @ t.t(), y)
        assert torch.equal(torch.matmul(x, t.t()), y)
        assert torch.equal(torch.mm(x, t.t()), y)
        assert torch.equal(torch.addmm(bias, x, t.t()), y + bias)
        torch.testing.assert_close(torch.mm(t, x.t()), y.t())

    def test_emulated_backend_agrees_with_default(self, case):
        fmt, kind, hp, t = case
        x = _gaussian(4, K, seed=8)
        emulated = make_weight_tensor(t.qdata, t.scale, t.block_size, t.dtype, act=t.act, kernel="emulated")
        assert "emulated" in emulated.describe(x).splitlines()[0]
        # same quantization arithmetic; only the matmul precision (float32 vs bf16) may differ
        assert sqnr(F.linear(x, emulated).double(), F.linear(x, t)) >= 40


class TestBuiltinLayouts(LayoutContract):
    CASES = [(fmt, kind) for fmt in FORMATS for kind in ("weight_only", "dynamic")]

    @pytest.fixture(params=CASES, ids=[f"{f}-{k}" for f, k in CASES])
    def case(self, request):
        fmt, kind = request.param
        hp = _gaussian(N, K, seed=1)
        return fmt, kind, hp, self.make(fmt, kind, hp)


def test_classes_per_element_type():
    hp = _gaussian(N, K, seed=1)
    assert type(LayoutContract.make("fp8_block", "dynamic", hp)) is Float8Tensor
    assert type(LayoutContract.make("int8", "weight_only", hp)) is Int8Tensor


def test_dynamic_activation_modes_follow_weight_layout():
    hp = _gaussian(N, K, seed=1)
    # per token, also for a per-tensor FP8 weight: see activation_mode_for
    assert LayoutContract.make("fp8", "dynamic", hp).act == ActivationMode("dynamic", "row")
    assert LayoutContract.make("fp8_row", "dynamic", hp).act == ActivationMode("dynamic", "row")
    assert LayoutContract.make("int8_tensor", "dynamic", hp).act == ActivationMode("dynamic", "row")
    assert LayoutContract.make("int8_block", "dynamic", hp).act == ActivationMode("dynamic", "block", BLOCK)
