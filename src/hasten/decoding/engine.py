"""Speculative decoding: draft a tree, verify it in one forward, keep the longest accepted path.

    prefill(prompt) -> logits -> first token = root
    loop:
        tree = drafter.propose(context, budget, hidden)     # context ends with the root
        forward([root] + tree.tokens) with tree attention   # ONE pass over the whole tree
        path, bonus = accept(tree, logits)                  # greedy / lossless / typical
        commit(root + path)                                 # compact accepted K/V, drop the rest
        emit path tokens + bonus; bonus is the next root

The root is the newest token, not yet in the KV cache. With an empty tree a step is exactly a
plain decoding step, so greedy speculative output equals plain greedy output token for token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

import torch

from ..models.backbone import Backbone
from .accept import accept, accept_greedy, accept_typical
from .budget import AdaptiveBudget, CalibratedBudget
from .generate import GenerationStats, cache_capacity
from .sampling import SamplingParams, choose
from .tree import DraftTree, keep_indices, verify_inputs


class Drafter(Protocol):
    """Proposes draft trees. Drafters never touch the target's KV cache."""

    name: str

    def reset(self, prompt: list[int], capacity: int) -> None:
        """A new generation starts with this prompt; the target's cache holds `capacity`."""

    def propose(self, context: list[int], budget: int, hidden: torch.Tensor | None) -> DraftTree:
        """A tree of at most `budget` nodes continuing `context` (prompt + output; its last
        token is the root). `hidden` is the target's last hidden state before the root."""

    def observe(self, accepted: list[int]) -> None:
        """Tokens appended to the context this step (accepted path + bonus)."""


@torch.inference_mode()
def generate_speculative(backbone: Backbone, drafter: Drafter, prompt: list[int],
                         max_new_tokens: int, params: SamplingParams = SamplingParams(),
                         stop_ids: tuple[int, ...] = (), generator: torch.Generator | None = None,
                         max_positions: int = 4096, tree_budget: int = 8, typical: bool = False,
                         adaptive: AdaptiveBudget | CalibratedBudget | None = None,
                         stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new token ids as they are accepted. `typical=True` opts into Medusa's lossy rule.

    `tree_budget` caps the draft nodes per step; with `adaptive`, the budget is re-picked each
    step (up to `tree_budget`) from the measured verify costs and the observed acceptance."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    start = time.perf_counter()
    capacity = cache_capacity(len(prompt), max_new_tokens, tree_budget + 1, max_positions)
    backbone.reset(1, capacity)
    out = backbone.forward(torch.tensor([prompt], device=backbone.device), last_only=True)
    backbone.commit()
    hidden = out.hidden[0, -1]
    root = int(choose(out.logits[0, -1], params, generator))
    context = list(prompt) + [root]
    drafter.reset(list(prompt), capacity)
    drafter.observe([root])
    stats.new_tokens = 1
    stats.time_to_first_token = stats.total_time = time.perf_counter() - start
    yield root
    if root in stop_ids:
        stats.finish_reason = "stop"
    while not stats.finish_reason:
        if stats.new_tokens >= max_new_tokens:
            stats.finish_reason = "length"
            break
        room = backbone.capacity - backbone.length - 1  # slots left after the root
        if room < 0:
            stats.finish_reason = "context"
            break
        budget = min(adaptive.budget if adaptive else tree_budget, tree_budget, room)
        t0 = time.perf_counter()
        tree = drafter.propose(context, budget, hidden).truncated(budget)
        t1 = time.perf_counter()
        inputs = verify_inputs(tree, root, backbone.length, backbone.device)
        out = backbone.forward(*inputs)
        if params.greedy and out.logits.device.type != "cpu":
            # Greedy on a GPU: take each row's argmax there and move N + 1 ids to the host,
            # not N + 1 vocabulary-wide rows.
            path, bonus = accept_greedy(tree, argmax_ids=out.logits[0].argmax(-1).tolist())
            t2 = time.perf_counter()
        else:
            logits = out.logits[0].float() if out.logits.element_size() < 4 else out.logits[0]
            logits = logits.cpu()
            t2 = time.perf_counter()
            if typical and not params.greedy:
                path, bonus = accept_typical(tree, logits, params)
            else:
                path, bonus = accept(tree, logits, params, generator)
        keep = keep_indices(path)
        backbone.commit(keep.to(backbone.device))
        hidden = out.hidden[0, int(keep[-1])]
        if adaptive:
            adaptive.update(tree.max_depth, len(path), tree.size)
        t3 = time.perf_counter()
        stats.draft_time += t1 - t0
        stats.verify_time += t2 - t1
        stats.accept_time += t3 - t2
        stats.steps += 1
        new = [tree.token_list[i] for i in path] + [bonus]
        stats.accepted.append(len(new))
        drafter.observe(new)
        context.extend(new)
        for token in new:
            stats.new_tokens += 1
            stats.total_time = time.perf_counter() - start
            yield token
            if token in stop_ids:
                stats.finish_reason = "stop"
                break
            if stats.new_tokens >= max_new_tokens:
                stats.finish_reason = "length"
                break
        root = bonus
    stats.total_time = time.perf_counter() - start
