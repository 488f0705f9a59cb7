"""Medusa end to end on a tiny model: distill (resumable), cache, Medusa-1, Medusa-2, and the
drafter reproducing plain greedy decoding token for token."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import GenerationStats, generate_plain
from hasten.medusa import distill as distill_mod
from hasten.medusa.data import build_cache, read_records, split_records
from hasten.medusa.distill import distill_ids, done_keys, file_prompts, first_human_turn
from hasten.medusa.drafter import MedusaDrafter, medusa_drafter
from hasten.medusa.heads import HeadsConfig, MedusaHeads, load_heads
from hasten.medusa.train import (TrainConfig, medusa_loss, project, run_medusa1,
                                 train_heads)
from hasten.models.config import LlamaConfig
from hasten.models.llama import build_llama
from hasten.models.sources import load_weights
from tiny import hf_reference, tiny_config

K = 3


def make_prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(f"p{seed}-{i}", torch.randint(3, 97, (int(torch.randint(3, 12, (1,), generator=g)),),
                                           generator=g).tolist(), f"text {i}") for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (ours + transformers, same weights) and 64 distilled answers."""
    torch.manual_seed(0)
    cfg = tiny_config()
    ref = hf_reference(cfg, 0, torch.float32)
    backbone = build_llama(cfg, ref.state_dict(), dtype=torch.float32)
    root = tmp_path_factory.mktemp("medusa")
    ref.save_pretrained(root / "base")
    prompts = make_prompts(64)
    distill_ids(backbone, prompts, root / "data.jsonl", max_new_tokens=48, batch_size=16,
                stop_ids=(2,), progress=False)
    return SimpleNamespace(backbone=backbone, cfg=cfg, root=root, prompts=prompts,
                           records=read_records(root / "data.jsonl"))


@pytest.fixture(scope="module")
def trained(tiny):
    """Medusa-1 heads trained on the tiny model's own answers (the whole recipe)."""
    out = tiny.root / "heads"
    meta = run_medusa1(tiny.backbone, tiny.records, out, name="tiny", model_key="tiny",
                       num_heads=K, cfg=TrainConfig(epochs=8, batch_size=64, lr=3e-2, log_every=10),
                       holdout=0.15, tree_nodes=24, progress=False, log=lambda m: None)
    return SimpleNamespace(out=out, meta=meta)


# ---- distillation ----------------------------------------------------------------------------

def test_distill_records_match_plain_greedy(tiny):
    recs = {r["key"]: r for r in tiny.records}
    assert len(recs) == len(tiny.records) == 64
    for key, ids, text in tiny.prompts[:3]:
        rec = recs[key]
        assert rec["prompt_ids"] == ids and rec["prompt"] == text
        assert rec["answer_ids"] == list(generate_plain(tiny.backbone, ids, 48, stop_ids=(2,)))


def test_distill_resumes_without_duplicates(tiny, tmp_path, monkeypatch):
    out = tmp_path / "d.jsonl"
    prompts = make_prompts(20, seed=5)
    real = distill_mod.generate_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # interrupted during the third batch
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_mod, "generate_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        distill_ids(tiny.backbone, prompts, out, max_new_tokens=8, batch_size=4, progress=False)
    assert len(done_keys(out)) == 8
    with open(out, "a") as f:  # a torn line from a crash mid-write
        f.write('{"key": "p5-1", "prompt_ids": [1, 2')
    monkeypatch.setattr(distill_mod, "generate_batch", real)
    stats = distill_ids(tiny.backbone, prompts, out, max_new_tokens=8, batch_size=4, progress=False)
    assert stats["skipped"] == 8 and stats["written"] == 12
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 20 and set(keys) == {p[0] for p in prompts}
    again = distill_ids(tiny.backbone, prompts, out, max_new_tokens=8, batch_size=4, progress=False)
    assert again["written"] == 0 and len(out.read_text().splitlines()) == 20


def test_distill_sampling_and_topk_logits(tiny, tmp_path):
    from safetensors.torch import load_file
    from hasten.decoding.sampling import SamplingParams

    out = tmp_path / "s.jsonl"
    distill_ids(tiny.backbone, make_prompts(6, seed=9), out, max_new_tokens=10, batch_size=3,
                params=SamplingParams(temperature=1.0), topk_logits=4, progress=False)
    recs = read_records(out)
    assert len(recs) == 6 and all(r["temperature"] == 1.0 for r in recs)
    rec = recs[0]
    shard = load_file(str(out.with_name(out.name + ".topk") / rec["topk_shard"]))
    ids, logp = shard[rec["key"] + ".ids"], shard[rec["key"] + ".logprobs"]
    assert ids.shape == logp.shape == (len(rec["answer_ids"]), 4)
    assert bool((logp[:, :-1] >= logp[:, 1:]).all()) and bool((logp <= 0).all())


def test_prompt_sources(tmp_path):
    assert first_human_turn({"conversations": [{"from": "system", "value": "s"},
                                               {"from": "human", "value": "hi"},
                                               {"from": "gpt", "value": "hello"}]}) == "hi"
    (tmp_path / "p.txt").write_text("one\ntwo\n\none\nthree\\nlines\n")
    assert file_prompts(tmp_path / "p.txt") == ["one", "two", "three\nlines"]
    rows = [{"question": "q1"}, {"conversations": [{"from": "human", "value": "c1"}]},
            {"turns": ["t1", "t2"]}, {"q": "custom"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    assert file_prompts(tmp_path / "p.jsonl") == ["q1", "c1", "t1"]
    (tmp_path / "f.jsonl").write_text(json.dumps(rows[3]) + "\n")
    assert file_prompts(tmp_path / "f.jsonl", field="q") == ["custom"]


# ---- Medusa-1 --------------------------------------------------------------------------------

def test_cache_rows_align_with_backbone(tiny, tmp_path):
    train, held = split_records(tiny.records, 0.2)
    assert held and train and not {r["key"] for r in train} & {r["key"] for r in held}
    cache = build_cache(tiny.backbone, tiny.records[:5], tmp_path / "c", K, "tiny", progress=False)
    assert len(cache) == sum(len(r["answer_ids"]) for r in tiny.records[:5])
    rec = tiny.records[0]
    tiny.backbone.reset(1, 128)
    out = tiny.backbone.forward(torch.tensor([rec["prompt_ids"] + rec["answer_ids"]]))
    p, a = len(rec["prompt_ids"]), len(rec["answer_ids"])
    torch.testing.assert_close(torch.from_numpy(cache.hidden[:a].astype("float32")),
                               out.hidden[0, p - 1:p - 1 + a], rtol=2e-3, atol=2e-3)
    # the LM head on a cached row gives the record's own (greedy) next token
    logits = torch.from_numpy(cache.hidden[:a].astype("float32")) @ tiny.backbone.lm_head.weight.T
    assert (logits.argmax(-1) == torch.tensor(cache.targets[:a, 0]).long()).float().mean() > 0.95
    # a second build with the same inputs reuses the cache
    assert build_cache(tiny.backbone, tiny.records[:5], tmp_path / "c", K, "tiny",
                       progress=False).meta["complete"]


def test_medusa1_lowers_loss_and_resumes(tiny, tmp_path):
    cache = build_cache(tiny.backbone, tiny.records, tmp_path / "c", K, "tiny", progress=False)
    lm = tiny.backbone.lm_head.weight
    heads = MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=97, num_heads=K), lm)
    h = torch.tensor(cache.hidden[:]).float()
    t = torch.tensor(cache.targets[:]).long()

    def loss():
        with torch.no_grad():
            return float(medusa_loss(project(heads.transform(h), lm), t[:, 1:])[0])

    before = loss()
    cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-2, log_every=5, save_every=10)
    history = train_heads(heads, lm, cache, tmp_path / "out", cfg, progress=False, log=lambda m: None)
    after = loss()
    assert after < before - 0.5
    assert history and len(history[0]["top1"]) == K and "top5" in history[0]
    assert (tmp_path / "out" / "checkpoint.pt").is_file()
    assert (tmp_path / "out" / "train_log.jsonl").is_file()
    # resuming a finished run changes nothing
    again = MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=97, num_heads=K), lm)
    train_heads(again, lm, cache, tmp_path / "out", cfg, progress=False, log=lambda m: None)
    assert torch.equal(again.weight, heads.weight)


def test_run_medusa1_saves_heads_with_tree(tiny, trained):
    meta = trained.meta
    assert meta["num_heads"] == K and meta["shared_lm_head"] and meta["dtype"] == "float32"
    assert len(meta["choices"]) == 24 and meta["choices"][0] == [0]
    e = meta["expected_lengths"]
    assert all(b >= a for a, b in zip(e, e[1:])) and e[-1] > 1.5
    assert meta["heldout"]["top1"][0] > 0.2
    loaded = load_heads(trained.out, tiny.backbone, "tiny")
    assert [list(c) for c in loaded.choices] == meta["choices"]


def test_medusa_greedy_equals_plain_greedy(tiny, trained):
    model = SimpleNamespace(backbone=tiny.backbone, name="tiny", folder=None)
    drafter = medusa_drafter(model, trained.out)
    prompts = [p for _, p, _ in make_prompts(6, seed=11)]
    gained = []
    for budget in (1, 5, 24):
        for prompt in prompts[:4]:
            plain = list(generate_plain(tiny.backbone, prompt, 40, stop_ids=(2,)))
            stats = GenerationStats()
            spec = list(generate_speculative(tiny.backbone, drafter, prompt, 40, stop_ids=(2,),
                                             tree_size=budget, stats=stats))
            assert spec == plain
            gained.append(stats.mean_accepted)
    # trained heads do get drafts accepted (the hidden/target alignment is right)
    assert sum(gained) / len(gained) > 1.3
    # random heads and a reduced draft vocabulary: still exactly plain greedy
    torch.manual_seed(7)
    heads = MedusaHeads(HeadsConfig(hidden_size=32, vocab_size=97, num_heads=4, num_layers=2))
    with torch.no_grad():
        heads.weight.normal_(0, 0.2)
        heads.bias.normal_(0, 0.2)
    heads.draft_vocab = torch.arange(0, 97, 2)
    rnd = MedusaDrafter(heads.eval(), None, tiny.backbone.lm_head.weight)
    for prompt in prompts[:3]:
        assert list(generate_speculative(tiny.backbone, rnd, prompt, 30, tree_size=16)) == \
            list(generate_plain(tiny.backbone, prompt, 30))


def test_research_tree_with_draft_vocab(tiny, trained, tmp_path):
    import shutil
    from hasten.medusa.train import research_tree

    folder = tmp_path / "h"
    shutil.copytree(trained.out, folder, ignore=shutil.ignore_patterns("cache", "checkpoint.pt"))
    tree = research_tree(tiny.backbone, folder, tiny.records, name="tiny", model_key="tiny",
                         holdout=0.15, tree_nodes=12, draft_vocab=40, progress=False, log=lambda m: None)
    loaded = load_heads(folder, tiny.backbone)
    assert len(loaded.choices) == 12 and loaded.heads.draft_vocab.numel() == 40
    assert loaded.meta["expected_lengths"] == tree["expected_lengths"]


# ---- Medusa-2 --------------------------------------------------------------------------------

def test_medusa2_lora_lowers_loss_and_exports(tiny):
    pytest.importorskip("peft")
    from hasten.medusa.medusa2 import Medusa2Config, train_medusa2

    cfg = Medusa2Config(epochs=15, batch_size=32, lr=1e-2, lora_r=4, lora_alpha=8, heads_warmup=0,
                        lambda0=1.0, log_every=1)
    target = train_medusa2(tiny.root / "base", tiny.records[:40], tiny.root / "m2", cfg,
                           num_heads=K, holdout=0.1, progress=False, log=lambda m: None)
    log = [json.loads(line) for line in (tiny.root / "m2" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["backbone"] < 1e-6  # LoRA starts as the identity: no divergence yet
    assert log[-1]["loss"] < log[0]["loss"] - 0.3
    assert log[-1]["backbone"] < 0.1  # the KL keeps the backbone close to the original
    # the merged folder loads in our runtime, and its heads load onto it
    merged = build_llama(LlamaConfig.from_hf_dict(json.loads((target / "config.json").read_text())),
                         load_weights(target))
    loaded = load_heads(target / "medusa", merged)
    assert loaded.choices and loaded.meta["training"]["medusa"] == 2
    drafter = medusa_drafter(SimpleNamespace(backbone=merged, name="m2", folder=target))
    prompt = tiny.prompts[0][1]
    assert list(generate_speculative(merged, drafter, prompt, 20, tree_size=8)) == \
        list(generate_plain(merged, prompt, 20))


def test_medusa2_full_finetune_ce(tiny, tmp_path):
    from hasten.medusa.medusa2 import Medusa2Config, train_medusa2

    cfg = Medusa2Config(epochs=3, batch_size=16, lr=1e-3, lora_r=0, backbone_loss="ce",
                        heads_warmup=2, log_every=1)
    target = train_medusa2(tiny.root / "base", tiny.records[:20], tmp_path / "full", cfg,
                           num_heads=2, holdout=0.1, progress=False, log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [e["lambda"] for e in log] == [0.0, pytest.approx(0.2 * 0.7071, abs=1e-3), 0.2]
    assert (target / "medusa" / "medusa_config.json").is_file()


# ---- command line ----------------------------------------------------------------------------

def test_cli_parsers():
    from hasten.commands import build_parser

    parser = build_parser()
    a = parser.parse_args(["distill", "--prompts", "sharegpt", "--limit", "5", "--out", "x.jsonl",
                           "--batch-size", "8", "--temperature", "0.7", "--device", "cuda"])
    assert (a.limit, a.batch_size, a.temperature, a.device) == (5, 8, 0.7, "cuda")
    a = parser.parse_args(["train", "medusa", "--data", "x.jsonl", "--out", "h", "--epochs", "3",
                           "--draft-vocab", "8192"])
    assert a.train_target == "medusa" and a.epochs == 3 and not a.joint and a.draft_vocab == 8192
    a = parser.parse_args(["train", "medusa", "--data", "x", "--out", "h", "--joint", "--lora-r", "0"])
    assert a.joint and a.lora_r == 0
    a = parser.parse_args(["train", "medusa-tree", "--heads-dir", "h", "--data", "x", "--tree-nodes", "16"])
    assert a.tree_nodes == 16
    with pytest.raises(SystemExit):  # --tree-size is the per-step draft size everywhere else
        parser.parse_args(["train", "medusa", "--data", "x", "--out", "h", "--tree-size", "16"])


def test_medusa1_on_a_reduced_draft_vocabulary(tiny, tmp_path):
    meta = run_medusa1(tiny.backbone, tiny.records, tmp_path / "h", num_heads=2, draft_vocab=40,
                       cfg=TrainConfig(epochs=3, batch_size=64, lr=3e-2), holdout=0.15, tree_nodes=8,
                       save_dtype=torch.float16, progress=False, log=lambda m: None)
    assert meta["draft_vocab_size"] == 40 and meta["dtype"] == "float16"
    loaded = load_heads(tmp_path / "h", tiny.backbone)
    vocab = set(loaded.heads.draft_vocab.tolist())
    drafter = MedusaDrafter(loaded.heads, loaded.choices, tiny.backbone.lm_head.weight)
    h = torch.randn(32)
    assert set(drafter.propose([1], 8, h).token_list) <= vocab
    prompt = tiny.prompts[1][1]
    assert list(generate_speculative(tiny.backbone, drafter, prompt, 30, tree_size=8)) == \
        list(generate_plain(tiny.backbone, prompt, 30))
