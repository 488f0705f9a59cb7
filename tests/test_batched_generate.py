"""`generate_batch` (used by `hasten distill`): continuous batching on the lean runtime, the
padded batch on the transformers adapter; both give each prompt its solo tokens."""

from __future__ import annotations

import torch

from hasten.decoding.generate import generate_batch, generate_plain
from hasten.models.hf_adapter import HFBackbone
from hasten.models.llama import build_llama
from tiny import hf_reference, tiny_config

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15], [40] * 20]


def test_bfloat16_batch_rows_equal_solo_decoding_bit_for_bit():
    cfg = tiny_config()
    weights = {k: v * 10 if v.dim() == 2 else v
               for k, v in hf_reference(cfg, 0, torch.float32).state_dict().items()}
    model = build_llama(cfg, weights, dtype=torch.bfloat16)  # exact attention
    want = [list(generate_plain(model, p, 40)) for p in PROMPTS]
    assert generate_batch(model, PROMPTS, 40) == want
    stop = want[0][5]  # rows that stop early leave the batch; the others go on unchanged
    cut = [w[:w.index(stop) + 1] if stop in w else w for w in want]
    assert generate_batch(model, PROMPTS, 40, stop_ids=(stop,)) == cut
    assert generate_batch(model, PROMPTS, 0) == [[]] * len(PROMPTS)


def test_the_transformers_adapter_takes_the_padded_batch():
    adapter = HFBackbone(hf_reference(tiny_config(), 0, torch.float64))
    want = [list(generate_plain(adapter, p, 10)) for p in PROMPTS]
    assert generate_batch(adapter, PROMPTS, 10) == want
