"""Turning logits into a next-token choice: greedy, or sampling after temperature/top-k/top-p.

`probabilities` is the single definition of "the model's sampling distribution"; plain
sampling and lossless speculative acceptance both use it, which is what makes them agree.
Random draws always come from a CPU `torch.Generator` (`sample`), whatever device the logits
are on: one seeded generator then gives the same sample on every device, and torch never
sees a CPU generator next to a CUDA tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Sampling distribution over the last dimension (float32/64), after temperature, top-k, top-p."""
    logits = logits.float() if logits.element_size() < 4 else logits
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    # Shift by the max first: a tiny temperature then sends every other logit to -inf and the
    # max to 0 (greedy in the limit) instead of overflowing to inf - inf = nan.
    logits = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens strictly more likely than it already reach top_p.
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop_sorted[..., 0] = False  # the most likely token always stays, however small top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits` [..., vocab], on the logits' device."""
    if params.greedy:
        return logits.argmax(-1)
    probs = probabilities(logits, params)
    flat = probs.reshape(-1, probs.shape[-1]).cpu()
    picked = [sample(row, generator) for row in flat]
    return torch.tensor(picked, device=logits.device).reshape(probs.shape[:-1])


def sample(p: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from the unnormalised distribution p (1-D, on the CPU), by inverting its CDF.

    Same law as `torch.multinomial(p, 1)`, which is far slower on a large vocabulary."""
    cdf = p.cumsum(0, dtype=torch.float64)  # float32 running sums drift over 50k terms
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(cdf[-1])
    # The first index whose CDF exceeds u; zero-probability tokens never qualify.
    i = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True))
    if i >= p.numel():  # u rounded up to the total: take the last token with mass
        i = int(p.nonzero()[-1])
    return i
