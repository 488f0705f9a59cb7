"""Exact speculative decoding in half precision: every verified tree node computes exactly
the numbers a plain step of the same token computes (logits and the K/V it commits), so
greedy speculative output equals plain greedy output token for token."""

from __future__ import annotations

import random

import pytest
import torch

from hasten.decoding.engine import generate_speculative
from hasten.decoding.exactness import check_exactness, row_classes
from hasten.decoding.generate import generate_plain
from hasten.decoding.tree import DraftTree, verify_inputs
from hasten.drafters.draft_model import ModelDrafter, self_draft
from hasten.drafters.lookup import LookupDrafter
from hasten.models import llama
from hasten.models.exact_attention import BLOCK
from hasten.models.llama import build_llama
from test_engine import RandomTreeDrafter
from tiny import hf_reference, tiny_config

HALF = (torch.bfloat16, torch.float16)


def tiny(dtype, seed=0):
    # grouped-query attention as in the real model (3 query heads per kv head), long context
    cfg = tiny_config(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=8, num_layers=2,
                      max_position_embeddings=1024)
    return build_llama(cfg, hf_reference(cfg, seed, torch.float32).state_dict(), dtype=dtype)


def random_tree(rng, n, vocab):
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, n)]
    return DraftTree(torch.tensor([rng.randrange(vocab) for _ in range(n)]), torch.tensor(parents))


def prefill(model, prompt, capacity):
    model.reset(1, capacity)
    model.forward(torch.tensor([prompt]))
    model.commit()


@pytest.mark.parametrize("dtype", HALF)
def test_every_tree_node_equals_plain_decoding_of_its_path(dtype):
    model = tiny(dtype)
    assert model.exact  # half precision takes the exact attention path
    rng = random.Random(0)
    checked = 0
    for trial in range(12):
        # prompts around block boundaries too: the tree then straddles two attention blocks
        length = rng.choice([1, 2, BLOCK - 3, BLOCK, BLOCK + 1, 2 * BLOCK - 1, rng.randint(3, 300)])
        prompt = [rng.randrange(97) for _ in range(length)]
        tree, root = random_tree(rng, rng.randint(1, 40), 97), rng.randrange(97)
        prefill(model, prompt, 400)
        verified = model.forward(*verify_inputs(tree, root, model.length))
        for node in [-1] + list(range(tree.size)):
            path = [root] + [tree.token_list[i] for i in tree.path_to(node)]
            prefill(model, prompt, 400)
            for token in path:
                plain = model.forward(torch.tensor([[token]]))
                model.commit()
            assert torch.equal(plain.logits[0, -1], verified.logits[0, node + 1]), (trial, node)
            assert torch.equal(plain.hidden[0, -1], verified.hidden[0, node + 1])
            checked += 1
    assert checked > 150


@pytest.mark.parametrize("dtype", HALF)
def test_committed_kv_equals_plain_decoding(dtype):
    model = tiny(dtype)
    rng = random.Random(1)
    prompt = [rng.randrange(97) for _ in range(BLOCK + 5)]
    tree, root = random_tree(rng, 20, 97), 7
    deepest = max(range(tree.size), key=lambda i: len(tree.path_to(i)))
    path = tree.path_to(deepest)
    prefill(model, prompt, 400)
    model.forward(*verify_inputs(tree, root, model.length))
    model.commit(torch.tensor([0] + [i + 1 for i in path]))
    spec_k, spec_v = model._k[:, :, :, :model.length].clone(), model._v[:, :, :, :model.length].clone()
    prefill(model, prompt, 400)
    for token in [root] + [tree.token_list[i] for i in path]:
        model.forward(torch.tensor([[token]]))
        model.commit()
    assert torch.equal(model._k[:, :, :, :model.length], spec_k)
    assert torch.equal(model._v[:, :, :, :model.length], spec_v)


@pytest.mark.parametrize("dtype", HALF)
def test_greedy_speculative_output_equals_plain_for_every_drafter(dtype):
    model = tiny(dtype)
    draft = self_draft(model, 1)
    rng = random.Random(2)
    for i in range(8):
        prompt = [rng.randrange(97) for _ in range(rng.randint(2, 90))]
        prompt += prompt[-6:] * 3  # repeats, so lookup drafts and gets some right
        want = list(generate_plain(model, prompt, 60))
        for drafter in (LookupDrafter(), RandomTreeDrafter(i, oracle=want[1:]),
                        ModelDrafter(draft, depth=3)):
            got = list(generate_speculative(model, drafter, prompt, 60, tree_size=16))
            assert got == want, (i, drafter.name)


def test_the_check_passes_on_exact_kernels_and_catches_a_row_dependent_one(monkeypatch):
    model = tiny(torch.bfloat16)
    result = check_exactness(model, trials=2, max_nodes=8)
    assert result.exact and result.nodes_checked > 4 and result.nodes_differing == 0
    real = llama.Dense.forward

    def row_dependent(self, x):  # a kernel whose rows change with the row count
        y = real(self, x)
        return y + (x.shape[-2] > 2) * torch.finfo(y.dtype).eps * y
    monkeypatch.setattr(llama.Dense, "forward", row_dependent)
    result = check_exactness(model, trials=2, max_nodes=8)
    assert not result.exact and result.nodes_differing > 0 and "other logits" in result.why
    monkeypatch.undo()
    w = torch.randn(32, 16).to(torch.bfloat16)
    assert row_classes(w, sizes=(1, 2, 3, 5)) == [[1, 2, 3, 5]]
    bad = w.clone()

    class Shifty(torch.Tensor):  # matmul whose row 0 depends on how many rows share the call
        def __rmatmul__(self, x):
            return x @ bad.as_subclass(torch.Tensor) + (x.shape[0] >= 3)
    assert row_classes(bad.as_subclass(Shifty), sizes=(1, 2, 3, 5)) == [[1, 2], [3, 5]]


def test_the_generic_adapter_is_reported_not_exact():
    from hasten.models.hf_adapter import HFBackbone
    cfg = tiny_config()
    adapter = HFBackbone(hf_reference(cfg, 0, torch.float32))
    result = check_exactness(adapter)
    assert not result.exact and "generic transformers adapter" in result.why


def test_plain_steps_use_two_rows_and_commit_one():
    model = tiny(torch.bfloat16)
    prefill(model, [1, 2, 3], 8)
    seen = []
    real = llama.Block.forward
    llama.Block.forward = lambda self, x, *a, **k: seen.append(x.shape[1]) or real(self, x, *a, **k)
    try:
        out = model.forward(torch.tensor([[4]]))
    finally:
        llama.Block.forward = real
    model.commit()
    assert set(seen) == {2} and out.logits.shape[1] == 1 and model.length == 4
