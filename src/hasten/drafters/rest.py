"""REST (retrieval-based speculative decoding): draft what followed the context in a corpus.

Each step takes the longest suffix of the context (from `max_suffix` tokens down to
`min_suffix`) that occurs in the datastore, reads up to `max_occurrences` of its continuations
(evenly spread over the occurrences when there are more), `depth` tokens each and never past
the end of a document, and merges them into a trie in which a node's weight is the number of
continuations passing through it: an estimate of the chance that the model accepts it.

`backoff` > 0 departs from the paper: the continuations of the next `backoff` shorter
suffixes join the trie too, like a back-off n-gram model (an occurrence of the longest match
is also one of every shorter suffix, so it counts once per level, and longer matches weigh
more). The longest match is often rare and a single chain; the shorter ones add the common
alternatives. `RestDrafter(store, min_suffix=2, backoff=0)` is REST as published. Measured
offline as the tokens per step a greedy verifier would accept if the model wrote the reference
text, published REST -> these defaults: HumanEval canonical solutions on the stdlib datastore
1.60 -> 1.92 at 32 nodes, 1.50 -> 1.67 at 8; MT-Bench reference answers on the ShareGPT
datastore 1.47 -> 1.74 at 32, 1.37 -> 1.55 at 8.

Pruning to the engine's size keeps the `size` heaviest nodes. That set is a valid tree on
its own: a parent weighs at least as much as each child (every continuation through the child
passes through the parent) and ties go to the shallower node, so a node never outranks its
parent. It also maximises the expected accepted length under the retrieved distribution,
which is the sum of the kept nodes' acceptance chances.

The continuations come out of the suffix array already in lexicographic order, so the trie is
built with a few array operations (no per-token Python loop); `pruned_trie` is the same
definition written plainly for arbitrary sequences and weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..datastore.store import Datastore
from ..decoding.tree import DraftTree


class RestDrafter:
    name = "rest"
    cheap = True  # proposing costs no forward of the model: probes can be shadow probes

    def __init__(self, datastore: Datastore | str | os.PathLike, max_suffix: int = 16,
                 min_suffix: int = 1, max_occurrences: int = 64, depth: int = 12,
                 backoff: int = 4):
        if not 1 <= min_suffix <= max_suffix:
            raise ValueError("need 1 <= min_suffix <= max_suffix")
        if max_occurrences < 1 or depth < 1 or backoff < 0:
            raise ValueError("max_occurrences and depth must be at least 1, backoff at least 0")
        if not isinstance(datastore, Datastore):
            datastore = Datastore.open(datastore)
        self.datastore = datastore
        self.max_suffix, self.min_suffix = max_suffix, min_suffix
        self.max_occurrences, self.depth, self.backoff = max_occurrences, depth, backoff
        self.lookups = self.hits = self.matched_tokens = 0  # for reports: how often REST drafts

    def reset(self, prompt: list[int], capacity: int | None = None) -> None:
        pass  # stateless: every proposal reads the context it is given

    def observe(self, accepted: list[int], hidden: torch.Tensor | None = None) -> None:
        pass

    def propose(self, context: list[int], size: int,
                hidden: torch.Tensor | None = None) -> DraftTree:
        if size <= 0:
            return DraftTree.empty()
        store = self.datastore
        self.lookups += 1
        tail = context[-self.max_suffix:]
        m, lo, hi = store.longest_match(tail, self.max_suffix, self.min_suffix)
        depth = min(self.depth, size)
        while m:
            starts = [store.sample(lo, hi, self.max_occurrences) + m]
            for shorter in range(m - 1, max(m - 1 - self.backoff, self.min_suffix - 1), -1):
                lo2, hi2 = store.find(tail[-shorter:])
                starts.append(store.sample(lo2, hi2, self.max_occurrences) + shorter)
            rows = store.read(np.concatenate(starts), depth)
            tree = continuation_tree(rows, size, store.separator)
            if tree.size:
                self.hits += 1
                self.matched_tokens += m
                return tree
            if m <= self.min_suffix:  # every occurrence ended its document: try shorter (rare)
                break
            m, lo, hi = store.longest_match(tail, m - 1, self.min_suffix)
        return DraftTree.empty()


def rest_drafter_for(model, path: str | os.PathLike, **options) -> RestDrafter:
    """A REST drafter for `model` (a `hasten.api.Model`) over the datastore at `path`,
    refusing a datastore built for another tokenizer. `options`: RestDrafter's."""
    store = Datastore.open(path)
    store.check_tokenizer(model.tokenizer, getattr(model, "name", None))
    return RestDrafter(store, **options)


def continuation_tree(rows: np.ndarray, size: int, end: int) -> DraftTree:
    """The trie of the rows' prefixes before their first `end` token, pruned to its `size`
    heaviest nodes (weight: rows through the node; ties: shallower, then lexicographically
    first). Breadth-first, siblings heaviest first. Equals `pruned_trie` on the same rows in
    lexicographic order, each cut before `end`."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 2 or rows.size == 0 or size <= 0:
        return DraftTree.empty()
    k, depth = rows.shape
    valid = np.logical_and.accumulate(rows != end, axis=1)
    rows = np.where(valid, rows, end)  # `end` sorts after every token: cut rows sort last
    # Lexicographic order: fixed-width big-endian bytes sort like the token rows.
    order = np.argsort(rows.astype(">u4").view(f"S{4 * depth}").ravel(), kind="stable")
    rows, valid = rows[order], valid[order]
    # Row i starts a new node at depth d when its prefix through d differs from row i - 1's.
    differs = rows[1:] != rows[:-1]
    first = np.where(differs.any(axis=1), differs.argmax(axis=1), depth)
    starts = np.ones((k, depth), dtype=bool)
    starts[1:] = np.arange(depth) >= first[:, None]
    flat = starts.T.ravel()  # depth-major: entry d * k + i is row i at depth d
    node_of = np.cumsum(flat) - 1  # node id of each (depth, row); ids run depth-major, then row
    heads = np.flatnonzero(flat)  # each node's first (depth, row) entry
    weight = np.bincount(node_of[valid.T.ravel()], minlength=heads.size)
    # Heaviest first; node ids already order ties by depth, then lexicographically.
    kept = np.argsort(-weight, kind="stable")[:size]
    kept = np.sort(kept[weight[kept] > 0])  # cut-off rows make weightless non-nodes
    if kept.size == 0:
        return DraftTree.empty()
    node_depth, node_row = np.divmod(heads[kept], k)
    parent = np.where(node_depth > 0, node_of[np.maximum(heads[kept] - k, 0)], -1)
    return _emit_breadth_first(kept.tolist(), parent.tolist(),
                               rows[node_row, node_depth].tolist(), node_depth.tolist(),
                               weight[kept].tolist())


def _emit_breadth_first(ids, parents, tokens, depths, weights) -> DraftTree:
    """Nodes given in (depth, lexicographic) order, emitted breadth-first: grouped by their
    parent's place, heaviest sibling first; parents become node indices."""
    place: dict[int, int] = {-1: -1}
    out_tokens, out_parents = [], []
    start = 0
    while start < len(ids):
        stop = start
        while stop < len(ids) and depths[stop] == depths[start]:
            stop += 1
        for j in sorted(range(start, stop), key=lambda j: (place[parents[j]], -weights[j], j)):
            place[ids[j]] = len(out_tokens)
            out_tokens.append(tokens[j])
            out_parents.append(place[parents[j]])
        start = stop
    return DraftTree(torch.tensor(out_tokens, dtype=torch.long),
                     torch.tensor(out_parents, dtype=torch.long))


def pruned_trie(seqs: Sequence[Sequence[int]], size: int,
                weights: Sequence[float] | None = None) -> DraftTree:
    """The trie of `seqs` (`DraftTree.from_sequences`) keeping only its `size` heaviest
    nodes: weight = total weight of the sequences through a node; ties go to the shallower
    node, then to the one seen first. Any such top set contains each kept node's parent."""
    seqs = [[int(t) for t in s] for s in seqs]
    weights = [1.0] * len(seqs) if weights is None else [float(w) for w in weights]
    if size <= 0 or not seqs:
        return DraftTree.empty()
    nodes: dict[tuple[int, ...], list] = {}  # prefix -> [weight, first seen]
    for order, (seq, w) in enumerate(zip(seqs, weights)):
        for d in range(len(seq)):
            nodes.setdefault(tuple(seq[:d + 1]), [0.0, order])[0] += w
    kept = set(sorted(nodes, key=lambda p: (-nodes[p][0], len(p), nodes[p][1]))[:size])
    cut = []
    for seq in seqs:
        d = 0
        while d < len(seq) and tuple(seq[:d + 1]) in kept:
            d += 1
        cut.append(seq[:d])
    return DraftTree.from_sequences(cut, weights)
