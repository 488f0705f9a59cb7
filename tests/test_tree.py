import pytest
import torch

from hasten.decoding.tree import DraftTree, keep_indices, verify_inputs


def hand_tree() -> DraftTree:
    #        root
    #       /    \
    #     0:10   1:11
    #     /  \
    #   2:12  3:13
    #    |
    #   4:14
    return DraftTree(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([-1, -1, 0, 0, 2]))


def test_derived_structure_of_a_hand_built_tree():
    tree = hand_tree()
    assert tree.size == len(tree) == 5
    assert tree.depth.tolist() == [1, 1, 2, 2, 3]
    assert tree.max_depth == 3
    assert tree.root_children == [0, 1]
    assert tree.children == [[2, 3], [], [4], [], []]
    assert tree.children_at(0) == (0, 1) and tree.children_at(1) == (2, 3)
    assert tree.paths == [[1], [0, 3], [0, 2, 4]]
    assert tree.path_to(4) == [0, 2, 4] and tree.path_to(-1) == []
    want = torch.tensor([
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree.ancestor_mask, want)


def test_structure_is_shared_between_trees_of_the_same_shape_but_masks_are_private():
    a = hand_tree()
    b = DraftTree(torch.tensor([1, 2, 3, 4, 5]), a.parents.clone())
    assert a._shape is b._shape
    a.ancestor_mask[0, 1] = True  # mutating one tree's mask must not leak into the other
    assert not b.ancestor_mask[0, 1]


def test_constructor_validates():
    with pytest.raises(ValueError, match="earlier node"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([1, -1]))  # child before parent
    with pytest.raises(ValueError, match="earlier node"):
        DraftTree(torch.tensor([1]), torch.tensor([-2]))
    with pytest.raises(ValueError, match="differ in length"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1]))


def test_empty_tree():
    tree = DraftTree.empty()
    assert tree.size == 0 and tree.max_depth == 0
    assert tree.depth.shape == (0,) and tree.ancestor_mask.shape == (0, 0)
    assert tree.paths == [] and tree.root_children == [] and tree.children == []
    assert DraftTree.from_chain([]).size == 0
    assert DraftTree.from_sequences([]).size == 0
    assert DraftTree.from_choices([], []).size == 0
    ids, pos, mask = verify_inputs(tree, root_token=7, past_len=4)
    assert ids.tolist() == [[7]] and pos.tolist() == [[4]]
    assert mask.shape == (1, 1, 5) and bool(mask.all())


def test_deduplication_merges_siblings_and_their_subtrees():
    # node 1 repeats node 0; its children (7 and 6) move under node 0, where 6 repeats node 2.
    tree = DraftTree(torch.tensor([5, 5, 6, 7, 6, 9]), torch.tensor([-1, -1, 0, 1, 1, 4]))
    dedup = tree.deduplicated()
    assert dedup.token_list == [5, 6, 7, 9]
    assert dedup.parent_list == [-1, 0, 0, 1]
    assert tree.size == 6  # the original is untouched
    distinct = hand_tree()
    assert distinct.deduplicated() is distinct


def test_from_choices_matches_a_hand_computed_tree():
    choices = [(0,), (0, 1), (1,), (0, 0, 2), (0, 0)]
    topk = [[100, 101], [200, 201], [300, 301, 302]]
    tree = DraftTree.from_choices(choices, topk)
    # breadth-first, siblings by rank: (0,) (1,) (0,0) (0,1) (0,0,2)
    assert tree.token_list == [100, 101, 200, 201, 302]
    assert tree.parent_list == [-1, -1, 0, 0, 2]
    same = DraftTree.from_choices(choices, torch.tensor([[100, 101, 0], [200, 201, 0], [300, 301, 302]]))
    assert same.token_list == tree.token_list and same.parent_list == tree.parent_list


def test_from_choices_merges_repeated_head_tokens_and_rejects_bad_lists():
    tree = DraftTree.from_choices([(0,), (1,), (1, 0), (0, 0)], [[7, 7], [8]])
    assert tree.token_list == [7, 8] and tree.parent_list == [-1, 0]
    with pytest.raises(ValueError, match="no parent"):
        DraftTree.from_choices([(0,), (0, 1, 0)], [[1], [2, 3], [4]])
    with pytest.raises(ValueError, match="rank 5"):
        DraftTree.from_choices([(5,)], [[1, 2]])
    with pytest.raises(ValueError, match="heads"):
        DraftTree.from_choices([(0,), (0, 0)], [[1]])


def test_from_sequences_builds_a_frequency_ordered_trie():
    seqs = [[6], [1, 2, 3], [1, 2, 4], [1, 5]]
    tree = DraftTree.from_sequences(seqs)
    # 1 is in three sequences, 6 in one; under 1, 2 (two) before 5 (one)
    assert tree.token_list == [1, 6, 2, 5, 3, 4]
    assert tree.parent_list == [-1, -1, 0, 0, 2, 2]
    assert sorted(tuple(tree.tokens[p].tolist()) for p in tree.paths) == sorted(map(tuple, seqs))
    weighted = DraftTree.from_sequences([[1, 2], [3]], weights=[1.0, 5.0])
    assert weighted.token_list == [3, 1, 2]
    ties = DraftTree.from_sequences([[4], [3], [4, 9], [3, 9]])
    assert ties.token_list == [4, 3, 9, 9]  # equal counts keep first-seen order
    with pytest.raises(ValueError, match="weights"):
        DraftTree.from_sequences([[1]], weights=[1.0, 2.0])


def test_from_chain_and_truncation():
    chain = DraftTree.from_chain(torch.tensor([4, 5, 6]))
    assert chain.parent_list == [-1, 0, 1] and chain.paths == [[0, 1, 2]]
    assert chain.truncated(2).token_list == [4, 5]
    assert chain.truncated(10) is chain
    cut = hand_tree().truncated(3)
    assert cut.parent_list == [-1, -1, 0] and cut.paths == [[1], [0, 2]]


def test_verify_inputs_positions_and_mask():
    tree = hand_tree()
    ids, pos, mask = verify_inputs(tree, root_token=99, past_len=3)
    assert ids.tolist() == [[99, 10, 11, 12, 13, 14]]
    assert pos.tolist() == [[3, 4, 4, 5, 5, 6]]
    assert mask.shape == (1, 6, 3 + 6) and mask.dtype == torch.bool
    assert bool(mask[0, :, :3].all())  # everyone sees the whole past
    inner = mask[0, :, 3:].int().tolist()
    assert inner[0] == [1, 0, 0, 0, 0, 0]  # the root sees itself only
    assert inner[5] == [1, 1, 0, 1, 0, 1]  # node 4 sees root, 0, 2 and itself
    assert inner[2] == [1, 0, 1, 0, 0, 0]
    assert keep_indices([0, 2, 4]).tolist() == [0, 1, 3, 5]
    assert keep_indices([]).tolist() == [0]


def test_verify_inputs_give_each_node_the_logits_of_its_own_path():
    """One tree forward on a real (tiny, float64) backbone equals running each path alone."""
    from tiny import tiny_pair

    model, _ = tiny_pair()
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 97, (1, 9), generator=gen)
    tree = DraftTree(torch.randint(0, 97, (7,), generator=gen), torch.tensor([-1, -1, 0, 0, 2, 1, 4]))
    root = 42
    model.reset(capacity=64)
    model.forward(prefix)
    model.commit()
    ids, pos, mask = verify_inputs(tree, root, past_len=model.length)
    got = model.forward(ids, positions=pos, mask=mask).logits[0]
    for node in range(-1, tree.size):
        seq = [root] + tree.tokens[tree.path_to(node)].tolist()
        model.reset(capacity=64)
        want = model.forward(torch.cat([prefix, torch.tensor([seq])], 1)).logits[0, -1]
        torch.testing.assert_close(got[node + 1], want, rtol=1e-9, atol=1e-9)
