"""A lean Llama-family runtime: Llama 2/3, Mistral, Qwen2, SmolLM2.

RMSNorm, RoPE (default / linear / llama3 scaling), grouped-query attention through
`scaled_dot_product_attention`, SwiGLU, tied or untied embeddings, and a static KV cache.
Weights use Hugging Face names on the way in; q/k/v and gate/up are fused into one matmul
each at load time because on a CPU one big matmul beats three small ones.

`forward` takes token ids with their absolute positions and a boolean mask over
(committed cache + new tokens), which is all a speculative verifier needs to check a whole
token tree in one pass. See `backbone.py` for the cache contract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ContextFullError, ModelSourceError
from .backbone import StepOutput, check_step, check_taps
from .config import LlamaConfig
from .exact_attention import KeyPlan, exact_attention, plan_keys


def rope_inv_freq(cfg: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float64) and the position divisor for the config's RoPE variant."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq, float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        middle = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(middle, blended, out), 1.0
    raise ModelSourceError(f"RoPE scaling type {kind!r} is not supported by the lean runtime; "
                           "use the generic adapter (--runtime hf)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Half precision normalises in float32, as the reference implementation does.
        xf = x.float() if x.element_size() < 4 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Dense(nn.Module):
    """`x @ W.T + b` with W stored transposed, as [in, out].

    On a CPU, MKL multiplies a few rows by a matrix in this layout several times faster than
    by nn.Linear's [out, in] layout (measured 3-8x for 4-16 rows on this model's shapes; equal
    for one row), and a few rows is exactly what verifying a draft tree feeds.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """[out, in], as nn.Linear has it (a view)."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class Block(nn.Module):
    # Its linear layers, in the order a block computes them (and `block_step` takes them).
    LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = self.n_heads * self.hd, self.n_kv * self.hd
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.wqkv = Dense(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.wo = Dense(q, cfg.hidden_size)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.w_gate_up = Dense(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.w_down = Dense(cfg.intermediate_size, cfg.hidden_size)
        self.split = (q, kv, kv)

    def qkv(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries, keys and values [b, heads, t, head_dim] of the normed input."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).split(self.split, dim=-1)
        q = q.view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def mix(self, x, attn) -> torch.Tensor:
        """The rest of the block after attention [b, heads, t, head_dim]: output projection,
        residual, MLP, residual."""
        b, t, _ = x.shape
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.w_gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, mask, plan: KeyPlan | None = None):
        t = x.shape[1]
        q, k, v = self.qkv(x, cos, sin)
        end = start + t
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        if plan is not None:  # decode and verify steps: the same numbers for the same token
            attn = exact_attention(q, k_cache, v_cache, plan, self.hd ** -0.5)
        else:  # a float16 cache (`LlamaModel.kv_dtype`) is read back in the queries' dtype
            attn = F.scaled_dot_product_attention(
                q, k_cache[:, :, :end].to(q.dtype), v_cache[:, :, :end].to(q.dtype), attn_mask=mask,
                is_causal=mask is None and start == 0 and t > 1,
                enable_gqa=self.n_kv != self.n_heads)
        return self.mix(x, attn)


FUSED_PREFILL_TOKENS = 512  # longest prompt prefilled on the compiled blocks (`prefill_plan`)


class LlamaModel(nn.Module):
    """Weights plus a static KV cache; implements the `Backbone` protocol."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        # Given its weight, nn.Embedding skips its random init: on the meta device that init
        # alone imports torch._dynamo (1.6 s of every model load, measured).
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                  _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied embeddings still get their own transposed copy: the embedding lookup wants rows
        # [vocab, hidden], the LM head matmul wants [hidden, vocab] (see Dense).
        self.lm_head = Dense(cfg.hidden_size, cfg.vocab_size)
        self.capacity = 0
        self.length = 0
        self._pending = 0
        self._k = self._v = None
        # The KV cache's dtype; None: the model's. compact-q8 keeps it in float16 (as llama.cpp
        # does): half the bytes attention reads per step. Every step reads K/V back from the
        # cache, its own token's too, so plain and verify steps see the same rounded values.
        self.kv_dtype: torch.dtype | None = None
        # Decode and verify steps through `exact_attention`, so a token's logits and K/V do not
        # depend on whether it was decoded alone or verified in a tree. False: SDPA throughout.
        # `build_llama` turns it on for bfloat16 / float16 (see `hasten.api.Model.choose_attention`).
        self.exact = False
        # Exact attention computes the committed past's blocks once for all tree nodes; False
        # gathers them per node (see `plan_keys`: what float32 needs to stay exact).
        self.share_past_blocks = True
        # Exact plain steps run as two rows (see `_padded_step`) where one-row matmuls round
        # differently; kernels whose rows never depend on the row count (compact) need not.
        self.pad_plain_steps = True
        # Exact attention through the compiled float32 kernel (`quant_kernels.logical_attention`)
        # instead of blocked torch ops: other bits, the same for plain and verify; needs
        # share_past_blocks False. Compact weights turn it on where the kernel builds.
        self.fused_attention = False
        # (model, x, cos, sin, k, v, slots, counts, start=, taps=) -> (x after every block,
        # the tapped blocks' outputs), or None: all blocks of a fused-attention step in one
        # compiled call (`compact.run_fused_blocks`, set with the kernels; the same bits as the
        # blocks one by one).
        self.run_blocks = None

    # The final norm's weight, not the embedding's: compact weights keep the embedding as
    # quantized blocks (see `compact.py`) but always compute in the norm's dtype.
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_dtype or self.dtype

    # ---- weights -------------------------------------------------------------------------

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                           device=None) -> None:
        """Load Hugging Face-named weights (`model.layers.0.self_attn.q_proj.weight`, ...).

        Each parameter is a fresh tensor in our layout, assigned as is (no second copy into
        preallocated parameters). Fresh, never a view of `sd`: safetensors tensors are views
        of a memory-mapped file, and one kept view keeps the whole mapping resident."""
        def take(name: str) -> torch.Tensor:  # converted; a view of sd where nothing changes
            return sd[name].to(device=device, dtype=dtype)

        def fresh(name: str) -> torch.Tensor:  # a parameter used as stored: always its own copy
            return sd[name].to(device=device, dtype=dtype, copy=True)

        def transposed(t: torch.Tensor) -> torch.Tensor:  # contiguous() of a .t() is a new tensor
            return t.t().contiguous()

        head = take("model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight")
        own = {"embed.weight": fresh("model.embed_tokens.weight"), "lm_head.weight_t": transposed(head),
               "norm.weight": fresh("model.norm.weight")}
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            att, mlp = p + "self_attn.", p + "mlp."
            own[f"blocks.{i}.attn_norm.weight"] = fresh(p + "input_layernorm.weight")
            own[f"blocks.{i}.mlp_norm.weight"] = fresh(p + "post_attention_layernorm.weight")
            qkv = torch.cat([take(att + n + "_proj.weight") for n in "qkv"])
            own[f"blocks.{i}.wqkv.weight_t"] = transposed(qkv)
            if self.config.attention_bias:
                own[f"blocks.{i}.wqkv.bias"] = torch.cat([take(att + n + "_proj.bias") for n in "qkv"])
            own[f"blocks.{i}.wo.weight_t"] = transposed(take(att + "o_proj.weight"))
            gate_up = torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
            own[f"blocks.{i}.w_gate_up.weight_t"] = transposed(gate_up)
            own[f"blocks.{i}.w_down.weight_t"] = transposed(take(mlp + "down_proj.weight"))
        missing, unexpected = self.load_state_dict(own, strict=False, assign=True)
        if missing or unexpected:
            raise ModelSourceError(f"weights do not fit the config: missing {missing[:4]}, "
                                   f"unexpected {unexpected[:4]}")

    # ---- cache ---------------------------------------------------------------------------

    def reset(self, batch_size: int = 1, capacity: int | None = None) -> None:
        cfg = self.config
        capacity = capacity or self.capacity or min(cfg.max_position_embeddings, 4096)
        # A cache made under inference_mode (a measurement inside `load`, say) cannot be
        # written outside it: make a new one then.
        usable = self._k is not None and (torch.is_inference_mode_enabled() or
                                          not self._k.is_inference())
        allocated = self._k.shape[3] if usable else 0
        if usable and self._k.shape[1] == batch_size and allocated >= capacity:
            capacity = allocated  # reuse the allocation: a larger cache is never wrong
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, capacity, cfg.head_dim)
        if not usable or self._k.shape != shape or self._k.dtype != self.cache_dtype:
            self._k = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            self._v = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            inv_freq, divisor = rope_inv_freq(cfg)
            angles = torch.outer(torch.arange(capacity, dtype=torch.float64) / divisor, inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self._cos = angles.cos().to(self.device, self.dtype)
            self._sin = angles.sin().to(self.device, self.dtype)
        self.capacity, self.length, self._pending = capacity, 0, 0

    def commit(self, keep: torch.Tensor | None = None) -> None:
        if keep is None:
            self.length += self._pending
        else:
            keep = torch.as_tensor(keep, dtype=torch.long)
            kept = keep.numel()
            if keep.device.type == "cpu":  # checked on the host (no device sync), in Python:
                ids = keep.tolist()            # tensor ops on a few indices cost more
                if ids and (min(ids) < 0 or max(ids) >= self._pending):
                    raise IndexError(f"commit indices must lie in [0, {self._pending})")
                self._move_kept(ids)
            else:
                self._gather(torch.arange(kept, device=keep.device), keep)
            self.length += kept
        self._pending = 0

    def _move_kept(self, ids: list[int]) -> None:
        """Kept pending entries `ids` to the slots right after the committed ones. Entries
        already in place stay (an accepted path is mostly its tree's first nodes); an
        increasing path, as a tree's always is, moves entry by entry, each to a slot before
        its own, so no copy overwrites one still to be read (measured in a decode loop: ~250 us
        for the gathering copy of every layer's entries, ~110 us this way)."""
        moved = [(j, i) for j, i in enumerate(ids) if i != j]
        if not moved:
            return
        at = self.length
        if all(a < b for a, b in zip(ids, ids[1:])):
            for j, i in moved:
                self._k[:, :, :, at + j].copy_(self._k[:, :, :, at + i])
                self._v[:, :, :, at + j].copy_(self._v[:, :, :, at + i])
            return
        self._gather(torch.tensor([j for j, _ in moved], dtype=torch.long, device=self.device),
                     torch.tensor([i for _, i in moved], dtype=torch.long, device=self.device))

    def _gather(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Pending entries at offsets `src` to offsets `dst` after the committed ones, every
        layer at once; gathering first makes overlapping source/destination ranges safe."""
        src, dst = self.length + src, self.length + dst
        self._k[:, :, :, dst] = self._k[:, :, :, src]
        self._v[:, :, :, dst] = self._v[:, :, :, src]

    def truncate(self, length: int) -> None:
        """Forget committed entries after `length` (a draft model rolling back its guesses)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} entries to {length}")
        self.length, self._pending = length, 0

    # ---- forward -------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False,
                taps: tuple[int, ...] = ()) -> StepOutput:
        if self._k is None:
            self.reset(batch_size=input_ids.shape[0])
        b, t = input_ids.shape
        start = self.length
        check_step(start, t, self.capacity, b, self._k.shape[1])
        if (self.exact and self.pad_plain_steps and b == 1 and start > 0 and t == 1
                and start + 2 <= self.capacity):
            return self._padded_step(input_ids, positions, last_only, taps)
        if positions is None:
            positions = torch.arange(start, start + t, device=self.device).expand(b, t)
        elif positions.device.type == "cpu":  # checked where it costs no device sync
            if int(positions.max()) >= self.capacity:
                raise ContextFullError(f"position {int(positions.max())} beyond the RoPE table "
                                       f"({self.capacity}); reset with a larger capacity")
            positions = positions.to(self.device)
        cos, sin = self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)
        plan = None
        if self.exact and b == 1 and start > 0:  # decode and verify steps
            plan = plan_keys(None if mask is None else mask[0], start, t, self.device,
                             self.share_past_blocks, self.fused_attention)
        elif b == 1 and start == 0 and mask is None:  # a prompt (`prefill_plan`)
            plan = self.prefill_plan(t)
        if plan is None and mask is None and start > 0 and t > 1:
            mask = causal_mask(start, t, self.device).expand(b, t, start + t)
        if mask is not None:
            mask = mask.unsqueeze(1)  # one mask for all heads
        x, tapped = self.run_layers(self.embed(input_ids), cos, sin, self._k, self._v, start,
                                    mask, plan, taps)
        hidden = self.norm(x)
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        self._pending = t
        return StepOutput(logits=logits, hidden=hidden, taps=tapped)

    def run_layers(self, x, cos, sin, k_all, v_all, start: int, mask, plan: KeyPlan | None,
                   taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every block over x with caches k_all / v_all [L, B, KV, capacity, hd]: all in one
        compiled call (`run_blocks`) where a single sequence's plan allows, else block by block.
        The solo forward and the batched decoder's prefill both come here, so they match.
        Returns x after the last block and the outputs of blocks `taps` side by side (or None)."""
        check_taps(taps, len(self.blocks))
        if self.run_blocks is not None and plan is not None and plan.counts is not None and \
                x.shape[0] == 1:
            done = self.run_blocks(self, x, cos, sin, k_all, v_all, plan.tail_slots, plan.counts,
                                   start=start, taps=taps)
            if done is not None:
                return done[0], side_by_side(done[1])
        tapped = {}
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, k_all[i], v_all[i], start, mask, plan)
            if i in taps:
                tapped[i] = x
        return x, side_by_side([tapped[i] for i in taps])

    def prefill_plan(self, t: int) -> KeyPlan | None:
        """How a t-token prompt into an empty cache attends: on the compiled blocks with exact
        attention, as decode steps run, where the compiled attention runs and the prompt is
        short (compact-q8, prompts of 8 / 39 / 512 tokens: 8.4 -> 5.7 / 18.1 -> 16.3 / 278 -> 248
        ms); else None, SDPA with a causal mask (long prompts: the plan's t x t slot table
        grows). Batched prefills take the same plan, so a row's prompt is computed as the solo
        one."""
        if not (self.exact and self.fused_attention and t <= FUSED_PREFILL_TOKENS):
            return None
        return plan_keys(None, 0, t, self.device, self.share_past_blocks, self.fused_attention)

    def _padded_step(self, input_ids: torch.Tensor, positions: torch.Tensor | None,
                     last_only: bool, taps: tuple[int, ...] = ()) -> StepOutput:
        """A one-token step computed as two identical rows, the second thrown away.

        A one-row matmul runs another kernel (gemv) than two or more rows, and its rows round
        differently (measured: float32 with MKL on Intel, bfloat16 on AMD EPYC, for some
        inputs). Verify steps always have two or more rows, so plain steps get two as well;
        the copy attends only to itself and its K/V slot is never committed."""
        start = self.length
        pos = torch.full((1, 2), start, dtype=torch.long) if positions is None else positions.cpu().repeat(1, 2)
        mask = torch.ones(1, 2, start + 2, dtype=torch.bool)
        mask[0, 0, start + 1] = mask[0, 1, start] = False
        out = self.forward(input_ids.repeat(1, 2), pos, mask, last_only=False, taps=taps)
        self._pending = 1
        tapped = None if out.taps is None else out.taps[:, :1]
        return StepOutput(logits=out.logits[:, :1], hidden=out.hidden[:, :1], taps=tapped)


def side_by_side(outputs: list[torch.Tensor]) -> torch.Tensor | None:
    """Tapped layer outputs [..., d] each -> [..., len * d] (None for no taps)."""
    return torch.cat(outputs, dim=-1) if outputs else None


def causal_mask(past: int, t: int, device=None) -> torch.Tensor:
    """[t, past + t] boolean: every new token sees the whole past and the new tokens before it."""
    return torch.ones(t, past + t, dtype=torch.bool, device=device).tril(diagonal=past)


def build_llama(cfg: LlamaConfig, weights: dict[str, torch.Tensor], dtype=torch.float32,
                device="cpu") -> LlamaModel:
    """Our runtime's model from Hugging Face-named `weights` (left untouched). Loading peaks
    at the source weights plus one converted copy."""
    with torch.device("meta"):
        model = LlamaModel(cfg)
    model.load_hf_state_dict(weights, dtype, device)
    model.exact = dtype in (torch.bfloat16, torch.float16)
    return model.eval().requires_grad_(False)
