"""What a generation reports (`GenerationStats`) and how much cache it may use."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ContextFullError


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
    exact: bool | None = None  # speculative: output bit-identical to plain decoding here (measured)

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
            "exact": self.exact,
        }


def cache_capacity(prompt_len: int, max_new_tokens: int, slack: int,
                   max_positions: int) -> int:
    """Cache slots for a generation, refusing prompts the model cannot hold at all."""
    if prompt_len >= max_positions:
        raise ContextFullError(f"the prompt has {prompt_len} tokens but the model's context is "
                               f"{max_positions}; shorten the prompt")
    return min(prompt_len + max_new_tokens + slack, max_positions)
