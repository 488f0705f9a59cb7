"""Plain decoding of one sequence (the reference every speedup is measured against) and
batched plain decoding of many.

One sequence goes through the same loop as speculative decoding (`engine.py`) with no
drafter: every step is the plain step, so the two share one prologue, one stop rule and one
set of statistics, and a speculative run whose drafter drafts nothing is a plain run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..models.backbone import Backbone
from ..models.llama import LlamaModel
from .batched import BatchedDecoder
from .engine import generate_speculative
from .sampling import SamplingParams, choose
from .stats import GenerationStats, cache_capacity

__all__ = ["GenerationStats", "cache_capacity", "generate_batch", "generate_plain"]


def generate_plain(backbone: Backbone, prompt: list[int], max_new_tokens: int,
                   params: SamplingParams = SamplingParams(), stop_ids: tuple[int, ...] = (),
                   generator: torch.Generator | None = None, max_positions: int = 4096,
                   stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new token ids one by one: plain autoregressive decoding."""
    return generate_speculative(backbone, None, prompt, max_new_tokens, params, stop_ids,
                                generator, max_positions, stats=stats)


@torch.inference_mode()
def generate_batch(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int,
                   params: SamplingParams = SamplingParams(), stop_ids: tuple[int, ...] = (),
                   generator: torch.Generator | None = None, pad_id: int = 0,
                   max_positions: int = 4096) -> list[list[int]]:
    """Plain decoding of several prompts of different lengths at once.

    On the lean runtime: continuous batching (`batched.py`): each prompt is prefilled alone,
    all rows advance in one forward per step, and a finished row leaves at once (the batch
    shrinks instead of carrying it); a row's tokens do not depend on the others' in exact
    mode. Other backbones: prompts left-padded to a common length with per-row positions and
    a mask hiding the padding; finished rows keep stepping until all are done.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if isinstance(backbone, LlamaModel):
        return _continuous_batch(backbone, prompts, max_new_tokens, params, stop_ids, generator,
                                 max_positions)
    return _padded_batch(backbone, prompts, max_new_tokens, params, stop_ids, generator, pad_id,
                         max_positions)


def _continuous_batch(backbone: LlamaModel, prompts, max_new_tokens, params, stop_ids,
                      generator, max_positions) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    decoder = BatchedDecoder(backbone, len(prompts), cache_capacity(width, max_new_tokens, 1,
                                                                    max_positions))
    seqs = [decoder.add(p, params, generator) for p in prompts]
    for seq in seqs:
        if _finished(seq, max_new_tokens, stop_ids, decoder.capacity):
            decoder.remove(seq)
    while decoder.sequences:
        for seq, _ in decoder.step():
            if _finished(seq, max_new_tokens, stop_ids, decoder.capacity):
                decoder.remove(seq)
    return [seq.tokens for seq in seqs]


def _finished(seq, max_new_tokens: int, stop_ids, capacity: int) -> bool:
    return (len(seq.tokens) >= max_new_tokens or seq.root in stop_ids
            or seq.length + 1 > capacity)


def _padded_batch(backbone: Backbone, prompts, max_new_tokens, params, stop_ids, generator,
                  pad_id, max_positions) -> list[list[int]]:
    rows, width = len(prompts), max(len(p) for p in prompts)
    dev = backbone.device
    backbone.reset(rows, cache_capacity(width, max_new_tokens, 1, max_positions))
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=dev)
    valid = torch.zeros(rows, backbone.capacity, dtype=torch.bool, device=dev)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, device=dev)
        valid[r, width - len(p):width] = True
    positions = (valid[:, :width].long().cumsum(1) - 1).clamp(min=0)
    # Causal over real tokens; every slot also sees itself so padded rows never divide by zero.
    eye = torch.eye(width, dtype=torch.bool, device=dev)
    mask = (torch.ones(width, width, dtype=torch.bool, device=dev).tril() & valid[:, None, :width]) | eye
    logits = backbone.forward(ids, positions=positions, mask=mask, last_only=True).logits[:, -1]
    backbone.commit()
    next_pos = positions[:, -1] + 1
    outputs: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for step in range(max_new_tokens):
        tokens = choose(logits, params, generator)
        for r, token in enumerate(tokens.tolist()):  # one device sync per step, not per row
            if not done[r]:
                outputs[r].append(token)
                done[r] = token in stop_ids
        last = step == max_new_tokens - 1
        if last or all(done) or backbone.length + 1 > backbone.capacity:
            break
        valid[:, backbone.length] = True
        step_mask = valid[:, None, :backbone.length + 1]
        logits = backbone.forward(tokens[:, None], positions=next_pos[:, None],
                                  mask=step_mask).logits[:, -1]
        backbone.commit()
        next_pos += 1
    return outputs
