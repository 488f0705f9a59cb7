"""The EAGLE head, drafter and training on tiny random models."""

import json

import pytest
import torch

from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import generate_plain
from hasten.decoding.sampling import SamplingParams
from hasten.eagle.drafter import EagleDrafter, rerank
from hasten.eagle.head import EagleCache, EagleConfig, EagleHead, load_head, save_head
from hasten.errors import HastenError
from hasten.medusa.heads import base_identity
from tiny import tiny_pair


def _head(cfg, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    head = EagleHead(EagleConfig.like(cfg)).to(dtype)
    with torch.no_grad():  # far from the identity start, so every piece matters
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return head.eval()


def test_unrolled_training_pass_is_what_drafting_a_chain_computes():
    """Training-time test step s at index i must equal the drafter's chain: real pairs <= i in
    the cache, then the head's own outputs fed back with the next tokens at positions i + s."""
    ours, _ = tiny_pair()
    head = _head(ours.config)
    d, t = ours.config.hidden_size, 9
    feats = torch.randn(1, t, d, dtype=torch.float64)
    embeds = torch.randn(1, t + 2, d, dtype=torch.float64)
    outs = head(embeds, feats, unroll=2)
    for i in (0, 3, t - 1):
        cache = EagleCache(head.config, 32, torch.float64, "cpu")
        real = head.step(embeds[0, :i + 1], feats[0, :i + 1], torch.arange(i + 1), cache, None)
        torch.testing.assert_close(real, outs[0][0, :i + 1])
        prev, chain_slots = real[-1], []
        for s in (1, 2):
            slot = cache.length
            mask = torch.zeros(1, slot + 1, dtype=torch.bool)
            mask[0, :i + 1] = True
            mask[0, chain_slots + [slot]] = True
            prev = head.step(embeds[0, i + s:i + s + 1], prev[None], torch.tensor([i + s]), cache, mask)[0]
            chain_slots.append(slot)
            torch.testing.assert_close(prev, outs[s][0, i])


def test_rerank_keeps_the_best_as_a_tree_parents_first():
    # Candidates: 0,1 children of the root; 2,3 children of 0; 4 child of 2.
    tokens = torch.tensor([10, 11, 12, 13, 14])
    parents = torch.tensor([-1, -1, 0, 0, 2])
    depths = torch.tensor([1, 1, 2, 2, 3])
    scores = torch.tensor([-0.1, -2.0, -0.5, -0.5, -0.6])
    tree, ranks = rerank(tokens, parents, depths, scores, 4)
    assert tree.token_list == [10, 12, 13, 14]
    assert tree.parents.tolist() == [-1, 0, 0, 1]
    assert ranks.tolist() == [0, 1, 2, 3]  # 12 and 13 tie: the earlier candidate first
    full, ranks = rerank(tokens, parents, depths, scores, 10)
    assert ranks.tolist() == [0, 4, 1, 2, 3]
    assert sorted(full.token_list) == [10, 11, 12, 13, 14]
    # A tie between parent and child keeps the parent first.
    tie, _ = rerank(torch.tensor([1, 2]), torch.tensor([-1, 0]), torch.tensor([1, 2]),
                    torch.tensor([0.0, 0.0]), 1)
    assert tie.token_list == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_with_eagle_is_plain_decoding(dtype):
    ours, _ = tiny_pair(dtype=dtype)
    head = _head(ours.config, dtype=dtype)
    drafter = EagleDrafter(head, ours.embed.weight, ours.lm_head.weight, depth=4, topk=3)
    prompt = [5, 9, 14, 3, 22, 7, 9, 14]
    plain = list(generate_plain(ours, prompt, 40))
    spec = list(generate_speculative(ours, drafter, prompt, 40, tree_size=12))
    assert spec == plain


def test_drafter_feeds_each_position_its_own_state_and_next_token():
    """Every catch-up pair at position q must be (the target's state at q, token q + 1): a
    misaligned pairing would silently cost acceptance (output stays exact either way)."""
    ours, _ = tiny_pair(dtype=torch.float32)
    head = _head(ours.config, dtype=torch.float32)
    drafter = EagleDrafter(head, ours.embed.weight, ours.lm_head.weight, depth=3, topk=2)
    fed = []
    real_step = head.step

    calls = []

    def recording_step(embeds, feats, positions, cache, mask):
        if mask is None:  # catch-up pairs (tree expansions pass a mask)
            fed.append((embeds.clone(), feats.clone(), positions.clone()))
        calls.append((mask is None, positions.tolist()))
        return real_step(embeds, feats, positions, cache, mask)

    head.step = recording_step
    prompt = [5, 9, 14, 3, 22]
    list(generate_speculative(ours, drafter, prompt, 25, tree_size=6))
    drafter.propose(drafter.context, 6)  # feeds what the last step committed
    context = drafter.context
    assert drafter.fed == len(context) - 1  # one pair per position but the newest token's
    ours.reset(1, 256)
    states = ours.forward(torch.tensor([context])).hidden[0]
    embeds = torch.cat([e for e, _, _ in fed])
    feats = torch.cat([f for _, f, _ in fed])
    positions = torch.cat([p for _, _, p in fed])
    assert positions.tolist() == list(range(len(context) - 1))
    torch.testing.assert_close(embeds, ours.embed.weight[torch.tensor(context[1:])])
    torch.testing.assert_close(feats, states[:-1], atol=1e-4, rtol=1e-4)
    # Tree levels go one position deeper each: a depth-1 node's pair sits at the root's position.
    for (was_catch_up, before), (expands, level1) in zip(calls, calls[1:]):
        if was_catch_up and not expands:
            assert set(level1) == {before[-1] + 1}


def test_sampling_with_eagle_follows_the_seeded_plain_path_distribution():
    """Same seed, temperature 1: the lossless rule keeps outputs valid tokens and the run is
    deterministic (a full distribution test lives with the acceptance rules)."""
    ours, _ = tiny_pair(dtype=torch.float32)
    head = _head(ours.config, dtype=torch.float32)
    params = SamplingParams(temperature=1.0)
    runs = []
    for _ in range(2):
        drafter = EagleDrafter(head, ours.embed.weight, ours.lm_head.weight, depth=3, topk=2)
        g = torch.Generator().manual_seed(3)
        runs.append(list(generate_speculative(ours, drafter, [5, 9, 14], 20, params, generator=g,
                                              tree_size=6)))
    assert runs[0] == runs[1] and len(runs[0]) == 20


def test_head_files_round_trip_and_refuse_another_model(tmp_path):
    ours, _ = tiny_pair(dtype=torch.float32)
    other, _ = tiny_pair(dtype=torch.float32, seed=5)
    head = _head(ours.config, dtype=torch.float32)
    head.draft_vocab = torch.tensor([3, 5, 9])
    save_head(head, tmp_path / "h", base_identity(ours, "tiny"))
    loaded = load_head(tmp_path / "h", ours)
    for a, b in zip(head.state_dict().values(), loaded.head.state_dict().values()):
        assert torch.equal(a, b)
    assert loaded.head.draft_vocab.tolist() == [3, 5, 9]
    with pytest.raises(HastenError, match="trained for tiny"):
        load_head(tmp_path / "h", other)
    with pytest.raises(HastenError, match="no EAGLE head"):
        load_head(tmp_path / "missing", ours)
    (tmp_path / "h" / "eagle_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(HastenError, match="damaged"):
        load_head(tmp_path / "h", ours)
    meta = json.loads((tmp_path / "h" / "eagle_config.json").read_text())
    assert meta["format"] == "hasten-eagle"


def test_drafting_weights_as_q8_0_keep_the_head_and_stay_lossless():
    """`quantize_for_drafting` (what `eagle_drafter` does where our float32 kernels run):
    the drafter's copy of the head and its draft LM head become Q8_0 blocks (with int8
    activations where the CPU has VNNI), the given head
    keeps its float32 layers, drafts stay close to the float32 drafter's, and greedy decoding
    with them is still plain decoding."""
    from hasten.models import quant_kernels as qk
    from hasten.models.compact import Q8Dense, QuantDense
    if not qk.vector_kernels():
        pytest.skip("Q8_0 drafting needs the vector kernels (AVX-512 or AVX2)")
    ours, _ = tiny_pair(dtype=torch.float32, hidden_size=64, intermediate_size=64, head_dim=16)
    head = _head(ours.config, dtype=torch.float32)
    drafter = EagleDrafter(head, ours.embed.weight, ours.lm_head.weight, depth=4, topk=3)
    reference = EagleDrafter(head, ours.embed.weight, ours.lm_head.weight, depth=4, topk=3)
    drafter.quantize_for_drafting()
    kind = Q8Dense if qk.fast_int8() else QuantDense
    assert type(drafter.head.q_proj) is kind and type(drafter.lm_head_blocks) is kind
    assert isinstance(head.q_proj, torch.nn.Linear)  # the given head keeps float32 layers
    states = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(drafter._logprobs(states), reference._logprobs(states), atol=0.05)
    prompt = [5, 9, 14, 3, 22, 7, 9, 14]
    plain = list(generate_plain(ours, prompt, 40))
    assert list(generate_speculative(ours, drafter, prompt, 40, tree_size=12)) == plain
    if qk.fast_int8():  # the head's layer in one compiled call: the same drafts
        assert drafter.fused is not None
        trees = []
        for fused in (drafter.fused, None):
            drafter.fused = fused
            drafter.reset(prompt, 64)
            drafter.observe([], torch.randn(len(prompt) - 1, 64, generator=torch.Generator().manual_seed(2)))
            tree = drafter.propose(prompt, 12)
            trees.append((tree.tokens.tolist(), tree.parents.tolist()))
        assert trees[0] == trees[1] and len(trees[0][0]) == 12


def test_a_small_tree_is_the_best_nodes_of_a_big_one_from_fewer_head_rows():
    """A tree of n nodes needs no level deeper than n and no more than n nodes (and children)
    per level: the drafter's probe of 4 expands less and is the same tree as the best 4 of a
    full proposal."""
    ours, _ = tiny_pair(dtype=torch.float32)
    head = _head(ours.config, dtype=torch.float32)
    drafter = EagleDrafter(head, ours.embed.weight, ours.lm_head.weight, depth=5, topk=4)
    list(generate_speculative(ours, drafter, [5, 9, 14, 3, 22], 12, tree_size=6))
    big = drafter.propose(drafter.context, 64)
    best = {tuple(big.token_list[i] for i in big.path_to(node))
            for node, rank in enumerate(drafter.last_ranks.tolist()) if rank < 3}
    rows = []
    real_step = head.step

    def recording_step(embeds, feats, positions, cache, mask):
        rows.append(embeds.shape[0])
        return real_step(embeds, feats, positions, cache, mask)

    head.step = recording_step
    small = drafter.propose(drafter.context, 3)
    assert {tuple(small.token_list[i] for i in small.path_to(node)) for node in range(small.size)} == best
    assert len(rows) <= 2 and max(rows) <= 3  # levels 2 and 3 at most, 3 nodes each
