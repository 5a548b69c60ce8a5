import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from lrq_ao.convert.stream import (
    CheckpointError,
    OutputEntry,
    StreamingWriter,
    layout_entries,
    parse_header,
    partial_path,
    read_source,
    read_tensor,
)


def _raw(header: dict, data: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def test_read_tensor_matches_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(7, 5, dtype=torch.bfloat16),
        "b": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "c": torch.randn(3).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    src = read_source(path)
    assert src.metadata == {"k": "v"}
    for name, ref in tensors.items():
        got = read_tensor(src.tensors[name])
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got.view(torch.uint8), ref.contiguous().view(torch.uint8))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a safetensors file"),
        (b"hello world, not a checkpoint", "not a safetensors file or truncated"),
        (struct.pack("<Q", 5) + b"{oops", "not valid JSON"),
        (_raw(["a"]), "must be a JSON object"),
        (_raw({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype 'Q9'"),
        (
            _raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "span 4 bytes but F32 of shape \\[2\\] needs 8",
        ),
        (_raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "truncated"),
        (
            _raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape must be a list of integers",
        ),
        (_raw({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "data_offsets must be two integers"),
        (_raw({"__metadata__": {"a": 1}}), "__metadata__ must map strings"),
        (
            _raw(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlap",
        ),
    ],
)
def test_bad_files_give_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        parse_header(path)
    assert str(path) in str(info.value)


def test_sharded_index_folder(tmp_path):
    a = {"x.weight": torch.randn(4, 4)}
    b = {"y.weight": torch.randn(2, 4)}
    save_file(a, str(tmp_path / "m-00001.safetensors"))
    save_file(b, str(tmp_path / "m-00002.safetensors"))
    index = {"weight_map": {"x.weight": "m-00001.safetensors", "y.weight": "m-00002.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    src = read_source(tmp_path)
    assert set(src.tensors) == {"x.weight", "y.weight"}
    assert torch.equal(read_tensor(src.tensors["y.weight"]), b["y.weight"])
    (tmp_path / "m-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        read_source(tmp_path)


def test_writer_output_is_byte_identical_to_safetensors_library(tmp_path):
    tensors = {
        "w": torch.randn(8, 16).to(torch.float8_e4m3fn),
        "s": torch.tensor(0.5),
        "m": torch.tensor(list(b'{"format": "x"}'), dtype=torch.uint8),
        "b": torch.randn(3, dtype=torch.bfloat16),
    }
    reference = save(tensors, {"k": "v"})
    # Lay our entries out in the order the library chose, then the two files must be the same bytes.
    (n,) = struct.unpack("<Q", reference[:8])
    header = json.loads(reference[8 : 8 + n])
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    entries, _ = layout_entries([OutputEntry(k, header[k]["dtype"], tuple(header[k]["shape"])) for k in order])
    target = tmp_path / "out.safetensors"
    writer = StreamingWriter(target, entries, {"k": "v"})
    for name in reversed(order):  # tensors may arrive in any order
        writer.write(name, tensors[name])
    assert partial_path(target).exists() and not target.exists()
    writer.finish()
    assert not partial_path(target).exists()
    assert target.read_bytes() == reference
    with safe_open(str(target), "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_writer_rejects_wrong_sizes_and_abort_removes_partial(tmp_path):
    entries, _ = layout_entries([OutputEntry("w", "F32", (4,))])
    writer = StreamingWriter(tmp_path / "o.safetensors", entries, {})
    with pytest.raises(ValueError, match="expects 16 bytes"):
        writer.write("w", torch.zeros(3))
    writer.abort(keep_partial=False)
    assert list(tmp_path.iterdir()) == []
