"""Migrating from convert_to_quant 1.3.4 (``ctq``): every command line of its README runs under lrq-convert with the
same meaning and writes a file both safetensors and lrq_ao's reader open, and the flags whose meaning differs say
so in one line."""

import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lrq_ao.convert.cli import main
from lrq_ao.convert.reader import read_comfy

# The seven command lines of convert_to_quant 1.3.4's README (PyPI long description), verbatim after "ctq".
CTQ_README_LINES = [
    "-i model.safetensors -o model-fp8mixed.safetensors --comfy_quant --save-quant-metadata --simple --low-memory",
    "-i model.safetensors -o model-int8mixedrow.safetensors --int8 --scaling_mode row --comfy_quant "
    "--save-quant-metadata --simple --low-memory",
    "-i model.safetensors -o model-mxfp8mixed.safetensors --mxfp8 --comfy_quant --save-quant-metadata --simple "
    "--low-memory",
    "-i model.safetensors -o model-int8-convrot.safetensors --comfy_quant --save-quant-metadata --int8 "
    "--scaling-mode row --convrot --convrot-group-size 256",
    "-i model.safetensors -o model-int8-convrot-simple.safetensors --comfy_quant --save-quant-metadata --int8 "
    "--scaling-mode row --convrot --convrot-group-size 256 --simple",
    '-i model.safetensors --exclude-layers "(double_blocks.[01]|final_layer|txt_attn.proj)" --comfy_quant',
    "-i model.safetensors --scaling-mode block --block_size 64 --comfy_quant",
]
# The ComfyUI format each line asks for (what ctq 1.3.4 writes for it).
EXPECTED = ["float8_e4m3fn", "int8_tensorwise", "mxfp8", "int8_tensorwise", "int8_tensorwise", "float8_e4m3fn"]
EXPECTED.append("float8_e4m3fn_blockwise")


def flux_like(path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(3):
        t[f"double_blocks.{i}.img_attn.qkv.weight"] = (torch.randn(256, 256, generator=g) * 0.05).bfloat16()
        t[f"double_blocks.{i}.txt_attn.proj.weight"] = (torch.randn(256, 256, generator=g) * 0.05).bfloat16()
    t["single_blocks.0.linear1.weight"] = (torch.randn(512, 256, generator=g) * 0.05).bfloat16()
    t["final_layer.linear.weight"] = (torch.randn(64, 256, generator=g) * 0.05).bfloat16()
    save_file(t, str(path))


@pytest.mark.parametrize("line", range(len(CTQ_README_LINES)))
def test_ctq_readme_command_lines_run(tmp_path, monkeypatch, capsys, line):
    flux_like(tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(shlex.split(CTQ_README_LINES[line]) + ["--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 0, err
    written = [p for p in tmp_path.iterdir() if p.name != "model.safetensors"]
    assert len(written) == 1, written
    with safe_open(str(written[0]), "pt") as f:
        assert len(f.keys()) > 0
    formats = read_comfy(written[0]).formats()
    assert formats and set(formats.values()) == {EXPECTED[line]}, formats
    if "exclude-layers" in CTQ_README_LINES[line]:
        assert not any(k.startswith(("double_blocks.0.", "double_blocks.1.", "final_layer")) for k in formats)
        assert not any("txt_attn.proj" in k for k in formats)


def test_int8_alone_says_its_granularity_differs_from_ctq(tmp_path, capsys):
    flux_like(tmp_path / "model.safetensors")
    with pytest.raises(SystemExit) as info:
        main(["-i", str(tmp_path / "model.safetensors"), "--int8", "--simple", "--dry-run"])
    err = capsys.readouterr().err
    assert info.value.code == 0
    assert "convert_to_quant 1.3.4's --int8 wrote one scale per tensor: add --scaling_mode tensor" in err
