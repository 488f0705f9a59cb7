"""Compact weights: the lean runtime over a GGUF file's quantized blocks, kept as they are.

`build_compact_llama(cfg, gguf_path)` builds the same `LlamaModel` as `build_llama`, but every
Q4_1 / Q8_0 matrix stays in memory as the file's blocks (5 and 8.5 bits per weight instead of
32) and is multiplied by `quant_kernels.block_matmul`, whose weights are exactly the file's
dequantized values. Activations, norms, the KV cache and attention stay float32, so the model
computes the same function as the float32 reference (`build_llama` on the dequantized file);
only the order of the float32 sums inside a matmul differs.

Tensors of other types (F32, F16, Q4_K, Q6_K, ...) are dequantized to float32 as the
reference does, and `CompactSummary` says how many weights stayed compact.

`dense_on_kernels(model)` runs a dense float32 model on the same compiled kernels (`KernelDense`:
the float32 weights as they are): where MKL's rows depend on the row count, that is what makes
float32 speculation exact, and for the few rows of decode and verify steps it is faster too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelSourceError
from .config import LlamaConfig
from ..paths import cache_root
from .gguf_convert import (_ROPE_FREQS, PERMUTED_ARCHS, _dequantize, gguf_tensors, hf_tensor_name,
                           unpermute_rope_rows)
from .llama import Block, Dense, LlamaModel, RMSNorm
from .quant_kernels import (BLOCK, BLOCK_BYTES, NO_ROWS, Q8_KIND_CODES, block_matmul,
                            can_fuse_attention, dense_matmul, dequantize_blocks, kernel_module,
                            linear, q8_matmul, q8_pack, q8_unpack, vector_kernels)


class QuantDense(nn.Module):
    """`x @ W.T + b` with W [out, in] held as GGUF blocks [out, in / 32 * bytes] (uint8)."""

    def __init__(self, blocks: torch.Tensor, kind: str, bias: torch.Tensor | None = None):
        super().__init__()
        self.kind = kind
        self.register_buffer("blocks", blocks, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features = blocks.shape[0]
        self.in_features = blocks.shape[1] // BLOCK_BYTES[kind] * BLOCK

    @property
    def weight_t(self) -> torch.Tensor:
        """[in, out] float32, dequantized on demand (for code that inspects weights)."""
        return dequantize_blocks(self.blocks, self.kind).t()

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_blocks(self.blocks, self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = block_matmul(x, self.blocks, self.kind)
        return y if self.bias is None else y + self.bias


class Q8Dense(QuantDense):
    """A QuantDense whose input rows are rounded to int8 blocks of 32 before the product, as
    llama.cpp computes (`quant_kernels.q8_matmul`: integer dot products per block, AVX-512
    VNNI or AVX2). The weights stay the file's values, in the kernel's layout (`blocks`)."""

    def __init__(self, layer: QuantDense):
        nn.Module.__init__(self)
        self.kind, self.bias = layer.kind, layer.bias
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("blocks", q8_pack(layer.blocks, layer.kind, layer.in_features),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return q8_unpack(self.blocks, self.kind, self.in_features)

    @property
    def weight_t(self) -> torch.Tensor:
        return self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = q8_matmul(x, self.blocks, self.kind)
        return y if self.bias is None else y + self.bias


class KernelDense(Dense):
    """A dense float32 layer through the compiled kernel (`quant_kernels.dense_matmul`): the
    same weights, [out, in] as the kernel reads them, and rows that do not depend on the row
    count. With autograd on (BitDelta's scale distillation) it multiplies with torch."""

    def __init__(self, dense: Dense, weight: torch.Tensor | None = None):
        """From `dense`, or `weight` [out, in] when given (a tied LM head: the embedding)."""
        nn.Module.__init__(self)
        w = dense.weight_t.detach().t().contiguous() if weight is None else weight
        self.w = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
        self.bias = dense.bias

    @property
    def weight_t(self) -> torch.Tensor:
        return self.w.t()

    @property
    def weight(self) -> torch.Tensor:
        return self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w.t() if torch.is_grad_enabled() and x.requires_grad else dense_matmul(x, self.w)
        return y if self.bias is None else y + self.bias


class KernelLinear(nn.Linear):
    """An nn.Linear (no bias) multiplying through `quant_kernels.linear`: the compiled kernel
    at inference, torch's with autograd. For small float32 heads on the CPU (EAGLE's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def linears_on_kernels(module: nn.Module) -> nn.Module:
    """Every bias-free float32 nn.Linear of `module` as a KernelLinear, in place (a class swap)."""
    for sub in module.modules():
        if type(sub) is nn.Linear and sub.bias is None and sub.weight.dtype == torch.float32:
            sub.__class__ = KernelLinear
    return module


class FusedRMSNorm(RMSNorm):
    """RMSNorm in one compiled call (float32 rows, row by row): other bits than the six torch
    ops, the same for every row count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel_module().rms_norm(x, self.weight, self.eps)


class CompactBlock(Block):
    """A block whose norms and rotary embedding run compiled (`Block.qkv`'s signature and
    result layout unchanged): fewer ops per layer, which is what a 135M model's step costs."""

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, mask, plan=None):
        # A decode or verify step of one sequence on the compiled attention: the whole block
        # in one call where its layers allow (`fused_layers`), else the Python ops.
        layers = fused_layers(self) if plan is not None and plan.counts is not None and \
            x.shape[0] == 1 else None
        if layers is None:
            return super().forward(x, cos, sin, k_cache, v_cache, start, mask, plan)
        return block_step(self, layers, x, cos, sin, k_cache, v_cache, plan.tail_slots,
                          plan.counts, start=start)

    def qkv(self, x, cos, sin):
        b, t, _ = x.shape
        y = self.wqkv(self.attn_norm(x)).reshape(b * t, -1)
        kernel_module().rope_qkv_(y, cos.reshape(b * t, self.hd).contiguous(),
                                  sin.reshape(b * t, self.hd).contiguous(), self.n_heads,
                                  self.n_kv, self.hd)
        q, k, v = y.view(b, t, -1).split(self.split, dim=-1)
        q = q.view(b, t, self.n_heads, self.hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        return q, k, v


KIND_CODES = {"Q4_1": 0, "Q8_0": 1}  # the kernel's Kind enum; 2 = dense float32


def fused_layers(block: Block) -> tuple[list[torch.Tensor], list[int]] | None:
    """The four weights of `block` and their kernel kinds, where the whole block can run in one
    compiled call (`kernel_module().block_step`): every linear a QuantDense (Q4_1 / Q8_0) or
    KernelDense without bias, compiled norms. None otherwise (BitDelta's DeltaDense, biases)."""
    if type(block) is not CompactBlock or type(block.attn_norm) is not FusedRMSNorm or \
            type(block.mlp_norm) is not FusedRMSNorm:
        return None
    weights, kinds = [], []
    for layer in (getattr(block, name) for name in Block.LINEARS):
        if type(layer) is QuantDense and layer.kind in KIND_CODES and layer.bias is None:
            weights.append(layer.blocks)
            kinds.append(KIND_CODES[layer.kind])
        elif type(layer) is Q8Dense and layer.bias is None:
            weights.append(layer.blocks)
            kinds.append(Q8_KIND_CODES[layer.kind])
        elif type(layer) is KernelDense and layer.bias is None:
            weights.append(layer.w)
            kinds.append(2)
        else:
            return None
    return weights, kinds


def block_step(block: Block, layers, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
               counts: torch.Tensor, rows: torch.Tensor = NO_ROWS,
               write_rows: torch.Tensor = NO_ROWS, write_slots: torch.Tensor = NO_ROWS,
               start: int = 0) -> torch.Tensor:
    """`block` (with `fused_layers(block)`) over a step's T tokens in one compiled call, the
    same bits as its Python ops: x [..., d] with T tokens, cos/sin with T rows, caches [R, KV,
    capacity, hd]. K/V written at (write_rows, write_slots), or (both empty) row 0 at slots
    start.. ; attention over `slots`/`counts` as `logical_attention` (rows empty: row 0)."""
    weights, kinds = layers
    d = x.shape[-1]
    out = kernel_module().block_step(
        x.reshape(-1, d).contiguous(), block.attn_norm.weight, block.mlp_norm.weight,
        block.attn_norm.eps, weights, kinds, cos.reshape(-1, block.hd).contiguous(),
        sin.reshape(-1, block.hd).contiguous(), block.n_heads, block.n_kv, block.hd, k_cache,
        v_cache, write_rows, write_slots, start, slots, counts, rows, block.hd ** -0.5)
    return out.reshape(x.shape)


def fused_stack(model: LlamaModel) -> tuple[list, list, list, list] | None:
    """(attention norms, MLP norms, weights, kinds) of every block, where all of them can run
    in one compiled call (`fused_layers` of each); None otherwise. Cached on the model and
    checked against the blocks' current modules: BitDelta swaps layers of a loaded model."""
    key = tuple(m for b in model.blocks for m in (b, *b._modules.values()))
    cached = model.__dict__.get("_fused_stack")
    if cached is not None and len(cached[0]) == len(key) and \
            all(a is b for a, b in zip(cached[0], key)):
        return cached[1]
    stack = None
    parts = [fused_layers(b) for b in model.blocks]
    if all(p is not None for p in parts) and len({b.attn_norm.eps for b in model.blocks} |
                                                  {b.mlp_norm.eps for b in model.blocks}) == 1:
        stack = ([b.attn_norm.weight for b in model.blocks], [b.mlp_norm.weight for b in model.blocks],
                 [w for ws, _ in parts for w in ws], [k for _, ks in parts for k in ks])
    model.__dict__["_fused_stack"] = (key, stack)
    return stack


def run_fused_blocks(model: LlamaModel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_all: torch.Tensor, v_all: torch.Tensor, slots: torch.Tensor,
                     counts: torch.Tensor, rows: torch.Tensor = NO_ROWS,
                     write_rows: torch.Tensor = NO_ROWS, write_slots: torch.Tensor = NO_ROWS,
                     start: int = 0, taps: tuple[int, ...] = ()
                     ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Every block of `model` over a step's tokens in compiled calls (`block_step` of each in
    turn, the same bits), caches [L, R, KV, capacity, hd]: x after the last block and the
    outputs of blocks `taps` (in that order); None where some block cannot (the caller then
    runs them one by one). One call for all blocks, or one per stretch between taps (each
    call costs ~20 us of Python). Other arguments as for `block_step`."""
    stack = fused_stack(model)
    if stack is None:
        return None
    b0 = model.blocks[0]
    d = x.shape[-1]
    h = x.reshape(-1, d).contiguous()
    cos, sin = cos.reshape(-1, b0.hd).contiguous(), sin.reshape(-1, b0.hd).contiguous()
    ends = sorted(set(taps) | {len(model.blocks) - 1})
    tapped, first = {}, 0
    for last in ends:
        span = slice(first, last + 1)
        h = kernel_module().blocks_step(
            h, stack[0][span], stack[1][span], b0.attn_norm.eps, stack[2][4 * first:4 * last + 4],
            stack[3][4 * first:4 * last + 4], cos, sin, b0.n_heads, b0.n_kv, b0.hd,
            k_all[span], v_all[span], write_rows, write_slots, start, slots, counts, rows,
            b0.hd ** -0.5)
        tapped[last] = h.reshape(x.shape)
        first = last + 1
    return tapped[ends[-1]], [tapped[i] for i in taps]


def _fuse_row_ops(model: LlamaModel) -> None:
    """Norms and rotary through the compiled kernels, where they are built (a class swap: the
    modules keep their weights and names)."""
    for norm in [model.norm] + [n for b in model.blocks for n in (b.attn_norm, b.mlp_norm)]:
        norm.__class__ = FusedRMSNorm
    for block in model.blocks:
        if block.hd % 2 == 0:
            block.__class__ = CompactBlock


class QuantEmbedding(nn.Module):
    """Embedding rows dequantized as they are looked up (the same bits as the float32 table)."""

    def __init__(self, blocks: torch.Tensor, kind: str):
        super().__init__()
        self.kind = kind
        self.register_buffer("blocks", blocks, persistent=False)
        self.embedding_dim = blocks.shape[1] // BLOCK_BYTES[kind] * BLOCK

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_blocks(self.blocks, self.kind)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_blocks(self.blocks.index_select(0, ids.reshape(-1)), self.kind)
        return rows.reshape(*ids.shape, self.embedding_dim)


@dataclass
class CompactSummary:
    compact_weights: int = 0  # weights kept as quantized blocks
    dense_weights: int = 0    # weights dequantized to float32 (types without a kernel)
    kinds: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensors kept compact

    @property
    def compact_fraction(self) -> float:
        total = self.compact_weights + self.dense_weights
        return self.compact_weights / total if total else 0.0


class _Matrix:
    """One GGUF matrix in HF orientation [out, in]: blocks when a kernel reads its type."""

    def __init__(self, tensor, rows_permuted_for: int | None):
        self.kind = tensor.tensor_type.name
        if self.kind in BLOCK_BYTES:
            data = torch.from_numpy(np.array(tensor.data))  # a copy: the file map can go
        else:
            data = _dequantize(tensor)
        if rows_permuted_for:  # q/k rows: a row permutation moves whole rows of blocks too
            data = unpermute_rope_rows(data, rows_permuted_for)
        self.data = data

    @property
    def compact(self) -> bool:
        return self.kind in BLOCK_BYTES

    def float32(self) -> torch.Tensor:
        return dequantize_blocks(self.data, self.kind) if self.compact else self.data


def _linear(parts: list[_Matrix], bias: torch.Tensor | None, summary: CompactSummary) -> nn.Module:
    """One fused layer from matrices stacked along `out`: compact if they share a kernel type."""
    if all(p.compact for p in parts) and len({p.kind for p in parts}) == 1:
        blocks = parts[0].data if len(parts) == 1 else torch.cat([p.data for p in parts])
        layer = QuantDense(blocks, parts[0].kind, bias)
        summary.compact_weights += layer.in_features * layer.out_features
        summary.kinds[parts[0].kind] = summary.kinds.get(parts[0].kind, 0) + len(parts)
        return layer
    w = torch.cat([p.float32() for p in parts])
    layer = Dense(w.shape[1], w.shape[0], bias=bias is not None)
    layer.weight_t = nn.Parameter(w.t().contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    summary.dense_weights += w.numel()
    return layer


ACTIVATIONS = ("float32", "q8")


def build_compact_llama(cfg: LlamaConfig, gguf_path: str | Path,
                        activations: str = "float32") -> tuple[LlamaModel, CompactSummary]:
    """The lean runtime (CPU) over the GGUF file's blocks. `activations`: "float32" (the
    reference's function), or "q8": every compact matmul's input rounded to int8 blocks, as
    llama.cpp computes (`Q8Dense`), and the KV cache in float16 as llama.cpp keeps it
    (`half_cache_fits`); norms and attention stay float32."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}")
    arch, listed = gguf_tensors(gguf_path, cache_root() / "gguf-index")
    tensors = {hf_tensor_name(t.name): t for t in listed if t.name != _ROPE_FREQS}
    permuted = arch in PERMUTED_ARCHS

    def matrix(name: str, heads: int | None = None) -> _Matrix:
        if name not in tensors:
            raise ModelSourceError(f"{gguf_path} lacks {name}; the file does not fit its config")
        return _Matrix(tensors[name], heads if permuted else None)

    def vector(name: str) -> nn.Parameter:
        return nn.Parameter(_dequantize(tensors[name]), requires_grad=False)

    with torch.device("meta"):
        model = LlamaModel(cfg)
    summary = CompactSummary()
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        att, mlp = p + "self_attn.", p + "mlp."
        block.attn_norm.weight = vector(p + "input_layernorm.weight")
        block.mlp_norm.weight = vector(p + "post_attention_layernorm.weight")
        bias = (torch.cat([_dequantize(tensors[att + n + "_proj.bias"]) for n in "qkv"])
                if cfg.attention_bias else None)
        block.wqkv = _linear([matrix(att + "q_proj.weight", cfg.num_heads),
                              matrix(att + "k_proj.weight", cfg.num_kv_heads),
                              matrix(att + "v_proj.weight")], bias, summary)
        block.wo = _linear([matrix(att + "o_proj.weight")], None, summary)
        block.w_gate_up = _linear([matrix(mlp + "gate_proj.weight"), matrix(mlp + "up_proj.weight")],
                                  None, summary)
        block.w_down = _linear([matrix(mlp + "down_proj.weight")], None, summary)
    model.norm.weight = vector("model.norm.weight")
    embed = matrix("model.embed_tokens.weight")
    if embed.compact:
        model.embed = QuantEmbedding(embed.data, embed.kind)
    else:
        model.embed = nn.Embedding.from_pretrained(embed.data, freeze=True)
    if cfg.tie_word_embeddings:
        model.lm_head = _linear([embed], None, summary)  # shares the embedding's blocks
    else:
        model.lm_head = _linear([matrix("lm_head.weight")], None, summary)
    if activations == "q8":
        _round_activations(model)
        if half_cache_fits(cfg):
            model.kv_dtype = torch.float16
    _leftovers_on_kernels(model)
    _kernel_runtime(model)
    return model.eval().requires_grad_(False), summary


def _leftovers_on_kernels(model: LlamaModel) -> None:
    """Linears of tensor types without a block kernel (F16, Q4_K, ...; dequantized to float32)
    through the dense float32 kernel where it runs, as `dense_on_kernels` runs them: so a
    compact model computes what the dense float32 model computes, bit for bit."""
    if can_run_dense_on_kernels(model):
        _replace_layers(model, Dense, KernelDense)


def half_cache_fits(cfg: LlamaConfig) -> bool:
    """Whether the compiled attention reads a float16 cache for this shape: its register-resident
    loop (`attend_fixed`, asked through the kernel: head sizes 32 / 64 / 128 with at most 8 / 4 /
    2 query heads per kv head). Half the bytes per cached token: at 2,000 tokens of context
    attention reads as much as the weights (compact-q8, the default model)."""
    module = kernel_module()
    return module is not None and module.fixed_attention(cfg.head_dim, cfg.num_heads // cfg.num_kv_heads)


def _round_activations(model: LlamaModel) -> None:
    """Every QuantDense of the blocks and the LM head as a Q8Dense, in place (the blocks in the
    q8 kernel's layout replace the file's; a tied head packs its own copy)."""
    _replace_layers(model, QuantDense, Q8Dense)


def _replace_layers(model: LlamaModel, kind: type, make) -> None:
    """Each block linear and the LM head of exactly class `kind` replaced by `make(layer)`."""
    for block in model.blocks:
        for name in Block.LINEARS:
            if type(getattr(block, name)) is kind:
                setattr(block, name, make(getattr(block, name)))
    if type(model.lm_head) is kind:
        model.lm_head = make(model.lm_head)


def _kernel_runtime(model: LlamaModel) -> None:
    """What every model on the compiled kernels sets: their rows do not depend on the row
    count (plain steps need no padding row), and per-node attention keeps float32 attention
    exact too (measured by `Model.choose_attention` before exact attention is switched on)."""
    cfg = model.config
    model.share_past_blocks = False
    model.pad_plain_steps = False
    model.fused_attention = can_fuse_attention(cfg.head_dim, torch.float32)
    if model.fused_attention and cfg.hidden_size % 16 == 0:
        _fuse_row_ops(model)
        model.run_blocks = run_fused_blocks


def kernels_fit(cfg: LlamaConfig) -> bool:
    """Whether vector kernels (AVX-512 or AVX2) are built here and every linear of a model
    shaped `cfg` fits their dense float32 path (inputs in whole blocks of 32). The scalar build
    keeps the bits invariant but is far slower than MKL."""
    return (vector_kernels() and cfg.hidden_size % BLOCK == 0 and
            cfg.intermediate_size % BLOCK == 0 and cfg.num_heads * cfg.head_dim % BLOCK == 0)


def can_run_dense_on_kernels(model) -> bool:
    """A float32 lean model on a CPU whose shapes the kernels fit (`kernels_fit`)."""
    return (isinstance(model, LlamaModel) and model.dtype == torch.float32 and
            model.device.type == "cpu" and kernels_fit(model.config))


def dense_on_kernels(model: LlamaModel) -> LlamaModel:
    """`model` (dense float32) with every block linear and the LM head as `KernelDense`, and
    norms, rotary and exact attention compiled, in place."""
    for block in model.blocks:
        for name in Block.LINEARS:
            setattr(block, name, KernelDense(getattr(block, name)))
    tied = model.embed.weight if model.config.tie_word_embeddings else None
    if tied is not None and not torch.equal(tied, model.lm_head.weight):
        tied = None  # not the same values after all: keep the head's own copy
    model.lm_head = KernelDense(model.lm_head, tied)  # tied: no second [V, d] copy
    _kernel_runtime(model)
    return model
