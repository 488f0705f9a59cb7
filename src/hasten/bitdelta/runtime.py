"""The lean runtime seen from BitDelta: weight names, a differentiable pass, delta-aware layers.

`LlamaModel` keeps Hugging Face weights fused and transposed (`Dense` stores [in, out]; q/k/v
become `wqkv`, gate/up become `w_gate_up`). Deltas are computed and stored per Hugging Face
weight ([out, in], see `pack.py`); `FUSED` says which of them make up each fused layer, in
order, so packed rows and scales are concatenated the way the runtime concatenates weights.

`DeltaDense` wraps a block's base `Dense` (shared, never copied) and adds, per batch row,
one tenant's `scale * (x @ S.T)` from packed bits: one base matmul for the whole batch plus
a binary matmul per tenant present. Its `route` (tenant index per batch row, -1 = base
only) is set with `set_route(model, rows)`; None means tenant 0 for every row.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.llama import Dense, LlamaModel, rope_inv_freq
from .pack import invariant_rows, sign_matmul

# fused runtime layer -> the Hugging Face weights (relative to model.layers.{i}.) it holds
FUSED = {
    "wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "wo": ("self_attn.o_proj",),
    "w_gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "w_down": ("mlp.down_proj",),
}


def block_linear_names(num_layers: int) -> list[str]:
    """The Hugging Face names of every block linear weight, in runtime order."""
    return [f"model.layers.{i}.{part}.weight" for i in range(num_layers)
            for parts in FUSED.values() for part in parts]


def forward_logits(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits [b, t, vocab] of a causal pass over `ids` from position 0, without the KV
    cache (each block writes into fresh buffers), so autograd can run through it."""
    cfg = model.config
    b, t = ids.shape
    inv_freq, divisor = rope_inv_freq(cfg)
    angles = torch.outer(torch.arange(t, dtype=torch.float64) / divisor, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    cos = angles.cos().to(model.device, model.dtype)[None, None]
    sin = angles.sin().to(model.device, model.dtype)[None, None]
    x = model.embed(ids)
    for block in model.blocks:
        k = x.new_zeros(b, cfg.num_kv_heads, t, cfg.head_dim)
        v = x.new_zeros(b, cfg.num_kv_heads, t, cfg.head_dim)
        x = block(x, cos, sin, k, v, 0, None)
    return model.lm_head(model.norm(x))


def hf_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, unfused and in [out, in] layout
    (the inverse of `LlamaModel.load_hf_state_dict`)."""
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sizes = {"wqkv": (q, kv, kv), "wo": (cfg.hidden_size,),
             "w_gate_up": (cfg.intermediate_size, cfg.intermediate_size), "w_down": (cfg.hidden_size,)}
    sd = {"model.embed_tokens.weight": model.embed.weight.detach().clone(),
          "model.norm.weight": model.norm.weight.detach().clone()}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = model.lm_head.weight_t.detach().t().contiguous()
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight.detach().clone()
        sd[p + "post_attention_layernorm.weight"] = block.mlp_norm.weight.detach().clone()
        for layer, parts in FUSED.items():
            dense = getattr(block, layer)
            weights = dense.weight_t.detach().t().split(sizes[layer], dim=0)
            for part, w in zip(parts, weights):
                sd[p + part + ".weight"] = w.contiguous()
            if dense.bias is not None:
                for part, bias in zip(parts, dense.bias.detach().split(sizes[layer])):
                    sd[p + part + ".bias"] = bias.clone()
    return sd


class DeltaDense(nn.Module):
    """`base(x)` plus, for each batch row, its tenant's `scale * (x @ S.T)`.

    tenants: per tenant (packed signs uint8 [out, ceil(in/8)], scale [out] in the compute
    dtype), the fused layer's rows already concatenated."""

    def __init__(self, base: Dense, tenants: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.base = base
        self.in_features = base.weight_t.shape[0]
        self.tenants = tenants
        self.route: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.route
        if route is None:
            packed, scale = self.tenants[0]
            return y + sign_matmul(x, packed, self.in_features) * scale
        if len(route) != x.shape[0]:
            raise ValueError(f"route names {len(route)} tenants for a batch of {x.shape[0]}")
        y = y.clone()
        # Decode steps (one token per row): a tenant's rows go in chunks of a row-invariant
        # path of `sign_matmul`, so a row's delta never depends on how many rows of its tenant
        # share the step.
        chunk = invariant_rows(x) if x.dim() == 3 and x.shape[1] == 1 else x.shape[0]
        for tenant in sorted(set(route) - {-1}):
            rows = [r for r, k in enumerate(route) if k == tenant]
            packed, scale = self.tenants[tenant]
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                y[part] += sign_matmul(x[part], packed, self.in_features) * scale
        return y


def set_route(model: LlamaModel, route: list[int] | None) -> None:
    """Tell every `DeltaDense` of `model` which tenant each batch row belongs to
    (-1: the base model alone; None: tenant 0 for all rows)."""
    for module in model.modules():
        if isinstance(module, DeltaDense):
            module.route = None if route is None else list(route)
