"""Draft models for probe sampling: cheap scorers of the target's candidates.

- `self:N` - the target's own first N blocks (plus its final norm and LM head), same
  tokenizer, so the candidate ids are scored as they are. Needs the lean runtime.
- any other model spec (`hasten.api.load`) - a model with its own tokenizer and chat template.
  The candidate is what a user would send, text: it is decoded with the target's tokenizer
  and encoded with the draft's, and the draft scores its own layout of the same goal, suffix
  text and target text. (The reference code feeds target token ids to a GPT-2 draft, which
  scores a different string.) Re-tokenised rows differ in length; `candidate_losses` pads.

A draft is bound to one goal with `for_goal(goal, target)` before it scores candidates.
"""

from __future__ import annotations

from ..errors import HastenError
from .forward import LeanScorer, scorer_for
from .losses import candidate_losses, make_layout, swap_losses


class Draft:
    def __init__(self, scorer, tokenizer, target_tokenizer, name: str, chunk: int = 128):
        self.scorer, self.tokenizer, self.target_tokenizer = scorer, tokenizer, target_tokenizer
        self.same_tokenizer = tokenizer is target_tokenizer
        self.name, self.chunk = name, chunk
        self.layout = self.prefix = None

    def for_goal(self, goal: str, target: str, chat: bool = True) -> "Draft":
        """`chat`: whether the target's prompt uses its chat template (the draft mirrors it)."""
        self.layout = make_layout(self.tokenizer, goal, target, chat=chat)
        self.prefix = self.scorer.prefix(self.layout.before)
        return self

    def rows(self, cands) -> list[list[int]]:
        """The candidates as the draft's token ids."""
        if self.same_tokenizer:
            return cands.tolist()
        texts = self.target_tokenizer.batch_decode(cands.tolist())
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [r or [self.tokenizer.encode(" ", add_special_tokens=False)[0]] for r in rows]

    def losses(self, cands, base: list[int] | None = None):
        """Draft losses of candidates (target ids); `base`: the suffix they are one-token
        swaps of, whose shared part the draft then computes once (same tokenizer only)."""
        if self.same_tokenizer and base is not None:
            return swap_losses(self.scorer, self.prefix, base, cands, self.layout,
                               self.chunk).losses
        return candidate_losses(self.scorer, self.prefix, self.rows(cands), self.layout,
                                self.chunk).losses


def make_draft(spec: str, target, chunk: int = 128, load=None, dtype=None) -> Draft:
    """`spec`: "self:N" or a model spec; `target` a `hasten.api.Model`; `load(spec)` loads a
    model (defaults to `hasten.api.load` on the target's device); `dtype`: the draft's
    precision (default the target's)."""
    if spec.startswith("self:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise HastenError(f"--draft {spec!r}: write self:N with N the number of the "
                              "target's first layers to use, e.g. self:4") from None
        try:
            scorer = LeanScorer(target.backbone, n, dtype)
        except (AttributeError, TypeError):
            raise HastenError("--draft self:N needs a Llama-family target on the lean runtime; "
                              "give another model as the draft") from None
        except ValueError as err:
            raise HastenError(f"--draft {spec}: {err}") from None
        if n >= target.backbone.config.num_layers:
            raise HastenError(f"--draft {spec}: the target has only "
                              f"{target.backbone.config.num_layers} layers; use fewer")
        return Draft(scorer, target.tokenizer, target.tokenizer, spec, chunk)
    if load is None:
        from ..api import load as api_load
        load = lambda s: api_load(s, device=str(target.backbone.device),  # noqa: E731
                                  dtype=dtype or target.backbone.dtype, progress=True)
    model = load(spec)
    return Draft(scorer_for(model.backbone), model.tokenizer, target.tokenizer, spec, chunk)
