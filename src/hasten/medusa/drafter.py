"""The Medusa drafter: heads on the target's last hidden state -> a static-shape token tree.

    hidden (the state that produced the root)            [d]
      -> residual blocks of the heads the tree needs     [K', d]   (one bmm per layer)
      -> ONE matmul with the (shared or draft) vocabulary [K', V]
      -> top-k per head, gathered into the tree's nodes

The tree is the stored `choices` list (best first, see `tree_search.py`) cut to the step's
size, so any size the engine picks is the best tree of that size. Only the heads and
ranks that cut uses are computed. The drafter is stateless across steps.

A reduced draft vocabulary (the heads' `draft_vocab`: the most frequent tokens of the
distilled answers) projects onto Vd rows instead of V, EAGLE-3 style: far cheaper on a CPU,
and a draft token outside it simply is never proposed (output stays exact: only the verifier
decides what is emitted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..decoding.tree import DraftTree
from ..errors import HastenError
from .heads import (LoadedHeads, MedusaHeads, find_for_model, is_heads_folder, lm_head_weight,
                    load_heads, project)
from .tree_search import default_choices


@dataclass(frozen=True)
class _Plan:
    heads: int  # how many heads the cut tree uses
    ranks: int  # how many ranks per head it uses
    head_index: torch.Tensor  # [N] head of each node, in DraftTree.from_choices order
    rank_index: torch.Tensor  # [N] rank of each node
    parents: torch.Tensor  # [N]


class MedusaDrafter:
    name = "medusa"
    cheap = True  # proposing costs no forward of the model: probes can be shadow probes

    def __init__(self, heads: MedusaHeads, choices=None, lm_head: torch.Tensor | None = None,
                 use_draft_vocab: bool = True, expected_lengths: list[float] | None = None):
        """`lm_head`: the base model's [V, d] LM head (needed when the heads share it).
        `choices`: the tree, best node first (default: a generic tree for K heads)."""
        self.heads = heads.eval()
        k = heads.config.num_heads
        choices = [tuple(int(r) for r in c) for c in (choices or default_choices(k))]
        if any(len(c) > k for c in choices):
            raise HastenError(f"the tree has paths deeper than the {k} heads")
        self.choices = choices
        self.expected_lengths = expected_lengths
        vocab = heads.draft_vocab if use_draft_vocab else None
        self.vocab = vocab
        with torch.no_grad():
            weight = heads.projection(lm_head)
            if vocab is not None:  # keep only the draft vocabulary's rows, contiguous
                vocab = vocab.to(weight.device)
                weight = (weight[vocab] if weight.dim() == 2 else weight[:, vocab]).contiguous()
                self.vocab = vocab
        self.weight = weight.detach()
        self._plans: dict[int, _Plan] = {}

    def reset(self, prompt: list[int], capacity: int | None = None) -> None:
        pass

    def observe(self, accepted: list[int], hidden: torch.Tensor | None = None) -> None:
        pass

    def plan(self, size: int) -> _Plan:
        """Where each node of the first `size` choices takes its token from."""
        plan = self._plans.get(size)
        if plan is None:
            cut = self.choices[:size]
            heads = max((len(c) for c in cut), default=0)
            ranks = max((r for c in cut for r in c), default=-1) + 1
            # Build the tree once with code tokens (head * ranks + rank), so node order and
            # parents are exactly what `DraftTree.from_choices` gives for real tokens.
            codes = [[h * ranks + r for r in range(ranks)] for h in range(heads)]
            tree = DraftTree.from_choices(cut, codes) if cut else DraftTree.empty()
            plan = _Plan(heads, ranks, tree.tokens // max(ranks, 1), tree.tokens % max(ranks, 1),
                         tree.parents)
            self._plans[size] = plan
        return plan

    @torch.inference_mode()
    def topk(self, hidden: torch.Tensor, num_heads: int, k: int) -> torch.Tensor:
        """[num_heads, k] token ids: each head's best k guesses for `hidden` [d]."""
        states = self.heads.transform(hidden.to(self.heads.weight.dtype), num_heads)  # [K', d]
        logits = project(states.to(self.weight.dtype), self.weight)  # [K', Vd]
        top = logits.topk(k, dim=-1).indices
        if self.vocab is not None:
            top = self.vocab[top]
        return top

    def propose(self, context: list[int], size: int, hidden: torch.Tensor | None) -> DraftTree:
        if hidden is None or size <= 0 or not self.choices:
            return DraftTree.empty()
        plan = self.plan(size)
        top = self.topk(hidden.reshape(-1), plan.heads, plan.ranks).cpu()
        return DraftTree(top[plan.head_index, plan.rank_index], plan.parents)


# ---- finding heads for a model ---------------------------------------------------------------

def find_heads(model, heads: str | Path | None = None) -> LoadedHeads:
    """Heads for a `hasten.api.Model`: `heads` if given, else `<model folder>/medusa/` (where
    Medusa-2 training puts them), else the packaged heads whose base model is this one."""
    return find_for_model(model, heads, "medusa", "hasten.medusa", is_heads_folder, load_heads,
                          "no Medusa heads for {name}: train them with `hasten distill` + "
                          "`hasten train medusa` and pass the output folder (--medusa-heads DIR)")


def medusa_drafter(model, heads: str | Path | None = None, use_draft_vocab: bool = True) -> MedusaDrafter:
    """The drafter `build_drafter(DraftSpec("medusa"), model)` returns."""
    loaded = find_heads(model, heads)
    return MedusaDrafter(loaded.heads, loaded.choices, lm_head_weight(model.backbone),
                         use_draft_vocab, loaded.meta.get("expected_lengths"))
