"""`hasten export medusa`: the command on a tiny model folder (what vLLM's loader reads is
checked in test_export_medusa.py; `hasten export eagle` is tested in test_export_eagle.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import hasten
from hasten.commands import main
from hasten.medusa.heads import HeadsConfig, MedusaHeads, base_identity, save_heads
from hasten.models.llama import build_llama
from tiny import hf_reference, tiny_config


@pytest.fixture(scope="module")
def identities(tiny_folder):
    """(identity of the tiny model in tiny_folder, identity of another model of its shape)."""
    model = hasten.load(str(tiny_folder))
    cfg = tiny_config()
    other = build_llama(cfg, hf_reference(cfg, 1, torch.float32).state_dict(), dtype=torch.float32)
    return base_identity(model.backbone, model.name), base_identity(other, "other")


def medusa_heads(folder, identity):
    heads = MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=97, num_heads=3, num_layers=1))
    heads.draft_vocab = torch.tensor([3, 4, 5, 6])
    save_heads(heads, folder, identity, [(0,), (0, 0)])
    return folder


def test_export_medusa(tiny_folder, identities, tmp_path, capsys):
    heads = medusa_heads(tmp_path / "heads", identities[0])
    out = tmp_path / "vllm-medusa"
    assert main(["export", "medusa", str(out), "--model", str(tiny_folder),
                 "--heads", str(heads)]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and '"method": "medusa"' in err and "top-1" in err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_heads"] == 3 and cfg["truncated_vocab_size"] == 4 and cfg["original_lm_head"]
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["token_map"].tolist() == [3, 4, 5, 6]
    assert tensors["lm_heads.0.weight"].shape == (4, 32)
    # the same folder again: refused, then replaced with --force (here in bfloat16)
    assert main(["export", "medusa", "--out", str(out), "--model", str(tiny_folder),
                 "--heads", str(heads)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "medusa", "--out", str(out), "--model", str(tiny_folder), "--heads",
                 str(heads), "--force", "--save-dtype", "bfloat16", "--no-draft-vocab"]) == 0
    tensors = load_file(str(out / "model.safetensors"))
    assert "token_map" not in tensors and tensors["lm_heads.0.weight"].dtype == torch.bfloat16


def test_export_medusa_errors(tiny_folder, identities, tmp_path, capsys):
    other = medusa_heads(tmp_path / "other", identities[1])
    base = ["--model", str(tiny_folder)]
    cases = [(["--heads", str(other)], "trained for another base model"),
             (["--heads", str(tmp_path / "nowhere")], "holds no Medusa heads"),
             ([], "no Medusa heads for")]  # the tiny model has none next to it or shipped
    for extra, message in cases:
        assert main(["export", "medusa", str(tmp_path / "out"), *base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["export", "medusa", str(tmp_path / "a"), "--out", str(tmp_path / "b"), *base]) == 2
    assert "give the output folder once" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
