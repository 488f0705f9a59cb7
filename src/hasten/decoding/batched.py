"""Continuous batching: sequences of different lengths advancing together, one forward a step.

`BatchedDecoder` keeps its own KV cache of `rows` x `capacity` slots over a lean `LlamaModel`'s
weights (the model's own cache is left alone). Row r of the cache belongs to the r-th active
sequence and holds `length` committed entries; every sequence has its own length.

    add(prompt)    prefill the prompt alone into a free row (the same ops as a solo prefill),
                   choose the first token: the sequence's root (newest, not yet cached)
    step()         ONE forward over the roots of all active sequences, each at its own
                   position; their K/V are committed at once; one new root per sequence
    remove(seq)    the sequence leaves at once; the last row moves into its place, so active
                   rows are always 0..n-1 and attention reads the cache in place

Exactness (see DESIGN.md): a sequence's tokens must not depend on who else is in the batch.

- exact mode (`model.exact`, bfloat16 by default): attention through `batched_exact_attention`,
  which reduces each row's keys in the fixed 64-position blocks of `models.exact_attention`
  (shorter rows get trailing empty blocks, which add exact zeros); a lone row is computed as
  two identical rows, as the solo plain step is (a one-row matmul rounds differently). So a
  row gets bit for bit the numbers of a solo plain step, as long as a matmul row does not
  depend on the row count between 2 and `rows` (`row_count_invariant` checks the weights).
- otherwise (float32 with SDPA): a lone row runs exactly the solo plain step (fast, and equal
  to `hasten generate`); two or more rows share one masked SDPA call, whose rounding depends
  on the batch, like speculative decoding in this mode ("not exact", rare token differences).

Speculative trees are not verified inside the batch: every sequence decodes plain. A sequence
decoded speculatively alone (on the model's own cache) can join with `adopt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ContextFullError
from ..models.exact_attention import BLOCK, _block_partials  # the same block arithmetic
from ..models.exact_attention import exact_attention, plan_keys
from ..models.llama import LlamaModel, rope_inv_freq
from .exactness import row_classes
from .sampling import SamplingParams, choose


@dataclass(eq=False)  # identity: two sequences with equal fields are still two sequences
class Sequence:
    prompt_len: int
    params: SamplingParams = SamplingParams()
    generator: torch.Generator | None = None
    tenant: int = -1  # BitDelta tenant (row route, see bitdelta.runtime.set_route); -1: base
    length: int = 0  # committed cache entries
    root: int = 0  # the newest token: chosen, not yet in the cache
    tokens: list[int] = field(default_factory=list)  # generated so far, the root last


class BatchedDecoder:
    def __init__(self, model: LlamaModel, rows: int, capacity: int):
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        cfg = model.config
        self.model, self.rows = model, rows
        # Whole blocks, so exact attention reads every row's last block in place.
        self.capacity = -(-capacity // BLOCK) * BLOCK
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, self.capacity, cfg.head_dim)
        # Zeros, not empty: masked keys get weight exactly 0, and 0 * NaN would still be NaN.
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        inv_freq, divisor = rope_inv_freq(cfg)
        angles = torch.outer(torch.arange(self.capacity, dtype=torch.float64) / divisor, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().to(model.device, model.dtype)
        self.sin = angles.sin().to(model.device, model.dtype)
        self.sequences: list[Sequence] = []
        self.route_tenants = False  # set by the caller when the model has BitDelta tenants

    @property
    def free(self) -> int:
        return self.rows - len(self.sequences)

    # ---- joining and leaving ----------------------------------------------------------------

    @torch.inference_mode()
    def add(self, prompt: list[int], params: SamplingParams = SamplingParams(),
            generator: torch.Generator | None = None, tenant: int = -1) -> Sequence:
        """Prefill `prompt` into a free row; the sequence's first token is `seq.root`."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if not self.free:
            raise RuntimeError(f"all {self.rows} rows are busy")
        if len(prompt) >= self.capacity:
            raise ContextFullError(f"the prompt has {len(prompt)} tokens; a batch row holds "
                                   f"{self.capacity}")
        seq = Sequence(len(prompt), params, generator, tenant)
        row = len(self.sequences)
        m, t = self.model, len(prompt)
        self._route([seq])
        ids = torch.tensor([prompt], device=m.device)
        cos, sin = self.cos[:t][None, None], self.sin[:t][None, None]
        x = m.embed(ids)
        for i, block in enumerate(m.blocks):  # exactly the solo prefill: SDPA, causal
            x = block(x, cos, sin, self.k[i, row:row + 1], self.v[i, row:row + 1], 0, None)
        logits = m.lm_head(m.norm(x)[:, -1:])[0, -1]
        seq.length, seq.root = t, int(choose(logits, params, generator))
        seq.tokens.append(seq.root)
        self.sequences.append(seq)
        return seq

    @torch.inference_mode()
    def adopt(self, solo: LlamaModel, tokens: list[int], prompt_len: int,
              params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
              tenant: int = -1) -> Sequence:
        """A sequence decoded so far on `solo` (a backbone with the same weights and one cache
        row, e.g. by speculative decoding) joins the batch: its committed cache is copied into
        a free row; `tokens` are those generated so far, the last one the root (not cached)."""
        if not self.free:
            raise RuntimeError(f"all {self.rows} rows are busy")
        length = solo.length
        if length + 1 > self.capacity:
            raise ContextFullError(f"a sequence of {length} entries does not fit a batch row")
        row = len(self.sequences)
        self.k[:, row, :, :length] = solo._k[:, 0, :, :length]  # noqa: SLF001 - the solo cache
        self.v[:, row, :, :length] = solo._v[:, 0, :, :length]  # noqa: SLF001
        seq = Sequence(prompt_len, params, generator, tenant, length, tokens[-1], list(tokens))
        self.sequences.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        """`seq` leaves; the last row's cache moves into its row (only its committed part)."""
        row = self.sequences.index(seq)
        last = len(self.sequences) - 1
        if row != last:
            moved = self.sequences[last]
            self.k[:, row, :, :moved.length] = self.k[:, last, :, :moved.length]
            self.v[:, row, :, :moved.length] = self.v[:, last, :, :moved.length]
            self.sequences[row] = moved
        self.sequences.pop()

    # ---- one step for everyone ----------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int]]:
        """Commit every active sequence's root and choose its next one, in one forward."""
        seqs = self.sequences
        if not seqs:
            return []
        full = [s for s in seqs if s.length + 1 > self.capacity]
        if full:
            raise ContextFullError(f"a batch row is full ({self.capacity} entries); remove it first")
        m = self.model
        n = len(seqs)
        # A lone row in exact mode is computed as two identical rows, as the solo plain step
        # is: a one-row matmul rounds differently. The copy writes the same K/V to the same slot.
        pad = 1 if m.exact and getattr(m, "pad_plain_steps", True) and n == 1 else 0
        lengths = torch.tensor([s.length for s in seqs], device=m.device)
        tokens = torch.tensor([[s.root] for s in seqs] + [[seqs[0].root]] * pad, device=m.device)
        slots = torch.cat([lengths, lengths[:pad]])
        index = torch.tensor(list(range(n)) + [0] * pad, device=m.device)  # cache row per row
        self._route(seqs + seqs[:pad])
        cos, sin = self.cos[slots][:, None, None], self.sin[slots][:, None, None]
        x = m.embed(tokens)
        for i, block in enumerate(m.blocks):
            q, k, v = block.qkv(x, cos, sin)
            self.k[i, index, :, slots] = k[:, :, 0]
            self.v[i, index, :, slots] = v[:, :, 0]
            attn = self._attention(i, q[:n], lengths, m.exact, block)
            x = block.mix(x, torch.cat([attn, attn[:pad]]) if pad else attn)
        logits = m.lm_head(m.norm(x))[:n, 0]
        return self._choose(logits)

    def _attention(self, layer: int, q, lengths, exact: bool, block) -> torch.Tensor:
        """Each row's query over its committed keys and itself (lengths[r] + 1 keys)."""
        if exact and getattr(self.model, "fused_attention", False):
            return self._attention_row_by_row(layer, q, lengths, block)
        if exact:
            return batched_exact_attention(q, self.k[layer], self.v[layer], lengths + 1,
                                           block.hd ** -0.5)
        n, keys = q.shape[0], int(lengths.max()) + 1
        k, v = self.k[layer, :n, :, :keys], self.v[layer, :n, :, :keys]
        gqa = block.n_kv != block.n_heads
        if n == 1:  # the solo plain step, call for call
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        mask = torch.arange(keys, device=q.device)[None] <= lengths[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None], enable_gqa=gqa)

    def _attention_row_by_row(self, layer: int, q, lengths, block) -> torch.Tensor:
        """Rows one at a time through the model's own exact attention, with the plan of a solo
        plain step: for attention kernels (the compiled one of compact weights) whose arithmetic
        `batched_exact_attention` does not reproduce. Slower (a call per row and layer)."""
        m = self.model
        out = []
        for r, length in enumerate(lengths.tolist()):
            plan = plan_keys(None, length, 1, q.device, m.share_past_blocks, m.fused_attention)
            out.append(exact_attention(q[r:r + 1], self.k[layer, r:r + 1], self.v[layer, r:r + 1],
                                       plan, block.hd ** -0.5))
        return torch.cat(out)

    def _choose(self, logits: torch.Tensor) -> list[tuple[Sequence, int]]:
        seqs = self.sequences
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row
        out = []
        for r, seq in enumerate(seqs):
            token = greedy[r] if seq.params.greedy else int(choose(logits[r], seq.params,
                                                                  seq.generator))
            seq.length += 1
            seq.root = token
            seq.tokens.append(token)
            out.append((seq, token))
        return out

    def _route(self, seqs: list[Sequence]) -> None:
        if self.route_tenants:
            from ..bitdelta.runtime import set_route  # noqa: PLC0415 - only with tenants
            set_route(self.model, [s.tenant for s in seqs])


def batched_exact_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            keys: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row, q [n, H, 1, D], over the first keys[r] slots of its cache row
    (k/v [rows, KV, capacity, D], capacity a multiple of BLOCK) -> [n, H, 1, D].

    The arithmetic of `exact_attention` for a plain step (every key gathered, fixed blocks,
    blocks combined by a sequential scan), with all rows in each call: rows read as many blocks
    as the longest needs, and the extra blocks are empty (weight 0), adding exact zeros."""
    n, heads, _, d = q.shape
    kv = k_cache.shape[1]
    group = heads // kv
    dtype = q.dtype
    nt = -(-int(keys.max()) // BLOCK)
    width = nt * BLOCK
    qg = (q * scale).reshape(n, kv, group, d)[:, :, None]  # [n, KV, 1, G, D]
    k = k_cache[:n, :, :width].reshape(n, kv, nt, BLOCK, d)
    v = v_cache[:n, :, :width].reshape(n, kv, nt, BLOCK, d)
    scores = (qg @ k.transpose(-1, -2)).float()  # [n, KV, nt, G, B]
    hidden = torch.arange(width, device=q.device)[None] >= keys[:, None]  # [n, W]
    scores.masked_fill_(hidden.reshape(n, 1, nt, 1, BLOCK), float("-inf"))
    m, l_, o = _block_partials(scores, v, dtype)  # [n, KV, nt, G], same, [n, KV, nt, G, D]
    w = torch.exp(m - m.amax(2, keepdim=True))
    total = (w * l_).cumsum(2)[:, :, -1]  # [n, KV, G]
    out = (w[..., None] * o).cumsum(2)[:, :, -1] / total[..., None]  # [n, KV, G, D]
    return out.to(dtype).reshape(n, heads, 1, d)


def row_count_invariant(model: LlamaModel, rows: int) -> list[list[int]] | None:
    """None if a row of each of the model's matmuls (block 0's and the LM head) comes out the
    same whatever the row count in 2..rows, else the row-count classes of the first that
    differs: then batched answers may differ from solo ones in rare tokens."""
    sizes = sorted({2, 3, 4, 5, 8, 9, 16, 17, 24, 32, 33, 48, 64, rows} & set(range(2, rows + 1)))
    if len(sizes) < 2:
        return None
    block = model.blocks[0]
    for dense in (block.wqkv, block.wo, block.w_gate_up, block.w_down, model.lm_head):
        dense = getattr(dense, "base", dense)  # a layer wrapped by BitDelta: its base
        weight = getattr(dense, "weight_t", None)  # [in, out] (see models.llama.Dense)
        if weight is None:
            continue
        classes = row_classes(weight, tuple(sizes), trials=4)
        if len(classes) > 1:
            return classes
    return None
