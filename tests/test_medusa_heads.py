"""Medusa heads, their files, training targets and tree search (no training here: fast)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hasten.decoding.tree import DraftTree
from hasten.errors import HastenError
from hasten.medusa.data import IGNORE, head_targets, record_rows
from hasten.medusa.drafter import MedusaDrafter, find_heads
from hasten.medusa.heads import (HeadsConfig, MedusaHeads, base_identity, is_heads_folder,
                                 load_heads, save_heads)
from hasten.medusa.train import medusa_loss
from hasten.medusa.tree_search import (default_choices, grow_tree,
                                       independent_prob, marginal_accuracy, search_tree, valid_tree)
from hasten.models.llama import build_llama
from tiny import hf_reference, tiny_config


def tiny_backbone(seed=0, **overrides):
    cfg = tiny_config(**overrides)
    return build_llama(cfg, hf_reference(cfg, seed, torch.float32).state_dict(), dtype=torch.float32)


def random_heads(cfg: HeadsConfig, lm=None, seed=0, scale=0.3) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(cfg, lm)
    with torch.no_grad():
        heads.weight.normal_(0, scale / cfg.hidden_size ** 0.5)
        heads.bias.normal_(0, scale)
    return heads.eval().requires_grad_(False)


# ---- heads -----------------------------------------------------------------------------------

def test_shapes_and_zero_init_identity():
    torch.manual_seed(0)
    lm = torch.randn(97, 32)
    for layers in (0, 1, 3):
        heads = MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=97, num_heads=4, num_layers=layers))
        assert heads.weight.shape == (4, layers, 32, 32) and heads.bias.shape == (4, layers, 32)
        h = torch.randn(5, 7, 32)
        states = heads.transform(h)
        assert states.shape == (4, 5, 7, 32)
        for k in range(4):  # a fresh head is the identity before the projection
            torch.testing.assert_close(states[k], h, rtol=0, atol=0)
        logits = heads.logits(h, lm)
        assert logits.shape == (4, 5, 7, 97)
        torch.testing.assert_close(logits[2], h @ lm.T)
        assert heads.transform(h, num_heads=2).shape == (2, 5, 7, 32)


def test_every_head_and_layer_has_its_own_weights():
    heads = MedusaHeads(HeadsConfig(hidden_size=8, vocab_size=11, num_heads=3, num_layers=2))
    ptrs = {heads.weight[k, j].data_ptr() for k in range(3) for j in range(2)}
    assert len(ptrs) == 6
    with torch.no_grad():
        heads.weight[1, 0].fill_(1.0)
    assert heads.weight[1, 1].abs().sum() == 0 and heads.weight[0, 0].abs().sum() == 0


def test_own_projection_starts_as_lm_head_and_matches_per_head_loop():
    torch.manual_seed(1)
    lm = torch.randn(50, 16)
    cfg = HeadsConfig(hidden_size=16, vocab_size=50, num_heads=3, num_layers=2, shared_lm_head=False)
    heads = random_heads(cfg, lm)
    for k in range(3):
        torch.testing.assert_close(heads.proj[k], lm)
    h = torch.randn(4, 16)
    fast = heads.logits(h)
    for k in range(3):  # reference: one head at a time, one layer at a time
        x = h
        for j in range(2):
            x = x + F.silu(x @ heads.weight[k, j].T + heads.bias[k, j])
        torch.testing.assert_close(fast[k], x @ heads.proj[k].T, rtol=1e-5, atol=1e-5)


# ---- files -----------------------------------------------------------------------------------

def test_save_load_round_trip_and_wrong_base_model(tmp_path):
    model = tiny_backbone(seed=0)
    cfg = HeadsConfig(hidden_size=32, vocab_size=97, num_heads=3, num_layers=2)
    heads = random_heads(cfg)
    heads.draft_vocab = torch.tensor([2, 5, 7, 11, 40])
    choices = [(0,), (1,), (0, 0), (0, 0, 0)]
    save_heads(heads, tmp_path / "h", base_identity(model, "tiny"), choices, note="x")
    assert is_heads_folder(tmp_path / "h")
    loaded = load_heads(tmp_path / "h", model, "tiny")
    assert loaded.choices == choices and loaded.meta["note"] == "x"
    assert torch.equal(loaded.heads.draft_vocab, heads.draft_vocab)
    h = torch.randn(6, 32)
    torch.testing.assert_close(loaded.heads.logits(h, model.lm_head.weight),
                               heads.logits(h, model.lm_head.weight))
    # float16 files load within half-precision error
    save_heads(heads, tmp_path / "h16", base_identity(model), choices, dtype=torch.float16)
    half = load_heads(tmp_path / "h16", model)
    assert half.heads.weight.dtype == torch.float32
    torch.testing.assert_close(half.heads.transform(h), heads.transform(h), rtol=1e-2, atol=1e-2)
    # the same model in another dtype is still the same model
    load_heads(tmp_path / "h", model.to(torch.float64))
    model.to(torch.float32)
    other = tiny_backbone(seed=1)
    with pytest.raises(HastenError, match="another base model"):
        load_heads(tmp_path / "h", other, "other")
    with pytest.raises(HastenError, match="vocab_size"):
        load_heads(tmp_path / "h", tiny_backbone(seed=0, vocab_size=101))
    with pytest.raises(HastenError, match="no Medusa heads"):
        load_heads(tmp_path / "missing")
    # find_heads: an explicit folder, then <model folder>/medusa, else a clear error
    fake = SimpleNamespace(backbone=model, name="tiny", folder=tmp_path)
    with pytest.raises(HastenError, match="no Medusa heads for tiny"):
        find_heads(fake)
    save_heads(heads, tmp_path / "medusa", base_identity(model), choices)
    assert find_heads(fake).path == tmp_path / "medusa"


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "pt-shared-layers"])
def test_published_medusa_layout(tmp_path, fmt):
    """FasterDecoding/Medusa's release: config.json + medusa_lm_head.pt/.safetensors with
    keys {head}.{layer}.linear.weight|bias and {head}.{num_layers}.weight."""
    torch.manual_seed(2)
    k, n, d, v = 3, 2, 16, 40
    sd = {}
    for i in range(k):
        for j in range(n):
            if fmt == "pt-shared-layers" and j > 0:
                continue  # a `[ResBlock] * n` checkpoint saved without its aliases
            sd[f"{i}.{j}.linear.weight"] = torch.randn(d, d) * 0.1
            sd[f"{i}.{j}.linear.bias"] = torch.randn(d) * 0.1
        sd[f"{i}.{n}.weight"] = torch.randn(v, d)
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": k, "medusa_num_layers": n, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(tmp_path / "medusa_lm_head.safetensors"))
    else:
        torch.save(sd, tmp_path / "medusa_lm_head.pt")
    loaded = load_heads(tmp_path)
    assert loaded.heads.config == HeadsConfig(hidden_size=d, vocab_size=v, num_heads=k,
                                              num_layers=n, shared_lm_head=False)
    assert loaded.meta["base_model"]["name"] == "lmsys/vicuna-7b-v1.3"
    h = torch.randn(5, d)
    out = loaded.heads.logits(h)
    for i in range(k):  # the reference: nn.Sequential(ResBlock..., Linear) run one head at a time
        x = h
        for j in range(n):
            src = 0 if fmt == "pt-shared-layers" else j
            x = x + F.silu(x @ sd[f"{i}.{src}.linear.weight"].T + sd[f"{i}.{src}.linear.bias"])
        torch.testing.assert_close(out[i], x @ sd[f"{i}.{n}.weight"].T, rtol=1e-5, atol=1e-5)
    # shape checks still protect a model of another size
    with pytest.raises(HastenError, match="another base model.*vocab_size 40 != 97"):
        load_heads(tmp_path, tiny_backbone())


# ---- targets and loss masking ----------------------------------------------------------------

def test_head_targets_are_answer_tokens_only():
    prompt = [101, 102, 103, 104, 105]
    answer = [1, 2, 3, 4, 5, 6, 7]
    tokens = torch.tensor(prompt + answer)
    k = 3
    t = head_targets(tokens, len(prompt), k)
    assert t.shape == (12, k)
    valid = t != IGNORE
    # every target is an answer token, and every answer token after the first two is a target
    assert set(t[valid].tolist()) <= set(answer)
    for h in range(k):
        rows = valid[:, h].nonzero().flatten().tolist()
        # position t (>= P-1) predicts token t + 2 + h
        assert rows == list(range(len(prompt) - 1, len(tokens) - 2 - h))
        assert [int(t[r, h]) for r in rows] == answer[1 + h:]
    assert int(valid.sum()) == sum(len(answer) - 1 - h for h in range(k))
    # the cache rows: positions P-1..L-2, base token = answer[i], head k = answer[i + 1 + k]
    first, n, tg = record_rows({"prompt_ids": prompt, "answer_ids": answer}, k)
    assert (first, n) == (4, 7)
    assert tg[:, 0].tolist() == answer
    assert tg[0, 1:].tolist() == [2, 3, 4] and tg[-1, 1:].tolist() == [IGNORE] * 3


def test_loss_counts_answer_tokens_only():
    torch.manual_seed(3)
    prompt, answer = [10, 11, 12, 13], [20, 21, 22, 23, 24, 25]
    tokens = torch.tensor(prompt + answer)
    k, v = 2, 30
    targets = head_targets(tokens, len(prompt), k)
    logits = torch.randn(k, len(tokens), v, requires_grad=True)
    loss, stats = medusa_loss(logits, targets)
    assert stats["count"] == [len(answer) - 1, len(answer) - 2]
    # reference: mean CE over answer targets, weighted 0.8^k
    ref = sum(0.8 ** h * F.cross_entropy(logits[h, len(prompt) - 1:len(tokens) - 2 - h],
                                         torch.tensor(answer[1 + h:])) for h in range(k))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    # no gradient reaches prompt positions (the mask really masks)
    assert logits.grad[:, :len(prompt) - 1].abs().sum() == 0
    assert logits.grad[0, len(prompt) - 1].abs().sum() > 0
    # changing the logits at masked positions leaves the loss unchanged
    other = logits.detach().clone()
    other[:, :len(prompt) - 1] = 100.0
    assert torch.equal(medusa_loss(other, targets)[0], loss.detach())


# ---- tree search -----------------------------------------------------------------------------

def fake_ranks(n=4000, k=4, seed=0):
    """Ranks of correlated heads: a hidden 'easiness' makes all heads right together."""
    rng = np.random.default_rng(seed)
    easy = rng.random(n) < 0.5
    ranks = np.empty((n, k), dtype=np.int32)
    for h in range(k):
        p_top = np.where(easy, 0.8 - 0.1 * h, 0.2 - 0.04 * h)
        hit = rng.random(n) < p_top
        ranks[:, h] = np.where(hit, 0, rng.geometric(0.35, n))
    return ranks


@pytest.mark.parametrize("method", ["joint", "independent"])
def test_tree_search_valid_and_monotone(method):
    ranks = fake_ranks()
    res = search_tree(ranks, budget=60, max_rank=8, method=method)
    choices = [tuple(c) for c in res["choices"]]
    assert len(choices) == 60 and valid_tree(choices)
    assert choices[0] == (0,)
    assert max(len(c) for c in choices) <= 4 and max(max(c) for c in choices) < 8
    e = res["expected_lengths"]
    assert len(e) == 61 and e[0] == 1.0
    assert all(b >= a for a, b in zip(e, e[1:]))
    # every prefix is itself a valid tree (a drafter may cut it to any budget) ...
    for n in (1, 5, 17, 33):
        assert valid_tree(choices[:n])
        tree = DraftTree.from_choices(choices[:n], [list(range(100 + 10 * h, 110 + 10 * h)) for h in range(4)])
        assert tree.size == n
    # ... and re-running with a smaller budget gives exactly that prefix
    small = search_tree(ranks, budget=17, max_rank=8, method=method)
    assert small["choices"] == res["choices"][:17]


def test_joint_estimate_beats_independence_on_correlated_heads():
    ranks = fake_ranks(n=20000)
    acc = marginal_accuracy(ranks, 8)
    assert acc.shape == (4, 8) and np.all(acc.sum(1) <= 1)
    # the empirical chance that head 0 and head 1 are both right exceeds the product
    joint = search_tree(ranks, 8, 8, "joint")["expected_lengths"][-1]
    indep = search_tree(ranks, 8, 8, "independent")["expected_lengths"][-1]
    both = np.mean((ranks[:, 0] == 0) & (ranks[:, 1] == 0))
    assert both > acc[0, 0] * acc[1, 0]
    assert joint > indep


def test_grow_tree_expected_length_formula():
    acc = np.array([[0.5, 0.25], [0.4, 0.1]])
    choices, e = grow_tree(independent_prob(acc), 2, 2, 10)
    assert choices == [(0,), (1,), (0, 0), (1, 0), (0, 1), (1, 1)]  # everything, best first
    assert e == pytest.approx([1, 1.5, 1.75, 1.95, 2.05, 2.1, 2.125])


def test_default_choices_are_a_valid_tree():
    c = default_choices(4, 40)
    assert len(c) == 40 and valid_tree(c)


def test_drafter_plan_matches_from_choices():
    torch.manual_seed(4)
    lm = torch.randn(97, 32)
    heads = random_heads(HeadsConfig(hidden_size=32, vocab_size=97, num_heads=4, num_layers=1))
    choices = default_choices(4, 40)
    drafter = MedusaDrafter(heads, choices, lm)
    h = torch.randn(32)
    top = heads.logits(h, lm).topk(10, dim=-1).indices
    for budget in (0, 1, 3, 10, 40, 100):
        tree = drafter.propose([1, 2, 3], budget, h)
        ref = DraftTree.from_choices(choices[:budget], top) if budget else DraftTree.empty()
        assert tree.token_list == ref.token_list and tree.parent_list == ref.parent_list
        assert tree.size == min(budget, 40)
    assert drafter.propose([1], 8, None).size == 0
    # a reduced draft vocabulary only ever proposes its own tokens
    heads.draft_vocab = torch.arange(0, 97, 3)
    small = MedusaDrafter(heads, choices, lm)
    tree = small.propose([1], 40, h)
    assert tree.size == 40 and all(t % 3 == 0 for t in tree.token_list)
