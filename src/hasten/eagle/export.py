"""An EAGLE head -> the EAGLE-1 draft-model folders vLLM and SGLang load.

Both load a one-layer Llama checkpoint (vLLM `vllm/model_executor/models/llama_eagle.py`,
SGLang `python/sglang/srt/models/llama_eagle.py`):

    config.json        a Llama config with num_hidden_layers 1, the target's width, heads,
                       MLP and RoPE; architectures ["LlamaForCausalLM"] (vLLM wraps it in its
                       EAGLEConfig -> "EagleLlamaForCausalLM") or ["LlamaForCausalLMEagle"]
                       (SGLang picks the class by this name)
    model.safetensors  fc.weight [d, 2d] over cat(embed(token), feature),
                       layers.0.self_attn.{q,k,v,o}_proj.weight (the loaders stack q/k/v into
                       qkv_proj and gate/up into gate_up_proj), layers.0.post_attention_layernorm
                       .weight, layers.0.mlp.{gate,up,down}_proj.weight; no input_layernorm
                       (both drop it in layer 0), no embed_tokens or lm_head: both share the
                       target's when the checkpoint lacks them

Differences handled here:
- SGLang's fc has a bias (SafeAILab's checkpoints carry one); ours has none: a zero fc.bias.
  vLLM's fc has no bias and an unknown name is an error there, so it gets none.
- tie_word_embeddings is false: SGLang's draft would otherwise alias its lm_head to its
  embedding and overwrite one with the other when it installs the target's.
- The draft vocabulary: vLLM's EAGLE-1 has no reduced vocabulary (only EAGLE-3's d2t), so it
  is left out; SGLang's FR-Spec reads one from `--speculative-token-map FILE` (a torch.save'd
  list of token ids), written as hot_token_map.pt.

Features agree: both feed the target's last hidden state after the final norm (what its LM
head reads), and the draft's own output (h + residual, no norm) one level deeper, as we do.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..errors import HastenError
from ..medusa.export import Layout, write_folder
from .head import EagleConfig, LoadedEagle, checkpoint_tensors

FORMATS = ("vllm", "sglang")
ARCHITECTURES = {"vllm": "LlamaForCausalLM", "sglang": "LlamaForCausalLMEagle"}
TOKEN_MAP_FILE = "hot_token_map.pt"


def draft_config(cfg: EagleConfig, fmt: str, dtype: torch.dtype) -> dict:
    """config.json of a one-layer Llama shaped like our head (the keys their Llama layer reads)."""
    config = {
        "model_type": "llama",  # our head is a Llama layer whatever the target's family
        "architectures": [ARCHITECTURES[fmt]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.rope_scaling:
        config["rope_scaling"] = dict(cfg.rope_scaling)
    return config


def eagle_layout(loaded: LoadedEagle, fmt: str, use_draft_vocab: bool = True,
                 dtype: torch.dtype | None = None) -> Layout:
    """The `fmt` ("vllm" or "sglang") folder for a loaded head."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown EAGLE export format {fmt!r}; one of {FORMATS}")
    head = loaded.head
    if head.config.feature_layers:
        raise HastenError(
            f"{loaded.folder}: this head reads target layers {head.config.feature_layers} "
            "(hasten's multi-layer input); vLLM's and SGLang's EAGLE-1 drafts read the last "
            "hidden state only, and their EAGLE-3 layer is shaped otherwise. Export a head "
            "trained without --feature-layers")
    weights = checkpoint_tensors(head)
    vocab = weights.pop("draft_vocab", None)
    dtype = dtype or head.fc.weight.dtype
    tensors = {name: t.detach().to("cpu", dtype, copy=True).contiguous()
               for name, t in weights.items()}
    files, notes = {}, []
    if fmt == "sglang":
        tensors["fc.bias"] = torch.zeros(head.config.hidden_size, dtype=dtype)
    if vocab is not None and use_draft_vocab:
        if fmt == "sglang":
            buf = io.BytesIO()
            torch.save([int(t) for t in vocab.tolist()], buf)
            files[TOKEN_MAP_FILE] = buf.getvalue()
            notes.append(f"the draft vocabulary ({vocab.numel()} tokens) is {TOKEN_MAP_FILE}: "
                         f"pass --speculative-token-map DIR/{TOKEN_MAP_FILE} to use it")
        else:
            notes.append(f"the draft vocabulary ({vocab.numel()} tokens) is left out: vLLM's "
                         "EAGLE-1 drafts over the full vocabulary")
    config = draft_config(head.config, fmt, dtype)
    config["hasten"] = {"exported_from": "hasten-eagle",
                        "base_model": (loaded.meta.get("base_model") or {}).get("name")}
    return Layout(config, tensors, files, notes)


def export_eagle(loaded: LoadedEagle, out: str | Path, fmt: str, use_draft_vocab: bool = True,
                 dtype: torch.dtype | None = None, force: bool = False) -> Layout:
    """Write the `fmt` folder for a loaded head to `out` (atomically); returns what was written."""
    layout = eagle_layout(loaded, fmt, use_draft_vocab, dtype)
    write_folder(out, layout, force=force)
    return layout
