"""Golden bytes: the exact files the converter writes today, pinned by sha256.

Any change to the ComfyUI writer (marker JSON, key order, scale layouts, tensor order, header, fallback notes) that
moves a single byte of an existing format's output fails here. The hashes were recorded on the writer as it was
before formats became objects (``lrq_ao.convert.comfy_format``'s own tables); a deliberate change to the output must
update them in the same commit and say why.

Two levels are pinned: whole files as ``lrq-convert`` writes them (six formats, with and without
``--full-precision-mm``; the tiny Flux-like checkpoint has a 96-row layer, so the block formats also pin their
fallback), and one layer's tensors as ``layer_tensors`` returns them with the options the CLI never sets
(``orig_dtype``, ``orig_shape``, ``input_scale``), serialized with safetensors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from lrq_ao.convert import comfy_format as cf
from lrq_ao.convert.cli import main
from lrq_ao.formats import get_format

# (--format, --block-size, --full-precision-mm) -> sha256 of the output file.
CLI_GOLDEN = {
    ("float8_e4m3fn", 128, False): "be67c5119f1fc3b12cea979c73bbc3883d8f438e6ac94407200279fe01dda4fd",
    ("float8_e4m3fn", 128, True): "d4629349c4a4dfbaa6f713a676609700eb9fbd7b9839f823a7127e74bbef1135",
    ("float8_e4m3fn_rowwise", 128, False): "e4bc1ac11beaac89fe4dda29fa5201e66d9de1f1eed95f53993e6ad3c5c5ecc6",
    ("float8_e4m3fn_rowwise", 128, True): "afb10e9b5ed4f7153574ebc8ad3e61ce9a21cb990d352ac3f246e60100e8bd70",
    ("float8_e4m3fn_blockwise", 64, False): "331b1c88daafbc0e65fc9063f35a2f73a9c3e4e0a8f5868d4756b332a71f35ed",
    ("float8_e4m3fn_blockwise", 64, True): "c7a9e0b9a758c7fe4d6eed15b2c7ca797af0db117f746cc7fa987ed2a964107b",
    ("int8_tensorwise", 128, False): "3457e23a0cedc09e1531902a5efb22efaa4ad8667f4be4a2040748047aabe616",
    ("int8_tensorwise", 128, True): "e583418040bffb6d0e40f7c13cbaff03afd793f251156d497b0487ccbe131791",
    ("int8_tensorwise_tensor", 128, False): "ed55710a48a01bd57cac1aecdc78eae88c7ea35aeac1c60a580129bc3e772497",
    ("int8_tensorwise_tensor", 128, True): "d8e0f6194415c3ff5158d5bd701318bb53aa87aa55009531073b765cfb904577",
    ("int8_blockwise", 64, False): "0af954e099608b2d4e21e52af47be90b6065fea8292bdedc37188cd2959b9d16",
    ("int8_blockwise", 64, True): "fe54388eaa8acda4fe027df859701df8e9a24ae484f0833d02aafb8e7b0e8437",
}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt,block,fpmm", sorted(CLI_GOLDEN))
def test_cli_output_bytes_are_golden(fmt, block, fpmm, flux_ckpt, tmp_path, capsys):
    src = flux_ckpt
    out = tmp_path / "out.safetensors"
    argv = ["-i", src, "-o", out, "--format", fmt, "--block-size", block, "--simple", "--quiet"]
    argv += ["--full-precision-mm"] if fpmm else []
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 0, capsys.readouterr().err
    assert sha256_file(out) == CLI_GOLDEN[(fmt, block, fpmm)]


# lrq_ao format name -> sha256 of one (72, 64) layer's tensors (see ``_layer_file``) for each option set.
LAYER_OPTIONS = {
    "plain": {},
    "orig_dtype": {"orig_dtype": torch.bfloat16},
    "all": {
        "orig_dtype": torch.float16,
        "orig_shape": (72, 64),
        "full_precision_matrix_mult": True,
        "input_scale": 0.25,
    },
}
LAYER_GOLDEN = {
    ("fp8", "plain"): "1b172800ca283a30020d66621d0e396b14ab116257f10b38d2112e6b9e28e2ff",
    ("fp8", "orig_dtype"): "b30df917d2d97c1d07d54eda65599a4fdca482132311ec5759196a8756d54750",
    ("fp8", "all"): "d00e3f09b926797d4cdc2ec07805db3cca91a80633e4a89252234fdc2c78d123",
    ("fp8_row", "plain"): "4b41322fe02c28be1fa8d16bcf55aa64e5e9028c1d6c61bf0c88f929e4422285",
    ("fp8_row", "orig_dtype"): "8a4d1aeb728e615e0579d8764e59955954643a608d14548195c281b29dc2eef9",
    ("fp8_row", "all"): "ac90c75a320e35553282611f80d4710cc6516209f6f766082f87315ab13c6763",
    ("fp8_block", "plain"): "0cee9d570c3dea1b82431a36e28c406c032a3c09a8d67177f7058929f2015e76",
    ("fp8_block", "orig_dtype"): "33819ea3ea6947a94597894a7d0fb6500d9c01d8293271ceaf38ec61f95444ed",
    ("fp8_block", "all"): "e49d961a79e290902ee34050203f841d2138fc3d4e026cff276da0a39e4bc51d",
    ("int8", "plain"): "609c31b081dad3f40a55db431b378ec02e6ea001372bb169360c43182634a65d",
    ("int8", "orig_dtype"): "9e6ac7f727f5ad9932c39d06523c441e466981a9472c77dcca879533b63370c4",
    ("int8", "all"): "41af974f60228a20cddf33f0cb5dd92ea13bd2fb1a7dec0c64e9c0b2e75172ec",
    ("int8_tensor", "plain"): "eb7e3f0de07c7eec5d1d86a24e08293a1b9d20e8efe3ed70c26296473622818b",
    ("int8_tensor", "orig_dtype"): "199cbe2a5aa8307be03d38028a24ebfc924d131b530d619251df287599fb925c",
    ("int8_tensor", "all"): "9bc25aac705141895fafaeddcc95fa2ba0d508b441b1c9b49585bcefd78582ad",
    ("int8_block", "plain"): "bf50edaa13b8d81fc7f10eb53668727e6a056b438c46e3536e84d521e9ff9221",
    ("int8_block", "orig_dtype"): "c90e9effb5b6b7c91a0992420e91093e94d88a98db5a56f506f63c1676bd35e0",
    ("int8_block", "all"): "ee762fd5a2a8e7a10f2645789d446c9fdc280eeda571e26a2e843747ee12174d",
}


def _layer_file(name: str, options: dict) -> bytes:
    """One layer written through ``layer_tensors`` (block 8 so the block formats tile (72, 64)), as safetensors
    bytes with the ``_quantization_metadata`` header built from its marker."""
    fmt = get_format(name, 8) if get_format(name).has_blocks else get_format(name)
    w = torch.randn(72, 64, generator=torch.Generator().manual_seed(3)) * 0.02
    qw = fmt.quantize(w)
    tensors, marker = cf.layer_tensors("blocks.0.lin", fmt, qw, **options)
    return save(tensors, metadata={cf.METADATA_KEY: cf.metadata_header({"blocks.0.lin": marker})})


@pytest.mark.parametrize("name,option", sorted(LAYER_GOLDEN))
def test_layer_tensor_bytes_are_golden(name, option):
    assert hashlib.sha256(_layer_file(name, LAYER_OPTIONS[option])).hexdigest() == LAYER_GOLDEN[(name, option)]
