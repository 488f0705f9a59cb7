"""Drafters propose token trees for the speculative engine; `build_drafter` makes one from a
`DraftSpec`. Nothing here imports the API: a draft model is loaded by `models.loader`."""

from __future__ import annotations

from ..errors import HastenError
from .spec import DRAFTERS, DraftSpec

__all__ = ["DRAFTERS", "DraftSpec", "build_drafter"]


def build_drafter(spec: DraftSpec, model):
    """A drafter for `model` (a `hasten.api.Model`), or None for plain decoding.

    `model`: `spec.draft_model` (must share the tokenizer), or without one a training-free
    self-draft from the target's first `draft_layers` layers (default: a quarter).
    `rest`: retrieval from `spec.datastore`. `medusa` / `eagle`: heads from
    `spec.medusa_heads` / `spec.eagle_head`, else next to the model, else shipped for it."""
    if spec.plain:
        return None
    if spec.name == "lookup":
        from .lookup import LookupDrafter
        return LookupDrafter()
    if spec.name == "model":
        from .draft_model import ModelDrafter, self_draft
        if spec.draft_model is not None:
            from ..models.loader import load_backbone
            small = load_backbone(spec.draft_model, device=model.backbone.device,
                                  dtype=model.backbone.dtype)
            if small.tokenizer.get_vocab() != model.tokenizer.get_vocab():
                raise HastenError(f"draft model {small.name} does not share {model.name}'s "
                                  "tokenizer; pick a draft model of the same family")
            return ModelDrafter(small.backbone, depth=spec.draft_depth)
        from ..models.llama import LlamaModel
        if not isinstance(model.backbone, LlamaModel):
            raise HastenError("self-drafting needs the lean runtime; pass --draft-model SPEC instead")
        total = model.backbone.config.num_layers
        layers = spec.draft_layers or max(1, total // 4)
        if layers >= total:
            raise HastenError(f"--draft-layers {layers}: the model has only {total} layers; "
                              f"pick 1..{total - 1}")
        return ModelDrafter(self_draft(model.backbone, layers), depth=spec.draft_depth)
    if spec.name == "rest":
        from .rest import rest_drafter_for
        return rest_drafter_for(model, spec.datastore)
    if spec.name == "medusa":
        from ..medusa.drafter import medusa_drafter
        return medusa_drafter(model, spec.medusa_heads)
    if spec.name == "eagle":
        from ..eagle.drafter import eagle_drafter
        return eagle_drafter(model, spec.eagle_head)
    raise HastenError(f"unknown drafter {spec.name!r}; choose one of {', '.join(DRAFTERS)}")
