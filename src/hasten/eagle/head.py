"""The EAGLE draft head: one decoder layer that autoregresses on the target's features.

Alignment. `f_i` is the target's last hidden state (after the final norm) at position i: the
LM head turns it into the target's distribution of token x_{i+1}. The head's input at
position i is the pair (f_i, x_{i+1}):

    g_i = Layer(fc([embed(x_{i+1}); f_i]))      (attends to the pairs at positions <= i)
    g_i ~ f_{i+1}     -> LM head -> the target's distribution of x_{i+2}

While drafting, a drafted token's pair uses the head's own g of its parent in place of the
target's feature, so one head forward per tree level goes one token deeper (EAGLE-1/2).

Several layers (EAGLE-3's idea, `feature_layers`): for committed positions the head reads the
residual stream after a low, a middle and a high layer of the target in place of f_i, each
RMS-normalised (their scales differ ~10x) and reduced to d by `reduce` [d, k d]; drafted pairs
still carry the head's own g (a d-wide feature: `fuse` tells them apart by width). With the
target's last layer as the high one, `reduce` can start as "the last layer, normed as the
target's final norm does", so the head starts as the EAGLE-1 head it is initialised from.
Trained on the same data and steps, layers 2 / 15 / 27 of the default model gave held-out
agreement 0.285 / 0.207 at depths 1 / 2 against 0.211 / 0.137 for f_i (README, session 13).

The layer is shaped like one of the target's (same width, heads, MLP, RoPE) with the input
norm removed (the fc output feeds attention directly, as in SafeAILab/EAGLE's first layer).
The embedding and the LM head are the target's, never stored. Weights use the EAGLE
checkpoint names (`fc.weight`, `layers.0.self_attn.q_proj.weight`, ...), so the exporters in
`export.py` mostly write a config.

On-disk format (a folder):

    eagle_config.json        {"format": "hasten-eagle", "version": 1, the layer's shape,
                              "base_model": {name, vocab_size, hidden_size, lm_head_probe},
                              "draft_vocab_size", "training": {...}, "heldout": {...}}
    eagle_head.safetensors   fc.weight [d, 2d], layers.0.self_attn.{q,k,v,o}_proj.weight,
                             reduce.weight [d, k d] (with k feature_layers only),
                             layers.0.post_attention_layernorm.weight,
                             layers.0.mlp.{gate,up,down}_proj.weight,
                             draft_vocab [Vd] int64 (the tokens drafts are drawn from)
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
from ..medusa.heads import base_identity, identity_matches
from ..models.backbone import layer_count
from ..models.config import LlamaConfig
from ..models.llama import RMSNorm, rope_inv_freq, rotate_half

CONFIG_NAME = "eagle_config.json"
WEIGHTS_NAME = "eagle_head.safetensors"
FORMAT = "hasten-eagle"
VERSION = 1


@dataclass
class EagleConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    draft_vocab_size: int | None = None
    # Target layers whose outputs the head reads for committed positions (None: the last
    # hidden state after the final norm, EAGLE-1).
    feature_layers: list[int] | None = None
    extra: dict = field(default_factory=dict)  # training record, held-out figures

    @classmethod
    def like(cls, cfg: LlamaConfig, draft_vocab_size: int | None = None,
             feature_layers: list[int] | None = None) -> "EagleConfig":
        """A head shaped like one layer of the target `cfg`."""
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.vocab_size, cfg.rms_norm_eps, cfg.rope_theta,
                   cfg.rope_scaling, cfg.max_position_embeddings, draft_vocab_size,
                   list(feature_layers) if feature_layers else None)

    def rope_config(self) -> LlamaConfig:
        """The fields `rope_inv_freq` reads, as a LlamaConfig."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=1,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           head_dim=self.head_dim, rope_theta=self.rope_theta,
                           rope_scaling=self.rope_scaling,
                           max_position_embeddings=self.max_position_embeddings)


class EagleHead(nn.Module):
    """fc + one decoder layer. `forward` runs training (causal, whole sequences, optionally
    unrolled on its own outputs); `step` runs drafting against an `EagleCache`."""

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.config = cfg
        d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.q_proj = nn.Linear(d, q, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(q, d, bias=False)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)
        taps = len(cfg.feature_layers or ())
        if taps == 1:  # `fuse` tells the target's features from the head's own by their width
            raise ValueError("feature_layers needs two or more layers (one: leave it unset and "
                             "the head reads the last hidden state)")
        self.reduce = nn.Linear(taps * d, d, bias=False) if taps else None
        self.register_buffer("draft_vocab", torch.empty(0, dtype=torch.long), persistent=False)
        inv_freq, divisor = rope_inv_freq(cfg.rope_config())
        # A plain attribute, not a buffer: `.to(bfloat16)` must not round the frequencies.
        self.inv_freq = (inv_freq / divisor).float()
        self._init_weights()

    def _init_weights(self) -> None:
        for lin in (self.fc, self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                    self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=0.02)
        # fc starts as "take the feature": the head begins by predicting what the target
        # predicted one position earlier, a sensible start for a residual feature model.
        d = self.config.hidden_size
        with torch.no_grad():
            self.fc.weight[:, d:] += torch.eye(d)
        if self.reduce is not None:
            self.start_reduce_as_last(torch.ones(d))

    def start_reduce_as_last(self, norm_weight: torch.Tensor) -> None:
        """`reduce` = the last feature layer scaled by `norm_weight` (the target's final norm):
        with the target's last layer listed last, the reduced input is then f_i itself."""
        d = self.config.hidden_size
        with torch.no_grad():
            self.reduce.weight.zero_()
            self.reduce.weight[:, -d:] = torch.diag(norm_weight.float())

    # ---- pieces ------------------------------------------------------------------------

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """[..., T, d] -> q [..., H, T, hd], k and v [..., Hkv, T, hd], RoPE applied."""
        c = self.config
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, c.num_heads, c.head_dim).transpose(-3, -2)
        k = self.k_proj(x).view(*lead, c.num_kv_heads, c.head_dim).transpose(-3, -2)
        v = self.v_proj(x).view(*lead, c.num_kv_heads, c.head_dim).transpose(-3, -2)
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual attention output + MLP: attn [..., H, T, hd] -> [..., T, d]."""
        attn = attn.transpose(-3, -2).flatten(-2)
        h = x + self.o_proj(attn)
        m = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))

    def fuse(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """fc([embed; feature]); a feature of several layers (wider than d) is reduced first."""
        d = self.config.hidden_size
        if self.reduce is not None and features.shape[-1] != d:
            parts = features.float().unflatten(-1, (-1, d))
            parts = parts * torch.rsqrt(parts.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
            features = self.reduce(parts.flatten(-2).to(embeds.dtype))
        return self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))

    def _groups(self) -> int:
        return self.config.num_heads // self.config.num_kv_heads

    # ---- training ----------------------------------------------------------------------

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, unroll: int = 0,
                positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Teacher-forced outputs for [B, T, d] pairs (embed(x_{i+1}), f_i): a list of
        1 + unroll tensors [B, T, d]. Output 0 at i predicts f_{i+1}. Output s (the head
        run s more times on its own outputs, EAGLE-3's training-time test) at i predicts
        f_{i+1+s} from the real pairs <= i and its own chain: the pair at step s, index i is
        (embed(x_{i+1+s}), output_{s-1}[i]), at position i + s; its query sees the real keys
        <= i and the chain's keys at index i of steps 1..s, exactly what a drafted path sees.
        `embeds` must then hold s more tokens: [B, T + unroll, d]."""
        b, t = features.shape[:2]
        if positions is None:
            positions = torch.arange(t, device=features.device).expand(b, t)
        outs, keys, values = [], [], []
        feat = features
        scale = 1.0 / math.sqrt(self.config.head_dim)
        for s in range(unroll + 1):
            x = self.fuse(embeds[:, s:s + t], feat)
            cos, sin = self.rope(positions + s, x.dtype)
            q, k, v = self.qkv(x, cos, sin)
            k = k.repeat_interleave(self._groups(), dim=1)
            v = v.repeat_interleave(self._groups(), dim=1)
            if s == 0:
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                base_k, base_v = k, v
            else:
                keys.append(k)
                values.append(v)
                # Real keys <= i (causal), then the chain's own key at index i of each step.
                real = q @ base_k.transpose(-1, -2) * scale
                causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
                real = real.masked_fill(~causal, float("-inf"))
                chain = torch.stack([(q * kk).sum(-1) * scale for kk in keys], dim=-1)
                wide = torch.promote_types(q.dtype, torch.float32)  # half precision: float32
                weights = torch.cat([real, chain], dim=-1).softmax(-1, dtype=wide).to(q.dtype)
                attn = weights[..., :t] @ base_v
                attn = attn + sum(weights[..., t + j, None] * vv for j, vv in enumerate(values))
            out = self.finish(x, attn)
            outs.append(out)
            feat = out
        return outs

    # ---- drafting ----------------------------------------------------------------------

    def step(self, pairs_embeds: torch.Tensor, pairs_features: torch.Tensor,
             positions: torch.Tensor, cache: "EagleCache", mask: torch.Tensor | None) -> torch.Tensor:
        """Append N pairs [N, d] at `positions` [N] to `cache` and return their outputs [N, d].
        `mask` [N, cache.length + N] (True = may attend) or None for causal."""
        x = self.fuse(pairs_embeds, pairs_features)
        cos, sin = self.rope(positions, x.dtype)
        q, k, v = self.qkv(x, cos, sin)  # [H, N, hd], [Hkv, N, hd]
        keys, vals = cache.append(k, v)
        keys = keys.repeat_interleave(self._groups(), dim=0)
        vals = vals.repeat_interleave(self._groups(), dim=0)
        if mask is None:
            n, total = q.shape[1], keys.shape[1]
            mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
        attn = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        return self.finish(x, attn)


class EagleCache:
    """The head's own K/V: entries for the committed pairs, then (while drafting) the tree's.
    `truncate` rolls back to the committed pairs."""

    def __init__(self, cfg: EagleConfig, capacity: int, dtype: torch.dtype, device):
        shape = (cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, n: int) -> None:
        """Room for n more entries (the buffers double as needed)."""
        if self.length + n > self.capacity:
            grow = max(self.capacity, n)
            self.k = torch.cat([self.k, torch.zeros_like(self.k[:, :grow])], dim=1)
            self.v = torch.cat([self.v, torch.zeros_like(self.v[:, :grow])], dim=1)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[1]
        self.reserve(n)
        self.k[:, self.length:self.length + n] = k
        self.v[:, self.length:self.length + n] = v
        self.length += n
        return self.k[:, :self.length], self.v[:, :self.length]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


# ---- files -----------------------------------------------------------------------------------

@dataclass
class LoadedEagle:
    head: EagleHead
    meta: dict
    folder: Path


def save_head(head: EagleHead, folder: str | Path, base: dict, **extra) -> Path:
    """Write the head atomically (config last: a folder without it is not a head)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in checkpoint_tensors(head).items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / WEIGHTS_NAME)
    cfg = asdict(head.config)
    cfg["extra"] = {**cfg.get("extra", {}), **extra}
    meta = {"format": FORMAT, "version": VERSION, **cfg, "base_model": base}
    training = extra.get("training") or {}
    if training.get("expected_lengths"):
        meta["expected_lengths"] = training["expected_lengths"]
    tmp = folder / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / CONFIG_NAME)
    return folder


_NAMES = {"fc.weight": "fc", "layers.0.self_attn.q_proj.weight": "q_proj",
          "layers.0.self_attn.k_proj.weight": "k_proj", "layers.0.self_attn.v_proj.weight": "v_proj",
          "layers.0.self_attn.o_proj.weight": "o_proj",
          "layers.0.post_attention_layernorm.weight": "post_attention_layernorm",
          "layers.0.mlp.gate_proj.weight": "gate_proj", "layers.0.mlp.up_proj.weight": "up_proj",
          "layers.0.mlp.down_proj.weight": "down_proj"}


def _names(head: EagleHead) -> dict[str, str]:
    """Checkpoint name -> attribute of the head's weights."""
    return {**_NAMES, "reduce.weight": "reduce"} if head.reduce is not None else _NAMES


def checkpoint_tensors(head: EagleHead) -> dict[str, torch.Tensor]:
    """The head's tensors under their EAGLE checkpoint names (plus `draft_vocab`)."""
    out = {name: getattr(head, attr).weight for name, attr in _names(head).items()}
    if head.draft_vocab.numel():
        out["draft_vocab"] = head.draft_vocab
    return out


def is_head_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def load_head(folder: str | Path, backbone=None, name: str | None = None) -> LoadedEagle:
    """Read a head folder; with `backbone`, refuse a head trained for another model."""
    from safetensors.torch import load_file
    folder = Path(folder)
    if not folder.exists():
        raise HastenError(f"no EAGLE head at {folder}: train one with `hasten train eagle`")
    if not is_head_folder(folder):
        raise HastenError(f"{folder} is not an EAGLE head folder (needs {CONFIG_NAME} and "
                          f"{WEIGHTS_NAME}; `hasten train eagle --out DIR` writes them)")
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text())
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except Exception as e:  # noqa: BLE001 - a corrupt file, whatever the parser says
        raise HastenError(f"{folder} holds a damaged EAGLE head ({e}); train it again") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise HastenError(f"{folder}: not a {FORMAT} v{VERSION} head")
    if backbone is not None:
        ok, why = identity_matches(meta.get("base_model", {}), base_identity(backbone, name))
        if not ok:
            base = meta.get("base_model", {}).get("name") or "another model"
            raise HastenError(f"the EAGLE head in {folder} was trained for {base}, not "
                              f"{name or 'this model'} ({why}); train one for this model")
    fields = {k: meta[k] for k in EagleConfig.__dataclass_fields__ if k in meta}
    head = EagleHead(EagleConfig(**fields))
    names = _names(head)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise HastenError(f"{folder}: the EAGLE head lacks {missing[:3]}; train it again")
    layers = head.config.feature_layers or ()
    if backbone is not None and layers:
        have = layer_count(backbone)
        if max(layers) >= have:
            raise HastenError(f"the EAGLE head in {folder} reads layer {max(layers)}, but this "
                              f"model has {have} layers; train one for this model")
    with torch.no_grad():
        for n, attr in names.items():
            target = getattr(head, attr).weight
            if tuple(tensors[n].shape) != tuple(target.shape):
                raise HastenError(f"{folder}: {n} has shape {tuple(tensors[n].shape)}, "
                                  f"expected {tuple(target.shape)}")
            target.copy_(tensors[n])
    if "draft_vocab" in tensors:
        head.draft_vocab = tensors["draft_vocab"].long()
    return LoadedEagle(head.eval(), meta, folder)
