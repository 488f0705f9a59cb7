"""A fine-tune as a 1-bit delta from its base: compress, save, load, check, apply.

For every block linear weight (q, k, v, o, gate, up, down of every layer) the fine-tune's
difference from the base, delta = W_ft - W_base, becomes its sign bits (`pack.py` documents
the layout) and one scale per matrix, alpha = mean |delta|, so W_ft ~ W_base + alpha * sign.
Every other tensor (embeddings, norms, LM head, biases) is stored only where it differs from
the base: not at all when equal, as the changed rows (+ their indices) when fewer than half
of a matrix's rows changed, else in full.

On disk a delta is a folder:
  delta.safetensors   sign.<hf name> uint8 [out, ceil(in/8)]; scales / initial_scales float32
                      [n] in `linear` order (initial = mean |delta|, scales = after
                      distillation, equal before it); full.<hf name> (+ rows.<hf name> int64)
  bitdelta.json       format, version, the base's fingerprint (sampled weights), its tokenizer
                      fingerprint and architecture, the fine-tune's fingerprint, `linear`
                      (the names, in order), sizes, and the distillation report

Applying: `merged_state_dict` (W_base + alpha * sign, as Hugging Face weights, for a model of
its own) or `delta_backbone` (the base's weights shared, `DeltaDense` layers adding
alpha * (x @ S.T) from the packed bits; several tenants in one model).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import HastenError
from ..models.config import LlamaConfig
from ..models.compact import KernelDense
from ..models.llama import LlamaModel
from ..models.sources import load_tokenizer, load_weights, resolve_model
from .pack import pack_signs, unpack_signs
from .runtime import FUSED, DeltaDense, block_linear_names

FORMAT, VERSION = "hasten-bitdelta", 1
WEIGHTS_FILE, META_FILE = "delta.safetensors", "bitdelta.json"
# Fields of LlamaConfig that must agree between base and fine-tune.
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
               "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias",
               "rms_norm_eps", "rope_theta", "rope_scaling")


class DeltaError(HastenError):
    """A delta that does not fit (another architecture, shape, tokenizer or base)."""


@dataclass
class Delta:
    meta: dict
    signs: dict[str, torch.Tensor]          # hf name -> packed sign bits
    scales: dict[str, float]                # hf name -> alpha (distilled, if it was)
    initial_scales: dict[str, float]        # hf name -> mean |delta|
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # other changed tensors
    rows: dict[str, torch.Tensor] = field(default_factory=dict)     # their changed rows, if partial

    def nbytes(self) -> int:
        tensors = list(self.signs.values()) + list(self.tensors.values()) + list(self.rows.values())
        return sum(t.numel() * t.element_size() for t in tensors) + 8 * len(self.scales)


# ---- fingerprints and checks ------------------------------------------------------------------

def weights_fingerprint(sd: dict[str, torch.Tensor], samples: int = 256) -> str:
    """A hash of the names, shapes and ~`samples` evenly spaced values of every tensor (read
    as float32: the same weights give the same fingerprint whatever dtype they are stored in
    only when that dtype is the same; a fine-tune of the same shape almost surely differs)."""
    h = hashlib.sha256(b"hasten-weights-v1")
    for name in sorted(sd):
        t = sd[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        k = min(samples, flat.numel())
        index = torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)  # integers: exact
        h.update(flat[index].float().numpy().tobytes())
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:32]


def architecture(config: dict) -> dict:
    try:
        cfg = LlamaConfig.from_hf_dict(config)
    except HastenError as exc:
        raise DeltaError(f"BitDelta works on Llama-family models here: {exc}") from exc
    return {f: getattr(cfg, f) for f in ARCH_FIELDS}


def check_compatible(base_arch: dict, ft_arch: dict, base_sd: dict, ft_sd: dict,
                     base_tok: str | None, ft_tok: str | None) -> None:
    differ = [f"{f}: base {base_arch[f]!r}, fine-tune {ft_arch[f]!r}"
              for f in ARCH_FIELDS if base_arch[f] != ft_arch[f]]
    if differ:
        raise DeltaError("the fine-tune has another architecture than the base ("
                         + "; ".join(differ) + "); compress a fine-tune of this very base")
    missing, extra = sorted(set(base_sd) - set(ft_sd)), sorted(set(ft_sd) - set(base_sd))
    if missing or extra:
        raise DeltaError(f"the fine-tune's tensors differ from the base's (missing {missing[:3]}, "
                         f"extra {extra[:3]}); is it a fine-tune of this base?")
    shapes = [f"{n}: {tuple(base_sd[n].shape)} vs {tuple(ft_sd[n].shape)}" for n in sorted(base_sd)
              if base_sd[n].shape != ft_sd[n].shape]
    if shapes:
        raise DeltaError(f"tensor shapes differ from the base ({'; '.join(shapes[:3])}); "
                         "compress a fine-tune of this very base")
    if base_tok and ft_tok and base_tok != ft_tok:
        raise DeltaError("the fine-tune's tokenizer differs from the base's (another vocabulary "
                         "or special tokens); a delta only makes sense on the same tokenizer")


def check_base(delta: Delta, base_sd: dict[str, torch.Tensor], where: str = "the base") -> None:
    """Raise unless `base_sd` is the base the delta was made from."""
    want, got = delta.meta["base"]["fingerprint"], weights_fingerprint(base_sd)
    if want != got:
        raise DeltaError(f"this delta was made from another base model (fingerprint {want}, "
                         f"{where} has {got}); load it on the model it was compressed from "
                         f"({delta.meta['base'].get('name', '?')})")


# ---- compress ---------------------------------------------------------------------------------

def compress(base_sd: dict, base_config: dict, ft_sd: dict, ft_config: dict, base_tokenizer=None,
             ft_tokenizer=None, base_name: str = "", ft_name: str = "") -> Delta:
    """Signs + per-matrix scales of the block linear deltas; the other tensors where changed."""
    base_arch, ft_arch = architecture(base_config), architecture(ft_config)
    base_tok = tokenizer_fingerprint(base_tokenizer) if base_tokenizer is not None else None
    ft_tok = tokenizer_fingerprint(ft_tokenizer) if ft_tokenizer is not None else None
    check_compatible(base_arch, ft_arch, base_sd, ft_sd, base_tok, ft_tok)
    linear = block_linear_names(base_arch["num_layers"])
    signs, scales = {}, {}
    for name in linear:
        d = ft_sd[name].float() - base_sd[name].float()
        signs[name] = pack_signs(d)
        scales[name] = float(d.abs().mean())
    tensors, rows = {}, {}
    for name in sorted(set(base_sd) - set(linear)):
        b, f = base_sd[name], ft_sd[name]
        if torch.equal(b, f):
            continue
        changed = (b != f).reshape(b.shape[0], -1).any(1) if b.dim() == 2 else None
        if changed is not None and int(changed.sum()) * 2 < b.shape[0]:
            rows[name] = changed.nonzero().squeeze(1)
            tensors[name] = f[rows[name]].clone()
        else:
            tensors[name] = f.clone()
    full_bytes = sum(t.numel() * t.element_size() for t in ft_sd.values())
    meta = {"format": FORMAT, "version": VERSION,
            "base": {"name": base_name, "fingerprint": weights_fingerprint(base_sd),
                     "tokenizer": base_tok, "architecture": base_arch},
            "finetune": {"name": ft_name, "fingerprint": weights_fingerprint(ft_sd),
                         "dtype": str(next(iter(ft_sd.values())).dtype).removeprefix("torch.")},
            "linear": linear, "layout": "sign bit 1 = positive; rows of the [out, in] weight "
            "packed along in, 8 per byte, element 8g+j = bit j of byte g",
            "full_copy_bytes": full_bytes, "distill": None}
    return Delta(meta, signs, scales, dict(scales), tensors, rows)


def compress_folders(base: str | Path | None, finetune: str | Path) -> Delta:
    """Compress model `finetune` against `base` (model specs: a folder, a .gguf, None = the
    default model)."""
    base, finetune = model_folder(base), model_folder(finetune)
    configs = []
    for folder in (base, finetune):
        if not (folder / "config.json").is_file():
            raise DeltaError(f"{folder} is not a model folder (no config.json); give a Hugging "
                             "Face folder (config.json + *.safetensors + tokenizer)")
        configs.append(json.loads((folder / "config.json").read_text()))
    return compress(load_weights(base), configs[0], load_weights(finetune), configs[1],
                    _tokenizer_or_none(base), _tokenizer_or_none(finetune),
                    base.resolve().name, finetune.resolve().name)


def model_folder(spec: str | Path | None) -> Path:
    """The Hugging Face folder for a model spec (`hasten.models.sources.resolve_model`)."""
    return resolve_model(None if spec is None else str(spec)).folder


def _tokenizer_or_none(folder: Path):
    try:
        return load_tokenizer(folder)
    except HastenError:
        return None


# ---- save and load ----------------------------------------------------------------------------

def save(delta: Delta, path: str | Path) -> Path:
    """Write the delta folder (both files via temporary names + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    linear = delta.meta["linear"]
    tensors = {f"sign.{n}": delta.signs[n].contiguous() for n in linear}
    tensors["scales"] = torch.tensor([delta.scales[n] for n in linear], dtype=torch.float32)
    tensors["initial_scales"] = torch.tensor([delta.initial_scales[n] for n in linear],
                                             dtype=torch.float32)
    tensors.update({f"full.{n}": t.contiguous() for n, t in delta.tensors.items()})
    tensors.update({f"rows.{n}": t.contiguous() for n, t in delta.rows.items()})
    tmp = path / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, tmp, metadata={"format": FORMAT})
    os.replace(tmp, path / WEIGHTS_FILE)
    delta.meta["delta_bytes"] = (path / WEIGHTS_FILE).stat().st_size
    tmp = path / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(delta.meta, indent=1) + "\n")
    os.replace(tmp, path / META_FILE)
    return path


def load(path: str | Path) -> Delta:
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise DeltaError(f"{path} is not a BitDelta folder (needs {META_FILE} and {WEIGHTS_FILE}); "
                         "make one with `hasten bitdelta compress`")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DeltaError(f"{path / META_FILE}: not a {FORMAT} v{VERSION} delta")
    sd = load_file(path / WEIGHTS_FILE)
    linear = meta["linear"]
    signs = {n: sd[f"sign.{n}"] for n in linear}
    scales = dict(zip(linear, sd["scales"].tolist()))
    initial = dict(zip(linear, sd["initial_scales"].tolist()))
    tensors = {k.removeprefix("full."): v for k, v in sd.items() if k.startswith("full.")}
    rows = {k.removeprefix("rows."): v for k, v in sd.items() if k.startswith("rows.")}
    return Delta(meta, signs, scales, initial, tensors, rows)


# ---- apply ------------------------------------------------------------------------------------

def changed_tensor(delta: Delta, name: str, base: torch.Tensor) -> torch.Tensor:
    """The fine-tune's version of a non-linear tensor (rows put back into the base's)."""
    if name not in delta.rows:
        return delta.tensors[name].to(base.dtype)
    out = base.clone()
    out[delta.rows[name]] = delta.tensors[name].to(base.dtype)
    return out


def merged_state_dict(base_sd: dict, delta: Delta, initial: bool = False,
                      dtype: torch.dtype = torch.float32) -> dict:
    """Hugging Face weights W_base + alpha * sign (alpha: initial or distilled), the other
    tensors as the fine-tune has them. Computed in the wider of the weights' dtype, `dtype`
    and float32, and returned in that. The base dict is left untouched."""
    scales = delta.initial_scales if initial else delta.scales
    out = dict(base_sd)
    for name in delta.meta["linear"]:
        w = base_sd[name]
        wide = torch.promote_types(torch.promote_types(w.dtype, dtype), torch.float32)
        signs = unpack_signs(delta.signs[name], w.shape[1], wide)
        out[name] = w.to(wide) + scales[name] * signs
    for name in delta.tensors:
        out[name] = changed_tensor(delta, name, base_sd[name])
    return out


def tenant_layers(delta: Delta, layer: int, dtype, device=None, initial: bool = False) -> dict:
    """Per fused runtime layer of block `layer`: (packed signs, scale per output row)."""
    scales = delta.initial_scales if initial else delta.scales
    out = {}
    for fused, parts in FUSED.items():
        names = [f"model.layers.{layer}.{p}.weight" for p in parts]
        packed = torch.cat([delta.signs[n] for n in names])
        scale = torch.cat([torch.full((delta.signs[n].shape[0],), scales[n]) for n in names])
        out[fused] = (packed.to(device), scale.to(device, dtype))
    return out


def delta_backbone(base: LlamaModel, deltas: list[Delta], initial: bool = False) -> LlamaModel:
    """A model that shares every weight of `base` and adds the deltas' packed sign matmuls.

    One delta: it may also change norms/embeddings/LM head (given their own tensors here).
    Several: tenant k is `deltas[k]`, picked per batch row with `runtime.set_route`; they
    must change block linear weights only (norms per batch row are not implemented). The
    caller has checked the fingerprints (`check_base`). The new model has its own KV cache."""
    if not deltas:
        raise ValueError("delta_backbone needs at least one delta")
    if len(deltas) > 1 and any(d.tensors for d in deltas):
        names = [d.meta["finetune"]["name"] for d in deltas if d.tensors]
        raise DeltaError(f"tenants {names} also change norms or embeddings, which batched "
                         "tenants cannot share; serve them merged (one model each)")
    model = sharing_copy(base)
    if deltas[0].tensors:
        _own_tensors(model, base, deltas[0])
    for i, block in enumerate(model.blocks):
        per_tenant = [tenant_layers(d, i, base.dtype, base.device, initial) for d in deltas]
        for fused in FUSED:
            setattr(block, fused, DeltaDense(getattr(block, fused), [t[fused] for t in per_tenant]))
    return model


def sharing_copy(base: LlamaModel) -> LlamaModel:
    """A model of new modules over `base`'s own weight tensors, whatever layer classes the base
    runs (dense, compiled-kernel or compact layers, as `load` built them), with its attention
    settings and a KV cache of its own."""
    cache = base._k, base._v
    base._k = base._v = None  # not copied: the new model allocates its own at reset
    try:
        shared = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
        model = copy.deepcopy(base, shared)
    finally:
        base._k, base._v = cache
    model.capacity = model.length = model._pending = 0
    return model.eval().requires_grad_(False)


def _own_tensors(model: LlamaModel, base: LlamaModel, delta: Delta) -> None:
    """Give `model` the fine-tune's norms / embedding / LM head where the delta changes them."""
    cfg = model.config
    targets = {"model.norm.weight": [(model.norm, "weight", False)]}
    embed_targets = [(model.embed, "weight", False)]
    # The LM head as its class stores it: [in, out] (Dense) or [out, in] (KernelDense).
    head = (model.lm_head, "w", False) if isinstance(model.lm_head, KernelDense) else \
        (model.lm_head, "weight_t", True)
    if cfg.tie_word_embeddings:
        embed_targets.append(head)
    targets["model.embed_tokens.weight"] = embed_targets
    targets["lm_head.weight"] = [head]
    for i, block in enumerate(model.blocks):
        targets[f"model.layers.{i}.input_layernorm.weight"] = [(block.attn_norm, "weight", False)]
        targets[f"model.layers.{i}.post_attention_layernorm.weight"] = [(block.mlp_norm, "weight", False)]
    for name in delta.tensors:
        if name not in targets:
            raise DeltaError(f"the delta changes {name}, which the delta-aware runtime cannot "
                             "apply without merging; use the merged weights instead")
        for module, attr, transpose in targets[name]:
            current = getattr(module, attr)
            base_layout = current.t() if transpose else current
            value = changed_tensor(delta, name, base_layout.detach())
            setattr(module, attr, nn.Parameter(value.t().contiguous() if transpose else value,
                                               requires_grad=False))
