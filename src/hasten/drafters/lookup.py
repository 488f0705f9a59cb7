"""Prompt lookup: draft what followed earlier occurrences of the latest n-gram in the context.

When the output repeats the input (summaries, code edits, quoting), the tokens after an earlier
occurrence of the last few tokens are a good guess for what comes next. Several matches are
merged into one tree (a trie), siblings ordered by how many matches agree on them.

An index maps every n-gram (n = 1..max_ngram) to the positions right after its occurrences,
updated as tokens arrive, so a proposal costs a dictionary lookup, not a scan.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..decoding.tree import DraftTree


class LookupDrafter:
    name = "lookup"
    cheap = True  # proposing costs no forward of the model: probes can be shadow probes

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 4,
                 max_depth: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_matches, self.max_depth = max_matches, max_depth
        self.tokens: list[int] = []
        self.follows: dict[tuple[int, ...], list[int]] = defaultdict(list)

    def reset(self, prompt: list[int], capacity: int | None = None) -> None:
        self.tokens = []
        self.follows = defaultdict(list)
        self.observe(prompt)

    def observe(self, accepted: list[int], hidden: torch.Tensor | None = None) -> None:
        for tok in accepted:
            # Index the n-grams ending at the previous token: their continuation is `tok`.
            end = len(self.tokens)
            for n in range(1, self.max_ngram + 1):
                if end >= n:
                    self.follows[tuple(self.tokens[end - n:end])].append(end)
            self.tokens.append(int(tok))

    def propose(self, context: list[int], size: int, hidden: torch.Tensor | None = None) -> DraftTree:
        if size <= 0:
            return DraftTree.empty()
        toks = self.tokens
        for n in range(min(self.max_ngram, len(toks)), self.min_ngram - 1, -1):
            starts = self.follows.get(tuple(toks[-n:]))
            if not starts:
                continue
            # Most recent match first, as deep as the size allows: recent text is the
            # likeliest to repeat, and one long chain beats many short branches. Further
            # matches join only while the merged tree still fits the size.
            depth = min(self.max_depth, size)
            tree = DraftTree.empty()
            seqs: list[list[int]] = []
            for s in reversed(starts[-self.max_matches:]):
                candidate = DraftTree.from_sequences(seqs + [toks[s:s + depth]])
                if candidate.size > size:
                    break
                seqs.append(toks[s:s + depth])
                tree = candidate
            if tree.size:
                return tree
        return DraftTree.empty()
