"""Draft trees: the candidate continuations a drafter proposes and the backbone verifies in one pass.

Conventions (shared by drafters, `accept` and the generate loop):

- The **root** is the last accepted token that is not yet in the KV cache (its logits are not
  known yet). The root is *not* a node of the tree.
- **Nodes** are draft tokens. `parents[i] == -1` means node i is a child of the root. Nodes are
  ordered so that parents come before children (the builders emit breadth-first order).
- A verify step feeds `[root, node 0, node 1, ...]`: node i sits at forward index `i + 1`. The
  logits at index 0 predict the depth-1 tokens; the logits at index `i + 1` predict node i's
  children. After acceptance the loop keeps forward indices `keep_indices(path)`.

Only `tokens` and `parents` are stored; everything else (depths, ancestor mask, paths, children)
depends on `parents` alone and is derived once per distinct tree *shape* (an LRU cache), so a
static Medusa tree whose tokens change every step pays for its structure only once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterable, NamedTuple, Sequence

import torch


@dataclass(frozen=True)
class _Shape:
    """Everything derived from `parents` (pure Python lists, plus the mask tensor)."""

    depth: tuple[int, ...]
    children: tuple[tuple[int, ...], ...]  # per forward position: [0] = root, [i + 1] = node i
    paths: tuple[tuple[int, ...], ...]  # root-to-leaf node-index paths, leaves in node order
    ancestor_mask: torch.Tensor  # bool [N, N]


@lru_cache(maxsize=256)
def _derive_shape(parents: tuple[int, ...]) -> _Shape:
    n = len(parents)
    depth: list[int] = []
    children: list[list[int]] = [[] for _ in range(n + 1)]
    ancestors: list[tuple[int, ...]] = []  # root-to-node path of each node, node included
    for i, p in enumerate(parents):
        depth.append(1 if p < 0 else depth[p] + 1)
        children[p + 1].append(i)
        ancestors.append((ancestors[p] if p >= 0 else ()) + (i,))
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, chain in enumerate(ancestors):
        mask[i, list(chain)] = True
    paths = tuple(ancestors[i] for i in range(n) if not children[i + 1])
    return _Shape(tuple(depth), tuple(tuple(c) for c in children), paths, mask)


@dataclass(frozen=True, eq=False)
class DraftTree:
    """Draft tokens `tokens[N]` with parent indices `parents[N]` (-1 = child of the root).

    The constructor validates but never reorders or merges nodes, so node indices a drafter
    used (e.g. rows of its draft distributions) stay valid. Builders deduplicate siblings.
    An empty tree (N = 0) is valid and means "no draft": a plain decoding step.
    """

    tokens: torch.Tensor  # LongTensor [N]
    parents: torch.Tensor  # LongTensor [N]

    def __post_init__(self):
        tokens = torch.as_tensor(self.tokens, dtype=torch.long).reshape(-1).cpu()
        parents = torch.as_tensor(self.parents, dtype=torch.long).reshape(-1).cpu()
        if tokens.shape != parents.shape:
            raise ValueError(f"tokens and parents differ in length: {tokens.numel()} vs {parents.numel()}")
        if parents.numel() and not bool(((parents >= -1) & (parents < torch.arange(parents.numel()))).all()):
            raise ValueError("each parent must be -1 (the root) or an earlier node: "
                             f"got parents={parents.tolist()}")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)

    # ---- builders --------------------------------------------------------------------------

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))

    @classmethod
    def from_chain(cls, tokens: Sequence[int] | torch.Tensor) -> DraftTree:
        """A single path: token j is the child of token j - 1 (the first is a child of the root)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return cls(tokens, torch.arange(tokens.numel()) - 1)

    @classmethod
    def from_choices(cls, choices: Iterable[Sequence[int]],
                     topk_tokens: Sequence[Sequence[int]] | torch.Tensor) -> DraftTree:
        """Medusa's static tree: each choice is a path of top-k ranks, one rank per head.

        `(0, 1)` is the node reached by head 0's best token, then head 1's second best;
        head h proposes depth h + 1. `topk_tokens[h]` lists head h's candidates by rank.
        Every proper prefix of a choice must itself be a choice (as in Medusa's lists).
        Nodes come out breadth-first, siblings by rank; duplicate siblings (possible when a
        head repeats a token) are merged.
        """
        ordered = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
        if any(len(c) == 0 for c in ordered):
            raise ValueError("a Medusa choice must name at least one rank; the root is implicit")
        index = {c: i for i, c in enumerate(ordered)}
        rows = [torch.as_tensor(t).reshape(-1).tolist() for t in topk_tokens] if len(ordered) else []
        tokens, parents = [], []
        for c in ordered:
            head, rank = len(c) - 1, c[-1]
            if head >= len(rows) or rank >= len(rows[head]):
                raise ValueError(f"choice {c} needs rank {rank} of head {head}, but "
                                 f"topk_tokens has {len(rows)} heads "
                                 f"({len(rows[head]) if head < len(rows) else 0} ranks for that head)")
            if len(c) > 1 and c[:-1] not in index:
                raise ValueError(f"choice {c} has no parent: add {c[:-1]} to the choices")
            tokens.append(rows[head][rank])
            parents.append(index[c[:-1]] if len(c) > 1 else -1)
        return cls(torch.tensor(tokens, dtype=torch.long),
                   torch.tensor(parents, dtype=torch.long)).deduplicated()

    @classmethod
    def from_sequences(cls, seqs: Iterable[Sequence[int]],
                       weights: Sequence[float] | None = None) -> DraftTree:
        """The trie of token sequences (REST continuations, lookup matches), breadth-first.

        Shared prefixes become shared nodes. Siblings are ordered by the total weight of the
        sequences through them, heaviest first (ties: first seen); without `weights` every
        sequence weighs 1, so siblings are ordered by how many sequences pass through them.
        The order matters: acceptance tries siblings in order.
        """
        seqs = [torch.as_tensor(s).reshape(-1).tolist() for s in seqs]
        weights = [1.0] * len(seqs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(seqs):
            raise ValueError(f"{len(weights)} weights for {len(seqs)} sequences")
        # Trie nodes as dicts: token -> [weight, first_seen, children dict].
        root: dict = {}
        for order, (seq, w) in enumerate(zip(seqs, weights)):
            level = root
            for tok in seq:
                entry = level.setdefault(int(tok), [0.0, order, {}])
                entry[0] += w
                level = entry[2]
        tokens, parents = [], []
        frontier = [(-1, root)]
        while frontier:  # breadth-first emission keeps parents before children
            nxt = []
            for parent, level in frontier:
                for tok, (_, _, kids) in sorted(level.items(), key=lambda kv: (-kv[1][0], kv[1][1])):
                    tokens.append(tok)
                    parents.append(parent)
                    nxt.append((len(tokens) - 1, kids))
            frontier = nxt
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    # ---- transformations -------------------------------------------------------------------

    def deduplicated(self) -> DraftTree:
        """Merge siblings with the same token into one node (their subtrees merge too).

        Keeps the first occurrence's place, so the order stays topological. Do this for
        deterministic drafts only: a stochastic drafter whose siblings are i.i.d. samples
        must keep its duplicates for `accept_sampling` with `draft_probs` to stay lossless.
        """
        new_index: dict[tuple[int, int], int] = {}
        remap: list[int] = []
        tokens, parents = [], []
        for tok, par in zip(self.token_list, self.parents.tolist()):
            key = (remap[par] if par >= 0 else -1, tok)
            if key not in new_index:
                new_index[key] = len(tokens)
                tokens.append(tok)
                parents.append(key[0])
            remap.append(new_index[key])
        if len(tokens) == self.size:
            return self
        return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def truncated(self, max_nodes: int) -> DraftTree:
        """The first `max_nodes` nodes (any prefix of a topological order is a valid tree);
        empty for `max_nodes <= 0`."""
        if max_nodes >= self.size:
            return self
        if max_nodes <= 0:
            return DraftTree.empty()
        return DraftTree(self.tokens[:max_nodes], self.parents[:max_nodes])

    # ---- derived structure -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.tokens.numel()

    def __len__(self) -> int:
        return self.size

    @cached_property
    def token_list(self) -> list[int]:
        return self.tokens.tolist()

    @cached_property
    def parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def _shape(self) -> _Shape:
        return _derive_shape(tuple(self.parent_list))

    @cached_property
    def depth(self) -> torch.Tensor:
        """LongTensor [N]: 1 for children of the root."""
        return torch.tensor(self._shape.depth, dtype=torch.long)

    @property
    def max_depth(self) -> int:
        return max(self._shape.depth, default=0)

    @cached_property
    def ancestor_mask(self) -> torch.Tensor:
        """Bool [N, N]: node i may attend to node j iff j is i or an ancestor of i."""
        return self._shape.ancestor_mask.clone()  # the cached original is shared between trees

    @property
    def root_children(self) -> list[int]:
        return list(self._shape.children[0])

    @cached_property
    def children(self) -> list[list[int]]:
        """children[i]: node indices whose parent is node i, in node order."""
        return [list(c) for c in self._shape.children[1:]]

    def children_at(self, position: int) -> tuple[int, ...]:
        """Children of forward position `position` (0 = root, i + 1 = node i)."""
        return self._shape.children[position]

    @cached_property
    def paths(self) -> list[list[int]]:
        """Root-to-leaf node-index paths, one per leaf, leaves in node order ([] if empty)."""
        return [list(p) for p in self._shape.paths]

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` inclusive ([] for node -1)."""
        path = []
        parents = self.parent_list
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]

    def __repr__(self) -> str:
        return f"DraftTree(tokens={self.token_list}, parents={self.parent_list})"


class VerifyInputs(NamedTuple):
    input_ids: torch.Tensor  # [1, 1 + N]
    positions: torch.Tensor  # [1, 1 + N]
    mask: torch.Tensor  # bool [1, 1 + N, past_len + 1 + N]


def verify_inputs(tree: DraftTree, root_token: int, past_len: int,
                  device: torch.device | str | None = None) -> VerifyInputs:
    """What `Backbone.forward` needs to verify `tree` in one pass, root token first.

    Positions are `past_len + depth` (the root at `past_len`). Everyone sees the committed
    past; the root sees itself; node i sees the root, itself and its ancestors, so each
    branch is computed exactly as if it were the only continuation.
    """
    n = tree.size
    input_ids = torch.cat([torch.tensor([int(root_token)], dtype=torch.long), tree.tokens])
    positions = past_len + torch.cat([torch.zeros(1, dtype=torch.long), tree.depth])
    inner = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    inner[:, 0] = True
    inner[1:, 1:] = tree.ancestor_mask
    mask = torch.cat([torch.ones(n + 1, past_len, dtype=torch.bool), inner], dim=1)
    return VerifyInputs(input_ids[None].to(device), positions[None].to(device), mask[None].to(device))


def keep_indices(path: Sequence[int]) -> torch.Tensor:
    """Forward indices to commit after accepting `path`: the root (0), then node i at i + 1."""
    return torch.tensor([0, *(i + 1 for i in path)], dtype=torch.long)
