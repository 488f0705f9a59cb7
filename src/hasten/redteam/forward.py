"""A differentiable forward over a shared prefix, for the two runtimes hasten has.

GCG needs two things the decoding backbones do not offer: input *embeddings* (the gradient
with respect to a one-hot suffix flows through `one_hot @ embedding matrix`) and a batch of
B candidates that all continue the *same* prefix (the chat template and the goal). Both
scorers here compute the prefix K/V once (`prefix(ids)`), then run a batch of embedded
continuations against it (`hidden(prefix, embeds)`): the prefix K/V is expanded over the
batch, never recomputed. Only the hidden states at the target positions go through the LM
head (`logits(hidden)`), which on a 49k vocabulary is most of the saving for short rows.

- `LeanScorer` reuses a `LlamaModel`'s modules and weights (optionally its first
  `n_layers` blocks only, the self-draft) in its own attention loop; the decoding cache of
  the model is not touched.
- `HFScorer` drives any `transformers` causal LM through `inputs_embeds` and a fresh
  `DynamicCache` per batch (Gemma's embedding scale is applied to one-hot embeddings too).
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F

from ..models.llama import LlamaModel, causal_mask, rope_inv_freq


class LeanScorer:
    """Our lean runtime's weights, run as a batch over a shared prefix.

    `n_layers`: use only the first blocks (a self-draft). `dtype`: run in another precision
    than the model's, on converted copies of the modules used (e.g. a bfloat16 draft of a
    float32 target: 3-4x faster matmuls on CPUs with AVX512-BF16 or AMX)."""

    def __init__(self, model: LlamaModel, n_layers: int | None = None,
                 dtype: torch.dtype | None = None):
        self.row_offsets = True  # `hidden(..., visible=)` runs rows of different offsets at once
        total = model.config.num_layers
        n_layers = total if n_layers is None else n_layers
        if not 1 <= n_layers <= total:
            raise ValueError(f"layers must be in [1, {total}], got {n_layers}")
        self.model, self.n_layers = model, n_layers
        modules = [model.embed, model.norm, model.lm_head, *model.blocks[:n_layers]]
        if dtype is not None and dtype != model.dtype:
            modules = [copy.deepcopy(m).to(dtype) for m in modules]
        self.embedding, self.norm, self.lm_head, *self.blocks = modules
        self.device, self.dtype = model.device, dtype or model.dtype
        self.vocab_size = model.config.vocab_size
        self._cos = self._sin = None

    # ---- embeddings ---------------------------------------------------------------------

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.embedding.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def embed_one_hot(self, one_hot: torch.Tensor) -> torch.Tensor:
        return one_hot @ self.embed_weight

    # ---- forward ------------------------------------------------------------------------

    def _rope(self, start: int, t: int):
        if self._cos is None or self._cos.shape[0] < start + t:
            n = max(start + t, 512)
            inv_freq, divisor = rope_inv_freq(self.model.config)
            angles = torch.outer(torch.arange(n, dtype=torch.float64) / divisor, inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self._cos = angles.cos().to(self.device, self.dtype)
            self._sin = angles.sin().to(self.device, self.dtype)
        return self._cos[start:start + t], self._sin[start:start + t]

    def _run(self, x: torch.Tensor, past: list | None, visible: torch.Tensor | None = None):
        """x [B, T, D] after `past` (per layer (k, v) [1, n_kv, P, hd]) -> (normed hidden, kv).

        `visible` [B] (optional): row i sees only the first visible[i] past entries and sits
        at positions visible[i], visible[i] + 1, ... (rows continuing different lengths of
        one shared past, in one pass)."""
        b, t, _ = x.shape
        p = past[0][0].shape[2] if past else 0
        if visible is None:
            cos, sin = self._rope(p, t)
            mask = causal_mask(p, t, self.device) if p else None
        else:
            cos, sin = self._rope(0, p + t)
            positions = visible[:, None] + torch.arange(t, device=self.device)  # [B, T]
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            seen = torch.arange(p, device=self.device)[None, :] < visible[:, None]  # [B, P]
            mask = torch.cat([seen[:, None, :].expand(b, t, p),
                              causal_mask(0, t, self.device).expand(b, t, t)], dim=2)[:, None]
        kv = []
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(x, cos, sin)
            kv.append((k, v))
            if past:
                pk, pv = past[i]
                k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
                v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=blk.n_kv != blk.n_heads)
            x = blk.mix(x, attn)
        return self.norm(x), kv

    def prefix(self, ids: list[int]):
        """The K/V of the shared prefix, per layer, computed once (no gradient)."""
        with torch.no_grad():
            x = self.embed(torch.tensor([ids], device=self.device))
            return self._run(x, None)[1]

    def extend(self, prefix, ids: list[int]):
        """The prefix K/V followed by that of `ids`."""
        with torch.no_grad():
            kv = self._run(self.embed(torch.tensor([ids], device=self.device)), prefix)[1]
        return [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(prefix, kv)]

    def hidden(self, prefix, embeds: torch.Tensor, visible: torch.Tensor | None = None):
        """Final-norm hidden states [B, T, D] of embedded rows continuing the prefix (row i
        continuing only its first visible[i] entries, when given)."""
        return self._run(embeds, prefix, visible)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


class HFScorer:
    """The same interface over a `transformers` causal LM (e.g. `HFBackbone.model`)."""

    row_offsets = False

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.config = model.config.get_text_config(decoder=True)
        self.vocab_size = int(self.config.vocab_size)
        self._embedding = model.get_input_embeddings()
        scale = getattr(self._embedding, "embed_scale", None)  # Gemma scales its embeddings
        self.scale = None if scale is None else float(scale)
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # transformers renames `past_key_values` to `cache` (5.x deprecates the old name)
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def embed_weight(self) -> torch.Tensor:
        return self._embedding.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embedding(ids)

    def embed_one_hot(self, one_hot: torch.Tensor) -> torch.Tensor:
        x = one_hot @ self.embed_weight
        return x if self.scale is None else x * torch.tensor(self.scale, dtype=x.dtype)

    def prefix(self, ids: list[int]):
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        cache = out.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _run(self, prefix, embeds: torch.Tensor):
        from transformers import DynamicCache

        b, t, _ = embeds.shape
        p = prefix[0][0].shape[2]
        cache = DynamicCache()
        for i, (k, v) in enumerate(prefix):
            cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
        positions = torch.arange(p, p + t, device=self.device).expand(b, t)
        out = self.model.base_model(inputs_embeds=embeds, use_cache=True, position_ids=positions,
                                    cache_position=torch.arange(p, p + t, device=self.device),
                                    **{self._cache_arg: cache})
        return out.last_hidden_state, cache

    def hidden(self, prefix, embeds: torch.Tensor) -> torch.Tensor:
        return self._run(prefix, embeds)[0]

    def extend(self, prefix, ids: list[int]):
        with torch.no_grad():
            cache = self._run(prefix, self.embed(torch.tensor([ids], device=self.device)))[1]
        return [(layer.keys, layer.values) for layer in cache.layers]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def scorer_for(backbone, n_layers: int | None = None):
    """The scorer for a hasten backbone: lean runtime or the transformers adapter."""
    if isinstance(backbone, LlamaModel):
        return LeanScorer(backbone, n_layers)
    if n_layers is not None:
        raise ValueError("a first-layers draft needs the lean runtime (a Llama-family target)")
    return HFScorer(backbone.model)
