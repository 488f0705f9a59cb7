"""E(n): expected tokens per step when the EAGLE tree keeps its best n nodes, measured by decoding.

The engine's calibrated tree-size rule (`decoding.budget.CalibratedTreeSize`) picks n each step
from E(n) and the measured verify costs, correcting E online by what this text achieves. E is
measured once, after training, by generating held-out prompts with the largest tree: the best
n nodes of a reranked tree are themselves a tree (see `drafter.rerank`), so one run gives every
n at once, the accepted path counted up to its first node ranked n or worse.
"""

from __future__ import annotations

import torch

from ..decoding.engine import generate_speculative
from .drafter import EagleDrafter


class _RankCounter:
    """Wraps a drafter; after each verify, counts the accepted drafts inside the best n nodes."""

    def __init__(self, drafter: EagleDrafter, max_size: int):
        self.inner, self.max_size = drafter, max_size
        self.name = drafter.name
        self.feature_layers = drafter.feature_layers  # the engine taps what the head reads
        self.within = [0] * (max_size + 1)  # summed over steps: accepted drafts ranked < n
        self.steps = 0
        self.tree = None

    def reset(self, prompt, capacity):
        self.inner.reset(prompt, capacity)
        self.tree = None

    def propose(self, context, size, hidden=None):
        self.tree = self.inner.propose(context, size, hidden)
        return self.tree

    def observe(self, accepted, hidden=None):
        if self.tree is not None:
            self.steps += 1
            ranks, position = [], 0
            for token in accepted[:-1]:  # the accepted drafts, root to leaf
                node = next(c for c in self.tree.children_at(position) if self.tree.token_list[c] == token)
                ranks.append(int(self.inner.last_ranks[node]))
                position = node + 1
            for n in range(self.max_size + 1):
                self.within[n] += sum(1 for r in ranks if r < n)
            self.tree = None
        self.inner.observe(accepted, hidden)


@torch.inference_mode()
def measure_expected_lengths(backbone, drafter: EagleDrafter, prompts: list[list[int]],
                             max_new_tokens: int = 64, max_size: int = 64,
                             stop_ids: tuple[int, ...] = ()) -> list[float]:
    """E(0..max_size) over greedy decoding of `prompts` with `max_size`-node trees."""
    counter = _RankCounter(drafter, max_size)
    for prompt in prompts:
        for _ in generate_speculative(backbone, counter, prompt, max_new_tokens, stop_ids=stop_ids,
                                      tree_size=max_size):
            pass
    steps = max(counter.steps, 1)
    return [round(1.0 + w / steps, 4) for w in counter.within]
