"""Issue 18: lrq-convert never reports success over a broken or wrong file. One test per cause: concurrent writers,
name collisions, headers the safetensors library rejects, sparse and oversized headers, shard-index traversal and
malformed indexes, permission bits, a full disk, side outputs checked before the work, --verify failures, --calib and
--objective misuse. Every refusal is one line naming the file or tensor; nothing is left behind."""

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lrq_ao.convert import header as hdr
from lrq_ao.convert.cli import main
from lrq_ao.convert.reader import ComfyFormatError, load_comfy, read_comfy
from lrq_ao.convert.stream import OutputBusyError, StreamingWriter, read_source

SIMPLE = ["--simple", "--quiet"]


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return info.value.code, capsys.readouterr().err


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert err.startswith("lrq-convert: error: ") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def small_model(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "m.x.weight": torch.randn(32, 48, generator=g),
        "m.x.bias": torch.randn(32, generator=g),
        "m.y.weight": torch.randn(48, 32, generator=g).bfloat16(),
    }
    tensors.update(extra)
    return tensors


def raw_file(path: Path, header_text: str, data: bytes) -> Path:
    body = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


# ---- concurrent writers --------------------------------------------------------------------------------------------


def test_second_writer_of_the_same_output_is_refused_naming_the_first(tmp_path, capsys):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(small_model(), str(src))
    source = read_source(src)
    from lrq_ao.convert.engine import open_plan_output
    from lrq_ao.convert.plan import ConvertOptions, build_plan

    plan = build_plan(source, ConvertOptions())
    first = open_plan_output(plan, out, resume=False)  # a conversion in progress: holds the lock on out.partial
    header_before = first.partial.read_bytes()
    code, err = run_cli(["-i", src, "-o", out, "--int8", "--scaling_mode", "tensor", *SIMPLE], capsys)
    assert_refused(code, err, str(first.partial), "being written by another conversion", f"pid {os.getpid()}")
    assert first.partial.read_bytes() == header_before  # the second run did not truncate or rewrite it
    assert not out.exists()
    first.abort(keep_partial=False)
    code, err = run_cli(["-i", src, "-o", out, *SIMPLE], capsys)  # once released, the output can be written
    assert code == 0, err


def test_writer_lock_is_held_until_the_rename(tmp_path):
    entries = [hdr_entry("t", "F32", (4,))]
    writer = StreamingWriter(tmp_path / "o.safetensors", entries, {})
    writer.write("t", torch.ones(4))
    with pytest.raises(OutputBusyError, match="being written by another conversion"):
        StreamingWriter(tmp_path / "o.safetensors", entries, {})
    writer.finish()
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("t"), torch.ones(4))


def hdr_entry(name, dtype, shape):
    from lrq_ao.convert.stream import OutputEntry, layout_entries

    return layout_entries([OutputEntry(name, dtype, shape)])[0][0]


# ---- output-name collisions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("m.x.weight_scale", "'m.x.weight' would both write output tensor 'm.x.weight_scale'"),
        ("m.x.input_scale", "would be read as quantization data of layer 'm.x'"),
        ("m.x.weight_scale_2", "would be read as quantization data of layer 'm.x'"),
        ("m.z.weight_scale", "named like a quantization scale but its layer is not quantized"),
    ],
)
def test_input_tensor_named_like_generated_data_is_refused_before_writing(tmp_path, capsys, extra, needle):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(small_model(**{extra: torch.tensor(0.5)}), str(src))
    code, err = run_cli(["-i", src, "-o", out, *SIMPLE], capsys)
    assert_refused(code, err, repr(extra), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_excluding_the_layer_resolves_the_collision(tmp_path, capsys):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(small_model(**{"m.x.input_scale": torch.tensor(0.5)}), str(src))
    code, err = run_cli(["-i", src, "-o", out, "--exclude-layers", "^m\\.x$", *SIMPLE], capsys)
    assert code == 0, err
    assert "m.x" not in read_comfy(out).layers and "m.y" in read_comfy(out).layers


# ---- headers the safetensors library rejects -----------------------------------------------------------------------

GOOD = '"a.weight": {"dtype": "F32", "shape": [16, 16], "data_offsets": [0, 1024]}'
REJECTED_HEADERS = {
    "bool_dim": ('{"a.weight": {"dtype": "F32", "shape": [true, 16], "data_offsets": [0, 64]}}', 64, "shape"),
    "dim_2_64": (
        '{"a.weight": {"dtype": "F32", "shape": [18446744073709551616, 0], "data_offsets": [0, 0]}}',
        0,
        "shape",
    ),
    "duplicate": ("{" + GOOD + ", " + GOOD.replace("[0, 1024]", "[1024, 2048]") + "}", 2048, "appears twice"),
    "gap": ('{"a.weight": {"dtype": "F32", "shape": [16, 16], "data_offsets": [8, 1032]}}', 1032, "gap"),
    "trailing": ("{" + GOOD + "}", 1030, "trailing data"),
    "dtype_list": ('{"a.weight": {"dtype": [], "shape": [16, 16], "data_offsets": [0, 1024]}}', 1024, "unknown dtype"),
    "nan_offset": ('{"a.weight": {"dtype": "F32", "shape": [16, 16], "data_offsets": [NaN, 1024]}}', 1024, "JSON"),
    "deep": ('{"__metadata__": ' + "[" * 100000 + "]" * 100000 + "}", 0, "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(REJECTED_HEADERS))
def test_headers_safetensors_rejects_are_refused_by_converter_and_reader(tmp_path, capsys, case):
    text, nbytes, needle = REJECTED_HEADERS[case]
    src = raw_file(tmp_path / "in.safetensors", text, bytes(nbytes))
    with pytest.raises(Exception), safe_open(str(src), "pt") as f:  # noqa: B017 - the oracle: the library refuses it
        [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
    blob = src.read_bytes()
    code, err = run_cli(["-i", src, "-o", tmp_path / "out.safetensors", *SIMPLE], capsys)
    assert_refused(code, err, str(src), needle)
    with pytest.raises(ComfyFormatError, match=needle):
        read_comfy(src)
    assert src.read_bytes() == blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


# ---- caps on what a header can make us allocate --------------------------------------------------------------------


def test_sparse_file_declaring_gigabytes_is_refused_without_allocating(tmp_path, capsys):
    rows = 3_149_414  # x 1024 x 4 bytes: 12.9 GB declared
    declared = rows * 1024 * 4
    text = json.dumps({"a.weight": {"dtype": "F32", "shape": [rows, 1024], "data_offsets": [0, declared]}})
    src = raw_file(tmp_path / "bomb.safetensors", text, b"")
    with open(src, "r+b") as f:
        f.truncate(8 + len(text) + declared)  # a hole: 4 KiB on disk
    if src.stat().st_blocks * 512 > 1 << 20:
        pytest.skip("this filesystem does not keep sparse files")
    code, err = run_cli(["-i", src, "-o", tmp_path / "out.safetensors", *SIMPLE], capsys)
    assert_refused(code, err, "sparse file", hdr.ALLOW_SPARSE_ENV)
    with pytest.raises(ComfyFormatError, match="sparse file"):
        load_comfy(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.safetensors"]


def test_header_with_too_many_values_is_refused_before_parsing(tmp_path):
    text = '{"__metadata__": {}, "x": ' + "[" + "0," * (hdr.MAX_HEADER_VALUES + 1) + "0]}"
    src = raw_file(tmp_path / "many.safetensors", text, b"")
    with pytest.raises(hdr.CheckpointError, match="JSON values"):
        hdr.read_header(src)


def test_both_parsers_share_one_header_cap():
    from lrq_ao.convert import reader, stream

    assert stream.MAX_HEADER_BYTES == hdr.MAX_HEADER_BYTES == 100_000_000
    assert not hasattr(reader, "MAX_HEADER_BYTES") and not hasattr(reader, "_check_entry")


# ---- shard indexes -------------------------------------------------------------------------------------------------


def sharded_input(folder: Path) -> Path:
    folder.mkdir()
    tensors = small_model()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:2]}, str(folder / "s-1.safetensors"))
    save_file({k: tensors[k] for k in names[2:]}, str(folder / "s-2.safetensors"))
    weight_map = {k: "s-1.safetensors" if k in names[:2] else "s-2.safetensors" for k in names}
    index = folder / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize(
    ("weight_map", "needle"),
    [
        ([["m.x.weight", "s-1.safetensors"]], "needs a 'weight_map' object"),
        ({}, "'weight_map' is empty"),
        (3, "needs a 'weight_map' object"),
        (None, "needs a 'weight_map' object"),
        ({"m.x.weight": 7}, "not a shard file name"),
        ({"m.x.weight": None}, "not a shard file name"),
    ],
)
def test_malformed_shard_index_is_refused_by_converter_and_reader(tmp_path, capsys, weight_map, needle):
    index = sharded_input(tmp_path / "model")
    index.write_text(json.dumps({"weight_map": weight_map}))
    code, err = run_cli(["-i", index, "-o", tmp_path / "out.safetensors", *SIMPLE], capsys)
    assert_refused(code, err, str(index), needle)
    with pytest.raises(ComfyFormatError, match=needle):
        load_comfy(index)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_outside_the_index_folder_needs_the_flag(tmp_path, capsys, where):
    index = sharded_input(tmp_path / "model")
    outside = tmp_path / "elsewhere.safetensors"
    (index.parent / "s-2.safetensors").rename(outside)
    data = json.loads(index.read_text())
    name = "../elsewhere.safetensors" if where == "parent" else str(outside)
    data["weight_map"] = {k: (name if v == "s-2.safetensors" else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    out = tmp_path / "out.safetensors"
    code, err = run_cli(["-i", index, "-o", out, *SIMPLE], capsys)
    assert_refused(code, err, "lies outside the index's folder", "--allow-shards-outside")
    with pytest.raises(ComfyFormatError, match="outside the index's folder"):
        read_comfy(index)
    code, err = run_cli(["-i", index, "-o", out, "--allow-shards-outside", *SIMPLE], capsys)
    assert code == 0, err
    assert set(read_comfy(out).layers) == {"m.x", "m.y"}


def test_index_that_misdescribes_its_shards_is_refused(tmp_path, capsys):
    index = sharded_input(tmp_path / "model")
    data = json.loads(index.read_text())
    data["weight_map"]["m.x.bias"] = "s-2.safetensors"  # it lives in s-1
    index.write_text(json.dumps(data))
    code, err = run_cli(["-i", index, "-o", tmp_path / "out.safetensors", *SIMPLE], capsys)
    assert_refused(code, err, "'m.x.bias'", "does not describe these shards")


# ---- permission bits, disk space, side outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
@pytest.mark.parametrize("sharded", [False, True])
def test_output_keeps_the_input_permission_bits(tmp_path, capsys, mode, sharded):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(small_model(), str(src))
    os.chmod(src, mode)
    extra = ["--max-shard-size", "1KB"] if sharded else []
    code, err = run_cli(["-i", src, "-o", out, *extra, *SIMPLE], capsys)
    assert code == 0, err
    written = [p for p in tmp_path.iterdir() if p.name != "in.safetensors"]
    assert len(written) == (4 if sharded else 1), written  # sharded: 3 shards and the index
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(mode)}


def test_free_space_is_checked_before_anything_is_written(tmp_path, capsys, monkeypatch):
    import shutil

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(small_model(), str(src))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    code, err = run_cli(["-i", src, "-o", out, *SIMPLE], capsys)
    assert_refused(code, err, "not enough free space in", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_disk_full_while_writing_gives_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from lrq_ao.convert import stream

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(small_model(), str(src))
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, buf, pos):
        calls.append(pos)
        if len(calls) > 2:  # the header and the first tensor fit; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, buf, pos)

    monkeypatch.setattr(stream.os, "pwrite", pwrite)
    code, err = run_cli(["-i", src, "-o", out, *SIMPLE], capsys)
    assert_refused(code, err, "disk full while writing", "out.safetensors.partial")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize("flag", ["--report", "--plot"])
def test_report_and_plot_paths_are_checked_before_the_work(tmp_path, capsys, flag):
    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(small_model(), str(src))
    code, err = run_cli(["-i", src, "-o", out, flag, tmp_path / "missing" / "r.out", *SIMPLE], capsys)
    assert_refused(code, err, flag, "does not exist")
    assert not out.exists()


def test_failed_verify_leaves_no_file_under_the_final_name(tmp_path, capsys, monkeypatch):
    from lrq_ao.convert import verify

    src, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(small_model(), str(src))
    monkeypatch.setattr(verify, "verify_output", lambda plan, report: {"ok": False, "problems": ["simulated"]})
    code, err = run_cli(["-i", src, "-o", out, "--verify", *SIMPLE], capsys)
    assert code == 3 and "verify FAILED" in err and "deleted the unverified output" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


# ---- --calib and --objective ---------------------------------------------------------------------------------------


def test_output_objective_without_calib_is_refused_before_any_work(tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    save_file(small_model(), str(src))
    code, err = run_cli(["-i", src, "-o", tmp_path / "o.safetensors", "--objective", "output", "--quiet"], capsys)
    assert_refused(code, err, "--objective output", "--calib FILE")


@pytest.mark.parametrize("content", [b"not a safetensors file at all", None])
def test_unusable_calib_file_is_one_line(tmp_path, capsys, content):
    src, calib = tmp_path / "in.safetensors", tmp_path / "calib.safetensors"
    save_file(small_model(), str(src))
    if content is None:  # a calibration file whose statistics lack a tensor
        save_file({"m.x.h": torch.eye(48)}, str(calib), metadata={"lrq_ao_calibration": "1"})
    else:
        calib.write_bytes(content)
    code, err = run_cli(["-i", src, "-o", tmp_path / "o.safetensors", "--calib", calib, "--quiet"], capsys)
    assert_refused(code, err, f"--calib {calib}", "calibration file")
    assert not (tmp_path / "o.safetensors").exists()


# ---- quiet start ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["-c", "import lrq_ao"], ["-m", "lrq_ao.convert", "--help"]])
def test_start_prints_no_third_party_noise(command):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def test_quiet_filters_drop_only_the_two_known_lines():
    import logging

    import lrq_ao

    assert lrq_ao._torchao_so_noise("Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310.so: Could not load")
    assert not lrq_ao._torchao_so_noise("Failed to load /x/site-packages/other/_C.so")
    assert lrq_ao._pytree_enum_noise(
        "<enum 'K'> is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
        "Calling register_constant() on Enum subclasses is deprecated"
    )
    record = logging.LogRecord("torchao", logging.WARNING, __file__, 1, "Skipping import of cpp extensions", None, None)
    assert all(f.filter(record) for f in logging.getLogger("torchao").filters)
