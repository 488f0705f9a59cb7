"""Greedy speculative decoding must reproduce plain greedy decoding token for token."""

import pytest
import torch

from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import GenerationStats, generate_plain
from hasten.decoding.sampling import SamplingParams
from hasten.decoding.tree import DraftTree
from hasten.drafters.draft_model import ModelDrafter, self_draft
from hasten.drafters.lookup import LookupDrafter
from hasten.models.llama import build_llama
from tiny import hf_reference, tiny_config, tiny_pair


class RandomTreeDrafter:
    """Random trees with duplicate siblings, sometimes right by luck via an oracle peek."""
    name = "random"

    def __init__(self, seed, oracle=None):
        self.gen = torch.Generator().manual_seed(seed)
        self.oracle = oracle or []

    def reset(self, prompt, capacity=None):
        self.prompt_len = len(prompt)

    def observe(self, accepted, hidden=None):
        pass

    def propose(self, context, budget, hidden=None):
        n = int(torch.randint(0, budget + 1, (1,), generator=self.gen))
        done = len(context) - self.prompt_len
        truth = self.oracle[done:done + 3]  # the true continuation, to exercise long accepts
        seqs = [truth] if truth else []
        for _ in range(n):
            length = int(torch.randint(1, 4, (1,), generator=self.gen))
            seqs.append(torch.randint(0, 6, (length,), generator=self.gen).tolist())
        tree = DraftTree.from_sequences(seqs)
        # duplicate siblings on purpose: append a copy of the first node under the root
        if tree.size:
            tree = DraftTree(torch.cat([tree.tokens, tree.tokens[:1]]),
                             torch.cat([tree.parents, torch.tensor([-1])]))
        return tree.truncated(budget)


def spec(model, drafter, prompt, n, **kw):
    return list(generate_speculative(model, drafter, prompt, n, **kw))


def random_prompts(count, seed, vocab=6):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 20, (1,), generator=gen)),),
                          generator=gen).tolist() for _ in range(count)]


@pytest.fixture(scope="module")
def model():
    ours, _ = tiny_pair()
    return ours


def test_random_trees_with_duplicates_match_plain(model):
    for i, prompt in enumerate(random_prompts(12, 0)):
        want = list(generate_plain(model, prompt, 24))
        got = spec(model, RandomTreeDrafter(i, oracle=want), prompt, 24, tree_size=8)
        assert got == want


@pytest.mark.parametrize("budget", [1, 2, 5, 16])
def test_lookup_matches_plain(model, budget):
    for prompt in random_prompts(8, 1, vocab=5):  # small vocab -> many repeats
        want = list(generate_plain(model, prompt, 30))
        assert spec(model, LookupDrafter(), prompt, 30, tree_size=budget) == want


def test_self_draft_and_separate_draft_model_match_plain(model):
    other = build_llama(tiny_config(num_layers=1), hf_reference(tiny_config(num_layers=1), 9).state_dict(),
                        dtype=torch.float64)
    for drafter in (ModelDrafter(self_draft(model, 1), depth=3), ModelDrafter(other, depth=4)):
        for prompt in random_prompts(6, 2):
            want = list(generate_plain(model, prompt, 20))
            assert spec(model, drafter, prompt, 20, tree_size=4) == want


def test_perfect_drafter_accepts_long_paths_and_stops_at_max_new_tokens(model):
    prompt = [3, 4, 5]
    want = list(generate_plain(model, prompt, 40))
    for n in (1, 2, 7, 13, 40):  # max_new_tokens lands mid-path
        stats = GenerationStats()
        got = spec(model, RandomTreeDrafter(0, oracle=want), prompt, n, tree_size=4, stats=stats)
        assert got == want[:n]
        assert stats.finish_reason == "length"
    assert max(stats.accepted) >= 3  # the oracle chain was accepted several tokens at a time


def test_stop_token_inside_an_accepted_path(model):
    prompt = [3, 4, 5]
    want = list(generate_plain(model, prompt, 30))
    stop = want[5]
    cut = want.index(stop) + 1
    stats = GenerationStats()
    got = spec(model, RandomTreeDrafter(0, oracle=want), prompt, 30, stop_ids=(stop,),
               tree_size=6, stats=stats)
    assert got == want[:cut]
    assert stats.finish_reason == "stop"


def test_context_capacity_stops_gracefully_never_corrupts(model):
    prompt = [1] * 240
    want = list(generate_plain(model, prompt, 50, max_positions=256))
    stats = GenerationStats()
    got = spec(model, LookupDrafter(), prompt, 50, max_positions=256, tree_size=8, stats=stats)
    assert got == want[:len(got)]
    assert stats.finish_reason == "context"
    assert len(got) >= len(want) - 1


def test_sampling_with_seed_is_reproducible(model):
    params = SamplingParams(temperature=0.7)
    runs = [spec(model, LookupDrafter(), [1, 2, 1, 2, 1], 20, params=params,
                 generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert runs[0] == runs[1]
