"""The converter rounds same-shape weights together under the svd objective: the file verifies, every layer keeps
its round-to-nearest scales and beats round-to-nearest on the exact objective, and ``--resume`` from inside a
batched window writes the same bytes as an uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrq_ao.convert import engine
from lrq_ao.convert.cli import main
from lrq_ao.convert.stream import StreamingWriter

RANK = 8
SVD = ["--int8", "--objective", "svd", "--num_iter", "20", "--min_k", str(RANK), "--max_k", str(RANK), "--quiet"]


def run_main(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return info.value.code


def write_blocks(path, *, low_rank: bool):
    """Three blocks of (attn 64×64 + bias, mlp 128×64): in file order the first window of four weights holds two
    of each shape, the second window one of each. ``low_rank``: a strong rank-8 part plus noise, a decaying
    spectrum like trained weights', so the top-8 subspace the objective uses is well defined; else plain noise,
    where the truncated SVD's random probes (which depend on the batch) change the rounding."""
    g = torch.Generator().manual_seed(0)

    def weight(n: int, k: int) -> torch.Tensor:
        w = 0.3 * torch.randn(n, k, generator=g)
        if low_rank:
            w += torch.randn(n, RANK, generator=g) @ torch.randn(RANK, k, generator=g) / RANK**0.5
        return (w * 0.05).to(torch.bfloat16)

    tensors = {}
    for i in range(3):
        tensors[f"blocks.{i}.attn.weight"] = weight(64, 64)
        tensors[f"blocks.{i}.attn.bias"] = (torch.randn(64, generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"blocks.{i}.mlp.weight"] = weight(128, 64)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def repeated_shapes(tmp_path):
    return write_blocks(tmp_path / "blocks.safetensors", low_rank=True)


def exact_svd_loss64(w: torch.Tensor, w_dq: torch.Tensor) -> float:
    """``‖U_kᵀ (W_dq − W) V_k‖`` with the exact top-k singular vectors in float64 (no random probe favours it)."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return float((u[:, :RANK].T @ (w_dq.double() - w.double()) @ vh[:RANK].T).norm())


def stored_weight(out: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    return out[f"{layer}.weight"].double() * out[f"{layer}.weight_scale"].double()  # per-row int8: scale [N, 1]


def test_same_shape_weights_are_rounded_together_and_verify(repeated_shapes, tmp_path):
    report = tmp_path / "r.json"
    batched, rtn = tmp_path / "batched.safetensors", tmp_path / "rtn.safetensors"
    assert run_main(["-i", repeated_shapes, "-o", batched, *SVD, "--verify", "--report", report]) == 0
    assert run_main(["-i", repeated_shapes, "-o", rtn, "--int8", "--simple", "--quiet"]) == 0
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"]
    layers = [f"blocks.{i}.{kind}" for i in range(3) for kind in ("attn", "mlp")]
    assert [r["layer"] for r in rep["layers"]] == layers
    assert [r["rounding"].get("batch") for r in rep["layers"]] == [2, 2, 2, 2, None, None]

    source, out, ref = load_file(repeated_shapes), load_file(batched), load_file(rtn)
    assert out.keys() == ref.keys()
    for record in rep["layers"]:
        layer = record["layer"]
        assert record["objective_after"] < record["objective_before"]
        assert torch.equal(out[f"{layer}.weight_scale"], ref[f"{layer}.weight_scale"]), "round-to-nearest scales"
        w = source[f"{layer}.weight"].float()
        assert exact_svd_loss64(w, stored_weight(out, layer)) < 0.5 * exact_svd_loss64(w, stored_weight(ref, layer))
    for name in ("blocks.0.attn.bias", "blocks.2.attn.bias"):
        assert torch.equal(out[name], source[name])


def test_one_layer_at_a_time_gives_results_of_the_same_kind(repeated_shapes, tmp_path, monkeypatch):
    batched, single = tmp_path / "batched.safetensors", tmp_path / "single.safetensors"
    assert run_main(["-i", repeated_shapes, "-o", batched, *SVD]) == 0
    monkeypatch.setattr(engine, "BATCH_WINDOW", 1)
    assert run_main(["-i", repeated_shapes, "-o", single, *SVD]) == 0
    source, a, b = load_file(repeated_shapes), load_file(batched), load_file(single)
    assert a.keys() == b.keys()
    for layer in ("blocks.0.attn", "blocks.1.mlp", "blocks.2.attn"):
        w = source[f"{layer}.weight"].float()
        loss_a, loss_b = exact_svd_loss64(w, stored_weight(a, layer)), exact_svd_loss64(w, stored_weight(b, layer))
        assert 0.9 < loss_a / loss_b < 1.1, (layer, loss_a, loss_b)
    # The last window holds one weight of each shape, so both runs round it alone, with the same random probes.
    assert torch.equal(a["blocks.2.attn.weight"], b["blocks.2.attn.weight"])


def test_resume_inside_a_batched_window_is_byte_identical(tmp_path, monkeypatch):
    source = write_blocks(tmp_path / "noise.safetensors", low_rank=False)
    reference, out = tmp_path / "reference.safetensors", tmp_path / "resumed.safetensors"
    assert run_main(["-i", source, "-o", reference, *SVD]) == 0

    real_write, calls = StreamingWriter.write, []

    def interrupt_at_fifth_write(self, name, data):  # Ctrl-C inside the batch, after its first layer
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_write(self, name, data)

    monkeypatch.setattr(StreamingWriter, "write", interrupt_at_fifth_write)
    assert run_main(["-i", source, "-o", out, *SVD]) == 130
    journal = tmp_path / "resumed.safetensors.partial.journal"
    done = [json.loads(line)["name"] for line in journal.read_text().splitlines()[1:]]
    assert "blocks.0.attn.weight" in done and "blocks.1.attn.weight" not in done  # stopped inside the batch
    monkeypatch.setattr(StreamingWriter, "write", real_write)
    assert run_main(["-i", source, "-o", out, *SVD, "--resume"]) == 0
    assert out.read_bytes() == reference.read_bytes()
