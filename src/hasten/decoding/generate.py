"""The generation loop for one sequence, and batched plain decoding for many.

One sequence: prefill the prompt, pick the first token, then repeat one step at a time.
Each step feeds the *root* (the newest token, not yet in the KV cache) and returns the
next token. Speculative decoding (`engine.py`) runs the same loop with a draft tree after
the root; plain decoding is the special case of an empty tree.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import ContextFullError
from ..models.backbone import Backbone
from .sampling import SamplingParams, choose


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # decode steps after prefill (one forward each)
    accepted: list[int] = field(default_factory=list)  # tokens gained per step
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    accept_time: float = 0.0
    finish_reason: str = ""  # "stop" (EOS), "length" (max_new_tokens) or "context" (cache full)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_time if self.total_time > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens after the first, per second after the first token (excludes prefill)."""
        t = self.total_time - self.time_to_first_token
        return (self.new_tokens - 1) / t if t > 0 and self.new_tokens > 1 else 0.0

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0

    def accepted_histogram(self) -> dict[int, int]:
        hist: dict[int, int] = {}
        for n in self.accepted:
            hist[n] = hist.get(n, 0) + 1
        return dict(sorted(hist.items()))

    def summary(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "steps": self.steps, "tokens_per_second": round(self.tokens_per_second, 2),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
            "time_to_first_token_s": round(self.time_to_first_token, 4),
            "total_time_s": round(self.total_time, 4),
            "mean_accepted_per_step": round(self.mean_accepted, 3),
            "accepted_histogram": self.accepted_histogram(),
            "draft_time_s": round(self.draft_time, 4), "verify_time_s": round(self.verify_time, 4),
            "accept_time_s": round(self.accept_time, 4), "finish_reason": self.finish_reason,
        }


def cache_capacity(prompt_len: int, max_new_tokens: int, slack: int,
                   max_positions: int) -> int:
    """Cache slots for a generation, refusing prompts the model cannot hold at all."""
    if prompt_len >= max_positions:
        raise ContextFullError(f"the prompt has {prompt_len} tokens but the model's context is "
                               f"{max_positions}; shorten the prompt")
    return min(prompt_len + max_new_tokens + slack, max_positions)


@torch.inference_mode()
def generate_plain(backbone: Backbone, prompt: list[int], max_new_tokens: int,
                   params: SamplingParams = SamplingParams(), stop_ids: tuple[int, ...] = (),
                   generator: torch.Generator | None = None, max_positions: int = 4096,
                   stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new token ids one by one: plain autoregressive decoding (the reference)."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    start = time.perf_counter()
    backbone.reset(1, cache_capacity(len(prompt), max_new_tokens, 1, max_positions))
    ids = torch.tensor([prompt], device=backbone.device)
    logits = backbone.forward(ids, last_only=True).logits[0, -1]
    backbone.commit()
    while stats.new_tokens < max_new_tokens:
        token = int(choose(logits, params, generator))
        stats.new_tokens += 1
        if stats.new_tokens == 1:
            stats.time_to_first_token = time.perf_counter() - start
        stats.total_time = time.perf_counter() - start
        yield token
        if token in stop_ids:
            stats.finish_reason = "stop"
            break
        if stats.new_tokens == max_new_tokens:
            break
        if backbone.length + 1 > backbone.capacity:
            stats.finish_reason = "context"
            break
        t0 = time.perf_counter()
        logits = backbone.forward(torch.tensor([[token]], device=backbone.device)).logits[0, -1]
        backbone.commit()
        stats.verify_time += time.perf_counter() - t0
        stats.steps += 1
        stats.accepted.append(1)
    stats.finish_reason = stats.finish_reason or "length"
    stats.total_time = time.perf_counter() - start


@torch.inference_mode()
def generate_batch(backbone: Backbone, prompts: list[list[int]], max_new_tokens: int,
                   params: SamplingParams = SamplingParams(), stop_ids: tuple[int, ...] = (),
                   generator: torch.Generator | None = None, pad_id: int = 0,
                   max_positions: int = 4096) -> list[list[int]]:
    """Plain decoding of several prompts of different lengths at once.

    Prompts are left-padded to a common length; each row gets its own positions (counting
    real tokens only) and a mask that hides its padding, so every row decodes exactly as it
    would alone. Finished rows keep stepping (their output is ignored) until all are done.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
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
