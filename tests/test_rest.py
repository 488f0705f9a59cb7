"""The REST drafter: trie building and frequency-aware pruning, proposals that only contain
what the datastore holds, and greedy output identical to plain greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hasten.datastore import DatastoreError, build_from_token_lists, tokenizer_fingerprint
from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import GenerationStats, generate_plain
from hasten.decoding.tree import DraftTree
from hasten.drafters.rest import RestDrafter, continuation_tree, pruned_trie, rest_drafter_for
from tiny import tiny_pair


def paths_of(tree: DraftTree) -> set[tuple[int, ...]]:
    """Token sequences from the root to every node."""
    return {tuple(tree.token_list[j] for j in tree.path_to(i)) for i in range(tree.size)}


def prefix_weights(seqs, weights=None) -> dict[tuple[int, ...], float]:
    weights = weights or [1.0] * len(seqs)
    out: dict[tuple[int, ...], float] = {}
    for s, w in zip(seqs, weights):
        for d in range(1, len(s) + 1):
            out[tuple(s[:d])] = out.get(tuple(s[:d]), 0.0) + w
    return out


def same_tree(a: DraftTree, b: DraftTree) -> bool:
    return a.token_list == b.token_list and a.parent_list == b.parent_list


# ---- trie building and pruning ---------------------------------------------------------------

def test_pruned_trie_by_hand():
    seqs = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
    # weights: (1): 3, (1, 2): 2, then 1 each; the tie goes to the shallowest, (6)
    tree = pruned_trie(seqs, 3)
    assert tree.token_list == [1, 6, 2] and tree.parent_list == [-1, -1, 0]
    assert same_tree(pruned_trie(seqs, 100), DraftTree.from_sequences(seqs))
    # with weights, the heavy short branch wins
    tree = pruned_trie(seqs, 2, weights=[1, 1, 1, 5])
    assert tree.token_list == [6, 1] and tree.parent_list == [-1, -1]
    assert pruned_trie(seqs, 0).size == 0 and pruned_trie([], 5).size == 0


@pytest.mark.parametrize("seed", range(6))
def test_pruning_keeps_the_heaviest_nodes_as_a_valid_tree(seed):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 3, size=int(rng.integers(1, 6))).tolist() for _ in range(20)]
    weights = rng.integers(1, 4, size=20).astype(float).tolist()
    full = prefix_weights(seqs, weights)
    for budget in (1, 2, 5, 9, 17, 100):
        tree = pruned_trie(seqs, budget, weights)  # the constructor checks parents come first
        kept = paths_of(tree)
        assert len(kept) == tree.size == min(budget, len(full))
        assert all(p[:-1] in kept for p in kept if len(p) > 1)  # closed under parents
        dropped = set(full) - kept
        if dropped:
            assert min(full[p] for p in kept) >= max(full[p] for p in dropped)
        # siblings heaviest first, as in DraftTree.from_sequences
        for kids in [tree.root_children] + tree.children:
            w = [full[tuple(tree.token_list[j] for j in tree.path_to(k))] for k in kids]
            assert w == sorted(w, reverse=True)


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_tree_equals_the_plain_definition(seed):
    rng = np.random.default_rng(seed)
    end = 4
    k, depth = int(rng.integers(1, 40)), int(rng.integers(1, 7))
    rows = rng.integers(0, end + 1, size=(k, depth))  # `end` marks a document's end
    seqs = []
    for r in rows.tolist():
        seqs.append(r[:r.index(end)] if end in r else r)
    order = sorted(range(k), key=lambda i: rows[i].tolist())  # lexicographic, end sorts last
    seqs = [seqs[i] for i in order]
    for budget in (1, 3, 8, 30, 500):
        got = continuation_tree(rows, budget, end)
        assert same_tree(got, pruned_trie(seqs, budget)), (budget, rows.tolist())
    assert continuation_tree(np.full((3, 4), end), 8, end).size == 0
    assert continuation_tree(np.empty((0, 4), dtype=np.int64), 8, end).size == 0


# ---- the drafter on small datastores ---------------------------------------------------------

def test_proposals_hold_exactly_the_stored_continuations(tmp_path):
    docs = [[1, 2, 3, 4, 5], [9, 2, 3, 4, 6], [2, 3, 7], [8, 8, 2, 3]]
    store = build_from_token_lists(docs, 10, tmp_path / "s.hds")
    drafter = RestDrafter(store, min_suffix=2, backoff=0, depth=4)
    tree = drafter.propose([0, 2, 3], 16)  # "2 3" ends a document once: that adds nothing
    assert paths_of(tree) == {(4,), (4, 5), (4, 6), (7,)}
    assert tree.token_list[0] == 4  # two continuations agree on it
    tree = drafter.propose([9, 2, 3], 16)  # the longest match, "9 2 3", occurs once
    assert paths_of(tree) == {(4,), (4, 6)}
    # a document's last tokens: nothing follows, so no token of the next document
    assert drafter.propose([5, 9, 8, 8, 2, 3, 4, 5], 16).size == 0
    assert drafter.propose([3, 4, 5], 16).size == 0  # only at a document end: no draft
    assert drafter.propose([0, 0], 16).size == 0  # no match at all
    assert drafter.propose([2, 3], 0).size == 0
    assert drafter.propose([2, 3], 2).size == 2  # the budget caps the tree


def test_never_crosses_a_document_boundary(tmp_path):
    """Documents drawn from disjoint token ranges: a draft mixing ranges crossed a boundary."""
    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 3, size=30) + 3 * (i % 4)).tolist() for i in range(16)]
    store = build_from_token_lists(docs, 12, tmp_path / "s.hds")
    drafter = RestDrafter(store, depth=10, backoff=0, min_suffix=1)
    for doc in docs:
        for end in range(1, len(doc) + 1):
            tree = drafter.propose(doc[:end], 32)
            group = doc[0] // 3
            assert all(t // 3 == group for t in tree.token_list)
            assert tree.max_depth <= 10


def test_backoff_adds_the_shorter_matches(tmp_path):
    docs = [[1, 2, 3, 4], [5, 2, 3, 6], [7, 3, 8]]
    store = build_from_token_lists(docs, 10, tmp_path / "s.hds")
    plain = RestDrafter(store, min_suffix=1, backoff=0, depth=2)
    assert paths_of(plain.propose([1, 2, 3], 16)) == {(4,)}
    wide = RestDrafter(store, min_suffix=1, backoff=2, depth=2)
    tree = wide.propose([1, 2, 3], 16)
    assert paths_of(tree) == {(4,), (6,), (8,)}
    assert tree.token_list[0] == 4  # the longest match counts at every level: heaviest


def test_rest_drafter_for_checks_the_tokenizer(tmp_path):
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    class FakeModel:
        name = "fake"
        tokenizer = Tok({"a": 0, "b": 1})

    build_from_token_lists([[0, 1, 0]], 2, tmp_path / "s.hds",
                           fingerprint=tokenizer_fingerprint(FakeModel.tokenizer))
    drafter = rest_drafter_for(FakeModel(), tmp_path / "s.hds", depth=3)
    assert drafter.depth == 3 and drafter.name == "rest"
    FakeModel.tokenizer = Tok({"a": 1, "b": 0})
    with pytest.raises(DatastoreError, match="fake's tokenizer"):
        rest_drafter_for(FakeModel(), tmp_path / "s.hds")


def test_arguments_are_checked(tmp_path):
    store = build_from_token_lists([[0, 1]], 2, tmp_path / "s.hds")
    for bad in (dict(min_suffix=0), dict(min_suffix=5, max_suffix=4), dict(depth=0),
                dict(max_occurrences=0), dict(backoff=-1)):
        with pytest.raises(ValueError):
            RestDrafter(store, **bad)
    assert RestDrafter(tmp_path / "s.hds").datastore.num_tokens == 2  # opens a path


# ---- lossless: greedy REST output equals plain greedy output ---------------------------------

@pytest.fixture(scope="module")
def model():
    ours, _ = tiny_pair()
    return ours


def prompts(count, seed, vocab=97):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(2, 12, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(count)]


def test_greedy_rest_equals_plain_greedy(model, tmp_path):
    """Datastore: the model's own greedy continuations of some prompts (so drafts are often
    right and long paths get accepted), noisy copies of them, and random documents."""
    vocab = model.config.vocab_size
    train = prompts(6, 0)
    docs = []
    for p in train:
        out = list(generate_plain(model, p, 40))
        docs.append(p + out)
        noisy = list(out)
        noisy[len(noisy) // 2] = (noisy[len(noisy) // 2] + 1) % vocab
        docs.append(noisy)
    docs += [torch.randint(0, vocab, (50,), generator=torch.Generator().manual_seed(i)).tolist()
             for i in range(10)]
    store = build_from_token_lists(docs, vocab, tmp_path / "s.hds")
    accepted = []
    for budget in (1, 4, 16, 32):
        for drafter in (RestDrafter(store), RestDrafter(store, min_suffix=2, backoff=0)):
            for p in train[:3] + prompts(3, 1):  # seen and unseen prompts
                want = list(generate_plain(model, p, 40))
                stats = GenerationStats()
                got = list(generate_speculative(model, drafter, p, 40, tree_size=budget,
                                                stats=stats))
                assert got == want, (budget, p)
                accepted.append(stats.mean_accepted)
    assert max(accepted) > 3  # REST did draft, and long drafts were accepted
