"""The EAGLE drafter: the head autoregresses on the target's features; EAGLE-2 dynamic trees.

    observe(tokens, states)   the target's states for newly committed positions (prefill: the
                              whole prompt), kept until the next proposal
    propose(size):
      catch up      one head forward over the pending pairs (f_q, x_{q+1}), into its cache;
                    its last output ~ the root's feature -> depth-1 candidates (top-k)
      expand        per level, the `topk` best frontier nodes by cumulative draft log-prob go
                    through ONE head forward together (each attends to the committed pairs
                    and its own ancestors); each gives top-k children
      rerank        of every candidate, the `size` best by cumulative log-prob (a child never
                    scores above its parent, so the kept set is a tree)

The head's cache keeps the committed pairs across steps; the tree's entries are dropped at
the next catch-up (the accepted tokens come back as real pairs with the target's features).
Drafts are deterministic top-k, so the engine's point-mass rejection rule keeps sampling
lossless, and greedy output is the target's whatever the head guesses.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..decoding.tree import DraftTree
from ..errors import HastenError
from ..medusa.heads import find_for_model, lm_head_weight
from ..models.compact import Q8Dense, QuantDense, linears_on_kernels
from ..models.quant_kernels import (BLOCK, NO_ROWS, Q8_KIND_CODES, fast_int8, kernel_module, linear,
                                    quantize_q8_0, vector_kernels)
from .head import EagleCache, EagleHead, LoadedEagle, is_head_folder, load_head

DEPTH = 6  # draft levels
TOPK = 8  # children per expanded node, and nodes expanded per level


class EagleDrafter:
    name = "eagle"
    cost_per_step = True  # depth head forwards per proposal, whatever size is kept

    def __init__(self, head: EagleHead, embed: torch.Tensor, lm_head: torch.Tensor,
                 depth: int = DEPTH, topk: int = TOPK, use_draft_vocab: bool = True):
        """`embed` and `lm_head`: the target's [V, d] embedding and LM head."""
        self.head = linears_on_kernels(head.eval())  # drafting only: torch's with autograd
        self.depth, self.topk = depth, topk
        dtype = next(head.parameters()).dtype
        vocab = head.draft_vocab if use_draft_vocab and head.draft_vocab.numel() else None
        with torch.no_grad():
            weight = lm_head.detach()
            if vocab is not None:
                vocab = vocab.to(weight.device)
                weight = weight[vocab]
            self.weight = weight.to(dtype).contiguous()  # [Vd, d]
        self.vocab = vocab
        # The target layers the head reads (the engine hands their outputs to `observe`);
        # empty: the last hidden state.
        self.feature_layers = tuple(head.config.feature_layers or ())
        self.lm_head_blocks: nn.Module | None = None  # `quantize_for_drafting`
        self.fused: tuple[list[torch.Tensor], list[int]] | None = None  # likewise
        self.embed = embed.detach()
        self.dtype = dtype
        self.cache: EagleCache | None = None
        self.last_ranks = torch.empty(0, dtype=torch.long)  # rank of each node of the last tree
        # E(n), expected tokens per step with the best n nodes, measured by decoding
        # (`calibrate.py`); the engine's calibrated tree-size rule corrects it online.
        self.expected_lengths: list[float] | None = None

    # ---- the drafter protocol -----------------------------------------------------------

    def reset(self, prompt: list[int], capacity: int) -> None:
        device = self.weight.device
        self.cache = EagleCache(self.head.config, capacity + 1 + self.topk * self.depth,
                                self.dtype, device)
        self.context = list(prompt)
        self.pending: list[torch.Tensor] = []  # target states not yet fed to the head
        self.fed = 0  # committed pairs in the head's cache (= their positions 0 .. fed - 1)
        self.last: torch.Tensor | None = None  # head output of the last committed pair

    def observe(self, accepted: list[int], hidden: torch.Tensor | None = None) -> None:
        self.context.extend(accepted)
        if hidden is not None:
            width = self.head.config.hidden_size * max(1, len(self.feature_layers))
            if hidden.shape[-1] != width:  # a caller that did not tap the head's layers
                raise HastenError(f"the EAGLE head reads features {width} wide (layers "
                                  f"{list(self.feature_layers) or 'last'}), got {hidden.shape[-1]}")
            self.pending.append(hidden.reshape(-1, hidden.shape[-1]))

    @torch.inference_mode()
    def propose(self, context: list[int], size: int, hidden: torch.Tensor | None = None) -> DraftTree:
        if size <= 0 or self.cache is None or not self._catch_up():
            return DraftTree.empty()
        return self._grow(size)

    # ---- steps --------------------------------------------------------------------------

    def _catch_up(self) -> bool:
        """Feed the pending states as pairs (f_q, x_{q+1}); False if the head has nothing."""
        cache = self.cache
        cache.truncate(self.fed)
        if self.pending:
            states = torch.cat(self.pending).to(self.dtype)
            self.pending = []
            n = states.shape[0]
            # The states are those of the n positions before the newest token (see observe).
            first = len(self.context) - 1 - n
            if first != self.fed:  # a position missed (should not happen): start over
                raise HastenError(f"EAGLE drafter out of step: {self.fed} pairs fed, "
                                  f"states start at {first}")
            tokens = torch.tensor(self.context[first + 1:first + 1 + n], device=self.weight.device)
            positions = torch.arange(first, first + n, device=self.weight.device)
            out = self._step(self.embed[tokens].to(self.dtype), states, positions, None)
            self.fed += n
            self.last = out[-1]
        return self.last is not None

    def quantize_for_drafting(self) -> None:
        """Where our vector kernels run (float32 on a CPU with AVX-512 or AVX2): the head's linear
        layers and the draft-vocabulary LM head as Q8_0 blocks, multiplied with int8-rounded
        activations where that is vector code too (`fast_int8`; `Q8Dense`: a level's 8 rows cost little more than one). A
        proposal streams its weights once per level, so a quarter of the bytes is most of its
        cost (5.3 ms -> see the README); drafts need no exactness, and the verify step decides
        every token. On a copy of the head, so the loaded (or trained) one keeps its float32
        weights."""
        if (not vector_kernels() or self.dtype != torch.float32 or
                self.weight.device.type != "cpu" or self.weight.shape[1] % BLOCK):
            return
        int8 = fast_int8()
        self.head = copy.deepcopy(self.head)
        h = self.head
        if int8 and h.config.head_dim % 16 == 0 and all(
                layer.in_features % BLOCK == 0 for layer in (h.q_proj, h.o_proj, h.down_proj)):
            self.fused = fused_head_layers(h)
        for name, sub in list(self.head.named_children()):
            if isinstance(sub, nn.Linear) and sub.bias is None and sub.in_features % BLOCK == 0:
                layer = QuantDense(quantize_q8_0(sub.weight), "Q8_0")
                setattr(self.head, name, Q8Dense(layer) if int8 else layer)
        lm_head = QuantDense(quantize_q8_0(self.weight), "Q8_0")
        self.lm_head_blocks = Q8Dense(lm_head) if int8 else lm_head

    def _step(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
              chains: list[list[int]] | None) -> torch.Tensor:
        """The head over N pairs into its cache (`EagleHead.step`). Pair r attends to the
        committed pairs and to the cache entries chains[r] (its ancestors' and its own, in
        order); chains None: causally, each new pair to all before it. With `fused` layers the
        decoder layer runs as one compiled `block_step` (no input norm, int8 activations,
        attention over each pair's keys in order) instead of ~40 torch ops."""
        cache, n, dev = self.cache, embeds.shape[0], embeds.device
        start = cache.length
        if self.fused is None:
            mask = None
            if chains is not None:
                mask = torch.zeros(n, start + n, dtype=torch.bool, device=dev)
                mask[:, :self.fed] = True
                for r, chain in enumerate(chains):
                    mask[r, chain] = True
            return self.head.step(embeds, features, positions, cache, mask)
        if chains is None:  # pair r: every entry up to its own
            slots = torch.arange(start + n, device=dev).expand(n, -1).contiguous()
            counts = torch.arange(start + 1, start + n + 1, device=dev)
        else:
            slots = torch.arange(self.fed + max(map(len, chains)), device=dev).repeat(n, 1)
            rows = [r for r, chain in enumerate(chains) for _ in chain]
            cols = [self.fed + j for chain in chains for j in range(len(chain))]
            slots[rows, cols] = torch.tensor([e for chain in chains for e in chain], device=dev)
            counts = torch.tensor([self.fed + len(chain) for chain in chains], device=dev)
        head, cfg = self.head, self.head.config
        x = head.fuse(embeds, features)
        cache.reserve(n)
        cos, sin = head.rope(positions, x.dtype)
        norm = head.post_attention_layernorm
        out = kernel_module().block_step(
            x.contiguous(), NO_NORM, norm.weight, norm.eps, self.fused[0], self.fused[1],
            cos.contiguous(), sin.contiguous(), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cache.k[None], cache.v[None], NO_ROWS, NO_ROWS, start, slots, counts, NO_ROWS,
            cfg.head_dim ** -0.5)
        cache.length += n
        return out

    def _logprobs(self, states: torch.Tensor) -> torch.Tensor:
        if self.lm_head_blocks is not None:
            return self.lm_head_blocks(states).log_softmax(-1)
        return linear(states, self.weight).float().log_softmax(-1)

    def _ids(self, top: torch.Tensor) -> torch.Tensor:
        return self.vocab[top] if self.vocab is not None else top

    def _grow(self, size: int) -> DraftTree:
        # The best `size` nodes form a tree, so none lies deeper than `size`, and of each level
        # only the `size` best nodes (and of each node its `size` best children) can be kept:
        # a small tree (a probe of 4) needs fewer and narrower levels, and is the same tree.
        k, dev = min(self.topk, size), self.weight.device
        root_pos = len(self.context) - 1
        # Candidates: token, parent candidate (-1 = the root), depth, cumulative score.
        lp = self._logprobs(self.last[None])[0]
        score, top = lp.topk(min(k, lp.numel()))
        tokens, parents, depths, scores = [self._ids(top)], [torch.full_like(top, -1)], \
            [torch.ones_like(top)], [score]
        frontier = torch.arange(top.numel(), device=dev)  # candidate ids of the last level
        feats = self.last[None].expand(top.numel(), -1)  # parent feature of each frontier node
        slot = {}  # candidate id -> its entry in the head's cache (expanded nodes only)
        count = top.numel()
        for level in range(2, min(self.depth, size) + 1):
            if count >= size and float(scores[-1].max()) < float(torch.cat(scores).topk(size).values[-1]):
                break  # children score below their parents: none could make the cut
            level_scores = scores[-1]
            pick = level_scores.topk(min(k, level_scores.numel())).indices
            chosen = frontier[pick]
            expand_feats = feats[pick]
            all_tokens = torch.cat(tokens)
            all_parents = torch.cat(parents)
            # Each chosen node sees the committed pairs, its ancestors' entries and its own.
            chains = []
            for r, c in enumerate(chosen.tolist()):
                chain, a = [], int(all_parents[c])
                while a >= 0:
                    chain.append(slot[a])
                    a = int(all_parents[a])
                chains.append(chain[::-1] + [self.cache.length + r])  # in slot order
                slot[c] = self.cache.length + r
            # A depth-(level-1) node's pair (parent's feature, its token) sits where the
            # parent's token sits: the root's position for a depth-1 node.
            positions = torch.full((len(chosen),), root_pos + level - 2, device=dev)
            out = self._step(self.embed[all_tokens[chosen]].to(self.dtype), expand_feats,
                             positions, chains)
            lp = self._logprobs(out)  # [k', Vd]
            child_score, child_top = lp.topk(k, dim=-1)
            child_score = child_score + torch.cat(scores)[chosen][:, None]
            tokens.append(self._ids(child_top).reshape(-1))
            parents.append(chosen.repeat_interleave(k))
            depths.append(torch.full((child_top.numel(),), level, device=dev))
            scores.append(child_score.reshape(-1))
            frontier = torch.arange(count, count + child_top.numel(), device=dev)
            feats = out.repeat_interleave(k, dim=0)
            count += child_top.numel()
        tree, self.last_ranks = rerank(torch.cat(tokens), torch.cat(parents), torch.cat(depths),
                                       torch.cat(scores), size)
        return tree


NO_NORM = torch.empty(0)  # `block_step` without an input norm


def fused_head_layers(head: EagleHead) -> tuple[list[torch.Tensor], list[int]]:
    """The head's decoder layer as `block_step` takes it: q/k/v and gate/up concatenated, each
    weight as Q8_0 blocks in the int8-activation layout."""
    def packed(*layers: nn.Linear) -> torch.Tensor:
        weight = torch.cat([layer.weight.detach().float() for layer in layers])
        return Q8Dense(QuantDense(quantize_q8_0(weight), "Q8_0")).blocks
    weights = [packed(head.q_proj, head.k_proj, head.v_proj), packed(head.o_proj),
               packed(head.gate_proj, head.up_proj), packed(head.down_proj)]
    return weights, [Q8_KIND_CODES["Q8_0"]] * 4


def rerank(tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
           scores: torch.Tensor, size: int) -> tuple[DraftTree, torch.Tensor]:
    """The `size` best candidates by cumulative log-prob as a DraftTree (parents first), and
    each node's rank (0 = best). Ties go to the shallower node, so a kept node's parent is
    always kept, and the best n nodes of any tree are a tree."""
    by_depth = torch.sort(depths, stable=True).indices
    best = by_depth[torch.sort(scores[by_depth], descending=True, stable=True).indices][:size]
    rank = torch.sort(depths[best], stable=True).indices
    kept = best[rank]  # breadth-first, best first
    where = torch.full((tokens.numel() + 1,), -1, dtype=torch.long, device=tokens.device)
    where[kept] = torch.arange(kept.numel(), device=tokens.device)
    new_parents = where[parents[kept]]  # parent -1 reads the last slot, which stays -1
    return DraftTree(tokens[kept].cpu(), new_parents.cpu()), rank.cpu()


# ---- finding a head for a model ------------------------------------------------------------

def find_head(model, head: str | Path | None = None, exportable: bool = False) -> LoadedEagle:
    """A head for a `hasten.api.Model`: `head` if given, else `<model folder>/eagle/`, else the
    packaged head whose base model is this one. `exportable`: of the packaged heads, the first
    over the last hidden state (what vLLM's and SGLang's EAGLE-1 drafts read)."""
    usable = (lambda loaded: not loaded.head.config.feature_layers) if exportable else None
    return find_for_model(model, head, "eagle", "hasten.eagle", is_head_folder, load_head,
                          "no EAGLE head for {name}: train one with `hasten train eagle --out "
                          "DIR` and pass it (--eagle-head DIR)", usable)


def embedding_weight(backbone) -> torch.Tensor:
    """The [V, d] input embedding of a backbone (lean runtime or transformers adapter)."""
    embed = getattr(backbone, "embed", None)
    if embed is not None and hasattr(embed, "weight"):
        return embed.weight
    model = getattr(backbone, "model", backbone)
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().weight
    raise HastenError(f"cannot find the input embedding of {type(backbone).__name__}")


def final_norm_weight(backbone) -> torch.Tensor:
    """The weight of a backbone's final norm (ones where it has none we can find)."""
    norm = getattr(backbone, "norm", None)
    if norm is None:
        inner = getattr(getattr(backbone, "model", None), "model", None)
        norm = getattr(inner, "norm", None)
    weight = getattr(norm, "weight", None)
    return weight.detach().float() if weight is not None else torch.ones(backbone.config.hidden_size)


def eagle_drafter(model, head: str | Path | None = None, depth: int | None = None) -> EagleDrafter:
    """The drafter `build_drafter(DraftSpec("eagle"), model)` returns: the head on the model's
    device, in the model's dtype, except on a CPU with our vector kernels: there in float32
    with Q8_0 blocks (`quantize_for_drafting`), which costs a fraction of torch's bfloat16 or
    float16 there (a proposal of 16 nodes for the default model on an AVX-512 CPU without AMX:
    9-13 ms in bfloat16, 2.6-4.3 ms so). Drafts need no exactness: the verify step decides."""
    loaded = find_head(model, head)
    backbone = model.backbone
    native = backbone.dtype in (torch.bfloat16, torch.float16, torch.float32)
    on_kernels = backbone.device.type == "cpu" and vector_kernels()
    dtype = backbone.dtype if native and not on_kernels else torch.float32
    module = loaded.head.to(device=backbone.device, dtype=dtype)
    drafter = EagleDrafter(module, embedding_weight(backbone), lm_head_weight(backbone),
                           depth=depth or DEPTH)
    drafter.expected_lengths = loaded.meta.get("expected_lengths")
    drafter.quantize_for_drafting()
    return drafter
