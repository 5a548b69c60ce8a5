"""Fuzzing the converter with malformed headers and metadata: only clear errors (exit 1 with a message), never a
crash (an uncaught exception fails the test), and never an output or partial file left behind."""

import contextlib
import io
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from lrq_ao.convert.cli import main

DTYPES = ["F32", "F16", "BF16", "I64", "I8", "U8", "F8_E4M3", "BOOL", "F64", "Q7", "", None, 3]
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1, "BOOL": 1, "F64": 8}
NAMES = st.sampled_from(
    ["a.weight", "b.weight", "a.bias", "norm.weight", "x.comfy_quant", "scaled_fp8", "blocks.0.attn.qkv.weight", ""]
)
SHAPES = st.one_of(
    st.lists(st.sampled_from([0, 1, 2, 16, 32, 48]), min_size=0, max_size=3),
    st.just([-1, 4]),
    st.just([2**40, 2**30]),
    st.just("16x16"),
)
RARELY = st.integers(0, 4).map(lambda x: x == 0)  # a corruption that should not drown out the deeper cases
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=8))


@st.composite
def checkpoints(draw) -> bytes:
    entries = draw(
        st.dictionaries(NAMES, st.tuples(st.sampled_from(DTYPES), SHAPES, RARELY.map(lambda x: not x)), max_size=4)
    )
    header: dict = {}
    offset = 0
    for name, (dtype, shape, consistent) in entries.items():
        numel = math.prod(shape) if isinstance(shape, list) and all(isinstance(d, int) for d in shape) else 1
        nbytes = max(numel, 0) * SIZES.get(dtype, 1) if isinstance(dtype, str) else 4
        span = nbytes if consistent else draw(st.integers(0, 64))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + span]}
        offset += span
    meta_kind = draw(st.sampled_from(["none", "strings", "values", "quant_meta", "not_a_dict"]))
    if meta_kind == "strings":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3))
    elif meta_kind == "values":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), JSON_SCALARS, max_size=3))
    elif meta_kind == "quant_meta":
        header["__metadata__"] = {"_quantization_metadata": draw(st.text(max_size=30))}
    elif meta_kind == "not_a_dict":
        header["__metadata__"] = draw(JSON_SCALARS)
    if draw(RARELY) and entries:
        # Corrupt one entry's structure.
        victim = next(iter(entries))
        header[victim] = draw(st.one_of(JSON_SCALARS, st.just({"dtype": "F32"}), st.just({"shape": [1]})))
    raw = json.dumps(header).encode()
    if draw(RARELY):
        raw = raw[: draw(st.integers(0, len(raw)))]  # a header cut short
    data_len = min(offset, 4096) + draw(
        st.sampled_from([0, 0, 0, -1, -8, 3])
    )  # huge declared sizes get a short (truncated) body
    payload = draw(st.binary(min_size=max(data_len, 0), max_size=max(data_len, 0)))
    length = draw(st.sampled_from([len(raw)] * 6 + [len(raw) + 3, 0, 2**63]))
    return struct.pack("<Q", length) + raw + payload


@st.composite
def well_formed_checkpoints(draw) -> bytes:
    """Valid containers with odd contents: random bytes as weights (NaN/Inf, subnormals), integer weights, odd
    shapes, and metadata including a garbage _quantization_metadata; these reach planning and quantization."""
    tensors = {}
    plain = st.sampled_from(["a.weight", "b.weight", "a.bias", "norm.weight", "blocks.0.attn.qkv.weight"])
    for name in draw(st.lists(st.one_of(plain, plain, plain, NAMES), min_size=1, max_size=4, unique=True)):
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int8]))
        shape = draw(st.sampled_from([(16, 16), (32, 16), (16, 48), (16,), (2, 16, 16), (0, 16)]))
        numel = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        data = draw(st.one_of(st.binary(min_size=numel, max_size=numel), st.just(bytes(numel))))
        if draw(st.booleans()) or numel == 0:  # often sane values, so conversion often succeeds
            tensors[name] = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()
    meta = draw(
        st.one_of(
            st.none(), st.dictionaries(st.sampled_from(["_quantization_metadata"] + ["x"] * 4), st.text(max_size=20))
        )
    )
    return save(tensors, meta)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(checkpoints(), well_formed_checkpoints()))
def test_malformed_inputs_give_clear_errors_and_leave_nothing(blob):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        src, out = folder / "in.safetensors", folder / "out.safetensors"
        src.write_bytes(blob)
        stderr = io.StringIO()
        quiet = contextlib.redirect_stdout(io.StringIO())
        with contextlib.redirect_stderr(stderr), quiet, pytest.raises(SystemExit) as info:
            main(["-i", str(src), "-o", str(out), "--simple", "--quiet", "--verify"])
        code = info.value.code
        event(f"exit {code}: {stderr.getvalue().split('in.safetensors')[-1][:30]}")
        left = sorted(p.name for p in folder.iterdir())
        if code == 0:
            assert left == ["in.safetensors", "out.safetensors"]
            with safe_open(str(out), "pt") as f:
                assert f.keys() is not None
        else:
            assert code == 1, stderr.getvalue()
            message = stderr.getvalue()
            assert message.startswith("lrq-convert: error: ") and len(message.splitlines()) == 1, message
            assert left == ["in.safetensors"], left
        assert src.read_bytes() == blob  # the input is never modified
