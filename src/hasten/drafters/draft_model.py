"""A smaller language model (sharing the tokenizer) drafts a greedy chain of tokens.

The draft model keeps its own KV cache. Each proposal first feeds the context tokens it has
not seen yet (the tokens accepted last step, root included), then drafts `depth` tokens one
by one, then rolls its cache back to the context, so next step it re-reads only what was
actually accepted.

`self_draft(target, n_layers)` builds a training-free draft model from the target itself:
its first `n_layers` blocks plus its final norm and LM head (shared weights, own cache).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..decoding.tree import DraftTree
from ..models.backbone import Backbone
from ..models.llama import LlamaModel


class ModelDrafter:
    name = "model"

    def __init__(self, draft: Backbone, depth: int = 4):
        if depth < 1:
            raise ValueError("draft depth must be at least 1")
        self.draft = draft
        self.depth = depth
        self.fed = 0  # context tokens already in the draft model's cache

    def fork(self) -> ModelDrafter:
        """A drafter for another sequence: the same weights, its own cache (`reset` allocates
        it), so two sequences can draft side by side (the server's batch)."""
        draft = copy.copy(self.draft)
        draft._k = draft._v = None  # noqa: SLF001 - a shallow copy would share the cache tensors
        return ModelDrafter(draft, self.depth)

    def reset(self, prompt: list[int], capacity: int | None = None) -> None:
        capacity = capacity or len(prompt) + 4096
        self.draft.reset(1, capacity + self.depth + 1)
        self.fed = 0

    def observe(self, accepted: list[int], hidden: torch.Tensor | None = None) -> None:
        pass  # the context passed to `propose` carries everything

    def propose(self, context: list[int], size: int, hidden: torch.Tensor | None = None) -> DraftTree:
        depth = min(self.depth, size)
        if depth <= 0:
            return DraftTree.empty()
        dev = self.draft.device
        new = torch.tensor([context[self.fed:]], device=dev)
        logits = self.draft.forward(new, last_only=True).logits[0, -1]
        self.draft.commit()
        self.fed = len(context)
        chain = [int(logits.argmax())]
        while len(chain) < depth:
            logits = self.draft.forward(torch.tensor([[chain[-1]]], device=dev)).logits[0, -1]
            self.draft.commit()
            chain.append(int(logits.argmax()))
        self.draft.truncate(self.fed)
        return DraftTree.from_chain(chain)


def self_draft(target: LlamaModel, n_layers: int) -> LlamaModel:
    """The target's first `n_layers` blocks + final norm + LM head, as a model with its own cache."""
    total = target.config.num_layers
    if not 1 <= n_layers < total:
        raise ValueError(f"self-draft layers must be in [1, {total - 1}], got {n_layers}")
    with torch.device("meta"):  # a shell with no weights of its own
        view = LlamaModel(target.config.replace(num_layers=0))
    view.config = target.config.replace(num_layers=n_layers)
    view.embed, view.norm, view.lm_head = target.embed, target.norm, target.lm_head
    view.blocks = nn.ModuleList(list(target.blocks[:n_layers]))
    return view
