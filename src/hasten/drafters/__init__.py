"""Drafters propose token trees for the speculative engine; `make_drafter` builds one by name."""

from __future__ import annotations

from ..errors import HastenError

DRAFTERS = ("none", "lookup", "model", "rest", "medusa")


def make_drafter(name: str, model, draft_model: str | None = None, draft_layers: int | None = None,
                 draft_depth: int = 4, datastore: str | None = None, medusa_heads: str | None = None):
    """A drafter for `model` (a `hasten.api.Model`); None for plain decoding.

    `model`: a separate draft model spec (must share the tokenizer), or, if `draft_model` is
    None, a training-free self-draft from the target's first `draft_layers` layers.
    `rest`: retrieval from the datastore at `datastore` (built with `hasten datastore build`).
    `medusa`: heads from `medusa_heads`, else next to the model, else shipped for the model."""
    if name in (None, "none"):
        return None
    if name == "lookup":
        from .lookup import LookupDrafter
        return LookupDrafter()
    if name == "model":
        from .draft_model import ModelDrafter, self_draft
        if draft_model is not None:
            from ..api import load
            small = load(draft_model, device=str(model.backbone.device), dtype=model.backbone.dtype)
            if small.tokenizer.get_vocab() != model.tokenizer.get_vocab():
                raise HastenError(f"draft model {small.name} does not share {model.name}'s tokenizer")
            return ModelDrafter(small.backbone, depth=draft_depth)
        from ..models.llama import LlamaModel
        if not isinstance(model.backbone, LlamaModel):
            raise HastenError("self-drafting needs the lean runtime; pass --draft-model SPEC instead")
        layers = draft_layers or max(1, model.backbone.config.num_layers // 4)
        return ModelDrafter(self_draft(model.backbone, layers), depth=draft_depth)
    if name == "rest":
        if not datastore:
            raise HastenError("the rest drafter needs a datastore: --datastore PATH "
                              "(build one with `hasten datastore build`)")
        from .rest import rest_drafter_for
        return rest_drafter_for(model, datastore)
    if name == "medusa":
        from ..medusa.drafter import medusa_drafter
        return medusa_drafter(model, medusa_heads)
    raise HastenError(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")
