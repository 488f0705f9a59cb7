"""Sparse Medusa trees grown from measured head accuracy.

A tree is a list of *choices*: rank paths such as (0, 2) = "head 0's best token, then head 1's
third best". The node for a choice is accepted (greedy) iff every head along the path ranked
the true continuation exactly there, so

    E[tokens per step] = 1 + sum over nodes of P(node accepted)

(the 1 is the bonus token the verifier always adds). Medusa estimates P(node) as the product
of per-head, per-rank accuracies (heads assumed independent). We also offer the empirical
joint probability measured on held-out rows (heads are far from independent: an easy context
is easy for all of them), smoothed towards the independent estimate where data is thin.

A child is never likelier than its parent, so growing the tree greedily (always add the
likeliest node whose parent is already in) adds nodes in non-increasing probability: every
prefix of the resulting list is the best tree of its size. That is why the list is stored in
this order and why a drafter may truncate it to any budget. Expected length is
non-decreasing in the budget by construction (probabilities are >= 0).
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

import numpy as np

from ..decoding.budget import fastest_size

Choice = tuple[int, ...]


def marginal_accuracy(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """[K, R]: fraction of rows where head k ranked the true token exactly r.

    `ranks` [N, K] holds each head's rank of its target (>= max_rank or < 0 = missed)."""
    ranks = np.asarray(ranks)
    n, k = ranks.shape
    acc = np.zeros((k, max_rank))
    for h in range(k):
        r = ranks[:, h]
        r = r[(r >= 0) & (r < max_rank)]
        acc[h] = np.bincount(r, minlength=max_rank)[:max_rank] / max(n, 1)
    return acc


def independent_prob(acc: np.ndarray) -> Callable[[Choice], float]:
    """Medusa's estimate: the product of per-head accuracies along the path."""
    def prob(c: Choice) -> float:
        p = 1.0
        for h, r in enumerate(c):
            p *= float(acc[h, r])
        return p
    return prob


def joint_prob(ranks: np.ndarray, max_rank: int, smoothing: float = 10.0) -> Callable[[Choice], float]:
    """Empirical P(ranks[:len(c)] == c), shrunk towards the independent estimate with weight
    `smoothing` pseudo-rows (keeps unseen paths above zero, and children <= parents)."""
    ranks = np.asarray(ranks)
    n, k = ranks.shape
    indep = independent_prob(marginal_accuracy(ranks, max_rank))
    hit = (ranks >= 0) & (ranks < max_rank)
    counts: dict[Choice, int] = {}
    for depth in range(1, k + 1):
        ok = hit[:, :depth].all(1)
        if not ok.any():
            break
        keys, freq = np.unique(ranks[ok, :depth], axis=0, return_counts=True)
        for key, f in zip(map(tuple, keys.tolist()), freq.tolist()):
            counts[key] = f

    def prob(c: Choice) -> float:
        return (counts.get(tuple(c), 0) + smoothing * indep(c)) / (n + smoothing)
    return prob


def grow_tree(prob: Callable[[Choice], float], num_heads: int, max_rank: int,
              budget: int) -> tuple[list[Choice], list[float]]:
    """Greedy best-first tree: (choices in the order added, expected_lengths) where
    expected_lengths[n] is E[tokens per step] for the first n choices (n = 0..len)."""
    frontier: list[tuple[float, Choice]] = []
    for r in range(max_rank):
        heapq.heappush(frontier, (-prob((r,)), (r,)))
    choices: list[Choice] = []
    expected = [1.0]
    while frontier and len(choices) < budget:
        neg, c = heapq.heappop(frontier)
        choices.append(c)
        expected.append(expected[-1] + max(0.0, -neg))
        if len(c) < num_heads:
            for r in range(max_rank):
                child = c + (r,)
                heapq.heappush(frontier, (-prob(child), child))
    return choices, expected


def search_tree(ranks: np.ndarray, budget: int = 64, max_rank: int = 10,
                method: str = "joint") -> dict:
    """Tree from measured ranks [N, K]: {"choices", "expected_lengths", "head_accuracy",
    "method"} (everything JSON-ready)."""
    ranks = np.asarray(ranks)
    k = ranks.shape[1]
    acc = marginal_accuracy(ranks, max_rank)
    if method == "joint":
        prob = joint_prob(ranks, max_rank)
    elif method == "independent":
        prob = independent_prob(acc)
    else:
        raise ValueError(f"unknown tree search method {method!r}: joint or independent")
    choices, expected = grow_tree(prob, k, max_rank, budget)
    return {"choices": [list(c) for c in choices], "expected_lengths": [round(e, 4) for e in expected],
            "head_accuracy": [[round(float(a), 4) for a in row] for row in acc], "method": method,
            "rows": int(ranks.shape[0])}


def default_choices(num_heads: int, budget: int = 64, max_rank: int = 10) -> list[Choice]:
    """A reasonable tree for heads with no measurements: top-1 accuracy falling from 0.5 with
    depth and each further rank a third as likely as the one before."""
    acc = np.array([[0.5 * 0.7 ** h * (0.66 * 0.5 ** r) for r in range(max_rank)]
                    for h in range(num_heads)])
    return grow_tree(independent_prob(acc), num_heads, max_rank, budget)[0]


def valid_tree(choices: Sequence[Sequence[int]]) -> bool:
    """Every choice's proper prefix appears earlier in the list, and no choice repeats."""
    seen: set[Choice] = set()
    for c in choices:
        c = tuple(c)
        if not c or c in seen or (len(c) > 1 and c[:-1] not in seen):
            return False
        seen.add(c)
    return True
