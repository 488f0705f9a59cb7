"""The generation loop: plain decoding, or speculative decoding with a drafter.

    prefill(prompt) -> logits -> first token = root
    loop:
        tree = drafter.propose(context, size, hidden)       # context ends with the root
        empty tree: the plain step, forward([root])          # no mask, no gather, no copies
        else:       forward([root] + tree.tokens) with tree attention, ONE pass
                    path, bonus = accept(tree, logits)       # greedy / lossless / typical
                    commit(root + path)                      # compact accepted K/V
        emit path tokens + bonus; bonus is the next root

The root is the newest token, not yet in the KV cache. A step whose tree is empty (no drafter,
the drafter found nothing, or the tree size rule turned drafting off) runs exactly the plain
step, so "drafting does not pay" costs what plain decoding costs. While drafting is off, a
cheap drafter's probes are shadow probes: drafted, not verified, and scored against the tokens
plain decoding then produces.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

import torch

from ..models.backbone import Backbone
from .accept import accept, accept_greedy, accept_typical
from .budget import MAX_TREE_SIZE, AdaptiveTreeSize, CalibratedTreeSize, CostCurve, DraftCost, TreeSizer
from .sampling import SamplingParams, choose
from .stats import GenerationStats, cache_capacity
from .tree import DraftTree, keep_indices, verify_inputs


class Drafter(Protocol):
    """Proposes draft trees. Drafters never touch the target's KV cache."""

    name: str

    def reset(self, prompt: list[int], capacity: int) -> None:
        """A new generation starts with this prompt; the target's cache holds `capacity`."""

    def propose(self, context: list[int], size: int, hidden: torch.Tensor | None) -> DraftTree:
        """A tree of at most `size` nodes continuing `context` (prompt + output; its last
        token is the root). `hidden` is the target's last hidden state before the root."""

    def observe(self, accepted: list[int], hidden: torch.Tensor | None = None) -> None:
        """Tokens appended to the context this step (accepted path + bonus). `hidden`
        [n, d]: the target's states at the last n context positions before `accepted`
        (the positions it committed since the last call: the whole prompt after prefill);
        the last row produced `accepted[0]`. Feature drafters (EAGLE) pair them with the
        tokens that follow. A drafter with `feature_layers` (a tuple of layer indices) gets
        the outputs of those layers side by side here instead (`StepOutput.taps`)."""


@torch.inference_mode()
def generate_speculative(backbone: Backbone, drafter: Drafter | None, prompt: list[int],
                         max_new_tokens: int, params: SamplingParams = SamplingParams(),
                         stop_ids: tuple[int, ...] = (), generator: torch.Generator | None = None,
                         max_positions: int = 4096, tree_size: int | None = None,
                         typical: bool = False, sizer: TreeSizer | None = None,
                         stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new token ids as they are accepted. `drafter=None` is plain decoding.

    `tree_size` caps the draft nodes per step (None: `MAX_TREE_SIZE`); with `sizer`, the size
    is re-picked each step (up to the cap) from the measured verify costs and the observed
    acceptance. `typical=True` opts into Medusa's lossy acceptance rule."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    if tree_size is not None and tree_size < 0:
        raise ValueError(f"tree_size must be >= 0, got {tree_size}")
    max_size = 0 if drafter is None else MAX_TREE_SIZE if tree_size is None else tree_size
    start = time.perf_counter()
    # Slack: the root, the tree, and one slot for the copy row of a padded plain step.
    capacity = cache_capacity(len(prompt), max_new_tokens, max_size + 2, max_positions)
    backbone.reset(1, capacity)
    taps = tuple(getattr(drafter, "feature_layers", None) or ())
    tap = {"taps": taps} if taps else {}  # only then: other backbones need not know taps

    def features(out):  # what the drafter reads: the tapped layers, or the last hidden states
        return out.taps if taps else out.hidden

    out = backbone.forward(torch.tensor([prompt], device=backbone.device), last_only=True, **tap)
    backbone.commit()
    hidden = out.hidden[0, -1]
    root = int(choose(out.logits[0, -1], params, generator))
    context = list(prompt) + [root]
    if drafter is not None:
        drafter.reset(list(prompt), capacity)
        drafter.observe([root], features(out)[0])
    shadow: ShadowWalk | None = None
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
        size = min(sizer.size if sizer else max_size, max_size, room)
        t0 = time.perf_counter()
        tree = drafter.propose(context, size, hidden).truncated(size) if size > 0 else None
        if sizer and tree is not None:
            sizer.draft_cost.add(time.perf_counter() - t0, tree.size)
        if tree is not None and shadow is None and _shadow_probe(sizer, drafter):
            # A probe while drafting is off: the drafter's guess is only compared with the
            # tokens plain decoding produces next, never verified, so it costs no forward.
            sizer.probe.shadowed()
            shadow, tree = ShadowWalk(tree), None
        t1 = time.perf_counter()
        if tree is None or tree.size == 0:
            out = backbone.forward(torch.tensor([[root]], device=backbone.device), **tap)
            backbone.commit()
            hidden, fed = out.hidden[0, -1], features(out)[0, -1:]
            path, bonus = [], int(choose(out.logits[0, -1], params, generator))
            t2 = time.perf_counter()
        else:
            out = backbone.forward(*verify_inputs(tree, root, backbone.length, backbone.device),
                                   **tap)
            t2 = time.perf_counter()
            path, bonus = accept_step(tree, out.logits[0], params, generator, typical)
            keep = keep_indices(path)
            backbone.commit(keep)
            keep = keep.to(out.hidden.device)
            hidden, fed = out.hidden[0, keep[-1]], features(out)[0, keep]
        if sizer:
            sizer.update(tree.max_depth if tree else 0, len(path), tree.size if tree else 0)
        t3 = time.perf_counter()
        stats.draft_time += t1 - t0
        stats.verify_time += t2 - t1
        stats.accept_time += t3 - t2
        stats.steps += 1
        new = [tree.token_list[i] for i in path] + [bonus]
        stats.accepted.append(len(new))
        if drafter is not None:
            drafter.observe(new, fed)
            context.extend(new)
        if shadow is not None and shadow.feed(new):
            sizer.shadow(shadow.tree.max_depth, shadow.accepted, shadow.tree.size)
            shadow = None
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


def tree_sizer(drafter, curve: CostCurve, max_size: int = MAX_TREE_SIZE) -> TreeSizer:
    """The per-step tree-size rule for `drafter`: a static tree with measured expected lengths
    (Medusa, EAGLE) is sized from them and corrected by how its drafts do on this text; any
    other from its observed acceptance rate. `curve`: what a verify of n nodes costs."""
    expected = getattr(drafter, "expected_lengths", None)
    # What proposing costs is the drafter's on this machine, not the text's: kept on the
    # drafter across generations, so the next one sizes its first trees with it.
    cost = getattr(drafter, "draft_cost", None)
    if not isinstance(cost, DraftCost):
        cost = DraftCost(per_step=getattr(drafter, "cost_per_step", False))
        try:
            drafter.draft_cost = cost
        except AttributeError:
            pass  # a drafter that takes no attributes: this generation's estimate only
    sizer = (CalibratedTreeSize(curve, expected, max_size, draft_cost=cost) if expected
             else AdaptiveTreeSize(curve, max_size, draft_cost=cost))
    return sizer


def _shadow_probe(sizer: TreeSizer | None, drafter) -> bool:
    return (sizer is not None and sizer.probe.probing and sizer.size > 0
            and getattr(drafter, "cheap", False))


class ShadowWalk:
    """Follows a drafted tree along the tokens actually decoded after it: how many of its
    drafts a verify would have accepted (exactly so for greedy decoding)."""

    def __init__(self, tree: DraftTree):
        self.tree, self.position, self.accepted = tree, 0, 0

    def feed(self, tokens: list[int]) -> bool:
        """Walk on with newly decoded tokens; True once the walk has ended."""
        for token in tokens:
            children = self.tree.children_at(self.position)
            match = next((c for c in children if self.tree.token_list[c] == token), None)
            if match is None:
                return True
            self.accepted += 1
            self.position = match + 1
            if not self.tree.children_at(self.position):
                return True
        return False


def accept_step(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
            generator: torch.Generator | None, typical: bool) -> tuple[list[int], int]:
    """The accepted path and bonus from verify logits [1 + N, vocab], wherever they live.

    Greedy off the CPU takes each row's argmax on the device and moves N + 1 ids; sampling
    reads only the rows along the walked path (the rules move each row they read)."""
    if params.greedy:
        if logits.device.type != "cpu":
            return accept_greedy(tree, argmax_ids=logits.argmax(-1).tolist())
        return accept_greedy(tree, logits)
    if typical:
        return accept_typical(tree, logits, params)
    return accept(tree, logits, params, generator)
