"""EAGLE end to end on a tiny model: its own answers -> features -> a trained head that gets
drafts accepted, while greedy output stays plain greedy token for token."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import GenerationStats, generate_plain
from hasten.eagle.data import build_features, trained_positions
from hasten.eagle.drafter import EagleDrafter, eagle_drafter
from hasten.eagle.head import EagleConfig, EagleHead
from hasten.eagle.train import EagleTrainConfig, evaluate, run_eagle
from hasten.medusa.data import read_records
from hasten.medusa.distill import distill_ids
from hasten.models.llama import build_llama
from test_medusa_training import make_prompts
from tiny import hf_reference, tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config()
    backbone = build_llama(cfg, hf_reference(cfg, 0, torch.float32).state_dict(), dtype=torch.float32)
    root = tmp_path_factory.mktemp("eagle")
    distill_ids(backbone, make_prompts(64), root / "data.jsonl", max_new_tokens=48, batch_size=16,
                stop_ids=(2,), progress=False)
    return SimpleNamespace(backbone=backbone, root=root, records=read_records(root / "data.jsonl"))


@pytest.fixture(scope="module")
def trained(tiny):
    out = tiny.root / "head"
    cfg = EagleTrainConfig(epochs=40, batch_tokens=2048, lr=1e-2, unroll=1, save_every=50)
    record = run_eagle(tiny.backbone, tiny.records, out, name="tiny", model_key="tiny", cfg=cfg,
                       holdout=6, draft_vocab=0, progress=False)
    return SimpleNamespace(out=out, record=record)


def test_feature_cache_holds_the_backbones_states(tiny, tmp_path):
    cache = build_features(tiny.backbone, tiny.records[:5], tmp_path / "c", "tiny", progress=False)
    tokens, feats, prompt = cache.sequence(2)
    rec = tiny.records[2]
    assert tokens.tolist() == rec["prompt_ids"] + rec["answer_ids"]
    assert prompt == len(rec["prompt_ids"])
    tiny.backbone.reset(1, 128)
    states = tiny.backbone.forward(torch.tensor([tokens.tolist()])).hidden[0]
    torch.testing.assert_close(torch.from_numpy(feats.astype("float32")), states, atol=2e-3, rtol=2e-3)
    again = build_features(tiny.backbone, tiny.records[:5], tmp_path / "c", "tiny", progress=False)
    assert again.meta["complete"] and again.num_tokens == cache.num_tokens


def test_trained_positions_cover_answers_only():
    mask = trained_positions(torch.tensor([6]), torch.tensor([3]), 5, 0)
    # Pair i predicts token i + 2 (answer tokens start at 3) and needs f_{i+1} (i + 1 < 6).
    assert mask[0].tolist() == [False, True, True, True, True]
    mask = trained_positions(torch.tensor([6]), torch.tensor([3]), 5, 1)
    assert mask[0].tolist() == [True, True, True, True, False]


def test_training_raises_agreement_and_drafts_get_accepted(tiny, trained):
    held = trained.record["heldout"]
    assert held["acc1"] > 0.4, held
    # An untrained head of the same shape agrees far less often.
    head = EagleHead(EagleConfig.like(tiny.backbone.config))
    from hasten.eagle.data import FeatureCache
    from hasten.eagle.train import SubsetCache, split_cache_indices
    cache = FeatureCache(trained.out / "cache")
    _, held_ids = split_cache_indices(cache, 6)
    fresh = evaluate(head, SubsetCache(cache, held_ids), tiny.backbone.embed.weight.float(),
                     tiny.backbone.lm_head.weight.float(), EagleTrainConfig(unroll=1), torch.device("cpu"))
    assert held["acc1"] > fresh["acc1"] + 0.2

    model = SimpleNamespace(backbone=tiny.backbone, name="tiny", folder=None)
    drafter = eagle_drafter(model, trained.out)
    untrained = EagleDrafter(head, tiny.backbone.embed.weight, tiny.backbone.lm_head.weight)
    gains = {"trained": [], "untrained": []}
    for _, prompt, _ in make_prompts(5, seed=11):
        plain = list(generate_plain(tiny.backbone, prompt, 40, stop_ids=(2,)))
        for label, d in (("trained", drafter), ("untrained", untrained)):
            stats = GenerationStats()
            out = list(generate_speculative(tiny.backbone, d, prompt, 40, stop_ids=(2,),
                                            tree_size=16, stats=stats))
            assert out == plain
            gains[label].append(stats.mean_accepted)
    trained_mean = sum(gains["trained"]) / 5
    assert trained_mean > 2.0 and trained_mean > sum(gains["untrained"]) / 5 + 0.5, gains


def test_expected_lengths_are_measured_and_used(tiny, trained):
    e = trained.record["expected_lengths"]
    assert len(e) == 65 and e[0] == 1.0
    assert all(b >= a for a, b in zip(e, e[1:]))  # more nodes never lose an accepted draft
    assert e[-1] > 1.5  # the trained head's drafts are accepted when decoding held-out prompts
    drafter = eagle_drafter(SimpleNamespace(backbone=tiny.backbone, name="tiny", folder=None), trained.out)
    assert drafter.expected_lengths == e


def test_a_bfloat16_models_head_drafts_in_float32_blocks_where_our_kernels_run(tiny, trained):
    """Torch's bfloat16 matmuls are slow on CPUs without AMX; drafts need no exactness, so the
    head runs on our Q8_0 kernels in float32 there, and greedy output is still plain's."""
    from hasten.models.quant_kernels import vector_kernels
    cfg = tiny_config()
    half = build_llama(cfg, hf_reference(cfg, 0, torch.float32).state_dict(), dtype=torch.bfloat16)
    drafter = eagle_drafter(SimpleNamespace(backbone=half, name="tiny", folder=None), trained.out)
    if vector_kernels():
        assert drafter.dtype == torch.float32 and drafter.lm_head_blocks is not None
    else:
        assert drafter.dtype == torch.bfloat16 and drafter.lm_head_blocks is None
    for _, prompt, _ in make_prompts(3, seed=5):
        plain = list(generate_plain(half, prompt, 32, stop_ids=(2,)))
        stats = GenerationStats()
        assert list(generate_speculative(half, drafter, prompt, 32, stop_ids=(2,), tree_size=16,
                                         stats=stats)) == plain
        assert stats.mean_accepted > 1.2  # its drafts still get accepted


def test_a_head_of_another_model_is_refused(tiny, trained):
    cfg = tiny_config()
    other = build_llama(cfg, hf_reference(cfg, 9, torch.float32).state_dict(), dtype=torch.float32)
    from hasten.errors import HastenError
    with pytest.raises(HastenError, match="trained for tiny"):
        eagle_drafter(SimpleNamespace(backbone=other, name="other", folder=None), trained.out)


def test_sharegpt_records_take_first_later_or_all_exchanges(monkeypatch):
    """Opening exchanges, the ones after them (each a prompt of its own), or all; `skip`
    passes over usable exchanges; malformed turns are left out, not fatal."""
    from hasten.data import datasets
    from hasten.eagle.data import sharegpt_records
    from hasten.errors import HastenError
    chats = [{"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
                                {"from": "human", "value": "q3"}, {"from": "gpt", "value": " "},
                                {"from": "human", "value": "q4"}]},
             {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"},
                                {"from": "human", "value": "q5"}, ["bad"],
                                {"from": "human", "value": "q6"}, {"from": "gpt", "value": "a6"}]},
             {"conversations": [{"from": "human", "value": "q7"}, {"from": "gpt", "value": "a7"}]}]
    monkeypatch.setattr(datasets, "sharegpt_conversations", lambda progress=True: iter(chats))

    def encode(text, chat):  # one id per character; prompts marked by a leading 0
        return ([0] if chat else []) + [ord(c) for c in text]

    def pairs(**kw):
        return [(bytes(r["prompt_ids"][1:]).decode(), bytes(r["answer_ids"][:-1]).decode())
                for r in sharegpt_records(encode, 9, 100, 64, progress=False, **kw)]
    assert pairs() == [("q1", "a1"), ("q7", "a7")]
    assert pairs(turns="later") == [("q2", "a2"), ("q6", "a6")]
    assert pairs(turns="all") == [("q1", "a1"), ("q2", "a2"), ("q6", "a6"), ("q7", "a7")]
    assert pairs(turns="all", skip=2) == [("q6", "a6"), ("q7", "a7")]
    with pytest.raises(HastenError, match="turns must be one of"):
        pairs(turns="second")


def test_cli_parses_train_eagle():
    from hasten.commands import train
    parser = argparse.ArgumentParser()
    train.register(parser.add_subparsers())
    args = parser.parse_args(["train", "eagle", "--data", "sharegpt", "--out", "x", "--unroll", "0"])
    assert args.train_target == "eagle" and args.unroll == 0 and args.draft_vocab == 8192
    assert (args.turns, args.skip) == ("first", 0)
    args = parser.parse_args(["train", "eagle", "--data", "sharegpt", "--out", "x", "--turns",
                              "later", "--skip", "5"])
    assert (args.turns, args.skip) == ("later", 5)


def test_cli_trains_a_head_that_generate_uses(tiny_folder, tmp_path, capsys):
    """`hasten train eagle` on a distilled JSONL, then `hasten generate --draft eagle` with it:
    the same text as plain decoding."""
    import json

    from hasten.commands import main
    g = torch.Generator().manual_seed(1)
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for i in range(12):
            rec = {"key": f"k{i}", "prompt_ids": torch.randint(3, 19, (4,), generator=g).tolist(),
                   "answer_ids": torch.randint(3, 19, (20,), generator=g).tolist()}
            f.write(json.dumps(rec) + "\n")
    out = tmp_path / "head"
    assert main(["train", "eagle", "--model", str(tiny_folder), "--data", str(data), "--out", str(out),
                 "--epochs", "2", "--holdout", "2", "--draft-vocab", "0", "--batch-tokens", "256"]) == 0
    assert (out / "eagle_config.json").is_file() and not (out / "checkpoint.pt").exists()
    capsys.readouterr()
    args = ["generate", "--model", str(tiny_folder), "--raw", "the cat sat", "-n", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft", "eagle", "--eagle-head", str(out)]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--draft", "eagle", "--eagle-head", str(tmp_path / "nope")]) == 2
    assert "no EAGLE head" in capsys.readouterr().err
    # --init continues from that head: its weights are the starting point (lr 0: unchanged)
    again = tmp_path / "again"
    assert main(["train", "eagle", "--model", str(tiny_folder), "--data", str(data), "--out",
                 str(again), "--epochs", "0", "--lr", "0", "--holdout", "2", "--init", str(out)]) == 0
    from hasten.eagle.head import load_head
    before, after = load_head(out).head.state_dict(), load_head(again).head.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert main(["train", "eagle", "--model", str(tiny_folder), "--data", str(data), "--out",
                 str(tmp_path / "x"), "--init", str(tmp_path / "nope")]) == 2
