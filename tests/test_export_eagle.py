"""`hasten export eagle`: the folders vLLM's and SGLang's EAGLE-1 loaders read, and the command.

Checked against their own code (read, not copied):
- vllm-project/vllm `vllm/model_executor/models/llama_eagle.py` (EagleLlamaForCausalLM) and
  `vllm/transformers_utils/configs/eagle.py` (EAGLEConfig: architectures -> "Eagle" + arch):
  release v0.33.0 (commit 4ba787ec9; llama_eagle.py identical in v0.32.0, commit 5df63a720), and
  the same logic at commits e1c4a55214c63e19e83f82ad6c552d82148bae0b (llama_eagle.py) and
  23c5aa92d517802488a0c77a5f58cd0a2019c5a3 (configs/eagle.py); the embedding / LM head sharing in
  `vllm/v1/spec_decode/llm_base_proposer.py` (v0.33.0: shared when the checkpoint has none).
- sgl-project/sglang `python/sglang/srt/models/llama_eagle.py` (LlamaForCausalLMEagle): release
  v0.5.23 and commit 3b64d5dee0756de843b5f022966f69c995cd15ea; the token map in
  `python/sglang/srt/speculative/spec_utils.py` load_token_map (v0.5.23: torch.load of a list
  of ids, then torch.tensor(..., int64)).

`loader_reference` re-derives what their loaders do: the weight names get a "model." prefix
(unless they hold "lm_head"), q/k/v stack into qkv_proj and gate/up into gate_up_proj, layer
0 has no input_layernorm, fc has no bias in vLLM and a bias in SGLang, embed_tokens and lm_head
are the target's. `reference_forward` is their LlamaModel.forward for one layer:
fc(cat(embed, hidden)) -> attention (RoPE, GQA, causal) + residual -> post-attention norm ->
MLP + residual.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hasten.commands import main
from hasten.eagle.export import eagle_layout, export_eagle
from hasten.eagle.head import EagleConfig, EagleHead, LoadedEagle, save_head
from test_export_cli import identities  # noqa: F401 - a fixture
from tiny import tiny_config

VOCAB = [5, 9, 2, 60, 33]


def random_head(seed=0, vocab=VOCAB) -> LoadedEagle:
    torch.manual_seed(seed)
    cfg = EagleConfig.like(tiny_config(), draft_vocab_size=len(vocab) if vocab else None)
    head = EagleHead(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    if vocab:
        head.draft_vocab = torch.tensor(vocab)
    return LoadedEagle(head.eval(), {"base_model": {"name": "tiny"}}, None)


def loader_reference(folder, fmt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, the draft module's parameters by name) as vLLM / SGLang load the folder."""
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 1
    if fmt == "vllm":  # EAGLEConfig(method="eagle") prefixes "Eagle" -> a registered class
        assert ["Eagle" + a for a in cfg["architectures"]] == ["EagleLlamaForCausalLM"]
    else:  # SGLang picks the model class by this name
        assert cfg["architectures"] == ["LlamaForCausalLMEagle"]
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    d, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layer = "model.layers.0."
    params = {"model.fc.weight": (d, 2 * d),
              layer + "self_attn.qkv_proj.weight": (q + 2 * kv, d),
              layer + "self_attn.o_proj.weight": (d, q),
              layer + "post_attention_layernorm.weight": (d,),
              layer + "mlp.gate_up_proj.weight": (2 * i, d),
              layer + "mlp.down_proj.weight": (d, i)}
    if fmt == "sglang":
        params["model.fc.bias"] = (d,)  # torch.nn.Linear(2d, d): bias on
    stacked = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"),
               (".qkv_proj", ".v_proj", "v"), (".gate_up_proj", ".gate_proj", 0),
               (".gate_up_proj", ".up_proj", 1)]
    shards: dict[str, dict] = {}
    for name, w in load_file(str(folder / "model.safetensors")).items():
        assert "lm_head" not in name and "embed_tokens" not in name  # the target's are shared
        name = "model." + name
        for param, shard, shard_id in stacked:
            if shard in name:
                shards.setdefault(name.replace(shard, param), {})[shard_id] = w
                break
        else:
            assert name in params, f"no parameter {name} in the draft model"
            shards[name] = {None: w}
    loaded = {}
    for name, parts in shards.items():
        if None in parts:
            loaded[name] = parts[None]
        elif "qkv_proj" in name:
            loaded[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:
            loaded[name] = torch.cat([parts[0], parts[1]])
    assert set(loaded) == set(params), "every parameter loaded, none left at its init"
    for name, shape in params.items():
        assert tuple(loaded[name].shape) == shape, name
    return cfg, loaded


def reference_forward(cfg: dict, p: dict, embeds: torch.Tensor,
                      hidden: torch.Tensor) -> torch.Tensor:
    """[T, d] pairs (embed(x_{i+1}), f_i) at positions 0..T-1 -> the draft's output [T, d]."""
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["head_dim"]
    x = F.linear(torch.cat([embeds, hidden], dim=-1), p["model.fc.weight"], p.get("model.fc.bias"))
    residual = x  # input_layernorm is the identity in layer 0
    qkv = F.linear(x, p["model.layers.0.self_attn.qkv_proj.weight"])
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    t = x.shape[0]
    q, k, v = (z.view(t, -1, hd).transpose(0, 1) for z in (q, k, v))
    inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().float(), angles.sin().float()

    def rope(z):  # neox style: rotate the two halves
        a, b = z[..., :hd // 2], z[..., hd // 2:]
        return z * cos + torch.cat([-b, a], -1) * sin

    q, k = rope(q), rope(k)
    k, v = (z.repeat_interleave(heads // kv_heads, dim=0) for z in (k, v))
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(t, -1)
    h = residual + F.linear(attn, p["model.layers.0.self_attn.o_proj.weight"])
    w = p["model.layers.0.post_attention_layernorm.weight"]
    m = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]) * w
    gate, up = F.linear(m, p["model.layers.0.mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, p["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_names_shapes_config_and_outputs_match_the_loader(tmp_path, fmt):
    loaded = random_head()
    layout = export_eagle(loaded, tmp_path / fmt, fmt)
    cfg, params = loader_reference(tmp_path / fmt, fmt)
    c = loaded.head.config
    assert {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                "num_attention_heads", "num_key_value_heads", "head_dim",
                                "rope_theta", "rms_norm_eps", "max_position_embeddings")} == {
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "max_position_embeddings": c.max_position_embeddings}
    if fmt == "sglang":
        assert torch.equal(params["model.fc.bias"], torch.zeros(c.hidden_size))
    torch.manual_seed(1)
    embed = torch.randn(c.vocab_size, c.hidden_size)  # the target's embedding (shared)
    ids, feats = torch.randint(0, c.vocab_size, (7,)), torch.randn(7, c.hidden_size)
    with torch.no_grad():
        ours = loaded.head(embed[ids][None], feats[None])[0][0]
    theirs = reference_forward(cfg, params, embed[ids], feats)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert layout.config == cfg


def test_draft_vocab_is_sglangs_token_map_and_left_out_for_vllm(tmp_path):
    loaded = random_head()
    sglang = export_eagle(loaded, tmp_path / "s", "sglang")
    raw = torch.load(io.BytesIO((tmp_path / "s" / "hot_token_map.pt").read_bytes()),
                     weights_only=True)
    hot = torch.tensor(raw, dtype=torch.int64)  # what load_token_map returns
    assert hot.tolist() == VOCAB
    assert any("--speculative-token-map" in n for n in sglang.notes)
    vllm = export_eagle(loaded, tmp_path / "v", "vllm")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    assert any("left out" in n for n in vllm.notes)
    assert "draft_vocab" not in load_file(str(tmp_path / "v" / "model.safetensors"))
    assert "hot_token_map.pt" not in eagle_layout(loaded, "sglang", use_draft_vocab=False).files
    assert eagle_layout(random_head(vocab=None), "sglang").files == {}


def test_save_dtype_and_unknown_format(tmp_path):
    layout = eagle_layout(random_head(), "vllm", dtype=torch.bfloat16)
    assert {t.dtype for t in layout.tensors.values()} == {torch.bfloat16}
    assert layout.config["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="unknown EAGLE export format"):
        eagle_layout(random_head(), "tgi")


# ---- the command -----------------------------------------------------------------------------

def eagle_head(folder, identity):
    torch.manual_seed(0)
    head = EagleHead(EagleConfig.like(tiny_config(), draft_vocab_size=4))
    head.draft_vocab = torch.tensor([3, 4, 5, 6])
    save_head(head, folder, identity)
    return folder


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
def test_export_eagle(tiny_folder, identities, tmp_path, capsys, fmt):
    head = eagle_head(tmp_path / "head", identities[0])
    out = tmp_path / fmt
    assert main(["export", "eagle", str(out), "--format", fmt, "--model", str(tiny_folder),
                 "--heads", str(head)]) == 0
    err = capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    if fmt == "sglang":
        assert names == ["config.json", "hot_token_map.pt", "model.safetensors"]
        assert "--speculative-algorithm EAGLE" in err and "--speculative-token-map" in err
    else:
        assert names == ["config.json", "model.safetensors"]
        assert '"method": "eagle"' in err
    assert "fc.weight" in load_file(str(out / "model.safetensors"))


def test_export_eagle_errors(tiny_folder, identities, tmp_path, capsys):
    other = eagle_head(tmp_path / "other", identities[1])
    base = ["export", "eagle", str(tmp_path / "out"), "--format", "vllm",
            "--model", str(tiny_folder)]
    assert main([*base, "--heads", str(other)]) == 2
    assert "was trained for other" in capsys.readouterr().err
    assert main([*base, "--heads", str(tmp_path / "nowhere")]) == 2
    assert "no EAGLE head at" in capsys.readouterr().err
    assert main(base) == 2  # none next to the tiny model, none shipped for it
    assert "no EAGLE head for" in capsys.readouterr().err
    assert main([*base, "--heads", str(other), "--save-dtype", "int3"]) == 2
    assert "unknown dtype 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
