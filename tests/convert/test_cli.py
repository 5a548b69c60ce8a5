"""End-to-end tests of lrq-convert, in process (``main(argv)``) so they stay fast; subprocess runs are in
test_resume.py and test_memory.py. Outputs are checked with the safetensors library and float64 references."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lrq_ao.convert.cli import main


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def sqnr64(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(20 * torch.log10(ref.norm() / (ref - approx).norm()))


def dequantize_stored(qdata: torch.Tensor, scale: torch.Tensor, marker: dict) -> torch.Tensor:
    """Independent float64 dequantization from the stored ComfyUI tensors (FORMAT.md semantics)."""
    q = qdata.double()
    s = scale.double()
    fmt = marker["format"]
    if fmt.endswith("blockwise"):
        g = marker["group_size"]
        return q * s.repeat_interleave(g, 0).repeat_interleave(g, 1)
    if fmt == "float8_e4m3fn_rowwise":
        return q * s[:, None]
    return q * s  # scalar [] or per-row [out, 1]


# format -> (expected stored scale shape for a (N, K) weight, SQNR floor in dB). Floors are ~1 dB under the
# minimum over MiniLM-L6's 36 layers measured with round-to-nearest (DEVELOPMENT.md "Converter"); per-tensor INT8
# is poor on layers with outliers, which is why --int8 defaults to per-row.
FORMATS = {
    "float8_e4m3fn": (lambda n, k: (), 30.5),
    "int8_tensorwise": (lambda n, k: (n, 1), 32.5),
    "int8_tensorwise_tensor": (lambda n, k: (), 7.0),
    "float8_e4m3fn_rowwise": (lambda n, k: (n,), 30.5),
    "float8_e4m3fn_blockwise": (lambda n, k: (n // 128, k // 128), 30.5),
    "int8_blockwise": (lambda n, k: (n // 128, k // 128), 22.0),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_minilm_converts_in_each_format_and_verifies(fmt, minilm_path, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    report = tmp_path / "r.json"
    code, stdout, stderr = run_main(
        ["-i", minilm_path, "-o", out, "--format", fmt, "--simple", "--verify", "--report", report, "--quiet"], capsys
    )
    assert code == 0, stderr
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"], rep["verify"]["problems"]
    assert rep["verify"]["layers_checked"] == 36 == rep["totals"]["quantized_layers"]
    source = load_file(str(minilm_path))
    shape_of, floor = FORMATS[fmt]
    recorded = {r["layer"]: r["sqnr_db"] for r in rep["layers"]}
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        header_layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        for layer in recorded:
            marker = json.loads(bytes(f.get_tensor(layer + ".comfy_quant").tolist()))
            assert marker == header_layers[layer]
            qdata, scale = f.get_tensor(layer + ".weight"), f.get_tensor(layer + ".weight_scale")
            n, k = qdata.shape
            assert qdata.dtype == (torch.int8 if fmt.startswith("int8") else torch.float8_e4m3fn)
            assert scale.dtype == torch.float32 and tuple(scale.shape) == shape_of(n, k)
            value = sqnr64(source[layer + ".weight"], dequantize_stored(qdata, scale, marker))
            assert value >= floor, (layer, value)
            assert abs(value - recorded[layer]) < 0.01
        for name, t in source.items():  # everything not quantized is carried over bit for bit
            if name[: -len(".weight")] not in recorded:
                assert name in keys and torch.equal(f.get_tensor(name), t)
    assert not (tmp_path / "out.safetensors.partial").exists()


def test_int8_round_to_nearest_is_exact(minilm_path, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    code, _, err = run_main(["-i", minilm_path, "-o", out, "--int8", "--simple", "--quiet"], capsys)
    assert code == 0, err
    w = load_file(str(minilm_path))["encoder.layer.2.intermediate.dense.weight"].float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8)
    expected = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("encoder.layer.2.intermediate.dense.weight"), expected)
        assert torch.equal(f.get_tensor("encoder.layer.2.intermediate.dense.weight_scale"), scale)


@pytest.mark.slow
def test_learned_rounding_run_reports_objective(minilm_path, tmp_path, capsys):
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    argv = ["-i", minilm_path, "-o", out, "--objective", "svd", "--num_iter", "10"]
    argv += ["--exclude-layers", r"layer\.[1-5]\.|intermediate"]
    code, stdout, err = run_main([*argv, "--verify", "--report", report, "--plot", tmp_path / "p.png"], capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"] and rep["totals"]["quantized_layers"] == 5
    for layer in rep["layers"]:
        assert layer["objective_after"] is not None and layer["objective_before"] is not None
        assert layer["objective_after"] <= layer["objective_before"] * (1 + 1e-6)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SQNR dB" in stdout


def test_flag_mapping_and_custom_node_warning(flux_ckpt, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    code, _, err = run_main(
        ["-i", flux_ckpt, "-o", out, "--int8", "--scaling_mode", "block", "--block_size", "64", "--simple", "--quiet"],
        capsys,
    )
    assert code == 0, err
    assert "int8_blockwise" in err and "ComfyUI-QuantOps" in err
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        assert meta["double_blocks.0.img_mlp.0"]["format"] == "int8_blockwise"
        assert meta["single_blocks.0.linear1"]["format"] == "int8_tensorwise"  # the stated fallback
        assert tuple(f.get_tensor("single_blocks.0.linear1.weight_scale").shape) == (96, 1)
    out2 = tmp_path / "o2.safetensors"
    code, _, err = run_main(["-i", flux_ckpt, "-o", out2, "--int8", "--simple", "--quiet"], capsys)
    assert code == 0 and "QuantOps" not in err
    with safe_open(str(out2), "pt") as f:
        assert all(
            v["format"] == "int8_tensorwise"
            for v in json.loads(f.metadata()["_quantization_metadata"])["layers"].values()
        )


def test_dry_run_writes_nothing_and_prints_the_plan(flux_ckpt, tmp_path, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, _ = run_main(["-i", flux_ckpt, "--dry-run", "--report", tmp_path / "r.json"], capsys)
    assert code == 0
    assert "preset: flux" in stdout and "estimated output size" in stdout
    assert "conv_in.weight" in stdout and "4-D" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_default_output_name_and_refusing_to_overwrite(flux_ckpt, tmp_path, capsys):
    code, _, err = run_main(["-i", flux_ckpt, "--simple", "--quiet"], capsys)
    assert code == 0, err
    out = tmp_path / "flux_tiny_float8_e4m3fn.safetensors"
    first = out.read_bytes()
    out.write_bytes(b"precious")
    code, _, err = run_main(["-i", flux_ckpt, "--simple", "--quiet"], capsys)
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"
    code, _, err = run_main(["-i", flux_ckpt, "--simple", "--quiet", "--overwrite"], capsys)
    assert code == 0 and out.read_bytes() == first


@pytest.mark.parametrize("target", ["missing_dir/out.safetensors", "/proc/lrq_convert_test.safetensors"])
def test_unwritable_output_is_a_clear_error(flux_ckpt, tmp_path, capsys, target):
    path = tmp_path / target if not target.startswith("/") else target
    code, _, err = run_main(["-i", flux_ckpt, "-o", path, "--simple", "--quiet"], capsys)
    assert code == 1
    assert any(s in err for s in ("does not exist", "not writable", "cannot create output file", "free space")), err


@pytest.mark.parametrize(
    "content, message",
    [(b"this is not a checkpoint at all", "not a safetensors file"), (None, "truncated")],
)
def test_bad_input_files(flux_ckpt, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content if content is not None else flux_ckpt.read_bytes()[:-100])
    code, _, err = run_main(["-i", bad, "-o", tmp_path / "o.safetensors", "--simple", "--quiet"], capsys)
    assert code == 1 and message in err and str(bad) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad.safetensors", flux_ckpt.name])


def _with_nan(tmp_path):
    t = {"a.weight": torch.randn(32, 32), "b.weight": torch.randn(32, 32), "b.bias": torch.zeros(32)}
    t["b.weight"][3, 4] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(t, str(path))
    return path, t


def test_nan_weights_fail_naming_the_tensor_and_leave_nothing(tmp_path, capsys):
    path, _ = _with_nan(tmp_path)
    code, _, err = run_main(["-i", path, "-o", tmp_path / "o.safetensors", "--simple", "--quiet"], capsys)
    assert code == 1 and "'b.weight'" in err and "NaN/Inf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_skip_bad_layers_keeps_them_and_reports(tmp_path, capsys):
    path, t = _with_nan(tmp_path)
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    code, _, err = run_main(
        ["-i", path, "-o", out, "--simple", "--skip-bad-layers", "--report", report, "--quiet"], capsys
    )
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert "NaN/Inf" in rep["kept"]["b.weight"]
    assert [r["layer"] for r in rep["layers"]] == ["a"]
    got = load_file(str(out))
    assert torch.equal(got["b.weight"].isnan(), t["b.weight"].isnan())


def test_zero_1d_3d_and_integer_tensors(tmp_path, capsys):
    t = {
        "zero.weight": torch.zeros(32, 64),
        "vec.weight": torch.randn(64),
        "scalar.weight": torch.tensor(1.5),  # 0-d: kept, and --verify compares it byte for byte (found by the fuzzer)
        "conv.weight": torch.randn(32, 4, 3),
        "int.weight": torch.randint(-5, 5, (32, 32), dtype=torch.int32),
        "ok.weight": torch.randn(32, 64),
    }
    path, out, report = tmp_path / "m.safetensors", tmp_path / "o.safetensors", tmp_path / "r.json"
    save_file(t, str(path))
    code, _, err = run_main(["-i", path, "-o", out, "--simple", "--verify", "--report", report, "--quiet"], capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"]
    assert {r["layer"] for r in rep["layers"]} == {"zero", "ok"}
    assert next(r for r in rep["layers"] if r["layer"] == "zero")["sqnr_db"] == "inf"
    assert "1-D" in rep["kept"]["vec.weight"] and "3-D" in rep["kept"]["conv.weight"]
    assert "0-D" in rep["kept"]["scalar.weight"], rep["kept"]["scalar.weight"]
    assert "I32" in rep["kept"]["int.weight"]
    got = load_file(str(out))
    assert torch.equal(got["zero.weight"].float(), torch.zeros(32, 64))
    for name in ("vec.weight", "conv.weight", "int.weight"):
        assert torch.equal(got[name], t[name])
    assert math.isfinite(next(r for r in rep["layers"] if r["layer"] == "ok")["sqnr_db"])


def test_help_teaches_formats_and_presets(capsys):
    code, stdout, _ = run_main(["--help"], capsys)
    assert code == 0
    for text in ("float8_e4m3fn", "int8_tensorwise", "ComfyUI-QuantOps", "--t5xxl", "--flux2", "--resume", "--dry-run"):
        assert text in stdout


def test_console_script_is_installed():
    # The script sits beside the interpreter of the environment lrq_ao is installed in; that folder need not be on
    # PATH (make test runs .venv/bin/python without activating the venv).
    beside = Path(sys.executable).parent / "lrq-convert"
    exe = str(beside) if beside.exists() else (shutil.which("lrq-convert") or "")
    assert exe, "lrq-convert console script not found: reinstall the package (pip install -e .)"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "lrq-convert" in result.stdout


def test_python_api_matches_the_cli(minilm_path, tmp_path, capsys):
    from lrq_ao.convert import convert_checkpoint

    report = convert_checkpoint(
        minilm_path, tmp_path / "api.safetensors", format="int8_tensorwise", simple=True, verify=True
    )
    assert report.verify["ok"] and len(report.layers) == 36
    code, _, err = run_main(
        ["-i", minilm_path, "-o", tmp_path / "cli.safetensors", "--int8", "--simple", "--quiet"], capsys
    )
    assert code == 0, err
    assert (tmp_path / "api.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()


def test_sharded_folder_input_converts(tmp_path, capsys):
    folder = tmp_path / "sharded"
    folder.mkdir()
    a = {"blocks.0.fc.weight": torch.randn(64, 32), "blocks.0.fc.bias": torch.randn(64)}
    b = {"blocks.1.fc.weight": torch.randn(32, 64)}
    save_file(a, str(folder / "m-00001-of-00002.safetensors"))
    save_file(b, str(folder / "m-00002-of-00002.safetensors"))
    weight_map = {
        **dict.fromkeys(a, "m-00001-of-00002.safetensors"),
        **dict.fromkeys(b, "m-00002-of-00002.safetensors"),
    }
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    report = tmp_path / "r.json"
    code, _, err = run_main(["-i", folder, "--int8", "--simple", "--verify", "--report", report, "--quiet"], capsys)
    assert code == 0, err
    out = tmp_path / "sharded_int8_tensorwise.safetensors"
    assert json.loads(report.read_text())["verify"]["ok"]
    with safe_open(str(out), "pt") as f:
        assert {"blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.0.fc.bias"} <= set(f.keys())


def test_calibration_file_switches_to_the_output_objective(tmp_path, capsys):
    import lrq_ao

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    ckpt, stats, report = tmp_path / "m.safetensors", tmp_path / "calib.safetensors", tmp_path / "r.json"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    with lrq_ao.calibrate(model) as calib, torch.no_grad():
        model(torch.randn(256, 32))
    calib.save(stats)
    argv = ["-i", ckpt, "-o", tmp_path / "o.safetensors", "--int8", "--calib", stats, "--report", report, "--quiet"]
    code, _, err = run_main([*argv, "--verify"], capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"]
    assert [r["rounding"]["objective"] for r in rep["layers"]] == ["output", "output"]
    for r in rep["layers"]:
        assert r["objective_after"] <= r["objective_before"]
