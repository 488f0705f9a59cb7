"""Continuous batching: sequences of different lengths advancing together, one forward a step.

`BatchedDecoder` keeps its own KV cache of `rows` x `capacity` slots over a lean `LlamaModel`'s
weights (the model's own cache is left alone). Row r of the cache belongs to the r-th active
sequence and holds `length` committed entries; every sequence has its own length.

    add(prompt)    prefill the prompt alone into a free row (the same ops as a solo prefill),
                   choose the first token: the sequence's root (newest, not yet cached)
    step()         ONE forward over the roots of all active sequences, each at its own
                   position; their K/V are committed at once; one new root per sequence
    speculate(trees)  the same forward with a draft tree after some sequences' roots (each
                   node at position length + depth, seeing its row's past, its ancestors and
                   itself); per sequence the accepted path + bonus, its K/V compacted in place
    remove(seq)    the sequence leaves at once; the last row moves into its place, so active
                   rows are always 0..n-1 and attention reads the cache in place

Exactness (see DESIGN.md): a sequence's tokens must not depend on who else is in the batch.

- exact mode (`model.exact`, bfloat16 by default): attention through `batched_exact_attention`,
  which reduces each row's keys in the fixed 64-position blocks of `models.exact_attention`
  (shorter rows get trailing empty blocks, which add exact zeros); a lone row is computed as
  two identical rows, as the solo plain step is (a one-row matmul rounds differently). So a
  row gets bit for bit the numbers of a solo plain step, as long as a matmul row does not
  depend on the row count between 2 and `rows` (`row_count_invariant` checks the weights).
- exact mode on the compiled kernels (float32 on AVX-512 or AVX2, compact weights: `fused_attention`):
  every token of the step, roots and tree nodes, attends in ONE call of the compiled attention
  (`quant_kernels.batched_logical_attention`) over its own cache row, with the key order of
  its solo plan; the kernels' rows never depend on the row count, so no padding row either.
- otherwise (float32 with SDPA): a lone row runs exactly the solo plain step (fast, and equal
  to `hasten generate`); two or more rows share one masked SDPA call, whose rounding depends
  on the batch, like speculative decoding in this mode ("not exact", rare token differences).

Trees (`speculate`): the step's tokens are one flat batch of rows, each sequence's root then
its nodes, so every matmul row is row-local as above. Roots attend as in `step`; a sequence
with a tree is attended on its own cache row by the model's own `exact_attention` with the
plan the solo verify builds (`plan_keys` over `verify_inputs`' mask), so each node reduces over
its row's committed past, its ancestors and itself, in the solo verify's blocks: it cannot see
another sequence's keys (it reads one row) nor its siblings (the mask). A node's numbers are
then those of the solo verify, which are those of a plain step of its path (the solo engine's
exactness, `decoding/exactness.py`). Acceptance is the solo engine's (`accept_step`), the
accepted slots are packed as `LlamaModel.commit` packs them. SDPA mode: each tree row through
SDPA with its mask, as the solo verify does there (not exact either).

A sequence decoded speculatively alone (on the model's own cache) can join with `adopt`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ContextFullError
from ..models.compact import block_step, fused_layers
from ..models.exact_attention import BLOCK, _block_partials  # the same block arithmetic
from ..models.exact_attention import exact_attention, plan_keys
from ..models.llama import LlamaModel, rope_inv_freq, side_by_side
from ..models.quant_kernels import batched_logical_attention
from .accept import accept_greedy
from .budget import CostCurve
from .engine import accept_step
from .exactness import row_classes
from .sampling import SamplingParams, choose
from .tree import DraftTree, keep_indices, verify_inputs

# Most tokens (roots + tree nodes) in one step: the verify cost curve is measured up to 65
# tokens (beyond it its cost is a guess), and matmul rows are checked row-count invariant up to
# the step's largest row count (`row_count_invariant(model, decoder.max_step_tokens)`).
MAX_STEP_TOKENS = 65


@dataclass(eq=False)  # identity: two sequences with equal fields are still two sequences
class Sequence:
    prompt_len: int
    params: SamplingParams = SamplingParams()
    generator: torch.Generator | None = None
    tenant: int = -1  # BitDelta tenant (row route, see bitdelta.runtime.set_route); -1: base
    length: int = 0  # committed cache entries
    root: int = 0  # the newest token: chosen, not yet in the cache
    tokens: list[int] = field(default_factory=list)  # generated so far, the root last
    typical: bool = False  # Medusa's (lossy) typical acceptance for this sequence's trees
    # [n, d] the target's final hidden states at the positions committed last (the prompt's
    # after `add`): drafters read them (Medusa: the last row; EAGLE: all). None after `adopt`.
    hidden: torch.Tensor | None = None
    # [n, len(taps) d] the outputs of the decoder's tapped layers at the same positions
    # (`BatchedDecoder.taps`; EAGLE heads over several layers read them). None if none.
    taps: torch.Tensor | None = None


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
        self.k = torch.zeros(shape, dtype=model.cache_dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.cache_dtype, device=model.device)
        inv_freq, divisor = rope_inv_freq(cfg)
        angles = torch.outer(torch.arange(self.capacity, dtype=torch.float64) / divisor, inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().to(model.device, model.dtype)
        self.sin = angles.sin().to(model.device, model.dtype)
        self.sequences: list[Sequence] = []
        # Seconds a drafting sequence's own tree attention adds to a step (measured, averaged):
        # `BatchCurve` charges it. The compiled kernels attend the whole step in one call: 0.
        self.tree_attention_seconds = 0.0
        # What steps actually cost here (`BatchCurve`): a step without trees by row count, and
        # what each tree token adds (both EMAs over measured steps; None until seen).
        self.step_seconds: dict[int, float] = {}
        self.tree_token_seconds: float | None = None
        self.max_step_tokens = max(rows, MAX_STEP_TOKENS)  # what `speculate` may carry at most
        self.route_tenants = False  # set by the caller when the model has BitDelta tenants
        # Layers whose outputs every step keeps for its sequences (`Sequence.taps`): set by
        # the caller when a drafter reads them (their union; a copy of a few rows per layer).
        self.taps: tuple[int, ...] = ()

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
        self._route([seq.tenant])
        ids = torch.tensor([prompt], device=m.device)
        cos, sin = self.cos[:t][None, None], self.sin[:t][None, None]
        # Exactly the solo prefill: its plan (compiled blocks, or SDPA: None) and its layers.
        x, taps = m.run_layers(m.embed(ids), cos, sin, self.k[:, row:row + 1],
                               self.v[:, row:row + 1], 0, None, m.prefill_plan(t), self.taps)
        hidden = m.norm(x)  # row-local: the last row is what the solo prefill gets
        logits = m.lm_head(hidden[:, -1:])[0, -1]
        seq.hidden = hidden[0]
        seq.taps = None if taps is None else taps[0]
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

    def step(self) -> list[tuple[Sequence, int]]:
        """Commit every active sequence's root and choose its next one, in one forward."""
        return [(seq, new[-1]) for seq, new in self.speculate()]

    @torch.inference_mode()
    def speculate(self, trees: dict[Sequence, DraftTree] | None = None
                  ) -> list[tuple[Sequence, list[int]]]:
        """ONE forward over every active sequence's root and, for those in `trees`, its draft
        tree; per sequence the tokens it gained (accepted drafts + bonus, the new root last)."""
        seqs = self.sequences
        if not seqs:
            return []
        trees = trees or {}
        start = time.perf_counter()
        step = self._layout([trees.get(s) if trees.get(s) is not None and trees[s].size else None
                             for s in seqs])
        logits, hidden, taps = self._forward(step)
        out = self._accept(step, logits, hidden, taps)  # its host copies wait for the device
        self._measure(len(seqs), sum(t.size for t in step.trees if t is not None),
                      time.perf_counter() - start)
        return out

    def _measure(self, rows: int, nodes: int, seconds: float, weight: float = 0.2) -> None:
        """Fold a step's seconds into `step_seconds` (no tree) or `tree_token_seconds` (its
        excess over a plain step of as many rows, per tree token)."""
        if nodes == 0:
            old = self.step_seconds.get(rows)
            self.step_seconds[rows] = seconds if old is None else old + weight * (seconds - old)
        elif rows in self.step_seconds:
            per = max(0.0, (seconds - self.step_seconds[rows]) / nodes)
            old = self.tree_token_seconds
            self.tree_token_seconds = per if old is None else old + weight * (per - old)

    def _layout(self, trees: list[DraftTree | None]) -> _Step:
        """Where each token of the step goes: sequence r's root, then its tree's nodes."""
        seqs, m = self.sequences, self.model
        full = [s for s, t in zip(seqs, trees) if s.length + 1 + (t.size if t else 0) > self.capacity]
        if full:
            raise ContextFullError(f"a batch row is full ({self.capacity} entries); remove it "
                                   "first or draft less")
        tokens, positions, rows, slots, starts, plans = [], [], [], [], [], []
        for r, (seq, tree) in enumerate(zip(seqs, trees)):
            starts.append(len(tokens))
            t = 1 + (tree.size if tree else 0)
            rows += [r] * t
            slots += range(seq.length, seq.length + t)
            if tree is None:
                tokens.append(seq.root)
                positions.append(seq.length)
                plans.append(None)
                continue
            ids, pos, mask = verify_inputs(tree, seq.root, seq.length)  # the solo verify's
            tokens += ids[0].tolist()
            positions += pos[0].tolist()
            # Exact: the plan the solo verify builds for this mask; SDPA: the mask itself.
            plans.append(plan_keys(mask[0], seq.length, t, m.device, m.share_past_blocks,
                                   m.fused_attention) if m.exact else mask[0].to(m.device))
        # A lone plain row in exact mode is computed as two identical rows, as the solo plain
        # step is: a one-row matmul rounds differently. The copy writes the same K/V to the
        # same slot. (Any tree makes two or more rows already.)
        pad = 1 if m.exact and getattr(m, "pad_plain_steps", True) and len(tokens) == 1 else 0
        tenants = [seqs[r].tenant for r in rows + rows[:pad]]
        as_tensor = lambda values: torch.tensor(values + values[:pad], device=m.device)  # noqa: E731
        return _Step(as_tensor(tokens), as_tensor(positions), as_tensor(rows), as_tensor(slots),
                     starts, trees, plans, pad, tenants)

    def _forward(self, step: _Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits [T, vocab], final hidden states [T, d] and the tapped layers' outputs
        [T, len(taps) d] (or None) of the step's tokens (pad dropped)."""
        m, seqs = self.model, self.sequences
        n = len(seqs)
        self._route(step.tenants)  # one tenant per token: every token is a batch row
        lengths = torch.tensor([s.length for s in seqs], device=m.device)
        plain = not any(step.trees)
        roots = slice(0, n) if plain else torch.tensor(step.starts, device=m.device)
        cos, sin = self.cos[step.positions][:, None, None], self.sin[step.positions][:, None, None]
        x = m.embed(step.tokens[:, None])  # [T, 1, d]: every token its own batch row
        fused = self._fused_keys(step) if m.exact and m.fused_attention else None
        tree_seconds = 0.0
        every = None  # all blocks in one compiled call where they allow: the same bits
        if fused is not None and not step.pad and m.run_blocks is not None:
            every = m.run_blocks(m, x, cos, sin, self.k, self.v, *fused,
                                 write_rows=step.rows, write_slots=step.slots, taps=self.taps)
        if every is not None:
            x, tapped = every
        else:
            x, tapped, tree_seconds = self._blocks_one_by_one(x, cos, sin, step, fused, plain,
                                                              roots, lengths)
        trees = sum(tree is not None for tree in step.trees)
        if trees and fused is None:  # what a tree's own attention calls cost, per step (EMA)
            per_tree = tree_seconds / trees
            self.tree_attention_seconds += 0.2 * (per_tree - self.tree_attention_seconds)
        hidden = m.norm(x)
        # The LM head over every row, the pad copy too: its row count is part of the plain step.
        logits = m.lm_head(hidden)
        t = len(x) - step.pad
        taps = side_by_side(tapped)
        return logits[:t, 0], hidden[:t, 0], None if taps is None else taps[:t, 0]

    def _blocks_one_by_one(self, x, cos, sin, step: _Step, fused, plain: bool, roots,
                           lengths) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        """The blocks in turn (some cannot run in one call with the rest): x after them, the
        outputs of the tapped blocks, and the seconds spent in the trees' own attention."""
        tree_seconds, tapped = 0.0, {}
        for i, block in enumerate(self.model.blocks):
            x, seconds = self._block(i, block, x, cos, sin, step, fused, plain, roots, lengths)
            tree_seconds += seconds
            if i in self.taps:
                tapped[i] = x
        return x, [tapped[i] for i in self.taps], tree_seconds

    def _block(self, i: int, block, x, cos, sin, step: _Step, fused, plain: bool, roots,
               lengths) -> tuple[torch.Tensor, float]:
        """Block i over the step's tokens: x after it, and the seconds its trees' attention took."""
        m = self.model
        layers = fused_layers(block) if fused is not None and not step.pad else None
        if layers is not None:  # the whole block in one compiled call, the same bits
            return block_step(block, layers, x, cos, sin, self.k[i], self.v[i], *fused,
                              write_rows=step.rows, write_slots=step.slots), 0.0
        q, k, v = block.qkv(x, cos, sin)
        self.k[i, step.rows, :, step.slots] = k[:, :, 0].to(self.k.dtype)  # a float16 cache: rounded
        self.v[i, step.rows, :, step.slots] = v[:, :, 0].to(self.v.dtype)
        if fused is not None:  # every token of the step in one compiled call
            attn = batched_logical_attention(q, self.k[i], self.v[i], *fused, block.hd ** -0.5)
            return block.mix(x, attn), 0.0
        # Every root over its committed keys and itself, all rows in one call (tree rows'
        # roots included: recomputed with their trees below, the same numbers in exact mode).
        attn = self._attention(i, q[roots], lengths, m.exact, block)
        seconds = 0.0
        if not plain:
            start = time.perf_counter()
            attn = self._tree_attention(i, q, attn, step, block)
            seconds = time.perf_counter() - start
        return block.mix(x, torch.cat([attn, attn[:step.pad]]) if step.pad else attn), seconds

    def _fused_keys(self, step: _Step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots [T, W], counts [T], rows [T]) of every token of the step for the compiled
        float32 attention: a plain root reads its row's slots 0..length in order, as the solo
        plain step's plan does; a tree's tokens take the solo verify's plan (`step.plans`)."""
        dev = self.model.device
        parts, counts = [], []
        for seq, tree, plan in zip(self.sequences, step.trees, step.plans):
            if tree is None:
                parts.append(torch.arange(seq.length + 1, device=dev)[None])
                counts.append(torch.tensor([seq.length + 1], device=dev))
            else:
                parts.append(plan.tail_slots)
                counts.append(plan.counts)
        width = max(p.shape[1] for p in parts)
        slots = torch.cat([F.pad(p, (0, width - p.shape[1])) for p in parts])
        return slots.contiguous(), torch.cat(counts), step.rows[:len(slots)].contiguous()

    def _tree_attention(self, layer: int, q, root_attn, step: _Step, block) -> torch.Tensor:
        """[T, H, 1, D]: roots of plain rows from `root_attn`; each tree row (root and nodes)
        over its own cache row with its plan, through the solo verify's attention call."""
        m = self.model
        attn = q.new_empty(q.shape[0] - step.pad, *q.shape[1:])
        attn[torch.tensor(step.starts, device=q.device)] = root_attn
        scale = block.hd ** -0.5
        for r, (start, tree, plan) in enumerate(zip(step.starts, step.trees, step.plans)):
            if tree is None:
                continue
            t = 1 + tree.size
            qr = q[start:start + t, :, 0].transpose(0, 1)[None]  # [1, H, t, D], as solo has it
            kr, vr = self.k[layer, r:r + 1], self.v[layer, r:r + 1]
            if m.exact:
                out = exact_attention(qr, kr, vr, plan, scale)
            else:
                end = self.sequences[r].length + t
                out = F.scaled_dot_product_attention(qr, kr[:, :, :end].to(qr.dtype),
                                                     vr[:, :, :end].to(qr.dtype),
                                                     attn_mask=plan[None, None],
                                                     enable_gqa=block.n_kv != block.n_heads)
            attn[start:start + t] = out[0].transpose(0, 1)[:, :, None]
        return attn

    def _attention(self, layer: int, q, lengths, exact: bool, block) -> torch.Tensor:
        """Each row's query over its committed keys and itself (lengths[r] + 1 keys)."""
        if exact:
            return batched_exact_attention(q, self.k[layer], self.v[layer], lengths + 1,
                                           block.hd ** -0.5)
        n, keys = q.shape[0], int(lengths.max()) + 1
        k, v = self.k[layer, :n, :, :keys].to(q.dtype), self.v[layer, :n, :, :keys].to(q.dtype)
        gqa = block.n_kv != block.n_heads
        if n == 1:  # the solo plain step, call for call
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        mask = torch.arange(keys, device=q.device)[None] <= lengths[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None], enable_gqa=gqa)

    def _accept(self, step: _Step, logits: torch.Tensor, hidden: torch.Tensor,
                taps: torch.Tensor | None) -> list[tuple[Sequence, list[int]]]:
        """Per sequence: the solo engine's acceptance over its rows, the accepted K/V packed
        right after its committed entries (the root stays, path node i moves from slot
        length + 1 + i to length + 1 + depth - 1), its new tokens."""
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row
        out, moves = [], []
        for row, (seq, start, tree) in enumerate(zip(self.sequences, step.starts, step.trees)):
            if tree is None:
                path = []
                bonus = greedy[start] if seq.params.greedy else int(
                    choose(logits[start], seq.params, seq.generator))
            elif seq.params.greedy:
                path, bonus = accept_greedy(tree, argmax_ids=greedy[start:start + 1 + tree.size])
            else:
                path, bonus = accept_step(tree, logits[start:start + 1 + tree.size], seq.params,
                                          seq.generator, seq.typical)
            keep = keep_indices(path).tolist()
            moves += [(row, seq.length + j, seq.length + src) for j, src in enumerate(keep)
                      if src != j]
            seq.hidden = hidden[[start + j for j in keep]]
            seq.taps = None if taps is None else taps[[start + j for j in keep]]
            new = [tree.token_list[i] for i in path] + [bonus] if tree else [bonus]
            seq.length += len(keep)
            seq.root = bonus
            seq.tokens += new
            out.append((seq, new))
        if moves:  # gathered before written: sources lie at or after their destinations
            rows, dst, src = (torch.tensor(c, device=self.k.device) for c in zip(*moves))
            self.k[:, rows, :, dst] = self.k[:, rows, :, src]
            self.v[:, rows, :, dst] = self.v[:, rows, :, src]
        return out

    def _route(self, tenants: list[int]) -> None:
        if self.route_tenants:
            from ..bitdelta.runtime import set_route  # noqa: PLC0415 - only with tenants
            set_route(self.model, tenants)


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
    k = k_cache[:n, :, :width].to(dtype).reshape(n, kv, nt, BLOCK, d)
    v = v_cache[:n, :, :width].to(dtype).reshape(n, kv, nt, BLOCK, d)
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
    for dense in [getattr(block, name) for name in block.LINEARS] + [model.lm_head]:
        dense = getattr(dense, "base", dense)  # a layer wrapped by BitDelta: its base
        classes = row_classes(dense, tuple(sizes), trials=4, dtype=model.dtype)  # its own kernel
        if len(classes) > 1:
            return classes
    return None


class _Step(NamedTuple):
    """One step's tokens, flat: sequence r's root at starts[r], then its tree's nodes."""
    tokens: torch.Tensor  # [T + pad] token ids
    positions: torch.Tensor  # [T + pad] RoPE positions (length + depth)
    rows: torch.Tensor  # [T + pad] cache row of each token
    slots: torch.Tensor  # [T + pad] cache slot its K/V goes to (length + index in its tree)
    starts: list[int]
    trees: list[DraftTree | None]  # per sequence; None: a plain step for it
    plans: list  # per sequence with a tree: its KeyPlan (exact) or bool mask (SDPA)
    pad: int  # 1: a lone plain row computed as two rows (see `_layout`)
    tenants: list[int]  # BitDelta tenant per token


class BatchCurve:
    """The verify cost curve as one of `rows` sequences sharing a batched step sees it, for
    its tree-size rule (`budget.AdaptiveTreeSize` / `CalibratedTreeSize` take it as `curve`).

    A batched step of B sequences costs T(B), and each tree token adds t to it; the whole
    batch waits for a sequence's n nodes, so they are charged B times:

        cost(n) = T(B) + B n t

    For sequences that draft alike, maximising gain(n) / cost(n) per sequence then picks the
    size that maximises the batch's tokens per second: trees stay large where tokens are cheap
    (a GPU, bfloat16 on AMX) and shrink, down to none, as the batch grows where they are not.
    With `decoder`, T and t are what its steps measured (`step_seconds`, `tree_token_seconds`):
    on this 2-core EPYC, 8 rows at 400 tokens of context, T = 9.4 ms and t = 0.75 ms, where
    the one-sequence curve c (c(n) = a verify of 1 + n tokens after 128 cached ones)
    says T ~ c(B - 1) = 5.2 and t ~ 0.42. Until a step has measured them, the curve stands in:
    T = c(B - 1), B n t = B (c(B - 1 + n) - c(B - 1)), plus each tree's own attention calls
    (`tree_attention_seconds`) B times. The other sequences' trees are not counted (they are
    not known yet when a size is picked); `share_tokens` caps the step as a whole."""

    def __init__(self, curve: CostCurve, decoder: "BatchedDecoder | None" = None):
        self.curve, self.rows, self.decoder = curve, 1, decoder

    def cost(self, n: int) -> float:
        d, others = self.decoder, self.rows - 1
        base = self.curve.cost(others)
        measured = d.step_seconds.get(self.rows) if d is not None else None
        plain = base if measured is None else measured  # T(B)
        if d is not None and d.tree_token_seconds is not None:
            return plain + self.rows * n * d.tree_token_seconds
        extra = 0.0
        if n and d is not None:
            # A tree in the batch also gets its own attention call per layer, which the
            # one-sequence curve does not contain: charged as measured, for the whole batch.
            extra = self.rows * d.tree_attention_seconds
        return plain + self.rows * (self.curve.cost(others + n) - base) + extra


def share_tokens(sizes: list[int], rows: int, max_tokens: int) -> list[int]:
    """Tree sizes for the drafting sequences of a step of `rows` sequences: as asked, unless
    the step (a root per sequence plus every node) would pass `max_tokens`; then each is cut
    in proportion."""
    room = max(max_tokens - rows, 0)
    total = sum(sizes)
    if total <= room:
        return list(sizes)
    return [size * room // total for size in sizes]
