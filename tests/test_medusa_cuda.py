"""Medusa on CUDA (skipped without a GPU): distill with a CUDA sampler, cache, train on the
GPU (preloaded rows), draft exactly, Medusa-2 with LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from hasten.decoding.engine import generate_speculative
from hasten.decoding.generate import generate_plain
from hasten.decoding.sampling import SamplingParams
from hasten.medusa.data import read_records
from hasten.medusa.distill import distill_ids
from hasten.medusa.drafter import MedusaDrafter
from hasten.medusa.heads import load_heads
from hasten.medusa.train import TrainConfig, run_medusa1
from hasten.models.llama import build_llama
from tiny import hf_reference, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_medusa_pipeline_on_cuda(tmp_path, dtype):
    cfg = tiny_config()
    ref = hf_reference(cfg, 0, torch.float32)
    backbone = build_llama(cfg, ref.state_dict(), dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [(f"k{i}", torch.randint(3, 97, (5 + i % 7,), generator=g).tolist(), None) for i in range(48)]
    distill_ids(backbone, prompts[:8], tmp_path / "d.jsonl", 24, SamplingParams(temperature=0.8),
                batch_size=4, topk_logits=3, progress=False)
    distill_ids(backbone, prompts, tmp_path / "d.jsonl", 32, batch_size=16, progress=False)
    records = read_records(tmp_path / "d.jsonl")
    assert len(records) == 48
    meta = run_medusa1(backbone, records, tmp_path / "h", num_heads=3, device="cuda",
                       cfg=TrainConfig(epochs=6, batch_size=64, lr=3e-2), holdout=0.15,
                       tree_size=16, draft_vocab=60, progress=False, log=lambda m: None)
    assert meta["draft_vocab_size"] == 60 and len(meta["choices"]) == 16
    loaded = load_heads(tmp_path / "h", backbone)
    assert loaded.heads.weight.device.type == "cuda" and loaded.heads.weight.dtype == dtype
    drafter = MedusaDrafter(loaded.heads, loaded.choices, backbone.lm_head.weight)
    for _, prompt, _ in prompts[:4]:
        got = list(generate_speculative(backbone, drafter, prompt, 30, tree_size=16))
        if dtype == torch.float32:  # half precision may flip near-ties between shapes
            assert got == list(generate_plain(backbone, prompt, 30))


def test_medusa2_on_cuda(tmp_path):
    pytest.importorskip("peft")
    from hasten.medusa.medusa2 import Medusa2Config, train_medusa2

    cfg = tiny_config()
    ref = hf_reference(cfg, 0, torch.float32)
    ref.save_pretrained(tmp_path / "base")
    backbone = build_llama(cfg, ref.state_dict(), device="cuda")
    g = torch.Generator().manual_seed(1)
    prompts = [(f"k{i}", torch.randint(3, 97, (6,), generator=g).tolist(), None) for i in range(24)]
    distill_ids(backbone, prompts, tmp_path / "d.jsonl", 24, batch_size=12, progress=False)
    target = train_medusa2(tmp_path / "base", read_records(tmp_path / "d.jsonl"), tmp_path / "m2",
                           Medusa2Config(epochs=10, batch_size=16, lr=1e-2, lora_r=4, heads_warmup=0,
                                         lambda0=1.0, log_every=1),
                           device="cuda", num_heads=2, progress=False, log=lambda m: None)
    log = [json.loads(x) for x in (tmp_path / "m2" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert (target / "medusa" / "medusa_heads.safetensors").is_file()
