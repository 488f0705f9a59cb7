"""The interface every runtime offers the decoding loop.

A backbone owns weights and a static KV cache of `capacity` slots per row. `length` slots
are committed. `forward` writes the K/V of its new tokens into the slots after `length`
without committing them; `commit(keep)` then keeps a chosen subset of those pending entries
(all of them for plain decoding, the accepted path for speculative decoding), packs them
into contiguous slots and advances `length`. Nothing else ever moves the cache.

Masks are boolean, `True` = may attend, shaped [batch, new_tokens, length + new_tokens]:
the committed past followed by the new tokens themselves. `None` means plain causal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ContextFullError


@dataclass
class StepOutput:
    logits: torch.Tensor  # [batch, T, vocab] (or [batch, 1, vocab] with last_only)
    hidden: torch.Tensor  # [batch, T, hidden] after the final norm: what Medusa heads read
    # [batch, T, len(taps) * hidden]: the residual stream after each layer `forward` was asked
    # to tap, side by side in the order asked (EAGLE-3-style heads read them); None if none.
    taps: torch.Tensor | None = None


def check_step(length: int, new: int, capacity: int, rows: int, cache_rows: int) -> None:
    """Refuse a forward that would overflow the cache or mismatch its batch, before writing."""
    if length + new > capacity:
        raise ContextFullError(
            f"context full: {length} cached + {new} new tokens exceed the cache capacity "
            f"{capacity}; shorten the prompt or lower --max-new-tokens")
    if rows != cache_rows:
        raise ValueError(f"batch of {rows} rows but the cache was reset for {cache_rows}")


def layer_count(backbone) -> int:
    """How many decoder layers a backbone has (our config's name, or transformers')."""
    cfg = backbone.config
    return int(getattr(cfg, "num_layers", None) or cfg.num_hidden_layers)


def check_taps(taps: tuple[int, ...], num_layers: int) -> None:
    """Refuse tapping a layer the model does not have (a head made for a deeper model)."""
    bad = [i for i in taps if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"cannot tap layer(s) {bad}: the model has {num_layers} layers "
                         f"(0..{num_layers - 1})")


class Backbone(Protocol):
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    capacity: int
    length: int

    def reset(self, batch_size: int = 1, capacity: int | None = None) -> None:
        """Empty the cache (and reallocate it if the batch size or capacity changed)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False,
                taps: tuple[int, ...] = ()) -> StepOutput:
        """Run new tokens [batch, T] against the committed cache; K/V stay pending. `taps`:
        layer indices whose outputs come back in `StepOutput.taps`."""

    def commit(self, keep: torch.Tensor | None = None) -> None:
        """Keep pending entries `keep` (indices into the last forward's T tokens; None = all)."""

    def truncate(self, length: int) -> None:
        """Drop committed entries after `length` (draft models roll back rejected guesses)."""
