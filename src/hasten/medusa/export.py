"""Medusa heads -> vLLM's Medusa draft-model folder (and the atomic folder writer that the
EAGLE exporter shares).

vLLM reads (`vllm/model_executor/models/medusa.py`, `transformers_utils/configs/medusa.py`;
releases 0.6.5 to 0.32.0: 0.33.0 removed Medusa, 0.6.4 had neither `medusa_fc_bias` nor
`original_lm_head`):

    config.json        model_type "medusa", hidden_size, vocab_size, num_heads,
                       num_hidden_layers (residual blocks per head), truncated_vocab_size,
                       medusa_fc_bias, original_lm_head
    model.safetensors  blocks.{i}.layers.{j}.weight [d, d] and .bias [d],
                       lm_heads.{i}.weight [V, d] (own projection per head), or with
                       original_lm_head ONE lm_heads.0.weight shared by every head,
                       token_map [Vd] int64 (only with truncated_vocab_size < vocab_size)

Our shared-LM-head heads map to `original_lm_head` (one copy of the base LM head, not K), and
our reduced draft vocabulary to vLLM's `token_map`: logits outside it are -inf, so a draft
token outside it is never proposed, as in our drafter. vLLM 0.32 sizes per-head LM heads by the
full vocabulary but slices them by `token_map`, a mismatch, so heads with their own projection
are exported with the full vocabulary and no `token_map`.

vLLM drafts the top-1 token of every head (a chain of K tokens, no tree): our tree is not used.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import HastenError
from .heads import LoadedHeads

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class Layout:
    """An exported folder before it is written: config.json, the safetensors tensors, other
    files (name -> bytes), and notes for the user (what the target cannot use)."""
    config: dict
    tensors: dict[str, torch.Tensor]
    files: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def vllm_layout(loaded: LoadedHeads, lm_head: torch.Tensor | None,
                use_draft_vocab: bool = True,
                dtype: torch.dtype | None = None) -> Layout:
    """vLLM's Medusa folder for `loaded` heads. `lm_head` is the base model's [V, d] LM head
    (needed when the heads share it)."""
    heads = loaded.heads
    cfg = heads.config
    k, n, d, v = cfg.num_heads, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    dtype = dtype or heads.weight.dtype
    tensors = {}
    for i in range(k):
        for j in range(n):
            tensors[f"blocks.{i}.layers.{j}.weight"] = heads.weight[i, j]
            tensors[f"blocks.{i}.layers.{j}.bias"] = heads.bias[i, j]
    notes = ["vLLM drafts the top-1 token of each head (a chain of "
             f"{k}: num_speculative_tokens {k}); the heads' tree is not used"]
    vocab = heads.draft_vocab if use_draft_vocab and cfg.shared_lm_head else None
    if heads.draft_vocab is not None and use_draft_vocab and not cfg.shared_lm_head:
        notes.append("the draft vocabulary is left out: vLLM's token_map does not work with a "
                     "projection per head; the heads draft over the full vocabulary")
    if cfg.shared_lm_head:
        if lm_head is None:
            raise HastenError("these Medusa heads share the base model's LM head: load the base "
                              "model (--model) to export it")
        if tuple(lm_head.shape) != (v, d):
            raise HastenError(f"the base LM head is {tuple(lm_head.shape)}, the heads expect "
                              f"{(v, d)}")
        weight = lm_head.detach()
        if vocab is not None:
            vocab = vocab.long().cpu()
            weight = weight[vocab.to(weight.device)]  # vLLM keeps these rows only, in this order
            tensors["token_map"] = vocab
        tensors["lm_heads.0.weight"] = weight
    else:
        for i in range(k):
            tensors[f"lm_heads.{i}.weight"] = heads.proj[i]
    # Copies: safetensors refuses views that share storage (our heads are one stacked tensor).
    tensors = {name: t.detach().to("cpu", t.dtype if name == "token_map" else dtype,
                                   copy=True).contiguous()
               for name, t in tensors.items()}
    meta = loaded.meta or {}
    base = meta.get("base_model") or {}
    config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": d,
        "vocab_size": v,
        "num_heads": k,
        "num_hidden_layers": n,
        "truncated_vocab_size": int(vocab.numel()) if vocab is not None else v,
        "medusa_fc_bias": True,  # our residual blocks have biases; vLLM's default is none
        "original_lm_head": cfg.shared_lm_head,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # Provenance only (vLLM ignores it). No other key may contain "num": MedusaConfig's
        # from_pretrained renames every "num...heads" / "num...layers" key to these two.
        "hasten": {"exported_from": "hasten-medusa", "base_model": base.get("name")},
    }
    return Layout(config, tensors, notes=notes)


def export_medusa_vllm(loaded: LoadedHeads, out: str | Path, lm_head: torch.Tensor | None,
                       use_draft_vocab: bool = True, dtype: torch.dtype | None = None,
                       force: bool = False) -> Layout:
    """Write vLLM's Medusa folder for `loaded` heads to `out` (atomically); returns what was
    written."""
    layout = vllm_layout(loaded, lm_head, use_draft_vocab, dtype)
    write_folder(out, layout, force=force)
    return layout


def write_folder(out: str | Path, layout: Layout, force: bool = False) -> Path:
    """config.json + model.safetensors + the layout's other files as the folder `out`: written
    in a temporary folder beside it, then renamed, so `out` is either complete or untouched.
    An existing `out` is replaced only with `force`."""
    from safetensors.torch import save_file

    out = check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder gets the usual permissions (mkdtemp's are owner-only).
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    old = None
    try:
        save_file(layout.tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, data in layout.files.items():
            (tmp / name).write_bytes(data)
        (tmp / CONFIG_FILE).write_text(json.dumps(layout.config, indent=2) + "\n")
        _readable(tmp)
        if out.exists():  # move the old folder aside first: rename cannot replace a folder
            old = out.with_name(tmp.name.removesuffix(".tmp") + ".old")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def check_out(out: str | Path, force: bool = False) -> Path:
    """`out` as a Path, if it may be written (absent, or a folder to replace with `force`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HastenError(f"{out} is a file, not a folder")
    if out.exists() and not force:
        raise HastenError(f"{out} already exists: pass --force to replace it, or choose another "
                          "output folder")
    return out


def _readable(folder: Path) -> None:
    """Give the files the folder's read/write bits (mkdir applied the umask; safetensors
    writes owner-only files): a server running as another user must read them."""
    mode = folder.stat().st_mode & 0o666
    for path in folder.iterdir():
        path.chmod(mode)
