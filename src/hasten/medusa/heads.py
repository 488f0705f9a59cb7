"""Medusa heads: extra decoding heads on the backbone's last hidden state, and their files.

Alignment. The hidden state `h_t` at position t (after the final norm) gives the base model's
next token x_{t+1} through the LM head. Head k (0-based) reads the same `h_t` and predicts
x_{t+2+k}: head 0 guesses the token after the root, head 1 the one after that, and so on.

Each head is `num_layers` residual blocks `h <- h + SiLU(W h + b)` followed by a vocabulary
projection. W and b start at zero, so a fresh head is the identity before the projection
and, with the base LM head as projection, starts out predicting x_{t+1} (a sensible start).
Every head and every layer has its own weights (FasterDecoding/Medusa's `[ResBlock] * n`
shares one block across layers). The K heads' blocks are stored stacked ([K, n, d, d]) so
one batched matmul runs all heads; the projection is either

- shared: the base model's LM head (default; the checkpoint then holds only the blocks, a
  few MB), applied to all K hidden vectors in ONE [K, d] x [d, V] matmul; or
- own: one [V, d] matrix per head, initialised from the LM head (the paper's choice).

On-disk format (a folder):

    medusa_config.json        {"format": "hasten-medusa", "version": 1, "num_heads",
                               "num_layers", "hidden_size", "vocab_size", "shared_lm_head",
                               "base_model": {"name", "vocab_size", "hidden_size",
                                              "lm_head_probe": [64 floats]},
                               "choices": [[0], [1], [0, 0], ...],   # ordered tree, best first
                               "expected_lengths": [...], "head_accuracy": [...], ...}
    medusa_heads.safetensors  blocks.weight [K, n, d, d], blocks.bias [K, n, d],
                              proj.weight [K, V, d] (own projection only),
                              draft_vocab [Vd] (optional reduced draft vocabulary)

`lm_head_probe` identifies the base model: fixed rows of its LM head times a fixed random
vector. It survives dtype and device changes (compared by cosine) and differs completely
between models, so heads refuse to load onto a model they were not trained for.

The published FasterDecoding layout (a folder with `config.json` holding `medusa_num_heads`
and `medusa_num_layers`, and `medusa_lm_head.pt` or `medusa_lm_head.safetensors` with keys
`{head}.{layer}.linear.weight|bias` and `{head}.{num_layers}.weight`) loads too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HastenError
from ..models.quant_kernels import linear

CONFIG_NAME = "medusa_config.json"
WEIGHTS_NAME = "medusa_heads.safetensors"
FORMAT = "hasten-medusa"
VERSION = 1
PROBE_ROWS = 64


@dataclass
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True


class MedusaHeads(nn.Module):
    """K Medusa heads. `transform` gives the pre-projection states, `logits` the predictions.

    With `shared_lm_head` the projection is the base LM head, passed to `logits` (it is not a
    parameter of this module and is never saved with it)."""

    def __init__(self, cfg: HeadsConfig, lm_head_weight: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        k, n, d, v = cfg.num_heads, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
        if k < 1 or n < 0:
            raise HastenError(f"need at least one head and zero or more layers, got {k} and {n}")
        self.weight = nn.Parameter(torch.zeros(k, n, d, d))  # nn.Linear layout: [out, in]
        self.bias = nn.Parameter(torch.zeros(k, n, d))
        self.proj = None
        if not cfg.shared_lm_head:
            if lm_head_weight is not None:
                if tuple(lm_head_weight.shape) != (v, d):
                    raise HastenError(f"LM head is {tuple(lm_head_weight.shape)}, heads expect {(v, d)}")
                init = lm_head_weight.detach().float()[None].expand(k, v, d).clone()
            else:
                init = torch.randn(k, v, d) / math.sqrt(d)
            self.proj = nn.Parameter(init)
        self.register_buffer("draft_vocab", None)

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def transform(self, hidden: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """[..., d] -> [K', ..., d]: the residual blocks of the first `num_heads` heads."""
        k = num_heads or self.config.num_heads
        d = hidden.shape[-1]
        lead = hidden.shape[:-1]
        x = hidden.reshape(1, -1, d).expand(k, -1, d)
        for j in range(self.config.num_layers):
            w = self.weight[:k, j].transpose(1, 2)  # [K, d_in, d_out]
            x = x + F.silu(torch.baddbmm(self.bias[:k, j, None, :], x, w))
        return x.reshape(k, *lead, d)

    def projection(self, lm_head_weight: torch.Tensor | None = None) -> torch.Tensor:
        """[V, d] (shared) or [K, V, d] (own) projection matrix."""
        if self.proj is not None:
            return self.proj
        if lm_head_weight is None:
            raise HastenError("these heads share the base LM head: pass its weight")
        return lm_head_weight

    def logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor | None = None,
               num_heads: int | None = None) -> torch.Tensor:
        """[..., d] -> [K', ..., V] logits (full vocabulary)."""
        return project(self.transform(hidden, num_heads), self.projection(lm_head_weight))


def project(states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[K, ..., d] states times a shared [V, d] or per-head [K, V, d] matrix -> [K, ..., V].

    Shared: all K heads in one [K*N, d] x [d, V] matmul."""
    k, d = states.shape[0], states.shape[-1]
    flat = states.reshape(k, -1, d)
    if weight.dim() == 2:
        out = linear(flat.reshape(-1, d), weight).reshape(k, -1, weight.shape[0])
    else:
        out = torch.bmm(flat, weight[:k].transpose(1, 2))
    return out.reshape(*states.shape[:-1], out.shape[-1])


# ---- base model identity ---------------------------------------------------------------------

def lm_head_weight(backbone) -> torch.Tensor:
    """The [V, d] LM head of a backbone (our lean runtime, the transformers adapter, or a
    bare `transformers` model)."""
    head = getattr(backbone, "lm_head", None)
    if isinstance(head, nn.Module) and hasattr(head, "weight"):
        return head.weight
    model = getattr(backbone, "model", backbone)
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return model.get_output_embeddings().weight
    raise HastenError(f"cannot find the LM head of {type(backbone).__name__}")


def lm_head_probe(weight: torch.Tensor) -> list[float]:
    """Fixed rows of the LM head times a fixed random vector: a dtype-robust fingerprint."""
    v, d = weight.shape
    rows = torch.linspace(0, v - 1, PROBE_ROWS).round().long().to(weight.device)
    vec = torch.randn(d, generator=torch.Generator().manual_seed(20240119), dtype=torch.float64)
    w = weight.detach()[rows].to("cpu", torch.float64)
    return [round(x, 6) for x in (w @ vec / math.sqrt(d)).tolist()]


def base_identity(backbone, name: str | None = None) -> dict:
    w = lm_head_weight(backbone)
    return {"name": name, "vocab_size": int(w.shape[0]), "hidden_size": int(w.shape[1]),
            "lm_head_probe": lm_head_probe(w)}


def identity_matches(saved: dict, current: dict) -> tuple[bool, str]:
    """(same model?, why not). Sizes must be equal; probes must agree to cosine > 0.98 and
    norms within 10% (dtype casts and quantisation noise pass, other models do not)."""
    for key in ("vocab_size", "hidden_size"):
        if saved.get(key) is not None and saved[key] != current[key]:
            return False, f"{key} {saved[key]} != {current[key]}"
    a, b = saved.get("lm_head_probe"), current.get("lm_head_probe")
    if not a or not b:
        return True, ""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return bool(torch.equal(a, b)), "LM head probe differs"
    cos = float(a @ b / (na * nb))
    ratio = float(na / nb)
    if cos < 0.98 or not 0.9 < ratio < 1.1:
        return False, f"LM head fingerprint differs (cosine {cos:.3f}, norm ratio {ratio:.3f})"
    return True, ""


# ---- saving and loading ----------------------------------------------------------------------

@dataclass
class LoadedHeads:
    heads: MedusaHeads
    choices: list[tuple[int, ...]] | None
    meta: dict = field(default_factory=dict)  # the whole config JSON (or the published one)
    path: Path | None = None


def save_heads(heads: MedusaHeads, folder: str | Path, base: dict,
               choices: list | None = None, dtype: torch.dtype | None = None, **extra) -> Path:
    """Write `folder/medusa_config.json` + `folder/medusa_heads.safetensors` (atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"blocks.weight": heads.weight, "blocks.bias": heads.bias}
    if heads.proj is not None:
        tensors["proj.weight"] = heads.proj
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in tensors.items()}
    if heads.draft_vocab is not None:
        tensors["draft_vocab"] = heads.draft_vocab.detach().cpu().long().contiguous()
    meta = {"format": FORMAT, "version": VERSION, **asdict(heads.config), "base_model": base,
            "dtype": str(tensors["blocks.weight"].dtype).removeprefix("torch."),
            "choices": [list(c) for c in choices] if choices is not None else None, **extra}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / WEIGHTS_NAME)
    tmp = folder / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / CONFIG_NAME)
    return folder


def update_meta(folder: str | Path, **fields) -> dict:
    """Change fields of a saved config (e.g. a new tree) without touching the weights."""
    path = Path(folder) / CONFIG_NAME
    meta = json.loads(path.read_text())
    meta.update(fields)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)
    return meta


def is_heads_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():
        return True
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            return "medusa_num_heads" in json.loads(cfg.read_text())
        except ValueError:
            return False
    return False


def load_heads(folder: str | Path, backbone=None, name: str | None = None,
               check_base: bool = True) -> LoadedHeads:
    """Heads from `folder` (ours or the published layout), placed on the backbone's device and
    dtype. With a backbone, refuses heads trained for another model (HastenError)."""
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file():
        loaded = _load_ours(folder)
    elif (folder / "config.json").is_file():
        loaded = _load_published(folder)
    else:
        raise HastenError(f"{folder} holds no Medusa heads ({CONFIG_NAME}, or config.json with "
                          "medusa_num_heads + medusa_lm_head.pt/.safetensors)")
    loaded.path = folder
    if backbone is not None:
        current = base_identity(backbone, name)
        saved = loaded.meta.get("base_model") or {}
        saved = {"vocab_size": loaded.heads.config.vocab_size,
                 "hidden_size": loaded.heads.config.hidden_size, **saved}
        ok, why = identity_matches(saved, current) if check_base else (True, "")
        if not ok:
            raise HastenError(
                f"the Medusa heads in {folder} were trained for another base model "
                f"({saved.get('name') or 'unnamed'}) than {name or 'this model'}: {why}. "
                "Train heads for this model (hasten distill + hasten train medusa) or pass the "
                "model they were made for")
        loaded.heads.to(device=lm_head_weight(backbone).device, dtype=lm_head_weight(backbone).dtype)
        if loaded.heads.draft_vocab is not None:
            loaded.heads.draft_vocab = loaded.heads.draft_vocab.long()
    return loaded


def _load_ours(folder: Path) -> LoadedHeads:
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / CONFIG_NAME).read_text())
    except ValueError as exc:
        raise HastenError(f"{folder / CONFIG_NAME} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise HastenError(f"{folder / CONFIG_NAME}: unknown format {meta.get('format')!r} "
                          f"version {meta.get('version')}; upgrade hasten")
    cfg = HeadsConfig(**{k: meta[k] for k in ("hidden_size", "vocab_size", "num_heads",
                                               "num_layers", "shared_lm_head")})
    if not (folder / WEIGHTS_NAME).is_file():
        raise HastenError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    heads = MedusaHeads(cfg)
    expect = {"blocks.weight": tuple(heads.weight.shape), "blocks.bias": tuple(heads.bias.shape)}
    if heads.proj is not None:
        expect["proj.weight"] = tuple(heads.proj.shape)
    for key, shape in expect.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            got = tuple(tensors[key].shape) if key in tensors else "missing"
            raise HastenError(f"{folder / WEIGHTS_NAME}: {key} is {got}, the config says {shape}")
    with torch.no_grad():
        heads.weight.copy_(tensors["blocks.weight"].float())
        heads.bias.copy_(tensors["blocks.bias"].float())
        if heads.proj is not None:
            heads.proj.copy_(tensors["proj.weight"].float())
    if "draft_vocab" in tensors:
        heads.draft_vocab = tensors["draft_vocab"].long()
    choices = [tuple(c) for c in meta["choices"]] if meta.get("choices") else None
    return LoadedHeads(heads.eval().requires_grad_(False), choices, meta)


def _load_published(folder: Path) -> LoadedHeads:
    """FasterDecoding/Medusa's release layout (own projection per head, bias-free)."""
    meta = json.loads((folder / "config.json").read_text())
    if "medusa_num_heads" not in meta:
        raise HastenError(f"{folder / 'config.json'} has no medusa_num_heads: not Medusa heads")
    k, n = int(meta["medusa_num_heads"]), int(meta.get("medusa_num_layers", 1))
    if (folder / "medusa_lm_head.safetensors").is_file():
        from safetensors.torch import load_file
        sd = load_file(str(folder / "medusa_lm_head.safetensors"))
    elif (folder / "medusa_lm_head.pt").is_file():
        sd = torch.load(folder / "medusa_lm_head.pt", map_location="cpu", weights_only=True)
    else:
        raise HastenError(f"{folder} has a Medusa config.json but no medusa_lm_head.pt or "
                          "medusa_lm_head.safetensors")
    # Keys may carry a prefix ("medusa_head.0.0.linear.weight") depending on how they were saved.
    sd = {key.split("medusa_head.")[-1]: v for key, v in sd.items()}
    proj0 = sd.get(f"0.{n}.weight")
    if proj0 is None:
        raise HastenError(f"{folder}: no projection '0.{n}.weight' for {n} layers; keys: "
                          f"{sorted(sd)[:6]}")
    v, d = proj0.shape
    heads = MedusaHeads(HeadsConfig(hidden_size=d, vocab_size=v, num_heads=k, num_layers=n,
                                    shared_lm_head=False))
    with torch.no_grad():
        for i in range(k):
            for j in range(n):
                # `[ResBlock] * n` checkpoints may hold one block under layer 0 only: it was
                # one module used n times, so every layer gets the same weights.
                src = j if f"{i}.{j}.linear.weight" in sd else 0
                try:
                    heads.weight[i, j].copy_(sd[f"{i}.{src}.linear.weight"].float())
                    heads.bias[i, j].copy_(sd[f"{i}.{src}.linear.bias"].float())
                except KeyError as exc:
                    raise HastenError(f"{folder}: missing {exc} in the Medusa weights") from exc
            heads.proj[i].copy_(sd[f"{i}.{n}.weight"].float())
    base = {"name": meta.get("base_model_name_or_path"), "vocab_size": v, "hidden_size": d}
    choices = [tuple(c) for c in meta["medusa_choices"]] if meta.get("medusa_choices") else None
    return LoadedHeads(heads.eval().requires_grad_(False), choices, {**meta, "base_model": base})


# ---- finding trained heads for a model -------------------------------------------------------

def packaged_folders(package: str, is_folder) -> list[Path]:
    """Head folders shipped inside `package`: `<package>/default/<name>/`."""
    from importlib import resources
    root = resources.files(package) / "default"
    try:
        return sorted(Path(str(p)) for p in root.iterdir() if p.is_dir() and is_folder(Path(str(p))))
    except (FileNotFoundError, NotADirectoryError):
        return []


def find_for_model(model, explicit, subfolder: str, package: str, is_folder, load, missing: str,
                   usable=None):
    """Trained heads for a `hasten.api.Model`: `explicit` if given, else `<model folder>/
    <subfolder>/` (where training beside a model puts them), else the first packaged folder
    whose base model is this one (and, with `usable`, for which usable(loaded) holds);
    `missing` is the error when there are none."""
    name = getattr(model, "name", None)
    if explicit is not None:
        return load(explicit, model.backbone, name)
    folder = getattr(model, "folder", None)
    if folder is not None and is_folder(Path(folder) / subfolder):
        return load(Path(folder) / subfolder, model.backbone, name)
    for candidate in packaged_folders(package, is_folder):
        try:
            loaded = load(candidate, model.backbone, name)
        except HastenError:
            continue
        if usable is None or usable(loaded):
            return loaded
    raise HastenError(missing.format(name=name or "this model"))
