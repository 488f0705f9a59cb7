"""`hasten export medusa --format vllm`: the folder vLLM's Medusa loader reads.

Checked against vLLM's own code (read, not copied):
- vllm-project/vllm `vllm/model_executor/models/medusa.py` and
  `vllm/transformers_utils/configs/medusa.py`: release v0.32.0 (commit 5df63a720, the last release
  with Medusa; v0.33.0, commit 4ba787ec9, removed it), and the same logic at commit
  09cddad8f0324594022359cd2b07e962a14b895f (medusa.py) / 0531c2226a6a25cd96ccc856f3bda3f0bb4efb5f
  (configs/medusa.py).

`vllm_reference` below re-derives what vLLM does with the folder: MedusaConfig.from_pretrained
renames every key containing "num" and "heads"/"layers"; Medusa.__init__ builds
blocks.{i}.layers.{j} (bias if medusa_fc_bias) and either one lm_head (original_lm_head,
truncated_vocab_size rows) or lm_heads.{i} (vocab_size rows); load_weights strips
"medusa_heads.", keeps token_map only when truncated_vocab_size < vocab_size, maps
lm_heads.0.weight to lm_head.weight with original_lm_head, slices LM heads longer than the
token map; compute_logits scatters the truncated logits into -inf at token_map.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hasten.errors import HastenError
from hasten.medusa.drafter import MedusaDrafter
from hasten.medusa.export import Layout, export_medusa_vllm, write_folder
from hasten.medusa.heads import HeadsConfig, LoadedHeads, MedusaHeads, load_heads

D, V = 32, 97


def random_heads(k=3, n=2, shared=True, vocab=None, seed=0) -> LoadedHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadsConfig(hidden_size=D, vocab_size=V, num_heads=k, num_layers=n,
                                    shared_lm_head=shared))
    with torch.no_grad():
        heads.weight.normal_(0, 0.3 / D ** 0.5)
        heads.bias.normal_(0, 0.3)
        if heads.proj is not None:
            heads.proj.normal_(0, 1)
    if vocab is not None:
        heads.draft_vocab = torch.tensor(vocab)
    return LoadedHeads(heads.eval(), [(0,), (0, 0)], {"base_model": {"name": "tiny"}})


def medusa_config_from_pretrained(config: dict) -> dict:
    """MedusaConfig.from_pretrained + __init__ defaults, as vLLM reads config.json."""
    config = dict(config)
    for key in list(config):
        if "num" in key:
            if "heads" in key:
                config["num_heads"] = config.pop(key)
            elif "layers" in key:
                config["num_hidden_layers"] = config.pop(key)
    config.setdefault("truncated_vocab_size", config["vocab_size"])
    return config


def vllm_reference(folder, hidden: torch.Tensor) -> list[torch.Tensor]:
    """vLLM's Medusa over the exported folder: per-head logits [N, V] for hidden [N, d]."""
    cfg = medusa_config_from_pretrained(json.loads((folder / "config.json").read_text()))
    assert cfg["model_type"] == "medusa" and cfg["architectures"] == ["MedusaModel"]
    k, n, d = cfg["num_heads"], cfg["num_hidden_layers"], cfg["hidden_size"]
    vocab, truncated = cfg["vocab_size"], cfg["truncated_vocab_size"]
    bias = cfg.get("medusa_fc_bias", False)
    # The module's parameters, as Medusa.__init__ names and sizes them.
    params = {}
    for i in range(k):
        for j in range(n):
            params[f"blocks.{i}.layers.{j}.weight"] = (d, d)
            if bias:
                params[f"blocks.{i}.layers.{j}.bias"] = (d,)
    if cfg.get("original_lm_head", False):
        params["lm_head.weight"] = (truncated, d)
    else:
        params.update({f"lm_heads.{i}.weight": (vocab, d) for i in range(k)})
    # load_weights
    token_map, weights = None, {}
    for name, w in load_file(str(folder / "model.safetensors")).items():
        name = name.replace("medusa_heads.", "")
        if name == "token_map":
            if truncated < vocab:
                token_map = w
        elif name in params:
            weights[name] = w
        elif cfg.get("original_lm_head", False) and name == "lm_heads.0.weight":
            weights["lm_head.weight"] = w
        else:
            raise AssertionError(f"vLLM would silently drop {name}")
    for name, w in list(weights.items()):
        if "lm_head" in name and token_map is not None and w.shape[0] > token_map.shape[0]:
            weights[name] = w[token_map]
    assert set(weights) == set(params), "every parameter loaded, none left at its init"
    for name, shape in params.items():
        assert tuple(weights[name].shape) == shape, name
    assert truncated == vocab or token_map is not None
    # forward + compute_logits
    out = []
    for i in range(k):
        x = hidden
        for j in range(n):
            b = weights.get(f"blocks.{i}.layers.{j}.bias")
            x = x + F.silu(F.linear(x, weights[f"blocks.{i}.layers.{j}.weight"], b))
        lm = weights.get("lm_head.weight", weights.get(f"lm_heads.{i}.weight"))
        logits = (x @ lm.T)[..., :truncated]  # LogitsProcessor(vocab_size, truncated_vocab_size)
        if token_map is not None:
            full = torch.full((*logits.shape[:-1], vocab), -torch.inf)
            full[..., token_map] = logits
            logits = full
        out.append(logits)
    return out


def test_shared_heads_write_one_lm_head_and_match_ours(tmp_path):
    loaded = random_heads(k=3, n=2, shared=True)
    lm = torch.randn(V, D)
    layout = export_medusa_vllm(loaded, tmp_path / "out", lm, use_draft_vocab=False)
    names = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(names) == ({f"blocks.{i}.layers.{j}.{p}" for i in range(3) for j in range(2)
                           for p in ("weight", "bias")} | {"lm_heads.0.weight"})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: cfg[k] for k in ("num_heads", "num_hidden_layers", "hidden_size", "vocab_size",
                                "truncated_vocab_size", "medusa_fc_bias", "original_lm_head")} == {
        "num_heads": 3, "num_hidden_layers": 2, "hidden_size": D, "vocab_size": V,
        "truncated_vocab_size": V, "medusa_fc_bias": True, "original_lm_head": True}
    assert medusa_config_from_pretrained(cfg)["num_heads"] == 3  # no other key renamed onto it
    assert layout.config == cfg
    hidden = torch.randn(5, D)
    ours = loaded.heads.logits(hidden, lm)
    for i, logits in enumerate(vllm_reference(tmp_path / "out", hidden)):
        torch.testing.assert_close(logits, ours[i], rtol=1e-5, atol=1e-5)


def test_draft_vocab_becomes_vllms_token_map(tmp_path):
    vocab = [3, 90, 7, 41, 12, 60, 2, 5]
    loaded = random_heads(k=4, n=1, shared=True, vocab=vocab)
    lm = torch.randn(V, D)
    export_medusa_vllm(loaded, tmp_path / "out", lm)
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert tensors["token_map"].dtype == torch.int64 and tensors["token_map"].tolist() == vocab
    assert tensors["lm_heads.0.weight"].shape == (len(vocab), D)  # pre-sliced: small file
    assert json.loads((tmp_path / "out" / "config.json").read_text())["truncated_vocab_size"] == 8
    hidden = torch.randn(6, D)
    ref = vllm_reference(tmp_path / "out", hidden)
    drafter = MedusaDrafter(loaded.heads, loaded.choices, lm)  # our drafter uses the draft vocab
    for row in range(6):
        ours = drafter.topk(hidden[row], 4, 1)[:, 0]
        theirs = torch.stack([ref[i][row].argmax() for i in range(4)])
        assert ours.tolist() == theirs.tolist()
    outside = torch.ones(V, dtype=torch.bool)
    outside[vocab] = False
    assert torch.isinf(ref[0][:, outside]).all()  # never proposed, as in our drafter


def test_own_projection_heads_round_trip_through_the_published_loader(tmp_path):
    """ours -> vLLM layout -> (vLLM's _remap_old_checkpoint_key, inverted) FasterDecoding layout
    -> our published-layout loader: the same logits."""
    loaded = random_heads(k=2, n=3, shared=False, vocab=[1, 2, 3])
    layout = export_medusa_vllm(loaded, tmp_path / "out", None)
    assert "token_map" not in layout.tensors and any("draft vocabulary" in n for n in layout.notes)
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {n for n in tensors if n.startswith("lm_heads")} == {"lm_heads.0.weight",
                                                                "lm_heads.1.weight"}
    hidden = torch.randn(4, D)
    ours = loaded.heads.logits(hidden)
    for i, logits in enumerate(vllm_reference(tmp_path / "out", hidden)):
        torch.testing.assert_close(logits, ours[i], rtol=1e-5, atol=1e-5)
    published = tmp_path / "published"
    published.mkdir()
    old = {}
    for name, w in tensors.items():
        part = name.split(".")
        if part[0] == "blocks":
            old[f"{part[1]}.{part[3]}.linear.{part[4]}"] = w
        else:
            old[f"{part[1]}.3.weight"] = w
    save_file(old, str(published / "medusa_lm_head.safetensors"))
    (published / "config.json").write_text(json.dumps({"medusa_num_heads": 2,
                                                       "medusa_num_layers": 3}))
    back = load_heads(published)
    torch.testing.assert_close(back.heads.logits(hidden), ours, rtol=1e-6, atol=1e-6)


def test_shared_heads_need_the_base_lm_head(tmp_path):
    with pytest.raises(HastenError, match="share the base model's LM head"):
        export_medusa_vllm(random_heads(), tmp_path / "out", None)
    with pytest.raises(HastenError, match="the heads expect"):
        export_medusa_vllm(random_heads(), tmp_path / "out", torch.randn(V + 1, D))
    assert not (tmp_path / "out").exists()


def test_write_folder_is_atomic(tmp_path, monkeypatch):
    layout = Layout({"a": 1}, {"x": torch.zeros(2)}, {"extra.bin": b"123"})
    write_folder(tmp_path / "out", layout)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "extra.bin",
                                                                    "model.safetensors"]
    with pytest.raises(HastenError, match="already exists"):
        write_folder(tmp_path / "out", layout)
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path / "new", layout)
    with pytest.raises(OSError, match="disk full"):  # a failed replace keeps the old folder
        write_folder(tmp_path / "out", Layout({"a": 2}, {"x": torch.ones(2)}), force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"a": 1}
    write_folder(tmp_path / "out", Layout({"a": 3}, {"x": torch.ones(2)}), force=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"a": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
